"""Fine-tuning and evaluation for every downstream task: from a data2vec checkpoint, from scratch (the baseline), or
as a linear probe on frozen features. Tasks are table rows; the loop is shared.

Run folder: `config.json`, `metrics.csv` (train loss and dev metric), `final.pt`, `best.pt` (best dev metric
when the task has a dev split), `curves.png`. `evaluate` writes one JSON per (task, split): metric values, number
of examples, seed, git commit and a digest of the run configuration.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from d2v.config import Objective, StrictModel, validate
from d2v.data.loaders import AudioConfig, ImageAugConfig, image_loader, speech_loader, text_task_loader, web_loader
from d2v.data.tokenizer import LetterTokenizer, TextTokenizer
from d2v.eval.metrics import TASK_METRICS, ctc_greedy, oriented
from d2v.io import atomic_torch_save, atomic_write_json
from d2v.modalities.base import Batch
from d2v.modalities.heads import CTCMaskConfig, CTCModel, ImageClassifier, TextClassifier, ctc_loss
from d2v.modalities.registry import build_encoder
from d2v.nn.compile import compile_regions
from d2v.train.config import FASHION_MNIST, OptimConfig, check_decay_floor, merge
from d2v.train.logging import MetricsLog, plot_curves
from d2v.train.optim import adamw, layer_decay_groups, schedule_fn, set_lr
from d2v.train.pretrain import autocast


@dataclass(frozen=True)
class Task:
    modality: str
    kind: Literal["classification", "regression", "ctc"]
    dataset: str  # folder under data/shards
    train: str
    dev: str | None
    tests: tuple[str, ...]
    metrics: tuple[str, ...]  # the first is the headline (higher is better, except wer)
    num_outputs: int = 0
    stands_in_for: str = ""
    # shard keys (DATASET/SPLIT) of other datasets, scored as separate test sets when the profile prepares them
    extra_tests: tuple[str, ...] = ()

    def shard_key(self, split: str) -> str:
        """Where a split's shards live under `data_root/shards`: the task's dataset, or an extra test's own."""
        return split if split in self.extra_tests else f"{self.dataset}/{split}"


REAL_SPEECH_TESTS = ("real_speech/test_asterisk", "real_speech/test_librivox", "real_speech/test_cards")

TASKS: dict[str, Task] = {
    "fashion_mnist": Task("image", "classification", "fashion_mnist", "train_6k", None, ("test",), ("accuracy",),
                          10, "ImageNet-1K top-1"),
    "speech_10min": Task("speech", "ctc", "mini_librispeech", "train_1h-10min", "dev_clean",
                         ("dev_clean", "dev_other", "test_clean", "test_other"), ("wer", "cer"), 0,
                         "Libri-light 10 min → LibriSpeech WER", REAL_SPEECH_TESTS),
    "speech_1h": Task("speech", "ctc", "mini_librispeech", "train_1h", "dev_clean",
                      ("dev_clean", "dev_other", "test_clean", "test_other"), ("wer", "cer"), 0,
                      "Libri-light 1 h → LibriSpeech WER", REAL_SPEECH_TESTS),
    "rt_polarity": Task("text", "classification", "rt_polarity", "train", "dev", ("test",), ("accuracy",), 2,
                        "SST-2"),
    "bible_para": Task("text", "classification", "bible_para", "train", "dev", ("test",), ("accuracy", "f1"), 2,
                       "MRPC"),
    "lee_sts": Task("text", "regression", "lee_sts", "train", "dev", ("test",), ("pearson", "spearman"), 1,
                    "STS-B"),
    # paper scale (GPU clusters): the real benchmarks
    "imagenet": Task("image", "classification", "imagenet", "train", None, ("val",), ("accuracy",), 1000,
                     "ImageNet-1K top-1"),
    **{f"librispeech_{n}": Task("speech", "ctc", "librispeech", f"librilight_10h-{n}" if n != "10h" else
                                "librilight_10h", "dev-other", ("dev-clean", "dev-other", "test-clean", "test-other"),
                                ("wer", "cer"), 0, f"Libri-light {n} → LibriSpeech WER")
       for n in ("10min", "1h", "10h")},
    # GLUE dev sets, as the paper reports them [P1 Tab.4] (test labels are not public): the best checkpoint is
    # chosen on dev, as fairseq does; headline metrics per spec §9.3
    **{f"glue_{name}": Task("text", kind, f"glue/{name}", "train", dev, tests, metrics, outputs, f"GLUE {title}")
       for name, (kind, outputs, metrics, dev, tests, title) in {
           "cola": ("classification", 2, ("mcc", "accuracy"), "dev", ("dev",), "CoLA"),
           "sst2": ("classification", 2, ("accuracy",), "dev", ("dev",), "SST-2"),
           "mrpc": ("classification", 2, ("acc_and_f1", "accuracy", "f1"), "dev", ("dev",), "MRPC"),
           "qqp": ("classification", 2, ("acc_and_f1", "accuracy", "f1"), "dev", ("dev",), "QQP"),
           "stsb": ("regression", 1, ("pearson_and_spearman", "pearson", "spearman"), "dev", ("dev",), "STS-B"),
           "mnli": ("classification", 3, ("accuracy",), "dev_matched", ("dev_matched", "dev_mismatched"), "MNLI"),
           "qnli": ("classification", 2, ("accuracy",), "dev", ("dev",), "QNLI"),
           "rte": ("classification", 2, ("accuracy",), "dev", ("dev",), "RTE"),
       }.items()},
}


