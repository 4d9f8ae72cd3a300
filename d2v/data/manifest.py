"""Manifests: one CSV row per example, plus a JSON sidecar with counts, skipped files and source digests.

Columns (pandas dtypes): id, path (relative to the source folder), split, bytes, duration (seconds, speech),
label (class index or score; -1 or NaN when unlabeled), text (transcript, sentence, or first sentence of a
pair), text_b (second sentence of a pair), sha256 (of the file at `path`, or of the row's text). Sources may add
columns (speaker, novel, condition, ...).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from d2v.io import atomic_write_json, atomic_write_text

COLUMNS = {"id": "string", "path": "string", "split": "string", "bytes": "int64", "duration": "float64",
           "label": "float64", "text": "string", "text_b": "string", "sha256": "string"}
MANIFEST = "manifest.csv"
META = "manifest.json"
PRETRAIN_SPLIT = "pretrain"  # the split of a text corpus that SentencePiece trains on and pretraining reads
LM_SPLIT = "lm"  # a split of language-model text files, one normalised sentence a line (CTC beam search)


class ManifestError(ValueError):
    """A manifest is missing, lacks columns, or has bad values."""


@dataclass
class Skipped:
    """Files a source could not use, with the reason; reported, never silently dropped."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str, log=None) -> None:
        self.items.append((str(path), reason))
        if log is not None:
            log.warning("skipping %s: %s", path, reason)

    def as_json(self) -> dict:
        return {"count": len(self.items), "files": [{"path": p, "reason": r} for p, r in self.items]}


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col, dtype in COLUMNS.items():
        if col not in df:
            df[col] = pd.NA if dtype == "string" else (0 if dtype == "int64" else float("nan"))
        df[col] = df[col].astype(dtype)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


def write_manifest(folder: str | Path, df: pd.DataFrame, **meta) -> Path:
    """Write `manifest.csv` and `manifest.json` (counts per split + `meta`) atomically."""
    folder = Path(folder)
    if df["id"].duplicated().any():
        dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
        raise ManifestError(f"{folder / MANIFEST}: duplicate id {dup!r}")
    dotted = df["id"].astype(str).str.contains(".", regex=False)
    if dotted.any():  # WebDataset groups a tar's files into samples by the name up to the first dot
        raise ManifestError(f"{folder / MANIFEST}: id {df.loc[dotted, 'id'].iloc[0]!r} holds a '.', where a shard "
                            "would cut the sample's key (samples sharing the part before it would merge); use '_'")
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_text(folder / MANIFEST, buf.getvalue())
    counts = {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()}
    atomic_write_json(folder / META, {"rows": len(df), "splits": counts, **meta})
    return folder / MANIFEST


def read_manifest(folder_or_file: str | Path, split: str | None = None) -> pd.DataFrame:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: manifest missing (run `d2v prepare` for this source first)")
    try:
        df = pd.read_csv(path, dtype={c: t for c, t in COLUMNS.items() if t == "string"}, keep_default_na=False,
                         na_values={c: [""] for c, t in COLUMNS.items() if t != "string"})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable manifest CSV ({err}); run `d2v prepare` again") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing columns {missing}; expected at least {list(COLUMNS)}")
    for column in (c for c, t in COLUMNS.items() if t != "string"):
        numbers = pd.to_numeric(df[column], errors="coerce")
        bad = df[column].notna() & numbers.isna()
        if bad.any():
            row = df[bad].iloc[0]
            raise ManifestError(f"{path}: {column} {row[column]!r} of id {row['id']!r} is not a number")
    if split is not None:  # 'a+b' is the union of splits a and b (e.g. LibriSpeech's 960 h)
        wanted = split.split("+")
        missing = [s for s in wanted if s not in set(df["split"])]
        if missing:
            raise ManifestError(f"{path}: no rows with split {missing[0]!r}; splits are {sorted(set(df['split']))}")
        df = df[df["split"].isin(wanted)].reset_index(drop=True)
    return df
