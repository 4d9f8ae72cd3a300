"""data2vec pretraining: accumulation, clipping, schedule, EMA after every optimizer step, DDP or FSDP, mixed
precision, checkpoint/resume, metrics and the collapse guard. Modality-agnostic: batches come from a factory.

Reproducibility contract: the masks of micro-batch m of step s on rank r come from `default_rng([seed, s, g])`
with g = r·accum + m, torch's RNG (dropout, drop-path, LayerDrop) is re-seeded from the same key, and `batches(k)`
must return the stream positioned at batch k. A run killed after step s and
resumed from its checkpoint therefore repeats exactly what the uninterrupted run does (bit-identical on CPU), and
2 ranks × 1 micro-batch see exactly what 1 rank × 2 micro-batches sees.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v.data2vec import CollapseError, Data2Vec
from d2v.ema import init_share
from d2v.io import atomic_torch_save, atomic_write_json, not_a_file, read_torch
from d2v.modalities.base import Batch
from d2v.nn.compile import compile_regions
from d2v.train import checkpoint, fsdp, recipe
from d2v.train.batches import index_first, pretrain_stream, step_rng
from d2v.train.config import PretrainConfig
from d2v.train.distributed import World, init, mean_over_ranks, shutdown
from d2v.train.logging import MetricsLog, TrainingClock, is_log_step, plot_curves, progress_bar
from d2v.train.optim import MIN_LOSS_SCALE, adamw, clip_and_step, fp16_scaling, require_finite, restore_scaler, \
    scaled_backward, scaler_state, schedule_fn, set_lr
from d2v.train.precision import autocast, resolved_precision
from d2v.train.preemption import StopSignals

CURVES = ["loss", "target_var", "pred_var", "target_rank", "local_rank", "lr", "tau"]


def min_loss_scale(cfg: PretrainConfig) -> float:
    """fp16's divergence floor: fairseq's data2vec 2.0 image and audio configs set min_loss_scale 1e-6, the others
    keep its default (spec §12)."""
    if cfg.min_loss_scale is not None:
        return cfg.min_loss_scale
    return 1e-6 if cfg.objective == "v2" and cfg.modality in ("image", "speech") else MIN_LOSS_SCALE


# Settings that do not change what is computed: a checkpoint written under other values still resumes.
# a run stopped at its fp16 divergence floor may resume under a lower one
RESUMABLE_ACROSS = ("checkpoint", "log_every", "device", "compile", "parallel", "stream_resume", "min_loss_scale")


def save_encoder(out_dir: Path, cfg: PretrainConfig, student, teacher, step: int, encoder_cfg=None,
                 **extra) -> Path:
    """`final.pt`, written atomically: what fine-tuning and the probes load. `student` and `teacher` are the
    encoders, or their state dicts (FSDP's gathered full state) with `encoder_cfg`."""
    def state(encoder) -> dict:
        return encoder if isinstance(encoder, dict) else encoder.state_dict()

    return atomic_torch_save(out_dir / "final.pt", encoder_checkpoint(
        state(student), state(teacher), cfg.modality, cfg.preset, cfg.objective, encoder_cfg or student.cfg, step,
        **extra))


def encoder_checkpoint(student: dict, teacher: dict, modality: str, preset: str, objective: str, encoder_cfg,
                       steps: int | None, **extra) -> dict:
    """The contents of a `final.pt` (d2v's pretraining, or an imported checkpoint): student and teacher weights, the
    modality/preset/objective fine-tuning must match, the encoder config and the steps trained. d2v's pretraining
    adds the student's `predictor` (the objective's state outside student and teacher: v1's regression head, v2's
    decoder), which a second stage continues from."""
    return {"encoder": student, "teacher": teacher, "modality": modality, "preset": preset, "objective": objective,
            "encoder_config": encoder_cfg.model_dump(mode="json"), "steps": steps, **extra}


def load_final(path: str | Path, modality: str, preset: str, objective: str, needed_by: str) -> dict:
    """A pretraining `final.pt`, refused unless it holds a `modality`/`preset`/`objective` encoder."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{needed_by}: {str(path)!r} {not_a_file(path)}; expected a pretraining "
                                "final.pt (run `d2v pretrain` first)")
    state = read_torch(path)
    kind = checkpoint.kind_of(state)
    if kind != "pretraining":
        kind = "a fine-tuned model" if kind == "fine-tuning" else "no pretrained encoder"
        raise ValueError(f"{needed_by}: {path} holds {kind}, not a pretraining final.pt (`d2v pretrain` or `d2v "
                         "import` writes one)")
    saved = (state.get("modality"), state.get("preset"), state.get("objective", "v1"))
    if saved != (modality, preset, objective):
        raise ValueError(f"{path}: holds the encoder {'/'.join(map(str, saved))}, {needed_by} needs "
                         f"{modality}/{preset}/{objective} (modality/preset/objective)")
    return state


def start_from(objective: Data2Vec, cfg: PretrainConfig) -> None:
    """A second pretraining stage (`init_from`): the student and its predictor from the first stage's final.pt, and
    the teacher reset to that student, as data2vec's ViT-L continued for its second 800 epochs [P1 §4.1]. The
    optimizer, LR schedule, τ and step count start afresh."""
    where = f"pretrain.{cfg.modality}.init_from"
    state = load_final(cfg.init_from, cfg.modality, cfg.preset, cfg.objective, where)
    if "predictor" not in state:
        raise ValueError(f"{cfg.init_from}: no predictor (regression head or v2 decoder) in it, so {where} cannot "
                         "continue it: an imported encoder, or a final.pt written before d2v saved one")
    objective.student.load_state_dict(state["encoder"])
    missing, unexpected = objective.load_state_dict(state["predictor"], strict=False)
    own = [k for k in missing if not k.startswith(("student.", "ema."))]
    if own or unexpected:
        raise ValueError(f"{cfg.init_from}: its predictor does not fit this objective (missing {own[:3]}, "
                         f"unexpected {unexpected[:3]})")
    objective.ema.model.load_state_dict(objective.student.state_dict())


def run_pretrain(cfg: PretrainConfig, objective: Data2Vec, batches: Callable[[int], Iterator[Batch]],
                 out_dir: str | Path, world: World = World(), progress: bool = True,
                 stop_after: int | None = None, restart_on_change: bool = False,
                 data_digest: str | None = None) -> dict:
    """Train to `cfg.steps` (resuming from `out_dir/checkpoints` if any). `stop_after` ends early (tests).

    A checkpoint written under a different config or data is never resumed silently: it is an error, or with
    `restart_on_change` (pipeline stages) the old checkpoints are discarded. Pipeline stages also start afresh
    over a finished run: Snakemake or DVC rerun a stage only when asked to or when its inputs changed."""
    out_dir = Path(out_dir)
    if (done := checkpoint.finished_run(out_dir, cfg, "pretrain", RESUMABLE_ACROSS, data_digest,
                                        restart_on_change, world)) is not None:
        return done
    objective.to(world.device)
    collapse = objective.cfg.collapse.model_copy(update={"warmup_steps": int(cfg.collapse_warmup * cfg.steps)})
    objective.cfg = objective.cfg.model_copy(update={"collapse": collapse})
    lr_at = schedule_fn(cfg.optim.schedule, cfg.steps, cfg.optim.warmup_steps, cfg.optim.final_lr_scale,
                        cfg.optim.tri_stage_phases)
    step, consumed = 0, 0
    ckpt_dir = out_dir / "checkpoints"
    last, resume_state = checkpoint.resume_point(ckpt_dir, cfg, recipe.PRETRAIN, RESUMABLE_ACROSS, cfg.steps,
                                                 data_digest, restart_on_change, world)
    if resume_state is not None:
        objective.load_state_dict(resume_state["model"])  # the full state, before any sharding
        step, consumed = resume_state["step"], resume_state["batches"]
    elif cfg.init_from:
        start_from(objective, cfg)
    if cfg.compile:
        compile_regions(objective)  # each block of student and teacher, and the v2 decoder, in place
    find_unused = getattr(objective.student.cfg, "layerdrop", 0) > 0  # DDP: LayerDrop's skipped blocks
    model, sharded = fsdp.parallelize(objective, (objective.student, objective.teacher), cfg.parallel, world,
                                      resolved_precision(world.device, cfg.precision), find_unused)
    params = objective.student_parameters()
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    amp, scaler = autocast(world.device, cfg.precision,
                           fp16_scaling(cfg.fp16_init_scale, cfg.fp16_scale_window, world.size, cfg.accum_steps))
    if resume_state is not None:  # AdamW's moments (FSDP: each rank's shards of them) and fp16's loss scale
        fsdp.restore_optimizer_state(objective, optimizer, resume_state["optimizer"], sharded)
        restore_scaler(scaler, resume_state.get("scaler"))
    stream = batches(consumed)
    if resume_state is not None:
        checkpoint.set_rng_state(resume_state["rng"])  # after the fast-forward, which may have drawn numbers
        if world.is_main:
            print(f"resumed from {last} at step {step}", file=sys.stderr)
    saved_log = resume_state.get("metrics_csv") if resume_state is not None else None
    log = MetricsLog(out_dir / "metrics.csv", resume_step=step, saved=saved_log) if world.is_main else None
    objective.train()
    run = _Run(cfg, objective, optimizer, scaler, world, sharded, out_dir, ckpt_dir, data_digest, log,
               TrainingClock(resume_state))
    seen = 0
    # SIGTERM / SIGUSR1 (a time limit, preemption) or Ctrl-C: a checkpoint at the end of the step, then Interrupted
    bar = progress_bar(f"pretrain {cfg.modality}", cfg.steps, step, enabled=progress and world.is_main)
    with StopSignals(world) as stop, bar:
        while step < cfg.steps and (stop_after is None or step < stop_after):
            step += 1
            lr = set_lr(optimizer, cfg.optim.lr, lr_at(step - 1))
            sums, out, samples = _backward(cfg, objective, model, stream, step, world, amp, scaler, sharded)
            consumed += cfg.accum_steps
            seen += samples
            sums["grad_norm"] = _optimizer_step(cfg, optimizer, params, scaler)
            tau = objective.ema_step(step)
            logged = is_log_step(step, cfg.steps, cfg.log_every)
            if logged:
                sums.update(out.ranks())  # of the last micro-batch
                _log_step(run, bar, step, consumed, sums, {"lr": lr, "tau": tau}, seen)
            signum = stop.after_step(step, cfg.steps)  # collective: all ranks stop at one step
            save = step < cfg.steps and (step % cfg.checkpoint.every == 0 or signum is not None)
            if save and not logged:  # a checkpoint between log steps: one host sync
                require_finite(step, {"grad_norm": float(sums["grad_norm"])}, scaler, min_loss_scale(cfg))
            bar.update(1)
            if save:
                _save(run, step, consumed)
            if signum is not None:
                stop.halt(signum, step, ckpt_dir)
        bar.close()
        return _finish(run, step, consumed)


def _optimizer_step(cfg: PretrainConfig, optimizer: torch.optim.Optimizer, params: list, scaler) -> torch.Tensor:
    """Clip and step (fp16: unscaled first, and skipped by the scaler over an overflow); returns the gradient norm
    before clipping, on the device."""
    norm = clip_and_step(optimizer, params, cfg.optim.clip_norm, scaler)
    optimizer.zero_grad(set_to_none=True)
    return fsdp.local_value(norm)  # FSDP: the norm is a DTensor over the shards


def _log_step(run: _Run, bar, step: int, consumed: int, sums: dict[str, torch.Tensor], scalars: dict[str, float],
              seen: int) -> None:
    """A log step, the only host sync of a step: the metrics averaged over the ranks go to the log and the bar, then
    the NaN check (fp32, bf16) and the collapse guard, which writes the run's last checkpoint before it stops."""
    keys = list(sums)
    metrics = dict(zip(keys, torch.stack([sums[k].detach().float() for k in keys]).tolist()))
    metrics = mean_over_ranks({**metrics, **scalars}, run.world)
    metrics["samples_per_s"] = seen * run.world.size / max(run.clock.elapsed(), 1e-9)
    if run.log is not None:
        run.log.write({"step": step, **metrics})
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}", tau=f"{metrics['tau']:.4f}",
                    tv=f"{metrics['target_var']:.3f}", pv=f"{metrics['pred_var']:.3f}",
                    rank=f"{metrics['target_rank']:.1f}", samples_per_s=f"{metrics['samples_per_s']:.0f}")
    require_finite(step, metrics, run.scaler, min_loss_scale(run.cfg))
    try:
        run.objective.check_collapse(step, metrics)
    except CollapseError:
        _finish(run, step, consumed, collapsed=True)
        raise


