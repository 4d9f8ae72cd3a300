"""The small interface every modality plug-in implements, so the training core never branches on modality.

An encoder is split in two steps so the objective can share work between student and teacher:
  embed(source)          -> Embedded: the local encoder (patches / CNN frames / token embeddings)
  encode(embedded, mask) -> EncoderOutput: mask-embedding replacement, positions, extra tokens, Transformer
  encode_visible(embedded, mask) -> EncoderOutput over the unmasked tokens only (data2vec 2.0 student)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from d2v.config import V2MaskConfig


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
    positions: Tensor | None = None  # (B, N - num_extra_tokens) original positions of the tokens (encode_visible)


@dataclass
class Batch:
    source: Tensor  # images (B, C, H, W) | waveforms (B, S) | token ids (B, T)
    padding_mask: Tensor | None = None  # input-level padding (B, S) or (B, T), True = padded
    host_source: Tensor | None = field(default=None, repr=False, compare=False)  # the loader's copy, once moved

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device` (`from_host`: no wait for the GPU's queue), keeping the loader's host copy of the
        source for maskings that read its values (text), so they need not copy it back."""
        mask = None if self.padding_mask is None else from_host(self.padding_mask, device)
        host = self.source if self.source.device.type == "cpu" else self.host_source
        return Batch(from_host(self.source, device), mask, host)

    def host(self) -> Tensor:
        """The source on the host: the loader's copy when the batch was moved with `to`."""
        return self.host_source if self.host_source is not None else self.source.cpu()


@dataclass
class Views:
    """The two views data2vec needs from one batch, plus where the loss is computed."""

    student_source: Tensor  # text: the corrupted token ids; image/speech: the source itself
    teacher_source: Tensor  # always the full, unmasked input
    padding_mask: Tensor | None  # input-level padding mask shared by both views
    token_mask: Tensor | None  # (B, T) tokens the encoder replaces by its mask embedding (image, speech)
    loss_mask: Tensor  # (B, T) positions whose predictions enter the loss
    # the same positions as (rows, columns) in row-major order, from the host (`host_positions`); None: the loss
    # indexes by `loss_mask`, which on a GPU waits for the device to count its entries
    loss_positions: tuple[Tensor, Tensor] | None = None


