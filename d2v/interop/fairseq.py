"""Load the original data2vec 1.0 checkpoints into d2v encoders: fairseq's audio (`audio_base_ls.pt`, and the
fine-tuned `audio_base_ls_*.pt` under `w2v_encoder.w2v_model.`) and text (`nlp_base.pt`), and the BEiT-codebase
vision checkpoints (`data2vec_vision/*/checkpoint-799.pth`); data2vec 2.0's go through `fairseq_v2.py`. Layouts:
shared/reference/hf-data2vec.md §1.8.

The EMA teacher (fairseq's `_ema`, which covers the transformer only; the BEiT codebase's `model_ema`, the whole
model) comes along when the checkpoint has one, the rest of the teacher being the student's front end, as in d2v's
own teacher; pretraining heads (`final_proj`, `regression_head`, `lm_head`) and task heads are dropped. The encoder
config is read off the weights' shapes; the head count, which shapes do not show, from the checkpoint's own config
when it has one (else dim / 64, the base and large models' head size).
"""
from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from d2v.config import Objective
from d2v.interop.layouts import InteropError, KeyTable, drop, fuse_qkv, rename
from d2v.io import not_a_file, read_torch
from d2v.modalities.image import ImageEncoderConfig
from d2v.modalities.speech import SpeechEncoderConfig
from d2v.modalities.text import TextEncoderConfig

SPEECH_KEYS: KeyTable = [  # (fairseq key, d2v key)
    ("feature_extractor.conv_layers.{i}.0.", "feature_extractor.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.2.1.", "feature_extractor.{i}.norm."),  # Fp32LayerNorm in TransposeLast
    ("layer_norm.", "feature_norm."),
    ("post_extract_proj.", "feature_proj."),
    ("mask_emb", "mask_emb"),
    ("encoder.pos_conv.{i}.0.", "pos_conv.convs.{i}."),
    ("encoder.layer_norm.", "norm."),
    ("encoder.layers.{i}.self_attn.out_proj.", "blocks.{i}.attn.proj."),
    ("encoder.layers.{i}.self_attn_layer_norm.", "blocks.{i}.norm1."),
    ("encoder.layers.{i}.fc1.", "blocks.{i}.mlp.fc1."),
    ("encoder.layers.{i}.fc2.", "blocks.{i}.mlp.fc2."),
    ("encoder.layers.{i}.final_layer_norm.", "blocks.{i}.norm2."),
]
TEXT_KEYS: KeyTable = [  # below `encoder.sentence_encoder.`
    ("embed_tokens.", "embed_tokens."),
    ("embed_positions.", "embed_positions."),
    ("layernorm_embedding.", "embed_norm."),
    ("layer_norm.", "final_norm."),  # pre-LN (normalize_before) models only
    ("layers.{i}.self_attn.out_proj.", "blocks.{i}.attn.proj."),
    ("layers.{i}.self_attn_layer_norm.", "blocks.{i}.norm1."),
    ("layers.{i}.fc1.", "blocks.{i}.mlp.fc1."),
    ("layers.{i}.fc2.", "blocks.{i}.mlp.fc2."),
    ("layers.{i}.final_layer_norm.", "blocks.{i}.norm2."),
]
IMAGE_KEYS: KeyTable = [  # BEiT names d2v's image encoder follows, but for the patch conv and the rel-pos tables
    ("patch_embed.proj.", "patch_embed."),
    ("rel_pos_bias.relative_position_bias_table", "rel_pos_bias.table"),
    ("blocks.{i}.attn.relative_position_bias_table", "blocks.{i}.rel_pos_bias.table"),
    ("blocks.{i}.", "blocks.{i}."),
    *((name, name) for name in ("cls_token", "mask_token", "pos_embed", "norm.", "fc_norm.")),
]
ATTENTION = {"speech": ("encoder.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj")),
             "text": ("layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj"))}
FAIRSEQ_PAD = 1  # fairseq dictionaries: <s>=0 <pad>=1 </s>=2 <unk>=3; positions count from pad + 1
# what is dropped: pretraining heads, task heads, recomputed index buffers, fairseq's version counters
DROPPED = r"^(final_proj|lm_head|head|regression_head|classification_heads)\.|relative_position_index$|(^|\.)version$"


@dataclass
class FairseqImport:
    kind: str
    cfg: Any  # the d2v encoder config
    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None  # None: the checkpoint has no EMA teacher (a release without `_ema`)
    objective: Objective = "v1"  # v2: a data2vec 2.0 (data2vec_multi) checkpoint, for d2v's v2 architecture


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} {not_a_file(path)}: no checkpoint")
    return read_torch(path)  # fairseq pickles its omegaconf config


