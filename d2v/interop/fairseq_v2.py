"""data2vec 2.0 checkpoints (fairseq's `data2vec_multi`) → d2v's v2 encoders (objective v2): the pretrained
`base_libri.pt`, `large_vox.pt`, `{base,large,huge}_imagenet.pt` and `nlp_base.pt`, and the fine-tuned `*_960h.pt`
(the model under `w2v_encoder.w2v_model.`), `*_imagenet_ft.pt` (under `model.`, beside its `fc_norm` and head) and
`data2vec_text_classification` models (under `model.`, beside their `classification_heads`).
Layouts: shared/reference/hf-data2vec.md §1.8, spec §8.2 and §8.4.

fairseq splits the transformer into the modality's prenet (`modality_encoders.M.context_encoder`: a LayerNorm, then
`prenet_depth` blocks) and the shared `blocks`; a d2v encoder holds one stack, the prenet blocks first. The fused
qkv bias loses its key third on the image encoder, whose blocks carry BEiT's q and v biases only: a key bias adds
q·b_k to all of one query's scores, which the softmax cancels, so no output changes. The EMA teacher (`_ema`: the
whole model less its decoders for audio and images, the shared `blocks` only for text) comes along when the
checkpoint has one, the rest of the teacher being the student's; decoders and task heads are dropped. v2 has no mask
embedding (d2v's v2 encoders fill masked frames with noise), so the imported one is zero and never read.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from d2v.interop.fairseq import FAIRSEQ_PAD, FairseqImport, _count, _dropouts, _under, conv_layers
from d2v.interop.layouts import InteropError, KeyTable, drop, rename
from d2v.modalities.image import ImageEncoderConfig, v2_encoder as image_v2
from d2v.modalities.speech import SpeechEncoderConfig, v2_encoder as speech_v2
from d2v.modalities.text import TextEncoderConfig
from d2v.nn.layers import sincos_2d

KINDS = {"AUDIO": "speech", "IMAGE": "image", "TEXT": "text"}  # fairseq's Modality names
WRAPPERS = ("w2v_encoder.w2v_model.", "model.")  # fine-tuned audio (wav2vec2_asr), fine-tuned images and text
# the released configs' norm_eps where a checkpoint carries no config: audio and text set 1e-5, images keep 1e-6
DEFAULT_EPS = {"speech": 1e-5, "text": 1e-5, "image": 1e-6}
DROPOUTS = dict(dropout="encoder_dropout", attn_dropout="attention_dropout", activation_dropout="activation_dropout",
                layerdrop="layerdrop")  # d2v's encoder config field: Data2VecMultiConfig's
DROPPED = r"(^|\.)decoder\.|^shared_decoder\.|^recon_proj\.|^w2v_encoder\.proj\.|^head\.|(^|\.)version$"

SPEECH_KEYS: KeyTable = [  # below modality_encoders.AUDIO.
    ("local_encoder.conv_layers.{i}.0.", "feature_extractor.{i}.conv."),
    ("local_encoder.conv_layers.{i}.2.1.", "feature_extractor.{i}.norm."),  # Fp32LayerNorm in TransposeLast
    ("project_features.1.", "feature_norm."),  # project_features: TransposeLast, LayerNorm, Linear
    ("project_features.2.", "feature_proj."),
    ("context_encoder.norm.", "norm."),
    ("alibi_scale", "alibi_scale"),
]
IMAGE_KEYS: KeyTable = [
    ("local_encoder.proj.", "patch_embed."),
    ("extra_tokens", "cls_token"),
    ("context_encoder.norm.", "input_norm."),
]
TEXT_KEYS: KeyTable = [
    ("local_encoder.embed_tokens.", "embed_tokens."),
    ("local_encoder.embed_positions.", "embed_positions."),
    ("local_encoder.layernorm_embedding.", "embed_norm."),
]
KEYS = {"speech": SPEECH_KEYS, "image": IMAGE_KEYS, "text": TEXT_KEYS}
QKV_BIASES = {"speech": ("q_bias", "k_bias", "v_bias"), "text": ("q_bias", "k_bias", "v_bias"),
              "image": ("q_bias", None, "v_bias")}


def _wrapper(model: dict) -> str | None:
    """The prefix the data2vec_multi model sits under ("" for a pretraining checkpoint); None: not such a model."""
    return next((w for w in ("", *WRAPPERS) if any(k.startswith(w + "modality_encoders.") for k in model)), None)


def is_data2vec_multi(model: dict) -> bool:
    return _wrapper(model) is not None


def load_data2vec_multi(model: dict, args: dict, kind: str | None = None) -> FairseqImport:
    wrapper = _wrapper(model)
    if wrapper is None:
        raise InteropError(f"not a data2vec 2.0 (data2vec_multi) checkpoint: no modality_encoders.* key; first keys: "
                           f"{list(model)[:5]}")
    outside = {k: v for k, v in model.items() if not k.startswith(wrapper)}  # a fine-tuned model's head
    model = _under(model, wrapper) if wrapper else dict(model)
    ema = model.pop("_ema", None)
    name = _modality(model)
    if kind is not None and kind != KINDS[name]:
        raise InteropError(f"kind {kind!r} asked for, but the checkpoint holds a data2vec 2.0 {name} encoder")
    kind, me = KINDS[name], f"modality_encoders.{name}."
    args = _model_args(args)
    prenet = _count(model, me + "context_encoder.blocks.")
    sd = _flat_blocks(model, me, prenet)
    cfg = CONFIGS[kind](sd, args, prenet + _count(model, "blocks."))
    if kind == "image" and "fc_norm.weight" in outside:  # fine-tuned: mean pooling → fc_norm → head
        cfg = cfg.model_copy(update={"pooling": "mean_ln"})
        sd.update({k: v for k, v in outside.items() if k.startswith("fc_norm.")})
    student = _map(kind, sd, me, cfg)
    teacher = None
    if ema is not None:  # ema_encoder_only (text) keeps the shared blocks alone, keyed from 0
        ema = {k if k.startswith(("modality_encoders.", "blocks.")) else f"blocks.{k}": v for k, v in ema.items()}
        teacher = {**student, **_map(kind, _flat_blocks(ema, me, prenet), me, cfg, partial=True)}
    return FairseqImport(kind, cfg, student, teacher, objective="v2")


def _modality(model: dict) -> str:
    names = sorted({k.split(".")[1] for k in model if k.startswith("modality_encoders.")})
    if len(names) != 1 or names[0] not in KINDS:
        raise InteropError(f"a data2vec 2.0 checkpoint with modality encoders {names}: expected exactly one of "
                           f"{sorted(KINDS)}")
    return names[0]


def _model_args(args: dict) -> dict:
    """The data2vec_multi section of the config: the model's own, or the pretrained model's inside a fine-tuning
    config (wav2vec2_asr's `w2v_args`, the image classifier's `pretrained_model_args`)."""
    for outer in ("w2v_args", "pretrained_model_args"):
        inner = args.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get("model"), dict):
            return inner["model"]
    return args


def _flat_blocks(sd: dict, me: str, prenet: int) -> dict[str, Tensor]:
    """The prenet blocks then the shared blocks as one stack `blocks.{i}.`; every other key as it was."""
    out = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        pre = re.match(rf"^{re.escape(me)}context_encoder\.blocks\.(\d+)\.(.+)$", key)
        main = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if pre:
            key = f"blocks.{pre[1]}.{pre[2]}"
        elif main:
            key = f"blocks.{int(main[1]) + prenet}.{main[2]}"
        out[key] = value
    return out


BLOCK_PARAMS = {f"{m}.{p}" for m in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
BLOCK_PARAMS.add("attn.qkv.weight")  # its bias is split into d2v's q/k/v biases


def _map(kind: str, sd: dict[str, Tensor], me: str, cfg, partial: bool = False) -> dict[str, Tensor]:
    """fairseq names → d2v's; `partial`: an EMA teacher's subset, which takes the rest (the never-read mask
    embedding included) from the student."""
    sd = dict(sd)
    drop(sd, DROPPED)
    local = _under(sd, me)
    sd = {k: v for k, v in sd.items() if not k.startswith(me)}
    out = rename(local, KEYS[kind], to_hf=False)
    for rest in list(local):  # what the table does not name
        if kind == "speech" and (m := re.match(r"^relative_positional_encoder\.(\d+)\.0\.(weight|bias)$", rest)):
            out[f"pos_conv.convs.{int(m[1]) - 1}.{m[2]}"] = local.pop(rest)  # entry 0 is a TransposeLast
        elif kind == "image" and rest == "fixed_positional_encoder.positions":
            _check_positions(local.pop(rest), cfg)  # d2v rebuilds the fixed table
    sd.update({me + rest: v for rest, v in local.items()})
    for key in [k for k in sd if re.match(r"^blocks\.\d+\.", k)]:
        i, rest = key.split(".", 2)[1:]
        if rest == "attn.qkv.bias":
            for name, bias in zip(QKV_BIASES[kind], sd.pop(key).chunk(3)):
                if name is not None:
                    out[f"blocks.{i}.attn.{name}"] = bias
        elif rest in BLOCK_PARAMS:
            out[key] = sd.pop(key)
    if kind == "image" and cfg.pooling == "mean_ln":
        out.update(rename(sd, [("fc_norm.", "fc_norm.")], to_hf=False))
    if sd:
        raise InteropError(f"data2vec 2.0 {kind} keys d2v has no place for: {sorted(sd)[:10]}")
    if "alibi_scale" in out:
        out["alibi_scale"] = _alibi_scale(out["alibi_scale"], cfg.num_heads)
    if not partial:
        out.update(_unused_mask_embedding(kind, cfg))
    return {k: v.float() for k, v in out.items()}


def _alibi_scale(scale: Tensor, heads: int) -> Tensor:
    """fairseq's (layers or 1, 1, heads or 1, 1, 1) scale as d2v's one scale per head."""
    if scale.dim() == 4:  # upgrade_state_dict_named: older checkpoints lack the layer axis
        scale = scale.unsqueeze(0)
    if scale.shape[0] != 1:
        raise InteropError(f"alibi_scale {tuple(scale.shape)}: one ALiBi scale per layer "
                           "(learned_alibi_scale_per_layer); d2v's encoders share one scale per head across layers")
    if scale.numel() not in (1, heads):
        raise InteropError(f"alibi_scale {tuple(scale.shape)}: {scale.numel()} scales for {heads} heads")
    return scale.reshape(-1).expand(heads).clone()


def _unused_mask_embedding(kind: str, cfg) -> dict[str, Tensor]:
    if kind == "speech":
        return {"mask_emb": torch.zeros(cfg.dim)}
    if kind == "image":
        return {"mask_token": torch.zeros(1, 1, cfg.dim)}
    return {}


def _check_positions(positions: Tensor, cfg: ImageEncoderConfig) -> None:
    expected = sincos_2d(cfg.dim, cfg.grid)
    if positions.numel() != expected.numel() or not torch.allclose(positions.reshape(expected.shape).float(),
                                                                    expected, atol=1e-5):
        raise InteropError(f"fixed_positional_encoder.positions {tuple(positions.shape)}: not the 2-D sin-cos table "
                           f"of a {cfg.grid[0]}×{cfg.grid[1]} grid (MAE's get_2d_sincos_pos_embed) that d2v builds")


# ---------------------------------------------------------------- configs read off the weights


def _heads(args: dict, dim: int, alibi_scale: Tensor | None = None) -> int:
    """The config's head count; without one, a per-head ALiBi scale's, else the base and large models' dim / 64."""
    if "num_heads" in args:
        return int(args["num_heads"])
    if alibi_scale is not None and alibi_scale.shape[-3] > 1:
        return int(alibi_scale.shape[-3])
    return dim // 64


