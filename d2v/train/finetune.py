"""Fine-tuning for every downstream task: from a data2vec checkpoint, from scratch (the baseline), or as a linear
probe on frozen features. Tasks are table rows (`d2v.train.tasks`); the model (`task_model`), the batches
(`task_data`) and the scoring (`d2v.eval.evaluate`) are their own modules, and the loop here is shared.

Under torchrun, fine-tuning is DDP: each rank trains on its own stream (the shard readers are rank-aware), dev
predictions are split over the ranks by shard and gathered, and rank 0 logs and writes.

Run folder: `config.json`, `recipe.json` (the recipe version it is made under, `d2v.train.recipe`), `metrics.csv`
(train loss, gradient norm and dev metric), `final.pt`, `best.pt` (best dev metric when the task has a dev split),
`curves.png`; while the run is unfinished, `checkpoints/` (model, AdamW, fp16's loss scale, step, stream position,
best dev so far, RNG states), from which it resumes bit for bit.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from d2v.data.tokenizer import TextTokenizer
from d2v.eval.evaluate import predict, score, selection_key
from d2v.io import atomic_write_bytes, atomic_write_json
from d2v.modalities.base import Batch
from d2v.modalities.heads import ctc_loss, mix_clips, tagging_loss
from d2v.modalities.text import require_vocabulary
from d2v.nn.compile import compile_regions
from d2v.train import checkpoint, fsdp, recipe, task_data
from d2v.train.batches import index_first, positioned, resume_position, step_rng
from d2v.train.distributed import World, barrier, init, mean_over_ranks
from d2v.train.logging import MetricsLog, TrainingClock, is_log_step, plot_curves, progress_bar
from d2v.train.optim import clip_and_step, fp16_scaling, require_finite, restore_scaler, \
    scaled_backward, scaler_state, schedule_fn, set_lr
from d2v.train.preemption import StopSignals
from d2v.train.precision import autocast, resolved_precision
from d2v.train.task_model import build_model, finetune_optimizer, save_finetuned
from d2v.train.tasks import TASKS, FinetuneConfig, Task


def mix(cfg: FinetuneConfig, num_classes: int):
    """MixUp / CutMix (torchvision v2), one of them per batch (on a `mix_prob` share of the batches), or None."""
    from torchvision.transforms import v2

    choices = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
              ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    if not choices or cfg.mix_prob == 0:
        return None
    mixer = v2.RandomChoice(choices)
    return mixer if cfg.mix_prob == 1 else v2.RandomApply([mixer], p=cfg.mix_prob)


# -------------------------------------------------------------------------------------------------------- loop

def train_loss(model, inputs: dict, task: Task, cfg: FinetuneConfig, mixer, rng) -> torch.Tensor:
    if task.kind == "ctc":
        logits, lengths = model(inputs["batch"], rng)
        return ctc_loss(logits, lengths, inputs["targets"], inputs["target_lengths"])
    batch, labels = inputs["batch"], inputs["labels"]
    if task.kind == "tagging":
        if cfg.source_mixup is not None and cfg.mix_prob > 0:
            batch, labels = mix_clips(batch, labels, cfg.source_mixup, cfg.mix_prob, rng)
        return tagging_loss(model(batch, rng), labels)
    if task.kind == "regression":
        return F.mse_loss(model(batch).squeeze(-1), labels.float())
    labels = labels.long()
    if mixer is not None:
        source, labels = mixer(batch.source, labels)  # soft labels
        batch = Batch(source=source)
    return F.cross_entropy(model(batch), labels, label_smoothing=cfg.label_smoothing)


# Settings that do not change what is computed: a checkpoint written under other values still resumes.
RESUMABLE_ACROSS = ("checkpoint", "device", "compile", "stream_resume", "log_every", "parallel")


def resumed_stream(cfg: FinetuneConfig, task: Task, consumed: int):
    """The training stream at batch `consumed`: the seeded stream replayed to there, with `stream_resume: reseed` a
    fresh one keyed by (seed, consumed), with `seek` the seekable stream positioned there."""
    if cfg.stream_resume == "seek":
        return iter(task_data.seekable_loader(cfg, consumed))
    seed, skip = resume_position(cfg.stream_resume, cfg.seed, consumed)
    return positioned(task_data.loader(cfg.model_copy(update={"seed": seed}), task.train, train=True), skip)


def accumulate_gradients(train_model, stream, task: Task, cfg: FinetuneConfig, mixer, amp, scaler, world: World,
                         step: int, device: torch.device, sharded: bool) -> torch.Tensor:
    """Backward over the update's `accum_steps` micro-batches (DDP all-reduces on the last, FSDP reduce-scatters
    each; fp16 scales the loss first); their mean loss, on the device (float64, as the Python floats it summed
    before). Masks, mixing and dropout are keyed by (seed, step) and, when the update has several micro-batches, by
    the micro-batch's place in it, so 2 ranks draw what 1 process accumulating 2 micro-batches draws."""
    several = world.distributed or cfg.accum_steps > 1
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(cfg.accum_steps):
        rng = step_rng(cfg.seed, step, *([world.rank * cfg.accum_steps + micro] if several else []))
        sync = micro == cfg.accum_steps - 1 or not world.distributed or sharded
        if sharded:
            fsdp.share_layerdrop(train_model.encoder, cfg.seed, step, micro)
        with (contextlib.nullcontext() if sync else train_model.no_sync()), amp:
            inputs = task_data.as_inputs(next(stream), task.modality, device)
            micro_loss = train_loss(train_model, inputs, task, cfg, mixer, rng) / cfg.accum_steps
        scaled_backward(micro_loss, scaler)
        loss += micro_loss.detach().double()
    return loss


