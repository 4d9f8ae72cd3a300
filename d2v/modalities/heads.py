"""Fine-tuning heads on top of any encoder, one per task family (spec §9).

- image classification: mean-pool the patch tokens → LayerNorm → Linear (BEiT fine-tuning layout);
- CTC speech recognition: dropout → Linear over the letter vocabulary, time masking with the encoder's mask
  embedding (data2vec 2.0 encoders, which have none: N(0, 0.01²) noise) and channel masking (zeroed feature
  channels) during training, CNN feature extractor frozen;
- sentence(-pair) classification and regression: RoBERTa's head on the first token (dense → tanh → linear);
- multi-label audio tagging (AudioSet): a linear layer per frame, pooled by linear softmax, time masking.
Each head returns logits; `linear_probe` freezes the encoder and uses a single linear layer on pooled features.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import SpeechMaskConfig
from d2v.modalities.base import Batch, from_host
from d2v.modalities.speech import SpanMaskConfig, span_mask


TEXT_HEAD_DROPOUT = 0.1  # RoBERTa's classification head
CTC_HEAD_DROPOUT = 0.0  # before the CTC output layer (HF: final_dropout)


def _trunc_normal(layer: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class ImageClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, linear_probe: bool = False):
        super().__init__()
        self.encoder, self.linear_probe = encoder, linear_probe
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = _trunc_normal(nn.Linear(encoder.dim, num_classes))

    def forward(self, batch: Batch) -> Tensor:
        out = self.encoder.encode(self.encoder.embed(batch.source), None)
        return self.head(self.fc_norm(out.x[:, out.num_extra_tokens:].mean(1)))


class TextClassifier(nn.Module):
    """RoBERTa classification head on <s>; with `linear_probe`, a linear layer on mean-pooled tokens."""

    def __init__(self, encoder: nn.Module, num_outputs: int, dropout: float = TEXT_HEAD_DROPOUT,
                 linear_probe: bool = False):
        super().__init__()
        self.encoder, self.linear_probe = encoder, linear_probe
        D = encoder.dim
        self.dense = None if linear_probe else nn.Linear(D, D)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(D, num_outputs)

    def forward(self, batch: Batch) -> Tensor:
        out = self.encoder.encode(self.encoder.embed(batch.source, batch.padding_mask), None)
        if self.linear_probe:
            keep = (~batch.padding_mask).unsqueeze(-1).float() if batch.padding_mask is not None else \
                torch.ones_like(out.x[..., :1])
            return self.out_proj((out.x * keep).sum(1) / keep.sum(1))
        x = self.dropout(torch.tanh(self.dense(self.dropout(out.x[:, 0]))))
        return self.out_proj(x)


def masked_speech(encoder: nn.Module, batch: Batch, masks: SpeechMaskConfig, rng: np.random.Generator | None):
    """Embed waveforms and, with an `rng` (training), draw fine-tuning masks: time spans (filled by the encoder's
    mask embedding or noise when encoded) and channel spans (zeroed here). (embedded, time mask or None, lengths)."""
    emb = encoder.embed(batch.source, batch.padding_mask)
    B, T, D = emb.tokens.shape
    lengths = (~emb.padding_mask).sum(-1) if emb.padding_mask is not None else torch.full((B,), T)
    time_mask = None
    if rng is not None:
        if masks.time_prob > 0:
            cfg = SpanMaskConfig(prob=masks.time_prob, length=masks.time_length, min_masks=0,
                                 require_same_masks=False)
            time_mask = from_host(torch.from_numpy(span_mask(lengths.tolist(), T, cfg, rng)), emb.tokens.device)
        if masks.channel_prob > 0:
            cfg = SpanMaskConfig(prob=masks.channel_prob, length=masks.channel_length, min_masks=0,
                                 require_same_masks=False)
            channels = from_host(torch.from_numpy(span_mask([D] * B, D, cfg, rng)), emb.tokens.device)
            emb.tokens = emb.tokens.masked_fill(channels[:, None, :], 0.0)
    return emb, time_mask, lengths


class CTCModel(nn.Module):
    def __init__(self, encoder: nn.Module, vocab_size: int, masks: SpeechMaskConfig = SpeechMaskConfig(),
                 dropout: float = CTC_HEAD_DROPOUT, linear_probe: bool = False, freeze_cnn: bool = True):
        super().__init__()
        self.encoder, self.masks, self.linear_probe = encoder, masks, linear_probe
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dim, vocab_size)
        encoder.feature_extractor.requires_grad_(not freeze_cnn)  # frozen after pretraining (spec §9.2)

    def forward(self, batch: Batch, rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, T, V) logits and (B,) valid frame counts."""
        masking = self.training and not self.linear_probe
        emb, time_mask, lengths = masked_speech(self.encoder, batch, self.masks, rng if masking else None)
        out = self.encoder.encode(emb, time_mask)
        return self.head(self.dropout(out.x)), lengths.to(out.x.device)


