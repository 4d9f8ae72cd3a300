"""Load Hugging Face `Data2VecVisionModel` / `Data2VecAudioModel` / `Data2VecTextModel` weights into d2v encoders.

Accepts a transformers model object (config read from it) or a plain state dict plus our config. `transformers`
itself is never imported here: only its config attributes and state-dict keys are read (layouts in
shared/reference/hf-data2vec.md).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from d2v.modalities.image import ImageEncoder, ImageEncoderConfig
from d2v.modalities.speech import SpeechEncoder, SpeechEncoderConfig
from d2v.modalities.text import TextEncoder, TextEncoderConfig

TASK_PREFIXES = ("data2vec_vision.", "data2vec_audio.", "data2vec_text.")


class InteropError(ValueError):
    pass


# ---------------------------------------------------------------- configs


def image_config_from_hf(c: Any) -> ImageEncoderConfig:
    _require(c, "hidden_act", "gelu")
    rel = "shared" if c.use_shared_relative_position_bias else "per_layer" if c.use_relative_position_bias else "none"
    return ImageEncoderConfig(
        img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, dim=c.hidden_size,
        depth=c.num_hidden_layers, num_heads=c.num_attention_heads, ffn_dim=c.intermediate_size,
        layer_scale_init=c.layer_scale_init_value if c.layer_scale_init_value > 0 else None, rel_pos=rel,
        abs_pos=c.use_absolute_position_embeddings, pooling="mean_ln" if c.use_mean_pooling else "final_ln",
        eps=c.layer_norm_eps, drop_path=c.drop_path_rate, attn_dropout=c.attention_probs_dropout_prob,
        dropout=c.hidden_dropout_prob,
    )


def speech_config_from_hf(c: Any) -> SpeechEncoderConfig:
    _require(c, "conv_bias", False)
    _require(c, "feat_extract_norm", "layer")
    _require(c, "feat_extract_activation", "gelu")
    _require(c, "hidden_act", "gelu")
    return SpeechEncoderConfig(
        conv_layers=tuple(zip(c.conv_dim, c.conv_kernel, c.conv_stride)), dim=c.hidden_size,
        depth=c.num_hidden_layers, num_heads=c.num_attention_heads, ffn_dim=c.intermediate_size,
        pos_conv_depth=c.num_conv_pos_embeddings, pos_conv_kernel=c.conv_pos_kernel_size,
        pos_conv_groups=c.num_conv_pos_embedding_groups, eps=c.layer_norm_eps, dropout=c.hidden_dropout,
        attn_dropout=c.attention_dropout, activation_dropout=c.activation_dropout, layerdrop=c.layerdrop,
    )


def text_config_from_hf(c: Any) -> TextEncoderConfig:
    _require(c, "hidden_act", "gelu")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise InteropError(f"only absolute positions are supported, got {c.position_embedding_type!r}")
    return TextEncoderConfig(
        vocab_size=c.vocab_size, dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
        ffn_dim=c.intermediate_size, max_positions=c.max_position_embeddings - c.pad_token_id - 1,
        pad_idx=c.pad_token_id, eps=c.layer_norm_eps, dropout=c.hidden_dropout_prob,
        attn_dropout=c.attention_probs_dropout_prob,
    )


def _require(c: Any, key: str, expected: Any) -> None:
    value = getattr(c, key, expected)
    if value != expected:
        raise InteropError(f"HF config {key}={value!r} is not supported (expected {expected!r})")


# ---------------------------------------------------------------- key mapping


def _qkv(sd: dict[str, Tensor], out: dict[str, Tensor], src: str, dst: str, names: tuple[str, str, str]) -> None:
    """Fuse separate q/k/v projections into our `qkv` weight and its separate biases."""
    q, k, v = (f"{src}.{n}" for n in names)
    if not all(f"{key}.weight" in sd for key in (q, k, v)):
        return  # reported as missing keys by the loader
    out[f"{dst}.qkv.weight"] = torch.cat([sd.pop(f"{q}.weight"), sd.pop(f"{k}.weight"), sd.pop(f"{v}.weight")])
    for name, key in (("q_bias", q), ("k_bias", k), ("v_bias", v)):
        if f"{key}.bias" in sd:
            out[f"{dst}.{name}"] = sd.pop(f"{key}.bias")


def _rename(sd: dict[str, Tensor], out: dict[str, Tensor], rules: list[tuple[str, str]]) -> None:
    for key in list(sd):
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = sd.pop(key)
                break


def map_image(sd: dict[str, Tensor], cfg: ImageEncoderConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(cfg.depth):
        _qkv(sd, out, f"encoder.layer.{i}.attention.attention", f"blocks.{i}.attn", ("query", "key", "value"))
    _rename(sd, out, [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^encoder\.relative_position_bias\.relative_position_bias_table$", "rel_pos_bias.table"),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_bias_table$",
         r"blocks.\1.rel_pos_bias.table"),
        (r"^encoder\.layer\.(\d+)\.lambda_1$", r"blocks.\1.gamma_1"),
        (r"^encoder\.layer\.(\d+)\.lambda_2$", r"blocks.\1.gamma_2"),
        (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^layernorm\.", "norm."),
        (r"^pooler\.layernorm\.", "fc_norm."),
    ])
    _drop(sd, r"relative_position_index$")
    return out


def map_speech(sd: dict[str, Tensor], cfg: SpeechEncoderConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(cfg.depth):
        _qkv(sd, out, f"encoder.layers.{i}.attention", f"blocks.{i}.attn", ("q_proj", "k_proj", "v_proj"))
    _rename(sd, out, [
        (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.\1.conv."),
        (r"^feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.\1.norm."),
        (r"^feature_projection\.layer_norm\.", "feature_norm."),
        (r"^feature_projection\.projection\.", "feature_proj."),
        (r"^masked_spec_embed$", "mask_emb"),
        (r"^encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.", r"pos_conv.convs.\1."),
        (r"^encoder\.layer_norm\.", "norm."),
        (r"^encoder\.layers\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"blocks.\1.mlp.fc2."),
        (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"blocks.\1.norm2."),
    ])
    return out


def map_text(sd: dict[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(cfg.depth):
        _qkv(sd, out, f"encoder.layer.{i}.attention.self", f"blocks.{i}.attn", ("query", "key", "value"))
    token_type = sd.pop("embeddings.token_type_embeddings.weight", None)
    _rename(sd, out, [
        (r"^embeddings\.word_embeddings\.", "embed_tokens."),
        (r"^embeddings\.position_embeddings\.", "embed_positions."),
        (r"^embeddings\.LayerNorm\.", "embed_norm."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"blocks.\1.norm2."),
    ])
    if token_type is not None:  # HF adds token_type[0] to every token; fold it into every position row
        out["embed_positions.weight"] = out["embed_positions.weight"] + token_type[0]
    _drop(sd, r"^pooler\.|position_ids$|token_type_ids$")
    return out


def _drop(sd: dict[str, Tensor], pattern: str) -> None:
    for key in [k for k in sd if re.search(pattern, k)]:
        sd.pop(key)


# ---------------------------------------------------------------- loaders

_KINDS = {
    "image": (ImageEncoder, ImageEncoderConfig, image_config_from_hf, map_image, {"mask_token", "fc_norm.weight",
                                                                               "fc_norm.bias"}),
    "speech": (SpeechEncoder, SpeechEncoderConfig, speech_config_from_hf, map_speech, {"mask_emb"}),
    "text": (TextEncoder, TextEncoderConfig, text_config_from_hf, map_text, set()),
}


def load_hf(kind: str, source: Any, cfg=None):
    """Build a d2v encoder of `kind` ('image' | 'speech' | 'text') from an HF model or state dict.

    Parameters the HF checkpoint does not carry (the vision mask token, the audio mask embedding when HF masking is
    off, fc_norm of a model without pooler) keep their fresh initialisation; any other missing or unexpected key is
    an error naming the keys.
    """
    if kind not in _KINDS:
        raise InteropError(f"unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
    encoder_cls, cfg_cls, cfg_from_hf, mapper, optional = _KINDS[kind]
    if isinstance(source, Mapping):
        if cfg is None:
            raise InteropError("a state dict needs an explicit d2v config (cfg=...)")
        state = dict(source)
    else:
        cfg = cfg or cfg_from_hf(source.config)
        state = dict(source.state_dict())
    if not isinstance(cfg, cfg_cls):
        raise InteropError(f"cfg must be a {cfg_cls.__name__}, got {type(cfg).__name__}")
    state = {_strip_prefix(k): v.detach().clone() for k, v in state.items()}
    _drop(state, r"^(classifier|lm_head|pooler\.dense)\.")  # task heads are not part of the encoder
    mapped = mapper(state, cfg)
    encoder = encoder_cls(cfg)
    missing, unexpected = encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k not in optional]
    if state or missing or unexpected:
        raise InteropError(
            f"HF {kind} checkpoint does not fit: unmapped={sorted(state)} missing={sorted(missing)} "
            f"unexpected={sorted(unexpected)}"
        )
    return encoder


def _strip_prefix(key: str) -> str:
    for prefix in TASK_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key
