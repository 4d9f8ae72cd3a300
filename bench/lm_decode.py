"""Beam-search throughput of CTC decoding with a word n-gram (`d2v.eval.lm.LanguageModel.decode`) against the
number of worker processes, on the logits a fine-tuned CTC run gives one split. Every worker count must return the
words one process returns; the JSON records utterances and frames per second, and the WER of the decode.

    python bench/lm_decode.py RUN --lm data/lm [--split test_clean] [--workers 1,2] [--lm-weight 2 --word-score 0]
        [--out results/bench/lm_decode_cpu.json]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.lm import LanguageModel
from d2v.eval.metrics import wer
from d2v.io import atomic_write_json
from d2v.processes import usable_cpus
from d2v.eval.evaluate import ctc_logits
from d2v.train.task_model import load_finetuned
from d2v.train.precision import autocast


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="a fine-tuned CTC run folder")
    parser.add_argument("--checkpoint", default="best.pt")
    parser.add_argument("--lm", type=Path, required=True, help="a language model folder (`d2v lm`)")
    parser.add_argument("--split", default="test_clean")
    parser.add_argument("--workers", default="1,2", help="worker counts to time, e.g. 1,2,4,8")
    parser.add_argument("--lm-weight", type=float, default=2.0)
    parser.add_argument("--word-score", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench/lm_decode_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, cfg, _ = load_finetuned(args.run / args.checkpoint)
    amp, _ = autocast(next(model.parameters()).device, cfg.precision)
    logits, references = ctc_logits(model, cfg, args.split, amp)
    lm = LanguageModel(args.lm, LetterTokenizer.load(cfg.letters).symbols)
    lm.decode(logits[:1], args.lm_weight, args.word_score)  # load KenLM before any timing
    frames = sum(len(x) for x in logits)
    rows, first = [], None
    for workers in map(int, args.workers.split(",")):
        lm.workers = workers
        start = time.perf_counter()
        hyps = lm.decode(logits, args.lm_weight, args.word_score)
        seconds = time.perf_counter() - start
        first = first or hyps
        if hyps != first:
            raise SystemExit(f"{workers} workers decoded other words than {rows[0]['workers']}")
        rows.append({"workers": workers, "seconds": seconds, "utterances_per_s": len(logits) / seconds,
                     "frames_per_s": frames / seconds, "speedup": rows[0]["seconds"] / seconds if rows else 1.0,
                     "wer": wer(hyps, references)})
        print(f"{workers} workers: {seconds:.1f} s, {len(logits) / seconds:.1f} utterances/s, "
              f"{rows[-1]['speedup']:.2f}x", flush=True)
    atomic_write_json(args.out, {
        "benchmark": "lm_decode", "run": str(args.run / args.checkpoint), "split": args.split,
        "utterances": len(logits), "frames": frames, "lm": str(args.lm), "lm_digest": lm.digest, "beam": lm.cfg.beam,
        "lm_weight": args.lm_weight, "word_score": args.word_score, "usable_cpus": usable_cpus(),
        "machine": platform.machine(), "rows": rows})


if __name__ == "__main__":
    main()
