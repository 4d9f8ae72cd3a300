"""Libri-light unlab-60k (small / medium / large), paper scale: the pretraining audio of data2vec's Large speech model.

Facebook publishes three tar archives of LibriVox audiobooks (577 h, 5,193 h, 51,934 h; `small+medium+large` is
unlab-60k) and no checksums for them, so they are fetched unpinned and checked by content: every FLAC must open and
come with its JSON (speaker, book, `voice_activity`). `root` indexes already extracted archives in place instead
(`root/{small,medium,large}/<speaker>/<book>/*.flac`): large.tar is 3.05 TB, and a second copy is not needed.

Each file is cut as Libri-light's `cut_by_vad.py` cuts it, the preprocessing wav2vec 2.0 follows (53.2k h of speech
from the 60k h of files): consecutive voice-activity intervals are joined, with the silence between them dropped,
into pieces of at most `target_seconds` (an interval longer than that is a piece of its own). A manifest row is one
piece: its file and sample ranges (`segments`, see `d2v.data.segments`); `d2v shard` stores the piece as a FLAC.
A file without a usable JSON, unreadable, or with no voice activity is skipped, named and counted.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import soundfile as sf

from d2v.data.download import Artifact, fetch
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.segments import format_ranges, pack, vad_ranges
from d2v.data.sources.base import Context, log, register
from d2v.data.sources.librispeech import extract

SUBSETS = ("small", "medium", "large")
HOURS = {"small": 577, "medium": 5193, "large": 51934}  # as published, before voice-activity cutting
ARTIFACTS = {s: Artifact(f"{s}.tar", (f"https://dl.fbaipublicfiles.com/librilight/data/{s}.tar",), unpinned=True,
                         note=f"Libri-light unlab {s} ({HOURS[s]} h); no published checksum")
             for s in SUBSETS}
# Libri-light's script cuts at 30 s by default (60 s from its command line); wav2vec 2.0 does not say which it used.
# Pretraining crops 15.6-20 s from each piece, so shorter pieces leave less of each file unseen.
TARGET_SECONDS = 30.0


def piece_rows(audio: Path, meta_path: Path, subset: str, out_dir: Path, target_seconds: float,
               skipped: Skipped) -> list[dict]:
    """One manifest row per piece of `audio`, from the voice activity in its JSON."""
    rel = os.path.relpath(audio, out_dir)
    try:
        meta = json.loads(meta_path.read_text())
        info = sf.info(audio)
        ranges = vad_ranges(meta["voice_activity"], info.samplerate, info.frames, f"{meta_path}: voice_activity")
    except KeyError as err:
        skipped.add(rel, f"{meta_path.name} has no {err.args[0]!r}", log)
        return []
    except (ValueError, TypeError, RuntimeError) as err:  # bad JSON or intervals, an unreadable FLAC
        skipped.add(rel, f"{type(err).__name__}: {err}", log)
        return []
    if not ranges:
        skipped.add(rel, "no voice activity inside the audio", log)
        return []
    speaker, book = audio.parent.parent.name, audio.parent.name
    stem = re.sub(r"[^\w-]", "_", f"{speaker}-{book}-{audio.stem}")  # a WebDataset key: no dots or slashes
    book_id, size = str(meta.get("book_meta", {}).get("id", "")), audio.stat().st_size
    return [dict(id=f"{stem}-{k:04d}", path=rel, split=subset, bytes=size,
                 duration=sum(hi - lo for lo, hi in piece) / info.samplerate, speaker=speaker, book=book_id,
                 segments=format_ranges(piece), file_duration=info.frames / info.samplerate)
            for k, piece in enumerate(pack(ranges, int(target_seconds * info.samplerate)))]


def index_subset(folder: Path, subset: str, out_dir: Path, target_seconds: float, skipped: Skipped) -> list[dict]:
    rows = []
    for audio in sorted(folder.glob("*/*/*.flac")):
        meta = audio.with_suffix(".json")
        if not meta.is_file():
            skipped.add(os.path.relpath(audio, out_dir), f"no {meta.name} beside it (voice activity)", log)
            continue
        rows += piece_rows(audio, meta, subset, out_dir, target_seconds, skipped)
    return rows


def subset_folder(base: Path, subset: str) -> Path:
    """`base/subset` as the archives unpack it (`small.tar` holds `small/<speaker>/...`)."""
    folder = base / subset
    if not folder.is_dir():
        raise FileNotFoundError(f"librilight: {folder} missing; expected {base}/{subset}/<speaker>/<book>/*.flac")
    return folder


def unpack(archive: Path, dest: Path) -> Path:
    """Without a checksum, a damaged download shows only here: name it, and how to fetch it again."""
    try:
        return extract(archive, dest)
    except tarfile.TarError as err:
        raise ValueError(f"librilight: {archive} is not a complete tar archive ({err}); delete it to download it "
                         "again") from err


@register("librilight", "speech", "paper", "Libri-light unlab-60k (small/medium/large), cut by voice activity",
          splits=lambda options, dataset: options.get("subsets", SUBSETS))
def prepare(ctx: Context, subsets: Sequence[str] = SUBSETS, root: str | Path | None = None,
            target_seconds: float = TARGET_SECONDS, artifacts: Mapping[str, Artifact] | None = None) -> Path:
    """`root`: a folder with the extracted subsets, indexed in place; else each subset's tar is downloaded and
    unpacked under the prepared folder. `artifacts` overrides the download table (e.g. a local mirror)."""
    subsets = list(subsets)
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown or not subsets:
        raise ValueError(f"librilight: unknown subset(s) {unknown or subsets}; expected some of {list(SUBSETS)}")
    if not target_seconds > 0:
        raise ValueError(f"librilight: target_seconds must be > 0, got {target_seconds}")
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    table = {**ARTIFACTS, **(artifacts or {})}
    skipped, rows = Skipped(), []
    for subset in subsets:
        base = Path(root) if root is not None else unpack(fetch(table[subset], ctx.cache_dir), out / "splits" / subset)
        rows += index_subset(subset_folder(base, subset), subset, out, target_seconds, skipped)
    df = make_manifest(rows)
    hours = {s: round(float(d) / 3600, 3) for s, d in df.groupby("split")["duration"].sum().items()}
    files = df.drop_duplicates("path").groupby("split")["file_duration"].sum()
    write_manifest(out, df, source="librilight", hours=hours, hours_before_vad=
                   {s: round(float(d) / 3600, 3) for s, d in files.items()}, target_seconds=target_seconds,
                   root=None if root is None else str(root), skipped=skipped.as_json(),
                   artifacts={s: table[s].urls[0] for s in subsets} if root is None else {},
                   licence="public domain (LibriVox recordings)")
    return out
