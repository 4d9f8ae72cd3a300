"""Build a modality plug-in and its objective defaults from a preset name."""
from __future__ import annotations

from typing import get_args

from d2v.config import MODALITIES, Objective, ObjectiveConfig
from d2v.modalities import image, speech, text
from d2v.modalities.base import Modality
from d2v.modalities.image import IMAGE_PRESETS, BlockMaskConfig, ImageEncoder, ImageModality, image_objective
from d2v.modalities.speech import SPEECH_PRESETS, SpanMaskConfig, SpeechEncoder, SpeechModality, speech_objective
from d2v.modalities.text import TEXT_PRESETS, TextEncoder, TextModality, TokenMaskConfig, Vocabulary, text_objective

OBJECTIVES = get_args(Objective)
ENCODERS = {"image": (IMAGE_PRESETS, ImageEncoder), "speech": (SPEECH_PRESETS, SpeechEncoder),
            "text": (TEXT_PRESETS, TextEncoder)}
ENCODER_CONFIGS = {name: type(presets["base"]) for name, (presets, _) in ENCODERS.items()}  # the config class
# data2vec 2.0 keeps each preset's size and changes the architecture where the v2 recipe does
V2_ARCHITECTURE = {"image": image.v2_encoder, "speech": speech.v2_encoder, "text": lambda cfg, size="base": cfg}
V1_RECIPES = {"image": image_objective, "speech": speech_objective, "text": text_objective}
# presets that come with their own data2vec 1.0 recipe, not the modality's; data2vec 2.0 published none for them
V1_PRESET_RECIPES = {("speech", "audioset"): speech.speech_objective_audioset}
V2_RECIPES = {"image": image.image_objective_v2, "speech": speech.speech_objective_v2,
              "text": text.text_objective_v2}


def objectives_of(name: str, preset: str) -> tuple[str, ...]:
    """The objectives a preset has a recipe for: both, or v1 alone for a preset of a v1-only recipe."""
    return ("v1",) if (name, preset) in V1_PRESET_RECIPES else OBJECTIVES


def block_mask_for_grid(grid: tuple[int, int]) -> BlockMaskConfig:
    """BEiT's 120/196 masked patches and 16-patch minimum block, scaled to the grid size."""
    n = grid[0] * grid[1]
    if n == 196:
        return BlockMaskConfig()
    return BlockMaskConfig(num_mask_patches=max(1, round(n * 120 / 196)), min_patches=max(1, round(n * 16 / 196)))


def v2_recipe_size(preset: str) -> str:
    """data2vec 2.0 publishes a Base and a Large recipe per modality, and a Huge one for images (spec §8.5); the
    large and huge presets take theirs, every other preset Base's at its own size."""
    return preset if preset in ("large", "huge") else "base"


def v2_top_k(name: str, recipe_k: int, depth: int) -> int:
    """Image v2 averages the main blocks, not the prenet (2 of 12 for B); the other recipes cap K at the depth."""
    if name == "image":
        return {12: 10, 24: 18, 32: 24}.get(depth, max(1, round(depth * 10 / 12)))  # Huge: 24 (spec §8.5)
    return min(recipe_k, depth)


def build_modality(name: str, preset: str = "base", objective: Objective = "v1") -> tuple[Modality, ObjectiveConfig]:
    """Encoder + masking + the recipe's objective for `name` in {image, speech, text}.

    Masking and the number of averaged layers K are the paper's, scaled to the preset: K is capped at the depth.
    With objective v2 the encoder is the preset's size in the v2 architecture, and the recipe is data2vec 2.0's.
    """
    encoder = build_encoder(name, preset, objective)
    modality = _modality(name, encoder)
    if objective == "v2":
        recipe = V2_RECIPES[name](encoder.dim, size=v2_recipe_size(preset))
        return modality, recipe.model_copy(update={"top_k": v2_top_k(name, recipe.top_k, encoder.cfg.depth)})
    recipe = V1_PRESET_RECIPES.get((name, preset), V1_RECIPES[name])()
    return modality, recipe.model_copy(update={"top_k": min(recipe.top_k, encoder.cfg.depth)})


def _modality(name: str, encoder) -> Modality:
    """The plug-in with the v1 masking scaled to the encoder (v2 masks come from the objective's config)."""
    if name == "image":
        return ImageModality(encoder, block_mask_for_grid(encoder.cfg.grid))
    if name == "speech":
        return SpeechModality(encoder, SpanMaskConfig())
    vocab = Vocabulary(size=encoder.cfg.vocab_size, pad=encoder.cfg.pad_idx)
    return TextModality(encoder, vocab, TokenMaskConfig())


def encoder_config(name: str, preset: str, objective: Objective = "v1", **fields):
    """The encoder config of a modality's preset under an objective's architecture, with `fields` (e.g. a
    fine-tuning's dropouts) replaced and validated."""
    if name not in ENCODERS:
        raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    table, _ = ENCODERS[name]
    if preset not in table:
        raise ValueError(f"unknown {name} preset {preset!r}; expected one of {sorted(table)}")
    cfg = V2_ARCHITECTURE[name](table[preset], size=v2_recipe_size(preset)) if objective == "v2" else table[preset]
    return type(cfg).model_validate({**cfg.model_dump(), **fields}) if fields else cfg


def build_encoder(name: str, preset: str, objective: Objective = "v1", **fields):
    return ENCODERS[name][1](encoder_config(name, preset, objective, **fields))


def build_objective(name: str, preset: str, objective: Objective = "v1"):
    """The objective module (Data2Vec or Data2Vec2) with the recipe for this modality and preset."""
    return make_objective(*build_modality(name, preset, objective))


def make_objective(modality: Modality, cfg: ObjectiveConfig):
    """Data2Vec2 when the config has a `v2` section, else Data2Vec."""
    from d2v.data2vec import Data2Vec
    from d2v.data2vec2 import Data2Vec2

    return (Data2Vec2 if cfg.v2 is not None else Data2Vec)(modality, cfg)
