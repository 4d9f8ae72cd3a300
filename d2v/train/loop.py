"""A compact pretraining loop: one optimizer step, then one EMA step, per update; collapse checked every step."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.optim.lr_scheduler import LambdaLR

from d2v.data2vec import Data2Vec
from d2v.modalities.base import Batch
from d2v.train.optim import adamw, clip_and_step, cosine_with_warmup, require_finite


def pretrain(
    objective: Data2Vec,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.01,
    clip_norm: float | None = None,
    seed: int = 0,
    progress=None,
) -> list[dict[str, float]]:
    """Run `steps` updates; returns one metrics dict per step. `progress(step, metrics)` is called after each."""
    params = objective.student_parameters()
    optimizer = adamw(params, lr, weight_decay)
    schedule = LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, warmup))
    objective.train()
    history = []
    for step in range(1, steps + 1):
        rng = np.random.default_rng([seed, step])  # masks are a function of (seed, step): reproducible, resumable
        out = objective(next(batches), rng)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = clip_and_step(optimizer, params, clip_norm)
        schedule.step()
        metrics = {**out.scalars(), "step": step, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
        metrics["tau"] = objective.ema_step(step)
        require_finite(step, metrics)
        objective.check_collapse(step, metrics)
        history.append(metrics)
        if progress is not None:
            progress(step, metrics)
    return history