GLUE_FP16 = (4.0, 128)  # fairseq's GLUE fine-tuning configs: fp16_init_scale, fp16_scale_window


def fp16_scaling_of(cfg: FinetuneConfig, task: Task, ranks: int) -> dict:
    """The fp16 loss scaler's arguments: the config's, else fairseq's GLUE recipes' for text tasks, else its
    defaults."""
    init_scale, window = GLUE_FP16 if task.modality == "text" else (None, None)
    return fp16_scaling(cfg.fp16_init_scale or init_scale, cfg.fp16_scale_window or window, ranks, cfg.accum_steps)


def run_finetune(cfg: FinetuneConfig, out_dir: str | Path, progress: bool = True, stop_after: int | None = None,
                 restart_on_change: bool = False) -> dict:
    """Fine-tune to `cfg.steps`, resuming from `out_dir/checkpoints` when an interrupted run left one there (the
    folder is removed when the run finishes: final.pt and best.pt are what it keeps). `stop_after` ends early (tests).
    A checkpoint of another config, data or recipe is an error, or with `restart_on_change` (pipeline stages)
    discarded."""
    task = TASKS[cfg.task]
    out_dir, ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
    world = init(cfg.device, "finetune.device")
    device = world.device
    train_shards = task_data.shards_of(cfg, task.train)
    data_digest = checkpoint.shards_digest(train_shards)
    if (done := checkpoint.finished_run(out_dir, cfg, "finetune", RESUMABLE_ACROSS, data_digest,
                                        restart_on_change, world)) is not None:
        return done
    index_first(train_shards, cfg.stream_resume, world)
    last, state = checkpoint.resume_point(ckpt_dir, cfg, recipe.FINETUNE, RESUMABLE_ACROSS, cfg.steps, data_digest,
                                          restart_on_change, world)
    model = _task_model(cfg, task, device, state)
    # under DDP unused parameters are expected: the unread mask tokens, LayerDrop's skipped blocks
    train_model, sharded = fsdp.parallelize(model, (model.encoder,), cfg.parallel, world,
                                            resolved_precision(device, cfg.precision), find_unused=True)
    amp, scaler = autocast(device, cfg.precision, fp16_scaling_of(cfg, task, world.size))
    optimizer = finetune_optimizer(model, cfg)  # FSDP: over the shards
    step, consumed, best = 0, 0, _Best()
    if state is not None:
        fsdp.restore_optimizer_state(model, optimizer, state["optimizer"], sharded)
        restore_scaler(scaler, state.get("scaler"))
        step, consumed = state["step"], state["batches"]
        best = _Best(state["best"], state["best_metrics"], state.get("best_pt"))  # best_pt: absent from older ones
    lr_at = schedule_fn(cfg.optim.schedule, cfg.steps, cfg.optim.warmup_steps, cfg.optim.final_lr_scale,
                        cfg.optim.tri_stage_phases)
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder_params = {id(p) for p in model.encoder.parameters()}
    mixer = mix(cfg, task.num_outputs) if task.modality == "image" else None
    stream = resumed_stream(cfg, task, consumed)
    if state is not None:
        checkpoint.set_rng_state(state["rng"])
        if world.is_main:
            print(f"resumed from {last} at step {step}", file=sys.stderr)
    if world.is_main:  # once the model, its checkpoint and the data have loaded: a failed start leaves no run
        _open_run_folder(out_dir, cfg, best)
    saved_log = state.get("metrics_csv") if state is not None else None
    log = MetricsLog(out_dir / "metrics.csv", resume_step=step, saved=saved_log) if world.is_main else None
    model.train()
    if cfg.mode == "probe":
        model.encoder.eval()
    bar = progress_bar(f"finetune {cfg.task} ({cfg.init}, {cfg.mode})", cfg.steps, step,
                       enabled=progress and world.is_main)
    clock = TrainingClock(state)
    with StopSignals(world) as stop, bar:  # SIGTERM, SIGUSR1, Ctrl-C: a checkpoint at this step, then stop
        while step < cfg.steps and (stop_after is None or step < stop_after):
            step += 1
            lr = set_lr(optimizer, cfg.optim.lr, lr_at(step - 1))
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(train_model, stream, task, cfg, mixer, amp, scaler, world, step, device,
                                        sharded)
            consumed += cfg.accum_steps
            grad_norm = fsdp.local_value(optimizer_step(optimizer, trainable, encoder_params, cfg, step, scaler))
            scored = bool(task.dev and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps))
            logged = scored or is_log_step(step, cfg.steps, cfg.log_every)
            if logged:  # the step's host syncs (a GPU's queue drains): loss, norm, the fp16 scale, the dev score
                row = {"step": step, **mean_over_ranks({"loss": float(loss), "grad_norm": float(grad_norm)}, world),
                       "lr": lr}
                require_finite(step, row, scaler)  # the same on every rank: the loss is their mean, the scale shared
                if scored:
                    row.update(_score_dev(model, cfg, task, amp, world, best, out_dir, step, sharded))
                if log is not None:
                    log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            signum = stop.after_step(step, cfg.steps)  # collective: all ranks stop at one step
            save = step < cfg.steps and (step % cfg.checkpoint.every == 0 or signum is not None)
            if save and not logged:  # no checkpoint of diverged weights; the norm is all-reduced, so every rank agrees
                require_finite(step, {"grad_norm": float(grad_norm)}, scaler)
            states = fsdp.gathered_states(model, optimizer, sharded, world) if save else None  # on every rank
            if states is not None:
                checkpoint.save(ckpt_dir, step, {"model": states[0], "optimizer": states[1],
                                                 "scaler": scaler_state(scaler),
                                                 "batches": consumed, "best": best.key, "best_metrics": best.metrics,
                                                 "best_pt": best.file,
                                                 "config": cfg.model_dump(mode="json"), "data_digest": data_digest,
                                                 "recipe": recipe.FINETUNE, "ranks": world.size,
                                                 "metrics_csv": log.text(), "seconds": clock.seconds()},
                                keep=cfg.checkpoint.keep)
            if signum is not None:
                stop.halt(signum, step, ckpt_dir)
        bar.close()
        summary = {"task": cfg.task, "init": cfg.init, "mode": cfg.mode, "seed": cfg.seed, "steps": cfg.steps,
                   "seconds": round(clock.seconds(), 1), "best_dev": best.metrics, "data_digest": data_digest}
        final = fsdp.gathered_model_state(model, sharded, world) if step >= cfg.steps else None
        if final is not None:  # a signal from here on waits until the run folder is complete
            _write_run(final, cfg, out_dir, log, summary, best.metrics is None)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        barrier(world)  # the run folder is complete when any rank returns
        return summary