class FinetuneConfig(StrictModel):
    task: str
    init: Literal["pretrained", "scratch"] = "pretrained"
    mode: Literal["full", "probe"] = "full"
    pretrained: str | None = None  # final.pt of a pretraining run
    preset: str = "embedded"
    objective: Objective = "v1"  # the encoder architecture: data2vec 1.0's or 2.0's at the preset size
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = 0
    optim: OptimConfig
    layer_decay: float = Field(1.0, gt=0, le=1)  # image: BEiT layer-wise LR decay
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)  # image: MixUp alpha (0 = off)
    cutmix: float = Field(0.0, ge=0)  # image: CutMix alpha (0 = off)
    freeze_encoder_steps: int = Field(0, ge=0)  # CTC: only the output layer trains at first
    # CTC: the waveform CNN stays frozen (spec §9.2); training it too is the fairer from-scratch baseline, since a
    # frozen *random* CNN handicaps scratch runs
    train_cnn: bool = False
    ctc_masks: CTCMaskConfig = CTCMaskConfig()
    max_tokens: int = Field(128, ge=8)
    image: ImageAugConfig | None = None
    audio: AudioConfig | None = None
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    data_root: str = "data"
    tokenizer: str = "data/tokenizer/spm.model"
    letters: str = "data/tokenizer/letters.json"
    num_workers: int = Field(0, ge=0)
    device: str = "auto"  # auto: the GPU when there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # compile each encoder block in place (d2v.nn.compile)


EMBEDDED_FINETUNE: dict[str, dict] = {
    "fashion_mnist": dict(steps=600, batch_size=64, optim=dict(lr=1e-3, weight_decay=0.05, warmup_steps=60,
                                                               betas=(0.9, 0.999)),
                          layer_decay=0.75, label_smoothing=0.1, image=dict(FASHION_MNIST, randaugment_magnitude=5,
                                                                            random_erasing=0.1)),
    # CTC: tri-stage 10/40/50 % decaying to 0.05 of the peak (spec §9.2)
    "speech_10min": dict(steps=500, batch_size=8, optim=dict(lr=5e-4, schedule="tri_stage", final_lr_scale=0.05,
                                                             betas=(0.9, 0.98), weight_decay=0.0),
                         freeze_encoder_steps=100,
                         audio=dict(max_samples=240_000, min_samples=0), eval_every=100),
    "speech_1h": dict(steps=800, batch_size=8, optim=dict(lr=5e-4, schedule="tri_stage", final_lr_scale=0.05,
                                                          weight_decay=0.0),
                      freeze_encoder_steps=100, audio=dict(max_samples=240_000, min_samples=0), eval_every=200),
    "rt_polarity": dict(steps=600, batch_size=32, optim=dict(lr=1e-4, warmup_steps=36, weight_decay=0.1),
                        eval_every=200),
    "bible_para": dict(steps=600, batch_size=32, optim=dict(lr=1e-4, warmup_steps=36, weight_decay=0.1),
                       eval_every=200),
    "lee_sts": dict(steps=300, batch_size=16, optim=dict(lr=1e-4, warmup_steps=18, weight_decay=0.1), eval_every=100),
}


