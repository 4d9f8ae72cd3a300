"""What resuming a pretraining stream costs, and what the seekable stream costs while training.

For image (Fashion-MNIST, the embedded pretraining transform), speech (mini-LibriSpeech's pretraining split, 4 s
crops) and text (the embedded corpus in blocks of 128 pieces), per stream — `replay` (the shuffle-buffer stream, read
again up to the checkpoint), `reseed` (a fresh shuffle-buffer stream) and `seek` (d2v.data.seekable: random access in
a per-epoch order):
- the seconds to the first batch of a stream resumed at batch k, for each k of `--resume-at`;
- steady read throughput (samples/s after a warm-up) with 1 and 2 loader workers;
- for `seek`, the one-off cost of indexing every tar's members from its headers (text: and every chunk's .npy header),
  and of reading that index back from its cache; the first batches are timed with the cache written.
Needs the embedded shards (`make run`, or `snakemake --profile workflow/profiles/local
data/shards/{fashion_mnist/train,mini_librispeech/pretrain,text_corpus/pretrain}/index.json`). The modalities measured
replace their rows in `--out`; the others are kept, with the date each was measured (the machine's speed drifts).

    python bench/stream_resume.py [--modalities image,speech,text] [--resume-at 0,100,400] [--seconds 8] [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from shard_throughput import measure

from d2v.data.seekable import block_count, index_shards
from d2v.io import atomic_write_json
from d2v.train.batches import pretrain_stream
from d2v.train.config import pretrain_config

MODES = ("replay", "reseed", "seek")


def data_config(modality: str, workers: int):
    """The embedded recipe's data settings; speech crops of 4 s, Fashion-MNIST batches of 64."""
    cfg = pretrain_config(modality)
    return cfg.data.model_copy(update={"num_workers": workers})


def first_batch_seconds(modality: str, mode: str, start: int) -> float:
    stream = pretrain_stream(modality, data_config(modality, 0), 0, mode)
    began = time.perf_counter()
    next(stream(start))
    return time.perf_counter() - began


def index_seconds(modality: str) -> dict:
    """Indexing every tar: twice without the cache (the first pass may read headers from disk, the second finds them
    in the page cache), then writing the cache and reading it back. Text's samples are its chunks, whose .npy headers
    are read too; its stream then reads blocks."""
    data = data_config(modality, 0)

    def timed() -> tuple[float, dict]:
        began = time.perf_counter()
        found = index_shards(data.shards)  # what the stream indexes: the tars, and a text corpus's chunks
        return time.perf_counter() - began, found

    cache, runs = os.environ["D2V_INDEX_CACHE"], []
    for setting in ("off", "off", cache, cache):
        os.environ["D2V_INDEX_CACHE"] = setting
        runs.append(timed())
    passes, found = [seconds for seconds, _ in runs], runs[-1][1]
    samples = found["samples"]
    blocks = {"blocks": block_count(found["tokens"], data.block_tokens)} if "tokens" in found else {}
    return {"shards": found["tars"], "samples": samples, **blocks,
            "seconds": [round(p, 3) for p in passes[:2]], "us_per_sample": [round(1e6 * p / samples, 1)
                                                                              for p in passes[:2]],
            "cache_write_read_seconds": [round(p, 3) for p in passes[2:]]}


class Samples:
    """`measure` counts samples in collated batches; a pretraining stream yields Batch objects."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return ([b.source] for b in self.stream(0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modalities", default="image,speech,text")
    parser.add_argument("--resume-at", default="0,100,400")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="results/bench/stream_resume_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # a cache of its own, written by index_seconds: a resumed run finds the one its start wrote
    os.environ["D2V_INDEX_CACHE"] = tempfile.mkdtemp(prefix="d2v-shard-index-")
    rows = []
    for modality in args.modalities.split(","):
        row = {"modality": modality, "measured": datetime.datetime.now().isoformat(timespec="minutes"),
               "batch_size": data_config(modality, 0).batch_size,
               "seek_index": index_seconds(modality), "first_batch_seconds": {}, "samples_per_s": {}}
        for mode in MODES:
            row["first_batch_seconds"][mode] = {str(k): round(first_batch_seconds(modality, mode, k), 3)
                                                for k in map(int, args.resume_at.split(","))}
        for mode in ("replay", "seek"):
            row["samples_per_s"][mode] = {
                str(w): round(measure(Samples(pretrain_stream(modality, data_config(modality, w), 0, mode)),
                                      "image", args.seconds), 1) for w in (1, 2)}
        print(row, flush=True)
        rows.append(row)
    measured = {row["modality"] for row in rows}
    if Path(args.out).is_file():
        kept = [row for row in json.loads(Path(args.out).read_text())["results"] if row["modality"] not in measured]
        rows = kept + rows
    atomic_write_json(args.out, {"benchmark": "stream_resume", "machine": platform.processor() or platform.machine(),
                                 "torch_threads": 1, "seconds": args.seconds, "results": rows})


if __name__ == "__main__":
    main()
