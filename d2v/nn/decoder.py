"""data2vec 2.0 convolutional decoder (spec §8.2): 1-D over a sequence, 2-D over an image's patch grid.

Each layer is Conv(k, groups, 'same' padding) -> LayerNorm without affine -> GELU; a residual is added when the
input and output widths match. A projection (one Linear, or Linear(d, 2d) -> GELU -> Linear) maps back to the
encoder width. Layers keep PyTorch's default init, as fairseq's `reset_parameters` does for the decoder.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import DecoderConfig


class ConvDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, out_dim: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.cfg, self.grid = cfg, grid
        conv = nn.Conv1d if grid is None else nn.Conv2d
        self.convs = nn.ModuleList(
            conv(out_dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups)
            for i in range(cfg.layers)
        )
        if cfg.projection_layers == 1:
            self.proj = nn.Linear(cfg.dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) with T = the full token count (grid cells for 2-D) -> predictions (B, T, D)."""
        B, T, D = x.shape
        h = self._to_channels_first(x)
        for conv in self.convs:
            out = conv(h)
            out = F.gelu(F.layer_norm(out.movedim(1, -1), (out.shape[1],)).movedim(-1, 1))
            h = out + h if self.cfg.residual and out.shape == h.shape else out
        return self.proj(h.flatten(2).transpose(1, 2))

    def _to_channels_first(self, x: Tensor) -> Tensor:
        if self.grid is None:
            return x.transpose(1, 2)
        height, width = self.grid
        if x.shape[1] != height * width:
            raise ValueError(f"2-D decoder expects {height}x{width}={height * width} tokens, got {x.shape[1]}")
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
