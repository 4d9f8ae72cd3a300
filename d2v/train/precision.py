"""Mixed precision for the training loops and evaluation: `auto` resolved per device, and the autocast context with
fp16's gradient scaler."""
from __future__ import annotations

import contextlib

import torch


def resolved_precision(device: torch.device, precision: str) -> str:
    """`auto` is bf16 on CUDA and fp32 on CPU, where low precision buys nothing on 2 cores."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str, scaling: dict | None = None):
    """The autocast context of `precision` (none for fp32) and, for fp16 on CUDA, its gradient scaler (`scaling`:
    GradScaler's arguments, `optim.fp16_scaling`). fp16 on CPU gets none: fp32 is CPU's default, and CPU fp16 runs
    have always stepped unscaled (torch disabled the CUDA scaler they were given), so a scaler there would change
    what such a run computes."""
    precision = resolved_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", **(scaling or {})) if precision == "fp16" and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype), scaler
