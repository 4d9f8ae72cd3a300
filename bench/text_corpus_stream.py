"""How fast, and in how much memory, a paper-scale text corpus goes from a Wikipedia dump to token shards
(`d2v prepare text_files` + `d2v shard text_files`), to size the paper profile's jobs: enwiki's pages-articles dump
is about 90 GB of XML.

The dump is real Wikipedia markup: the embedded corpus's 106-article sample (gensim's shortened enwiki export) with
its pages repeated `--copies` times under new titles, bz2-compressed as the real dump is. Each measurement runs in a
fresh process and records its wall time and peak resident memory (with its worker processes): `prepare` at each
worker count, then `shard` with the embedded SentencePiece model. Streaming shows as a peak that does not grow with
the dump; every worker count must write the same volumes. Reading the dump alone (bz2 and XML, which stay in the
main process) gives the rate no number of workers can pass.

    python bench/text_corpus_stream.py [--copies 10,40] [--workers 1,2]
                                       [--out results/bench/text_corpus_stream_cpu.json]
"""
from __future__ import annotations

import argparse
import bz2
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d2v.data.sources import Context
from d2v.data.sources.text import ENWIKI
from d2v.io import atomic_write_json
from d2v.processes import usable_cpus

ENWIKI_XML_GB = 90  # enwiki-latest-pages-articles.xml, uncompressed (about 22 GB as .bz2)


def write_dump(sample: bytes, copies: int, path: Path) -> dict:
    """The sample's <page> elements `copies` times, titles made unique, as one bz2 MediaWiki export."""
    xml = bz2.decompress(sample).decode("utf-8")
    head, pages_end = xml.index("<page>"), xml.rindex("</page>") + len("</page>")
    pages = xml[head:pages_end]
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(xml[:head])
        for k in range(copies):
            f.write(re.sub(r"<title>(.*?)</title>", rf"<title>\1 ({k})</title>", pages))
        f.write(xml[pages_end:])
    return {"pages_all_namespaces": copies * pages.count("<page>"),
            "xml_mb": round(copies * len(pages.encode()) / 1e6, 2), "bz2_mb": round(path.stat().st_size / 1e6, 2)}


def child(step: str, args: list[str]) -> dict:
    """Run one step in a fresh interpreter; its wall time and peak RSS (the largest of it and its workers)."""
    code = (f"import json, resource, sys; sys.argv = {['x', step, *args]!r}; "
            "from bench.text_corpus_stream import run_step; out = run_step(); "
            "out['peak_rss_mb'] = max(resource.getrusage(w).ru_maxrss for w in "
            "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024; print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step() -> dict:
    """One step, after its imports (their memory is `import_rss_mb`: pandas, and webdataset's torch for shards)."""
    import webdataset  # noqa: F401  (write_shards imports it, and torch, on first use)

    from d2v.data.manifest import read_manifest
    from d2v.data.shards import write_shards
    from d2v.data.sources import user_text
    from d2v.data.tokenizer import TextTokenizer

    step, *rest = sys.argv[1:]
    imported, start = _rss_mb(), time.perf_counter()
    if step == "read":  # the part that stays in the main process: bz2, XML, pages handed out unstripped
        from d2v.data.sources.text import wiki_pages

        with bz2.open(rest[0], "rb") as stream:
            done = {"articles": sum(1 for _ in wiki_pages(stream))}
    elif step == "prepare":
        dump, out, workers = Path(rest[0]), Path(rest[1]), int(rest[2])
        user_text.prepare(Context(out / "cache", out), paths=[str(dump)], workers=workers)
        df = read_manifest(out)
        done = {"volumes": len(df), "documents": int(df["documents"].sum()), "text_mb": df["bytes"].sum() / 1e6,
                "sha256": sorted(df["sha256"])}
    else:
        corpus, out, tokenizer = Path(rest[0]), Path(rest[1]), Path(rest[2])
        index = write_shards(corpus, "pretrain", out, tokenizer=TextTokenizer(tokenizer))
        done = {"chunks": index["count"], "shard_mb": index["bytes"] / 1e6}
    return {"seconds": time.perf_counter() - start, "import_rss_mb": imported, **done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", default="10,40", help="dump sizes: times the 106-page sample is repeated")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tokenizer", default="data/tokenizer/spm.model", help="SentencePiece model for the shards")
    ap.add_argument("--cache", default="data/cache")
    ap.add_argument("--out", default="results/bench/text_corpus_stream_cpu.json")
    args = ap.parse_args()
    sample = Context(Path(args.cache), Path(args.cache)).read(ENWIKI)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for copies in map(int, args.copies.split(",")):
            dump = Path(tmp) / f"enwiki-{copies}.xml.bz2"
            row = {"copies": copies, **write_dump(sample, copies, dump), "prepare": {}}
            row["read"] = got = child("read", [str(dump)])
            got["xml_mb_per_s"] = row["xml_mb"] / got["seconds"]
            print(f"{copies} copies: pages read (bz2 + XML, not stripped) at {got['xml_mb_per_s']:.1f} MB/s: the "
                  f"ceiling of the main process, whatever the workers", flush=True)
            for workers in map(int, args.workers.split(",")):
                got = child("prepare", [str(dump), str(Path(tmp) / f"c{copies}-w{workers}"), str(workers)])
                got["xml_mb_per_s"] = row["xml_mb"] / got["seconds"]
                got["articles_per_s"] = got["documents"] / got["seconds"]
                got["rss_above_imports_mb"] = got["peak_rss_mb"] - got["import_rss_mb"]
                got["enwiki_hours"] = ENWIKI_XML_GB * 1e3 / got["xml_mb_per_s"] / 3600
                row["prepare"][workers] = got
                print(f"{copies} copies ({row['xml_mb']} MB XML), {workers} worker(s): {got['seconds']:.1f} s, "
                      f"{got['xml_mb_per_s']:.2f} MB/s, peak {got['rss_above_imports_mb']:.0f} MB above imports",
                      flush=True)
            same = len({json.dumps(r.pop("sha256")) for r in row["prepare"].values()}) == 1
            if not same:
                raise SystemExit(f"{copies} copies: the worker counts wrote different volumes")
            corpus = Path(tmp) / f"c{copies}-w{args.workers.split(',')[0]}"
            got = child("shard", [str(corpus), str(Path(tmp) / f"s{copies}"), args.tokenizer])
            got["text_mb_per_s"] = row["prepare"][int(args.workers.split(",")[0])]["text_mb"] / got["seconds"]
            got["rss_above_imports_mb"] = got["peak_rss_mb"] - got["import_rss_mb"]
            row["shard"] = got
            print(f"  shard: {got['chunks']} chunks in {got['seconds']:.1f} s ({got['text_mb_per_s']:.2f} MB of "
                  f"text/s), peak {got['rss_above_imports_mb']:.0f} MB above imports", flush=True)
            rows.append(row)
    atomic_write_json(args.out, {"benchmark": "text_corpus_stream", "machine": platform.machine(),
                                 "cpus": usable_cpus(), "python": platform.python_version(),
                                 "enwiki_xml_gb": ENWIKI_XML_GB, "rows": rows,
                                 "same_volumes_for_every_worker_count": True,
                                 "rss_note": "ru_maxrss of the step's process and of its largest worker"})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
