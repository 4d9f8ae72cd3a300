"""The data2vec 2.0 objective (spec §8), modality-agnostic.

One teacher pass per sample on the full input; M masked clones per sample, whose student pass encodes only the
visible tokens; a conv decoder fills the masked slots with N(0, σ²) noise, restores the order and predicts the same
targets at the masked positions of every clone. Clones are sample-major: rows i·M … i·M + M − 1 belong to sample i.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import ObjectiveConfig
from d2v.data2vec import Data2Vec, StepOutput, regression_loss, representation_std
from d2v.modalities.base import Batch, Embedded, EncoderOutput, Modality, dense_indices, from_host, gather_tokens
from d2v.nn.decoder import ConvDecoder


class Data2Vec2(Data2Vec):
    def __init__(self, modality: Modality, cfg: ObjectiveConfig) -> None:
        if cfg.v2 is None:
            raise ValueError("Data2Vec2 needs an objective with a `v2` section (clones, mask, decoder)")
        super().__init__(modality, cfg)

    def build_head(self) -> nn.Module:
        return ConvDecoder(self.cfg.v2.decoder, self.student.dim, self.student.token_grid)

    @property
    def decoder(self) -> ConvDecoder:
        return self.head

    def teacher_shared_prefixes(self) -> tuple[str, ...]:
        return self.cfg.v2.teacher_shared_prefixes

    def forward(self, batch: Batch, rng: np.random.Generator) -> StepOutput:
        v2, clones = self.cfg.v2, self.cfg.v2.clones
        # masks and their visible/masked positions come from the host: no step waits on the device for a count
        host_masks = self.modality.v2_masks(batch, v2.mask, clones, rng)  # (B·M, T), True = masked
        device = batch.source.device
        masks, keep, hidden = (from_host(t, device) for t in (host_masks, *dense_indices(host_masks)))
        s_emb = self.student.embed(batch.source, batch.padding_mask)
        y = self.teacher_targets(batch.source, None, s_emb.detach() if v2.teacher_reads_student_features else None)
        out = self.student.encode_visible(Embedded(s_emb.tokens.repeat_interleave(clones, 0)), masks, keep)
        pred = gather_tokens(self.decode(out, masks), hidden).flatten(0, 1)  # = [masks]: row-major, ascending
        y_views = y.repeat_interleave(clones, 0)
        target = gather_tokens(y_views, hidden).flatten(0, 1)
        loss = regression_loss(pred, target, self.cfg.loss)
        metrics = {"loss": loss.detach()}
        if v2.cls_loss > 0 and out.num_extra_tokens > 0:
            cls_loss = self.cls_loss(out.x[:, out.num_extra_tokens - 1], y_views.mean(1))
            loss = loss + v2.cls_loss * cls_loss
            metrics["cls_loss"] = cls_loss.detach()
        metrics.update({
            "target_var": representation_std(target, all_ranks=False),
            "pred_var": representation_std(pred, all_ranks=False),
            "masked_frac": masks.float().mean(),
            "local_var": representation_std(s_emb.tokens, all_ranks=False),
        })
        probes = {"target": target, "pred": pred.detach(), "local": s_emb.tokens.detach()}
        return StepOutput(loss, metrics, probes)

    def decode(self, out: EncoderOutput, masks: Tensor) -> Tensor:
        """Visible outputs back in place, N(0, σ²) noise in the masked slots, no positions added -> decoder."""
        visible = F.dropout(out.x[:, out.num_extra_tokens:], self.cfg.v2.decoder.input_dropout, self.training)
        full = torch.randn(*masks.shape, visible.shape[-1], device=visible.device, dtype=visible.dtype)
        full = full * self.cfg.v2.mask_noise_std
        index = out.positions.unsqueeze(-1).expand(-1, -1, visible.shape[-1])
        return self.decoder(full.scatter(1, index, visible))

    def cls_loss(self, cls_pred: Tensor, cls_target: Tensor) -> Tensor:
        """[CLS] regresses the patch-mean target: L2/√D summed over the views (fairseq weights it by the sample size
        before the global division, so it is a sum over views next to the per-token main loss)."""
        err = (cls_pred.float() - cls_target) ** 2
        return err.sum() / math.sqrt(cls_pred.shape[-1])
