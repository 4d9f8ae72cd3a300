"""EMA teacher: fp32 shadow copy of the student, τ schedule, shared parameters copied instead of averaged."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from d2v.config import EMAConfig


def ema_decay(cfg: EMAConfig, num_updates: int) -> float:
    """fairseq `get_annealed_rate`: linear from tau_start to tau_end over tau_steps updates, then tau_end."""
    if num_updates >= cfg.tau_steps:
        return cfg.tau_end
    return cfg.tau_end - (cfg.tau_end - cfg.tau_start) * (1 - num_updates / cfg.tau_steps)


def init_share(cfg: EMAConfig, num_updates: int) -> float:
    """The weight the teacher's averaged parameters still give their starting values after `num_updates` EMA steps:
    the product of the τs. Near 1, the targets come from a barely trained network; the papers' schedules (τ 0.999
    and up over 30k+ of 400k+ updates) take it to 0, short embedded runs may not."""
    ramp = [ema_decay(cfg, n) for n in range(1, min(num_updates, cfg.tau_steps - 1) + 1)]  # the linear part
    flat = num_updates - len(ramp)  # updates at tau_end
    if min(ramp, default=1.0) <= 0.0 or (flat and cfg.tau_end <= 0.0):
        return 0.0
    return math.exp(math.fsum(map(math.log, ramp)) + flat * math.log(cfg.tau_end))


class EMATeacher(nn.Module):
    """Holds the teacher. Its parameters are the fp32 shadow; they never require grad and stay in eval mode.

    `shared_prefixes` name student parameters that the teacher copies each step (spec §4). Once τ reaches 1 the
    averaged parameters freeze (as fairseq stops stepping); shared ones keep being copied, since they are shared.
    """

    def __init__(self, student: nn.Module, cfg: EMAConfig, shared_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared_prefixes = shared_prefixes
        self.model = copy.deepcopy(student).float().requires_grad_(False).eval()
        self.register_buffer("tau", torch.tensor(cfg.tau_start if cfg.tau_steps > 0 else cfg.tau_end,
                                                 dtype=torch.float64))

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()  # the teacher always runs without dropout, drop-path or LayerDrop
        return self

    def is_shared(self, name: str) -> bool:
        return name.startswith(self.shared_prefixes)  # False for an empty tuple

    @torch.no_grad()
    def step(self, student: nn.Module, num_updates: int) -> float:
        """Update after optimizer step number `num_updates` (1-based count of updates done so far)."""
        tau = ema_decay(self.cfg, num_updates)
        self.tau.fill_(tau)
        averaged_t, averaged_s = [], []
        student_params = dict(student.named_parameters())
        for name, p_t in self.model.named_parameters():
            p_s = student_params[name].detach()
            if self.is_shared(name):
                p_t.copy_(p_s)
            elif tau < 1.0:
                averaged_t.append(p_t)
                averaged_s.append(p_s.to(p_t.dtype))
        if averaged_t:  # Δ ← τΔ + (1 − τ)θ
            torch._foreach_mul_(averaged_t, tau)
            torch._foreach_add_(averaged_t, averaged_s, alpha=1.0 - tau)
        student_buffers = dict(persistent_buffers(student))
        for name, b_t in persistent_buffers(self.model):
            b_t.copy_(student_buffers[name])
        return tau


def persistent_buffers(module: nn.Module):
    """(name, buffer) of the buffers a state dict holds, which a teacher follows as fairseq's EMA does. Non-persistent
    ones (position tables, relative-position indices, drop-path rates) are built from the config and never change,
    so copying them each step would only launch kernels."""
    for prefix, mod in module.named_modules():
        for name, buffer in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buffer
