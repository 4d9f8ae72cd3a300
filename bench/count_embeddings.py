"""What the embedded corpus's co-occurrence counts alone give a text fine-tune: the text encoder at its random
initialisation (as a pretraining builds it: torch seeded with the recipe's seed), with its token-embedding table
replaced by count-based piece vectors of the pretraining corpus (positive PMI of co-occurrences within a window,
context-distribution smoothing α 0.75, truncated SVD to the encoder's width; Levy, Goldberg and Dagan 2015), written
as a pretraining `final.pt` (student = teacher) that `pretrain_vs_scratch.py --pretrained text=…` fine-tunes
against scratch. A bound for issue 4's text rows: no network, seconds of counting, and all the lexical statistics
the corpus has within the window. If such a table does not beat scratch, what pretraining could learn at the
lexical level from this corpus does not help the task either.

`--task-text rt_polarity` counts the task's unlabeled train snippets as well (each its own document; dev and test
never), the task-adaptive corpus of `task_text_corpus.py`, in counts.

    python bench/count_embeddings.py [--out runs/count-embeddings/text] [--window 5] [--task-text rt_polarity]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import svds
from task_text_corpus import task_text

from d2v.data.manifest import read_manifest
from d2v.data.tokenizer import TextTokenizer
from d2v.modalities.registry import build_encoder
from d2v.train.config import pretrain_config
from d2v.train.pretrain import save_encoder


def ppmi_vectors(sequences: list[np.ndarray], size: int, dim: int, window: int, alpha: float = 0.75,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(size, dim) count-based vectors of ids 0 … size-1 from id sequences (ids < 0 are skipped: out of the
    vocabulary): co-occurrences within `window` positions either side, positive PMI against the α-smoothed context
    distribution, the top `dim` left singular vectors scaled by √σ; and each id's occurrence count."""
    rows, cols = [], []
    for ids in sequences:
        for offset in range(1, window + 1):
            a, b = ids[:-offset], ids[offset:]
            keep = (a >= 0) & (b >= 0)
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    pairs = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size)).tocsr().tocoo()  # duplicates summed
    word = np.asarray(pairs.sum(1)).ravel()
    context = np.asarray(pairs.sum(0)).ravel() ** alpha
    pmi = np.log(pairs.data) - np.log(word[pairs.row]) - np.log(context[pairs.col] / context.sum())
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (pairs.row[keep], pairs.col[keep])), shape=(size, size)).tocsr()
    u, s, _ = svds(ppmi, k=min(dim, size - 1), random_state=seed)
    counts = np.bincount(np.concatenate([ids[ids >= 0] for ids in sequences]), minlength=size)
    return u * np.sqrt(s), counts


def corpus_pieces(corpus_dir: Path, tokenizer: TextTokenizer) -> list[np.ndarray]:
    """Each document of a prepared text corpus (its manifest's pretraining rows) as piece ids, line by line joined."""
    manifest = read_manifest(corpus_dir, "pretrain")
    return [np.concatenate([tokenizer.sp.encode(line) for line in (corpus_dir / path).read_text(encoding="utf-8")
                            .splitlines() if line.strip()]).astype(np.int64) for path in manifest["path"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tokenizer", default=None, help="default: the data root's tokenizer/spm.model")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--task-text", default=None, help="also count these tasks' train snippets (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("runs/count-embeddings/text"))
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = pretrain_config("text", {})
    torch.manual_seed(cfg.seed)  # the random blocks a pretraining of this recipe starts from
    encoder = build_encoder("text", cfg.preset, cfg.objective)
    tokenizer = TextTokenizer(args.tokenizer or Path(args.data_root) / "tokenizer" / "spm.model")
    table = encoder.embed_tokens.weight.data
    raw = Path(args.data_root) / "raw"
    pieces = corpus_pieces(raw / "text_corpus", tokenizer)
    for task in args.task_text.split(",") if args.task_text else []:
        pieces += [np.asarray(tokenizer.sp.encode(line), dtype=np.int64) for line in task_text(raw, task).splitlines()]
    vectors, counts = ppmi_vectors(pieces, table.shape[0], table.shape[1], args.window)
    seen = torch.from_numpy(counts > 0)
    seen[encoder.cfg.pad_idx] = False  # the padding row stays zero
    vectors = torch.from_numpy(vectors).float()
    # one scale for all rows: their mean norm that of the initialisation's rows (BERT init, std 0.02)
    vectors *= table[seen].norm(dim=1).mean() / vectors[seen].norm(dim=1).mean()
    table[seen] = vectors[seen]
    save_encoder(args.out, cfg, encoder, encoder, 0, pretraining="ppmi-svd")
    info = {"pieces": int(counts.sum()), "vocabulary": int(table.shape[0]), "replaced_rows": int(seen.sum()),
            "task_text": args.task_text, "window": args.window, "dim": int(table.shape[1]),
            "seconds": round(time.perf_counter() - start, 1)}
    (args.out / "count_embeddings.json").write_text(json.dumps(info, indent=1))
    print(f"{info} -> {args.out / 'final.pt'}")


if __name__ == "__main__":
    main()
