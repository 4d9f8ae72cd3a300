"""Where a training update's time goes: torch.profiler over a few updates of one modality's objective (the same
update bench/v2_vs_v1.py times). On a GPU the question is whether the update keeps the device busy: wall time
against the kernels' summed time, kernel launches and host-device synchronisations per update, and the ops that
cost the host the most time. A GPU busy well under the wall time means the host (Python, dispatch, launches) or a
synchronisation sets the pace, not the matrix units.

    python bench/update_profile.py --modality image --objective v1 --batch 32 [--device cuda --precision bf16]
        [--compile] [--out results/bench/update_profile_image_v1_gpu.json]
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from v2_vs_v1 import CLONES, synchronize, timed_updates, training_update, warmup_updates

from d2v.io import atomic_write_json

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host waits for the device


def summarize(prof, updates: int, top: int) -> dict:
    """Per update: the device's kernel time, launches, synchronisations and host-to-device copies, and the ops
    with the most host time (self, so nested ops are not counted twice)."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    count = {name: sum(e.count for e in prof.key_averages() if e.key == name) for name in LAUNCHES + SYNCS}
    host = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:top]
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e.name] = by_kernel.get(e.name, 0.0) + e.time_range.elapsed_us()
    return {
        "device_busy_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / updates,
        "kernels": len(kernels) / updates,
        "launches": sum(count[n] for n in LAUNCHES) / updates,
        "syncs": sum(count[n] for n in SYNCS) / updates,
        "memcpy_calls": sum(e.count for e in prof.key_averages() if e.key == "cudaMemcpyAsync") / updates,
        "host_ops": [{"op": e.key, "calls": e.count / updates, "self_ms": e.self_cpu_time_total / 1e3 / updates}
                     for e in host],
        "device_kernels": [{"kernel": k[:120], "ms": v / 1e3 / updates}
                           for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modality", choices=("image", "speech", "text"), required=True)
    parser.add_argument("--objective", choices=("v1", "v2"), default="v1")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--clones", type=int, default=None, help="v2 (default: the preset's, as v2_vs_v1.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="updates timed without the profiler")
    parser.add_argument("--profiled", type=int, default=3, help="updates under the profiler")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    device = torch.device(args.device)
    clones = (args.clones or CLONES[args.preset][args.modality]) if args.objective == "v2" else None
    next_batch, update, flops = training_update(args.modality, args.preset, args.objective, args.batch, clones,
                                                device, args.precision, args.compile)
    walls = timed_updates(next_batch, update, device, args.steps, args.compile)
    step = warmup_updates(args.compile) + args.steps  # the last step timed_updates took
    batches = [next_batch() for _ in range(args.profiled)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for batch in batches:
            step += 1
            update(batch, step)
        synchronize(device)
    wall_ms = float(np.median(walls)) * 1e3
    report = {"benchmark": "update_profile", "modality": args.modality, "objective": args.objective,
              "preset": args.preset, "batch": args.batch, "clones": clones, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "precision": args.precision, "compile": args.compile, "torch": torch.__version__,
              "wall_ms": wall_ms, "samples_per_s": args.batch / wall_ms * 1e3,
              "tflops_per_update": flops and flops / 1e12, **summarize(prof, args.profiled, args.top)}
    report["device_busy_share"] = report["device_busy_ms"] / wall_ms if device.type == "cuda" else None
    atomic_write_json(args.out, report)
    print(f"{args.modality} {args.objective} batch {args.batch}{' compiled' if args.compile else ''}: "
          f"{wall_ms:.1f} ms an update, device busy {report['device_busy_ms']:.1f} ms, "
          f"{report['launches']:.0f} launches, {report['syncs']:.0f} syncs, "
          f"{report['memcpy_calls']:.0f} copies an update", flush=True)
    for row in report["host_ops"][:8]:
        print(f"  host {row['self_ms']:7.2f} ms  {row['calls']:6.0f}x  {row['op']}")
    for row in report["device_kernels"][:8]:
        print(f"  device {row['ms']:7.2f} ms  {row['kernel']}")


if __name__ == "__main__":
    main()
