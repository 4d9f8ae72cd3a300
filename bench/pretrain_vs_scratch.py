"""Does data2vec pretraining help? Pretrain each modality on the embedded corpora, then fine-tune every downstream
task from the pretrained encoder and from scratch over several seeds, and compare on the test splits.

A task counts as a win when the pretrained mean beats the scratch mean by more than the seed spread (max - min)
of either side. Results are rewritten after every run, so a partial run still leaves a table.

    python bench/pretrain_vs_scratch.py [--modalities text,image,speech] [--seeds 3]
        [--pretrain-steps text=600,...] [--finetune-steps lee_sts=300,...]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from d2v.io import atomic_write_json
from d2v.train.config import pretrain_config
from d2v.train.finetune import TASKS, evaluate, finetune_config, run_finetune
from d2v.train.pretrain import pretrain_main


def parse_map(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def summarize(task: str, runs: dict[str, list[float]]) -> dict:
    metric = TASKS[task].metrics[0]
    lower_better = metric == "wer"
    out = {"metric": metric, "stands_in_for": TASKS[task].stands_in_for}
    for init, values in runs.items():
        out[init] = {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values)),
                     "spread": float(np.max(values) - np.min(values))}
    if {"pretrained", "scratch"} <= runs.keys():
        delta = out["pretrained"]["mean"] - out["scratch"]["mean"]
        gain = -delta if lower_better else delta
        margin = max(out["pretrained"]["spread"], out["scratch"]["spread"])
        out.update(delta=delta, gain=gain, margin=margin, wins=bool(gain > margin))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modalities", default="text,image,speech")
    parser.add_argument("--tasks", default=None, help="default: every task of the chosen modalities")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", default="")
    parser.add_argument("--finetune-steps", default="")
    parser.add_argument("--runs", default="runs/bench")
    parser.add_argument("--out", default="results/embedded/pretrain_vs_scratch.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    modalities = args.modalities.split(",")
    pre_steps, ft_steps = parse_map(args.pretrain_steps), parse_map(args.finetune_steps)
    tasks = args.tasks.split(",") if args.tasks else [t for t, spec in TASKS.items() if spec.modality in modalities]
    runs = Path(args.runs)
    report = {"benchmark": "pretrain_vs_scratch", "machine": platform.machine(), "seeds": args.seeds,
              "pretrain": {}, "tasks": {}}
    for modality in modalities:
        overrides = {"steps": pre_steps[modality]} if modality in pre_steps else {}
        if overrides:
            overrides["ema"] = pretrain_config(modality).ema.model_copy(
                update={"tau_steps": pre_steps[modality]}).model_dump()
        cfg = pretrain_config(modality, overrides)
        start = time.perf_counter()
        summary = pretrain_main(cfg, runs / "pretrain" / modality,
                                tokenizer="data/tokenizer/spm.model" if modality == "text" else None)
        report["pretrain"][modality] = {"steps": cfg.steps, "seconds": round(time.perf_counter() - start, 1),
                                        **{k: summary.get(k) for k in ("first", "last")}}
        atomic_write_json(args.out, report)
    for task in tasks:
        values: dict[str, list[float]] = {}
        for init in ("pretrained", "scratch"):
            for seed in range(args.seeds):
                overrides = {"init": init, "seed": seed,
                             "pretrained": str(runs / "pretrain" / TASKS[task].modality / "final.pt")}
                if task in ft_steps:
                    overrides["steps"] = ft_steps[task]
                cfg = finetune_config(task, overrides)
                out = runs / "finetune" / f"{task}-{init}-s{seed}"
                run_finetune(cfg, out, progress=False)
                results = evaluate(out)
                value = results[-1]["metrics"][TASKS[task].metrics[0]] if TASKS[task].kind != "ctc" else \
                    float(np.mean([r["metrics"]["wer"] for r in results if r["split"].startswith("test")]))
                values.setdefault(init, []).append(value)
                report["tasks"][task] = summarize(task, values)
                report["tasks"][task]["finetune_steps"] = cfg.steps
                atomic_write_json(args.out, report)
                print(f"{task} {init} seed {seed}: {value:.4f}", flush=True)
        print(task, report["tasks"][task], flush=True)


if __name__ == "__main__":
    main()
