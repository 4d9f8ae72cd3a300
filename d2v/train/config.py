"""Typed run configurations for the training stages, with per-modality defaults for the embedded profile."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from d2v.config import (AudioConfig, ConfigError, EMAConfig, ImageAugConfig, Objective, StrictModel, TokenMaskConfig,
                        validate)


class OptimConfig(StrictModel):
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_norm: float | None = Field(None, gt=0)
    schedule: Literal["cosine", "linear", "tri_stage", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    final_lr_scale: float = Field(0.0, ge=0, le=1)
    tri_stage_phases: tuple[float, float, float] = (0.1, 0.4, 0.5)


def check_decay_floor(optim: OptimConfig, where: str) -> None:
    """A tri-stage decay is exponential and cannot reach 0: a recipe must name its floor. (Checked where recipes
    and overrides are combined, not on a saved run's config, so older runs still load.)"""
    if optim.schedule == "tri_stage" and optim.final_lr_scale == 0:
        raise ConfigError(f"{where}.optim.final_lr_scale: tri_stage decays exponentially and cannot reach 0; set it "
                          f"above 0 (fairseq: 0.05 for CTC fine-tuning, 0.01 for speech pretraining)")


class DataConfig(StrictModel):
    shards: str  # folder with index.json
    batch_size: int = Field(ge=1)  # per rank and per micro-batch
    num_workers: int = Field(0, ge=0)
    shuffle: int = Field(1000, ge=0)  # sample shuffle buffer
    image: ImageAugConfig | None = None
    audio: AudioConfig | None = None
    block_tokens: int = Field(128, ge=8)  # text: tokens per packed block


# How a resumed run continues its data stream. `replay` reads the batches before the checkpoint again: bit-identical
# to an uninterrupted run, at the cost of decoding them again (ImageNet at 256 images a GPU-step and 10 workers: about
# 0.4 s a step, 40 h at step 400k). `reseed` starts a fresh stream keyed by (seed, step): no replay, the same
# distribution, other batches. `seek` reads another stream, one seeded permutation per epoch of the samples (of text
# pretraining's blocks, cut once from the corpus as fairseq cuts them) read by random access (d2v.data.seekable),
# which resumes at any batch by arithmetic and bit-identically.
StreamResume = Literal["replay", "reseed", "seek"]


class CheckpointConfig(StrictModel):
    every: int = Field(500, ge=1)
    keep: int = Field(2, ge=1)


class PretrainConfig(StrictModel):
    modality: Literal["image", "speech", "text"]
    preset: str = "embedded"
    objective: Objective = "v1"  # data2vec 1.0, or 2.0 (the preset's size in the v2 architecture)
    clones: int | None = Field(None, ge=1)  # v2: masked clones per sample (None = the recipe's M)
    steps: int = Field(ge=1)
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step (effective batch = batch·accum·ranks)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # fp16: a run whose loss scale falls below it has diverged (fairseq's min_loss_scale); None: the recipe's
    min_loss_scale: float | None = Field(None, gt=0)
    # fp16: the loss scaler's first scale and the overflow-free updates before it doubles (fairseq's fp16_init_scale
    # and fp16_scale_window); None: fairseq's defaults, 2^7 and 2^14 / (ranks · accum_steps)
    fp16_init_scale: float | None = Field(None, gt=0)
    fp16_scale_window: int | None = Field(None, ge=1)
    compile: bool = False
    # under torchrun: ddp replicates the model on every rank; fsdp shards parameters, gradients and AdamW states
    parallel: Literal["ddp", "fsdp"] = "ddp"
    optim: OptimConfig
    data: DataConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    stream_resume: StreamResume = "replay"
    ema: EMAConfig | None = None  # None: the modality recipe's τ schedule
    top_k: int | None = Field(None, ge=1)  # teacher layers averaged into targets (None: the recipe's K ≤ depth)
    text_mask: TokenMaskConfig | None = None  # text v1 masking (None: the paper's 15 %, 80/10/10)
    center_targets: Literal["none", "position"] | None = None  # experimental (ObjectiveConfig); None: "none"
    # speech: gradient scale on the front end (fairseq feature_grad_mult; 0 freezes it); None: 1
    local_grad_mult: float | None = Field(None, ge=0, le=1)
    # speech, text: the local encoder (front end + projection; embeddings) stays at its initialisation (not in
    # the papers)
    freeze_local_encoder: bool = False
    collapse_warmup: float = Field(0.75, ge=0, le=1)  # the guard arms after this fraction of the steps
    log_every: int = Field(10, ge=1)
    # a second stage: the student and its predictor from this pretraining final.pt, the teacher reset to that
    # student; optimizer, LR schedule, τ and steps start afresh (v1 ViT-L's second 800 epochs, spec §4)
    init_from: str | None = None


FASHION_MNIST = dict(size=32, channels=1, mean=(0.286,), std=(0.353,), crop_pct=1.0, min_scale=0.35)

EMBEDDED_PRETRAIN: dict[str, dict] = {
    "image": dict(modality="image", steps=1500, optim=dict(lr=1.5e-3, weight_decay=0.05, clip_norm=3.0,
                                                           warmup_steps=150, betas=(0.9, 0.999)),
                  data=dict(shards="data/shards/fashion_mnist/train", batch_size=64, image=FASHION_MNIST),
                  ema=dict(tau_start=0.998, tau_end=0.9998, tau_steps=1500)),
    "speech": dict(modality="speech", steps=600, optim=dict(lr=5e-4, warmup_steps=60, clip_norm=5.0),
                   data=dict(shards="data/shards/mini_librispeech/pretrain", batch_size=8,
                             audio=dict(max_samples=64_000, min_samples=16_000)),
                   ema=dict(tau_start=0.995, tau_end=0.9995, tau_steps=600)),
    "text": dict(modality="text", steps=1200, optim=dict(lr=1e-3, warmup_steps=120, clip_norm=1.0),
                 data=dict(shards="data/shards/text_corpus/pretrain", batch_size=32, block_tokens=128),
                 ema=dict(tau_start=0.998, tau_end=0.9998, tau_steps=1200)),
}


# data2vec 2.0 at the embedded sizes: M clones amortise one teacher pass, so fewer samples per batch; the v2
# recipes' LR and τ (spec §8.5) compressed to a few hundred CPU steps.
EMBEDDED_PRETRAIN_V2: dict[str, dict] = {
    "image": dict(clones=8, steps=600, optim=dict(lr=2e-3, weight_decay=0.05, clip_norm=4.0, warmup_steps=60,
                                                  betas=(0.9, 0.95), eps=1e-8),
                  data=dict(batch_size=32), ema=dict(tau_start=0.998, tau_end=0.9999, tau_steps=600)),
    "speech": dict(clones=4, steps=300, optim=dict(lr=7.5e-4, warmup_steps=30, clip_norm=None, eps=1e-6),
                   data=dict(batch_size=4), ema=dict(tau_start=0.995, tau_end=0.9999, tau_steps=300)),
    "text": dict(clones=4, steps=600, optim=dict(lr=1e-3, warmup_steps=60, clip_norm=1.0),
                 data=dict(batch_size=16), ema=dict(tau_start=0.998, tau_end=0.9999, tau_steps=600)),
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# The papers' model sizes. Their runs start from the typed defaults above (the papers' values; None fields are the
# modality recipe's), never from the CPU-scale embedded recipes: a field a GPU profile leaves out would otherwise
# inherit Fashion-MNIST's statistics, or a τ schedule and clone count sized for a few hundred CPU steps.
PAPER_PRESETS = frozenset({"base", "large", "huge", "audioset"})


def recipe_defaults(modality: str, preset: str, objective: str | None) -> dict:
    """What the overrides of a `preset` run are merged onto: the embedded recipe (v1, or v2) at the embedded sizes,
    only the modality at the papers' sizes."""
    if preset in PAPER_PRESETS:
        return {"modality": modality}
    base = EMBEDDED_PRETRAIN[modality]
    return merge(base, EMBEDDED_PRETRAIN_V2[modality]) if objective == "v2" else base


def pretrain_config(modality: str, overrides: dict | None = None) -> PretrainConfig:
    """`overrides` on the recipe defaults of their preset (default: embedded) and objective (default: v1)."""
    if modality not in EMBEDDED_PRETRAIN:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(EMBEDDED_PRETRAIN)}")
    overrides = overrides or {}
    preset = overrides.get("preset", PretrainConfig.model_fields["preset"].default)
    base = recipe_defaults(modality, preset, overrides.get("objective"))
    try:
        cfg = validate(PretrainConfig, merge(base, overrides), f"pretrain.{modality}")
    except ConfigError as err:
        if preset not in PAPER_PRESETS:
            raise
        raise ConfigError(f"{err}\n  (preset {preset!r} is a paper size: it takes no embedded defaults, so state at "
                          f"least steps, optim.lr, data.shards and data.batch_size)") from None
    check_decay_floor(cfg.optim, f"pretrain.{modality}")
    return cfg
