"""Fine-tuning and evaluation for every downstream task: from a data2vec checkpoint, from scratch (the baseline), or
as a linear probe on frozen features. Tasks are table rows; the loop is shared.

Under torchrun, fine-tuning is DDP: each rank trains on its own stream (the shard readers are rank-aware), dev
predictions are split over the ranks by shard and gathered, and rank 0 logs and writes.

Run folder: `config.json`, `recipe.json` (the recipe version it is made under, `d2v.train.recipe`), `metrics.csv`
(train loss, gradient norm and dev metric), `final.pt`, `best.pt` (best dev metric when the task has a dev split),
`curves.png`; while the run is unfinished, `checkpoints/` (model, AdamW, fp16's loss scale, step, stream position,
best dev so far, RNG states), from which it resumes bit for bit.
`evaluate` writes one JSON per (task, split): metric values, number of examples, seed, git commit, recipe versions
(of the fine-tune and of the evaluation code) and a digest of the run configuration.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from d2v.config import Objective, config_digest
from d2v.data.loaders import AudioConfig, ImageAugConfig, image_loader, seekable_image_batches, \
    seekable_speech_batches, seekable_text_task_batches, speech_loader, text_task_loader, web_loader
from d2v.data.shards import read_index
from d2v.data.tokenizer import LetterTokenizer, TextTokenizer
from d2v.eval.lm import CTCScorer, with_lm_fields
from d2v.eval.metrics import TASK_METRICS, greedy_transcripts, oriented, prediction_stats, scored_in_part
from d2v.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, git_commit, read_torch
from d2v.modalities.base import Batch, from_host
from d2v.modalities.heads import AudioTagger, CTCModel, ImageClassifier, TextClassifier, ctc_loss, mix_clips, \
    tagging_loss
from d2v.modalities.image import require_image_shape
from d2v.modalities.registry import build_encoder
from d2v.modalities.text import require_vocabulary
from d2v.nn.compile import compile_regions
from d2v.train import checkpoint, recipe
from d2v.train.batches import index_first, positioned, resume_position
from d2v.train.distributed import World, barrier, ddp, gather_lists, gather_to_main, init, mean_over_ranks
from d2v.train.logging import MetricsLog, TrainingClock, is_log_step, plot_curves, progress_bar
from d2v.train.optim import adamw, clip_and_step, fp16_scaling, fused_kernel, layer_decay_groups, \
    load_optimizer_state, require_finite, restore_scaler, scaled_backward, scaler_state, schedule_fn, set_lr
from d2v.train.preemption import StopSignals
from d2v.train.pretrain import autocast, load_final, shards_digest, step_rng
from d2v.train.tasks import TASKS, FinetuneConfig, Task, eval_file_name


# ------------------------------------------------------------------------------------------------------- models

def build_model(cfg: FinetuneConfig) -> torch.nn.Module:
    task = TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(task.modality, cfg.preset, cfg.objective, **cfg.regularization.overrides())
    if cfg.init == "pretrained":
        encoder.load_state_dict(pretrained_weights(cfg, task.modality))
    if task.modality == "image" and cfg.image is not None:
        require_image_shape(cfg.image.channels, cfg.image.size, encoder.cfg,
                            f"finetune.{cfg.task}.image ({cfg.preset})")
    probe = cfg.mode == "probe"
    if task.kind == "ctc":
        model = CTCModel(encoder, len(LetterTokenizer.load(cfg.letters).symbols), cfg.ctc_masks, linear_probe=probe,
                         freeze_cnn=not cfg.train_cnn)
    elif task.kind == "tagging":
        model = AudioTagger(encoder, task.num_outputs, cfg.tagging_masks, linear_probe=probe,
                            freeze_cnn=not cfg.train_cnn)
    elif task.modality == "image":
        model = ImageClassifier(encoder, task.num_outputs, linear_probe=probe)
    else:
        model = TextClassifier(encoder, task.num_outputs, linear_probe=probe)
    if probe:
        encoder.requires_grad_(False)
    return model


def pretrained_weights(cfg: FinetuneConfig, modality: str) -> dict:
    """The encoder weights `cfg.weights` names in the pretraining's final.pt: the student, or the EMA teacher. An
    imported checkpoint without an EMA teacher stores the student twice, so its teacher is refused by name."""
    where = f"finetune.{cfg.task}"
    state = load_final(cfg.pretrained or "", modality, cfg.preset, cfg.objective, f"{where}.pretrained")
    if cfg.weights == "student":
        return state["encoder"]
    if "teacher" not in state:
        raise ValueError(f"{where}.weights: teacher, but {cfg.pretrained} holds no teacher (only the student)")
    if state.get("has_teacher") is False:
        raise ValueError(f"{where}.weights: teacher, but {cfg.pretrained} was imported from {state.get('source')} "
                         "without an EMA teacher (its teacher is a copy of the student)")
    return state["teacher"]


# BEiT's embedding group (layer 0, the most decayed LR); every other non-block parameter trains at the full LR
BEIT_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed.")


def vit_layer_id(name: str, depth: int, objective: Objective) -> int:
    """Layer of an image classifier's parameter for layer-wise LR decay: 0 = embeddings, block i = i + 1,
    depth + 1 = full LR. v1 follows BEiT's `get_num_layer_for_vit` (the shared relative-position table and the norms
    are top-level, like the head); v2 follows fairseq's data2vec_multi fine-tuning, which decays the blocks only
    (spec §9.1: patch embedding, [CLS] and norms keep the full LR)."""
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if objective == "v1" and name.removeprefix("encoder.").startswith(BEIT_EMBEDDINGS):
        return 0
    return depth + 1


def finetune_optimizer(model, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel where the model is on CUDA (`optim.fused_kernel`)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=fused_kernel(model.parameters()))


def param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """Layer-wise LR decay protects what the lower layers of a pretrained encoder learned; a scratch encoder has
    nothing to protect, so it trains every layer at the full LR, as MAE's and DeiT's from-scratch recipes do. With
    decay 0.75 the embedded scratch ViT's patch embedding would learn at 0.75^7 ≈ 0.13 of the LR, a straw-man baseline
    (docs/findings.md, image)."""
    task = TASKS[cfg.task]
    if task.modality == "image" and cfg.layer_decay < 1.0 and cfg.mode == "full" and cfg.init == "pretrained":
        depth = model.encoder.cfg.depth
        groups = layer_decay_groups(model.named_parameters(), lambda name: vit_layer_id(name, depth, cfg.objective),
                                    depth, cfg.layer_decay, cfg.optim.weight_decay)
    else:
        groups = adamw([p for p in model.parameters() if p.requires_grad], cfg.optim.lr, cfg.optim.weight_decay,
                       cfg.optim.betas, cfg.optim.eps).param_groups
    return scaled_encoder_lr(groups, model, cfg.encoder_lr_scale)


def scaled_encoder_lr(groups: list[dict], model, scale: float) -> list[dict]:
    """The encoder's parameters at `scale` of their group's LR (the head keeps it): each group split in two, its
    `lr_scale` (layer decay's, or 1) multiplied for the encoder's half; empty halves dropped. Unchanged at 1."""
    if scale == 1.0:
        return groups
    encoder = {id(p) for p in model.encoder.parameters()}
    split = [{**group, "params": [p for p in group["params"] if (id(p) in encoder) == in_encoder],
              "lr_scale": group.get("lr_scale", 1.0) * (scale if in_encoder else 1.0)}
             for group in groups for in_encoder in (True, False)]
    return [group for group in split if group["params"]]


# -------------------------------------------------------------------------------------------------------- data

def shards_of(cfg: FinetuneConfig, split: str) -> Path:
    return Path(cfg.data_root) / "shards" / TASKS[cfg.task].shard_key(split)


# fairseq's CTC fine-tuning neither drops nor crops labelled utterances (no min/max_sample_size); LibriSpeech's
# longest is 35 s. AudioConfig's own defaults (2 to 20 s) are the pretraining crop's.
FINETUNE_AUDIO = AudioConfig(min_samples=0, max_samples=60 * 16_000)


def loader(cfg: FinetuneConfig, split: str, train: bool):
    task = TASKS[cfg.task]
    shards = shards_of(cfg, split)
    mode = "finetune" if train else "eval"
    if task.modality == "image":
        ds = image_loader(shards, cfg.image or ImageAugConfig(), mode, cfg.batch_size, resampled=train,
                          seed=cfg.seed, partial=not train)
    elif task.modality == "speech":
        ds = speech_loader(shards, cfg.audio or FINETUNE_AUDIO, mode, cfg.batch_size, resampled=train,
                           seed=cfg.seed, partial=not train, **speech_targets(cfg))
    else:
        ds = text_task_loader(shards, TextTokenizer(cfg.tokenizer), cfg.batch_size, cfg.max_tokens, mode,
                              seed=cfg.seed, resampled=train)
    return web_loader(ds, cfg.num_workers if train else 0, seed=cfg.seed)


def seekable_loader(cfg: FinetuneConfig, start: int):
    """The training batches of `stream_resume: seek` from batch `start` on (d2v.data.seekable)."""
    task, shards = TASKS[cfg.task], shards_of(cfg, TASKS[cfg.task].train)
    if task.modality == "image":
        ds = seekable_image_batches(shards, cfg.image or ImageAugConfig(), "finetune", cfg.batch_size, seed=cfg.seed,
                                    start=start)
    elif task.modality == "speech":
        ds = seekable_speech_batches(shards, cfg.audio or FINETUNE_AUDIO, "finetune", cfg.batch_size, seed=cfg.seed,
                                     start=start, **speech_targets(cfg))
    else:
        ds = seekable_text_task_batches(shards, TextTokenizer(cfg.tokenizer), cfg.batch_size, cfg.max_tokens,
                                        seed=cfg.seed, start=start)
    return web_loader(ds, cfg.num_workers, seed=cfg.seed)


def speech_targets(cfg: FinetuneConfig) -> dict:
    """What a speech loader adds to its batches: CTC targets from the letter vocabulary, or tagged clips' labels."""
    task = TASKS[cfg.task]
    if task.kind == "tagging":
        return {"num_classes": task.num_outputs}
    return {"letters": LetterTokenizer.load(cfg.letters)}


def as_inputs(item, modality: str, device: torch.device) -> dict:
    """A loader item as a dict of model inputs on `device` (transcripts stay on the host)."""
    inputs = {"batch": Batch(source=item[0]), "labels": item[1]} if modality == "image" else dict(item)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[key] = from_host(value, device)
        elif isinstance(value, Batch):
            inputs[key] = value.to(device)
    return inputs


def resolve_device(name: str, where: str = "finetune.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{where}: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def device_and_world(cfg: FinetuneConfig) -> tuple[torch.device, World]:
    """The config's device (checked), and under torchrun the process group joined and this rank's device."""
    device = resolve_device(cfg.device)
    world = init(cfg.device)
    return (world.device if world.distributed else device), world


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


@torch.no_grad()
def _forward_split(model, cfg: FinetuneConfig, split: str, amp=None) -> Iterator[tuple[dict, Any]]:
    """(inputs, outputs) per batch of a split, in shard order, on the model's device, in eval mode."""
    task = TASKS[cfg.task]
    device = next(model.parameters()).device
    model.eval()
    try:
        for item in loader(cfg, split, train=False):
            inputs = as_inputs(item, task.modality, device)
            with amp or contextlib.nullcontext():
                yield inputs, model(inputs["batch"])
    finally:
        model.train()


def ctc_logits(model, cfg: FinetuneConfig, split: str, amp=None) -> tuple[list[np.ndarray], list[str]]:
    """Per utterance, (frames, letters) logits, and the reference transcripts."""
    out, refs = [], []
    for inputs, (logits, lengths) in _forward_split(model, cfg, split, amp):
        out += [x[:n] for x, n in zip(logits.float().cpu().numpy(), lengths.tolist())]
        refs += inputs["text"]
    return out, refs


def predict(model, cfg: FinetuneConfig, split: str, amp=None, world: World = World()) -> tuple[list, list]:
    """(predictions, references) over a whole split, in shard order (CTC: greedy transcripts); under torchrun each
    rank reads its share of the shards and every rank gets all pairs back (shard order per rank)."""
    task = TASKS[cfg.task]
    if task.kind == "ctc":
        logits, refs = ctc_logits(model, cfg, split, amp)
        return (gather_lists(greedy_transcripts(logits, LetterTokenizer.load(cfg.letters)), world),
                gather_lists(refs, world))
    preds, refs = [], []
    for inputs, out in _forward_split(model, cfg, split, amp):
        if task.kind == "regression":
            preds += out.float().squeeze(-1).tolist()
            refs += inputs["labels"].tolist()
        elif task.kind == "tagging":  # per clip: the classes' probabilities and 0/1 targets
            preds += list(torch.sigmoid(out.float()).cpu().numpy())
            refs += list(inputs["labels"].to(torch.uint8).cpu().numpy())
        else:
            preds += out.argmax(-1).tolist()
            refs += inputs["labels"].long().tolist()
    return gather_lists(preds, world), gather_lists(refs, world)


def score(task: Task, preds: list, refs: list) -> dict[str, float]:
    return {m: TASK_METRICS[m](preds, refs) for m in task.metrics}


def result_record(cfg, split: str, preds: list, refs: list, **fields) -> dict:
    """What every evaluation and baseline JSON holds about a scored split (`cfg`: a fine-tuning or baseline config),
    plus the writer's own `fields`."""
    task = TASKS[cfg.task]
    record = {"task": cfg.task, "stands_in_for": task.stands_in_for, "split": split,
              "metrics": score(task, preds, refs), "predictions": prediction_stats(task.kind, preds, refs),
              "n": len(refs), "n_split": read_index(shards_of(cfg, split))["count"], "seed": cfg.seed,
              "commit": git_commit(), "params_digest": config_digest(cfg), **fields}
    if scored_in_part(record):  # samples that failed to decode were skipped with a warning each
        print(f"warning: {cfg.task} {split}: scored {record['n']} of the split's {record['n_split']} examples; the "
              "score is not the whole split's", file=sys.stderr)
    return record


def require_extra_tests(task_name: str, extra: tuple[str, ...]) -> None:
    """Refuse test sets that are not among the task's `extra_tests`, before any work."""
    task = TASKS[task_name]
    unknown = sorted(set(extra) - set(task.extra_tests))
    if unknown:
        raise ValueError(f"{task_name}: no extra test set {unknown}; it has {list(task.extra_tests) or 'none'}")


def require_ctc_for_lm(task_name: str, lm) -> None:
    """Refuse a language model for a task that is not CTC, before any work."""
    kind = TASKS[task_name].kind
    if lm is not None and kind != "ctc":
        raise ValueError(f"{task_name}: --lm decodes CTC tasks; this one is {kind}")


def selection_key(task: Task, metrics: dict[str, float]) -> tuple[float, ...]:
    """Higher is better: the headline metric, ties broken by the task's next ones (CTC: WER, then CER, since at
    small budgets WER stays at 1.0 while CER already falls). An undefined metric (NaN) ranks below every value."""
    signed = (oriented(m, metrics[m]) for m in task.metrics)
    return tuple(-math.inf if math.isnan(v) else v for v in signed)


def headline(task: Task, metrics: dict[str, float]) -> float:
    """Higher is better."""
    return oriented(task.metrics[0], metrics[task.metrics[0]])


# Settings that do not change what is computed: a checkpoint written under other values still resumes.
RESUMABLE_ACROSS = ("checkpoint", "device", "compile", "stream_resume", "log_every")


def resumed_stream(cfg: FinetuneConfig, task: Task, consumed: int):
    """The training stream at batch `consumed`: the seeded stream replayed to there, with `stream_resume: reseed` a
    fresh one keyed by (seed, consumed), with `seek` the seekable stream positioned there."""
    if cfg.stream_resume == "seek":
        return iter(seekable_loader(cfg, consumed))
    seed, skip = resume_position(cfg.stream_resume, cfg.seed, consumed)
    return positioned(loader(cfg.model_copy(update={"seed": seed}), task.train, train=True), skip)


def accumulate_gradients(train_model, stream, task: Task, cfg: FinetuneConfig, mixer, amp, scaler, world: World,
                         step: int, device: torch.device) -> torch.Tensor:
    """Backward over the update's `accum_steps` micro-batches (DDP all-reduces on the last; fp16 scales the loss
    first); their mean loss, on the device (float64, as the Python floats it summed before). Masks, mixing and
    dropout are keyed by (seed, step) and, when the update has several micro-batches, by the micro-batch's place in
    it, so 2 ranks draw what 1 process accumulating 2 micro-batches draws."""
    several = world.distributed or cfg.accum_steps > 1
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(cfg.accum_steps):
        rng = step_rng(cfg.seed, step, *([world.rank * cfg.accum_steps + micro] if several else []))
        sync = micro == cfg.accum_steps - 1 or not world.distributed
        with (contextlib.nullcontext() if sync else train_model.no_sync()), amp:
            micro_loss = train_loss(train_model, as_inputs(next(stream), task.modality, device), task, cfg, mixer,
                                    rng) / cfg.accum_steps
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
    device, world = device_and_world(cfg)
    train_shards = shards_of(cfg, task.train)
    data_digest = shards_digest(train_shards)
    if (done := checkpoint.finished_run(out_dir, cfg, "finetune", RESUMABLE_ACROSS, data_digest,
                                        restart_on_change, world)) is not None:
        return done
    index_first(train_shards, cfg.stream_resume, world)
    last, state = checkpoint.resume_point(ckpt_dir, cfg, recipe.FINETUNE, RESUMABLE_ACROSS, cfg.steps, data_digest,
                                          restart_on_change, world)
    model = _task_model(cfg, task, device, state)
    # under DDP unused parameters are expected: the unread mask tokens, LayerDrop's skipped blocks
    train_model = ddp(model, device, find_unused_parameters=True) if world.distributed else model
    amp, scaler = autocast(device, cfg.precision, fp16_scaling_of(cfg, task, world.size))
    optimizer = finetune_optimizer(model, cfg)
    step, consumed, best = 0, 0, _Best()
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"])
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
            loss = accumulate_gradients(train_model, stream, task, cfg, mixer, amp, scaler, world, step, device)
            consumed += cfg.accum_steps
            grad_norm = optimizer_step(optimizer, trainable, encoder_params, cfg, step, scaler)
            scored = bool(task.dev and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps))
            logged = scored or is_log_step(step, cfg.steps, cfg.log_every)
            if logged:  # the step's host syncs (a GPU's queue drains): loss, norm, the fp16 scale, the dev score
                row = {"step": step, **mean_over_ranks({"loss": float(loss), "grad_norm": float(grad_norm)}, world),
                       "lr": lr}
                require_finite(step, row, scaler)  # the same on every rank: the loss is their mean, the scale shared
                if scored:
                    row.update(_score_dev(model, cfg, task, amp, world, best, out_dir, step))
                if log is not None:
                    log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            signum = stop.after_step(step, cfg.steps)  # collective: all ranks stop at one step
            save = step < cfg.steps and (step % cfg.checkpoint.every == 0 or signum is not None)
            if save and not logged:  # no checkpoint of diverged weights; the norm is all-reduced, so every rank agrees
                require_finite(step, {"grad_norm": float(grad_norm)}, scaler)
            if save and world.is_main:
                checkpoint.save(ckpt_dir, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
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
        if world.is_main and step >= cfg.steps:  # a signal from here on waits until the run folder is complete
            _write_run(model, cfg, out_dir, log, summary, best.metrics is None)
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
               step: int) -> dict[str, float]:
    """Score the dev split (the same on every rank); a better score than `best` updates it and writes best.pt.
    Returns the metrics as the log row's `dev_` columns."""
    dev = score(task, *predict(model, cfg, task.dev, amp, world))
    key = selection_key(task, dev)
    if best.key is None or key > best.key:
        best.key, best.metrics = key, dev
        if world.is_main:
            _save(model, cfg, out_dir / "best.pt", step)
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


def _write_run(model, cfg: FinetuneConfig, out_dir: Path, log: MetricsLog, summary: dict, no_dev: bool) -> None:
    _save(model, cfg, out_dir / "final.pt", cfg.steps)
    if no_dev:
        _save(model, cfg, out_dir / "best.pt", cfg.steps)  # no dev split: the final model is the one we keep
    df = log.frame()
    plot_curves(df, out_dir / "curves.png", ["loss", "lr"] + [c for c in df.columns if c.startswith("dev_")],
                f"fine-tuning {cfg.task} ({cfg.init}, {cfg.mode})")
    atomic_write_json(out_dir / "summary.json", summary)


def _save(model, cfg: FinetuneConfig, path: Path, step: int) -> None:
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "step": step,
                             "recipe": recipe.FINETUNE})


