"""Build a modality plug-in and its objective defaults from a preset name."""
from __future__ import annotations

from d2v.config import ObjectiveConfig
from d2v.modalities.base import Modality
from d2v.modalities.image import IMAGE_PRESETS, BlockMaskConfig, ImageEncoder, ImageModality, image_objective
from d2v.modalities.speech import SPEECH_PRESETS, SpanMaskConfig, SpeechEncoder, SpeechModality, speech_objective
from d2v.modalities.text import TEXT_PRESETS, TextEncoder, TextModality, TokenMaskConfig, Vocabulary, text_objective

MODALITIES = ("image", "speech", "text")


def block_mask_for_grid(grid: tuple[int, int]) -> BlockMaskConfig:
    """BEiT's 120/196 masked patches and 16-patch minimum block, scaled to the grid size."""
    n = grid[0] * grid[1]
    if n == 196:
        return BlockMaskConfig()
    return BlockMaskConfig(num_mask_patches=max(1, round(n * 120 / 196)), min_patches=max(1, round(n * 16 / 196)))


def build_modality(name: str, preset: str = "base") -> tuple[Modality, ObjectiveConfig]:
    """Encoder + masking + the recipe's objective for `name` in {image, speech, text}."""
    if name == "image":
        encoder = ImageEncoder(_preset(IMAGE_PRESETS, name, preset))
        return ImageModality(encoder, block_mask_for_grid(encoder.cfg.grid)), image_objective()
    if name == "speech":
        return SpeechModality(SpeechEncoder(_preset(SPEECH_PRESETS, name, preset)), SpanMaskConfig()), \
            speech_objective()
    if name == "text":
        cfg = _preset(TEXT_PRESETS, name, preset)
        vocab = Vocabulary(size=cfg.vocab_size, pad=cfg.pad_idx)
        return TextModality(TextEncoder(cfg), vocab, TokenMaskConfig()), text_objective()
    raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")


def _preset(table: dict, modality: str, preset: str):
    if preset not in table:
        raise ValueError(f"unknown {modality} preset {preset!r}; expected one of {sorted(table)}")
    return table[preset]
