"""The longest pretraining that fits a time budget, timed from a short probe run of the same recipe: prints the
chosen number of steps (for `bench/gpu/text.sh`) and records the timing.

    python bench/gpu/fit_steps.py runs/bench-text-v2-gpu/probe/metrics.csv --budget 300 \
        --candidates 19200,9600,4800,2400 [--out results/bench/text_v2_probe_gpu.json]

The probe's `samples_per_s` is cumulative (samples seen / seconds since the loop began), so the loop's elapsed time
at a logged step is step × samples per step / samples_per_s; the slope between the first log past `--skip` and the
last one is a step's steady cost, without the start-up (CUDA context, kernel selection, the loader's first
batches). A pretraining also pays that start-up and its checkpoints, hence `--margin`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from d2v.io import atomic_write_json


def step_seconds(metrics: pd.DataFrame, samples_per_step: int, skip: int) -> float:
    """A step's steady cost in seconds, from a metrics log's cumulative throughput."""
    late = metrics[metrics.step > skip]
    if len(late) < 2:
        raise ValueError(f"need two logged steps past step {skip} to time a step, got {list(metrics.step)}")
    elapsed = late.step * samples_per_step / late.samples_per_s
    return float((elapsed.iloc[-1] - elapsed.iloc[0]) / (late.step.iloc[-1] - late.step.iloc[0]))


def longest_fitting(candidates: list[int], seconds_per_step: float, budget: float, margin: float) -> int | None:
    """The most steps among `candidates` whose time, `margin` times the steady cost, stays within `budget`."""
    fitting = [n for n in candidates if n * seconds_per_step * margin <= budget]
    return max(fitting) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("metrics", type=Path, help="the probe run's metrics.csv (config.json beside it)")
    parser.add_argument("--budget", type=float, required=True, help="seconds the pretraining may take")
    parser.add_argument("--candidates", required=True, help="step counts to choose from, e.g. 19200,9600,4800")
    parser.add_argument("--skip", type=int, default=50, help="steps of start-up left out of the timing")
    parser.add_argument("--margin", type=float, default=1.15, help="factor on the steady cost")
    parser.add_argument("--out", type=Path, default=None, help="JSON record of the timing and the choice")
    args = parser.parse_args()
    config = json.loads((args.metrics.parent / "config.json").read_text())
    per_step = config["data"]["batch_size"] * config["accum_steps"]
    cost = step_seconds(pd.read_csv(args.metrics), per_step, args.skip)
    candidates = sorted(int(n) for n in args.candidates.split(","))
    chosen = longest_fitting(candidates, cost, args.budget, args.margin)
    if args.out:
        atomic_write_json(args.out, {"probe": str(args.metrics), "samples_per_step": per_step,
                                     "step_seconds": cost, "budget_s": args.budget, "margin": args.margin,
                                     "candidates": candidates, "chosen": chosen})
    if chosen is None:
        raise SystemExit(f"{args.metrics}: a step takes {cost * 1000:.1f} ms, so not even {candidates[0]} steps "
                         f"fit {args.budget:.0f} s (margin {args.margin}); raise --budget or give PT_STEPS")
    print(f"{args.metrics}: {cost * 1000:.1f} ms a step -> {chosen} steps", file=sys.stderr)
    print(chosen)


if __name__ == "__main__":
    main()