def _backward(cfg: PretrainConfig, objective: Data2Vec, model, stream, step: int, world: World, amp, scaler,
              sharded: bool) -> tuple[dict[str, torch.Tensor], object, int]:
    """Forward and backward of the step's `accum_steps` micro-batches, gradients synchronised over the ranks on the
    last; returns their mean metrics (on the device), the last one's output and the samples read."""
    sums: dict[str, torch.Tensor] = {}
    samples = 0
    for micro in range(cfg.accum_steps):
        batch = next(stream).to(world.device)
        samples += batch.source.shape[0]
        rng = step_rng(cfg.seed, step, world.rank * cfg.accum_steps + micro)
        sync = micro == cfg.accum_steps - 1 or not world.distributed
        if sharded:
            objective.set_requires_gradient_sync(sync)
            fsdp.share_layerdrop(objective.student, cfg.seed, step, micro)
        with (contextlib.nullcontext() if sync or sharded else model.no_sync()), amp:
            out = model(batch, rng)
        loss = out.loss / cfg.accum_steps
        scaled_backward(loss, scaler)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() / cfg.accum_steps
    return sums, out, samples


@dataclass(frozen=True)
class _Run:
    """What writing a checkpoint or finishing needs besides the step: fixed once the loop starts."""

    cfg: PretrainConfig
    objective: Data2Vec
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16's: its loss scale is training state, checkpointed
    world: World
    sharded: bool  # FSDP: the states are gathered from every rank
    out_dir: Path
    ckpt_dir: Path
    data_digest: str | None
    log: MetricsLog | None  # the main rank's
    clock: TrainingClock


