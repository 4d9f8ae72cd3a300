"""The data2vec 1.0 objective, modality-agnostic (spec §1, §3-§6, §14).

The student sees the masked view; the EMA teacher, in eval mode and without gradients, sees the full input. Targets
are the teacher's top-K layer taps, each normalised, averaged and optionally normalised again; the student regresses
them at the masked positions only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import CollapseConfig, LossConfig, ObjectiveConfig
from d2v.ema import EMATeacher
from d2v.modalities.base import Batch, EncoderOutput, Modality
from d2v.nn import bert_init

# ---------------------------------------------------------------- targets


def instance_norm_over_time(x: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise each channel over time, per sample, counting only valid (non-padded) steps. x: (B, T, D)."""
    if padding_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    mean = (x * valid).sum(1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * valid


def normalize(x: Tensor, kind: str, padding_mask: Tensor | None = None) -> Tensor:
    if kind == "layer":  # parameter-free LayerNorm over channels
        return F.layer_norm(x, x.shape[-1:])
    if kind == "instance":
        return instance_norm_over_time(x, padding_mask)
    return x


def build_targets(taps: list[Tensor], top_k: int, layer_norm: str, final_norm: str,
                  padding_mask: Tensor | None = None) -> Tensor:
    """Average of the top-K normalised taps (each (B, T, D)), computed in fp32."""
    if top_k > len(taps):
        raise ValueError(f"top_k={top_k} exceeds the number of layers ({len(taps)})")
    layers = [normalize(t.float(), layer_norm, padding_mask) for t in taps[-top_k:]]
    return normalize(sum(layers) / len(layers), final_norm, padding_mask)


def center_per_position(y: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Subtract, at each position, the mean target over the batch's valid rows. y: (B, T, D)."""
    if padding_mask is None:
        return y - y.mean(0, keepdim=True)
    valid = (~padding_mask).unsqueeze(-1).to(y.dtype)
    mean = (y * valid).sum(0, keepdim=True) / valid.sum(0, keepdim=True).clamp_min(1)
    return (y - mean) * valid


def teacher_taps(out: EncoderOutput, tap: str) -> list[Tensor]:
    """Per-layer taps without extra tokens: FFN outputs before the residual, or block outputs."""
    taps = out.ffn_outputs if tap == "ffn" else out.hidden_states[1:]
    if any(t is None for t in taps):
        raise RuntimeError("a teacher layer was skipped: the teacher must run in eval mode (no LayerDrop)")
    return [t[:, out.num_extra_tokens:] for t in taps]


# ---------------------------------------------------------------- loss


def regression_loss(pred: Tensor, target: Tensor, cfg: LossConfig) -> Tensor:
    """Loss per masked position (N, D) -> scalar, averaged over positions (spec §6)."""
    pred = pred.float()
    if cfg.kind == "l2":
        err = (pred - target) ** 2
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.beta)
    scale = 1.0 / math.sqrt(pred.shape[-1]) if cfg.scale == "inv_sqrt_dim" else cfg.scale
    if pred.shape[0] == 0:
        return err.sum() * 0.0
    per_position = err.sum(-1) if cfg.reduction == "sum_over_dim" else err.mean(-1)
    return per_position.mean() * scale


class RegressionHead(nn.Module):
    """Student head: Linear (speech, image) or Linear(D, 2D) -> GELU -> Linear(2D, D) (text)."""

    def __init__(self, dim: int, kind: str, bert: bool = True) -> None:
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim, dim)
        else:
            self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        if bert:  # else PyTorch's default Linear init
            bert_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------- collapse monitor


def representation_std(x: Tensor, all_ranks: bool = True) -> Tensor:
    """Mean over channels of the per-channel std of x (N, D), pooled over all ranks (fairseq `compute_var`) unless
    `all_ranks` is False (the training loop averages the per-rank values at log steps instead: no collective
    communication, no host sync per step). The row count stays a Python number when it is this rank's alone: a
    tensor made of it on a GPU is a copy from the host, which waits for the stream (three a step)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    n = float(x.shape[0])
    s, sq = x.sum(0), (x * x).sum(0)
    if all_ranks and dist.is_available() and dist.is_initialized():
        n = torch.tensor(n, device=x.device)  # summed over ranks with the sums
        for t in (n, s, sq):
            dist.all_reduce(t)
        denominator = (n - 1).clamp_min(1)
    else:
        denominator = max(n - 1, 1)
    var = (sq - s * s / n) / denominator
    return torch.sqrt(var.clamp_min(0) + 1e-6).mean()


def effective_rank(x: Tensor) -> Tensor:
    """Effective rank of the rows of x (N, D) (Roy & Vetterli 2007): exp of the entropy of the normalised eigenvalues
    of their covariance; 1 when they vary along one direction, D when isotropic. Per-channel normalisation (speech's
    instance-normed targets) keeps every channel's std near 1 however few directions the channels span, so
    `representation_std` cannot see a collapse onto a few dimensions; this can. One D x D eigendecomposition: the
    loop computes it at log steps only."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if not torch.isfinite(x).all():  # a diverged run (LAPACK fails on NaN): NaN, and the loss check names it
        return torch.tensor(float("nan"), device=x.device)
    x = x - x.mean(0)
    eig = torch.linalg.eigvalsh((x.T @ x).double()).clamp_min(0)
    p = eig / eig.sum().clamp_min(1e-300)
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).float()