def finetune_config(task: str, overrides: dict | None = None) -> FinetuneConfig:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    cfg = validate(FinetuneConfig, merge({"task": task, **EMBEDDED_FINETUNE.get(task, {})}, overrides or {}),
                   f"finetune.{task}")
    check_decay_floor(cfg.optim, f"finetune.{task}")
    return cfg


# ------------------------------------------------------------------------------------------------------- models

def build_model(cfg: FinetuneConfig) -> torch.nn.Module:
    task = TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(task.modality, cfg.preset, cfg.objective)
    if cfg.init == "pretrained":
        if not cfg.pretrained or not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"finetune.{cfg.task}.pretrained: {cfg.pretrained!r} is not a pretraining "
                                    "final.pt (run `d2v pretrain` first, or use init=scratch)")
        state = torch.load(cfg.pretrained, map_location="cpu", weights_only=False)
        saved = (state.get("modality"), state.get("preset"), state.get("objective", "v1"))
        if saved != (task.modality, cfg.preset, cfg.objective):
            raise ValueError(f"{cfg.pretrained}: a {'/'.join(map(str, saved))} encoder, task {cfg.task} needs "
                             f"{task.modality}/{cfg.preset}/{cfg.objective} (modality/preset/objective)")
        encoder.load_state_dict(state["encoder"])
    probe = cfg.mode == "probe"
    if task.kind == "ctc":
        model = CTCModel(encoder, len(LetterTokenizer.load(cfg.letters).symbols), cfg.ctc_masks, linear_probe=probe,
                         freeze_cnn=not cfg.train_cnn)
    elif task.modality == "image":
        model = ImageClassifier(encoder, task.num_outputs, linear_probe=probe)
    else:
        model = TextClassifier(encoder, task.num_outputs, linear_probe=probe)
    if probe:
        encoder.requires_grad_(False)
    return model


def param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    task = TASKS[cfg.task]
    if task.modality == "image" and cfg.layer_decay < 1.0 and cfg.mode == "full":
        depth = model.encoder.cfg.depth

        def layer_of(name: str) -> int:
            if name.startswith("encoder.blocks."):
                return int(name.split(".")[2]) + 1
            return 0 if name.startswith("encoder.") else depth + 1
        return layer_decay_groups(model.named_parameters(), layer_of, depth, cfg.layer_decay, cfg.optim.weight_decay)
    return adamw([p for p in model.parameters() if p.requires_grad], cfg.optim.lr, cfg.optim.weight_decay,
                 cfg.optim.betas, cfg.optim.eps).param_groups


# -------------------------------------------------------------------------------------------------------- data

def loader(cfg: FinetuneConfig, split: str, train: bool):
    task = TASKS[cfg.task]
    shards = Path(cfg.data_root) / "shards" / task.shard_key(split)
    mode = "finetune" if train else "eval"
    if task.modality == "image":
        ds = image_loader(shards, cfg.image or ImageAugConfig(), mode, cfg.batch_size, resampled=train,
                          seed=cfg.seed, partial=not train)
    elif task.modality == "speech":
        ds = speech_loader(shards, cfg.audio or AudioConfig(), mode, cfg.batch_size, resampled=train,
                           letters=LetterTokenizer.load(cfg.letters), seed=cfg.seed, partial=not train)
    else:
        ds = text_task_loader(shards, TextTokenizer(cfg.tokenizer), cfg.batch_size, cfg.max_tokens, mode,
                              seed=cfg.seed, resampled=train)
    return web_loader(ds, cfg.num_workers if train else 0, seed=cfg.seed)


