"""Fine-tuning heads on top of any encoder, one per task family (spec §9).

- image classification: mean-pool the patch tokens → LayerNorm → Linear (BEiT fine-tuning layout);
- CTC speech recognition: dropout → Linear over the letter vocabulary, time masking with the encoder's mask
  embedding (data2vec 2.0 encoders, which have none: N(0, 0.01²) noise) and channel masking (zeroed feature
  channels) during training, CNN feature extractor frozen;
- sentence(-pair) classification and regression: RoBERTa's head on the first token (dense → tanh → linear).
Each head returns logits; `linear_probe` freezes the encoder and uses a single linear layer on pooled features.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import CTCMaskConfig
from d2v.modalities.base import Batch
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


class CTCModel(nn.Module):
    def __init__(self, encoder: nn.Module, vocab_size: int, masks: CTCMaskConfig = CTCMaskConfig(),
                 dropout: float = CTC_HEAD_DROPOUT, linear_probe: bool = False, freeze_cnn: bool = True):
        super().__init__()
        self.encoder, self.masks, self.linear_probe = encoder, masks, linear_probe
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dim, vocab_size)
        encoder.feature_extractor.requires_grad_(not freeze_cnn)  # frozen after pretraining (spec §9.2)

    def forward(self, batch: Batch, rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, T, V) logits and (B,) valid frame counts."""
        emb = self.encoder.embed(batch.source, batch.padding_mask)
        B, T, D = emb.tokens.shape
        lengths = (~emb.padding_mask).sum(-1) if emb.padding_mask is not None else torch.full((B,), T)
        time_mask = None
        if self.training and rng is not None and not self.linear_probe:
            if self.masks.time_prob > 0:
                cfg = SpanMaskConfig(prob=self.masks.time_prob, length=self.masks.time_length, min_masks=0,
                                     require_same_masks=False)
                time_mask = torch.from_numpy(span_mask(lengths.tolist(), T, cfg, rng)).to(emb.tokens.device)
            if self.masks.channel_prob > 0:
                cfg = SpanMaskConfig(prob=self.masks.channel_prob, length=self.masks.channel_length, min_masks=0,
                                     require_same_masks=False)
                channels = torch.from_numpy(span_mask([D] * B, D, cfg, rng)).to(emb.tokens.device)
                emb.tokens = emb.tokens.masked_fill(channels[:, None, :], 0.0)
        out = self.encoder.encode(emb, time_mask)
        return self.head(self.dropout(out.x)), lengths.to(out.x.device)


def ctc_loss(logits: Tensor, lengths: Tensor, targets: Tensor, target_lengths: Tensor, blank: int = 0) -> Tensor:
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank, zero_infinity=True)