def _task_model(cfg: FinetuneConfig, task: Task, device: torch.device, state: dict | None) -> torch.nn.Module:
    """The task's model on `device`, from its pretraining or scratch, with a resumed checkpoint's weights; its
    encoder's blocks compiled on request."""
    model = build_model(cfg).to(device)
    if task.modality == "text":
        require_vocabulary(TextTokenizer(cfg.tokenizer).vocab_size, model.encoder.cfg, cfg.tokenizer,
                           f"finetune.{cfg.task} ({cfg.preset})")
    if state is not None:
        model.load_state_dict(state["model"])
    if cfg.compile:
        compile_regions(model.encoder)
    return model


def _open_run_folder(out_dir: Path, cfg: FinetuneConfig, best: _Best) -> None:
    """The run folder's config and recipe stamp; a resumed run's best.pt put back from its checkpoint (a pipeline
    deletes a stopped job's outputs, best.pt among them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
    recipe.stamp(out_dir, "finetune")
    if best.file is not None:
        atomic_write_bytes(out_dir / "best.pt", best.file)


@dataclass
class _Best:
    """The best dev score so far (`selection_key`), its metrics and best.pt's bytes, which the checkpoints carry."""

    key: tuple[float, ...] | None = None
    metrics: dict[str, float] | None = None
    file: bytes | None = None


