"""Batch streams for pretraining from shards, any stream positioned at a batch index (exact resume), and the seeded
generators of a step's masks and dropout."""
from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from d2v.data import index_cache
from d2v.data.loaders import AudioConfig, ImageAugConfig, image_loader, seekable_image_batches, \
    seekable_speech_batches, seekable_text_pretrain_batches, speech_loader, text_pretrain_loader, web_loader
from d2v.data.seekable import index_shards
from d2v.modalities.base import Batch
from d2v.train.config import DataConfig, StreamResume
from d2v.train.distributed import World, any_rank

RESEED_STREAM = 2  # keeps the reseeded streams' keys apart from the masks' (seed, step, group) and LayerDrop's


def step_rng(seed: int, step: int, *group: int) -> np.random.Generator:
    """The generator for the masks of micro-batch `group` (rank · accum + micro) of `step`; torch's RNG (dropout,
    drop-path, LayerDrop) is re-seeded from the same key. Fine-tuning keys by (seed, step), and the rank under
    torchrun. Python's and NumPy's global generators are re-seeded from the key as well: d2v draws from neither,
    but a library that does then repeats too, and two runs checkpoint the same RNG state."""
    key = [seed, step, *group]
    words = np.random.SeedSequence(key).generate_state(2)  # words[0] is generate_state(1)'s: torch's seed unchanged
    torch.manual_seed(int(words[0]))
    random.seed(int(words[1]))
    np.random.seed(words[1])
    return np.random.default_rng(key)


def resumed_seed(seed: int, start: int) -> int:
    """The seed of the fresh stream a `reseed` resume at batch `start` reads (d2v.train.config.StreamResume)."""
    return int(np.random.SeedSequence([seed, start, RESEED_STREAM]).generate_state(1)[0])


def resume_position(resume: StreamResume, seed: int, start: int) -> tuple[int, int]:
    """(the stream's seed, batches to replay) to continue at batch `start`."""
    return (resumed_seed(seed, start), 0) if resume == "reseed" and start > 0 else (seed, start)


def index_first(shard_dir, resume: StreamResume, world: World) -> None:
    """Under torchrun, with `seek`, each node's first rank fills the shard index cache while the others wait: they
    then read it, instead of every rank reading the same headers at once (`d2v index` does it ahead of a launch).
    If indexing fails on a node, every rank stops with an error instead of waiting for it."""
    if resume != "seek" or not world.distributed or index_cache.folder() is None:
        return
    error = None
    if world.local_rank == 0:
        try:
            index_shards(shard_dir)
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
    if any_rank(error is not None, world):  # doubles as the barrier the waiting ranks need
        raise error or RuntimeError(f"indexing the shards in {shard_dir} failed on a node's first rank (local rank "
                                    f"0), so rank {world.rank} stops too: that rank's error names the cause")


def pretrain_stream(modality: str, data: DataConfig, seed: int,
                    resume: StreamResume = "replay") -> Callable[[int], Iterator[Batch]]:
    """`stream(k)` → an infinite iterator of Batches starting at batch k of the seeded stream (`replay`), at the
    start of the stream seeded by `resumed_seed(seed, k)` (`reseed`, k > 0), or at batch k of the seekable stream
    (`seek`, d2v.data.seekable; what follows describes the other two).

    The stream is a pure function of (shards, seed, rank, worker count): shard sampling and shuffling are seeded per
    rank/worker, augmentation draws come from DataLoader workers seeded by a fixed generator (or, with no workers,
    from the main process RNG, which the checkpoint restores). Fast-forwarding replays k batches.
    """
    def stream(start: int) -> Iterator[Batch]:
        if resume == "seek":
            at, skip, ds = seed, 0, seekable_batches(modality, data, seed, start)
        else:
            at, skip = resume_position(resume, seed, start)
            ds = shuffled_batches(modality, data, at)
        wrap = (lambda b: Batch(source=b[0], padding_mask=None)) if modality == "image" else (lambda b: b)
        return positioned(map(wrap, web_loader(ds, data.num_workers, seed=at)), skip)
    return stream


def shuffled_batches(modality: str, data: DataConfig, seed: int):
    """The shuffle-buffer pipeline of `seed`'s stream, read from its start."""
    if modality == "image":
        return image_loader(data.shards, data.image or ImageAugConfig(), "pretrain", data.batch_size, seed=seed,
                            shuffle=data.shuffle)
    if modality == "speech":
        return speech_loader(data.shards, data.audio or AudioConfig(), "pretrain", data.batch_size, seed=seed,
                             shuffle=data.shuffle)
    return text_pretrain_loader(data.shards, data.block_tokens, data.batch_size, seed=seed, shuffle=data.shuffle)


def seekable_batches(modality: str, data: DataConfig, seed: int, start: int):
    """The seekable stream (d2v.data.seekable) from batch `start` on: nothing before it is read."""
    if modality == "image":
        return seekable_image_batches(data.shards, data.image or ImageAugConfig(), "pretrain", data.batch_size,
                                      seed=seed, start=start)
    if modality == "speech":
        return seekable_speech_batches(data.shards, data.audio or AudioConfig(), "pretrain", data.batch_size,
                                       seed=seed, start=start)
    return seekable_text_pretrain_batches(data.shards, data.block_tokens, data.batch_size, seed=seed, start=start)


def positioned(batches: Iterable, start: int) -> Iterator:
    """`batches` from batch `start` on, the first `start` replayed now. A lazy skip (`itertools.islice`) would replay
    them inside the first resumed step, after its RNG was seeded, and draw that step's augmentation from a moved
    generator."""
    it = iter(batches)
    collections.deque(itertools.islice(it, start), maxlen=0)
    return it
