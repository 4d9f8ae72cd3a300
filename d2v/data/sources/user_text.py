"""A text pretraining corpus from files the user has (paper scale: BookCorpus, Wikipedia dumps, anything else).

Accepts UTF-8 `.txt` files (one document per file; paragraphs separated by blank lines) and MediaWiki XML dumps
(`.xml` or `.xml.bz2`, e.g. `enwiki-latest-pages-articles.xml.bz2`), whose articles are stripped to plain text. A
file that is not valid UTF-8 or XML is skipped, named and counted.
"""
from __future__ import annotations

import bz2
import glob
from collections.abc import Iterable
from pathlib import Path

from d2v.data.download import bytes_sha256
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, log, register, staged
from d2v.data.sources.text import slug, wiki_articles


def _documents(path: Path) -> list[tuple[str, str]]:
    if path.name.endswith((".xml", ".xml.bz2")):
        data = path.read_bytes()
        return wiki_articles(data if data[:3] == b"BZh" else bz2.compress(data))
    return [(path.stem, path.read_bytes().decode("utf-8"))]


@register("text_files", "text", "paper", "a text corpus from user-supplied .txt files and MediaWiki XML dumps")
def prepare(ctx: Context, paths: Iterable[str], valid_every: int = 100) -> Path:
    files = sorted({Path(p) for pattern in paths for p in glob.glob(str(pattern), recursive=True)})
    if not files:
        raise FileNotFoundError(f"text_files: no files match {list(paths)}")
    skipped, rows = Skipped(), []
    with staged(ctx.out_dir) as out:
        for f in files:
            try:
                docs = _documents(f)
            except Exception as err:  # bad encoding, broken XML: skipped and reported
                skipped.add(str(f), f"unreadable: {err}", log)
                continue
            for title, text in docs:
                n = len(rows)
                rel = f"docs/{n // 1000:04d}/{n:07d}_{slug(title)}.txt"
                data = (text.strip() + "\n").encode()
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
                rows.append(dict(id=f"{n:07d}", path=rel, split="valid" if n % valid_every == valid_every - 1
                                 else "pretrain", bytes=len(data), sha256=bytes_sha256(data), origin=str(f)))
        write_manifest(out, make_manifest(rows), source="text_files", skipped=skipped.as_json(),
                       inputs=[str(f) for f in files])
    return ctx.out_dir
