"""Reusable layers shared by every modality."""
from d2v.nn.attention import Attention
from d2v.nn.blocks import PostLNBlock, PreLNBlock, deepnorm_constants, deepnorm_init, make_block
from d2v.nn.layers import DropPath, Mlp, RelativePositionBias, bert_init

__all__ = ["Attention", "PostLNBlock", "PreLNBlock", "make_block", "deepnorm_constants", "deepnorm_init", "DropPath",
           "Mlp", "RelativePositionBias", "bert_init"]
