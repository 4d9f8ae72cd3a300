"""Manifest → WebDataset shards (`shard-%06d.tar`) + `index.json` with per-shard counts, bytes and sha256.

Samples are written in manifest order with a fixed tar mtime, so the same manifest gives byte-identical shards.
Each split is built in a temp folder that is renamed into place. Before a file goes into a shard it is checked:
missing, changed since `prepare` (sha256 differs from the manifest) or undecodable files are skipped, named in a
warning and counted in `index.json`.

What a sample holds, per kind:
- image: `<ext>` the encoded image bytes as prepared (png/jpeg), `cls` the class index;
- speech: `flac` (or `wav`) bytes, `txt` the transcript, `json` {duration, speaker, and for a tagged clip `labels`,
  its class ids}; a row with `segments` (a piece of a long recording, `d2v.data.segments`) is stored as a FLAC of
  those samples, cut in `workers` processes;
- text corpus: `ids.npy` a chunk of at most `chunk_tokens` token ids (paragraphs tokenized, each ending in </s>);
- text task: `json` {text, text_b, label}.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image
from pydantic import Field

from d2v.config import StrictModel
from d2v.data.download import bytes_sha256, file_digest
from d2v.data.manifest import META, Skipped, read_manifest
from d2v.data.segments import cut_piece
from d2v.data.sources.base import staged
from d2v.data.tokenizer import paragraphs
from d2v.io import atomic_write_json
from d2v.processes import forked_pool

log = logging.getLogger("d2v.shard")
INDEX = "index.json"
KINDS = ("image", "speech", "text_corpus", "text_task")


class ShardConfig(StrictModel):
    max_bytes: int = Field(64 << 20, ge=1 << 10)
    max_count: int = Field(10_000, ge=1)
    chunk_tokens: int = Field(512, ge=8)  # text corpus: tokens per stored sample (packing happens when reading)


class ShardError(ValueError):
    """Shards or their index are missing, corrupt or inconsistent."""


def infer_kind(source_dir: Path) -> str:
    from d2v.data.sources import SOURCES

    meta = json.loads((source_dir / META).read_text())
    source = meta["source"].split("/")[0]
    if source not in SOURCES:
        raise ShardError(f"{source_dir / META}: unknown source {meta['source']!r}")
    modality = SOURCES[source].modality
    if modality == "text":
        return "text_task" if "task" in meta or source == "glue" else "text_corpus"
    return modality


def _read_checked(path: Path, row, kind: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why it cannot go into a shard). An image or a recording is read once, for
    the hash, the decode check and the shard; a text volume is only hashed (it is tokenized line by line)."""
    if not path.is_file():
        return None, "missing"
    data = None if kind == "text_corpus" else path.read_bytes()
    expected = row.sha256 if isinstance(row.sha256, str) and row.sha256 else None
    if expected and (file_digest(path) if data is None else bytes_sha256(data)) != expected:
        return None, "sha256 differs from the manifest (file changed or corrupt since prepare)"
    try:
        if kind == "image":
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        elif kind == "speech" and sf.info(io.BytesIO(data)).frames == 0:
            return None, "no audio frames"
    except Exception as err:
        return None, f"undecodable: {err}"
    return data, None


def _pieces(source_dir: Path, df: pd.DataFrame, skipped: Skipped, workers: int) -> Iterator[dict]:
    """Samples of a manifest of pieces, in manifest order whatever the number of workers."""
    jobs = ((str(source_dir / r.path), r.segments, r.id) for r in df.itertuples(index=False))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(forked_pool(workers))
            # blocks of a few hundred pieces bound the memory: map() would submit every piece of 53k hours at once
            blocks = iter(lambda: list(itertools.islice(jobs, 64 * workers)), [])
            cut = itertools.chain.from_iterable(pool.map(cut_piece, block, chunksize=8) for block in blocks)
        else:
            cut = map(cut_piece, jobs)
        for row, (data, problem) in zip(df.itertuples(index=False), cut):
            if problem:
                skipped.add(row.path, problem, log)
                continue
            yield {"__key__": row.id, "flac": data, "txt": "" if pd.isna(row.text) else row.text,
                   "json": {"duration": float(row.duration), "speaker": getattr(row, "speaker", "")}}


