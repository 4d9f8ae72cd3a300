"""Image plug-in: the BEiT-style ViT used by data2vec vision, BEiT block masking, and presets (spec §2.2, §5.2)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from d2v.config import (CollapseConfig, DecoderConfig, EMAConfig, LossConfig, ObjectiveConfig, StrictModel, V2Config,
                        V2MaskConfig)
from d2v.modalities.base import (Batch, Embedded, Encoder, EncoderOutput, Modality, Views, from_host, gather_tokens,
                                 host_positions, replace_masked, run_blocks, visible_indices)
from d2v.modalities.masks_v2 import block_masks
from d2v.nn import RelativePositionBias, bert_init, make_block
from d2v.nn.layers import sincos_2d


class ImageEncoderConfig(StrictModel):
    img_size: int = Field(224, ge=1)
    patch_size: int = Field(16, ge=1)
    in_chans: int = Field(3, ge=1)
    dim: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    ffn_dim: int = Field(3072, ge=1)
    norm_first: bool = True  # pre-LN blocks (BEiT); False = post-LN
    layer_scale_init: float | None = 1e-4  # BEiT LayerScale: 1e-4 (B), 1e-5 (L); None disables
    rel_pos: Literal["shared", "per_layer", "none"] = "shared"
    abs_pos: bool = False  # learned absolute positions
    sincos_pos: bool = False  # fixed 2-D sin-cos positions on the patches (data2vec 2.0)
    input_norm: bool = False  # LayerNorm on [CLS] + patches before the blocks (data2vec 2.0 prenet LN)
    pooling: Literal["final_ln", "mean_ln", "none"] = "final_ln"  # pretrained | fine-tuned layout | no final LN
    # beit: trunc N(0, 0.02) Linear and tokens, blocks' output projections scaled by 1/sqrt(2·layer); data2vec2
    # (spec §8.2, §8.4): BERT's N(0, 0.02) Linear, a Xavier-uniform patch embedding, the [CLS] token N(0, 1)
    init: Literal["beit", "data2vec2"] = "beit"
    eps: float = Field(1e-6, gt=0)
    drop_path: float = Field(0.25, ge=0, lt=1)
    attn_dropout: float = Field(0.05, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def grid(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)


IMAGE_PRESETS = {
    "base": ImageEncoderConfig(),
    "large": ImageEncoderConfig(
        dim=1024, depth=24, num_heads=16, ffn_dim=4096, layer_scale_init=1e-5, drop_path=0.2, attn_dropout=0.15
    ),
    # ViT-H/14 (spec §8.5, huge_images14_only_task): data2vec 2.0 only; 16 x 16 patches of 14 pixels
    "huge": ImageEncoderConfig(patch_size=14, dim=1280, depth=32, num_heads=16, ffn_dim=5120, drop_path=0.0,
                               attn_dropout=0.0),
    # Small presets add learned absolute positions: the relative-position table starts at zero, so without them a
    # fresh model is permutation-invariant and every masked token looks the same until the table has learned —
    # fine over 800 epochs, fatal in a few-minute CPU run (predictions stay constant, pred_var -> 0).
    # embedded: Fashion-MNIST 28x28 resized to 32x32, 4x4 patches -> 8x8 grid
    "embedded": ImageEncoderConfig(
        img_size=32, patch_size=4, in_chans=1, dim=192, depth=6, num_heads=3, ffn_dim=768, layer_scale_init=0.1,
        abs_pos=True, drop_path=0.1, attn_dropout=0.0,
    ),
    "tiny": ImageEncoderConfig(
        img_size=32, patch_size=4, in_chans=1, dim=64, depth=4, num_heads=4, ffn_dim=128, layer_scale_init=0.1,
        abs_pos=True, drop_path=0.0, attn_dropout=0.0,
    ),
}


def require_image_shape(channels: int, size: int, cfg: ImageEncoderConfig, where: str) -> None:
    """The loader's images must be what the patch embedding and the position grid were built for."""
    if (channels, size) != (cfg.in_chans, cfg.img_size):
        raise ValueError(f"{where}: channels/size {channels}/{size} do not match the encoder's "
                         f"{cfg.in_chans}/{cfg.img_size}")


def v2_encoder(cfg: ImageEncoderConfig, size: str = "base") -> ImageEncoderConfig:
    """The data2vec 2.0 image encoder of the same size (spec §8.2, §8.4): post-LN blocks, fixed sin-cos positions,
    input LayerNorm, no relative position bias, LayerScale, final LN or dropout; norm eps 1e-6; its own init. Base,
    Large and Huge differ only in size."""
    return cfg.model_copy(update=dict(norm_first=False, layer_scale_init=None, rel_pos="none", abs_pos=False,
                                      sincos_pos=True, input_norm=True, pooling="none", drop_path=0.0,
                                      attn_dropout=0.0, dropout=0.0, eps=1e-6, init="data2vec2"))


