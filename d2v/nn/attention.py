"""Multi-head self-attention over `scaled_dot_product_attention`.

One fused `qkv` projection (fast, one matmul) with separately stored biases, so that every checkpoint layout maps
onto it: BEiT/data2vec-vision (q and v bias, no k bias), wav2vec2/RoBERTa (all three), or none.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QKVBias = Literal["qkv", "qv", "none"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: QKVBias = "qkv", attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias != "none" else None
        self.k_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias == "qkv" else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias != "none" else None
        self.proj = nn.Linear(dim, dim)

    def _qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return None
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.q_bias)
        return torch.cat([self.q_bias, k_bias, self.v_bias])

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D); attn_bias: additive (H, T, T) or (B, H, T, T); padding_mask: (B, T), True = padded key."""
        B, T, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = _additive_mask(attn_bias, padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


def _additive_mask(attn_bias: Tensor | None, padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Combine a relative-position bias and a key-padding mask into one additive SDPA mask."""
    mask = None if attn_bias is None else attn_bias.to(dtype)
    if padding_mask is not None:
        pad = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
        pad = pad.masked_fill(padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        mask = pad if mask is None else mask + pad
    return mask
