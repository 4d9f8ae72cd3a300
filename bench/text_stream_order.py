"""How evenly does a text pretraining stream mix its corpus? The embedded corpus is two sources in shard order
(Austen's six novels, then 106 Wikipedia articles). The default stream (`stream_resume: replay`) reads the one shard
in order through a 1000-chunk shuffle buffer; `seek` reads fairseq's blocks in one permutation per epoch. This
follows both streams' sample order (the loaders' own shuffle stage and permutation, on indices: nothing is decoded)
and reports, per window of steps, the share of the tokens that come from each source.

    python bench/text_stream_order.py [--steps 2400] [--batch-size 16] [--window 100]
"""
from __future__ import annotations

import argparse
import itertools
import platform
from pathlib import Path

import numpy as np
import sentencepiece as spm

from d2v.data.loaders import shuffle_buffer
from d2v.data.manifest import read_manifest
from d2v.data.seekable import RankOrder, TokenBlocks
from d2v.io import atomic_write_json


def source_ends(raw: Path, tokenizer: str, total: int) -> tuple[list[str], np.ndarray]:
    """Each source's (first path component's) last token in the shard's token stream, in manifest order. The shares
    come from encoding each document; they are scaled to the shard's own count (separators and such)."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    df = read_manifest(raw, "pretrain")
    counts: dict[str, int] = {}
    for path in df.path:
        name = path.split("/")[0]
        counts[name] = counts.get(name, 0) + len(sp.encode((raw / path).read_text()))
    sizes = np.array(list(counts.values()), dtype=np.float64)
    return list(counts), np.cumsum(sizes / sizes.sum() * total)


def shares(token_starts: np.ndarray, ends: np.ndarray, per_window: int) -> np.ndarray:
    """(windows, sources): the share of each source among the samples of each window, by each sample's start."""
    source = np.searchsorted(ends, token_starts, side="right")
    windows = len(source) // per_window
    one_hot = np.eye(len(ends))[source[:windows * per_window]]
    return one_hot.reshape(windows, per_window, len(ends)).mean(1)


def replay_starts(blocks: TokenBlocks, samples: int, buffer: int, seed: int) -> np.ndarray:
    """Token offsets of the chunks the replay stream reads, in order: the one shard again and again through the
    loaders' shuffle buffer."""
    starts = np.concatenate([[0], blocks.ends[:-1]])
    chunks = shuffle_buffer(buffer, seed)(itertools.cycle(range(len(starts))))
    return starts[np.fromiter(itertools.islice(chunks, samples), dtype=np.int64)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", default="data/shards/text_corpus/pretrain")
    parser.add_argument("--raw", default="data/raw/text_corpus")
    parser.add_argument("--tokenizer", default="data/tokenizer/spm.model")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16, help="blocks a step (the v2 embedded recipe's)")
    parser.add_argument("--block-tokens", type=int, default=128)
    parser.add_argument("--shuffle", type=int, default=1000, help="the replay stream's buffer, in chunks")
    parser.add_argument("--window", type=int, default=100, help="steps a row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/text_stream_order.json")
    args = parser.parse_args()

    blocks = TokenBlocks(args.shards, args.block_tokens, bos=0)
    names, ends = source_ends(Path(args.raw), args.tokenizer, blocks.tokens)
    tokens_per_step = args.batch_size * (args.block_tokens - 1)
    chunk_tokens = float(np.diff(blocks.ends).mean())
    chunks_per_window = round(args.window * tokens_per_step / chunk_tokens)
    windows = args.steps // args.window
    replay = shares(replay_starts(blocks, windows * chunks_per_window, args.shuffle, args.seed), ends,
                    chunks_per_window)
    order = RankOrder(len(blocks), args.seed, 0, 1)
    seek_blocks = np.array([order[t] for t in range(windows * args.window * args.batch_size)])
    seek = shares(seek_blocks * (args.block_tokens - 1), ends, args.window * args.batch_size)
    corpus = np.diff(np.concatenate([[0], ends])) / blocks.tokens
    rows = [{"steps": [w * args.window, (w + 1) * args.window],
             "replay": dict(zip(names, np.round(replay[w], 3).tolist())),
             "seek": dict(zip(names, np.round(seek[w], 3).tolist()))} for w in range(windows)]
    first = names[0]
    summary = {kind: {f"{first}_share_min": float(table[:, 0].min()), f"{first}_share_max": float(table[:, 0].max()),
                      "mean_abs_deviation": float(np.abs(table - corpus).mean())}
               for kind, table in (("replay", replay), ("seek", seek))}
    result = {"benchmark": "text_stream_order", "machine": platform.machine(), "shards": args.shards,
              "steps": args.steps, "batch_size": args.batch_size, "block_tokens": args.block_tokens,
              "epoch_steps": round(blocks.tokens / tokens_per_step, 1), "shuffle_chunks": args.shuffle,
              "chunks": len(blocks.ends), "corpus_share": dict(zip(names, np.round(corpus, 3).tolist())),
              "summary": summary, "windows": rows}
    atomic_write_json(args.out, result)
    print(f"corpus: {result['corpus_share']}, an epoch is {result['epoch_steps']} steps")
    for row in rows:
        print(f"steps {row['steps'][0]:5d}-{row['steps'][1]:5d}  {first}: replay {row['replay'][first]:.2f}  "
              f"seek {row['seek'][first]:.2f}")
    print(summary)


if __name__ == "__main__":
    main()
