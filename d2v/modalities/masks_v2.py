"""data2vec 2.0 masks (spec §8.3), vectorised over rows. True = masked. Every row hides exactly the same count, so
the visible tokens of a batch form a dense tensor.

- `block_masks`: fairseq `compute_block_mask_1d/2d`. Draw ⌊T·(p + adjust)/lengthᵈ⌋ block centres with replacement,
  set the length^d block around each (clamped at the border), then switch random single cells off or on until
  exactly ⌊T·p⌋ are set. With `inverse`, p is the keep ratio 1 − prob and the drawn region is the visible one.
- `random_masks`: MAE/fairseq `random_masking` for text, keeping ⌊T·(1 − prob)⌋ tokens chosen by uniform noise.
"""
from __future__ import annotations

import numpy as np

from d2v.config import V2MaskConfig


def block_masks(rows: int, shape: tuple[int, ...], cfg: V2MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """(rows, prod(shape)) bool masks of 1-D (shape=(T,)) or 2-D (shape=(H, W)) blocks."""
    size = int(np.prod(shape))
    p = 1.0 - cfg.prob if cfg.inverse else cfg.prob
    num_centres = int(size * (p + cfg.adjust) / cfg.length ** len(shape))
    drawn = np.zeros((rows, *shape), dtype=bool)
    if num_centres > 0:
        centres = np.stack(np.unravel_index(rng.integers(0, size, (rows, num_centres)), shape), -1)  # (R, C, d)
        offsets = np.arange(cfg.length) - cfg.length // 2
        grids = np.stack(np.meshgrid(*[offsets] * len(shape), indexing="ij"), -1).reshape(-1, len(shape))
        cells = np.clip(centres[:, :, None, :] + grids[None, None], 0, np.array(shape) - 1)  # (R, C, b^d, d)
        row_idx = np.broadcast_to(np.arange(rows)[:, None, None], cells.shape[:3])
        drawn[(row_idx, *np.moveaxis(cells, -1, 0))] = True
    target = min(max(int(size * p), 1), size - 1)  # at least one cell of each kind
    drawn = exact_count(drawn.reshape(rows, size), target, rng)
    return ~drawn if cfg.inverse else drawn


def exact_count(marked: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Keep `target` marked cells per row: drop random marked cells when over, add random unmarked ones when under
    (each choice uniform, as fairseq's multinomial without replacement)."""
    priority = marked + rng.random(marked.shape)  # marked cells first, in random order, then unmarked ones
    top = np.argpartition(-priority, target - 1, axis=1)[:, :target]
    out = np.zeros_like(marked)
    np.put_along_axis(out, top, True, axis=1)
    return out


def random_masks(rows: int, length: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    """(rows, length) masks keeping ⌊length·(1 − prob)⌋ uniformly chosen tokens (at least one of each kind)."""
    keep = min(max(int(length * (1 - prob)), 1), length - 1)
    order = np.argsort(rng.random((rows, length)), axis=1)
    mask = np.ones((rows, length), dtype=bool)
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask
