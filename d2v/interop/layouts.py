"""The Hugging Face Data2Vec* state-dict layouts against d2v's, as one table per modality read both ways (import and
export), so that the two directions cannot drift apart. Layouts: shared/reference/hf-data2vec.md §1.3–1.5.

A table row is (HF key, d2v key); `{i}` stands for a layer index; a key ending in "." is a prefix (the parameter
name after it is carried over), any other key is matched whole. Attention is the one non-renaming step: HF stores
separate query/key/value projections, d2v one fused `qkv` weight with separate biases.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

KeyTable = list[tuple[str, str]]


class InteropError(ValueError):
    """A checkpoint that does not fit: what is wrong, named (keys, config fields)."""

IMAGE_KEYS: KeyTable = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.patch_embeddings.projection.", "patch_embed."),
    ("embeddings.position_embeddings", "pos_embed"),
    ("encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias.table"),
    ("encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table",
     "blocks.{i}.rel_pos_bias.table"),
    ("encoder.layer.{i}.lambda_1", "blocks.{i}.gamma_1"),
    ("encoder.layer.{i}.lambda_2", "blocks.{i}.gamma_2"),
    ("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1."),
    ("encoder.layer.{i}.layernorm_after.", "blocks.{i}.norm2."),
    ("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    ("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
    ("layernorm.", "norm."),
    ("pooler.layernorm.", "fc_norm."),
]

SPEECH_KEYS: KeyTable = [
    ("feature_extractor.conv_layers.{i}.conv.", "feature_extractor.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.layer_norm.", "feature_extractor.{i}.norm."),
    ("feature_projection.layer_norm.", "feature_norm."),
    ("feature_projection.projection.", "feature_proj."),
    ("masked_spec_embed", "mask_emb"),
    ("encoder.pos_conv_embed.layers.{i}.conv.", "pos_conv.convs.{i}."),
    ("encoder.layer_norm.", "norm."),
    ("encoder.layers.{i}.attention.out_proj.", "blocks.{i}.attn.proj."),
    ("encoder.layers.{i}.layer_norm.", "blocks.{i}.norm1."),
    ("encoder.layers.{i}.feed_forward.intermediate_dense.", "blocks.{i}.mlp.fc1."),
    ("encoder.layers.{i}.feed_forward.output_dense.", "blocks.{i}.mlp.fc2."),
    ("encoder.layers.{i}.final_layer_norm.", "blocks.{i}.norm2."),
]

TEXT_KEYS: KeyTable = [
    ("embeddings.word_embeddings.", "embed_tokens."),
    ("embeddings.position_embeddings.", "embed_positions."),
    ("embeddings.LayerNorm.", "embed_norm."),
    ("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "blocks.{i}.norm1."),
    ("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
    ("encoder.layer.{i}.output.LayerNorm.", "blocks.{i}.norm2."),
]

# HF's per-layer attention module and the names of its q/k/v projections
HF_ATTENTION = {
    "image": ("encoder.layer.{i}.attention.attention", ("query", "key", "value")),
    "speech": ("encoder.layers.{i}.attention", ("q_proj", "k_proj", "v_proj")),
    "text": ("encoder.layer.{i}.attention.self", ("query", "key", "value")),
}
KEYS = {"image": IMAGE_KEYS, "speech": SPEECH_KEYS, "text": TEXT_KEYS}
# HF keys d2v recomputes or has no use for: index buffers, the text pooler (a head), token-type/position id buffers
HF_ONLY = {"image": r"relative_position_index$", "speech": None, "text": r"^pooler\.|position_ids$|token_type_ids$"}


def _rule(src: str, dst: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + ("" if src.endswith(".") else "$")
    return re.compile(pattern), dst.replace("{i}", r"\1")


def rename(sd: dict[str, Tensor], table: KeyTable, to_hf: bool) -> dict[str, Tensor]:
    """Move every key of `sd` that a row of `table` matches into the returned dict under its other name; keys no
    row matches stay in `sd`, for the caller to report."""
    rules = [_rule(d2v, hf) if to_hf else _rule(hf, d2v) for hf, d2v in table]
    out: dict[str, Tensor] = {}
    for key in list(sd):
        for pattern, repl in rules:
            new, n = pattern.subn(repl, key)
            if n:
                out[new] = sd.pop(key)
                break
    return out


def fuse_qkv(sd: dict[str, Tensor], out: dict[str, Tensor], module: str, names: tuple[str, str, str],
             depth: int) -> None:
    """Separate q/k/v projections (`module`.format(i=layer) + one of `names`) into d2v's fused `qkv` weight and its
    separate biases."""
    for i in range(depth):
        q, k, v = (f"{module.format(i=i)}.{n}" for n in names)
        if not all(f"{key}.weight" in sd for key in (q, k, v)):
            continue  # reported as missing keys by the loader
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd.pop(f"{key}.weight") for key in (q, k, v)])
        for bias, key in (("q_bias", q), ("k_bias", k), ("v_bias", v)):
            if f"{key}.bias" in sd:
                out[f"blocks.{i}.attn.{bias}"] = sd.pop(f"{key}.bias")


def split_qkv(sd: dict[str, Tensor], out: dict[str, Tensor], module: str, names: tuple[str, str, str],
              depth: int) -> None:
    """d2v's fused `qkv` weight into separate q/k/v projections (an absent bias stays absent: BEiT's key)."""
    for i in range(depth):
        prefix = f"blocks.{i}.attn"
        if f"{prefix}.qkv.weight" not in sd:
            continue
        keys = [f"{module.format(i=i)}.{n}" for n in names]
        for key, weight in zip(keys, sd.pop(f"{prefix}.qkv.weight").chunk(3)):
            out[f"{key}.weight"] = weight.contiguous()
        for key, bias in zip(keys, ("q_bias", "k_bias", "v_bias")):
            if f"{prefix}.{bias}" in sd:
                out[f"{key}.bias"] = sd.pop(f"{prefix}.{bias}")


def drop(sd: dict[str, Tensor], pattern: str) -> None:
    for key in [k for k in sd if re.search(pattern, k)]:
        sd.pop(key)
