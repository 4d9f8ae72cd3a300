"""LibriSpeech (OpenSLR 12) and the Libri-light limited-supervision splits (10 min / 1 h / 10 h), paper scale.

Archives are downloaded with resume and sha256 verification (digests as published by torchaudio), unpacked split by
split into a temp folder that is renamed into place, and indexed from the `*.trans.txt` files: one row per FLAC
with its duration read from the header. A FLAC that is unreadable or has no transcript line is skipped, named and
counted; a transcript line without audio is counted too.
"""
from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import soundfile as sf

from d2v.data.download import Artifact, fetch
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, log, register
from d2v.io import text_lines

OPENSLR = ("https://www.openslr.org/resources/12/", "https://us.openslr.org/resources/12/",
           "https://openslr.elda.org/resources/12/")
SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}
LIBRILIGHT = Artifact("librispeech_finetuning.tgz",
                      ("https://dl.fbaipublicfiles.com/librilight/data/librispeech_finetuning.tgz",),
                      sha256="5d1efdc777b548194d7e09ba89126e2188026df9fd57aa57eb14408d2b2342af")
LIBRILIGHT_SPLIT = "librilight_10h"
LIBRILIGHT_SUBSETS = ("10min", "1h", "10h")  # the tags of librilight_subsets


def librispeech_artifacts(splits: Iterable[str] = tuple(SHA256)) -> dict[str, Artifact]:
    unknown = sorted(set(splits) - set(SHA256))
    if unknown:
        raise ValueError(f"unknown LibriSpeech split(s) {unknown}; expected some of {list(SHA256)}")
    return {s: Artifact(f"{s}.tar.gz", tuple(m + f"{s}.tar.gz" for m in OPENSLR), sha256=SHA256[s]) for s in splits}


def manifest_split(archive_split: str) -> str:
    """The manifest's name of an archive's split (dev-clean -> dev_clean, as mini_librispeech names its splits)."""
    return archive_split.replace("-", "_")


def extract(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into `dest` atomically (temp sibling, then rename); no-op when `dest` exists."""
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, '..' and device files
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def index_transcripts(root: Path, split: str, out_dir: Path, skipped: Skipped,
                      subsets_of=lambda rel: "") -> list[dict]:
    """Rows for every `<spk>-<chapter>-<utt>.flac` listed in a `*.trans.txt` under `root`."""
    rows = []
    for trans in sorted(root.rglob("*.trans.txt")):
        listed = set()
        for line in text_lines(trans.read_text(encoding="utf-8")):
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            listed.add(utt)
            audio = trans.parent / f"{utt}.flac"
            rel = audio.relative_to(out_dir).as_posix()
            if not audio.exists():
                skipped.add(rel, "listed in transcript but missing", log)
                continue
            try:
                info = sf.info(audio)
            except Exception as err:
                skipped.add(rel, f"unreadable FLAC: {err}", log)
                continue
            rows.append(dict(id=utt, path=rel, split=split, bytes=audio.stat().st_size, duration=info.duration,
                             text=text.strip(), speaker=utt.split("-")[0], subsets=subsets_of(rel)))
        for audio in trans.parent.glob("*.flac"):
            if audio.stem not in listed:
                skipped.add(audio.relative_to(out_dir).as_posix(), "no transcript line", log)
    return rows


def librilight_subsets(rel: str) -> str:
    """Libri-light nesting: 1h/0 is the 10-minute set, 1h/* the 1-hour set, 1h/* + 9h the 10-hour set."""
    parts = rel.split("/")
    if "1h" in parts:
        return "10min|1h|10h" if parts[parts.index("1h") + 1] == "0" else "1h|10h"
    return "10h"


@register("librispeech", "speech", "paper", "LibriSpeech 960 h + dev/test (OpenSLR 12) and Libri-light 10min/1h/10h",
          splits=lambda options, dataset: [*map(manifest_split, options.get("splits", SHA256)),
                                           *([LIBRILIGHT_SPLIT] if options.get("librilight", True) else [])],
          subsets=lambda options, dataset: LIBRILIGHT_SUBSETS if options.get("librilight", True) else ())
def prepare(ctx: Context, splits: Sequence[str] = tuple(SHA256), librilight: bool = True,
            artifacts: Mapping[str, Artifact] | None = None) -> Path:
    """`artifacts` overrides the official table (split name or 'librilight' → Artifact), e.g. for a local mirror."""
    splits = list(splits)
    table = {**librispeech_artifacts(splits), **({"librilight": LIBRILIGHT} if librilight else {}),
             **(artifacts or {})}
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    skipped, rows = Skipped(), []
    for split in splits:
        folder = extract(fetch(table[split], ctx.cache_dir), out / "splits" / split)
        rows += index_transcripts(folder, manifest_split(split), out, skipped)
    if librilight:
        folder = extract(fetch(table["librilight"], ctx.cache_dir), out / "splits" / LIBRILIGHT_SPLIT)
        rows += index_transcripts(folder, LIBRILIGHT_SPLIT, out, skipped, librilight_subsets)
    df = make_manifest(rows)
    hours = {s: round(float(d) / 3600, 3) for s, d in df.groupby("split")["duration"].sum().items()}
    write_manifest(out, df, source="librispeech", hours=hours, skipped=skipped.as_json(),
                   artifacts={a.name: a.digest for a in table.values()}, licence="CC BY 4.0")
    return out