def _samples(source_dir: Path, df: pd.DataFrame, kind: str, cfg: ShardConfig, tokenizer, skipped: Skipped,
             workers: int = 1) -> Iterator[dict]:
    if kind == "speech" and "segments" in df:
        yield from _pieces(source_dir, df, skipped, workers)
        return
    for row in df.itertuples(index=False):
        if kind == "text_task":
            label = None if pd.isna(row.label) else float(row.label)
            text_b = None if pd.isna(row.text_b) else row.text_b
            yield {"__key__": row.id, "json": {"text": row.text, "text_b": text_b, "label": label}}
            continue
        path = source_dir / row.path
        data, problem = _read_checked(path, row, kind)
        if problem:
            skipped.add(row.path, problem, log)
            continue
        if kind == "text_corpus":
            yield from _token_chunks(path, row.id, cfg.chunk_tokens, tokenizer)
            continue
        if kind == "image":
            sample = {"__key__": row.id, path.suffix.lower().lstrip(".").replace("jpeg", "jpg"): data}
            if not pd.isna(row.label):
                sample["cls"] = int(row.label)
            yield sample
        else:
            yield {"__key__": row.id, path.suffix.lower().lstrip("."): data, "txt": "" if pd.isna(row.text) else
                   row.text, "json": {"duration": float(row.duration), "speaker": getattr(row, "speaker", ""),
                                      **clip_labels(row)}}


def clip_labels(row) -> dict:
    """A tagged clip's class ids, from the manifest's `labels` column ("0;137"), as {"labels": [0, 137]}; nothing
    for a manifest without the column."""
    labels = getattr(row, "labels", None)
    if labels is None or pd.isna(labels):
        return {}
    return {"labels": [int(c) for c in str(labels).split(";") if c]}


def _token_chunks(path: Path, key: str, chunk_tokens: int, tokenizer) -> Iterator[dict]:
    """A text file's paragraphs (`tokenizer.paragraphs`) tokenized, each ending in </s> (the reader adds <s> to each
    packed block), in samples of `chunk_tokens` ids; read line by line, so a volume of any size takes the memory of a
    chunk."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    ids, k = [], 0
    for paragraph in paragraphs(path):
        ids += [*tokenizer.sp.encode(paragraph), tokenizer.eos]
        while len(ids) >= chunk_tokens:
            yield {"__key__": f"{key}-{k:05d}", "ids.npy": np.asarray(ids[:chunk_tokens], dtype=dtype)}
            ids, k = ids[chunk_tokens:], k + 1
    if ids:
        yield {"__key__": f"{key}-{k:05d}", "ids.npy": np.asarray(ids, dtype=dtype)}


def encode_field(ext: str, value) -> bytes:
    """A sample field as webdataset's default encoder stores it, for the fields shards hold: bytes as they are, text
    as UTF-8, `json` by json.dumps, `cls` as its decimal digits, `npy` in numpy's .npy format."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    kind = ext.rsplit(".", 1)[-1].lower()
    if kind == "json":
        return json.dumps(value).encode("utf-8")
    if kind == "cls":
        return str(value).encode("ascii")
    if kind == "npy":
        buf = io.BytesIO()
        np.lib.format.write_array(buf, value)
        return buf.getvalue()
    raise ShardError(f"no encoding for a .{ext} field of type {type(value).__name__}")