class CollapseError(RuntimeError):
    pass


def check_collapse(cfg: CollapseConfig, step: int, metrics: dict[str, float]) -> None:
    """Raise once armed (step >= warmup_steps) if any monitored variance falls below its minimum."""
    if step < cfg.warmup_steps:
        return
    limits = {"target_var": cfg.min_target_var, "pred_var": cfg.min_pred_var, "local_var": cfg.min_local_var,
              "target_rank": cfg.min_target_rank}
    for signal, minimum in limits.items():
        if signal in metrics and metrics[signal] < minimum:
            raise CollapseError(
                f"representation collapse at step {step}: {signal}={metrics[signal]:.4g} < minimum {minimum} "
                f"(see spec §11 'Collapse': lower the LR, lengthen warm-up, or raise τ)"
            )


# ---------------------------------------------------------------- objective


@dataclass
class StepOutput:
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached 0-dim tensors, still on the device
    # detached (N, D) representations (targets, predictions, local features) for diagnostics too costly for every step
    probes: dict[str, Tensor] = field(default_factory=dict)

    def ranks(self) -> dict[str, Tensor]:
        """`{name}_rank`: the effective rank of each probe."""
        return {f"{name}_rank": effective_rank(x) for name, x in self.probes.items()}

    def scalars(self) -> dict[str, float]:
        """Metrics as Python floats, with a single device-to-host copy."""
        keys = list(self.metrics)
        return dict(zip(keys, torch.stack([self.metrics[k].float() for k in keys]).tolist()))


class Data2Vec(nn.Module):
    def __init__(self, modality: Modality, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.modality, self.cfg = modality, cfg
        self.student = modality.encoder
        self.head = self.build_head()
        self.ema = EMATeacher(self.student, cfg.ema, self.teacher_shared_prefixes())

    def build_head(self) -> nn.Module:
        return RegressionHead(self.student.dim, self.cfg.head, self.student.bert_init_head)

    def teacher_shared_prefixes(self) -> tuple[str, ...]:
        return self.student.teacher_shared_prefixes

    @property
    def teacher(self) -> nn.Module:
        return self.ema.model

    def student_parameters(self):
        return [p for p in (*self.student.parameters(), *self.head.parameters()) if p.requires_grad]

    def forward(self, batch: Batch, rng: np.random.Generator) -> StepOutput:
        views = self.modality.make_views(batch, rng)  # a fresh mask every time the batch is used
        s_emb = self.student.embed(views.student_source, views.padding_mask)
        s_out = self.student.encode(s_emb, views.token_mask)
        # shared CNN + projection (speech): the teacher reads the student's unmasked features
        t_emb = s_emb.detach() if self.student.teacher_reuses_local_features else None
        targets = self.teacher_targets(views.teacher_source, views.padding_mask, t_emb)

        x = s_out.x[:, s_out.num_extra_tokens:]
        at = views.loss_mask if views.loss_positions is None else views.loss_positions  # the same order either way
        pred = self.head(x[at])
        y = targets[at]
        loss = regression_loss(pred, y, self.cfg.loss)
        valid = s_emb.tokens if s_emb.padding_mask is None else s_emb.tokens[~s_emb.padding_mask]
        metrics = {  # tensors: nothing here waits for the device
            "loss": loss.detach(),
            "target_var": representation_std(y, all_ranks=False),
            "pred_var": representation_std(pred, all_ranks=False),
            "masked_frac": views.loss_mask.float().mean(),
            "local_var": representation_std(valid, all_ranks=False),
        }
        return StepOutput(loss, metrics, probes={"target": y, "pred": pred.detach(), "local": valid.detach()})

    @torch.no_grad()
    def teacher_targets(self, source: Tensor, padding_mask: Tensor | None, embedded=None) -> Tensor:
        """Teacher pass on the full, unmasked input (never a token mask), then target construction."""
        teacher = self.teacher
        teacher.eval()
        if embedded is None:
            embedded = teacher.embed(source, padding_mask)
        out = teacher.encode(embedded, None)
        y = build_targets(teacher_taps(out, self.cfg.target_tap), self.cfg.top_k, self.cfg.layer_norm_targets,
                          self.cfg.final_norm, out.padding_mask)
        return center_per_position(y, out.padding_mask) if self.cfg.center_targets == "position" else y

    def ema_step(self, num_updates: int) -> float:
        """Call after each optimizer step."""
        return self.ema.step(self.student, num_updates)

    def check_collapse(self, step: int, metrics: dict[str, float]) -> None:
        check_collapse(self.cfg.collapse, step, metrics)
