"""Small *structured* synthetic inputs for smoke runs and tests (not a benchmark: real data comes from
`d2v prepare`). Each has local structure a masked model can exploit: oriented gratings and blocks (images),
sequences of harmonic 'phones' (speech), and a sparse Markov chain over tokens (text)."""
from __future__ import annotations

import math

import numpy as np
import torch

from d2v.modalities.base import Batch


def images(rng: np.random.Generator, batch: int, size: int = 32, channels: int = 1) -> Batch:
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((batch, channels, size, size), dtype=np.float32)
    for i in range(batch):
        theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(0.5, 2), rng.uniform(0, 2 * math.pi)
        img = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        for _ in range(rng.integers(1, 4)):  # a few solid rectangles
            h, w = rng.integers(4, size // 2, size=2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            img[top : top + h, left : left + w] = rng.uniform(-1, 1)
        out[i] = img + 0.05 * rng.standard_normal((channels, size, size))
    return Batch(torch.from_numpy(out))


PHONES = np.array([[220, 660], [300, 900], [400, 1200], [500, 1000], [250, 1750], [350, 2100], [600, 1400],
                   [180, 540]], dtype=np.float64)


def waveforms(rng: np.random.Generator, batch: int, seconds: float = 1.0, sr: int = 16_000) -> Batch:
    n = int(seconds * sr)
    out = np.empty((batch, n), dtype=np.float32)
    for i in range(batch):
        wav, pos = np.zeros(n), 0
        while pos < n:
            seg = int(rng.uniform(0.06, 0.2) * sr)
            t = np.arange(min(seg, n - pos)) / sr
            f0, f1 = PHONES[rng.integers(len(PHONES))] * rng.uniform(0.9, 1.1)
            env = np.sin(np.pi * np.arange(len(t)) / max(len(t), 1))
            wav[pos : pos + len(t)] = env * (np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * f1 * t))
            pos += len(t)
        wav += 0.02 * rng.standard_normal(n)
        out[i] = (wav - wav.mean()) / (wav.std() + 1e-5)  # per-utterance normalisation
    return Batch(torch.from_numpy(out))


def tokens(rng: np.random.Generator, batch: int, length: int, vocab_size: int, num_special: int = 4,
           bos: int = 0, eos: int = 2, chain_seed: int = 0) -> Batch:
    """Sequences from a fixed sparse Markov chain: each token has 3 likely successors."""
    words = np.arange(num_special, vocab_size - 1)  # the last id is <mask>
    chain = np.random.default_rng(chain_seed)
    successors = chain.choice(words, size=(vocab_size, 3))
    out = np.empty((batch, length), dtype=np.int64)
    for i in range(batch):
        tok = rng.choice(words)
        seq = [bos]
        for _ in range(length - 2):
            seq.append(tok)
            tok = successors[tok, rng.integers(3)] if rng.random() < 0.9 else rng.choice(words)
        seq.append(eos)
        out[i] = seq
    return Batch(torch.from_numpy(out))


def batches(modality: str, rng: np.random.Generator, batch: int, **kw):
    """Endless iterator of synthetic batches for `modality`."""
    make = {"image": images, "speech": waveforms, "text": tokens}[modality]
    while True:
        yield make(rng, batch, **kw)
