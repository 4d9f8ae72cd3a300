"""Self-attention with BEiT's learned relative-position bias, forward + backward, per kernel. data2vec 1.0's ViT adds an
(H, N, N) bias to every block's scores, which rules out the flash kernel: on an H200 a ViT-B update ran PyTorch's
memory-efficient kernel instead (`results/bench/update_profile_image_v1_b32_gpu.json`). This times, at ViT-B's
shapes, what `d2v.nn.attention` runs (SDPA with the bias as an additive mask, the bias learned) against a compiled
FlexAttention that adds the bias in its score function (CUDA only: it has no CPU backward) and, as the floor, SDPA
without a bias (flash), and checks that the biased variants agree on the output and on the bias's gradient.

    python bench/attention_kernels.py [--batch 32 --heads 12 --tokens 197 --head-dim 64 --device cuda
        --precision bf16] [--out results/bench/attention_kernels_gpu.json]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from v2_vs_v1 import milliseconds, timed_updates, timing_arguments, timing_setting

from d2v.io import atomic_write_json


def sdpa_biased(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def sdpa_unbiased(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v)


def flex_biased():
    """FlexAttention with the bias read in its score function, compiled (its eager form is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def attend(q, k, v, bias):
        return compiled(q, k, v, score_mod=lambda score, b, h, i, j: score + bias[h, i, j])
    return attend


def timed(attend, q, k, v, bias, steps: int) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """Seconds of each forward + backward after `timed_updates`' three untimed ones (compilation, autotuning), the
    last output and the bias's gradient."""
    last = {}

    def clear_grads():
        for t in (q, k, v, bias):
            t.grad = None

    def forward_backward(_, step):
        last["out"] = attend(q, k, v, bias)
        last["out"].float().square().mean().backward()

    times = timed_updates(clear_grads, forward_backward, q.device, steps, compile=True)
    return times, last["out"].detach().float(), None if bias.grad is None else bias.grad.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197, help="ViT-B at 224 px: 196 patches and [CLS]")
    parser.add_argument("--head-dim", type=int, default=64)
    timing_arguments(parser, Path("results/bench/attention_kernels_cpu.json"), steps=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(args.heads, args.tokens, args.tokens, generator=g) * 0.1).to(device).requires_grad_()
    kernels = {"sdpa_bias": sdpa_biased, "sdpa_no_bias": sdpa_unbiased}
    if device.type == "cuda":
        kernels["flex_bias_compiled"] = flex_biased()
    rows, reference = [], None
    for name, attend in kernels.items():
        try:
            times, out, grad = timed(attend, q, k, v, bias, args.steps)
        except Exception as err:  # noqa: BLE001 - a kernel this torch or GPU lacks is a row, not the end
            rows.append({"kernel": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            print(rows[-1], flush=True)
            continue
        row = {"kernel": name, **milliseconds(times)}
        if grad is not None:  # a biased kernel: against the first one
            reference = reference or (out, grad)
            row["max_abs_diff_out"] = float((out - reference[0]).abs().max())
            row["max_abs_diff_bias_grad"] = float((grad - reference[1]).abs().max())
        rows.append(row)
        print(row, flush=True)
    atomic_write_json(args.out, {
        "what": "self-attention with an (H, N, N) learned bias, forward + backward, per kernel",
        "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim},
        **timing_setting(args, device), "results": rows})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