def _save(run: _Run, step: int, consumed: int) -> dict | None:
    """Every rank calls it (FSDP gathers the full state collectively); the main rank writes the checkpoint and gets
    the objective's full state dict back."""
    states = fsdp.gathered_states(run.objective, run.optimizer, run.sharded, run.world)
    if states is None:
        return None
    model_state, optim_state = states
    checkpoint.save(run.ckpt_dir, step, {"model": model_state, "optimizer": optim_state,
                                         "scaler": scaler_state(run.scaler), "batches": consumed,
                                         "config": run.cfg.model_dump(mode="json"),
                                         "data_digest": run.data_digest, "recipe": recipe.PRETRAIN,
                                         "ranks": run.world.size, "metrics_csv": run.log.text(),
                                         "seconds": run.clock.seconds()},
                    keep=run.cfg.checkpoint.keep)
    return model_state


def _finish(run: _Run, step: int, consumed: int, collapsed: bool = False) -> dict:
    cfg, out_dir = run.cfg, run.out_dir
    summary = {"modality": cfg.modality, "preset": cfg.preset, "objective": cfg.objective, "step": step,
               "steps": cfg.steps, "collapsed": collapsed, "seconds": round(run.clock.seconds(), 1),
               "teacher_init_share": init_share(run.objective.ema.cfg, step), "data_digest": run.data_digest}
    model_state = None
    if step >= cfg.steps or collapsed:
        model_state = _save(run, step, consumed)
    if run.world.is_main:
        if step >= cfg.steps:  # the student and teacher out of the objective's (full) state dict
            student, teacher = ({k[len(p):]: v for k, v in model_state.items() if k.startswith(p)}
                                for p in ("student.", "ema.model."))
            predictor = {k: v for k, v in model_state.items() if not k.startswith(("student.", "ema."))}
            save_encoder(out_dir, cfg, student, teacher, step, encoder_cfg=run.objective.student.cfg,
                         predictor=predictor)
        df = run.log.frame()
        if not df.empty:
            shown = ("loss", "target_var", "pred_var", "target_rank", "local_rank")
            summary["first"] = {k: float(df[k].iloc[0]) for k in shown if k in df}
            summary["last"] = {k: float(df[k].iloc[-1]) for k in (*shown, "samples_per_s") if k in df}
            plot_curves(df, out_dir / "curves.png", CURVES, f"data2vec pretraining: {cfg.modality}")
        atomic_write_json(out_dir / "summary.json", summary)
        atomic_write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
        recipe.stamp(out_dir, "pretrain")
    return summary


