"""Build a modality plug-in and its objective defaults from a preset name."""
from __future__ import annotations

from d2v.config import ObjectiveConfig
from d2v.modalities.base import Modality
from d2v.modalities.image import IMAGE_PRESETS, BlockMaskConfig, ImageEncoder, ImageModality, image_objective
from d2v.modalities.speech import SPEECH_PRESETS, SpanMaskConfig, SpeechEncoder, SpeechModality, speech_objective
from d2v.modalities.text import TEXT_PRESETS, TextEncoder, TextModality, TokenMaskConfig, Vocabulary, text_objective

MODALITIES = ("image", "speech", "text")
ENCODERS = {"image": (IMAGE_PRESETS, ImageEncoder), "speech": (SPEECH_PRESETS, SpeechEncoder),
            "text": (TEXT_PRESETS, TextEncoder)}


def block_mask_for_grid(grid: tuple[int, int]) -> BlockMaskConfig:
    """BEiT's 120/196 masked patches and 16-patch minimum block, scaled to the grid size."""
    n = grid[0] * grid[1]
    if n == 196:
        return BlockMaskConfig()
    return BlockMaskConfig(num_mask_patches=max(1, round(n * 120 / 196)), min_patches=max(1, round(n * 16 / 196)))


def build_modality(name: str, preset: str = "base") -> tuple[Modality, ObjectiveConfig]:
    """Encoder + masking + the recipe's objective for `name` in {image, speech, text}.

    Masking and the number of averaged layers K are the paper's, scaled to the preset: K is capped at the depth.
    """
    encoder = build_encoder(name, preset)
    if name == "image":
        modality, objective = ImageModality(encoder, block_mask_for_grid(encoder.cfg.grid)), image_objective()
    elif name == "speech":
        modality, objective = SpeechModality(encoder, SpanMaskConfig()), speech_objective()
    else:
        vocab = Vocabulary(size=encoder.cfg.vocab_size, pad=encoder.cfg.pad_idx)
        modality, objective = TextModality(encoder, vocab, TokenMaskConfig()), text_objective()
    return modality, objective.model_copy(update={"top_k": min(objective.top_k, encoder.cfg.depth)})


def build_encoder(name: str, preset: str):
    if name not in ENCODERS:
        raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
    table, encoder_cls = ENCODERS[name]
    if preset not in table:
        raise ValueError(f"unknown {name} preset {preset!r}; expected one of {sorted(table)}")
    return encoder_cls(table[preset])
