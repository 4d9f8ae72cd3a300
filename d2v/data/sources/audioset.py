"""AudioSet (Gemmeke et al. 2017), paper scale: the official segment lists and the clips you downloaded.

AudioSet is published as YouTube ids with labels, not as audio, so `prepare` takes two folders: `csvs` with the
official `class_labels_indices.csv` and the segment lists (`balanced_train_segments.csv`, `eval_segments.csv`,
`unbalanced_train_segments.csv`), and `audio` with one folder per split, `audio/<split>/`, holding the clips named by
their YouTube id: `<ytid>.<ext>`, PANNs' `Y<ytid>.<ext>`, or `<ytid>_<start>[_<end>].<ext>` (wav, flac, ogg or mp3).
Each clip is decoded, mixed to mono, resampled to 16 kHz (scipy's polyphase filter) and stored as FLAC; its labels
are the class indices of class_labels_indices.csv (the model's output order). Clips that are missing (a share of
AudioSet is gone from YouTube), unreadable, silent or labelled with a class the index lacks are skipped, named and
counted.
data2vec pretrains on the clips of `unbalanced_train` (labels unused), fine-tunes on `balanced_train` and reports
mAP on `eval` [P1 Tab.3].
"""
from __future__ import annotations

import csv
import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from pydantic import PositiveInt

from d2v.data.download import bytes_sha256
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, log, pcm16_flac, register, rows_in_blocks, staged

SEGMENT_LISTS = {"balanced_train": "balanced_train_segments.csv", "eval": "eval_segments.csv",
                 "unbalanced_train": "unbalanced_train_segments.csv"}
CLASS_INDEX = "class_labels_indices.csv"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
SAMPLE_RATE = 16_000
CONVERT_BLOCK = 64  # clips a worker converts per task
# <ytid>, Y<ytid>, <ytid>_<start>[_<end>]: a YouTube id is 11 characters of [A-Za-z0-9_-]
CLIP_NAME = re.compile(r"^Y?(?P<ytid>[A-Za-z0-9_-]{11})(?:_[0-9.]+){0,2}$")


