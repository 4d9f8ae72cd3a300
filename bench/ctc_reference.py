"""Can this corpus be learned with CTC at a CPU budget at all? A conventional reference recogniser, trained from
scratch through the same loader, letter targets, CTC loss, greedy decoding and metrics as `d2v finetune`:
log-mel filterbanks (torchaudio) → a stride-2 conv (50 frames/s, the rate of the data2vec CNN) → depthwise-separable
conv blocks (QuartzNet-like; a BiGRU was 8 s per step on 2 cores) → a linear letter head. A yardstick for issue 4:
how many updates a small conventional model needs to leave CTC's blank plateau (training loss near the entropy of
the letters) on the same data, against the transformer fine-tuning runs that stay on it.

    python bench/ctc_reference.py --task speech_1h --steps 1500 [--eval-every 250] [--channels 256 --blocks 6]
        [--out results/bench/ctc_reference_speech_1h.json]
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.metrics import cer, ctc_greedy, wer
from d2v.io import atomic_write_json
from d2v.modalities.base import Batch, Embedded
from d2v.modalities.heads import ctc_loss
from d2v.modalities.registry import build_encoder
from d2v.train.task_data import as_inputs, loader
from d2v.train.task_model import build_model
from d2v.train.tasks import TASKS, finetune_config

HOP = 160  # 10 ms at 16 kHz


class SeparableBlock(nn.Module):
    """Depthwise conv over time → pointwise conv → LayerNorm over channels → GELU → dropout, with a residual."""

    def __init__(self, channels: int, kernel: int, dropout: float):
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.pointwise = nn.Conv1d(channels, channels, 1)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        h = self.norm(self.pointwise(self.depthwise(x)).transpose(1, 2)).transpose(1, 2)
        return x + self.dropout(F.gelu(h))


class MelFrontEnd(nn.Module):
    """Log-mel filterbanks, standardised per utterance over its own valid frames, → a stride-2 conv + GELU:
    (B, C, T) at 50 frames/s with padded frames zeroed, and the (B,) valid frame counts."""

    def __init__(self, channels: int, n_mels: int = 80, sample_rate: int = 16_000):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=400, hop_length=HOP, n_mels=n_mels)
        self.stem = nn.Conv1d(n_mels, channels, 11, stride=2, padding=5)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Features, frame counts and the (B, 1, T) float mask of valid frames."""
        wave, padding_mask = batch.source, batch.padding_mask
        samples = (~padding_mask).sum(-1) if padding_mask is not None else torch.full((len(wave),), wave.shape[-1])
        frames = samples // HOP + 1  # centred STFT
        x = (self.mel(wave) + 1e-6).log()  # (B, M, F)
        valid = (torch.arange(x.shape[-1])[None, :] < frames[:, None]).unsqueeze(1).float()
        mean = (x * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        x = (x - mean) / (var + 1e-5).sqrt() * valid
        lengths = (frames - 1) // 2 + 1
        keep = (torch.arange((x.shape[-1] - 1) // 2 + 1)[None, :] < lengths[:, None]).unsqueeze(1).float()
        return F.gelu(self.stem(x)) * keep, lengths, keep


class MelConvNet(nn.Module):
    """Log-mel front end → separable conv blocks (QuartzNet-like, but LayerNorm so padding never enters any
    statistics) → letters. Padded frames are zeroed after every block so they never leak into the valid ones."""

    def __init__(self, vocab_size: int, channels: int = 256, blocks: int = 6, kernel: int = 15, dropout: float = 0.1):
        super().__init__()
        self.front = MelFrontEnd(channels)
        self.blocks = nn.ModuleList(SeparableBlock(channels, kernel, dropout) for _ in range(blocks))
        self.head = nn.Conv1d(channels, vocab_size, 1)

    def forward(self, batch: Batch, rng=None) -> tuple[Tensor, Tensor]:
        """(B, T, V) logits and (B,) valid frame counts; the signature of d2v's CTCModel."""
        x, lengths, keep = self.front(batch)
        for block in self.blocks:
            x = block(x) * keep
        return self.head(x).transpose(1, 2), lengths


class MelTransformer(nn.Module):
    """The log-mel front end in place of the waveform CNN, then d2v's speech encoder (positional conv and
    transformer blocks) and a linear letter head: which of the two halves keeps a model on the plateau?"""

    def __init__(self, vocab_size: int, encoder: nn.Module, channels: int = 256):
        super().__init__()
        self.front = MelFrontEnd(channels)
        self.proj = nn.Linear(channels, encoder.dim)
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, vocab_size)

    def forward(self, batch: Batch, rng=None) -> tuple[Tensor, Tensor]:
        x, lengths, keep = self.front(batch)
        pad = keep[:, 0] == 0
        out = self.encoder.encode(Embedded(self.proj(x.transpose(1, 2)), pad if pad.any() else None))
        return self.head(out.x), lengths


def letter_entropy(texts: list[str], letters: LetterTokenizer) -> float:
    """Unigram entropy of the transcripts' letters (nats): CTC's blank plateau sits near it."""
    counts = Counter(int(i) for t in texts for i in letters.encode(t))
    p = np.array(list(counts.values()), dtype=np.float64) / sum(counts.values())
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def evaluate(model: nn.Module, cfg, split: str, letters: LetterTokenizer) -> dict:
    model.eval()
    hyps, refs, loss, n = [], [], 0.0, 0
    for item in loader(cfg, split, train=False):
        inputs = as_inputs(item, "speech", torch.device("cpu"))
        logits, lengths = model(inputs["batch"])
        loss += ctc_loss(logits, lengths, inputs["targets"], inputs["target_lengths"]).item() * len(lengths)
        n += len(lengths)
        hyps += [letters.decode(ids) for ids in ctc_greedy(logits.numpy(), lengths.tolist())]
        refs += inputs["text"]
    model.train()
    return {"cer": round(cer(hyps, refs), 4), "wer": round(wer(hyps, refs), 4), "loss": round(loss / n, 4),
            "example": {"hyp": hyps[0], "ref": refs[0]}}


def build(args, letters: LetterTokenizer) -> nn.Module:
    """The reference recogniser, or d2v's own CTC model (a randomly initialised encoder of `--preset`, CNN frozen
    unless `--train-cnn`) to train under the same loop, optimiser and data."""
    torch.manual_seed(args.seed)
    if args.model == "reference":
        return MelConvNet(len(letters.symbols), channels=args.channels, blocks=args.blocks, kernel=args.kernel)
    if args.model == "mel-transformer":
        return MelTransformer(len(letters.symbols), build_encoder("speech", args.preset), args.channels)
    masks = {} if args.ctc_masks else {"time_prob": 0.0, "channel_prob": 0.0}
    return build_model(finetune_config(args.task, {"init": "scratch", "preset": args.preset, "seed": args.seed,
                                                   "train_cnn": args.train_cnn, "ctc_masks": masks}))


def describe(args) -> str:
    if args.model == "reference":
        return (f"log-mel 80 → conv stride 2 → {args.blocks} separable conv blocks ({args.channels} channels, "
                f"kernel {args.kernel}) → linear")
    if args.model == "mel-transformer":
        return f"log-mel 80 → conv stride 2 → d2v {args.preset} speech encoder (positional conv + blocks) → linear"
    return (f"d2v CTCModel, {args.preset} speech encoder from scratch, CNN {'trained' if args.train_cnn else 'frozen'}"
            f", fine-tuning masks {'on' if args.ctc_masks else 'off'}")


def train(args) -> dict:
    task = TASKS[args.task]
    if task.kind != "ctc":
        raise SystemExit(f"{args.task}: not a CTC task")
    cfg = finetune_config(args.task, {"batch_size": args.batch_size, "data_root": args.data_root, "seed": args.seed,
                                      "audio": {"max_samples": int(args.max_seconds * 16_000), "min_samples": 0}})
    letters = LetterTokenizer.load(cfg.letters)
    model = build(args, letters)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    curve, evals, texts, window = [], {}, [], []
    start = time.perf_counter()
    batches = iter(loader(cfg, task.train, train=True))
    for step in range(1, args.steps + 1):
        inputs = as_inputs(next(batches), "speech", torch.device("cpu"))
        texts += inputs["text"] if len(texts) < 2000 else []
        logits, lengths = model(inputs["batch"], np.random.default_rng([args.seed, step]))
        loss = ctc_loss(logits, lengths, inputs["targets"], inputs["target_lengths"])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % args.log_every == 0:
            curve.append({"step": step, "loss": round(float(np.mean(window)), 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            window = []
            print(curve[-1], flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            evals[step] = evaluate(model, cfg, task.dev, letters)
            print(step, evals[step], flush=True)
    entropy = letter_entropy(texts, letters)
    below = [e["step"] for e in curve if e["loss"] < args.plateau_fraction * entropy]
    return {"benchmark": "ctc_reference", "task": args.task, "dev_split": task.dev,
            "model": describe(args),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_root")},
            "letter_entropy": round(entropy, 4),
            f"first_logged_step_loss_below_{args.plateau_fraction}_entropy": below[0] if below else None,
            "train_curve": curve, "dev": evals, "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="speech_1h")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=15.0, help="longer training utterances are skipped")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument("--model", choices=("reference", "mel-transformer", "d2v"), default="reference")
    parser.add_argument("--preset", default="embedded", help="d2v: the speech encoder preset")
    parser.add_argument("--train-cnn", action="store_true", help="d2v: train the waveform CNN too")
    parser.add_argument("--ctc-masks", action="store_true", help="d2v: fine-tuning time and channel masks")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--kernel", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--plateau-fraction", type=float, default=0.5,
                        help="report the first logged step whose mean training loss is below this × the entropy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = train(args)
    out = Path(args.out or f"results/bench/ctc_reference_{args.task}_{args.model}.json")
    atomic_write_json(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
