"""A text pretraining corpus from files the user has (paper scale: BookCorpus, Wikipedia dumps, anything else).

Accepts UTF-8 text files (one document per file; paragraphs separated by blank lines) and MediaWiki XML dumps
(`*.xml`, e.g. `enwiki-latest-pages-articles.xml.bz2`), plain or compressed (`.gz`, `.bz2`, `.xz`); a dump's articles
are stripped to plain text in `workers` processes (an article whose markup cannot be read is skipped and named).
Everything is streamed: each input's documents are written into volumes of about `volume_mb` (a blank line between
documents, cut only between lines), so a 20 GB dump or a one-file BookCorpus needs the memory of a page, not of the
corpus, and the tokenizer and shard stages read a few hundred files, not millions. Every `valid_every`-th document
goes to the `valid` volumes. A file that is not valid UTF-8, XML or compressed data is skipped whole (the volumes it
had begun are deleted), named and counted.
"""
from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import itertools
import lzma
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from d2v.data.manifest import PRETRAIN_SPLIT, Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, log, register, staged
from d2v.data.sources.text import plain_text, slug, wiki_pages
from d2v.processes import forked_pool

COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # by the file's last suffix


def _is_wiki_dump(path: Path) -> bool:
    return path.name.removesuffix(path.suffix if path.suffix in COMPRESSED else "").endswith(".xml")


def _open(path: Path, mode: str):
    """A plain or compressed input; text mode reads UTF-8 with universal newlines (as d2v.io.text_lines), a BOM
    dropped."""
    opener = COMPRESSED.get(path.suffix, open)
    return opener(path, mode, **({"encoding": "utf-8-sig"} if "t" in mode else {}))


def _strip(page: tuple[str, str]) -> tuple[str, str | None, str | None]:
    """(title, plain text, None), or (title, None, the error) for a page mwparserfromhell cannot read: one such
    article costs that article, not the dump."""
    title, wikitext = page
    try:
        return title, plain_text(wikitext), None
    except Exception as err:
        return title, None, f"{type(err).__name__}: {err}"


def _wiki_documents(path: Path, workers: int, skipped: Skipped) -> Iterator[list[str]]:
    with _open(path, "rb") as stream, contextlib.ExitStack() as stack:
        pages = wiki_pages(stream)
        if workers > 1:  # mwparserfromhell is the slow part: blocks of pages, stripped in order
            pool = stack.enter_context(forked_pool(workers))
            blocks = iter(lambda: list(itertools.islice(pages, 256 * workers)), [])
            stripped = _one_block_ahead(pool.map(_strip, block, chunksize=64) for block in blocks)
        else:
            stripped = map(_strip, pages)
        for title, text, error in stripped:
            if error is not None:
                skipped.add(f"{path}:{title}", f"markup not readable: {error}", log)
                continue
            yield text.split("\n")


def _one_block_ahead(blocks: Iterator[Iterator]) -> Iterator:
    """The items of each block, with the next block taken (read and handed to the workers) before this one's
    results are waited for: the main process parses the dump while the workers strip."""
    pending = next(blocks, None)
    while pending is not None:
        following = next(blocks, None)
        yield from pending
        pending = following


def _text_document(path: Path) -> Iterator[list[str]]:
    with _open(path, "rt") as f:
        yield (line.rstrip("\n") for line in f)


def documents(path: Path, skipped: Skipped, workers: int = 1) -> Iterator[Iterable[str]]:
    """The documents of one input file, each as its lines, read as a stream."""
    return _wiki_documents(path, workers, skipped) if _is_wiki_dump(path) else _text_document(path)


class WriteFailed(RuntimeError):
    """A volume could not be written (a full disk): the run stops; the input is not to blame."""


class Volumes:
    """One input's documents appended to `folder/<split>-NNNNN.txt`, a new volume once one holds `limit` bytes."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.done: list[dict] = []  # closed volumes: path, split, bytes, sha256, documents
        self.current: dict[str, tuple] = {}  # split -> (file, record, hash) of the open volume

    def write(self, split: str, lines: Iterable[str]) -> None:
        """One document. Reading `lines` may fail (the input's fault: skipped); writing raises WriteFailed."""
        for line in itertools.chain(lines, [""]):  # a blank line ends the document
            self._append(split, (line + "\n").encode("utf-8"))
        self.current[split][1]["documents"] += 1

    def _append(self, split: str, data: bytes) -> None:
        try:
            if split in self.current and self.current[split][1]["bytes"] >= self.limit:
                self._close(split)
            f, record, digest = self._volume(split)
            f.write(data)
        except OSError as err:
            raise WriteFailed(f"text_files: writing a volume under {self.folder} failed: {err}") from err
        digest.update(data)
        record["bytes"] += len(data)

    def _volume(self, split: str) -> tuple:
        if split not in self.current:
            count = sum(r["split"] == split for r in self.done)
            path = self.folder / f"{split}-{count:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            record = dict(path=path, split=split, bytes=0, documents=0)
            self.current[split] = (open(path, "wb"), record, hashlib.sha256())
        return self.current[split]

    def _close(self, split: str) -> None:
        f, record, digest = self.current.pop(split)
        f.close()
        self.done.append(record | {"sha256": digest.hexdigest()})

    def close(self) -> list[dict]:
        for split in list(self.current):
            self._close(split)
        return self.done

    def discard(self) -> None:
        for f, _, _ in self.current.values():
            f.close()
        self.current.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


@register("text_files", "text", "paper", "a text corpus from user-supplied .txt files and MediaWiki XML dumps",
          splits=(PRETRAIN_SPLIT, "valid"))
def prepare(ctx: Context, paths: Sequence[str], valid_every: int = 100, volume_mb: float = 64.0,
            workers: int = 1) -> Path:
    files = sorted({Path(p) for pattern in paths for p in glob.glob(str(pattern), recursive=True)})
    if not files:
        raise FileNotFoundError(f"text_files: no files match {list(paths)}")
    if valid_every < 1 or volume_mb <= 0 or workers < 1:
        raise ValueError(f"text_files: valid_every ({valid_every}) and workers ({workers}) must be at least 1 and "
                         f"volume_mb ({volume_mb}) above 0")
    skipped, rows, n_docs = Skipped(), [], 0
    with staged(ctx.out_dir) as out:
        for k, f in enumerate(files):
            volumes, first = Volumes(out / "docs" / f"{k:05d}_{slug(f.name)}", int(volume_mb * (1 << 20))), n_docs
            try:
                for lines in documents(f, skipped, workers):
                    volumes.write("valid" if n_docs % valid_every == valid_every - 1 else PRETRAIN_SPLIT, lines)
                    n_docs += 1
            except WriteFailed:
                volumes.discard()
                raise
            except Exception as err:  # bad encoding, broken XML or bz2: skipped whole and reported
                volumes.discard()
                n_docs = first
                skipped.add(str(f), f"unreadable: {err}", log)
                continue
            for v in volumes.close():
                rel = v["path"].relative_to(out).as_posix()
                rows.append(dict(id=rel.removeprefix("docs/").replace("/", "-").removesuffix(".txt"), path=rel,
                                 split=v["split"], bytes=v["bytes"], sha256=v["sha256"], documents=v["documents"],
                                 origin=str(f)))
            log.info("text_files: %s: %d documents", f, n_docs - first)
        write_manifest(out, make_manifest(rows), source="text_files", skipped=skipped.as_json(),
                       inputs=[str(f) for f in files], documents=n_docs, volume_mb=volume_mb)
    return ctx.out_dir
