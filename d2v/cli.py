"""`d2v` command line. Stages are thin wrappers over the library."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from d2v.data import synthetic
from d2v.data2vec import CollapseError, Data2Vec
from d2v.io import atomic_write_json
from d2v.modalities.registry import ENCODERS, MODALITIES, build_modality
from d2v.train.loop import pretrain

# steps, lr, batch size and input kwargs of the short demo pretraining per modality
DEMO = {
    "image": dict(steps=400, lr=2e-3, batch=16, kw=dict(size=32)),
    "speech": dict(steps=80, lr=3e-4, batch=8, kw=dict(seconds=1.0)),
    "text": dict(steps=200, lr=1e-3, batch=16, kw=dict(length=64)),
}


def demo(args: argparse.Namespace) -> int:
    """Short data2vec pretraining of each modality on structured synthetic inputs (real corpora: `d2v prepare`)."""
    names = MODALITIES if args.modality == "all" else (args.modality,)
    torch.manual_seed(args.seed)
    for name in names:
        run = DEMO[name]
        steps = args.steps or run["steps"]
        modality, cfg = build_modality(name, args.preset)
        cfg = cfg.model_copy(update={"collapse": cfg.collapse.model_copy(update={"warmup_steps": 3 * steps // 4})})
        objective = Data2Vec(modality, cfg)
        kw = dict(run["kw"])
        if name == "text":
            kw["vocab_size"] = modality.encoder.cfg.vocab_size
        batches = synthetic.batches(name, np.random.default_rng(args.seed), run["batch"], **kw)
        start = time.perf_counter()
        with tqdm(total=steps, desc=f"pretrain {name}", unit="step", file=sys.stderr) as bar:

            def progress(step, m):
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tau=f"{m['tau']:.5f}",
                                target_var=f"{m['target_var']:.3f}", pred_var=f"{m['pred_var']:.3f}")

            try:
                history = pretrain(objective, batches, steps, run["lr"], warmup=max(1, steps // 10),
                                   seed=args.seed, progress=progress)
            except CollapseError as err:
                bar.close()
                print(f"error: {name}: {err}", file=sys.stderr)
                return 2
        elapsed = time.perf_counter() - start
        first = float(np.mean([m["loss"] for m in history[:10]]))
        last = float(np.mean([m["loss"] for m in history[-10:]]))
        summary = {"modality": name, "preset": args.preset, "steps": steps, "seconds": round(elapsed, 2),
                   "loss_first10": first, "loss_last10": last, "final": history[-1],
                   "params": sum(p.numel() for p in objective.student.parameters()), "inputs": "synthetic"}
        atomic_write_json(f"{args.out}/{name}/summary.json", summary)
        atomic_write_json(f"{args.out}/{name}/history.json", history)
        print(f"{name:6s} {summary['params']/1e6:5.2f}M params  loss {first:.3f} -> {last:.3f}  "
              f"target_var {history[-1]['target_var']:.3f}  pred_var {history[-1]['pred_var']:.3f}  "
              f"{elapsed:.1f}s  -> {args.out}/{name}/")
    return 0


def presets(args: argparse.Namespace) -> int:
    for name, (table, cls) in ENCODERS.items():
        for preset, cfg in table.items():
            n = sum(p.numel() for p in cls(cfg).parameters())
            print(f"{name:6s} {preset:9s} {n / 1e6:8.2f}M  D={cfg.dim} L={cfg.depth} H={cfg.num_heads}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec for images, speech and text")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="short data2vec pretraining on structured synthetic inputs")
    p.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    p.add_argument("--preset", default="embedded", help="encoder size preset (tiny | embedded | base | large)")
    p.add_argument("--steps", type=int, default=None, help="override the number of updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=demo)
    p = sub.add_parser("presets", help="list encoder presets and parameter counts")
    p.set_defaults(func=presets)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
