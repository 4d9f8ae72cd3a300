"""Load Hugging Face `Data2VecVisionModel` / `Data2VecAudioModel` / `Data2VecTextModel` weights into d2v encoders.

Accepts a transformers model object (config read from it) or a plain state dict plus our config. `transformers`
itself is never imported here: only its config attributes and state-dict keys are read (layouts in
shared/reference/hf-data2vec.md).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from d2v.interop.layouts import HF_ATTENTION, HF_ONLY, KEYS, InteropError, drop, fuse_qkv, rename
from d2v.modalities.image import ImageEncoderConfig
from d2v.modalities.registry import ENCODER_CONFIGS, ENCODERS
from d2v.modalities.speech import SpeechEncoderConfig
from d2v.modalities.text import TextEncoderConfig

TASK_PREFIXES = ("data2vec_vision.", "data2vec_audio.", "data2vec_text.")


# ---------------------------------------------------------------- configs


def image_config_from_hf(c: Any, has_pooler: bool = True) -> ImageEncoderConfig:
    """`has_pooler`: with mean pooling, whether the model holds the pooler's LayerNorm (`add_pooling_layer`); a model
    without it returns its last layer unnormalised (pooling 'none')."""
    _require(c, "hidden_act", "gelu")
    rel = "shared" if c.use_shared_relative_position_bias else "per_layer" if c.use_relative_position_bias else "none"
    pooling = ("mean_ln" if has_pooler else "none") if c.use_mean_pooling else "final_ln"
    return ImageEncoderConfig(
        img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, dim=c.hidden_size,
        depth=c.num_hidden_layers, num_heads=c.num_attention_heads, ffn_dim=c.intermediate_size,
        layer_scale_init=c.layer_scale_init_value if c.layer_scale_init_value > 0 else None, rel_pos=rel,
        abs_pos=c.use_absolute_position_embeddings, pooling=pooling,
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


def map_to_d2v(kind: str, sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """HF keys → d2v keys; what no rule takes stays in `sd` (the loader reports it)."""
    out: dict[str, Tensor] = {}
    fuse_qkv(sd, out, *HF_ATTENTION[kind], depth)
    token_type = sd.pop("embeddings.token_type_embeddings.weight", None) if kind == "text" else None
    out.update(rename(sd, KEYS[kind], to_hf=False))
    if token_type is not None:  # HF adds token_type[0] to every token; fold it into every position row
        out["embed_positions.weight"] = out["embed_positions.weight"] + token_type[0]
    if HF_ONLY[kind]:
        drop(sd, HF_ONLY[kind])
    return out


# ---------------------------------------------------------------- loaders

# kind → (its HF config reader, d2v keys that HF checkpoints may lack)
_KINDS = {
    "image": (image_config_from_hf, {"mask_token", "fc_norm.weight", "fc_norm.bias"}),
    "speech": (speech_config_from_hf, {"mask_emb"}),
    "text": (text_config_from_hf, set()),
}


def load_hf(kind: str, source: Any, cfg=None):
    """Build a d2v encoder of `kind` ('image' | 'speech' | 'text') from an HF model or state dict.

    Parameters the HF checkpoint does not carry (the vision mask token, the audio mask embedding when HF masking is
    off, fc_norm of a model without pooler) keep their fresh initialisation; any other missing or unexpected key is
    an error naming the keys.
    """
    if kind not in _KINDS:
        raise InteropError(f"unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
    cfg_from_hf, optional = _KINDS[kind]
    encoder_cls, cfg_cls = ENCODERS[kind][1], ENCODER_CONFIGS[kind]
    if isinstance(source, Mapping):
        if cfg is None:
            raise InteropError("a state dict needs an explicit d2v config (cfg=...)")
        state = dict(source)
    else:
        if cfg is None and kind == "image":
            cfg = image_config_from_hf(source.config, getattr(source, "pooler", None) is not None
                                       or hasattr(source, "data2vec_vision"))  # a task model pools
        cfg = cfg or cfg_from_hf(source.config)
        state = dict(source.state_dict())
    if not isinstance(cfg, cfg_cls):
        raise InteropError(f"cfg must be a {cfg_cls.__name__}, got {type(cfg).__name__}")
    state = {_strip_prefix(k): v.detach().clone() for k, v in state.items()}
    drop(state, r"^(classifier|lm_head|pooler\.dense)\.")  # task heads are not part of the encoder
    mapped = map_to_d2v(kind, state, cfg.depth)
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