def _encoder_switch(cfg: PretrainConfig, key: str, apply) -> None:
    """Turn on an encoder-specific switch; an encoder without it is a config error naming the key."""
    try:
        apply()
    except NotImplementedError as err:
        raise ValueError(f"pretrain.{cfg.modality}.{key}: {err}") from None


def build_objective(cfg: PretrainConfig) -> Data2Vec:
    from d2v.modalities.registry import build_modality, make_objective

    torch.manual_seed(cfg.seed)
    modality, objective_cfg = build_modality(cfg.modality, cfg.preset, cfg.objective)
    if cfg.ema is not None:
        objective_cfg = objective_cfg.model_copy(update={"ema": cfg.ema})
    if cfg.clones is not None:
        if objective_cfg.v2 is None:
            raise ValueError(f"pretrain.{cfg.modality}.clones: only data2vec 2.0 has clones (set objective: v2)")
        objective_cfg = objective_cfg.model_copy(update={"v2": objective_cfg.v2.model_copy(
            update={"clones": cfg.clones})})
    encoder_cfg = modality.encoder.cfg
    if cfg.top_k is not None:
        if cfg.top_k > encoder_cfg.depth:
            raise ValueError(f"pretrain.{cfg.modality}.top_k: {cfg.top_k} layers asked for, the {cfg.preset} encoder "
                             f"has {encoder_cfg.depth}")
        objective_cfg = objective_cfg.model_copy(update={"top_k": cfg.top_k})
    if cfg.center_targets is not None:
        objective_cfg = objective_cfg.model_copy(update={"center_targets": cfg.center_targets})
    if cfg.local_grad_mult is not None:
        _encoder_switch(cfg, "local_grad_mult", lambda: modality.encoder.scale_front_end_grad(cfg.local_grad_mult))
    if cfg.freeze_local_encoder:
        _encoder_switch(cfg, "freeze_local_encoder", modality.encoder.freeze_local_encoder)
    if cfg.text_mask is not None:
        if cfg.modality != "text" or objective_cfg.v2 is not None:
            raise ValueError(f"pretrain.{cfg.modality}.text_mask: only data2vec 1.0 text masks tokens this way "
                             "(v2 masks come from its recipe)")
        modality.mask_cfg = cfg.text_mask
    if cfg.modality == "image" and cfg.data.image is not None:
        from d2v.modalities.image import require_image_shape

        require_image_shape(cfg.data.image.channels, cfg.data.image.size, encoder_cfg,
                            f"pretrain.data.image ({cfg.preset})")
    return make_objective(modality, objective_cfg)


