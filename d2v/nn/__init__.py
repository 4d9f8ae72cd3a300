"""Reusable layers shared by every modality."""
from d2v.nn.attention import Attention
from d2v.nn.blocks import PostLNBlock, PreLNBlock, make_block
from d2v.nn.layers import DropPath, Mlp, RelativePositionBias, bert_init

__all__ = ["Attention", "PostLNBlock", "PreLNBlock", "make_block", "DropPath", "Mlp", "RelativePositionBias",
           "bert_init"]
