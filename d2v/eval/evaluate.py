"""Scoring fine-tuned models: a split's predictions (CTC: greedy transcripts; under torchrun each rank runs its share
of the shards), the task's metrics, the rule that picks a run's best dev checkpoint, and `d2v evaluate`, which writes
one JSON per test split: metric values, number of examples, seed, git commit, recipe versions (of the fine-tune and of
the evaluation code) and a digest of the run configuration."""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.config import config_digest
from d2v.data.shards import read_index
from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.lm import CTCScorer, with_lm_fields
from d2v.eval.metrics import TASK_METRICS, greedy_transcripts, oriented, prediction_stats, scored_in_part
from d2v.io import atomic_write_json, git_commit
from d2v.train import recipe, task_data
from d2v.train.distributed import World, gather_lists, gather_to_main, init
from d2v.train.precision import autocast
from d2v.train.task_model import load_finetuned
from d2v.train.tasks import TASKS, FinetuneConfig, Task, eval_file_name


@torch.no_grad()
def _forward_split(model, cfg: FinetuneConfig, split: str, amp=None,
                   whole_split: bool = False) -> Iterator[tuple[dict, Any]]:
    """(inputs, outputs) per batch of a split (this rank's share of its shards, or all of them), in shard order, on
    the model's device, in eval mode."""
    task = TASKS[cfg.task]
    device = next(model.parameters()).device
    model.eval()
    try:
        for item in task_data.loader(cfg, split, train=False, split_ranks=not whole_split):
            inputs = task_data.as_inputs(item, task.modality, device)
            with amp or contextlib.nullcontext():
                yield inputs, model(inputs["batch"])
    finally:
        model.train()


