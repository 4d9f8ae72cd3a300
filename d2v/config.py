"""Typed, validated configuration. Every config is a strict pydantic model: unknown keys and wrong types are
rejected with an error that names the key and what was expected.

This module imports no torch: `params.yaml` is validated (by Snakemake, DVC and the data stages) from these types
and the task table (`d2v.train.tasks`) without paying for torch's import."""
from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Objective = Literal["v1", "v2"]  # data2vec 1.0 or 2.0
MODALITIES = ("image", "speech", "text")


class ConfigError(ValueError):
    """A config failed validation; the message names each bad key."""


def validate(model: type[StrictModel], data: dict, where: str = "params") -> StrictModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in (where, *e["loc"]))
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def config_digest(cfg: StrictModel) -> str:
    """A short digest of a resolved config, recorded beside each result."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class EMAConfig(StrictModel):
    """τ ramps linearly from tau_start to tau_end over tau_steps updates, then stays (spec §1)."""

    tau_start: float = Field(0.999, ge=0.0, le=1.0)
    tau_end: float = Field(0.9999, ge=0.0, le=1.0)
    tau_steps: int = Field(30_000, ge=0)  # 0 means τ = tau_end from the first update

    @classmethod
    def constant(cls, tau: float) -> "EMAConfig":
        return cls(tau_start=tau, tau_end=tau, tau_steps=0)


class LossConfig(StrictModel):
    kind: Literal["l2", "smooth_l1"] = "l2"
    beta: float = Field(0.0, ge=0.0)  # Smooth-L1 transition point
    reduction: Literal["sum_over_dim", "mean"] = "sum_over_dim"  # sum over D per position, or mean over elements
    scale: float | Literal["inv_sqrt_dim"] = "inv_sqrt_dim"

    @model_validator(mode="after")
    def _beta_for_smooth_l1(self):
        if self.kind == "smooth_l1" and self.beta <= 0:
            raise ValueError("loss.beta must be > 0 for smooth_l1")
        return self


class CollapseConfig(StrictModel):
    """Stop the run when representations collapse (spec §1, §14)."""

    min_target_var: float = Field(0.1, ge=0.0)
    min_pred_var: float = Field(0.01, ge=0.0)
    min_local_var: float = Field(0.0, ge=0.0)  # variance of the local encoder output (speech front-end collapse)
    # effective rank of the targets (logged at log steps): a collapse onto a few dimensions keeps every variance up
    min_target_rank: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(5000, ge=0)  # the guard is armed only after this many updates


class V2MaskConfig(StrictModel):
    """data2vec 2.0 masks (spec §8.3): each clone hides exactly ⌊T·prob⌋ tokens, drawn as blocks of `length`
    (2-D for images, 1-D for speech; length 1 = random masking for text); `inverse` draws the visible region."""

    prob: float = Field(gt=0, lt=1)
    length: int = Field(1, ge=1)
    adjust: float = Field(0.0, ge=0, lt=1)  # extra block centres so overlaps still reach the target count
    inverse: bool = False


class DecoderConfig(StrictModel):
    """data2vec 2.0 conv decoder (spec §8.2): `layers` × [conv(k, groups) -> LN without affine -> GELU]."""

    dim: int = Field(ge=1)
    kernel: int = Field(ge=1)
    groups: int = Field(1, ge=1)
    layers: int = Field(ge=1)
    residual: bool = True
    projection_layers: Literal[1, 2] = 1
    input_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _shapes(self):
        if self.kernel % 2 == 0:
            raise ValueError(f"decoder.kernel must be odd ('same' padding), got {self.kernel}")
        if self.dim % self.groups:
            raise ValueError(f"decoder.dim={self.dim} must be divisible by decoder.groups={self.groups}")
        return self


class V2Config(StrictModel):
    """What data2vec 2.0 adds to the objective (spec §8): clones, masks that drop tokens, the conv decoder."""

    clones: int = Field(ge=1)  # M masked views per sample sharing one teacher pass
    mask: V2MaskConfig
    decoder: DecoderConfig
    mask_noise_std: float = Field(0.01, ge=0)  # decoder placeholders at masked slots
    cls_loss: float = Field(0.0, ge=0)  # image: [CLS] regresses the patch-mean target
    teacher_shared_prefixes: tuple[str, ...] = ()  # copied, not averaged (EMA scope per modality)
    teacher_reads_student_features: bool = False  # speech, text: the teacher starts from the student's local output


class ObjectiveConfig(StrictModel):
    """The data2vec objective for one modality: 1.0, or 2.0 when `v2` is set."""

    top_k: int = Field(8, ge=1)
    target_tap: Literal["ffn", "block"] = "ffn"  # FFN output before residual, or block output (v1 vision)
    layer_norm_targets: Literal["instance", "layer", "none"] = "instance"  # per-layer norm before averaging
    final_norm: Literal["layer", "instance", "none"] = "none"  # norm after averaging
    # experimental, not in the papers: subtract each position's batch-mean target, the part of the targets that
    # position alone predicts (docs/findings.md, text)
    center_targets: Literal["none", "position"] = "none"
    head: Literal["linear", "mlp2"] = "linear"
    loss: LossConfig = LossConfig()
    ema: EMAConfig = EMAConfig()
    collapse: CollapseConfig = CollapseConfig()
    v2: V2Config | None = None


# ------------------------------------------------------------------------------------ data and task settings
# Settings of the loaders (d2v.data.loaders), the text masks (d2v.modalities.text) and the CTC head
# (d2v.modalities.heads), kept here so that the training configs that embed them import no torch.

class ImageAugConfig(StrictModel):
    """Spec §5.2 / §9.1 transforms, scaled: sizes come from the encoder, statistics from the dataset."""

    size: int = Field(224, ge=8)
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    min_scale: float = Field(0.08, gt=0, le=1)  # RandomResizedCrop lower bound (v1 pretraining 0.08, v2 0.2)
    color_jitter: float = Field(0.4, ge=0)  # pretraining only (BEiT transforms)
    hflip: float = Field(0.5, ge=0, le=1)
    randaugment_magnitude: int = Field(9, ge=0)  # fine-tuning: RandAugment(2, m); 0 disables
    random_erasing: float = Field(0.25, ge=0, le=1)  # fine-tuning
    crop_pct: float = Field(0.875, gt=0, le=1)  # eval: resize to size/crop_pct, centre-crop size

    @model_validator(mode="after")
    def _statistics_per_channel(self):
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean {list(self.mean)} and std {list(self.std)} need one value per channel "
                             f"(channels: {self.channels})")
        return self


class AudioConfig(StrictModel):
    sample_rate: int = 16_000
    max_samples: int = Field(320_000, ge=400)  # 20 s crop (spec §2.1)
    min_samples: int = Field(32_000, ge=0)  # shorter utterances are skipped (2 s in the Base recipe)
    normalize: bool = True  # zero mean, unit variance over the whole waveform


class TokenMaskConfig(StrictModel):
    """Paper default (spec §15): 15 %, single tokens, 80/10/10; the released span variant is p=0.35, length 4, 0/0."""

    prob: float = Field(0.15, gt=0, lt=1)
    length: int = Field(1, ge=1)
    leave_unmasked_prob: float = Field(0.1, ge=0, le=1)
    random_token_prob: float = Field(0.1, ge=0, le=1)
    loss_on: Literal["mask_token", "selected"] = "mask_token"  # released code: only <mask>-replaced positions

    @model_validator(mode="after")
    def _probs(self):
        if self.leave_unmasked_prob + self.random_token_prob > 1:
            raise ValueError("leave_unmasked_prob + random_token_prob must be <= 1")
        return self


class SpeechMaskConfig(StrictModel):
    """Speech fine-tuning masks (wav2vec 2.0 §4: time spans with the mask embedding, channel spans zeroed); CTC's
    defaults."""

    time_prob: float = Field(0.3, ge=0, lt=1)
    time_length: int = Field(10, ge=1)
    channel_prob: float = Field(0.1, ge=0, lt=1)
    channel_length: int = Field(16, ge=1)


# YAML 1.2 reads `1e-3` as a number; PyYAML follows YAML 1.1, which wants a dot (`1.0e-3`) and reads `1e-3` as a
# string: pydantic then coerces it in the typed configs, but overrides recorded as given keep the string
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, with YAML 1.2's floats without a dot."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))
    return Loader


def load_yaml(source: str | IO, where: str) -> object:
    """Parse YAML (a string or an open file) safely, `1e-3` as the number it is; text that is not YAML raises a
    ConfigError naming `where` (and, for a file, the line). Every YAML d2v reads goes through here: params.yaml,
    `--config` files and `--set` values."""
    import yaml

    try:
        return yaml.load(source, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from err


def _parse_overrides(pairs: list[str]):
    """`a.b=value` command-line pairs → (dotted key, value parsed as YAML)."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not all(part.isidentifier() for part in key.split(".")):
            raise ValueError(f"--set expects key=value (dotted keys allowed), got {pair!r}")
        yield key, load_yaml(value, f"--set {pair}")


def nested_overrides(pairs: list[str]) -> dict:
    """`a.b=value` pairs → {'a': {'b': value}}."""
    out: dict = {}
    for key, value in _parse_overrides(pairs):
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out