def _eps(args: dict, kind: str) -> float:
    return float(args.get("norm_eps", DEFAULT_EPS[kind]))


def _check_post_ln(sd: dict, args: dict) -> None:
    if args.get("layer_norm_first") or "norm.weight" in sd:
        raise InteropError("a pre-LN data2vec 2.0 model (layer_norm_first); d2v's v2 encoders are post-LN, like "
                           "every released v2 config")


def _speech_config(sd: dict, args: dict, depth: int) -> SpeechEncoderConfig:
    me = "modality_encoders.AUDIO."
    _check_post_ln(sd, args)
    if f"{me}relative_positional_encoder.0.weight" in sd:
        raise InteropError("a LayerNorm before the positional convs (conv_pos_pre_ln); d2v's speech encoder has none")
    audio = args.get("modalities", {}).get("audio", {}) if isinstance(args.get("modalities"), dict) else {}
    dim = sd[f"{me}project_features.2.weight"].shape[0]
    pos = sd[f"{me}relative_positional_encoder.1.0.weight"]
    return speech_v2(SpeechEncoderConfig(
        conv_layers=conv_layers(sd, f"{me}local_encoder.", audio.get("feature_encoder_spec")), dim=dim, depth=depth,
        num_heads=_heads(args, dim, sd.get(f"{me}alibi_scale")), ffn_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        eps=_eps(args, "speech"),
        pos_conv_depth=_count(sd, me + "relative_positional_encoder."),  # the TransposeLasts hold no weights
        pos_conv_kernel=pos.shape[-1], pos_conv_groups=dim // pos.shape[1],
        **_dropouts(args, **DROPOUTS),
    ))