def load_fairseq(source: str | Path | dict, kind: str | None = None) -> FairseqImport:
    """A fairseq/BEiT checkpoint (path or loaded dict) as d2v encoder weights; `kind` is guessed from the keys."""
    ckpt = load_checkpoint(source) if not isinstance(source, dict) else source
    model = ckpt.get("model", ckpt)
    if not isinstance(model, dict):
        raise InteropError(f"{source}: expected a state dict under 'model', got {type(model).__name__}")
    model = dict(model)  # the caller's checkpoint stays whole
    args = _model_args(ckpt)
    from d2v.interop.fairseq_v2 import is_data2vec_multi, load_data2vec_multi

    if is_data2vec_multi(model):
        return load_data2vec_multi(model, args, kind)
    kind = kind or _guess_kind(model)
    if kind == "speech":
        return _speech(model, args)
    if kind == "text":
        return _text(model, args)
    if kind == "image":
        return _image(model, ckpt.get("model_ema"))
    raise InteropError(f"unknown kind {kind!r}; expected image, speech or text")


def _guess_kind(model: dict) -> str:
    keys = list(model)
    if any(k.startswith(("feature_extractor.", "w2v_encoder.")) for k in keys):
        return "speech"
    if any(k.startswith("encoder.sentence_encoder.") for k in keys):
        return "text"
    if any(k.startswith("patch_embed.") for k in keys):
        return "image"
    raise InteropError(f"not a data2vec audio, text or BEiT vision checkpoint; first keys: {keys[:5]}")


def _model_args(ckpt: dict) -> dict:
    """The model section of the checkpoint's own config (omegaconf `cfg` or an older argparse `args`), if any."""
    cfg = ckpt.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        model = cfg["model"]
        try:
            from omegaconf import OmegaConf

            return OmegaConf.to_container(model) if OmegaConf.is_config(model) else dict(model)
        except ImportError:
            return dict(model)
    args = ckpt.get("args")
    return vars(args) if args is not None else {}


# ---------------------------------------------------------------- per modality