def _score_dev(model, cfg: FinetuneConfig, task: Task, amp, world: World, best: _Best, out_dir: Path,
               step: int, sharded: bool) -> dict[str, float]:
    """Score the dev split (the same on every rank; FSDP: every rank reads all of it); a better score than `best`
    updates it and writes best.pt. Returns the metrics as the log row's `dev_` columns."""
    dev = score(task, *predict(model, cfg, task.dev, amp, world, whole_split=sharded))
    key = selection_key(task, dev)
    if best.key is None or key > best.key:
        best.key, best.metrics = key, dev
        state = fsdp.gathered_model_state(model, sharded, world)
        if state is not None:
            save_finetuned(state, cfg, out_dir / "best.pt", step)
            best.file = (out_dir / "best.pt").read_bytes()
    return {f"dev_{k}": v for k, v in dev.items()}


def optimizer_step(optimizer, trainable: list, encoder_params: set[int], cfg: FinetuneConfig, step: int,
                   scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Clip and step (fp16: skipped by the scaler over an overflow); returns the gradient norm before clipping, on
    the device. While only the output layer trains (fairseq freeze_finetune_updates), the encoder's gradients are
    dropped first."""
    if step <= cfg.freeze_encoder_steps:
        for p in trainable:
            if id(p) in encoder_params:
                p.grad = None
    return clip_and_step(optimizer, trainable, cfg.optim.clip_norm, scaler)


def _write_run(model_state: dict, cfg: FinetuneConfig, out_dir: Path, log: MetricsLog, summary: dict,
               no_dev: bool) -> None:
    save_finetuned(model_state, cfg, out_dir / "final.pt", cfg.steps)
    if no_dev:  # no dev split: the final model is the one we keep
        save_finetuned(model_state, cfg, out_dir / "best.pt", cfg.steps)
    df = log.frame()
    plot_curves(df, out_dir / "curves.png", ["loss", "lr"] + [c for c in df.columns if c.startswith("dev_")],
                f"fine-tuning {cfg.task} ({cfg.init}, {cfg.mode})")
    atomic_write_json(out_dir / "summary.json", summary)

