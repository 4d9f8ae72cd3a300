"""Text plug-in: RoBERTa-style encoder used by data2vec text, dynamic token masking, presets (spec §2.3, §5.3)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from d2v.config import (CollapseConfig, DecoderConfig, EMAConfig, LossConfig, ObjectiveConfig, StrictModel,
                        TokenMaskConfig, V2Config, V2MaskConfig)
from d2v.modalities.base import (Batch, Embedded, Encoder, EncoderOutput, Modality, Views, from_host, gather_tokens,
                                 host_positions, require_unpadded, run_blocks, visible_indices)
from d2v.modalities.masks_v2 import block_masks, random_masks
from d2v.nn import bert_init, make_block
from d2v.nn.layers import alibi_bias, alibi_slopes


class TextEncoderConfig(StrictModel):
    vocab_size: int = Field(50265, ge=2)
    dim: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    ffn_dim: int = Field(3072, ge=1)
    norm_first: bool = False  # post-LN (RoBERTa); True = pre-LN with a final LayerNorm (fairseq normalize_before)
    max_positions: int = Field(512, ge=1)  # the table has max_positions + pad_idx + 1 rows
    pad_idx: int = Field(1, ge=0)
    eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    activation_dropout: float = Field(0.0, ge=0, lt=1)
    layerdrop: float = Field(0.0, ge=0, lt=1)
    # not in the text papers: a symmetric ALiBi bias (speech v2's, learned per-head scale) on top of the learned
    # positions, a locality prior for encoders too small or too briefly trained to learn it (docs/findings.md, text)
    alibi: bool = False


TEXT_PRESETS = {
    "base": TextEncoderConfig(),
    "large": TextEncoderConfig(dim=1024, depth=24, num_heads=16, ffn_dim=4096),
    "embedded": TextEncoderConfig(vocab_size=8000, dim=256, depth=4, num_heads=4, ffn_dim=1024, max_positions=128),
    "embedded-alibi": TextEncoderConfig(vocab_size=8000, dim=256, depth=4, num_heads=4, ffn_dim=1024,
                                        max_positions=128, alibi=True),
    # not in the papers: a quarter of the embedded width and half its depth, for the model-size question of issue 4
    # (docs/findings.md, text)
    "embedded-small": TextEncoderConfig(vocab_size=8000, dim=128, depth=2, num_heads=2, ffn_dim=512,
                                        max_positions=128),
    # not in the papers: 1.5 times the embedded width and depth (2.6 times its parameters), the other direction
    "embedded-large": TextEncoderConfig(vocab_size=8000, dim=384, depth=6, num_heads=6, ffn_dim=1536,
                                        max_positions=128),
    # not in the papers: the embedded size over smaller SentencePiece vocabularies (train the tokenizer with
    # `d2v tokenizer --vocab-size 1000`/`2000`), the vocabulary question of issue 4 (docs/findings.md, text)
    "embedded-vocab1k": TextEncoderConfig(vocab_size=1000, dim=256, depth=4, num_heads=4, ffn_dim=1024,
                                          max_positions=128),
    "embedded-vocab2k": TextEncoderConfig(vocab_size=2000, dim=256, depth=4, num_heads=4, ffn_dim=1024,
                                          max_positions=128),
    "tiny": TextEncoderConfig(vocab_size=64, dim=64, depth=3, num_heads=4, ffn_dim=128, max_positions=64,
                              dropout=0.0, attn_dropout=0.0),
}


def require_vocabulary(ids: int, cfg: TextEncoderConfig, tokenizer: str, where: str) -> None:
    """A text encoder embeds exactly its tokenizer's ids (pieces + <mask>): more ids would index past the table,
    fewer leave rows no input reaches (and a checkpoint sized for another tokenizer)."""
    if ids != cfg.vocab_size:
        raise ValueError(f"{where}: {tokenizer} makes {ids} ids (pieces + <mask>), the text encoder has vocab_size="
                         f"{cfg.vocab_size}; train the tokenizer with vocab_size {cfg.vocab_size} or pick the preset "
                         f"that has {ids}")


def make_positions(tokens: Tensor, pad_idx: int) -> Tensor:
    """fairseq/RoBERTa positions: real tokens count from pad_idx + 1, pads get pad_idx."""
    not_pad = tokens.ne(pad_idx).long()
    return torch.cumsum(not_pad, dim=1) * not_pad + pad_idx


class TextEncoder(Encoder):
    # token embeddings, positions and the embedding LayerNorm are copied to the teacher every step (spec §4)
    teacher_shared_prefixes = ("embed_tokens.", "embed_positions.", "embed_norm.")

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions + cfg.pad_idx + 1, cfg.dim, padding_idx=cfg.pad_idx)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            make_block(cfg.norm_first, cfg.dim, cfg.num_heads, cfg.ffn_dim, "qkv", cfg.eps, cfg.dropout,
                       cfg.attn_dropout, cfg.activation_dropout)
            for _ in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.norm_first else None
        if cfg.alibi:  # fixed slopes, learned per-head scale (init 1, clamped >= 0, no weight decay)
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_heads), persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(cfg.num_heads))
        bert_init(self.blocks)
        for emb in (self.embed_tokens, self.embed_positions):
            nn.init.normal_(emb.weight, std=0.02)
            emb.weight.data[cfg.pad_idx].zero_()

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None):
        """The encoder called by hand on token ids: without a padding mask, padding is where the pad ids are (a
        question to the device on a GPU; training calls `embed` with its loader's mask, decided on the host)."""
        if padding_mask is None:
            padding_mask = source.eq(self.cfg.pad_idx)
            padding_mask = padding_mask if padding_mask.any() else None
        return super().forward(source, padding_mask, mask)

    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> Embedded:
        if source.ndim != 2 or source.dtype not in (torch.long, torch.int):
            raise ValueError(f"expected token ids (B, T) of integer dtype, got {tuple(source.shape)} {source.dtype}")
        if source.shape[1] > self.cfg.max_positions:
            raise ValueError(f"sequence length {source.shape[1]} exceeds max_positions={self.cfg.max_positions}")
        x = self.embed_tokens(source) + self.embed_positions(make_positions(source, self.cfg.pad_idx))
        return Embedded(self.dropout(self.embed_norm(x)), self._padding(source, padding_mask))

    def _padding(self, source: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """The padding mask, never asked of the device (a sync a forward pass): the loaders give one only to a batch
        that holds padding (`pad_tokens`), so None means unpadded and a given mask is used as is. Ids on the host are
        checked, which costs nothing: pad ids without a mask are an error, and an all-False mask is dropped so that
        attention takes its unmasked path."""
        if source.device.type != "cpu":
            return padding_mask
        if padding_mask is None:
            if source.eq(self.cfg.pad_idx).any():
                raise ValueError(f"token ids hold the pad id {self.cfg.pad_idx} but no padding_mask was given (True = "
                                 "pad; d2v.data.loaders.pad_tokens builds both)")
            return None
        return padding_mask if padding_mask.any() else None

    def freeze_local_encoder(self) -> None:
        """Token and position embeddings and their LayerNorm stay random (like MoCo v3's frozen patch projection):
        near-orthogonal rows keep every piece distinguishable to the teacher."""
        for module in (self.embed_tokens, self.embed_positions, self.embed_norm):
            module.requires_grad_(False)

    def encode(self, embedded: Embedded, mask: Tensor | None = None) -> EncoderOutput:
        if mask is not None:
            raise ValueError("text is masked at the token level (TextModality.make_views), not with a mask embedding")
        return self._transformer(embedded.tokens, embedded.padding_mask)

    def encode_visible(self, embedded: Embedded, mask: Tensor, keep: Tensor | None = None) -> EncoderOutput:
        """The embeddings already carry their positions: dropping tokens is a gather (no <mask> token in v2)."""
        require_unpadded(embedded)
        keep = visible_indices(mask) if keep is None else keep
        return replace(self._transformer(gather_tokens(embedded.tokens, keep), None, keep), positions=keep)

    def _transformer(self, x: Tensor, pad: Tensor | None, positions: Tensor | None = None) -> EncoderOutput:
        """The blocks (ALiBi distances between the tokens' original positions, default 0..T-1) and the final LN of
        pre-LN stacks."""
        bias = None
        if self.cfg.alibi:
            if positions is None:  # one (1, H, T, T) bias that every row shares
                positions = torch.arange(x.shape[1], device=x.device)[None]
            bias = alibi_bias(self.alibi_slopes, positions, self.alibi_scale).to(x.dtype)
        x, hidden, ffn = run_blocks(self.blocks, x, pad, [bias] * len(self.blocks), self.cfg.layerdrop,
                                     self.layerdrop_generator)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, hidden, ffn, padding_mask=pad)


class Vocabulary(StrictModel):
    """Ids of the special tokens; ids below `num_special` are never masked nor drawn as random replacements."""

    size: int = Field(ge=5)
    bos: int = 0
    pad: int = 1
    eos: int = 2
    unk: int = 3
    mask: int = -1  # -1 = the last id (RoBERTa's <mask> is 50264 of 50265)
    num_special: int = 4

    @model_validator(mode="after")
    def _resolve_mask(self):
        if self.mask < 0:
            object.__setattr__(self, "mask", self.size - 1)
        if not 0 <= self.mask < self.size:
            raise ValueError(f"mask id {self.mask} outside vocabulary of size {self.size}")
        return self

    @property
    def special_ids(self) -> list[int]:
        return sorted({*range(self.num_special), self.bos, self.pad, self.eos, self.unk, self.mask})


def mask_tokens(
    tokens: np.ndarray, vocab: Vocabulary, cfg: TokenMaskConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic masking of one batch (B, T). Returns (corrupted tokens, selected, replaced-by-<mask>)."""
    corrupted = tokens.copy()
    selected = np.zeros(tokens.shape, dtype=bool)
    candidates_all = ~np.isin(tokens, vocab.special_ids)
    for i in range(tokens.shape[0]):
        candidates = np.flatnonzero(candidates_all[i])
        if len(candidates) == 0:
            continue
        num = max(1, int(cfg.prob * len(candidates) / cfg.length + rng.random()))
        starts = rng.choice(len(candidates), size=min(num, len(candidates)), replace=False)
        spans = (starts[:, None] + np.arange(cfg.length)[None, :]).reshape(-1)
        selected[i, candidates[np.unique(spans[spans < len(candidates)])]] = True
    u = rng.random(tokens.shape)
    keep = selected & (u < cfg.leave_unmasked_prob)
    rand = selected & ~keep & (u < cfg.leave_unmasked_prob + cfg.random_token_prob)
    to_mask = selected & ~keep & ~rand
    corrupted[to_mask] = vocab.mask
    replacements = np.setdiff1d(np.arange(vocab.num_special, vocab.size), vocab.special_ids)
    corrupted[rand] = rng.choice(replacements, size=int(rand.sum()))
    return corrupted, selected, to_mask


def text_objective(steps_hint: int = 5000) -> ObjectiveConfig:
    """data2vec text (spec §3-§6, §15): FFN taps, K=10, per-layer LN, τ 0.999→0.9999 over 100k, SmoothL1 β=4 sum."""
    return ObjectiveConfig(
        top_k=10, target_tap="ffn", layer_norm_targets="layer", final_norm="none", head="mlp2",
        loss=LossConfig(kind="smooth_l1", beta=4.0, reduction="sum_over_dim", scale=1.0),
        ema=EMAConfig(tau_start=0.999, tau_end=0.9999, tau_steps=100_000),
        collapse=CollapseConfig(warmup_steps=steps_hint),
    )


def text_objective_v2(dim: int, steps_hint: int = 5000, size: str = "base") -> ObjectiveConfig:
    """data2vec 2.0 base_text_only_task (spec §8.5): FFN taps of all blocks, IN per layer -> average, L2 with scale
    1, 8 clones keeping 52 % of the tokens at random, 5-layer 1-D decoder (k 9, no groups, no residual, 2-layer
    projection, input dropout 0.1), τ 0.9999 -> 0.99999 over 100k; EMA over the blocks only, the teacher reads the
    student's embeddings. large_text_only_task: all 24 blocks, LN per layer -> average -> IN, 50 % masked, the
    decoder 768 wide."""
    large = size == "large"
    return ObjectiveConfig(
        top_k=24 if large else 12, target_tap="ffn", layer_norm_targets="layer" if large else "instance",
        final_norm="instance" if large else "none",
        loss=LossConfig(kind="l2", reduction="sum_over_dim", scale=1.0),
        ema=EMAConfig(tau_start=0.9999, tau_end=0.99999, tau_steps=100_000),
        collapse=CollapseConfig(warmup_steps=steps_hint),
        v2=V2Config(clones=8, mask=V2MaskConfig(prob=0.5 if large else 0.48),
                    decoder=DecoderConfig(dim=768 if large else dim, kernel=9, groups=1, layers=5, residual=False,
                                          projection_layers=2, input_dropout=0.1),
                    teacher_shared_prefixes=TextEncoder.teacher_shared_prefixes, teacher_reads_student_features=True),
    )


class TextModality(Modality):
    name = "text"

    def __init__(self, encoder: TextEncoder, vocab: Vocabulary, mask: TokenMaskConfig) -> None:
        if vocab.size != encoder.cfg.vocab_size or vocab.pad != encoder.cfg.pad_idx:
            raise ValueError(f"vocabulary {vocab} does not match encoder vocab_size/pad_idx")
        self.encoder, self.vocab, self.mask_cfg = encoder, vocab, mask

    def make_views(self, batch: Batch, rng: np.random.Generator) -> Views:
        tokens = batch.source
        corrupted, selected, masked = mask_tokens(batch.host().numpy(), self.vocab, self.mask_cfg, rng)
        loss_mask = masked if self.mask_cfg.loss_on == "mask_token" else selected
        to = lambda a: from_host(torch.from_numpy(a), tokens.device)  # noqa: E731
        return Views(to(corrupted), tokens, batch.padding_mask, token_mask=None, loss_mask=to(loss_mask),
                     loss_positions=host_positions(loss_mask, tokens.device))

    def v2_masks(self, batch: Batch, cfg: V2MaskConfig, clones: int, rng: np.random.Generator) -> Tensor:
        rows, length = batch.source.shape[0] * clones, batch.source.shape[1]
        if cfg.length == 1:
            masks = random_masks(rows, length, cfg.prob, rng)
        else:
            masks = block_masks(rows, (length,), cfg, rng)
        return torch.from_numpy(masks)