class TarShards:
    """Samples into `pattern % n` tars, byte for byte what webdataset's `ShardWriter(pattern, maxcount, maxsize,
    mtime=0)` writes (tested against it): each field a member `key.ext`, in sorted order, mode 0444, owner and group
    'bigdata', mtime 0; a new tar once `maxcount` samples or `maxsize` payload bytes are in the current one (the
    first is opened at once, so an empty split leaves one empty tar). Written here because importing webdataset
    imports torch, 4-6 s of every shard job."""

    def __init__(self, pattern: str, maxcount: int, maxsize: int) -> None:
        self.pattern, self.maxcount, self.maxsize = pattern, maxcount, maxsize
        self.shard, self.file, self.tar = 0, None, None
        self._next()

    def _next(self) -> None:
        self._close()
        self.file = open(self.pattern % self.shard, "wb")  # closed in _close, with the tar
        self.tar = tarfile.open(fileobj=self.file, mode="w|")
        self.shard, self.count, self.size = self.shard + 1, 0, 0

    def write(self, sample: dict) -> None:
        if self.count >= self.maxcount or self.size >= self.maxsize:
            self._next()
        key = sample["__key__"]
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = encode_field(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
            self.size += len(data)
        self.count += 1

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.tar = self.file = None

    def __enter__(self) -> TarShards:
        return self

    def __exit__(self, *exc) -> None:
        self._close()


def shard_summary(path: Path) -> dict:
    with tarfile.open(path) as tar:
        keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    return {"name": path.name, "count": len(keys), "bytes": path.stat().st_size, "sha256": file_digest(path)}


def write_shards(source_dir: str | Path, split: str, out_dir: str | Path, cfg: ShardConfig | None = None,
                 tokenizer=None, subset: str | None = None, limit: int | None = None,
                 sample_seed: int | None = None, workers: int = 1) -> dict:
    """Shard one split of a prepared source; `subset` keeps rows tagged with it (e.g. '10min'); `limit` keeps the
    first N rows, or with `sample_seed` a seeded random N (in manifest order: a manifest sorted by name would
    otherwise give its first letters only); `workers` processes cut pieces of long recordings (the shards are the
    same for any number); returns the index."""
    cfg = cfg or ShardConfig()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    kind = infer_kind(source_dir)
    if kind == "text_corpus" and tokenizer is None:
        raise ShardError(f"{source_dir}: a text corpus is stored as token ids; pass the SentencePiece tokenizer")
    df = read_manifest(source_dir, split)
    if subset:
        if "subsets" not in df:
            raise ShardError(f"{source_dir}: manifest has no 'subsets' column; cannot select subset {subset!r}")
        tags = df["subsets"].fillna("").str.split("|")
        if not (chosen := tags.map(lambda t: subset in t)).any():
            present = sorted({t for row in tags for t in row if t})
            raise ShardError(f"{source_dir}/{split}: no row has subset {subset!r}; its subsets are {present} (an "
                             "empty shard set would train or score on nothing)")
        df = df[chosen].reset_index(drop=True)
    if sample_seed is not None and limit is None:
        raise ShardError(f"{source_dir}/{split}: sample_seed={sample_seed} needs a limit (how many rows to draw)")
    if limit is not None:
        rows = min(limit, len(df))
        df = df.iloc[:rows] if sample_seed is None else \
            df.sample(n=rows, random_state=sample_seed).sort_index().reset_index(drop=True)
    skipped = Skipped()
    with staged(out_dir) as tmp:
        with TarShards(str(tmp / "shard-%06d.tar"), cfg.max_count, cfg.max_bytes) as sink:
            for sample in _samples(source_dir, df, kind, cfg, tokenizer, skipped, workers):
                sink.write(sample)
        shards = [shard_summary(p) for p in sorted(tmp.glob("shard-*.tar"))]
        if not any(s["count"] for s in shards):  # the writer leaves one empty tar then
            lost = skipped.as_json()
            first = f"; the first: {lost['files'][0]['path']}: {lost['files'][0]['reason']}" if lost["files"] else ""
            raise ShardError(f"{source_dir}/{split}: no sample could be written ({len(df)} rows, {lost['count']} "
                             f"skipped{first})")
        index = {"source": str(source_dir), "split": split, "subset": subset, "kind": kind,
                 "manifest_sha256": file_digest(source_dir / "manifest.csv"), "rows": len(df),
                 "limit": limit, "sample_seed": sample_seed,
                 "count": sum(s["count"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
                 "shards": shards, "skipped": skipped.as_json(), "config": cfg.model_dump()}
        if kind in ("image", "text_task"):
            labels = df["label"].dropna()
            index["num_classes"] = int(labels.max()) + 1 if len(labels) and kind == "image" else None
        if kind == "speech":
            index["hours"] = round(float(df["duration"].sum()) / 3600, 4)
        atomic_write_json(tmp / INDEX, index)
    log.info("%s/%s: %d samples in %d shards (%d skipped)", source_dir.name, split, index["count"], len(shards),
             skipped.as_json()["count"])
    return index


def read_index(shard_dir: str | Path, verify: bool = False) -> dict:
    """Load `index.json`; every listed shard must exist with the recorded size (and sha256 when `verify`)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX
    if not path.is_file():
        raise ShardError(f"{path}: shard index missing (run `d2v shard` first)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not a shard index ({err}); run `d2v shard` again") from err
    for shard in checked_shard_list(index, path):
        f = shard_dir / shard["name"]
        if not f.is_file():
            raise ShardError(f"{f}: listed in {path} but missing")
        if f.stat().st_size != shard["bytes"]:
            raise ShardError(f"{f}: {f.stat().st_size} bytes, index says {shard['bytes']} (truncated or replaced)")
        if verify and file_digest(f) != shard["sha256"]:
            raise ShardError(f"{f}: sha256 differs from {path}")
    return index


SHARD_FIELDS = {"name": str, "bytes": int, "count": int, "sha256": str}  # what each entry of "shards" must hold


def checked_shard_list(index, path: Path) -> list[dict]:
    """`index["shards"]`, each entry with the fields readers use; else a ShardError naming the file and the entry."""
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ShardError(f"{path}: not a shard index (expected an object with a 'shards' list); run `d2v shard` again")
    for i, shard in enumerate(shards):
        entry = shard if isinstance(shard, dict) else {}
        bad = [k for k, kind in SHARD_FIELDS.items() if not isinstance(entry.get(k), kind)]
        if bad:
            need = ", ".join(f"{k}: {kind.__name__}" for k, kind in SHARD_FIELDS.items())
            raise ShardError(f"{path}: shards[{i}] has no valid {', '.join(bad)} (each entry needs {need}); "
                             "run `d2v shard` again")
    return shards
