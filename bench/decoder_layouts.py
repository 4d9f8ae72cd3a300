"""The data2vec 2.0 image decoder's convolutions under each memory layout, forward + backward. On an H200 a quarter of
a ViT-B v2 update's kernel time (24.9 of 100.7 ms) was cuDNN's tensorTransformGeneric, converting the 2-D decoder's
activations between layouts (`results/bench/update_profile_image_v2_b32_gpu.json`). The decoder hands its convs a
channels-last view of the (rows, tokens, dim) input with channels-first weights; this times that against a
contiguous channels-first input and against channels-last input and weights, each with cuDNN's autotuner off (the
training default) and on, and checks that every variant computes the same predictions.

    python bench/decoder_layouts.py [--preset base --rows 512 --device cuda --precision bf16]
        [--out results/bench/decoder_layouts_gpu.json]
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from v2_vs_v1 import milliseconds, timed_updates, timing_arguments, timing_setting

from d2v.io import atomic_write_json
from d2v.modalities.registry import build_objective
from d2v.nn.decoder import ConvDecoder

LAYOUTS = {  # the decoder's (rows, dim, height, width) input, as each variant hands it to the first conv
    "view": lambda h: h,  # what the decoder does: channels-last strides, weights channels-first
    "channels_first": lambda h: h.contiguous(),
    "channels_last": lambda h: h.contiguous(memory_format=torch.channels_last),
}


@contextlib.contextmanager
def laid_out(decoder: ConvDecoder, layout: str):
    """The decoder with its input in `layout` (and, for channels_last, its conv weights too)."""
    original = decoder._to_channels_first
    decoder._to_channels_first = lambda x: LAYOUTS[layout](original(x))
    if layout == "channels_last":
        decoder.convs.to(memory_format=torch.channels_last)
    try:
        yield decoder
    finally:
        del decoder._to_channels_first  # the class's method again
        decoder.convs.to(memory_format=torch.contiguous_format)


def timed(decoder: ConvDecoder, x: torch.Tensor, amp, steps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each forward + backward after `timed_updates`' three untimed ones (cuDNN's autotuner tries its
    algorithms in the first), and the predictions of the last."""
    last = {}

    def forward_backward(_, step):
        with amp:
            last["out"] = decoder(x)
        last["out"].float().square().mean().backward()

    times = timed_updates(lambda: decoder.zero_grad(set_to_none=True), forward_backward, x.device, steps,
                          compile=True)
    return times, last["out"].detach().float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=8, help="batch x clones (the H200 profile: 32 x 16 = 512)")
    timing_arguments(parser, Path("results/bench/decoder_layouts_cpu.json"), steps=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    objective = build_objective("image", args.preset, "v2")
    decoder = objective.decoder.to(device)
    grid = decoder.grid
    x = torch.randn(args.rows, grid[0] * grid[1], objective.student.dim, device=device, requires_grad=False)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    rows, reference = [], None
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for layout in LAYOUTS:
            with laid_out(decoder, layout):
                times, out = timed(decoder, x, amp, args.steps)
            reference = out if reference is None else reference
            rows.append({"layout": layout, "cudnn_benchmark": benchmark, **milliseconds(times),
                         "max_abs_diff": float((out - reference).abs().max())})
            print(rows[-1], flush=True)
    torch.backends.cudnn.benchmark = False
    atomic_write_json(args.out, {
        "what": "ConvDecoder (data2vec 2.0 image) forward + backward per memory layout of its conv inputs",
        "preset": args.preset, "rows": args.rows, "grid": list(grid), "dim": objective.student.dim,
        "decoder": objective.cfg.v2.decoder.model_dump(), **timing_setting(args, device), "results": rows})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
