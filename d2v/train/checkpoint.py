"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically, the last k kept.

A checkpoint holds the model state (student, head, teacher, τ), optimizer, step, the RNG states of torch, numpy
and Python, the data position (batches consumed) and the number of ranks that wrote it. Resuming restores all of
them; the data stream is a pure function of the seed, so it is fast-forwarded to the recorded position. Another number
of ranks continues it at the same global batch only (`rescaled`).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pydantic
import torch

from d2v.io import atomic_torch_save, read_json, read_torch
from d2v.train import recipe
from d2v.train.distributed import World, barrier

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str | Path, step: int, payload: dict, keep: int = 3) -> Path:
    """Write `step-XXXXXXXX.pt` via a temp file + rename, point `last.pt` at it, drop all but the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    atomic_torch_save(path, {**payload, "step": step, "rng": rng_state()})
    link = folder / "last.pt"
    tmp_link = folder / f".last.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(path.name)
    os.replace(tmp_link, link)
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.match(p.name))


def latest(folder: str | Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


# The least each kind of checkpoint d2v writes holds: a pretraining's final.pt (`pretrain.encoder_checkpoint`, also
# what `d2v import` writes) and a fine-tuned model (`finetune`'s best.pt / final.pt).
PRETRAINED_KEYS = frozenset({"encoder", "modality"})
FINETUNED_KEYS = frozenset({"model", "config", "step"})


def kind_of(state) -> str | None:
    """"pretraining" or "fine-tuning" by the keys a loaded checkpoint holds; None for anything else."""
    keys = set(state) if isinstance(state, dict) else set()
    return "pretraining" if PRETRAINED_KEYS <= keys else "fine-tuning" if FINETUNED_KEYS <= keys else None


def load(path: str | Path) -> dict:
    return read_torch(path, "; delete it to resume from the previous one")


def changed_since(saved: dict, config: dict | pydantic.BaseModel, version: int, resumable_across: tuple[str, ...],
                  data_digest: str | None = None) -> list[str]:
    """What differs between a checkpoint and the run about to resume from it: top-level config keys (but those
    `resumable_across`, which do not change what is computed), 'data' when the training shards changed (their
    index.json lists every shard's sha256), and 'recipe' when it was written under another `version` of its stage
    kind's recipe (`d2v.train.recipe`). Given the config's model, the saved config is read as today's code reads
    it: a key added since at its default is no change (a default that computes otherwise moves the recipe version)."""
    before = saved.get("config", {})
    if isinstance(config, pydantic.BaseModel):
        before = as_read_now(type(config), before)
    config = as_dict(config)
    changed = sorted(k for k in config.keys() | before.keys()
                     if k not in resumable_across and before.get(k) != config.get(k))
    if data_digest is not None and saved.get("data_digest") not in (None, data_digest):
        changed.append("data")
    if saved.get("recipe", 1) != version:
        changed.append("recipe")
    return changed


def as_dict(config: dict | pydantic.BaseModel) -> dict:
    return config.model_dump(mode="json") if isinstance(config, pydantic.BaseModel) else config


def as_read_now(model: type[pydantic.BaseModel], saved: dict) -> dict:
    """A saved config with the fields added since at their defaults; as saved when today's model refuses it (a key
    removed or retyped since, which then shows as changed)."""
    try:
        return model.model_validate(saved).model_dump(mode="json")
    except pydantic.ValidationError:
        return saved


def resume_point(folder: str | Path, config: dict | pydantic.BaseModel, version: int,
                 resumable_across: tuple[str, ...], steps: int, data_digest: str | None = None,
                 restart_on_change: bool = False, world: World = World()) -> tuple[Path | None, dict | None]:
    """The newest checkpoint in `folder` and its state, or (None, None) to start afresh. One written under another
    config, data or recipe is never resumed silently: that is an error, or with `restart_on_change` (pipeline
    stages) the folder is discarded, as it is over a finished run. Every rank reads it (a shared file system);
    the main rank discards it once all have."""
    folder = Path(folder)
    last = latest(folder)
    if last is None:
        return None, None
    state = load(last)
    other_ranks = state.get("ranks", world.size) != world.size  # checkpoints before `ranks`: taken as this run's
    if other_ranks:  # accum_steps may follow the ranks (`rescaled`)
        resumable_across = (*resumable_across, "accum_steps")
    changed = changed_since(state, config, version, resumable_across, data_digest)
    if changed and not restart_on_change:
        raise ValueError(f"{last}: written under a different config or data ({', '.join(changed)} changed); "
                         f"use another --out, delete {folder}, or pass --restart-on-change")
    if restart_on_change and state["step"] >= steps:
        changed.append("finished run")
    if not changed:
        return last, rescaled(last, state, as_dict(config), world) if other_ranks else state
    barrier(world)  # a rank still loading the file would find it gone
    if world.is_main:
        print(f"{folder}: discarded ({', '.join(changed)}); starting afresh", file=sys.stderr)
        shutil.rmtree(folder)
    return None, None


def finished_run(out_dir: Path, config: pydantic.BaseModel, kind: recipe.RunKind, resumable_across: tuple[str, ...],
                 data_digest: str | None, restart_on_change: bool, world: World = World()) -> dict | None:
    """The summary of a run that finished in `out_dir` under `config` and left no checkpoint to resume from (a
    fine-tune removes its own; a pretraining's may have been deleted): started again, it has nothing to do. None to
    train. A finished run is never trained over silently, since its final.pt or best.pt may already be in use: one of
    another config, data or recipe is an error. With `restart_on_change` (pipeline stages, which delete their outputs
    first) the caller starts afresh, as `resume_point` does over a finished checkpoint. Every rank reads the same
    files and returns alike; the main rank says so."""
    summary, saved_config = out_dir / "summary.json", out_dir / "config.json"
    if restart_on_change or latest(out_dir / "checkpoints") or \
            not all(f.is_file() for f in (summary, saved_config, out_dir / "final.pt")):
        return None
    done = read_json(summary, f"the {kind} run's summary")
    saved = {"config": read_json(saved_config, f"the run's {kind} config"), "recipe": recipe.recorded(out_dir, kind),
             "data_digest": done.get("data_digest")}  # None in summaries before it: not compared
    if changed := changed_since(saved, config, recipe.current(kind), resumable_across, data_digest):
        raise ValueError(f"{out_dir}: holds a finished run of another config, data or recipe ({', '.join(changed)} "
                         "changed); use another --out, delete it, or pass --restart-on-change")
    if world.is_main:
        print(f"{out_dir}: finished already under this config; nothing to do", file=sys.stderr)
    return done


def rescaled(last: Path, state: dict, config: dict, world: World) -> dict:
    """A checkpoint written by another number of ranks continues only at the same global batch: ranks × micro-batch
    × accum_steps, with accum_steps rescaled (the micro-batch is part of the config). Its data position becomes
    step × the new accum_steps micro-batches a rank. `seek` streams then read the same samples at each step within an
    epoch (an epoch's permutation is cut into global batches; the n mod ranks samples an epoch leaves out differ);
    `replay` and `reseed` streams split their shards by rank and read others. Refused otherwise, never discarded: a
    changed GPU count is not a changed recipe (a changed config is, and is discarded under `restart_on_change`)."""
    ranks, accum = state["ranks"], state.get("config", {}).get("accum_steps", 1)
    if (ranks * accum) % world.size:
        raise ValueError(f"{last}: written by {ranks} ranks × accum_steps {accum}, which {world.size} ranks cannot "
                         f"split evenly; resume it on a divisor of {ranks * accum} ranks")
    needed = ranks * accum // world.size
    if config.get("accum_steps", 1) != needed:
        raise ValueError(f"{last}: written by {ranks} ranks × accum_steps {accum}; on {world.size} ranks set "
                         f"accum_steps to {needed} to continue at the same global batch, or use another --out")
    if world.is_main:
        print(f"{last}: written by {ranks} ranks × accum_steps {accum}, continued by {world.size} × {needed} at "
              "the same global batch", file=sys.stderr)
    return {**state, "batches": state["step"] * needed}


def shards_digest(shards: str | Path) -> str | None:
    """sha256 of a shard set's index.json, which lists every shard's sha256: the identity of the training data."""
    from d2v.data.download import file_digest
    from d2v.data.shards import INDEX

    path = Path(shards) / INDEX
    return file_digest(path) if path.is_file() else None
