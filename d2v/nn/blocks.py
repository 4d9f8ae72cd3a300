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
    on both branches, inside the norms, is data2vec 2.0's (`AltBlock`), which fine-tunes images with it.
    `residual_scale` α > 1 is DeepNorm's LN(α·x + f(x)) (see `deepnorm_constants`)."""

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
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.residual_scale = residual_scale
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, ffn_dim, activation_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, padding_mask: Tensor | None = None):
        x = self.norm1(self._scaled(x) + self.drop_path(self.dropout(self.attn(x, attn_bias, padding_mask))))
        ffn = self.mlp(x)
        x = self.norm2(self._scaled(x) + self.drop_path(self.dropout(ffn)))
        return x, ffn

    def _scaled(self, x: Tensor) -> Tensor:
        return x if self.residual_scale == 1.0 else x * self.residual_scale


def deepnorm_constants(depth: int) -> tuple[float, float]:
    """DeepNet's encoder-only constants for `depth` post-LN blocks: residual scale α = (2N)^¼ and init gain
    β = (8N)^-¼. The encoder layer that data2vec's AudioSet config selects (`self_attn_norm_type/final_norm_type:
    deepnorm`, spec §2.1) hard-codes them by width: 24^¼ and 96^-¼ for 768 (N = 12), 48^¼ and 192^-¼ for 1024
    (N = 24), which are these at those depths."""
    if depth < 1:
        raise ValueError(f"depth: expected at least 1 block, got {depth}")
    return (2 * depth) ** 0.25, (8 * depth) ** -0.25


def deepnorm_init(blocks: nn.ModuleList, beta: float) -> None:
    """DeepNet's init of each block's weights: Xavier-normal with gain β for the value and output projections and
    both FFN layers, gain 1 for queries and keys (biases keep their init). The fused qkv weight is three D×D
    matrices, each initialised as its own projection."""
    for block in blocks:
        dim = block.attn.proj.in_features
        q, k, v = block.attn.qkv.weight.data.split(dim)
        for weight, gain in ((q, 1.0), (k, 1.0), (v, beta), (block.attn.proj.weight.data, beta),
                             (block.mlp.fc1.weight.data, beta), (block.mlp.fc2.weight.data, beta)):
            nn.init.xavier_normal_(weight, gain=gain)


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
    residual_scale: float = 1.0,
) -> nn.Module:
    """Pre-LN (with optional LayerScale) or post-LN block (with optional DeepNorm residual scale), chosen by config;
    both take drop-path."""
    if norm_first and residual_scale != 1.0:
        raise ValueError("a DeepNorm residual scale is only implemented for post-LN blocks (norm_first=False)")
    if norm_first:
        return PreLNBlock(dim, num_heads, ffn_dim, qkv_bias, layer_scale_init, drop_path, dropout, attn_dropout, eps,
                          activation_dropout)
    if layer_scale_init is not None:
        raise ValueError("LayerScale is only implemented for pre-LN blocks (norm_first=True)")
    return PostLNBlock(dim, num_heads, ffn_dim, qkv_bias, dropout, attn_dropout, activation_dropout, eps, drop_path,
                       residual_scale)