def as_inputs(item, modality: str, device: torch.device) -> dict:
    """A loader item as a dict of model inputs on `device` (transcripts stay on the host)."""
    inputs = {"batch": Batch(source=item[0]), "labels": item[1]} if modality == "image" else dict(item)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[key] = value.to(device, non_blocking=True)
        elif isinstance(value, Batch):
            mask = value.padding_mask
            inputs[key] = Batch(source=value.source.to(device, non_blocking=True),
                                padding_mask=None if mask is None else mask.to(device, non_blocking=True))
    return inputs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"finetune.device: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def mix(cfg: FinetuneConfig, num_classes: int):
    """MixUp / CutMix (torchvision v2), one of them per batch, or None."""
    from torchvision.transforms import v2

    choices = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
              ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return v2.RandomChoice(choices) if choices else None


# -------------------------------------------------------------------------------------------------------- loop

def train_loss(model, inputs: dict, task: Task, cfg: FinetuneConfig, mixer, rng) -> torch.Tensor:
    if task.kind == "ctc":
        logits, lengths = model(inputs["batch"], rng)
        return ctc_loss(logits, lengths, inputs["targets"], inputs["target_lengths"])
    batch, labels = inputs["batch"], inputs["labels"]
    if task.kind == "regression":
        return F.mse_loss(model(batch).squeeze(-1), labels.float())
    labels = labels.long()
    if mixer is not None:
        source, labels = mixer(batch.source, labels)  # soft labels
        batch = Batch(source=source)
    return F.cross_entropy(model(batch), labels, label_smoothing=cfg.label_smoothing)


@torch.no_grad()
def predict(model, cfg: FinetuneConfig, split: str, amp=None) -> tuple[list, list]:
    """(predictions, references) over a whole split, in shard order, on the model's device."""
    task = TASKS[cfg.task]
    device = next(model.parameters()).device
    model.eval()
    preds, refs = [], []
    letters = LetterTokenizer.load(cfg.letters) if task.kind == "ctc" else None
    for item in loader(cfg, split, train=False):
        inputs = as_inputs(item, task.modality, device)
        with amp or contextlib.nullcontext():
            out = model(inputs["batch"])
        if task.kind == "ctc":
            logits, lengths = out
            preds += [letters.decode(ids) for ids in ctc_greedy(logits.float().cpu().numpy(), lengths.tolist())]
            refs += inputs["text"]
        elif task.kind == "regression":
            preds += out.float().squeeze(-1).tolist()
            refs += inputs["labels"].tolist()
        else:
            preds += out.argmax(-1).tolist()
            refs += inputs["labels"].long().tolist()
    model.train()
    return preds, refs


def score(task: Task, preds: list, refs: list) -> dict[str, float]:
    return {m: TASK_METRICS[m](preds, refs) for m in task.metrics}


def selection_key(task: Task, metrics: dict[str, float]) -> tuple[float, ...]:
    """Higher is better: the headline metric, ties broken by the task's next ones (CTC: WER, then CER, since at
    small budgets WER stays at 1.0 while CER already falls). An undefined metric (NaN) ranks below every value."""
    signed = (oriented(m, metrics[m]) for m in task.metrics)
    return tuple(-math.inf if math.isnan(v) else v for v in signed)


def headline(task: Task, metrics: dict[str, float]) -> float:
    """Higher is better."""
    return oriented(task.metrics[0], metrics[task.metrics[0]])


