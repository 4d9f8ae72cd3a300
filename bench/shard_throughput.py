"""Read throughput of WebDataset shards vs the raw prepared files, per modality, with 1 and 2 loader workers.

Both paths do the same per-sample work with the same functions (decode + transform, collate into the same
batches); text differs by design: raw = tokenize documents on the fly, shards = stored token ids. The difference is
the storage layout: a few large sequential tar files vs many small files
opened one by one. Needs the embedded data (`d2v prepare` + `d2v shard`, as `make run` does).

    python bench/shard_throughput.py [--root data] [--seconds 8] [--out results/bench/shard_throughput.json]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from d2v.data.loaders import AudioConfig, ImageAugConfig, _decode_audio, _decode_image, collate_images, \
    image_loader, image_transform, pack_blocks, pad_waveforms, speech_loader, text_pretrain_loader, web_loader
from d2v.data.manifest import read_manifest
from d2v.data.tokenizer import TextTokenizer
from d2v.io import atomic_write_json
from d2v.modalities.base import Batch

BATCH = {"image": 64, "speech": 8, "text": 32}


class RawFiles(IterableDataset):
    """The baseline: walk the manifest and open each prepared file, with the shard reader's own decode functions
    (images: the same eval transform; speech: the same decode + normalisation; text: tokenize + pack on the fly)."""

    def __init__(self, folder: Path, split: str, kind: str, batch: int, tokenizer: Path):
        self.folder, self.kind, self.batch, self.tokenizer = folder, kind, batch, tokenizer
        paths = list(read_manifest(folder, split)["path"])
        order = np.random.default_rng(0).permutation(len(paths))  # training reads in shuffled order
        self.paths = [paths[i] for i in order]

    def items(self, paths):
        if self.kind == "image":
            transform = image_transform(IMAGE_CFG, "eval")
            for rel in paths:
                yield _decode_image({"png": (self.folder / rel).read_bytes(), "cls": 0}, transform)
        elif self.kind == "speech":
            for rel in paths:
                yield _decode_audio({"flac": (self.folder / rel).read_bytes()}, AUDIO_CFG, "eval", [], 0)
        else:
            tok = TextTokenizer(self.tokenizer)
            chunks = ({"ids.npy": np.asarray([i for line in (self.folder / rel).read_text().splitlines()
                                              if line.strip() for i in (*tok.sp.encode(line.strip()), tok.eos)])}
                      for rel in paths)
            yield from pack_blocks(128, tok.bos)(chunks)

    def __iter__(self):
        info = get_worker_info()
        paths = self.paths if info is None else self.paths[info.id::info.num_workers]
        batch = []
        for item in self.items(itertools.cycle(paths)):
            batch.append(item)
            if len(batch) == self.batch:
                yield COLLATE[self.kind](batch)
                batch = []


COLLATE = {"image": collate_images, "speech": pad_waveforms,
           "text": lambda blocks: Batch(source=torch.stack(blocks), padding_mask=None)}


def samples_in(batch, kind: str) -> int:
    """Both paths yield the same collated batches: [images, labels], a padded-speech dict, or a token Batch."""
    if kind == "image":
        return len(batch[0])
    return (batch["batch"] if isinstance(batch, dict) else batch).source.shape[0]


def drop_page_cache() -> bool:
    """Cold-cache runs need root (Linux); returns False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(loader, kind: str, seconds: float, cold: bool = False, warmup: int = 3) -> float:
    if cold:
        warmup = 1  # the first batch pays for worker start-up only; everything after comes from disk
        if not drop_page_cache():
            return float("nan")
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += samples_in(next(it), kind)
    return n / (time.perf_counter() - start)


IMAGE_CFG = ImageAugConfig(size=28, channels=1, mean=(0.286,), std=(0.353,), crop_pct=1.0)
AUDIO_CFG = AudioConfig(min_samples=0, max_samples=10**9)


def shard_dataset(kind: str, root: Path):
    if kind == "image":
        return image_loader(root / "shards/fashion_mnist/train", IMAGE_CFG, "eval", BATCH[kind], resampled=True)
    if kind == "speech":
        return speech_loader(root / "shards/mini_librispeech/pretrain", AUDIO_CFG, "eval", BATCH[kind],
                             resampled=True)
    return text_pretrain_loader(root / "shards/text_corpus/pretrain", 128, BATCH[kind], resampled=True, shuffle=0)


RAW = {"image": ("fashion_mnist", "train"), "speech": ("mini_librispeech", "pretrain"),
       "text": ("text_corpus", "pretrain")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="data")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="results/bench/shard_throughput.json")
    parser.add_argument("--modalities", default="image,speech,text")
    args = parser.parse_args()
    root = Path(args.root)
    torch.set_num_threads(1)
    results = []
    for kind, cache, workers in itertools.product(args.modalities.split(","), ("warm", "cold"), (1, 2)):
        source, split = RAW[kind]
        cold = cache == "cold"
        shards = measure(web_loader(shard_dataset(kind, root), workers), kind, args.seconds, cold)
        raw_ds = RawFiles(root / "raw" / source, split, kind, BATCH[kind], root / "tokenizer/spm.model")
        raw = measure(DataLoader(raw_ds, batch_size=None, num_workers=workers, persistent_workers=True,
                                 prefetch_factor=4), kind, args.seconds, cold)
        row = {"modality": kind, "page_cache": cache, "workers": workers, "shards_samples_per_s": round(shards, 1),
               "raw_files_samples_per_s": round(raw, 1), "speedup": round(shards / raw, 2)}
        print(row, flush=True)
        results.append(row)
    atomic_write_json(args.out, {"benchmark": "shard_throughput", "machine": platform.processor() or
                                 platform.machine(), "cpus": torch.get_num_threads(), "seconds": args.seconds,
                                 "note": "equal per-sample work on both paths; text: raw = tokenize documents on "
                                         "the fly, shards = stored token ids; samples = 128-token blocks",
                                 "results": results})


if __name__ == "__main__":
    main()