def read_class_index(path: Path) -> tuple[dict[str, int], list[str]]:
    """class_labels_indices.csv (`index,mid,display_name`): mid → index, and the display names in index order."""
    if not path.is_file():
        raise FileNotFoundError(f"audioset: {path} missing; expected the official {CLASS_INDEX}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"index", "mid", "display_name"}:
        raise ValueError(f"audioset: {path}: expected the columns index,mid,display_name")
    indices = [int(r["index"]) for r in rows]
    if indices != list(range(len(rows))):
        raise ValueError(f"audioset: {path}: class indices are not 0..{len(rows) - 1} in order")
    return {r["mid"]: int(r["index"]) for r in rows}, [r["display_name"] for r in rows]


def read_segments(path: Path) -> list[tuple[str, float, float, list[str]]]:
    """An official segment list: `# ` comment lines, then `YTID, start_seconds, end_seconds, "mid,mid,..."`."""
    if not path.is_file():
        raise FileNotFoundError(f"audioset: {path} missing; expected the official segment list {path.name}")
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        lines = (line for line in f if line.strip() and not line.startswith("#"))
        for n, row in enumerate(csv.reader(lines, skipinitialspace=True), 1):
            if len(row) != 4:
                raise ValueError(f"audioset: {path}: segment {n} has {len(row)} fields, expected YTID, "
                                 f"start_seconds, end_seconds, positive_labels: {row}")
            ytid, start, end, mids = row
            out.append((ytid, float(start), float(end), [m for m in mids.split(",") if m]))
    return out


def find_clips(folder: Path) -> dict[str, Path]:
    """YouTube id → clip file in `folder` (files named otherwise are ignored; of two files for one id, the first
    in name order)."""
    clips: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = CLIP_NAME.match(path.stem)
        if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES and match:
            clips.setdefault(match["ytid"], path)
    return clips


def to_16k_mono(path: Path) -> np.ndarray:
    """A clip as float32 mono at 16 kHz. Resampled by scipy's polyphase filter (Kaiser window), not torchaudio: this
    runs in forked workers, where a torch kernel can deadlock on the thread pool of a parent that used torch."""
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        common = math.gcd(rate, SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // common, rate // common).astype(np.float32)
    return wave


def _convert(jobs: list[tuple[str, str, Path, str]], out: Path) -> list[dict | tuple[str, str]]:
    """For each (split, ytid, clip, labels): its manifest row with the FLAC written under `out`, or (path, reason)."""
    done = []
    for split, ytid, path, labels in jobs:
        try:
            wave = to_16k_mono(path)
        except Exception as err:  # a corrupt download is skipped and reported, never fatal
            done.append((str(path), f"unreadable audio: {err}"))
            continue
        if not len(wave) or not np.any(wave):
            done.append((str(path), "no audio (empty or all zeros)"))
            continue
        data = pcm16_flac(wave, SAMPLE_RATE)
        rel = f"audio/{split}/{ytid}.flac"
        (out / rel).write_bytes(data)
        done.append(dict(id=f"{split}_{ytid}", path=rel, split=split, bytes=len(data),
                         duration=len(wave) / SAMPLE_RATE, sha256=bytes_sha256(data), labels=labels, ytid=ytid))
    return done


def clip_jobs(split: str, segments: list, clips: dict[str, Path], mid_index: dict[str, int], skipped: Skipped
              ) -> list[tuple[str, str, Path, str]]:
    """The clips of a segment list that can be converted, each with its labels as "i;j" (sorted class indices)."""
    jobs = []
    for ytid, _, _, mids in segments:
        if ytid not in clips:
            skipped.add(f"{split}/{ytid}", "clip missing from the audio folder")
            continue
        unknown = [m for m in mids if m not in mid_index]
        if unknown or not mids:
            skipped.add(str(clips[ytid]), f"labels {unknown} not in {CLASS_INDEX}" if unknown else "no labels", log)
            continue
        jobs.append((split, ytid, clips[ytid], ";".join(str(i) for i in sorted({mid_index[m] for m in mids}))))
    return jobs


@register("audioset", "speech", "paper",
          "AudioSet clips you downloaded, with the official segment lists and class index (multi-label, 527 classes)",
          splits=lambda options, dataset: options.get("splits", ("balanced_train", "eval")))
def prepare(ctx: Context, csvs: str | Path, audio: str | Path,
            splits: Sequence[str] = ("balanced_train", "eval"), workers: PositiveInt = 1) -> Path:
    """`csvs`: the folder with the official CSVs; `audio`: the folder with `<split>/` clip folders; `splits` among
    balanced_train, eval, unbalanced_train; `workers` processes decode and resample."""
    unknown = sorted(set(splits) - set(SEGMENT_LISTS))
    if unknown:
        raise ValueError(f"audioset: unknown split(s) {unknown}; expected some of {list(SEGMENT_LISTS)}")
    csvs, audio = Path(csvs), Path(audio)
    mid_index, names = read_class_index(csvs / CLASS_INDEX)
    skipped = Skipped()
    jobs = []
    for split in splits:
        if not (audio / split).is_dir():
            raise FileNotFoundError(f"audioset: {audio / split} missing; expected the {split} clips there, named "
                                    "<ytid>.wav (or Y<ytid>, <ytid>_<start>; flac, ogg, mp3)")
        jobs += clip_jobs(split, read_segments(csvs / SEGMENT_LISTS[split]), find_clips(audio / split), mid_index,
                          skipped)
    missing = sum(reason.startswith("clip missing") for _, reason in skipped.items)
    if missing:  # one line, not one per clip: a large share of the unbalanced list is gone from YouTube
        log.warning("audioset: %d of the segment lists' clips are not in %s (named in manifest.json's skipped files)",
                    missing, audio)
    if not jobs:
        raise FileNotFoundError(f"audioset: no clip of the {list(splits)} segment lists found under {audio}")
    with staged(ctx.out_dir) as out:
        for split in splits:
            (out / "audio" / split).mkdir(parents=True)
        rows = rows_in_blocks(functools.partial(_convert, out=out), jobs, CONVERT_BLOCK, workers, skipped)
        df = make_manifest(rows)
        hours = {s: round(float(d) / 3600, 2) for s, d in df.groupby("split")["duration"].sum().items()}
        write_manifest(out, df, source="audioset", classes=names, hours=hours, csvs=str(csvs), audio=str(audio),
                       skipped=skipped.as_json(),
                       licence="AudioSet labels CC-BY-4.0 (Google); the clips are YouTube videos under their "
                               "uploaders' terms")
    return ctx.out_dir