# ---------------------------------------------------------------------------------------------------- evaluate

def load_finetuned(path: Path, device: torch.device | None = None) -> tuple[torch.nn.Module, FinetuneConfig, dict]:
    """A fine-tuned checkpoint's model (on `device`, else its config's), its config and the saved state."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned model (run `d2v finetune` first)")
    state = read_torch(path)
    kind = checkpoint.kind_of(state)
    if kind != "fine-tuning":
        kind = "a pretraining's encoders" if kind == "pretraining" else "no fine-tuned model"
        raise ValueError(f"{path} holds {kind}, not a fine-tuned checkpoint (`d2v finetune` writes best.pt)")
    cfg = FinetuneConfig.model_validate(state["config"])
    model = build_model(cfg.model_copy(update={"init": "scratch"}))
    model.load_state_dict(state["model"])
    return model.to(device if device is not None else resolve_device(cfg.device)), cfg, state


def _no_finetuned_model(run_dir: Path, name: str) -> str:
    """Why a run folder has no `name` to evaluate, and what to pass instead."""
    if not run_dir.exists():
        return f"{run_dir}: no such run folder (pass the folder `d2v finetune --out` wrote)"
    if run_dir.is_file():
        return f"{run_dir} is a file; pass its run folder, and --checkpoint {run_dir.name} to score that file"
    if recipe.kind_of_run(run_dir) == "pretrain":
        return (f"{run_dir} is a pretraining run; fine-tune it first (`d2v finetune TASK --pretrained "
                f"{run_dir / 'final.pt'}`) and evaluate that run")
    return f"{run_dir / name}: no fine-tuned model (run `d2v finetune` first, or let it finish)"


def evaluate(run_dir: str | Path, split: str | None = None, out: str | Path | None = None,
             checkpoint_name: str = "best.pt", extra: tuple[str, ...] = (), lm: str | Path | None = None,
             decode_workers: int = 1) -> list[dict]:
    """Score a fine-tuning run on its test splits (or `split`), then on the `extra` test sets (of the task's
    `extra_tests`); one JSON per split. A CTC task is decoded greedily, and with the language model folder `lm`
    (`d2v lm`) as well: `wer_lm`, `cer_lm`, under the LM weight and word score its dev split selects, beam-searched
    in `decode_workers` processes. Under torchrun each rank runs the model over its share of a split's shards and
    the first rank gathers the outputs, scores them and writes the JSONs; the other ranks return []."""
    path = Path(run_dir) / checkpoint_name
    if not path.is_file():
        raise FileNotFoundError(_no_finetuned_model(Path(run_dir), checkpoint_name))
    model, cfg, state = load_finetuned(path, torch.device("cpu"))
    require_extra_tests(cfg.task, extra)
    require_ctc_for_lm(cfg.task, lm)
    device, world = device_and_world(cfg)
    model.to(device)
    task = TASKS[cfg.task]
    amp, _ = autocast(device, cfg.precision)
    splits = [*([split] if split else task.tests), *extra]
    scorer = None
    if task.kind == "ctc":
        def logits_of(s: str) -> tuple[list[np.ndarray] | None, list[str] | None]:
            logits, refs = ctc_logits(model, cfg, s, amp)
            return gather_to_main(logits, world), gather_to_main(refs, world)
        scorer = CTCScorer(logits_of, LetterTokenizer.load(cfg.letters), lm if world.is_main else None, task.tests,
                           task.dev, decode_workers)
        reads = scorer.reads(splits, with_lm=lm is not None)  # on every rank: a split without a dev split fails here
        if not world.is_main:  # the model over this rank's share, in the order the first rank's scorer reads
            for s in reads:
                logits_of(s)
            return []
    results = []
    for s in splits:
        preds, refs, lm_fields = scorer.score(s) if scorer else (*predict(model, cfg, s, amp, world), {})
        if not world.is_main:
            continue
        result = with_lm_fields(result_record(cfg, s, preds, refs, init=cfg.init, mode=cfg.mode, checkpoint=str(path),
                                              steps=state["step"], recipe={"finetune": state.get("recipe", 1),
                                                                           "evaluate": recipe.EVALUATE}), lm_fields)
        target = Path(out or run_dir / "eval") / eval_file_name(cfg.task, s)
        atomic_write_json(target, result)
        results.append(result)
    return results