class ImageEncoder(Encoder):
    num_extra_tokens = 1  # [CLS]

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.dim, cfg.grid
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, D)) if cfg.abs_pos else None
        if cfg.sincos_pos:  # fixed: rebuilt from the grid, never trained nor saved
            self.register_buffer("sincos", sincos_2d(D, grid).unsqueeze(0), persistent=False)
        else:
            self.sincos = None
        self.input_norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.input_norm else None
        self.rel_pos_bias = RelativePositionBias(grid, cfg.num_heads) if cfg.rel_pos == "shared" else None
        drop_rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            make_block(cfg.norm_first, D, cfg.num_heads, cfg.ffn_dim, "qv", cfg.eps, cfg.dropout, cfg.attn_dropout,
                       layer_scale_init=cfg.layer_scale_init, drop_path=dp)
            for dp in drop_rates
        )
        if cfg.rel_pos == "per_layer":
            for block in self.blocks:
                block.rel_pos_bias = RelativePositionBias(grid, cfg.num_heads)
        self.norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.pooling == "final_ln" else None
        self.fc_norm = nn.LayerNorm(D, eps=cfg.eps) if cfg.pooling == "mean_ln" else None
        self._init_weights()

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def num_patches(self) -> int:
        return self.cfg.grid[0] * self.cfg.grid[1]

    def _init_weights(self) -> None:
        if self.cfg.init == "data2vec2":
            bert_init(self)
            w = self.patch_embed.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token)  # init_extra_token_zero: false
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for layer_id, block in enumerate(self.blocks, start=1):  # BEiT fix_init_weight
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))

    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> Embedded:
        if source.ndim != 4 or source.shape[1] != self.cfg.in_chans or source.shape[-1] != self.cfg.img_size:
            raise ValueError(
                f"expected images (B, {self.cfg.in_chans}, {self.cfg.img_size}, {self.cfg.img_size}), "
                f"got {tuple(source.shape)}"
            )
        return Embedded(self.patch_embed(source).flatten(2).transpose(1, 2))

    def encode(self, embedded: Embedded, mask: Tensor | None = None) -> EncoderOutput:
        x = self.add_patch_positions(replace_masked(embedded.tokens, mask, self.mask_token))
        return self._transformer(x, self.block_biases())

    def encode_visible(self, embedded: Embedded, mask: Tensor, keep: Tensor | None = None) -> EncoderOutput:
        if self.rel_pos_bias is not None or self.cfg.rel_pos != "none":
            raise ValueError("data2vec 2.0 drops masked patches, which needs an image encoder without relative "
                             "position bias (rel_pos='none'); use the v2 architecture (objective v2)")
        keep = visible_indices(mask) if keep is None else keep
        x = gather_tokens(self.add_patch_positions(embedded.tokens), keep)
        return replace(self._transformer(x, [None] * len(self.blocks)), positions=keep)

    def add_patch_positions(self, patches: Tensor) -> Tensor:
        if self.pos_embed is not None:
            patches = patches + self.pos_embed[:, 1:]
        if self.sincos is not None:
            patches = patches + self.sincos.to(patches.dtype)
        return patches

    def block_biases(self) -> list[Tensor | None]:
        if self.rel_pos_bias is not None:
            return [self.rel_pos_bias()] * len(self.blocks)
        return [b.rel_pos_bias() if hasattr(b, "rel_pos_bias") else None for b in self.blocks]

    def _transformer(self, patches: Tensor, biases: list[Tensor | None]) -> EncoderOutput:
        """[CLS] (+ its position) in front of the patches, optional input LN, the blocks, then the pooling norm."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, :1]
        x = torch.cat([cls, patches], dim=1)
        if self.input_norm is not None:
            x = self.input_norm(x)
        x, hidden, ffn = run_blocks(self.blocks, x, None, biases)
        pooled = None
        if self.norm is not None:
            x = self.norm(x)
        elif self.fc_norm is not None:
            pooled = self.fc_norm(x[:, 1:].mean(1))
        return EncoderOutput(x, hidden, ffn, num_extra_tokens=1, pooled=pooled)


class BlockMaskConfig(StrictModel):
    """BEiT block masking (spec §5.2): 120 of 196 patches for ViT-B at 224 px."""

    num_mask_patches: int = Field(120, ge=1)
    min_patches: int = Field(16, ge=1)
    max_patches: int | None = None  # None = the whole grid
    min_aspect: float = Field(0.3, gt=0, le=1)


def block_mask(
    grid: tuple[int, int], cfg: BlockMaskConfig, rng: np.random.Generator, blocks: list | None = None
) -> np.ndarray:
    """One BEiT block mask (H, W) bool. If `blocks` is a list, accepted rectangles (top, left, h, w) are appended."""
    height, width = grid
    max_patches = cfg.max_patches or height * width
    log_aspect = (math.log(cfg.min_aspect), math.log(1 / cfg.min_aspect))
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < cfg.num_mask_patches:
        budget = min(cfg.num_mask_patches - count, max_patches)
        delta = 0
        for _ in range(10):
            # Python's random.uniform(a, b) as in BEiT: also defined when budget < min_patches
            area = cfg.min_patches + (budget - cfg.min_patches) * rng.random()
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                new = h * w - mask[top : top + h, left : left + w].sum()
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    delta = int(new)
                    if blocks is not None:
                        blocks.append((int(top), int(left), h, w))
                    break
        if delta == 0:
            break
        count += delta
    return mask


def image_objective(steps_hint: int = 5000) -> ObjectiveConfig:
    """data2vec_vision recipe (spec §15): block taps, per-layer LN + final LN, K=6, constant τ=0.9998, SmoothL1 β=2."""
    return ObjectiveConfig(
        top_k=6, target_tap="block", layer_norm_targets="layer", final_norm="layer", head="linear",
        loss=LossConfig(kind="smooth_l1", beta=2.0, reduction="mean", scale=1.0),
        ema=EMAConfig.constant(0.9998),
        collapse=CollapseConfig(warmup_steps=steps_hint),
    )


def image_objective_v2(dim: int, steps_hint: int = 5000, size: str = "base") -> ObjectiveConfig:
    """data2vec 2.0 base_images_only_task (spec §8.5): FFN taps of all main blocks, IN per layer -> average -> LN,
    L2/√D, 16 inverse-block clones keeping 20 %, 6-layer 2-D decoder (k 3, 16 groups), [CLS] loss 0.01, τ 0.9998 ->
    0.99999 over 100k, own EMA patch embedding, guard off (the released image configs disable it).
    large_images_only_task: clones keep 25 % (adjust 0.1), a 3-layer decoder of kernel 5, τ over 150k.
    huge_images14_only_task: Large's masks and decoder, the decoder 1024 wide (narrower than the encoder), τ 0.9998 ->
    1 over 300k."""
    big = size in ("large", "huge")
    mask = V2MaskConfig(prob=0.75, length=3, adjust=0.1, inverse=True) if big else \
        V2MaskConfig(prob=0.8, length=3, adjust=0.07, inverse=True)
    ema = {"base": EMAConfig(tau_start=0.9998, tau_end=0.99999, tau_steps=100_000),
           "large": EMAConfig(tau_start=0.9998, tau_end=0.99999, tau_steps=150_000),
           "huge": EMAConfig(tau_start=0.9998, tau_end=1.0, tau_steps=300_000)}[size]
    decoder_dim = 1024 if size == "huge" else dim
    return ObjectiveConfig(
        top_k=10, target_tap="ffn", layer_norm_targets="instance", final_norm="layer",
        loss=LossConfig(kind="l2", reduction="sum_over_dim", scale="inv_sqrt_dim"),
        ema=ema,
        collapse=CollapseConfig(min_target_var=0.0, min_pred_var=0.0, warmup_steps=steps_hint),
        v2=V2Config(clones=16, mask=mask, cls_loss=0.01,
                    decoder=DecoderConfig(dim=decoder_dim, kernel=5 if big else 3,
                                          groups=16 if decoder_dim % 16 == 0 else 1, layers=3 if big else 6)),
    )


class ImageModality(Modality):
    name = "image"

    def __init__(self, encoder: ImageEncoder, mask: BlockMaskConfig) -> None:
        self.encoder, self.mask_cfg = encoder, mask

    def make_views(self, batch: Batch, rng: np.random.Generator) -> Views:
        images = batch.source
        grid = self.encoder.cfg.grid
        masks = np.stack([block_mask(grid, self.mask_cfg, rng).reshape(-1) for _ in range(images.shape[0])])
        mask = from_host(torch.from_numpy(masks), images.device)
        return Views(images, images, None, token_mask=mask, loss_mask=mask,
                     loss_positions=host_positions(masks, images.device))

    def v2_masks(self, batch: Batch, cfg: V2MaskConfig, clones: int, rng: np.random.Generator) -> Tensor:
        masks = block_masks(batch.source.shape[0] * clones, self.encoder.cfg.grid, cfg, rng)
        return torch.from_numpy(masks)
