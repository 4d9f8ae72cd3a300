"""Regional compilation (as torchtitan does): compile each Transformer block and the v2 decoder in place, not the
whole objective.

The objective's forward draws masks on the host and gathers a data-dependent number of positions; compiled whole,
Dynamo breaks the graph there and recompiles as counts change. The blocks hold nearly all the FLOPs and are pure
tensor code, so they compile with `fullgraph=True`. Identical blocks share one compiled graph (parameters are graph
inputs), and `Module.compile` keeps parameter names, so checkpoints and the EMA teacher are unaffected.
"""
from __future__ import annotations

from torch import nn

from d2v.nn.blocks import PostLNBlock, PreLNBlock
from d2v.nn.decoder import ConvDecoder

REGIONS = (PreLNBlock, PostLNBlock, ConvDecoder)


def compile_regions(model: nn.Module, **options) -> int:
    """Compile every block and decoder inside `model` in place; returns how many modules were compiled.
    `options` go to `torch.compile` (e.g. `backend`, `mode`); `fullgraph` defaults to True."""
    options.setdefault("fullgraph", True)
    regions = [m for m in model.modules() if isinstance(m, REGIONS)]
    if not regions:
        raise ValueError(f"{type(model).__name__} has no Transformer block or decoder to compile")
    for module in regions:
        module.compile(**options)
    return len(regions)