def check_text_vocabulary(cfg: PretrainConfig, objective: Data2Vec, tokenizer: str | Path | None) -> None:
    if cfg.modality != "text" or tokenizer is None:
        return
    from d2v.data.tokenizer import TextTokenizer
    from d2v.modalities.text import require_vocabulary

    require_vocabulary(TextTokenizer(tokenizer).vocab_size, objective.student.cfg, str(tokenizer),
                       f"pretrain.{cfg.modality} ({cfg.preset})")


def pretrain_main(cfg: PretrainConfig, out_dir: str | Path, tokenizer: str | Path | None = None,
                  progress: bool = True, restart_on_change: bool = False) -> dict:
    world = init(cfg.device, "pretrain.device")
    try:
        data_digest = checkpoint.shards_digest(cfg.data.shards)
        # before the model is built (minutes for ViT-H on CPU); run_pretrain asks again, for its direct callers
        if (done := checkpoint.finished_run(Path(out_dir), cfg, "pretrain", RESUMABLE_ACROSS, data_digest,
                                            restart_on_change, world)) is not None:
            return done
        objective = build_objective(cfg)
        check_text_vocabulary(cfg, objective, tokenizer)
        index_first(cfg.data.shards, cfg.stream_resume, world)
        stream = pretrain_stream(cfg.modality, cfg.data, cfg.seed, cfg.stream_resume)
        return run_pretrain(cfg, objective, stream, out_dir, world, progress=progress,
                            restart_on_change=restart_on_change, data_digest=data_digest)
    finally:
        shutdown()