def linear_softmax_logits(frame_logits: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Linear-softmax pooling (Wang et al. 2019), data2vec's AudioSet head: with per-frame probabilities p_t = σ(z_t),
    the clip probability is y = Σ p_t² / Σ p_t, so confident frames weigh most. Computed in log space and returned as
    the clip's logit log(y / (1 - y)), y capped at 1 - eps, for BCE with logits. Padded frames take no part (fairseq
    zeroes their features, which still adds the bias's probability). (B, T, C) -> (B, C)."""
    log_p = F.logsigmoid(frame_logits.float())
    if padding_mask is not None:
        log_p = log_p.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
    log_y = (torch.logsumexp(2 * log_p, dim=1) - torch.logsumexp(log_p, dim=1)).clamp(max=math.log1p(-eps))
    return log_y - torch.log(-torch.expm1(log_y))


class AudioTagger(nn.Module):
    """Multi-label clip classifier: a linear layer on every frame, linear-softmax pooled over the valid frames
    (fairseq's `prediction_mode: lin_softmax`), time masks in training, the CNN frozen; as a linear probe, the frames'
    mean through the same layer."""

    def __init__(self, encoder: nn.Module, num_classes: int, masks: SpeechMaskConfig, linear_probe: bool = False,
                 freeze_cnn: bool = True):
        super().__init__()
        self.encoder, self.masks, self.linear_probe = encoder, masks, linear_probe
        self.head = nn.Linear(encoder.dim, num_classes)
        encoder.feature_extractor.requires_grad_(not freeze_cnn)

    def forward(self, batch: Batch, rng: np.random.Generator | None = None) -> Tensor:
        """(B, C) clip logits."""
        masking = self.training and not self.linear_probe
        emb, time_mask, _ = masked_speech(self.encoder, batch, self.masks, rng if masking else None)
        out = self.encoder.encode(emb, time_mask)
        pad = emb.padding_mask
        if self.linear_probe:
            keep = torch.ones_like(out.x[..., :1]) if pad is None else (~pad).unsqueeze(-1).to(out.x.dtype)
            return self.head((out.x * keep).sum(1) / keep.sum(1))
        return linear_softmax_logits(self.head(out.x), pad)


def mix_clips(batch: Batch, labels: Tensor, low: float, share: float, rng: np.random.Generator
              ) -> tuple[Batch, Tensor]:
    """fairseq's AudioSet mixup (`source_mixup` with `label_mixup`, `same_mixup`): one ratio r ~ U(low, 1) per batch,
    each chosen clip (a `share` of them) becomes (r·x + (1 - r)·x_perm) / √(r² + (1 - r)²), which keeps a normalised
    clip's unit variance, and its labels r·y + (1 - r)·y_perm, partners by one random permutation of the batch. A
    mixed clip is valid where either clip is (fairseq keeps the first clip's padding mask)."""
    B = batch.source.shape[0]
    device = batch.source.device
    chosen = from_host(torch.from_numpy(rng.random(B) < share), device)
    r = float(rng.uniform(max(low, 1e-6), 1.0))
    perm = from_host(torch.from_numpy(rng.permutation(B)), device)
    mixed = (r * batch.source + (1 - r) * batch.source[perm]) / math.sqrt(r * r + (1 - r) ** 2)
    source = torch.where(chosen.unsqueeze(-1), mixed, batch.source)
    labels = torch.where(chosen.unsqueeze(-1), r * labels + (1 - r) * labels[perm], labels)
    pad = batch.padding_mask
    if pad is not None:
        pad = torch.where(chosen.unsqueeze(-1), pad & pad[perm], pad)
    return Batch(source=source, padding_mask=pad), labels


def tagging_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy summed over clips and classes, over the number of positive labels (fairseq's
    sample_size for AudioSet: label.sum())."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
    return loss / labels.sum().clamp_min(1.0)


def ctc_loss(logits: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int = 0) -> Tensor:
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank, zero_infinity=True)
