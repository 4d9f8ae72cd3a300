"""A linear CTC head on frozen frame features, decoded greedily (or by `d2v.eval.lm`'s beam search). It asks
whether letters are within a linear read-out of some frames: an encoder's layers (`bench/feature_probe.py`) or the
log-mels themselves (the raw-feature baseline of the speech tasks, `d2v.eval.baselines`). Features are standardised
with the training frames' statistics; the head trains with Adam on zero-padded batches of whole utterances."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.metrics import greedy_transcripts
from d2v.modalities.heads import ctc_loss


@dataclass
class LinearCTC:
    head: torch.nn.Linear
    mean: Tensor
    std: Tensor

    def logits(self, frames: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(B, T, V) logits of zero-padded standardised frames, and each utterance's frame count."""
        lengths = torch.tensor([len(f) for f in frames])
        x = torch.nn.utils.rnn.pad_sequence([(f.float() - self.mean) / self.std for f in frames], batch_first=True)
        return self.head(x), lengths

    def loss(self, frames: list[Tensor], targets: list[Tensor]) -> Tensor:
        """CTC loss, mean per letter, over one batch of utterances."""
        logits, lengths = self.logits(frames)
        return ctc_loss(logits, lengths, torch.cat(targets), torch.tensor([len(t) for t in targets]))

    @torch.no_grad()
    def utterance_logits(self, frames: list[Tensor], batch_size: int = 64) -> list[np.ndarray]:
        """Per utterance, (frames, letters) logits."""
        out = []
        for start in range(0, len(frames), batch_size):
            logits, lengths = self.logits(frames[start:start + batch_size])
            out += [x[:n] for x, n in zip(logits.numpy(), lengths.tolist())]
        return out

    def transcribe(self, frames: list[Tensor], letters: LetterTokenizer, batch_size: int = 64) -> list[str]:
        return greedy_transcripts(self.utterance_logits(frames, batch_size), letters)

    @torch.no_grad()
    def mean_loss(self, frames: list[Tensor], targets: list[Tensor], batch_size: int = 64) -> float:
        total = sum(self.loss(frames[s:s + batch_size], targets[s:s + batch_size]).item() *
                    len(frames[s:s + batch_size]) for s in range(0, len(frames), batch_size))
        return total / len(frames)


def fit_linear_ctc(frames: list[Tensor], targets: list[Tensor], num_symbols: int, *, epochs: int, lr: float,
                   batch_size: int = 16, seed: int = 0, score: Callable[[LinearCTC], float] | None = None,
                   every: int = 10) -> tuple[LinearCTC, float, int]:
    """Train a linear CTC head. Returns the head, the mean training loss of the last epoch and the epoch the head
    is from: the last, or with `score` (lower is better, e.g. dev CER; evaluated every `every` epochs and after
    the last) the best-scoring one."""
    torch.manual_seed(seed)
    stacked = torch.cat(frames).float()
    probe = LinearCTC(torch.nn.Linear(stacked.shape[1], num_symbols), stacked.mean(0),
                      stacked.std(0).clamp_min(1e-5))
    del stacked
    opt = torch.optim.Adam(probe.head.parameters(), lr=lr)
    order = np.random.default_rng(seed)
    best, best_score, best_epoch, losses = None, float("inf"), epochs, []
    for epoch in range(1, epochs + 1):
        losses = []
        for idx in np.array_split(order.permutation(len(frames)), max(1, len(frames) // batch_size)):
            loss = probe.loss([frames[i] for i in idx], [targets[i] for i in idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if score is not None and (epoch % every == 0 or epoch == epochs):
            value = score(probe)
            if value < best_score:
                best, best_score, best_epoch = copy.deepcopy(probe), value, epoch
    return best or probe, float(np.mean(losses)), best_epoch
