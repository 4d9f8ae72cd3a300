"""Export d2v encoders and fine-tuned models as Hugging Face Data2Vec* checkpoints: a folder with `config.json` and
`model.safetensors` that `transformers` opens with `from_pretrained`, so a d2v pretraining can be published on the
Hub or fine-tuned with HF tooling. `transformers` is not imported here: the configs are written field by field.

What HF can represent is data2vec 1.0's architectures: the pre-LN BEiT vision model, the wav2vec2-style audio model on
raw waveforms and the post-LN RoBERTa text model. A d2v config outside them (data2vec 2.0's post-LN image encoder with
sin-cos positions, ALiBi speech or text, the log-mel front end, pre-LN text) is an `InteropError` naming the field,
never a silently different model. Dropout rates HF has no field for change training, not inference, and are left out.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from d2v.interop.layouts import HF_ATTENTION, KEYS, InteropError, rename, split_qkv
from d2v.io import new_dir_mode, new_file_mode
from d2v.modalities.image import ImageEncoderConfig
from d2v.modalities.registry import ENCODER_CONFIGS
from d2v.modalities.speech import SpeechEncoderConfig
from d2v.modalities.text import TextEncoderConfig

# (modality, head) → (HF model class, prefix of the backbone's keys in it)
ARCHITECTURES = {
    ("image", None): ("Data2VecVisionModel", ""),
    ("image", "classification"): ("Data2VecVisionForImageClassification", "data2vec_vision."),
    ("speech", None): ("Data2VecAudioModel", ""),
    ("speech", "ctc"): ("Data2VecAudioForCTC", "data2vec_audio."),
    ("text", None): ("Data2VecTextModel", ""),
    ("text", "classification"): ("Data2VecTextForSequenceClassification", "data2vec_text."),
    ("text", "regression"): ("Data2VecTextForSequenceClassification", "data2vec_text."),
}
MODEL_TYPES = {"image": "data2vec-vision", "speech": "data2vec-audio", "text": "data2vec-text"}


@dataclass
class HFExport:
    """An HF checkpoint in memory: its config.json fields, its state dict and any tokenizer files."""

    config: dict
    state: dict[str, Tensor]
    files: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------- configs


def _unsupported(kind: str, name: str, value, why: str) -> InteropError:
    return InteropError(f"{kind} encoder {name}={value!r} has no Hugging Face Data2Vec layout: {why}")


def image_config_to_hf(cfg: ImageEncoderConfig) -> dict:
    if not cfg.norm_first:
        raise _unsupported("image", "norm_first", False, "HF's vision model is pre-LN (BEiT)")
    if cfg.sincos_pos or cfg.input_norm:
        name = "sincos_pos" if cfg.sincos_pos else "input_norm"
        raise _unsupported("image", name, True, "data2vec 2.0's image encoder is not in transformers")
    return dict(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, hidden_size=cfg.dim,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim,
        hidden_act="gelu", layer_norm_eps=cfg.eps, layer_scale_init_value=cfg.layer_scale_init or 0.0,
        use_relative_position_bias=cfg.rel_pos == "per_layer",
        use_shared_relative_position_bias=cfg.rel_pos == "shared",
        use_absolute_position_embeddings=cfg.abs_pos, use_mask_token=True,
        use_mean_pooling=cfg.pooling != "final_ln",  # mean_ln: the pooler's LayerNorm; none: no norm at all
        drop_path_rate=cfg.drop_path, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
    )


def speech_config_to_hf(cfg: SpeechEncoderConfig) -> dict:
    if cfg.frontend != "waveform":
        raise _unsupported("speech", "frontend", cfg.frontend, "HF's audio model reads waveforms through the CNN")
    if cfg.norm_first:
        raise _unsupported("speech", "norm_first", True, "HF's audio model is post-LN")
    if cfg.alibi:
        raise _unsupported("speech", "alibi", True, "data2vec 2.0's ALiBi speech encoder is not in transformers")
    if cfg.deepnorm:
        raise _unsupported("speech", "deepnorm", True, "HF's audio layers do not scale the residual (DeepNorm)")
    channels, kernels, strides = (list(c) for c in zip(*cfg.conv_layers))
    return dict(
        conv_dim=channels, conv_kernel=kernels, conv_stride=strides, num_feat_extract_layers=len(channels),
        conv_bias=False, feat_extract_norm="layer", feat_extract_activation="gelu", hidden_size=cfg.dim,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim,
        hidden_act="gelu", num_conv_pos_embeddings=cfg.pos_conv_depth, conv_pos_kernel_size=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups, layer_norm_eps=cfg.eps, hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attn_dropout, activation_dropout=cfg.activation_dropout, layerdrop=cfg.layerdrop,
        feat_proj_dropout=0.0,
        mask_time_prob=0.05,  # > 0 keeps HF's `masked_spec_embed`, which carries d2v's mask embedding
    )


def text_config_to_hf(cfg: TextEncoderConfig) -> dict:
    if cfg.norm_first:
        raise _unsupported("text", "norm_first", True, "HF's text model is post-LN (RoBERTa)")
    if cfg.alibi:
        raise _unsupported("text", "alibi", True, "HF's text model has no attention bias (RoBERTa)")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim, hidden_act="gelu",
        max_position_embeddings=cfg.max_positions + cfg.pad_idx + 1, type_vocab_size=1,
        position_embedding_type="absolute", layer_norm_eps=cfg.eps, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout, pad_token_id=cfg.pad_idx, bos_token_id=0, eos_token_id=2,
    )


CONFIG_TO_HF = {"image": image_config_to_hf, "speech": speech_config_to_hf, "text": text_config_to_hf}


# ---------------------------------------------------------------- weights


def encoder_to_hf(kind: str, state: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """A d2v encoder state dict in the HF base model's layout; every d2v key must find its HF name."""
    CONFIG_TO_HF[kind](cfg)  # the architecture check comes first: its error says more than unmapped keys
    sd = {k: v.detach().cpu() for k, v in state.items()}
    out: dict[str, Tensor] = {}
    split_qkv(sd, out, *HF_ATTENTION[kind], cfg.depth)
    out.update(rename(sd, KEYS[kind], to_hf=True))
    if kind == "text":  # HF adds token type 0 to every token; d2v has none, so its row is zero
        out["embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.dim, dtype=out[
            "embeddings.word_embeddings.weight"].dtype)
    if sd:
        raise InteropError(f"{kind} encoder keys without a Hugging Face name: {sorted(sd)}")
    return out


