"""Typed, validated configuration. Every config is a strict pydantic model: unknown keys and wrong types are
rejected with an error that names the key and what was expected."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Objective = Literal["v1", "v2"]  # data2vec 1.0 or 2.0


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
    # position alone predicts (see README, "Text: what the student learns")
    center_targets: Literal["none", "position"] = "none"
    head: Literal["linear", "mlp2"] = "linear"
    loss: LossConfig = LossConfig()
    ema: EMAConfig = EMAConfig()
    collapse: CollapseConfig = CollapseConfig()
    v2: V2Config | None = None
