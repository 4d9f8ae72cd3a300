"""Tokenizers: a SentencePiece model for text and a CTC letter vocabulary for speech.

SentencePiece ids follow fairseq's dictionary layout, which the text encoder and `Vocabulary` assume: <s>=0,
<pad>=1, </s>=2, <unk>=3; `<mask>` is one extra id after the last piece. So a model vocabulary of N ids trains a
SentencePiece model of N-1 pieces. Training is deterministic for a fixed `num_threads` (it is pinned and recorded).
"""
from __future__ import annotations

import io
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from d2v.config import StrictModel
from d2v.data.download import bytes_sha256
from d2v.data.manifest import PRETRAIN_SPLIT, read_manifest
from d2v.io import atomic_write_bytes, atomic_write_json, read_json

BLANK, WORD_SEP = "<blank>", "|"


class SentencePieceConfig(StrictModel):
    vocab_size: int = Field(8000, ge=16)  # model ids, including <mask>
    model_type: str = Field("unigram", pattern="^(unigram|bpe)$")
    character_coverage: float = Field(1.0, gt=0, le=1)
    num_threads: int = Field(2, ge=1)  # pinned: the trained model depends on it
    max_sentence_length: int = Field(8192, ge=64)
    seed_sentencepiece_size: int = Field(1_000_000, ge=1000)
    # lines SentencePiece trains on: 0 = all of them; N = a seeded uniform sample of N, `sample_lines_seeded` (the
    # trainer holds its sentences in memory: a paper-scale corpus of ~100M lines needs a sample)
    sample_lines: int = Field(0, ge=0)


def paragraphs(path: str | Path) -> Iterator[str]:
    """A corpus file's non-blank lines, stripped: what SentencePiece trains on and the shards store, each then
    ending in </s>. Read line by line (a corpus volume may be large), with universal newlines as d2v.io.text_lines."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def corpus_lines(corpus_dir: str | Path, split: str = PRETRAIN_SPLIT) -> Iterator[str]:
    """The paragraphs of every document of `split`, in manifest order."""
    corpus_dir = Path(corpus_dir)
    for rel in read_manifest(corpus_dir, split)["path"]:
        yield from paragraphs(corpus_dir / rel)


def sample_lines_seeded(items: Iterable[str], k: int, seed: int = 0) -> list[str]:
    """A uniform sample of k items of a stream read once (reservoir sampling, Li's algorithm L: about k·log(n/k)
    random draws, so skipping most of 100M lines is cheap), in reservoir order; the same for a seed on any run."""
    rng, it = random.Random(seed), iter(items)
    reservoir = list(itertools.islice(it, k))
    if len(reservoir) < k:
        return reservoir
    w = math.exp(math.log(rng.random()) / k)
    while True:
        skip = math.floor(math.log(rng.random()) / math.log(1 - w))
        item = next(itertools.islice(it, skip, None), None)
        if item is None:
            return reservoir
        reservoir[rng.randrange(k)] = item
        w *= math.exp(math.log(rng.random()) / k)


def train_sentencepiece(lines: Iterable[str], out_model: str | Path, cfg: SentencePieceConfig) -> Path:
    """Train on `lines`, or on a seeded sample of `cfg.sample_lines` of them. The sample is drawn here: SentencePiece's
    own (input_sentence_size with shuffle_input_sentence) gave another model in every process despite
    set_random_generator_seed (the smoke profile's tokenizer differed on each run)."""
    import sentencepiece as spm

    if cfg.sample_lines:
        lines = sample_lines_seeded(lines, cfg.sample_lines)
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)  # the trainer's own draws (the embedded tokenizer is the same on every run)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=cfg.vocab_size - 1, model_type=cfg.model_type,
            character_coverage=cfg.character_coverage, num_threads=cfg.num_threads,
            max_sentence_length=cfg.max_sentence_length, input_sentence_size=0, shuffle_input_sentence=False,
            seed_sentencepiece_size=cfg.seed_sentencepiece_size, hard_vocab_limit=True,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3, minloglevel=2)
    except RuntimeError as err:
        if (most := re.search(r"Vocabulary size too high.*<= (\d+)", str(err))) is None:
            raise
        raise ValueError(f"vocab_size {cfg.vocab_size} ({cfg.vocab_size - 1} SentencePiece pieces + <mask>) is more "
                         f"than this corpus can fill; at most {int(most.group(1)) + 1} (SentencePiece: "
                         f"{err})") from None
    model = buf.getvalue()
    atomic_write_bytes(out_model, model)
    atomic_write_json(Path(out_model).with_suffix(".json"),
                      {"config": cfg.model_dump(), "sha256": bytes_sha256(model), "mask_id": cfg.vocab_size - 1,
                       "pieces": cfg.vocab_size - 1})
    return Path(out_model)