def ctc_logits(model, cfg: FinetuneConfig, split: str, amp=None,
               whole_split: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """Per utterance, (frames, letters) logits, and the reference transcripts."""
    out, refs = [], []
    for inputs, (logits, lengths) in _forward_split(model, cfg, split, amp, whole_split):
        out += [x[:n] for x, n in zip(logits.float().cpu().numpy(), lengths.tolist())]
        refs += inputs["text"]
    return out, refs


def predict(model, cfg: FinetuneConfig, split: str, amp=None, world: World = World(),
            whole_split: bool = False) -> tuple[list, list]:
    """(predictions, references) over a whole split, in shard order (CTC: greedy transcripts); under torchrun each
    rank reads its share of the shards and every rank gets all pairs back (shard order per rank). `whole_split`:
    every rank reads all of them instead, as an FSDP model needs (each forward is collective: a rank with fewer
    batches than another would leave it waiting)."""
    task = TASKS[cfg.task]
    if whole_split:
        world = World()  # nothing to gather
    if task.kind == "ctc":
        logits, refs = ctc_logits(model, cfg, split, amp, whole_split)
        return (gather_lists(greedy_transcripts(logits, LetterTokenizer.load(cfg.letters)), world),
                gather_lists(refs, world))
    preds, refs = [], []
    for inputs, out in _forward_split(model, cfg, split, amp, whole_split):
        if task.kind == "regression":
            preds += out.float().squeeze(-1).tolist()
            refs += inputs["labels"].tolist()
        elif task.kind == "tagging":  # per clip: the classes' probabilities and 0/1 targets
            preds += list(torch.sigmoid(out.float()).cpu().numpy())
            refs += list(inputs["labels"].to(torch.uint8).cpu().numpy())
        else:
            preds += out.argmax(-1).tolist()
            refs += inputs["labels"].long().tolist()
    return gather_lists(preds, world), gather_lists(refs, world)


def score(task: Task, preds: list, refs: list) -> dict[str, float]:
    return {m: TASK_METRICS[m](preds, refs) for m in task.metrics}


def result_record(cfg, split: str, preds: list, refs: list, **fields) -> dict:
    """What every evaluation and baseline JSON holds about a scored split (`cfg`: a fine-tuning or baseline config),
    plus the writer's own `fields`."""
    task = TASKS[cfg.task]
    record = {"task": cfg.task, "stands_in_for": task.stands_in_for, "split": split,
              "metrics": score(task, preds, refs), "predictions": prediction_stats(task.kind, preds, refs),
              "n": len(refs), "n_split": read_index(task_data.shards_of(cfg, split))["count"], "seed": cfg.seed,
              "commit": git_commit(), "params_digest": config_digest(cfg), **fields}
    if scored_in_part(record):  # samples that failed to decode were skipped with a warning each
        print(f"warning: {cfg.task} {split}: scored {record['n']} of the split's {record['n_split']} examples; the "
              "score is not the whole split's", file=sys.stderr)
    return record


def require_extra_tests(task_name: str, extra: tuple[str, ...]) -> None:
    """Refuse test sets that are not among the task's `extra_tests`, before any work."""
    task = TASKS[task_name]
    unknown = sorted(set(extra) - set(task.extra_tests))
    if unknown:
        raise ValueError(f"{task_name}: no extra test set {unknown}; it has {list(task.extra_tests) or 'none'}")


def require_ctc_for_lm(task_name: str, lm) -> None:
    """Refuse a language model for a task that is not CTC, before any work."""
    kind = TASKS[task_name].kind
    if lm is not None and kind != "ctc":
        raise ValueError(f"{task_name}: --lm decodes CTC tasks; this one is {kind}")


def selection_key(task: Task, metrics: dict[str, float]) -> tuple[float, ...]:
    """Higher is better: the headline metric, ties broken by the task's next ones (CTC: WER, then CER, since at
    small budgets WER stays at 1.0 while CER already falls). An undefined metric (NaN) ranks below every value."""
    signed = (oriented(m, metrics[m]) for m in task.metrics)
    return tuple(-math.inf if math.isnan(v) else v for v in signed)


def headline(task: Task, metrics: dict[str, float]) -> float:
    """Higher is better."""
    return oriented(task.metrics[0], metrics[task.metrics[0]])


def _no_finetuned_model(run_dir: Path, name: str) -> str:
    """Why a run folder has no `name` to evaluate, and what to pass instead."""
    if not run_dir.exists():
        return f"{run_dir}: no such run folder (pass the folder `d2v finetune --out` wrote)"
    if run_dir.is_file():
        return f"{run_dir} is a file; pass its run folder, and --checkpoint {run_dir.name} to score that file"
    if recipe.kind_of_run(run_dir) == "pretrain":
        return (f"{run_dir} is a pretraining run; fine-tune it first (`d2v finetune TASK --pretrained "
                f"{run_dir / 'final.pt'}`) and evaluate that run")
    return f"{run_dir / name}: no fine-tuned model (run `d2v finetune` first, or let it finish)"


def evaluate(run_dir: str | Path, split: str | None = None, out: str | Path | None = None,
             checkpoint_name: str = "best.pt", extra: tuple[str, ...] = (), lm: str | Path | None = None,
             decode_workers: int = 1) -> list[dict]:
    """Score a fine-tuning run on its test splits (or `split`), then on the `extra` test sets (of the task's
    `extra_tests`); one JSON per split. A CTC task is decoded greedily, and with the language model folder `lm`
    (`d2v lm`) as well: `wer_lm`, `cer_lm`, under the LM weight and word score its dev split selects, beam-searched
    in `decode_workers` processes. Under torchrun each rank runs the model over its share of a split's shards and
    the first rank gathers the outputs, scores them and writes the JSONs; the other ranks return []."""
    path = Path(run_dir) / checkpoint_name
    if not path.is_file():
        raise FileNotFoundError(_no_finetuned_model(Path(run_dir), checkpoint_name))
    model, cfg, state = load_finetuned(path, torch.device("cpu"))
    require_extra_tests(cfg.task, extra)
    require_ctc_for_lm(cfg.task, lm)
    world = init(cfg.device, "finetune.device")
    device = world.device
    model.to(device)
    task = TASKS[cfg.task]
    amp, _ = autocast(device, cfg.precision)
    splits = [*([split] if split else task.tests), *extra]
    scorer = None
    if task.kind == "ctc":
        def logits_of(s: str) -> tuple[list[np.ndarray] | None, list[str] | None]:
            logits, refs = ctc_logits(model, cfg, s, amp)
            return gather_to_main(logits, world), gather_to_main(refs, world)
        scorer = CTCScorer(logits_of, LetterTokenizer.load(cfg.letters), lm if world.is_main else None, task.tests,
                           task.dev, decode_workers)
        reads = scorer.reads(splits, with_lm=lm is not None)  # on every rank: a split without a dev split fails here
        if not world.is_main:  # the model over this rank's share, in the order the first rank's scorer reads
            for s in reads:
                logits_of(s)
            return []
    results = []
    for s in splits:
        preds, refs, lm_fields = scorer.score(s) if scorer else (*predict(model, cfg, s, amp, world), {})
        if not world.is_main:
            continue
        result = with_lm_fields(result_record(cfg, s, preds, refs, init=cfg.init, mode=cfg.mode, checkpoint=str(path),
                                              steps=state["step"], recipe={"finetune": state.get("recipe", 1),
                                                                           "evaluate": recipe.EVALUATE}), lm_fields)
        target = Path(out or run_dir / "eval") / eval_file_name(cfg.task, s)
        atomic_write_json(target, result)
        results.append(result)
    return results
