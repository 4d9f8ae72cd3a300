"""Does speech pretraining collapse onto a few directions, and what keeps it from doing so? A diagnostic for issue 4.

Each arm pretrains the speech encoder under one override of the embedded recipe. The table reports the effective
rank (`d2v.data2vec.effective_rank`) of the targets, predictions and local features over the last logged steps
(the loop logs them), and of every layer of the final student on dev_clean frames, against a random encoder.
target_var and pred_var are reported too: per-channel stds, which instance-normed targets keep high whatever the
rank. Arms already run under the same config are reused.

    python bench/speech_collapse.py [--arms recipe,frozen_local] [--steps 300] [--preset embedded-fbank]
        [--out results/bench/speech_collapse_cpu.json]
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pandas as pd
import torch
from runs import pretrain_seconds

from d2v.data2vec import effective_rank
from d2v.io import atomic_write_json
from d2v.modalities.registry import build_encoder
from d2v.train.config import merge, pretrain_config
from d2v.train.finetune import as_inputs, finetune_config, loader


def arms(steps: int) -> dict[str, dict]:
    """Overrides of the embedded speech recipe, one knob each, then the two knobs that helped together."""
    slow_teacher = {"ema": {"tau_start": 0.999, "tau_end": 0.9999, "tau_steps": steps}}
    return {
        "recipe": {},
        "front_end_grad_0.1": {"local_grad_mult": 0.1},  # wav2vec 2.0's feature_grad_mult
        "lr_2e-4": {"optim": {"lr": 2e-4}},
        "tau_0.999": slow_teacher,
        "frozen_local": {"freeze_local_encoder": True},
        "frozen_local_tau_0.999": {"freeze_local_encoder": True, **slow_teacher},
    }


@torch.no_grad()
def layer_ranks(encoder, preset: str, batches: int = 4) -> dict[str, float]:
    """Effective rank of the front end's output, the projected local features and every block's output, over the
    valid frames of the first dev_clean batches (utterances of at most 5 s)."""
    cfg = finetune_config("speech_1h", {"preset": preset, "init": "scratch", "audio": {"max_samples": 80_000}})
    encoder.eval()
    taps: dict[str, list[torch.Tensor]] = {}
    for k, item in enumerate(loader(cfg, "dev_clean", train=False)):
        if k == batches:
            break
        batch = as_inputs(item, "speech", torch.device("cpu"))["batch"]
        emb = encoder.embed(batch.source, batch.padding_mask)
        keep = ~emb.padding_mask
        front = encoder.feature_extractor(batch.source, batch.padding_mask).transpose(1, 2)
        out = encoder.encode(emb, None)
        named = {"front_end": front, "local": emb.tokens,
                 **{f"block_{i}": h for i, h in enumerate(out.hidden_states[1:], 1)}}
        for name, h in named.items():
            taps.setdefault(name, []).append(h[keep])
    return {name: round(float(effective_rank(torch.cat(rows))), 2) for name, rows in taps.items()}


def logged(run: Path, last: int = 5) -> dict[str, float]:
    """Means over the last `last` logged steps of the pretraining log."""
    df = pd.read_csv(run / "metrics.csv").tail(last)
    cols = ["loss", "target_var", "pred_var", "target_rank", "pred_rank", "local_rank"]
    return {c: round(float(df[c].mean()), 3) for c in cols}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="", help="comma-separated; default: all")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default="embedded-fbank")
    parser.add_argument("--runs", default="runs/collapse")
    parser.add_argument("--out", default="results/bench/speech_collapse_cpu.json")
    args = parser.parse_args()
    table = arms(args.steps)
    chosen = [a for a in args.arms.split(",") if a] or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected some of {sorted(table)}")
    torch.manual_seed(0)
    random = build_encoder("speech", args.preset)
    result = {"benchmark": "speech_collapse", "preset": args.preset, "dim": random.dim, "steps": args.steps,
              "machine": platform.machine(), "random_encoder": layer_ranks(random, args.preset), "arms": {}}
    for name in chosen:
        cfg = pretrain_config("speech", merge({"preset": args.preset, "steps": args.steps}, table[name]))
        run = Path(args.runs) / name
        seconds = pretrain_seconds(cfg, run)
        encoder = build_encoder("speech", args.preset)
        encoder.load_state_dict(torch.load(run / "final.pt", map_location="cpu", weights_only=False)["encoder"])
        result["arms"][name] = {"overrides": table[name], "seconds": seconds, "last_logged": logged(run),
                                "student_layers": layer_ranks(encoder, args.preset)}
        print(name, result["arms"][name]["last_logged"], result["arms"][name]["student_layers"], flush=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