def export_encoder(kind: str, state: dict[str, Tensor], cfg) -> HFExport:
    """A pretrained encoder as the HF base model (`Data2VecVisionModel`, `Data2VecAudioModel`, `Data2VecTextModel`)."""
    if kind not in ENCODER_CONFIGS:
        raise InteropError(f"unknown kind {kind!r}; expected one of {sorted(ENCODER_CONFIGS)}")
    if not isinstance(cfg, ENCODER_CONFIGS[kind]):
        raise InteropError(f"cfg must be a {ENCODER_CONFIGS[kind].__name__}, got {type(cfg).__name__}")
    # pooling 'mean_ln' keeps fc_norm as `pooler.layernorm`: load it with `add_pooling_layer=True`, as HF's -ft1k models
    return HFExport(_config(kind, None, CONFIG_TO_HF[kind](cfg)), encoder_to_hf(kind, state, cfg))


def export_classifier(kind: str, head: str, state: dict[str, Tensor], cfg, num_labels: int,
                      head_dropout: float = 0.0, labels: tuple[str, ...] = ()) -> HFExport:
    """A fine-tuned d2v model (`ImageClassifier`, `CTCModel` or `TextClassifier` state dict: `encoder.*` plus its
    head) as the matching HF task model; `labels` names the classes in `id2label` (else LABEL_i)."""
    if (kind, head) not in ARCHITECTURES or head is None:
        raise InteropError(f"no Hugging Face task model for a {kind} {head} head")
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    heads = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    hf_config = CONFIG_TO_HF[kind](cfg)
    if kind == "image":
        if cfg.pooling == "final_ln":
            raise InteropError("HF's image classifier mean-pools the patches without a final LayerNorm; this "
                               "encoder normalises every token first (pooling='final_ln'), use pooling 'none' or "
                               "'mean_ln' to export its classifier")
        if cfg.eps != 1e-6:
            raise InteropError(f"HF's pooler LayerNorm uses the encoder's eps ({cfg.eps}); d2v's classifier uses 1e-6")
        encoder = {k: v for k, v in encoder.items() if not k.startswith("fc_norm.")}  # the classifier has its own
        names = {"fc_norm.": "pooler.layernorm.", "head.": "classifier."}
    elif kind == "speech":
        names = {"head.": "lm_head."}
        hf_config.update(vocab_size=num_labels, pad_token_id=0, final_dropout=head_dropout,  # the blank is 0
                         ctc_loss_reduction="mean", ctc_zero_infinity=True)
    else:
        if "dense.weight" not in heads:
            raise InteropError("a linear probe on mean-pooled tokens has no HF text model; export a full fine-tune")
        names = {"dense.": "classifier.dense.", "out_proj.": "classifier.out_proj."}
        hf_config.update(classifier_dropout=head_dropout,
                         problem_type="regression" if head == "regression" else "single_label_classification")
    prefix = ARCHITECTURES[(kind, head)][1]
    weights = {prefix + k: v for k, v in encoder_to_hf(kind, encoder, cfg).items()}
    for key, value in heads.items():
        match = next((src for src in names if key.startswith(src)), None)
        if match is None:
            raise InteropError(f"{kind} {head} head key {key!r} has no Hugging Face name")
        hf_key = names[match] + key[len(match):]
        weights[hf_key if hf_key.startswith(("classifier.", "lm_head.")) else prefix + hf_key] = value.detach().cpu()
    if kind != "speech":  # a CTC head's outputs are its vocabulary (vocab_size above), not labels
        if labels and len(labels) != num_labels:
            raise InteropError(f"{len(labels)} label names {list(labels)} for a head of {num_labels} outputs")
        label_names = labels or tuple(f"LABEL_{i}" for i in range(num_labels))
        hf_config.update(num_labels=num_labels, id2label={str(i): n for i, n in enumerate(label_names)},
                         label2id={n: i for i, n in enumerate(label_names)})
    return HFExport(_config(kind, head, hf_config), weights)


def _config(kind: str, head: str | None, fields: dict) -> dict:
    architecture = ARCHITECTURES[(kind, head)][0]
    return {"model_type": MODEL_TYPES[kind], "architectures": [architecture], "dtype": "float32", **fields}


# ---------------------------------------------------------------- files


def save_pretrained(export: HFExport, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Write the folder `from_pretrained` reads, atomically: it is built beside `out_dir` and renamed into place, so
    an interrupted export leaves the previous folder (or none), never a half-written one."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = dict(export.config, **({"d2v": provenance} if provenance else {}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous().clone() for k, v in export.state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in export.files.items():
            (tmp / name).write_bytes(data)
        for path in tmp.iterdir():
            path.chmod(new_file_mode())
        tmp.chmod(new_dir_mode())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    if not (target / "config.json").is_file():
        raise FileExistsError(f"{target} exists and is not an exported model (no config.json); not replacing it")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)