def _image_config(sd: dict, args: dict, depth: int) -> ImageEncoderConfig:
    me = "modality_encoders.IMAGE."
    _check_post_ln(sd, args)
    if f"{me}local_encoder.proj.weight" not in sd:
        raise InteropError("no patch embedding at modality_encoders.IMAGE.local_encoder.proj (a patch width other "
                           "than the model's adds a projection d2v does not have)")
    dim, chans, patch, _ = sd[f"{me}local_encoder.proj.weight"].shape
    tokens = sd.get(f"{me}extra_tokens")
    if tokens is None or tokens.shape[1] != 1:
        raise InteropError(f"extra_tokens {None if tokens is None else tuple(tokens.shape)}: d2v's image encoder "
                           "has exactly one [CLS] token")
    positions = sd.get(f"{me}fixed_positional_encoder.positions")
    if positions is None:
        raise InteropError("no fixed_positional_encoder.positions: d2v's v2 image encoder has fixed sin-cos positions")
    grid = round(positions.shape[-2] ** 0.5)
    return image_v2(ImageEncoderConfig(img_size=grid * patch, patch_size=patch, in_chans=chans, dim=dim, depth=depth,
                                       num_heads=_heads(args, dim), ffn_dim=sd["blocks.0.mlp.fc1.weight"].shape[0])
                    ).model_copy(update={"eps": _eps(args, "image")})


def _text_config(sd: dict, args: dict, depth: int) -> TextEncoderConfig:
    me = "modality_encoders.TEXT."
    _check_post_ln(sd, args)
    if f"{me}context_encoder.norm.weight" in sd:
        raise InteropError("a text prenet with its own LayerNorm (prenet_depth > 0); d2v's text encoder goes from "
                           "the embedding LayerNorm straight to the blocks")
    vocab, dim = sd[f"{me}local_encoder.embed_tokens.weight"].shape
    pad = FAIRSEQ_PAD
    return TextEncoderConfig(
        vocab_size=vocab, dim=dim, depth=depth, num_heads=_heads(args, dim),
        ffn_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], eps=_eps(args, "text"), pad_idx=pad,
        max_positions=sd[f"{me}local_encoder.embed_positions.weight"].shape[0] - pad - 1,
        **_dropouts(args, **DROPOUTS),
    )


CONFIGS = {"speech": _speech_config, "image": _image_config, "text": _text_config}