def run_finetune(cfg: FinetuneConfig, out_dir: str | Path, progress: bool = True) -> dict:
    task = TASKS[cfg.task]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device)
    if cfg.compile:
        compile_regions(model.encoder)
    amp, _ = autocast(device, cfg.precision)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps)
    lr_at = schedule_fn(cfg.optim.schedule, cfg.steps, cfg.optim.warmup_steps, cfg.optim.final_lr_scale,
                        cfg.optim.tri_stage_phases)
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder_params = {id(p) for p in model.encoder.parameters()}
    mixer = mix(cfg, task.num_outputs) if task.modality == "image" else None
    log = MetricsLog(out_dir / "metrics.csv")
    stream = iter(loader(cfg, task.train, train=True))
    model.train()
    if cfg.mode == "probe":
        model.encoder.eval()
    best, best_metrics = None, None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"finetune {cfg.task} ({cfg.init}, {cfg.mode})", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        lr = set_lr(optimizer, cfg.optim.lr, lr_at(step - 1))
        rng = np.random.default_rng([cfg.seed, step])
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
        with amp:
            loss = train_loss(model, as_inputs(next(stream), task.modality, device), task, cfg, mixer, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step <= cfg.freeze_encoder_steps:  # output layer only at first (fairseq freeze_finetune_updates)
            for p in trainable:
                if id(p) in encoder_params:
                    p.grad = None
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip_norm)
        optimizer.step()
        row = {"step": step, "loss": loss.item(), "lr": lr}
        if task.dev and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            dev = score(task, *predict(model, cfg, task.dev, amp))
            row.update({f"dev_{k}": v for k, v in dev.items()})
            key = selection_key(task, dev)
            if best is None or key > best:
                best, best_metrics = key, dev
                _save(model, cfg, out_dir / "best.pt", step)
        log.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
    if bar is not None:
        bar.close()
    _save(model, cfg, out_dir / "final.pt", cfg.steps)
    if best_metrics is None:
        _save(model, cfg, out_dir / "best.pt", cfg.steps)  # no dev split: the final model is the one we keep
    df = log.frame()
    plot_curves(df, out_dir / "curves.png", ["loss", "lr"] + [c for c in df.columns if c.startswith("dev_")],
                f"fine-tuning {cfg.task} ({cfg.init}, {cfg.mode})")
    summary = {"task": cfg.task, "init": cfg.init, "mode": cfg.mode, "seed": cfg.seed, "steps": cfg.steps,
               "seconds": round(time.perf_counter() - start, 1), "best_dev": best_metrics}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _save(model, cfg: FinetuneConfig, path: Path, step: int) -> None:
    atomic_torch_save(path, {"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "step": step})


# ---------------------------------------------------------------------------------------------------- evaluate

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_digest(cfg: StrictModel) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def eval_file_name(task: str, split: str) -> str:
    return f"{task}-{split.replace('/', '-')}.json"


def evaluate(run_dir: str | Path, split: str | None = None, out: str | Path | None = None,
             checkpoint_name: str = "best.pt", extra: tuple[str, ...] = ()) -> list[dict]:
    """Score a fine-tuning run on its test splits (or `split`), then on the `extra` test sets (of the task's
    `extra_tests`); one JSON per split."""
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned model (run `d2v finetune` first)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = FinetuneConfig.model_validate(state["config"])
    task = TASKS[cfg.task]
    model = build_model(cfg.model_copy(update={"init": "scratch"}))
    model.load_state_dict(state["model"])
    device = resolve_device(cfg.device)
    model.to(device)
    amp, _ = autocast(device, cfg.precision)
    results = []
    unknown = sorted(set(extra) - set(task.extra_tests))
    if unknown:
        raise ValueError(f"{cfg.task}: no extra test set {unknown}; it has {list(task.extra_tests) or 'none'}")
    for s in [*([split] if split else task.tests), *extra]:
        preds, refs = predict(model, cfg, s, amp)
        result = {"task": cfg.task, "stands_in_for": task.stands_in_for, "split": s, "init": cfg.init,
                  "mode": cfg.mode, "metrics": score(task, preds, refs), "n": len(refs), "seed": cfg.seed,
                  "commit": git_commit(), "params_digest": config_digest(cfg), "checkpoint": str(path),
                  "steps": state["step"]}
        target = Path(out or run_dir / "eval") / eval_file_name(cfg.task, s)
        atomic_write_json(target, result)
        results.append(result)
    return results
