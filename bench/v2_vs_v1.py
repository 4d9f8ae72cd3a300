"""data2vec 2.0 vs 1.0 at equal model size.

throughput: training updates (forward, backward, AdamW, EMA) per modality on batches of the embedded shapes, v1 and
    v2 with the same samples per batch; reports samples/s, and for v2 also masked views/s (samples × clones). On a
    GPU (`--device cuda`, bf16 autocast, optionally `--compile`) it also counts the FLOPs of one update
    (torch.utils.flop_counter: matrix products, convolutions and attention) and reports achieved TFLOP/s and MFU
    against the chip's dense bf16 peak.
time-to-accuracy: pretrain v2 on a task's real embedded corpus for several step budgets (each with its full
    schedule; `V2_RECIPES`: Fashion-MNIST, or speech_1h with the log-mel front end), fine-tune the task from each
    over seeds, and find the first budget whose mean headline metric (top-1, or WER; with `--lm`, WER decoded with
    the word n-gram) reaches the v1 reference (a pretrain_vs_scratch.json row scored the same way); the speed-up
    is v1's pretraining time over v2's. The fine-tunes take the reference row's own overrides (e.g. `--ft-profile
    embedded`'s flips only), so both sides fine-tune alike.
    Earlier v2 pretraining runs of the same recipe are reused with `--pretrained BUDGET=RUN`; the rows of budgets
    an earlier run of the same comparison wrote to `--out` are kept, so a budget can be added later on its own. Each
    row keeps the v1 time its speed-up divides (`--v1-seconds`: v1 timed again in the same session as v2, since
    this machine's speed drifts between sessions).

    python bench/v2_vs_v1.py throughput [--presets embedded,base] [--steps 8]
        [--device cuda --precision bf16 --compile --batch base.image=64 --out results/bench/v2_vs_v1_gpu.json]
    python bench/v2_vs_v1.py time-to-accuracy [--task fashion_mnist] [--budgets 150,300] [--seeds 3]
        [--finetune-steps 150] [--reference results/bench/pretrain_vs_scratch_image_ft150_cpu.json]
        [--pretrained 300=runs/x/pretrain/image-v2] [--lm data/lm] [--out results/bench/v2_time_to_accuracy.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from d2v.data import synthetic
from d2v.io import atomic_write_json
from d2v.modalities.registry import build_objective
from d2v.nn.compile import compile_regions
from d2v.train.optim import adamw
from d2v.train.precision import autocast

OUT = Path("results/bench/v2_vs_v1.json")
SHAPES = {  # synthetic inputs of the embedded pretraining shapes (throughput does not depend on content)
    "image": dict(size=32),
    "speech": dict(seconds=4.0),
    "text": dict(length=128),
}
BATCH = {"embedded": {"image": 32, "speech": 4, "text": 16}, "base": {"image": 4, "speech": 1, "text": 2}}
CLONES = {"embedded": {"image": 8, "speech": 4, "text": 4}, "base": {"image": 16, "speech": 8, "text": 8}}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, from the vendors' data sheets


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_update(name: str, preset: str, objective: str, batch_size: int, clones: int | None,
                    device: torch.device = torch.device("cpu"), precision: str = "fp32", compile: bool = False):
    """A modality's synthetic batches of its embedded shapes, on the device (`next_batch()`), one training update
    of its objective on such a batch (`update(batch, step)`: forward, backward, AdamW, EMA), and (on CUDA) the FLOPs
    of its forward + backward."""
    torch.manual_seed(0)
    obj = build_objective(name, preset, objective)
    if clones is not None:
        obj.cfg = obj.cfg.model_copy(update={"v2": obj.cfg.v2.model_copy(update={"clones": clones})})
    obj.to(device)
    if name == "image":
        kw = dict(SHAPES[name], size=obj.student.cfg.img_size)
    elif name == "text":
        kw = dict(SHAPES[name], vocab_size=obj.student.cfg.vocab_size,
                  length=min(SHAPES[name]["length"], obj.student.cfg.max_positions))
    else:
        kw = SHAPES[name]
    batches = synthetic.batches(name, np.random.default_rng(0), batch_size, **kw)
    if name == "image" and obj.student.cfg.in_chans != 1:  # base presets take RGB
        batches = (type(b)(b.source.expand(-1, obj.student.cfg.in_chans, -1, -1).contiguous()) for b in batches)
    params = obj.student_parameters()
    optimizer = adamw(params, 1e-4, 0.01)
    amp, _ = autocast(device, precision)
    obj.train()
    # FLOPs of the eager model (the counter does not see inside compiled graphs; the work is the same)
    flops = update_flops(obj, next(batches).to(device), amp) if device.type == "cuda" else None
    if compile:
        compile_regions(obj)

    def next_batch():
        return next(batches).to(device)

    def update(batch, step: int) -> None:
        with amp:
            out = obj(batch, np.random.default_rng(step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        obj.ema_step(step)

    return next_batch, update, flops


def update_seconds(name: str, preset: str, objective: str, batch_size: int, steps: int, clones: int | None,
                   device: torch.device = torch.device("cpu"), precision: str = "fp32",
                   compile: bool = False) -> tuple[float, float | None]:
    """Median seconds of one training update, and (on CUDA) the FLOPs of one forward + backward."""
    next_batch, update, flops = training_update(name, preset, objective, batch_size, clones, device, precision,
                                                compile)
    return float(np.median(timed_updates(next_batch, update, device, steps, compile))), flops


def warmup_updates(compile: bool) -> int:
    """Untimed updates before a timing: compilation (3 when compiled) and the allocator's first allocations (1)."""
    return 3 if compile else 1


