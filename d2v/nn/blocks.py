"""Transformer blocks. Each returns (block output, FFN output before residual) — the two data2vec target taps."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v.nn.attention import Attention, QKVBias
from d2v.nn.layers import DropPath, Mlp


class PreLNBlock(nn.Module):
    """BEiT/ViT block: x + LS1*Attn(LN(x)), then + LS2*FFN(LN(.)), with optional LayerScale and drop-path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        qkv_bias: QKVBias = "qv",
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        eps: float = 1e-6,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, ffn_dim, activation_dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        if layer_scale_init is None:
            self.gamma_1 = self.gamma_2 = None
        else:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, padding_mask: Tensor | None = None):
        a = self.dropout(self.attn(self.norm1(x), attn_bias, padding_mask))
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        ffn = self.mlp(self.norm2(x))
        h = self.dropout(ffn)
        x = x + self.drop_path(h if self.gamma_2 is None else self.gamma_2 * h)
        return x, ffn


class PostLNBlock(nn.Module):
    """wav2vec2/RoBERTa block: LN(x + Attn(x)), then LN(. + FFN(.)). LayerDrop is handled by the encoder; drop-path
    on both branches, inside the norms, is data2vec 2.0's (`AltBlock`), which fine-tunes images with it."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        qkv_bias: QKVBias = "qkv",
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        eps: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, ffn_dim, activation_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, padding_mask: Tensor | None = None):
        x = self.norm1(x + self.drop_path(self.dropout(self.attn(x, attn_bias, padding_mask))))
        ffn = self.mlp(x)
        x = self.norm2(x + self.drop_path(self.dropout(ffn)))
        return x, ffn


def make_block(
    norm_first: bool,
    dim: int,
    num_heads: int,
    ffn_dim: int,
    qkv_bias: QKVBias,
    eps: float,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    activation_dropout: float = 0.0,
    layer_scale_init: float | None = None,
    drop_path: float = 0.0,
) -> nn.Module:
    """Pre-LN (with optional LayerScale) or post-LN block, chosen by config; both take drop-path."""
    if norm_first:
        return PreLNBlock(dim, num_heads, ffn_dim, qkv_bias, layer_scale_init, drop_path, dropout, attn_dropout, eps,
                          activation_dropout)
    if layer_scale_init is not None:
        raise ValueError("LayerScale is only implemented for pre-LN blocks (norm_first=True)")
    return PostLNBlock(dim, num_heads, ffn_dim, qkv_bias, dropout, attn_dropout, activation_dropout, eps, drop_path)
