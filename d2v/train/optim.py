"""AdamW with decoupled weight decay (none on 1-D parameters), layer-wise LR decay, and the two LR schedules the
recipes use: cosine with linear warm-up (vision, text) and fairseq's tri-stage (speech fine-tuning); and the
divergence guard (fairseq's "gradients are Nan/Inf")."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class DivergenceError(RuntimeError):
    """The loss or the gradient norm is no longer finite: every update from there on writes NaN into the weights."""


MIN_LOSS_SCALE = 1e-4  # fairseq's min_loss_scale: an fp16 run whose scale falls below it has diverged
FP16_INIT_SCALE = 2.0 ** 7  # fairseq's fp16_init_scale (torch's GradScaler would start at 2^16)


def fp16_scaling(init_scale: float | None, window: int | None, ranks: int, accum_steps: int) -> dict:
    """GradScaler's arguments for fairseq's dynamic loss scaler: the first scale (`fp16_init_scale`, default 2^7)
    and the overflow-free updates after which it doubles (`fp16_scale_window`, default 2^14 / (ranks ·
    update_freq)); both halve on an overflow."""
    return {"init_scale": init_scale or FP16_INIT_SCALE,
            "growth_interval": window or max(1, int(2 ** 14 / ranks / accum_steps))}


def require_finite(step: int, metrics: dict[str, float], scaler: torch.amp.GradScaler | None = None,
                   min_loss_scale: float = MIN_LOSS_SCALE, keys: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    """Stop a run whose loss or gradient norm is NaN or infinite, before it writes a checkpoint of NaN weights. An
    fp16 run's scaler skips the steps that overflow and halves its scale instead; such a run has diverged when the
    scale falls below `min_loss_scale` (fairseq's rule): no scale makes its steps finite, and at a scale of zero it
    would step on zero gradients."""
    if scaler is None:
        bad = [f"{k}={metrics[k]}" for k in keys if k in metrics and not math.isfinite(metrics[k])]
    elif (scale := scaler.get_scale()) < min_loss_scale:
        bad = [f"fp16 loss scale={scale:.3g} < {min_loss_scale:g}"]
    else:
        bad = []
    if bad:
        raise DivergenceError(f"training diverged at step {step} ({', '.join(bad)}); no checkpoint is written from "
                              "here and the earlier ones are kept. Lower the LR, lengthen the warm-up or clip the "
                              "gradients (optim.clip_norm)")


def scaled_backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """The backward of `loss`, scaled first under fp16 (`scaler`): unscaled, small fp16 gradients underflow to 0."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], clip_norm: float | None,
                  scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Clip the gradients to `clip_norm` (None or 0: unclipped) and step; returns their norm before clipping, on the
    device. Under fp16 the gradients are unscaled first, and the scaler skips a step whose gradients overflowed (the
    norm is then infinite) and lowers its loss scale."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict | None:
    """fp16's loss scale for a checkpoint to carry (None without a scaler)."""
    return scaler.state_dict() if scaler is not None else None


def restore_scaler(scaler: torch.amp.GradScaler | None, saved: dict | None) -> None:
    """A checkpoint's loss scale back into `scaler`; a checkpoint without one (written before scalers were saved, or
    by a run without a scaler) leaves it at its initial scale."""
    if scaler is not None and saved:
        scaler.load_state_dict(saved)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.98), eps=1e-6):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, LayerScale, mask embeddings
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused_kernel(params))


def fused_kernel(params: Iterable[nn.Parameter]) -> bool | None:
    """AdamW's fused kernel where every parameter is a plain CUDA tensor; None (torch's default: foreach on CUDA)
    elsewhere. On an H200 the foreach step took 6.4 ms of a ViT-B update's 35 ms of kernel time
    (results/bench/update_profile_image_v1_b32_gpu.json); fused, each state is read and written once. CPU runs keep
    the default every stored CPU result used, and FSDP's sharded parameters (DTensors) too, untried fused."""
    params = list(params)
    return True if params and all(p.is_cuda and not isinstance(p, DTensor) for p in params) else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state under this run's kernel choice: the saved groups carry the saving run's
    `fused` and `foreach` flags, which `load_state_dict` would restore (a GPU run's fused kernel on a CPU resume)."""
    flags = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def layer_decay_groups(named: Iterable[tuple[str, nn.Parameter]], layer_of: Callable[[str], int], num_layers: int,
                       decay: float, weight_decay: float) -> list[dict]:
    """BEiT layer-wise LR decay: layer i (0 = embeddings, num_layers + 1 = head) gets lr · decay^(num_layers+1-i).
    Each group carries `lr_scale`, which the schedule multiplies in."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        layer, no_decay = layer_of(name), p.ndim < 2
        g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                  "lr_scale": decay ** (num_layers + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())


def cosine_with_warmup(step: int, total: int, warmup: int, final_scale: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0, then cosine to `final_scale`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_with_warmup(step: int, total: int, warmup: int, final_scale: float = 0.0) -> float:
    """fairseq `polynomial_decay` with power 1 (RoBERTa/GLUE fine-tuning): linear warm-up, then linear decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_scale + (1 - final_scale) * (1 - progress)


def tri_stage(step: int, total: int, phases: tuple[float, float, float] = (0.1, 0.4, 0.5),
              init_scale: float = 0.01, final_scale: float = 0.05) -> float:
    """fairseq `tri_stage`: linear warm-up from init_scale, hold at 1, exponential decay to final_scale; the phase
    fractions of `total` are the wav2vec 2.0 fine-tuning defaults."""
    warm, hold = int(phases[0] * total), int(phases[1] * total)
    decay = max(1, total - warm - hold)
    if step < warm:
        return init_scale + (1 - init_scale) * step / max(1, warm)
    if step < warm + hold:
        return 1.0
    progress = min(1.0, (step - warm - hold) / decay)
    return math.exp(math.log(final_scale) * progress)


def schedule_fn(kind: str, total: int, warmup: int, final_scale: float = 0.0,
                phases: tuple[float, float, float] = (0.1, 0.4, 0.5)) -> Callable[[int], float]:
    if kind == "cosine":
        return lambda s: cosine_with_warmup(s, total, warmup, final_scale)
    if kind == "linear":
        return lambda s: linear_with_warmup(s, total, warmup, final_scale)
    if kind == "tri_stage":
        return lambda s: tri_stage(s, total, phases, final_scale=max(final_scale, 1e-6))
    if kind == "constant":
        return lambda s: min(1.0, (s + 1) / max(1, warmup))
    raise ValueError(f"unknown schedule {kind!r}; expected cosine | linear | tri_stage | constant")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> float:
    """Apply base_lr · multiplier · group lr_scale to every group; returns the unscaled LR."""
    lr = base_lr * multiplier
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
