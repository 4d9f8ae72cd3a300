"""AdamW with decoupled weight decay (none on 1-D parameters) and a cosine-with-warm-up schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.98), eps=1e-6):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, LayerScale, mask embeddings
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_with_warmup(step: int, total: int, warmup: int, final_scale: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0, then cosine to `final_scale`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))
