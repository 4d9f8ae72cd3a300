"""Reuse of finished benchmark runs: a pretraining or fine-tuning run whose config.json equals the requested config,
made under the current recipe version (`d2v.train.recipe`), is not run again (both are deterministic, and a
pretraining run refuses to resume under another config or version). A finished fine-tune of another config is not
fine-tuned over: its number would be lost. Delete the run folder to force a rerun."""
from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from d2v.data.shards import write_shards
from d2v.data.sources import SOURCES, Context
from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.baselines import run_baseline
from d2v.eval.lm import LanguageModel
from d2v.eval.metrics import scored_in_part
from d2v.io import atomic_write_json
from d2v.processes import usable_cpus
from d2v.train import recipe
from d2v.eval.evaluate import evaluate
from d2v.train.finetune import run_finetune
from d2v.train.logging import TrainingClock
from d2v.train.preemption import Interrupted, report
from d2v.train.pretrain import pretrain_main
from d2v.train.tasks import TASKS, BaselineConfig, FinetuneConfig, eval_file_name


def same_config(run: Path, cfg, any_version: bool = False) -> bool:
    """The run's config.json, with fields added since it was written at their defaults, equals `cfg`, and the run
    was made under the current recipe version (unless `any_version`): code that changed what such a run computes
    makes it stale."""
    config = run / "config.json"
    if not config.is_file():
        return False
    kind = "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"
    try:
        same = type(cfg).model_validate(json.loads(config.read_text())) == cfg
    except ValueError:  # written by an incompatible version
        return False
    if same and not any_version and (made := recipe.recorded(run, kind)) != recipe.current(kind):
        print(f"{run}: made under {kind} recipe {made}, the code is at {recipe.current(kind)}: not reused",
              file=sys.stderr)
        return False
    return same


def refuse_another_config(run: Path, cfg) -> None:
    """Stop before fine-tuning over a finished run made under another config (e.g. another budget under the same
    --tag), naming the fields that differ. Runs that are only stale (older recipe, unreadable config) are rerun."""
    try:
        old = type(cfg).model_validate(json.loads((run / "config.json").read_text())).model_dump(mode="json")
    except (OSError, ValueError):
        return
    if changes := changed_fields(old, cfg.model_dump(mode="json")):
        raise SystemExit(f"{run}: holds a finished fine-tune under another config ({'; '.join(changes)}); give "
                         "this benchmark its own --tag (or --runs), or delete the folder to replace that run")


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def pretrain_seconds(cfg, run: Path, tokenizer: str | None = None) -> float | None:
    """Wall time of a pretraining run; a finished run under the same config is reused with its recorded time (None
    when it was not recorded). A call that stops (Ctrl-C, SIGTERM, an error) leaves its seconds in
    timing.partial.json and the call that resumes the run adds them: the time of a run stopped by a signal is whole,
    and a crashed one's includes the steps after its last checkpoint that the resumed run takes again."""
    timing, partial = run / "timing.json", run / "timing.partial.json"
    if (run / "final.pt").is_file() and same_config(run, cfg):
        return json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    clock = TrainingClock(json.loads(partial.read_text()) if partial.is_file() else None)  # the stopped calls' time
    try:
        pretrain_main(cfg, run, tokenizer=tokenizer, progress=False)
    except BaseException:
        if run.is_dir():
            atomic_write_json(partial, {"seconds": clock.seconds()})
        raise
    seconds = clock.seconds()
    atomic_write_json(timing, {"seconds": seconds})
    partial.unlink(missing_ok=True)
    return seconds


def stops_with_a_checkpoint(main: Callable[[], object]) -> Callable[[], None]:
    """A bench's entry point: when a pretraining or fine-tune it runs is stopped by SIGTERM, SIGUSR1 or Ctrl-C
    (`Interrupted`, after a checkpoint), the bench ends as the `d2v` CLI does, with the signal's exit status and how
    to resume (the same command), not a traceback."""
    def entry() -> None:
        try:
            main()
        except Interrupted as err:
            sys.exit(report(err, Path(sys.argv[0]).name))
    return entry


