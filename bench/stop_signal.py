"""What stopping on a scheduler's SIGTERM costs (d2v/train/preemption.py), and whether it fits in the grace period.

- The stop flag: every step, every rank all-reduces whether it has caught a signal, over a gloo group on the host.
  Timed here as microseconds per call with `--ranks` CPU processes under torchrun (the bench launches itself).
- The checkpoint written on the signal: SLURM's KillWait and torchrun's shutdown timeout (30 s by default) must hold
  the rest of the step and this write. For each pretraining of `--profile` (the paper's Base recipes by default, as
  pretraining builds them): the bytes of its checkpoint (student, teacher, regression head or decoder, and AdamW's
  two moments) and the seconds `checkpoint.save` takes to write it here (temp file, fsync, rename), to `--folder`
  (default: a temp folder).

    python bench/stop_signal.py [--ranks 2] [--calls 2000] [--profile paper] [--modalities image,speech] [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from d2v.io import atomic_write_json
from d2v.pipeline.params import Profile, load_params
from d2v.train import checkpoint
from d2v.train.optim import adamw
from d2v.train.pretrain import build_objective

ROOT = Path(__file__).resolve().parents[1]


def flag_worker(calls: int, out: str) -> None:
    """Run under torchrun: time `calls` stop-flag all-reduces after a warm-up; rank 0 writes the mean."""
    from d2v.train.distributed import init, shutdown
    from d2v.train.preemption import StopSignals

    world = init("cpu")
    with StopSignals(world) as stop:
        for _ in range(100):
            stop.requested()
        began = time.perf_counter()
        for _ in range(calls):
            stop.requested()
        seconds = (time.perf_counter() - began) / calls
    if world.is_main:
        Path(out).write_text(json.dumps({"ranks": world.size, "calls": calls, "us_per_step": round(seconds * 1e6, 1)}))
    shutdown()


def flag_cost(ranks: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flag.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                        __file__, "--flag-worker", str(out), "--calls", str(calls)], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def checkpoint_cost(profile: Profile, name: str, modality: str, folder: Path) -> dict:
    """A pretraining's checkpoint as `_save` writes it, AdamW's moments filled by one step of zero gradients."""
    cfg = profile.pretrain_config(modality)
    objective = build_objective(cfg)
    params = objective.student_parameters()
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    began = time.perf_counter()
    path = checkpoint.save(folder / modality, 1, {"model": objective.state_dict(), "optimizer": optimizer.state_dict(),
                                                  "batches": 1, "config": cfg.model_dump(mode="json")}, keep=1)
    seconds = time.perf_counter() - began
    return {"profile": name, "modality": modality, "preset": cfg.preset, "objective": cfg.objective,
            "student_parameters": sum(p.numel() for p in params),
            "checkpoint_gb": round(path.stat().st_size / 1e9, 3), "write_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", default="paper", help="the params.yaml profile whose pretrainings are written")
    parser.add_argument("--modalities", default=None, help="default: every pretraining of the profile")
    parser.add_argument("--folder", default=None, help="where the checkpoints are written (default: a temp folder)")
    parser.add_argument("--out", default="results/bench/stop_signal_cpu.json")
    parser.add_argument("--flag-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flag_worker:
        return flag_worker(args.calls, args.flag_worker)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "flag": flag_cost(args.ranks, args.calls)}
    profile = load_params(profile=args.profile).active
    modalities = args.modalities.split(",") if args.modalities else list(profile.pretrain)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        result["checkpoints"] = [checkpoint_cost(profile, args.profile, m, Path(tmp)) for m in modalities]
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
