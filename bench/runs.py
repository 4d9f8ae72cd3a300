"""Reuse of finished benchmark runs: a pretraining or fine-tuning run whose config.json equals the requested config
is not run again (both are deterministic, and a pretraining run refuses to resume under another config). Delete
the run folder to force a rerun."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from d2v.io import atomic_write_json
from d2v.train.finetune import TASKS, evaluate, run_finetune
from d2v.train.pretrain import pretrain_main


def same_config(run: Path, cfg) -> bool:
    """The run's config.json, with fields added since it was written at their defaults, equals `cfg`."""
    config = run / "config.json"
    if not config.is_file():
        return False
    try:
        return type(cfg).model_validate(json.loads(config.read_text())) == cfg
    except ValueError:  # written by an incompatible version
        return False


def pretrain_seconds(cfg, run: Path, tokenizer: str | None = None) -> float | None:
    """Wall time of a pretraining run; a finished run under the same config is reused with its recorded time (None
    when it was not recorded)."""
    timing = run / "timing.json"
    if (run / "final.pt").is_file() and same_config(run, cfg):
        return json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    start = time.perf_counter()
    pretrain_main(cfg, run, tokenizer=tokenizer, progress=False)
    seconds = time.perf_counter() - start
    atomic_write_json(timing, {"seconds": seconds})
    return seconds


def mean_test_metrics(cfg, out: Path) -> dict[str, float]:
    """Every metric of a fine-tune's test evaluations, averaged over its test splits (for CTC tasks the test_*
    splits, not dev); an evaluation under the same config is reused, otherwise the task is fine-tuned first."""
    task = TASKS[cfg.task]
    results = [out / "eval" / f"{cfg.task}-{split}.json" for split in task.tests]
    if all(r.is_file() for r in results) and same_config(out, cfg):
        results = [json.loads(r.read_text()) for r in results]
    else:
        run_finetune(cfg, out, progress=False)
        results = evaluate(out)
    if task.kind == "ctc":
        results = [r for r in results if r["split"].startswith("test")]
    else:
        results = results[-1:]
    return {m: float(np.mean([r["metrics"][m] for r in results])) for m in task.metrics}


def headline_metric(cfg, out: Path) -> float:
    """The task's headline test metric of a fine-tune (mean WER over the test splits for CTC)."""
    return mean_test_metrics(cfg, out)[TASKS[cfg.task].metrics[0]]