def mean_test_metrics(cfg, out: Path, lm: Path | None = None, any_version: bool = False) -> dict[str, float]:
    """Every metric of a fine-tune's test evaluations, averaged over its test splits (for CTC tasks the test_*
    splits, not dev; with the language model folder `lm` also wer_lm and cer_lm); an evaluation under the same
    config is reused (scored again when it was made under another EVALUATE version or another language model),
    otherwise the task is fine-tuned first; the beam search runs on every usable CPU. `any_version` reuses a
    fine-tune of the same config made under an older FINETUNE version too (scoring it again; for a version bump that
    left this config's runs unchanged)."""
    task = TASKS[cfg.task]
    lm = lm if task.kind == "ctc" else None
    results = [out / "eval" / eval_file_name(cfg.task, split) for split in task.tests]
    finished = all(r.is_file() for r in results)
    if finished and same_config(out, cfg, any_version):
        results = [json.loads(r.read_text()) for r in results]
        digest = lm and LanguageModel(lm, LetterTokenizer.load(cfg.letters).symbols).digest
        if any(recipe.in_result(r, "evaluate") != recipe.EVALUATE or r.get("lm", {}).get("digest") != digest
               for r in results):
            # scored by other code or LM: the fine-tuned model is still current
            results = evaluate(out, lm=lm, decode_workers=usable_cpus())
    else:
        trained = (out / "summary.json").is_file()
        if trained:
            refuse_another_config(out, cfg)
        # a finished run of this config made under an older recipe is trained again; one the code would still make
        # is reused as it is (only its evaluation was missing)
        run_finetune(cfg, out, progress=False, restart_on_change=trained and not same_config(out, cfg, any_version))
        results = evaluate(out, lm=lm, decode_workers=usable_cpus())
    if task.kind == "ctc":
        results = [r for r in results if r["split"].startswith("test")]
    else:
        results = results[-1:]
    for r in results:  # a split scored in part (samples failed to decode) is not the arm's number
        if scored_in_part(r):
            raise SystemExit(f"{out}: {r['split']} scored {r['n']} of its {r['n_split']} examples; repair the "
                             "split's shards (the evaluation warned which samples failed)")
    return {m: float(np.mean([r["metrics"][m] for r in results])) for m in scored_metrics(task, lm)}


def scored_metrics(task, lm: Path | None = None) -> tuple[str, ...]:
    """The task's metrics, headline first; a CTC task decoded with a language model leads with wer_lm, the WER
    the papers report."""
    return ("wer_lm", "cer_lm", *task.metrics) if lm is not None and task.kind == "ctc" else task.metrics


def headline_metric(cfg, out: Path, lm: Path | None = None, any_version: bool = False) -> float:
    """The task's headline test metric of a fine-tune (mean WER over the test splits for CTC; with the language
    model folder `lm`, their WER decoded with it)."""
    return mean_test_metrics(cfg, out, lm, any_version)[scored_metrics(TASKS[cfg.task], lm)[0]]


def cv_data_root(task: str, folds: int, fold: int, root: str | Path = "data/folds",
                 cache: str | Path = "data/cache") -> Path:
    """A data root holding fold `fold` of a `folds`-fold cross-validation of a task's source (lee_sts: by
    document), prepared and sharded on first use."""
    spec = TASKS[task]
    source = SOURCES[spec.dataset]
    if "fold" not in inspect.signature(source.prepare).parameters:
        raise ValueError(f"{task}: its source {spec.dataset!r} has no cross-validation folds")
    data = Path(root) / f"{spec.dataset}-{fold}of{folds}"
    if not all((data / "shards" / spec.dataset / s / "index.json").is_file() for s in spec.splits):
        raw = data / "raw" / spec.dataset
        source.prepare(Context(Path(cache), raw), folds=folds, fold=fold)
        for split in spec.splits:
            write_shards(raw, split, data / "shards" / spec.dataset / split)
    return data


def fold_runs(out: Path, folds: int | None) -> list[Path]:
    """The run folders of one seed: OUT itself, or with `folds` fold k's OUT-fK."""
    return [out.with_name(f"{out.name}-f{k}") for k in range(folds)] if folds else [out]


def cv_test_metrics(cfg, out: Path, folds: int | None, lm: Path | None = None, any_version: bool = False) -> dict:
    """`mean_test_metrics`, or with `folds` their mean over the folds of a cross-validation, fold k fine-tuned in
    OUT-fK on its own data root; the folds' own metrics are kept under "folds"."""
    if not folds:
        return mean_test_metrics(cfg, out, lm, any_version)
    per_fold = [mean_test_metrics(cfg.model_copy(update={"data_root": str(cv_data_root(cfg.task, folds, k))}), run,
                                  lm, any_version) for k, run in enumerate(fold_runs(out, folds))]
    return fold_mean(per_fold)


def finetune_version(out: Path, folds: int | None) -> int:
    """The FINETUNE recipe a seed's runs were made under (the oldest of its folds'): the unfolded OUT of a
    cross-validated task is never made, and reads as version 1."""
    return min(recipe.recorded(run, "finetune") for run in fold_runs(out, folds))


def cv_baseline(task: str, folds: int) -> dict:
    """The task's raw-feature baseline (`d2v baseline`) on every fold: the mean test metrics over the folds, and
    each fold's under "folds"."""
    per_fold = []
    for fold in range(folds):
        root = cv_data_root(task, folds, fold)
        per_fold.append(run_baseline(BaselineConfig(task=task, data_root=str(root)), root / "baseline")[-1]["metrics"])
    return fold_mean(per_fold)


def fold_mean(per_fold: list[dict[str, float]]) -> dict:
    """Each metric's mean over the folds, with the folds' own metrics under "folds"."""
    return {m: float(np.mean([f[m] for f in per_fold])) for m in per_fold[0]} | {"folds": per_fold}