class TextTokenizer:
    """SentencePiece → fairseq-style ids with <s> ... </s> and a <mask> id after the last piece."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: SentencePiece model missing (run `d2v tokenizer` first)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos, self.pad, self.eos, self.unk = 0, 1, 2, 3
        if (self.sp.bos_id(), self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (0, 1, 2, 3):
            raise ValueError(f"{model_file}: special ids must be <s>=0 <pad>=1 </s>=2 <unk>=3")
        self.mask = self.sp.get_piece_size()
        self.vocab_size = self.mask + 1

    def encode(self, text: str, text_b: str | None = None, max_tokens: int | None = None) -> np.ndarray:
        """`<s> a </s>` or, for a pair, RoBERTa's `<s> a </s></s> b </s>`, at most `max_tokens` ids. Pairs are
        truncated longest-first, so both segments keep a share (a long first text never crowds out the second)."""
        a = self.sp.encode(text)
        b = None if text_b is None else self.sp.encode(text_b)
        if max_tokens is not None:
            budget = max_tokens - (2 if b is None else 4)
            if budget < (1 if b is None else 2):
                raise ValueError(f"max_tokens={max_tokens} leaves no room for text")
            if b is None:
                a = a[:budget]
            else:
                while len(a) + len(b) > budget:
                    if len(a) >= len(b):
                        a = a[:-1]
                    else:
                        b = b[:-1]
        ids = [self.bos, *a, self.eos] + ([] if b is None else [self.eos, *b, self.eos])
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i > self.unk and i != self.mask])


LIBRISPEECH_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"


def build_letter_vocab(transcripts: Iterable[str], alphabet: str = LIBRISPEECH_ALPHABET) -> list[str]:
    """CTC symbols: blank, word separator '|', then characters by descending count (ties alphabetical), as fairseq.
    Every character of `alphabet` is kept even when the transcripts lack it (a 10-minute set may have no 'Q'),
    so test transcripts never hit an unknown letter."""
    counts = Counter(c for t in transcripts for c in t.replace(" ", WORD_SEP) if c != WORD_SEP)
    counts.update({c: 0 for c in alphabet if c not in counts})
    return [BLANK, WORD_SEP] + sorted(counts, key=lambda c: (-counts[c], c))


class LetterTokenizer:
    """Transcript ↔ CTC label ids; spaces become the word separator '|'."""

    def __init__(self, symbols: list[str]):
        if symbols[:2] != [BLANK, WORD_SEP]:
            raise ValueError(f"letter vocabulary must start with {BLANK!r}, {WORD_SEP!r}; got {symbols[:2]}")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(symbols)}
        self.blank = 0

    @classmethod
    def load(cls, path: str | Path) -> LetterTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: letter vocabulary missing (run `d2v tokenizer` first)")
        vocab = read_json(path, "the letter vocabulary `d2v tokenizer` writes")
        if not isinstance(vocab, dict) or not isinstance(vocab.get("symbols"), list):
            raise ValueError(f"{path}: expected an object with a 'symbols' list (the letter vocabulary); "
                             "run `d2v tokenizer` again")
        return cls(vocab["symbols"])

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, {"symbols": self.symbols})

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.asarray([self.index[c] for c in " ".join(text.split()).replace(" ", WORD_SEP)], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} of {text!r} is not in the letter vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != self.blank).replace(WORD_SEP, " ").strip()
