"""Modality plug-ins. Each exposes an encoder, its presets, a masking strategy and objective defaults."""
from d2v.modalities.base import Batch, Embedded, Encoder, EncoderOutput, Modality, Views
from d2v.modalities.image import IMAGE_PRESETS, ImageEncoder, ImageEncoderConfig, ImageModality
from d2v.modalities.speech import SPEECH_PRESETS, SpeechEncoder, SpeechEncoderConfig, SpeechModality
from d2v.modalities.text import TEXT_PRESETS, TextEncoder, TextEncoderConfig, TextModality

__all__ = [
    "Batch", "Embedded", "Encoder", "EncoderOutput", "Modality", "Views",
    "IMAGE_PRESETS", "ImageEncoder", "ImageEncoderConfig", "ImageModality",
    "SPEECH_PRESETS", "SpeechEncoder", "SpeechEncoderConfig", "SpeechModality",
    "TEXT_PRESETS", "TextEncoder", "TextEncoderConfig", "TextModality",
]
