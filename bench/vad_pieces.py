"""How fast Libri-light's recordings are cut into voice-activity pieces (`d2v prepare librilight` + `d2v shard
--workers N`), to size the paper job: 53.2k hours of speech cut from 3.4 TB of FLAC.

Writes synthetic recordings in Libri-light's layout (`small/<speaker>/<book>/<file>.flac` + `.json` with
`voice_activity`: speech runs of 0.5-8 s between pauses of 0.2-1.5 s; the audio is band-limited noise, which FLAC
packs about as well as read speech), prepares them in place (`root`), then shards them with each worker count.
Every worker count must write the same shards; the JSON records the hours of speech cut per wall-clock second.

    python bench/vad_pieces.py [--files 24 --minutes 5] [--workers 1,2] [--out results/bench/vad_pieces_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset  # noqa: F401  (write_shards imports it, and torch, on first use: not part of the timing)

from d2v.data.shards import write_shards
from d2v.data.sources import Context, librilight
from d2v.io import atomic_write_json
from d2v.processes import usable_cpus

RATE = 16_000
LIBRI_LIGHT_SPEECH_HOURS = 53_200  # unlab-60k after the voice-activity cut (wav2vec 2.0, §4.1)


def recording(seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """Band-limited noise with speech-like runs and pauses, and its voice activity in seconds."""
    vad, t = [], float(rng.uniform(0.2, 1.0))
    while True:
        run = float(rng.uniform(0.5, 8.0))
        if t + run > seconds:
            break
        vad.append([round(t, 2), round(t + run, 2)])
        t += run + float(rng.uniform(0.2, 1.5))
    noise = np.convolve(rng.standard_normal(int(seconds * RATE)), np.hanning(9), mode="same")
    gain = np.full(len(noise), 0.01)
    for start, end in vad:
        gain[int(start * RATE):int(end * RATE)] = 0.1
    return np.clip(noise * gain, -1, 1), vad


def write_corpus(root: Path, files: int, minutes: float, seed: int = 0) -> float:
    """`files` recordings of `minutes` under root/small; returns the hours of audio written."""
    rng = np.random.default_rng(seed)
    for k in range(files):
        book = root / "small" / str(100 + k % 4) / f"book_{k // 4}"
        book.mkdir(parents=True, exist_ok=True)
        audio, vad = recording(minutes * 60, rng)
        sf.write(book / f"chapter_{k:03d}.flac", audio, RATE, subtype="PCM_16")
        (book / f"chapter_{k:03d}.json").write_text(json.dumps({"speaker": str(100 + k % 4),
                                                                "book_meta": {"id": str(k // 4)},
                                                                "voice_activity": vad}))
    return files * minutes / 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--workers", default="1,2", help="worker counts to time, e.g. 1,2,4,8")
    parser.add_argument("--target-seconds", type=float, default=librilight.TARGET_SECONDS)
    parser.add_argument("--out", type=Path, default=Path("results/bench/vad_pieces_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hours = write_corpus(tmp / "ll", args.files, args.minutes)
        start = time.perf_counter()
        raw = librilight.prepare(Context(tmp / "cache", tmp / "raw"), subsets=["small"], root=tmp / "ll",
                                 target_seconds=args.target_seconds)
        index_seconds = time.perf_counter() - start
        meta = json.loads((raw / "manifest.json").read_text())
        speech_hours = meta["hours"]["small"]
        rows, first = [], None
        for workers in map(int, args.workers.split(",")):
            start = time.perf_counter()
            index = write_shards(raw, "small", tmp / f"shards-{workers}", workers=workers)
            seconds = time.perf_counter() - start
            digests = [s["sha256"] for s in index["shards"]]
            first = first or digests
            if digests != first:
                raise SystemExit(f"{workers} workers wrote other shards than {rows[0]['workers']}")
            rate = speech_hours * 3600 / seconds
            rows.append({"workers": workers, "seconds": seconds, "pieces": index["count"],
                         "speech_seconds_per_s": rate, "speedup": rows[0]["seconds"] / seconds if rows else 1.0,
                         "unlab_60k_hours": LIBRI_LIGHT_SPEECH_HOURS / rate})
            print(f"{workers} workers: {seconds:.1f} s, {rate:.0f}x real time, unlab-60k in "
                  f"{rows[-1]['unlab_60k_hours']:.1f} h", flush=True)
    atomic_write_json(args.out, {
        "benchmark": "vad_pieces", "files": args.files, "minutes_per_file": args.minutes, "audio_hours": hours,
        "speech_hours": speech_hours, "target_seconds": args.target_seconds, "index_seconds": index_seconds,
        "index_files_per_s": args.files / index_seconds, "usable_cpus": usable_cpus(),
        "machine": platform.machine(), "processor": platform.processor(), "rows": rows})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
