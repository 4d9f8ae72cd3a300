"""The small interface every modality plug-in implements, so the training core never branches on modality.

An encoder is split in two steps so the objective can share work between student and teacher:
  embed(source)          -> Embedded: the local encoder (patches / CNN frames / token embeddings)
  encode(embedded, mask) -> EncoderOutput: mask-embedding replacement, positions, extra tokens, Transformer
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Embedded:
    tokens: Tensor  # (B, T, D) local-encoder output, before masking and positions
    padding_mask: Tensor | None = None  # (B, T), True = padded

    def detach(self) -> "Embedded":
        return replace(self, tokens=self.tokens.detach())


@dataclass
class EncoderOutput:
    x: Tensor  # (B, N, D) final output, extra tokens first, final norm applied if the layout has one
    hidden_states: list[Tensor]  # L+1 tensors (B, N, D): input of block 1, then the output of each block
    ffn_outputs: list[Tensor | None]  # L tensors: FFN output before dropout/residual/LN (None if LayerDrop skipped)
    num_extra_tokens: int = 0  # leading tokens that are not sequence positions ([CLS])
    padding_mask: Tensor | None = None  # (B, N - num_extra_tokens)
    pooled: Tensor | None = None  # (B, D) where the layout defines a pooled output


@dataclass
class Batch:
    source: Tensor  # images (B, C, H, W) | waveforms (B, S) | token ids (B, T)
    padding_mask: Tensor | None = None  # input-level padding (B, S) or (B, T), True = padded


@dataclass
class Views:
    """The two views data2vec needs from one batch, plus where the loss is computed."""

    student_source: Tensor  # text: the corrupted token ids; image/speech: the source itself
    teacher_source: Tensor  # always the full, unmasked input
    padding_mask: Tensor | None  # input-level padding mask shared by both views
    token_mask: Tensor | None  # (B, T) tokens the encoder replaces by its mask embedding (image, speech)
    loss_mask: Tensor  # (B, T) positions whose predictions enter the loss


class Encoder(nn.Module, ABC):
    """Base class of the modality encoders."""

    num_extra_tokens: int = 0
    # parameter-name prefixes the EMA teacher copies from the student instead of averaging (spec §4)
    teacher_shared_prefixes: tuple[str, ...] = ()
    # True when the teacher consumes the student's local features instead of running its own local encoder
    teacher_reuses_local_features: bool = False

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> Embedded: ...

    @abstractmethod
    def encode(self, embedded: Embedded, mask: Tensor | None = None) -> EncoderOutput: ...

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None):
        return self.encode(self.embed(source, padding_mask), mask)


class Modality(ABC):
    """A modality plug-in: the encoder plus how to draw a fresh masked view of a batch."""

    name: str
    encoder: Encoder

    @abstractmethod
    def make_views(self, batch: Batch, rng: np.random.Generator) -> Views: ...


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    padding_mask: Tensor | None,
    attn_biases: list[Tensor | None],
    layerdrop: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """Run a block stack, collecting both data2vec taps. LayerDrop only in training."""
    hidden_states, ffn_outputs = [x], []
    for block, bias in zip(blocks, attn_biases):
        if blocks.training and layerdrop > 0 and torch.rand(()) < layerdrop:
            ffn_outputs.append(None)
        else:
            x, ffn = block(x, bias, padding_mask)
            ffn_outputs.append(ffn)
        hidden_states.append(x)
    return x, hidden_states, ffn_outputs


def replace_masked(tokens: Tensor, mask: Tensor | None, mask_embedding: Tensor) -> Tensor:
    """Put the learned mask embedding at masked positions (v1 student view)."""
    if mask is None:
        return tokens
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    return torch.where(mask.unsqueeze(-1), mask_embedding.to(tokens.dtype), tokens)
