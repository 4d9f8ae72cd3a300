"""The shard index cache: the tables `d2v.data.seekable` builds from every tar's headers (and a text corpus's .npy
headers), kept between runs, or every rank of every restart reads them again (a minute for ImageNet's 2.6M members,
minutes for a text corpus's chunks).

One entry per (kind, tar): `<hash of kind and resolved path>.npz`, holding the arrays and the source they were built
from (format, kind, path, size, mtime_ns). An entry whose source no longer matches its tar is built again and
replaces the old one, so a rewritten tar leaves nothing behind; the entry of a deleted or moved tar stays until
`prune` (`d2v index --prune`). Entries are written atomically: concurrent ranks at worst build the same one twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2v.io import atomic_write

log = logging.getLogger("d2v.data")

FORMAT = 2  # 2: one entry per (kind, tar), its source inside; format 1 named entries by source and kept no record
SOURCE = "__source__"
ABANDONED_AFTER_S = 3600  # a temp file this old is a killed writer's, not one still being written


def folder() -> Path | None:
    """Where shard indexes are kept between runs: $D2V_INDEX_CACHE, else $XDG_CACHE_HOME/d2v/shard-index
    (~/.cache/d2v/shard-index); `D2V_INDEX_CACHE=off` keeps none."""
    setting = os.environ.get("D2V_INDEX_CACHE")
    if setting == "off":
        return None
    return Path(setting) if setting else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2v" / "shard-index"


def source_of(path: Path, kind: str) -> dict:
    """What an entry for the tar at `path` must have been built from to be read back."""
    stat = path.stat()
    return {"format": FORMAT, "kind": kind, "path": str(path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def entry_of(cache: Path, source: dict) -> Path:
    name = hashlib.sha256(f"{source['kind']}|{source['path']}".encode()).hexdigest()[:32]
    return cache / f"{name}.npz"


def cached(path: Path, kind: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`build()`'s arrays for the tar at `path`, from the cache when its entry was built from this tar as it is now
    (resolved path, size, modification time); else built and stored. An unreadable entry is rebuilt with a warning;
    an unwritable cache is warned about, not fatal."""
    cache = folder()
    if cache is None:
        return build()
    source = source_of(path, kind)
    entry = entry_of(cache, source)
    try:
        with np.load(entry) as stored:
            if SOURCE in stored.files and json.loads(str(stored[SOURCE])) == source:
                return {name: stored[name] for name in stored.files if name != SOURCE}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("rebuilding the index of %s: its cache entry %s is unreadable (%s)", path, entry, err)
    arrays = build()
    try:
        atomic_write(entry, lambda f: np.savez(f, **arrays, **{SOURCE: np.asarray(json.dumps(source))}))
    except OSError as err:
        log.warning("shard index cache %s not written (%s)", cache, err)
    return arrays


def stale(entry: Path) -> str | None:
    """Why `entry` can no longer be read back (None: it can): unreadable, another format, or its tar gone or
    changed since."""
    try:
        with np.load(entry) as stored:
            if SOURCE not in stored.files:
                return "written by an older d2v (no source recorded)"
            source = json.loads(str(stored[SOURCE]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        return f"unreadable ({err})"
    if source.get("format") != FORMAT:
        return f"index format {source.get('format')}, this d2v reads {FORMAT}"
    tar = Path(source["path"])
    if not tar.is_file():
        return f"{tar} is gone"
    if source != source_of(tar, source["kind"]):
        return f"{tar} changed since"
    return None


@dataclass(frozen=True)
class Pruned:
    entry: Path
    why: str
    size: int


def prune(cache: Path, now: float | None = None) -> list[Pruned]:
    """Delete the entries that can no longer be read back, and temp files that killed writers left behind."""
    now = time.time() if now is None else now
    pruned = []
    for path in sorted(cache.glob("*.npz")):
        if (why := stale(path)) is not None:
            pruned.append(Pruned(path, why, path.stat().st_size))
    for path in sorted(cache.glob(".*.tmp")):
        if now - path.stat().st_mtime > ABANDONED_AFTER_S:
            pruned.append(Pruned(path, "left by a killed writer", path.stat().st_size))
    for p in pruned:
        p.entry.unlink(missing_ok=True)
    return pruned


def usage(cache: Path) -> tuple[int, int]:
    """(entries, bytes) in the cache."""
    sizes = [p.stat().st_size for p in cache.glob("*.npz")] if cache.is_dir() else []
    return len(sizes), sum(sizes)
