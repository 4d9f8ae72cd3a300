"""Pieces of long recordings: voice-activity intervals packed into training-sized pieces, stored as sample ranges.

A manifest row may name a piece of its file instead of the whole file: `segments` holds its sample ranges as
`start:stop` pairs separated by spaces. `d2v shard` stores only those samples, concatenated, as a FLAC.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

Ranges = list[tuple[int, int]]


def vad_ranges(intervals: Sequence, rate: int, frames: int, where: str = "voice_activity") -> Ranges:
    """Voice-activity intervals in seconds ([[start, end], ...], in order) → sample ranges clipped to the file.

    Raises ValueError naming `where` for anything that is not an ordered list of [start, end] with start < end."""
    ranges = []
    for k, pair in enumerate(intervals):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and
                all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"{where}[{k}]: expected [start, end] in seconds, got {pair!r}")
        start, end = pair
        if not 0 <= start < end:
            raise ValueError(f"{where}[{k}]: expected 0 <= start < end, got [{start}, {end}]")
        if ranges and start * rate < ranges[-1][1]:
            raise ValueError(f"{where}[{k}]: starts at {start} s, before the previous interval ends")
        lo, hi = int(start * rate), min(int(end * rate), frames)
        if lo < hi:  # an interval past the end of the audio is clipped, or dropped when nothing is left
            ranges.append((lo, hi))
    return ranges


def pack(ranges: Ranges, max_samples: int) -> list[Ranges]:
    """Join consecutive ranges into pieces of at most `max_samples`, the rule of Libri-light's `cut_by_vad.py`: a
    range that would take a non-empty piece past the limit starts a new one, so a range longer than the limit is a
    piece of its own."""
    pieces, piece, length = [], [], 0
    for lo, hi in ranges:
        if piece and length + (hi - lo) > max_samples:
            pieces.append(piece)
            piece, length = [], 0
        piece.append((lo, hi))
        length += hi - lo
    if piece:
        pieces.append(piece)
    return pieces


def format_ranges(ranges: Ranges) -> str:
    return " ".join(f"{lo}:{hi}" for lo, hi in ranges)


def parse_ranges(text: str, where: str = "segments") -> Ranges:
    try:
        ranges = [tuple(int(x) for x in pair.split(":")) for pair in text.split()]
    except ValueError:
        ranges = [()]
    if not ranges or any(len(r) != 2 or not 0 <= r[0] < r[1] for r in ranges):
        raise ValueError(f"{where}: expected sample ranges 'start:stop start:stop ...' with start < stop, "
                         f"got {text!r}")
    return ranges


def read_ranges(path: str | Path, ranges: Ranges) -> tuple[np.ndarray, int]:
    """The samples of `ranges`, concatenated, in the file's own integer format when it has one (lossless)."""
    with sf.SoundFile(path) as f:  # one open per piece: the header gives length and format
        if ranges[-1][1] > f.frames:
            raise ValueError(f"{path}: segment ends at sample {ranges[-1][1]}, past the file's {f.frames}")
        dtype = "int16" if f.subtype in ("PCM_16", "PCM_S8", "PCM_U8") else "int32" if "PCM" in f.subtype \
            else "float32"
        parts = []
        for lo, hi in ranges:
            f.seek(lo)
            parts.append(f.read(hi - lo, dtype=dtype))
        return np.concatenate(parts), f.samplerate


def flac_of_ranges(path: str | Path, ranges: Ranges) -> bytes:
    """A piece of `path` as FLAC bytes (16-bit when the source is, else 24-bit)."""
    audio, rate = read_ranges(path, ranges)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC", subtype="PCM_16" if audio.dtype == np.int16 else "PCM_24")
    return buf.getvalue()


def cut_piece(job: tuple[str, str, str]) -> tuple[bytes | None, str | None]:
    """(path, segments, row id) → the piece's FLAC bytes, or why it cannot be cut. `d2v shard` runs it in worker
    processes, which import only this module."""
    path, segments, row_id = job
    if not Path(path).is_file():
        return None, "missing"
    if not isinstance(segments, str):
        return None, "no segments (sample ranges) in the manifest row"
    try:
        return flac_of_ranges(path, parse_ranges(segments, f"{row_id}: segments")), None
    except (ValueError, RuntimeError) as err:
        return None, f"undecodable: {err}"
