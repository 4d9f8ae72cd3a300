"""Encoder forward+backward time, d2v vs Hugging Face Data2Vec* at the same (base) config, same weights.

Writes results/bench/encoders_vs_hf.json. Not a test: numbers depend on the machine.
Usage: python bench/encoders_vs_hf.py [--repeats 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from d2v.interop import load_hf  # noqa: E402
from d2v.io import atomic_write_json  # noqa: E402

CASES = {
    "image": (lambda: transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
        use_shared_relative_position_bias=True, use_mean_pooling=False, drop_path_rate=0.0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        lambda: torch.randn(4, 3, 224, 224), "pixel_values"),
    "speech": (lambda: transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(
        layerdrop=0.0, mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0)),
               lambda: torch.randn(2, 64_000), "input_values"),
    "text": (lambda: transformers.Data2VecTextModel(transformers.Data2VecTextConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        add_pooling_layer=False), lambda: torch.randint(4, 50265, (4, 128)), "input_ids"),
}


def paired_seconds(run_a, run_b, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each run, timed in alternating order (ABBA...), so that drift in the machine's speed (other
    load, frequency) falls on both alike instead of on whichever ran second."""
    run_a(), run_b()  # warm-up
    times: dict = {run_a: [], run_b: []}
    for i in range(repeats):
        for run in ((run_a, run_b) if i % 2 == 0 else (run_b, run_a)):
            start = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - start)
    return times[run_a], times[run_b]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default="results/bench/encoders_vs_hf.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, (make_hf, make_input, key) in CASES.items():
        hf = make_hf().train()  # all dropouts 0 in the config (ours inherit it), so both do identical work
        ours = load_hf(name, hf).train()
        x = make_input()

        def run_hf():
            hf(**{key: x}).last_hidden_state.sum().backward()

        def run_ours():
            ours(x).x.sum().backward()

        hf_times, our_times = paired_seconds(run_hf, run_ours, args.repeats)
        t_hf, t_ours = statistics.median(hf_times), statistics.median(our_times)
        results[name] = {"input": list(x.shape), "hf_s": round(t_hf, 4), "d2v_s": round(t_ours, 4),
                         "speedup": round(t_hf / t_ours, 3), "hf_min_s": round(min(hf_times), 4),
                         "d2v_min_s": round(min(our_times), 4), "speedup_of_min": round(min(hf_times) /
                                                                                     min(our_times), 3)}
        print(f"{name:6s} input {tuple(x.shape)}: HF {t_hf:.3f}s  d2v {t_ours:.3f}s  speed-up x{t_hf / t_ours:.2f} "
              f"(of the fastest runs x{min(hf_times) / min(our_times):.2f})")
    atomic_write_json(args.out, {
        "benchmark": "encoder forward+backward, base config, dropout 0, fp32, train mode, median of repeats "
                     "timed in alternating order", "repeats": args.repeats,
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "machine": platform.machine(), "results": results,
    })


if __name__ == "__main__":
    main()
