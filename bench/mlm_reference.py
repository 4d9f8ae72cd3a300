"""Is it data2vec's targets or the budget? The embedded text encoder pretrained with RoBERTa's masked-LM objective
instead of regressing an EMA teacher: the same corpus, packed blocks, batch, steps, AdamW, schedule, clipping and
15 % 80/10/10 masking, cross-entropy on the selected pieces through RoBERTa's LM head (dense → GELU → LayerNorm →
the token embeddings, tied). A yardstick for issue 4, like `ctc_reference.py` for speech: if masked-LM features
beat a random encoder where data2vec's do not, the targets are what fails at this scale; if they do not either,
the corpus and budget are.

`final.pt` has the layout of `d2v pretrain`'s (student = teacher = the MLM encoder), so `feature_probe.py` and
fine-tuning (`pretrain_vs_scratch.py --pretrained text=RUN/final.pt`) read it unchanged.

    python bench/mlm_reference.py [--steps 1200] [--lr 1e-3] [--runs runs/mlm/text]
        [--out results/bench/mlm_reference_text.json]
"""
from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.config import nested_overrides
from d2v.io import atomic_write_json
from d2v.modalities.base import Batch
from d2v.modalities.registry import build_modality
from d2v.modalities.text import TokenMaskConfig
from d2v.nn import bert_init
from d2v.train.batches import pretrain_stream
from d2v.train.config import pretrain_config
from d2v.train.logging import MetricsLog
from d2v.train.optim import adamw, schedule_fn, set_lr
from d2v.train.batches import step_rng
from d2v.train.pretrain import save_encoder


class LMHead(nn.Module):
    """RoBERTa's LM head: dense → GELU → LayerNorm → logits through the (tied) token embedding matrix."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        dim = embed_tokens.embedding_dim
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        bert_init(self)
        self.embed_tokens = embed_tokens  # shared, not copied: its gradient comes from both ends
        self.bias = nn.Parameter(torch.zeros(embed_tokens.num_embeddings))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), self.embed_tokens.weight, self.bias)


def train_mlm(cfg, batches: Iterator[Batch], out: Path, log_every: int = 50) -> dict:
    """Masked-LM pretraining under the data2vec text recipe `cfg` on `batches` (the recipe's stream in `main`);
    writes out/final.pt and out/metrics.csv."""
    torch.manual_seed(cfg.seed)
    modality, _ = build_modality("text", cfg.preset, "v1")
    modality.mask_cfg = TokenMaskConfig(loss_on="selected")  # RoBERTa: the loss covers all selected pieces
    encoder = modality.encoder
    head = LMHead(encoder.embed_tokens)
    params = list({id(p): p for p in [*encoder.parameters(), *head.parameters()]}.values())
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    lr_at = schedule_fn(cfg.optim.schedule, cfg.steps, cfg.optim.warmup_steps, cfg.optim.final_lr_scale,
                        cfg.optim.tri_stage_phases)
    rows, seen, log = [], 0, MetricsLog(out / "metrics.csv")
    window = np.zeros(3)  # loss sum, right predictions, masked pieces since the last row
    encoder.train()
    head.train()
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        lr = set_lr(optimizer, cfg.optim.lr, lr_at(step - 1))
        batch = next(batches)
        views = modality.make_views(batch, step_rng(cfg.seed, step, 0))  # data2vec's masks at this step
        encoded = encoder.encode(encoder.embed(views.student_source, views.padding_mask), None)
        logits = head(encoded.x[views.loss_mask])
        targets = views.teacher_source[views.loss_mask]
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += batch.source.shape[0]
        window += np.array([loss.item() * len(targets), (logits.argmax(-1) == targets).sum().item(), len(targets)])
        if step % log_every == 0 or step in (1, cfg.steps):  # means over the pieces since the last row
            loss_sum, correct, pieces = window
            rows.append({"step": step, "loss": loss_sum / pieces, "masked_accuracy": correct / pieces, "lr": lr,
                         "grad_norm": grad_norm.item(), "samples_per_s": seen / (time.perf_counter() - start)})
            log.write(rows[-1])
            print(f"step {step}: loss {rows[-1]['loss']:.3f}, masked accuracy {rows[-1]['masked_accuracy']:.3f}",
                  flush=True)
            window[:] = 0
    save_encoder(out, cfg, encoder, encoder, cfg.steps, pretraining="mlm")
    return {"seconds": round(time.perf_counter() - start, 1), "first": rows[0], "last": rows[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="default: the embedded text recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the embedded text recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other recipe field, as for `d2v pretrain text`: --set data.batch_size=8")
    parser.add_argument("--runs", default="runs/mlm/text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench/mlm_reference_text.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides: dict = nested_overrides(args.set)
    if args.steps:
        overrides["steps"] = args.steps
    if args.lr:
        overrides["optim"] = {**overrides.get("optim", {}), "lr": args.lr}
    cfg = pretrain_config("text", overrides)
    result = train_mlm(cfg, pretrain_stream("text", cfg.data, cfg.seed)(0), Path(args.runs))
    report = {"benchmark": "mlm_reference", "machine": platform.machine(), "threads": args.threads,
              "recipe": cfg.model_dump(mode="json"), "run": args.runs, **result}
    atomic_write_json(Path(args.out), report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