def timing_arguments(parser: argparse.ArgumentParser, out: Path, steps: int) -> None:
    """The options every timing bench takes: the updates timed, the device, the precision and the JSON written."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=out)


def timing_setting(args: argparse.Namespace, device: torch.device) -> dict:
    """Where and how a kernel bench timed (`timing_arguments`), recorded beside its results."""
    return {"device": str(device), "precision": args.precision, "torch": torch.__version__, "host": platform.node(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "steps": args.steps}


def milliseconds(times: list[float]) -> dict[str, float]:
    """The median and the fastest of the timed updates (`timed_updates`), in ms."""
    return {"median_ms": round(statistics.median(times) * 1e3, 3), "min_ms": round(min(times) * 1e3, 3)}


def timed_updates(next_batch, update, device: torch.device, steps: int, compile: bool) -> list[float]:
    """Seconds of each of `steps` updates, each on a batch already on the device, after `warmup_updates(compile)`
    untimed ones; the updates are steps 1, 2, ... in all."""
    warmup = warmup_updates(compile)
    times = []
    for step in range(1, steps + warmup + 1):
        batch = next_batch()
        synchronize(device)
        start = time.perf_counter()
        update(batch, step)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def update_flops(obj, batch, amp) -> float:
    """FLOPs of one forward + backward (no optimizer step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, amp:
        obj(batch, np.random.default_rng(0)).loss.backward()
    obj.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def throughput(args) -> dict:
    device = torch.device(args.device)
    peak = peak_tflops(device)
    batches = {tuple(k.split(".")): int(v) for k, v in (i.split("=") for i in args.batch.split(",") if i)}
    rows = {}
    for preset in args.presets.split(","):
        for name in ("image", "speech", "text"):
            batch, clones = batches.get((preset, name), BATCH[preset][name]), CLONES[preset][name]
            run = dict(device=device, precision=args.precision, compile=args.compile)
            (v1, v1_flops), (v2, v2_flops) = (update_seconds(name, preset, "v1", batch, args.steps, None, **run),
                                              update_seconds(name, preset, "v2", batch, args.steps, clones, **run))
            single, _ = update_seconds(name, preset, "v2", batch, args.steps, 1, **run)  # visible-only saving alone
            row = {"batch": batch, "clones": clones, "v1_samples_per_s": batch / v1, "v2_samples_per_s": batch / v2,
                   "v2_views_per_s": batch * clones / v2, "samples_ratio": v1 / v2, "views_ratio": clones * v1 / v2,
                   "v2_one_clone_samples_per_s": batch / single, "one_clone_ratio": v1 / single,
                   "v1_update_s": v1, "v2_update_s": v2, "v2_one_clone_update_s": single}
            for tag, seconds, flops in (("v1", v1, v1_flops), ("v2", v2, v2_flops)):
                if flops is not None:
                    row[f"{tag}_tflops_per_update"] = flops / 1e12
                    row[f"{tag}_achieved_tflops"] = flops / seconds / 1e12
                    row[f"{tag}_mfu"] = flops / seconds / 1e12 / peak if peak else None
            rows[f"{name}/{preset}"] = row
            mfu = "".join(f"   {t} MFU {row[f'{t}_mfu']:.1%}" for t in ("v1", "v2") if row.get(f"{t}_mfu") is not None)
            print(f"{name:6s} {preset:8s} v1 {batch / v1:8.1f} samples/s   v2 {batch / v2:8.1f} samples/s "
                  f"({batch * clones / v2:8.1f} views/s)   v2/v1 samples {v1 / v2:.2f}x  "
                  f"views {clones * v1 / v2:.2f}x  "
                  f"one clone {v1 / single:.2f}x{mfu}", flush=True)
    return {"threads": torch.get_num_threads(), "steps_timed": args.steps, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "precision": args.precision, "compile": args.compile, "torch": torch.__version__,
            "peak_bf16_tflops": peak, "rows": rows}


# The v2 pretraining each task's encoder gets at a budget of steps (each budget with its full schedule): the embedded
# v2 recipe with the switches that made its modality's pretraining win on CPU (docs/findings.md)
V2_RECIPES = {
    "fashion_mnist": ("image", lambda steps: {"ema": {"tau_start": 0.998, "tau_end": 0.9999}}),
    "speech_1h": ("speech", lambda steps: {"preset": "embedded-fbank", "freeze_local_encoder": True,
                                           "ema": {"tau_start": 0.999, "tau_end": 0.9999}}),
}


def v2_pretrain_config(task: str, steps: int):
    from d2v.train.config import merge, pretrain_config

    modality, switches = V2_RECIPES[task]
    return pretrain_config(modality, merge({"objective": "v2", "steps": steps,
                                            "optim": {"warmup_steps": max(1, steps // 10)},
                                            "ema": {"tau_steps": steps}}, switches(steps)))


def time_to_accuracy(args) -> dict:
    from runs import headline_metric, pretrain_seconds, scored_metrics

    from d2v.eval.metrics import oriented
    from d2v.train.config import merge, pretrain_config
    from d2v.train.tasks import TASKS, finetune_config

    task, metric = args.task, scored_metrics(TASKS[args.task], args.lm)[0]
    modality = V2_RECIPES[task][0]
    reference = json.loads(Path(args.reference).read_text())
    if task not in reference.get("tasks", {}):
        raise SystemExit(f"{args.reference}: no {task} row")
    v1_row = reference["tasks"][task]
    v1_metric, v1_lm = v1_row.get("metric", TASKS[task].metrics[0]), v1_row.get("lm")
    if (v1_metric, v1_lm) != (metric, args.lm and str(args.lm)):
        raise SystemExit(f"{args.reference}: its v1 row scores {v1_metric} (language model {v1_lm}), not {metric} "
                         f"(--lm {args.lm}); both sides must be decoded alike")
    if v1_row.get("finetune_steps") != args.finetune_steps:  # the metric depends on the fine-tune's length
        raise SystemExit(f"{args.reference}: its v1 row fine-tuned {v1_row.get('finetune_steps')} steps, not "
                         f"--finetune-steps {args.finetune_steps}; pass the reference made with the same fine-tune")
    v1_pretrain = reference["pretrain"][modality]
    if v1_pretrain.get("objective", "v1") != "v1":
        raise SystemExit(f"{args.reference}: its {modality} encoder is {v1_pretrain['objective']}, not v1")
    # its wall time, like v2's below (older rows recorded only the logged throughput)
    v1_seconds = args.v1_seconds or v1_pretrain.get("seconds")
    if v1_seconds is None:
        if "last" not in v1_pretrain:
            raise SystemExit(f"{args.reference}: records no v1 pretraining time (a row of a --pretrained "
                             "checkpoint); pass --v1-seconds, the time of the pretraining that made it")
        batch = pretrain_config(modality).data.batch_size
        v1_seconds = v1_pretrain["steps"] * batch / v1_pretrain["last"]["samples_per_s"]
    # the reference's own fine-tuning (e.g. a profile's flips only), at the length its row was made with
    fine_tuning = merge(v1_row.get("overrides", {}), {"steps": args.finetune_steps})
    target = v1_row["pretrained"]["mean"]
    report = {"task": task, "metric": metric,
              "v1": {"mean": target, "spread": v1_row["pretrained"]["spread"],
                     "scratch_mean": v1_row.get("scratch", {}).get("mean"), "pretrain_steps": v1_pretrain["steps"],
                     "pretrain_seconds": v1_seconds},
              "reference": args.reference, "finetune_steps": args.finetune_steps, "finetune_overrides": fine_tuning,
              "lm": args.lm and str(args.lm), "v2": {}}

    def reaches_v1(mean: float) -> bool:
        return bool(oriented(metric, mean - target) >= 0)

    budgets = [int(b) for b in args.budgets.split(",")]
    for budget, row in earlier_budgets(Path(args.out), report, budgets).items():  # judged again against this
        # reference's mean; its speed-up stays the one timed with it (the machine's speed drifts between sessions)
        report["v2"][budget] = {**row, "reaches_v1": reaches_v1(row["mean"])}
    given = dict(args.pretrained)
    for budget in budgets:
        cfg = v2_pretrain_config(task, budget)
        run = Path(given.get(budget, Path(args.runs) / f"{modality}-v2-{budget}"))
        seconds = pretrain_seconds(cfg, run)
        if seconds is None:
            raise SystemExit(f"{run}: a finished run without timing.json; delete the folder to rerun and time it")
        values = []
        for seed in range(args.seeds):
            ft = finetune_config(task, merge(fine_tuning, {
                "init": "pretrained", "seed": seed, "objective": "v2", "pretrained": str(run / "final.pt")}))
            out = Path(args.runs) / "finetune" / f"{task}-v2-{budget}-s{seed}"
            values.append(headline_metric(ft, out, args.lm, args.any_finetune_version))
            print(f"v2 {budget} steps ({seconds:.0f} s): seed {seed} {metric} {values[-1]:.4f}", flush=True)
        mean = float(np.mean(values))
        report["v2"][str(budget)] = {"pretrain_seconds": seconds, "run": str(run), "values": values, "mean": mean,
                                     "reaches_v1": reaches_v1(mean),
                                     "speedup_vs_v1": v1_seconds / seconds, "v1_pretrain_seconds": v1_seconds}
        atomic_write_json(Path(args.out), {**report, "machine": platform.machine()})
    return report


def earlier_budgets(out: Path, report: dict, budgets: list[int]) -> dict:
    """The rows of budgets that `out` holds from an earlier run of the same comparison as `report` (same task,
    reference, fine-tuning and language model) and that this run does not redo (`budgets`), so budgets can be added
    one at a time."""
    if not out.is_file():
        return {}
    old = json.loads(out.read_text())
    differs = [f"{key} {old.get(key)!r}, not {report[key]!r}" for key in ("task", "reference", "finetune_steps", "lm")
               if old.get(key) != report[key]]
    if differs:
        raise SystemExit(f"{out}: holds another comparison ({'; '.join(differs)}); pass another --out")
    redone = {str(budget) for budget in budgets}
    # rows written before rows recorded their v1 time were divided by the file's
    return {budget: {"v1_pretrain_seconds": old["v1"]["pretrain_seconds"], **row}
            for budget, row in old.get("v2", {}).items() if budget not in redone}


def budget_runs(text: str) -> dict[int, str]:
    """"2400=runs/x/pretrain/speech-v2,6000=..." -> {2400: "runs/x/...", ...}"""
    out = {}
    for item in filter(None, text.split(",")):
        budget, sep, run = item.partition("=")
        if not sep or not budget.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not BUDGET=RUN_FOLDER")
        out[int(budget)] = run
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--presets", default="embedded")
    timing_arguments(p, OUT, steps=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch", default="", help="per preset and modality, e.g. base.image=64,base.text=32")
    p = sub.add_parser("time-to-accuracy")
    p.add_argument("--task", default="fashion_mnist", choices=sorted(V2_RECIPES))
    p.add_argument("--budgets", default="150,300")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--reference", default="results/bench/pretrain_vs_scratch_image_ft150_cpu.json",
                   help="the v1 pretrain_vs_scratch.json row, made with the same --finetune-steps")
    p.add_argument("--v1-seconds", type=float, default=None, help="v1 pretraining time (default: from the log)")
    p.add_argument("--pretrained", type=budget_runs, default={},
                   help="earlier v2 pretraining runs to reuse, BUDGET=RUN,... (their config must be the recipe's)")
    p.add_argument("--lm", type=Path, default=None, help="CTC tasks: compare WER decoded with this language model "
                   "folder (`d2v lm`); the reference row must have been scored with it")
    p.add_argument("--any-finetune-version", action="store_true", help="reuse finished fine-tunes of the same "
                   "config made under an older FINETUNE version (scored again)")
    p.add_argument("--runs", default="runs/bench")
    p.add_argument("--out", default=str(OUT.with_name("v2_time_to_accuracy.json")))
    args = parser.parse_args()
    if getattr(args, "device", "cpu") == "cpu":
        torch.set_num_threads(2)
    if args.what == "throughput":
        result = {"benchmark": "v2_vs_v1_throughput", "machine": platform.machine(), **throughput(args)}
        atomic_write_json(Path(args.out), result)
    else:
        time_to_accuracy(args)


if __name__ == "__main__":
    from runs import stops_with_a_checkpoint

    stops_with_a_checkpoint(main)()