class Encoder(nn.Module, ABC):
    """Base class of the modality encoders."""

    num_extra_tokens: int = 0
    # parameter-name prefixes the EMA teacher copies from the student instead of averaging (spec §4)
    teacher_shared_prefixes: tuple[str, ...] = ()
    # True when the teacher consumes the student's local features instead of running its own local encoder
    teacher_reuses_local_features: bool = False
    # LayerDrop's draws (None: torch's global generator); FSDP sets one shared by all ranks (d2v.train.fsdp)
    layerdrop_generator: torch.Generator | None = None
    # data2vec 1.0's regression head takes BERT's init (text, BEiT's trunc-normal for images); speech keeps PyTorch's
    bert_init_head: bool = True

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def embed(self, source: Tensor, padding_mask: Tensor | None = None) -> Embedded: ...

    @abstractmethod
    def encode(self, embedded: Embedded, mask: Tensor | None = None) -> EncoderOutput: ...

    def encode_visible(self, embedded: Embedded, mask: Tensor, keep: Tensor | None = None) -> EncoderOutput:
        """data2vec 2.0: positions on the full sequence, then only the visible tokens (mask False) are encoded.
        Every row of `mask` hides the same number of tokens, so the visible set is a dense tensor; the output's
        `positions` say where each encoded token sits in the full sequence. `keep`, the visible positions when the
        caller computed them on the host, spares a device sync."""
        raise NotImplementedError(f"{type(self).__name__} has no data2vec 2.0 path")

    def scale_front_end_grad(self, mult: float) -> None:
        """Scale the gradient reaching a feature-extracting front end (fairseq's `feature_grad_mult`)."""
        raise NotImplementedError(f"{type(self).__name__} has no front end whose gradient can be scaled")

    def freeze_local_encoder(self) -> None:
        """Keep the local encoder (input -> token features) at its initialisation; not in the papers. The teacher
        shares it, so a trainable one can collapse the targets onto a few directions (docs/findings.md, speech)."""
        raise NotImplementedError(f"{type(self).__name__} has no switch to freeze its local encoder")

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The 2-D layout of the token sequence (image patches), or None for a 1-D sequence."""
        return None

    def forward(self, source: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None):
        return self.encode(self.embed(source, padding_mask), mask)


class Modality(ABC):
    """A modality plug-in: the encoder plus how to draw a fresh masked view of a batch."""

    name: str
    encoder: Encoder

    @abstractmethod
    def make_views(self, batch: Batch, rng: np.random.Generator) -> Views: ...

    def v2_masks(self, batch: Batch, cfg: V2MaskConfig, clones: int, rng: np.random.Generator) -> Tensor:
        """data2vec 2.0: `clones` masks per sample, (B·clones, T) bool on the host, True = masked, sample-major."""
        raise NotImplementedError(f"the {self.name} plug-in has no data2vec 2.0 masking")


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    padding_mask: Tensor | None,
    attn_biases: list[Tensor | None],
    layerdrop: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """Run a block stack, collecting both data2vec taps. LayerDrop only in training, drawn from `generator` (None:
    torch's global one)."""
    hidden_states, ffn_outputs = [x], []
    for block, bias in zip(blocks, attn_biases):
        if blocks.training and layerdrop > 0 and torch.rand((), generator=generator) < layerdrop:
            ffn_outputs.append(None)
        else:
            x, ffn = block(x, bias, padding_mask)
            ffn_outputs.append(ffn)
        hidden_states.append(x)
    return x, hidden_states, ffn_outputs


def dense_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) mask with the same number of masked tokens per row -> ascending (visible, masked) positions,
    (B, T_visible) and (B, T_masked). Call it on the host copy: the count check and the split read values."""
    counts = (~mask).sum(1)
    if mask.shape[0] and bool((counts != counts[0]).any()):
        raise ValueError(f"data2vec 2.0 masks must hide the same number of tokens in every row, got visible counts "
                         f"{sorted(set(counts.tolist()))}")
    num_visible = int(counts[0]) if mask.shape[0] else 0
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, :num_visible], order[:, num_visible:]


def visible_indices(mask: Tensor) -> Tensor:
    """(B, T) mask with the same number of masked tokens per row -> (B, T_visible) ascending visible positions."""
    return dense_indices(mask)[0]


def from_host(t: Tensor, device: torch.device) -> Tensor:
    """A tensor made on the host (a mask drawn with numpy) on `device`, without stalling it. A CUDA copy from
    pageable memory first waits for all the work queued on the stream, so each mask copied plainly idled the GPU
    once a step; from pinned memory the copy is queued like a kernel (PyTorch keeps the pinned block until it is
    done)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_positions(mask: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (row, column) indices of a host-drawn (B, T) mask's True entries on `device`, in row-major order, the
    order boolean indexing takes: `x[rows, cols]` gathers what `x[mask]` does without asking the device how many."""
    rows, cols = np.nonzero(mask)
    return from_host(torch.from_numpy(rows), device), from_host(torch.from_numpy(cols), device)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def require_unpadded(embedded: Embedded) -> None:
    if embedded.padding_mask is not None and bool(embedded.padding_mask.any()):
        raise ValueError("data2vec 2.0 pretraining needs unpadded batches (speech: crop each batch to its shortest "
                         "utterance; text: packed blocks)")


def replace_masked(tokens: Tensor, mask: Tensor | None, mask_embedding: Tensor) -> Tensor:
    """Put the learned mask embedding (or any fill that broadcasts to `tokens`) at masked positions."""
    if mask is None:
        return tokens
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    return torch.where(mask.unsqueeze(-1), mask_embedding.to(tokens.dtype), tokens)