def _speech(model: dict, args: dict) -> FairseqImport:
    model = _under(model, "w2v_encoder.w2v_model.") or model  # a fine-tuned checkpoint wraps the pretrained model
    ema = model.pop("_ema", None)
    depth = _count(model, "encoder.layers.")
    dim = model["post_extract_proj.weight"].shape[0]
    pos = model["encoder.pos_conv.0.0.weight"]
    cfg = SpeechEncoderConfig(
        conv_layers=conv_layers(model, "feature_extractor.", args.get("conv_feature_layers")), dim=dim, depth=depth,
        num_heads=args.get("encoder_attention_heads", dim // 64), ffn_dim=model["encoder.layers.0.fc1.weight"].shape[0],
        norm_first=bool(args.get("layer_norm_first", False)), pos_conv_depth=_count(model, "encoder.pos_conv."),
        pos_conv_kernel=pos.shape[-1], pos_conv_groups=dim // pos.shape[1], deepnorm=_deepnorm(args, dim, depth),
        **_dropouts(args, dropout="dropout", attn_dropout="attention_dropout",
                    activation_dropout="activation_dropout", layerdrop="encoder_layerdrop"),
    )
    student = _map("speech", model, SPEECH_KEYS, depth)
    teacher = None
    if ema is not None:  # fairseq's EMA covers the transformer (ema_transformer_only): its keys are below `encoder.`
        ema = {(k if k.startswith("encoder.") else f"encoder.{k}"): v for k, v in ema.items()}
        teacher = {**student, **_map("speech", ema, SPEECH_KEYS, depth)}
    return FairseqImport("speech", cfg, student, teacher)


# the widths for which fairseq's DeepNorm layer has constants, and the depths d2v's (2N)^¼ needs to agree with them
DEEPNORM_DEPTH_OF_WIDTH = {768: 12, 1024: 24}


def _deepnorm(args: dict, dim: int, depth: int) -> bool:
    """Whether the checkpoint's blocks are DeepNorm's (the AudioSet recipe sets both norm types to deepnorm)."""
    kinds = (args.get("self_attn_norm_type", "layer"), args.get("final_norm_type", "layer"))
    if "deepnorm" not in kinds:
        return False
    if kinds != ("deepnorm", "deepnorm"):
        raise InteropError(f"self_attn_norm_type/final_norm_type {kinds}: d2v's DeepNorm scales both residuals; "
                           "a checkpoint with one of them deepnorm has no d2v encoder")
    if DEEPNORM_DEPTH_OF_WIDTH.get(dim) != depth:
        raise InteropError(f"a DeepNorm encoder of width {dim} and {depth} layers: fairseq picks α by width "
                           f"({DEEPNORM_DEPTH_OF_WIDTH} layers), d2v by depth, and they disagree here")
    return True


def _text(model: dict, args: dict) -> FairseqImport:
    ema = model.pop("encoder._ema", None)
    encoder = _under(model, "encoder.sentence_encoder.")
    depth = _count(encoder, "layers.")
    vocab, dim = encoder["embed_tokens.weight"].shape
    pad = FAIRSEQ_PAD
    transformer = args.get("transformer", {}).get("encoder", {}) if isinstance(args.get("transformer"), dict) else {}
    cfg = TextEncoderConfig(
        vocab_size=vocab, dim=dim, depth=depth, num_heads=transformer.get("attention_heads", dim // 64),
        ffn_dim=encoder["layers.0.fc1.weight"].shape[0], norm_first="layer_norm.weight" in encoder,
        max_positions=encoder["embed_positions.weight"].shape[0] - pad - 1, pad_idx=pad,
    )
    student = _map("text", encoder, TEXT_KEYS, depth)
    teacher = {**student, **_map("text", dict(ema), TEXT_KEYS, depth)} if ema is not None else None
    return FairseqImport("text", cfg, student, teacher)


def _image(model: dict, ema: dict | None) -> FairseqImport:
    """A BEiT-codebase (data2vec_vision) checkpoint; its `model_ema` is timm's ModelEmaV2 of the whole model, the
    teacher of `run_cyclical.py`."""
    depth = _count(model, "blocks.")
    dim, chans, patch, _ = model["patch_embed.proj.weight"].shape
    shared = "rel_pos_bias.relative_position_bias_table" in model
    table = model.get("rel_pos_bias.relative_position_bias_table",
                      model.get("blocks.0.attn.relative_position_bias_table"))
    if table is not None:  # (2W - 1)² + 3 rows (3: cls-to-token, token-to-cls, cls-to-cls), one column per head
        grid, heads = round(((table.shape[0] - 3) ** 0.5 + 1) / 2), table.shape[1]
    elif "pos_embed" in model:
        grid, heads = round((model["pos_embed"].shape[1] - 1) ** 0.5), dim // 64
    else:
        raise InteropError("no relative-position table and no pos_embed: the image size cannot be read off")
    cfg = ImageEncoderConfig(
        img_size=grid * patch, patch_size=patch, in_chans=chans, dim=dim, depth=depth, num_heads=heads,
        ffn_dim=model["blocks.0.mlp.fc1.weight"].shape[0],
        layer_scale_init=1e-4 if "blocks.0.gamma_1" in model else None,  # only the init differs
        rel_pos="shared" if shared else "per_layer" if table is not None else "none", abs_pos="pos_embed" in model,
        pooling="final_ln" if "norm.weight" in model else "mean_ln" if "fc_norm.weight" in model else "none",
    )
    teacher = _map("image", dict(ema), IMAGE_KEYS, depth) if isinstance(ema, dict) else None
    return FairseqImport("image", cfg, _map("image", model, IMAGE_KEYS, depth), teacher)


# ---------------------------------------------------------------- helpers


def _map(kind: str, sd: dict, table: KeyTable, depth: int) -> dict[str, Tensor]:
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    drop(sd, DROPPED)
    out: dict[str, Tensor] = {}
    if kind in ATTENTION:
        fuse_qkv(sd, out, *ATTENTION[kind], depth)
    out.update(rename(sd, table, to_hf=False))
    if sd:
        raise InteropError(f"fairseq {kind} keys d2v has no place for: {sorted(sd)[:10]}")
    return {k: v.float() for k, v in out.items()}


def _under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(sd: dict, prefix: str) -> int:
    """Number of numbered children `prefix{i}.` in the state dict."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _dropouts(args: dict, **names: str) -> dict:
    return {ours: float(args[theirs]) for ours, theirs in names.items() if theirs in args}


def conv_layers(sd: dict, prefix: str, spec: str | None) -> tuple[tuple[int, int, int], ...]:
    """wav2vec 2.0's CNN (`prefix`conv_layers.{i}) as d2v's (channels, kernel, stride) rows: channels and kernels
    from the weights, strides from the config's layer spec. Only the layer-norm mode (`.2.1.`, a LayerNorm inside
    TransposeLast) fits d2v; group norm (`.2.`, wav2vec 2.0's default) is refused."""
    conv = [sd[f"{prefix}conv_layers.{i}.0.weight"] for i in range(_count(sd, f"{prefix}conv_layers."))]
    if any(f"{prefix}conv_layers.{i}.2.weight" in sd for i in range(len(conv))):
        raise InteropError("this feature extractor uses group norm (wav2vec 2.0's default mode); data2vec audio's "
                           "uses layer norm in every conv layer, the only one d2v has")
    return tuple((w.shape[0], w.shape[-1], s) for w, s in zip(conv, _conv_strides(spec, len(conv))))


_OPS = {ast.Add: operator.add, ast.Mult: operator.mul}


def _conv_strides(spec: str | None, layers: int) -> list[int]:
    """Strides from fairseq's `conv_feature_layers`, a Python expression such as
    "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]", evaluated without `eval`."""
    if spec is None:
        if layers != 7:
            raise InteropError(f"{layers} conv layers and no conv_feature_layers in the checkpoint's config: the "
                               "strides are unknown (wav2vec 2.0's are for 7 layers)")
        return [5, 2, 2, 2, 2, 2, 2]

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(n) for n in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise InteropError(f"conv_feature_layers {spec!r}: only lists, tuples, integers, + and * are understood")

    layers_spec = value(ast.parse(spec, mode="eval").body)
    if len(layers_spec) != layers:
        raise InteropError(f"conv_feature_layers lists {len(layers_spec)} layers, the weights have {layers}")
    return [int(layer[2]) for layer in layers_spec]
