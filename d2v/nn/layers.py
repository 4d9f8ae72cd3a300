"""Small reusable layers: FFN, stochastic depth, relative position bias."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bert_init(*modules: nn.Module) -> None:
    """BERT-style init: every Linear gets N(0, 0.02) weights and zero bias."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def scale_grad(x: Tensor, mult: float) -> Tensor:
    """x in the forward pass; `mult` times its gradient in the backward pass (fairseq's GradMultiply)."""
    return x if mult == 1.0 else x * mult + x.detach() * (1.0 - mult)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2. The fc2 output is what data2vec taps as the 'FFN output'."""

    def __init__(self, dim: int, hidden: int, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training.

    A compiled block reads its keep rate from a tensor: Dynamo takes a float attribute for a constant, so the blocks
    of a stochastic-depth stack (each its own rate) would each compile a graph of their own, and a ViT-B's twelve
    pass Dynamo's recompile limit of 8 (a hard failure under `fullgraph`). Eager runs keep the float."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.active = p > 0.0  # a bool: at most two compiled variants (rate 0 and the rest)
        self.register_buffer("keep", torch.tensor(1.0 - p), persistent=False)  # not in checkpoints

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or not self.training:
            return x
        keep = self.keep if torch.compiler.is_compiling() else 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RelativePositionBias(nn.Module):
    """BEiT relative position bias for a [CLS] + (h x w) patch sequence.

    The table has (2h-1)(2w-1) + 3 rows: every 2-D offset plus cls->token, token->cls and cls->cls.
    The index is a non-persistent buffer rebuilt from the grid, so checkpoints never need to carry it.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.num_distances = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, num_heads))
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> Tensor:
        n = self.index.shape[0]
        bias = self.table[self.index.reshape(-1)].reshape(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()  # (H, N+1, N+1)


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, hw)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (hw, hw, 2)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    num_rel = (2 * h - 1) * (2 * w - 1)
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel
    index[0:, 0] = num_rel + 1
    index[0, 0] = num_rel + 2
    return index


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / data2vec 2.0 images): (h·w, dim) in row-major patch order, the
    first half of the channels encoding the column, the second the row, each as [sin(pos·ω), cos(pos·ω)] with
    ω_k = 10000^(-k/(dim/4)). The order is MAE's `get_2d_sincos_pos_embed` (it meshgrids (w, h), so its "emb_h" half
    is the column), whose table fairseq's v2 image checkpoints store."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al.): a geometric series from 2^(-8/n) for a power-of-two n; otherwise the
    slopes of the nearest lower power of two plus every other slope of the next one."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes)


def alibi_bias(slopes: Tensor, positions: Tensor, scale: Tensor | None = None) -> Tensor:
    """Symmetric ALiBi bias −|p_i − p_j|·slope_h for token positions (B, T) in original units -> (B, H, T, T).
    `scale`: data2vec 2.0's learned per-head multiplier, clamped at 0 so that no head is pushed to distant tokens."""
    if scale is not None:
        slopes = slopes * scale.clamp_min(0)
    distance = (positions[:, None, :, None] - positions[:, None, None, :]).abs().to(slopes.dtype)
    return -distance * slopes[None, :, None, None]
