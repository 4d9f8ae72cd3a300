"""Recipe versions: what a run computes is its config plus the code, and these numbers stand for the code.

Bump one in the commit that changes what a run of that kind computes under an unchanged config (a new default
rule, a corrected loss), never for a refactor that keeps every number. A run records the version it was made
under (`recipe.json`; a pretraining checkpoint too), so that
- the benchmarks (`bench/runs.py`) reuse a finished run only under the current version (and re-score an evaluation
  made under another EVALUATE without fine-tuning again),
- a pretraining run does not resume from a checkpoint of another version,
- the pipeline tracks each constant as a param of its stages (`d2v/pipeline/stages.py`): `dvc repro` and
  `snakemake` rerun exactly the stages that a bump touches.
Runs and results made before these numbers existed count as version 1.

PRETRAIN: `d2v pretrain`; FINETUNE: `d2v finetune`; EVALUATE: `d2v evaluate`, the scoring of a fine-tuned model
(prediction, decoding, text normalisation, metrics); BASELINE: `d2v baseline`, the raw-feature baselines.

DVC reads this file as a params file: keep the versions plain literal assignments.

PRETRAIN history
  2: data2vec 2.0 images: the sin-cos positions in MAE's channel order (column half first), as fairseq's table.
  3: data2vec 2.0 images: fairseq's init (BERT's N(0, 0.02) Linear, Xavier-uniform patch embedding, [CLS] N(0, 1)),
     not BEiT's (truncated normal, output projections scaled down by depth, [CLS] N(0, 0.02²)).
  4: speech (v1 and v2): the feature projection, and v1's regression head, keep PyTorch's default Linear init, as
     fairseq (BERT's init reaches only the Transformer), not N(0, 0.02) with zero bias.
  5: data2vec 2.0 with the large preset takes the released Large recipes (masks, clones, decoder, τ, K, text's
     LN → IN targets, no LayerDrop for speech), not Base's at Large size. Base and smaller presets are unchanged.
  6: 3-channel images (ImageNet, every paper profile) keep their colours: the image transforms turned every image
     grey (torchvision's Grayscale with 3 output channels) since the first data commit. 1-channel data (the
     embedded Fashion-MNIST) is unchanged.
FINETUNE history
  2: layer-wise LR decay per recipe (BEiT's layer ids for v1, blocks only for v2); none from scratch.
  3: v2 images: the sin-cos fix above; v2 speech: CTC time masks fill frames with N(0, 0.01²) noise, as fairseq
     fine-tunes data2vec_multi models (no mask embedding), not with the never-trained mask embedding.
  4: v2 images from scratch: PRETRAIN 3's init.
  5: speech from scratch: PRETRAIN 4's init of the feature projection.
  6: data2vec 2.0 large speech: no LayerDrop (PRETRAIN 5). Other presets are unchanged.
  7: 3-channel images keep their colours (PRETRAIN 6); CTC tasks without an `audio` config (the paper profiles'
     LibriSpeech fine-tunes) train on every labelled utterance up to 60 s, as fairseq, not only those of 2 to 20 s.
EVALUATE history
  2: 3-channel images keep their colours in the evaluation transform too (PRETRAIN 6).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

from d2v.io import atomic_write_json, git_commit

PRETRAIN = 6
FINETUNE = 7
EVALUATE = 2
BASELINE = 1

RunKind = Literal["pretrain", "finetune", "evaluate", "baseline"]
KINDS: tuple[RunKind, ...] = get_args(RunKind)  # the stage kinds that carry a version
RECORD = "recipe.json"


def constant(kind: RunKind) -> str:
    """The name of the kind's constant in this file, as the pipeline tracks it."""
    return kind.upper()


def current(kind: RunKind) -> int:
    return globals()[constant(kind)]


def stamp(run: str | Path, kind: RunKind) -> None:
    """Record in the run folder the version (and commit) the run is being made under."""
    atomic_write_json(Path(run) / RECORD, {"kind": kind, "version": current(kind), "commit": git_commit()})


def recorded(run: str | Path, kind: RunKind) -> int:
    """The version a run folder was made under: 1 when it has no record (made before versions existed)."""
    path = Path(run) / RECORD
    if not path.is_file():
        return 1
    try:
        record = json.loads(path.read_text())
        version = record["version"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected JSON with a 'version' number ({err})") from None
    if record.get("kind") != kind:
        raise ValueError(f"{path}: records a {record.get('kind')!r} run, expected a {kind!r} run")
    return int(version)


def kind_of_run(run: str | Path) -> str | None:
    """The stage kind a run folder records, or None where it records none readable."""
    try:
        return json.loads((Path(run) / RECORD).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def in_result(result: dict, kind: RunKind) -> int:
    """The version of `kind` an evaluation JSON was made under (its "recipe" maps kinds to versions; results
    written before EVALUATE existed held the fine-tune version as a bare number, or nothing)."""
    versions = result.get("recipe", {})
    if isinstance(versions, int):
        versions = {"finetune": versions}
    return int(versions.get(kind, 1))
