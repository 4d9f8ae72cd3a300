"""Does pretraining collapse onto a few directions, and what keeps it from doing so? A diagnostic for issue 4.

Each arm pretrains one modality's encoder under one override of its embedded recipe. The table reports the effective
rank (`d2v.data2vec.effective_rank`) of the targets, predictions and local features over the last logged steps
(the loop logs them), and of every layer of the final student on a downstream dev split (speech: dev_clean frames
of speech_1h; text: rt_polarity tokens), against a random encoder. target_var and pred_var are reported too:
per-channel stds, which instance-normed targets keep high whatever the rank. Arms already run under the same
config are reused.

    python bench/collapse.py speech [--arms recipe,frozen_local] [--steps 300] [--preset embedded-fbank]
    python bench/collapse.py text --arms recipe,frozen_local_tau_0.999 --steps 300
        [--out results/bench/MODALITY_collapse_cpu.json] [--runs runs/collapse/MODALITY]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import pandas as pd
import torch
from runs import pretrain_seconds

from d2v.data2vec import effective_rank
from d2v.io import atomic_write_json, read_torch
from d2v.modalities.registry import build_encoder
from d2v.train.config import merge, pretrain_config
from d2v.train.task_data import as_inputs, loader
from d2v.train.tasks import TASKS, finetune_config

PROBE_TASK = {"speech": "speech_1h", "text": "rt_polarity"}
DEFAULT_PRESET = {"speech": "embedded-fbank", "text": "embedded"}
TOKENIZER = {"text": "data/tokenizer/spm.model"}


def arms(modality: str, steps: int) -> dict[str, dict]:
    """Overrides of the embedded recipe, one knob each, the two knobs that helped together, and data2vec 2.0."""
    slow_teacher = {"ema": {"tau_start": 0.999, "tau_end": 0.9999, "tau_steps": steps}}
    table = {
        "recipe": {},
        "lr_2e-4": {"optim": {"lr": 2e-4}},
        "tau_0.999": slow_teacher,
        "frozen_local": {"freeze_local_encoder": True},
        "frozen_local_tau_0.999": {"freeze_local_encoder": True, **slow_teacher},
        "v2": {"objective": "v2"},  # data2vec 2.0's embedded recipe (its own LR, batch, clones and τ)
        "v2_frozen_local": {"objective": "v2", "freeze_local_encoder": True},
    }
    if modality == "speech":
        table["front_end_grad_0.1"] = {"local_grad_mult": 0.1}  # wav2vec 2.0's feature_grad_mult
    return table


def probe_batches(modality: str, preset: str, batches: int):
    """The first batches of the probe task's dev split, as encoder inputs (speech: utterances of at most 5 s)."""
    task = PROBE_TASK[modality]
    overrides = {"preset": preset, "init": "scratch"}
    if modality == "speech":
        overrides["audio"] = {"max_samples": 80_000}
    cfg = finetune_config(task, overrides)
    for k, item in enumerate(loader(cfg, TASKS[task].dev, train=False)):
        if k == batches:
            return
        yield as_inputs(item, modality, torch.device("cpu"))["batch"]


@torch.no_grad()
def layer_ranks(encoder, modality: str, preset: str, batches: int = 4) -> dict[str, float]:
    """Effective rank of the local features, every block's output and (speech) the front end's output, over the
    valid positions of the probe batches."""
    encoder.eval()
    taps: dict[str, list[torch.Tensor]] = {}
    front_end: list[torch.Tensor] = []  # speech: the front end's output, caught as embed runs it
    hook = (encoder.feature_extractor.register_forward_hook(lambda module, args, out: front_end.append(out))
            if modality == "speech" else None)
    for batch in probe_batches(modality, preset, batches):
        emb = encoder.embed(batch.source, batch.padding_mask)
        out = encoder.encode(emb, None)
        keep = torch.ones(emb.tokens.shape[:2], dtype=torch.bool) if emb.padding_mask is None else ~emb.padding_mask
        named = {"local": emb.tokens, **{f"block_{i}": h for i, h in enumerate(out.hidden_states[1:], 1)}}
        if front_end:
            named["front_end"] = front_end.pop().transpose(1, 2)
        for name, h in named.items():
            taps.setdefault(name, []).append(h[keep])
    if hook is not None:
        hook.remove()
    return {name: round(float(effective_rank(torch.cat(rows))), 2) for name, rows in taps.items()}


def logged(run: Path, last: int = 5) -> dict[str, float]:
    """Means over the last `last` logged steps of the pretraining log."""
    df = pd.read_csv(run / "metrics.csv").tail(last)
    cols = ["loss", "target_var", "pred_var", "target_rank", "pred_rank", "local_rank"]
    return {c: round(float(df[c].mean()), 3) for c in cols}


def earlier_arms(out: str, modality: str, preset: str, steps: int) -> dict:
    """Arms of an earlier result for the same modality, preset and steps: a run of some arms adds to the table."""
    path = Path(out)
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = [earlier.get(k) for k in ("modality", "preset", "steps")] == [modality, preset, steps]
    return earlier.get("arms", {}) if same else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modality", choices=sorted(PROBE_TASK))
    parser.add_argument("--arms", default="", help="comma-separated; default: all")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default=None, help="default: embedded-fbank (speech), embedded (text)")
    parser.add_argument("--runs", default=None, help="default: runs/collapse/MODALITY")
    parser.add_argument("--out", default=None, help="default: results/bench/MODALITY_collapse_cpu.json")
    args = parser.parse_args()
    preset = args.preset or DEFAULT_PRESET[args.modality]
    runs = Path(args.runs or f"runs/collapse/{args.modality}")
    out = args.out or f"results/bench/{args.modality}_collapse_cpu.json"
    table = arms(args.modality, args.steps)
    chosen = [a for a in args.arms.split(",") if a] or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected some of {sorted(table)}")
    torch.manual_seed(0)
    random = build_encoder(args.modality, preset)
    result = {"benchmark": "collapse", "modality": args.modality, "preset": preset, "dim": random.dim,
              "steps": args.steps, "machine": platform.machine(),
              "random_encoder": layer_ranks(random, args.modality, preset),
              "arms": earlier_arms(out, args.modality, preset, args.steps)}
    for name in chosen:
        cfg = pretrain_config(args.modality, merge({"preset": preset, "steps": args.steps}, table[name]))
        run = runs / name
        seconds = pretrain_seconds(cfg, run, tokenizer=TOKENIZER.get(args.modality))
        encoder = build_encoder(args.modality, preset, cfg.objective)
        encoder.load_state_dict(read_torch(run / "final.pt")["encoder"])
        result["arms"][name] = {"overrides": table[name], "seconds": seconds, "last_logged": logged(run),
                                "student_layers": layer_ranks(encoder, args.modality, preset)}
        print(name, result["arms"][name]["last_logged"], result["arms"][name]["student_layers"], flush=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
