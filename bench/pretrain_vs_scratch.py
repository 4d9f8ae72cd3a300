"""Does data2vec pretraining help? Pretrain each modality on the embedded corpora, then fine-tune every downstream
task from the pretrained encoder and from scratch over several seeds, and compare on the test splits.

A task counts as a win when the pretrained mean beats the scratch mean by more than the seed spread (max - min)
of either side. Rows of the tasks run are merged into the output file (other tasks' rows are kept) and rewritten
after every fine-tune, so a partial run still leaves a table; the markdown table of the file stands beside it
(`.md`; `--render` rewrites it from the JSON alone). Finished runs under the same config and recipe
version (`d2v.train.recipe`) are reused.

    python bench/pretrain_vs_scratch.py [--modalities text,image,speech] [--tasks rt_polarity] [--seeds 3]
        [--pretrainings 3]
        [--objective text=v2] [--pretrain-steps text=600,...] [--finetune-steps lee_sts=300,...]
        [--set text.data.batch_size=256 ...] [--ft-set rt_polarity.num_workers=2 ...] [--tag gpu]
        [--pretrained text=runs/mlm/text/final.pt] [--folds lee_sts=5] [--ft-profile embedded] [--weights teacher]
        [--tokenizer data/bench/vocab1000/tokenizer/spm.model --set text.preset=embedded-vocab1k
         --set text.data.shards=data/bench/vocab1000/text_corpus/pretrain]

`--set`/`--ft-set` override any config field of a modality's pretraining / a task's fine-tuning (YAML values).
Fine-tuning, pretrained and scratch, uses the preset of the modality's pretrained encoder (`--set
speech.preset=embedded-fbank` is enough). `--tag` names a separate family of run folders, e.g. for runs made on a
GPU at a larger scale. `--pretrained` fine-tunes a given checkpoint (e.g. `mlm_reference.py`'s) instead of
pretraining that modality. `--folds` scores a task by K-fold cross-validation (lee_sts: by document, each fold 30
train / 10 dev / 10 test documents): each seed's value is the mean over the folds, fold k's runs are named
`...-sSEED-fK`. `--pretrainings N` pretrains each modality N times (seeds seed … seed+N-1; the repeats in
folders `text-v2-p1`, …) and fine-tunes every one: the pretrained arm pools the N × seeds runs, because at the
embedded scale one pretraining's fine-tunes can agree to a point while another pretraining lands five away.
`--weights teacher` fine-tunes the pretrained arm from each pretraining's EMA teacher instead of its student
(fairseq's `load_ema`), in runs named `...-pretrained-teacher-sSEED`; the scratch runs are the student rows' own.
`--tokenizer` pretrains and fine-tunes text over another SentencePiece model (its vocabulary the preset's; the
pretraining's shards cut with it, `d2v shard --tokenizer`). `--ft-profile` starts each task's fine-tuning from the
overrides a params.yaml profile gives it (embedded: fashion_mnist with flips only, speech_1h behind the log-mel front
end), so a bench row can repeat the pipeline's recipe at other budgets; `--finetune-steps` and `--ft-set` apply on
top, and the row records the result. Fine-tuning runs are named by task, init and seed only, so another budget under
the same `--tag` stops at the first finished run of the other budget rather than fine-tune over it: give it its own
`--tag`, and `--pretrained MODALITY=…/final.pt` to reuse the pretraining.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from runs import cv_baseline, cv_test_metrics, finetune_version, pretrain_seconds, scored_metrics, \
    stops_with_a_checkpoint

from d2v.eval.metrics import oriented
from d2v.config import nested_overrides
from d2v.io import atomic_write_json, atomic_write_text, read_torch
from d2v.ema import init_share
from d2v.train.config import merge, pretrain_config
from d2v.train.tasks import EMBEDDED_FINETUNE, TASKS, finetune_config


def per_key(cast=int):
    """An argparse type for "KEY=VALUE,KEY=VALUE" (per modality or per task) -> {KEY: cast(VALUE)}."""
    def parse(text: str) -> dict:
        out = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (per modality or task, e.g. image=600)")
            try:
                out[key] = cast(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not {cast.__name__}") from None
        return out
    return parse


def parse_sets(items: list[str]) -> dict[str, dict]:
    """["text.data.batch_size=256", ...] -> {"text": {"data": {"batch_size": 256}}}"""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or len(key.split(".")) < 2:
            raise SystemExit(f"--set/--ft-set {item!r}: expected NAME.FIELD[.FIELD]=VALUE")
    try:
        return nested_overrides(items)
    except ValueError as err:
        raise SystemExit(f"--set/--ft-set: {err}") from None


def profile_finetune(profile: str | None, params: str) -> dict[str, dict]:
    """A params.yaml profile's fine-tuning overrides per task ({} without a profile)."""
    if profile is None:
        return {}
    from d2v.pipeline.params import load_params

    return load_params(params, profile).active.finetune


def summarize(task: str, runs: dict[str, list[float]], metric: str | None = None, seeds: int | None = None) -> dict:
    """Each arm's mean, std and spread, and the verdict. Pretrained values beyond `seeds` come from more
    pretrainings, pretraining-major (pretraining k's fine-tuning seeds, then k+1's): the arm's spread spans them all,
    and each pretraining's own mean is listed, since one pretraining's seeds can agree closely while another
    pretraining of the same recipe lands points away."""
    metric = metric or TASKS[task].metrics[0]
    out = {"metric": metric, "stands_in_for": TASKS[task].stands_in_for}
    for init, values in runs.items():
        out[init] = {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values)),
                     "spread": float(np.max(values) - np.min(values))}
    seeds = seeds or len(runs.get("pretrained", ())) or 1
    if len(runs.get("pretrained", ())) > seeds:
        pretrained = runs["pretrained"]
        out["pretrained"]["per_pretraining"] = [float(np.mean(pretrained[k:k + seeds]))
                                                for k in range(0, len(pretrained), seeds)]
    if {"pretrained", "scratch"} <= runs.keys():
        delta = out["pretrained"]["mean"] - out["scratch"]["mean"]
        gain = oriented(metric, delta)
        margin = max(out["pretrained"]["spread"], out["scratch"]["spread"])
        # seed k of both arms shares the fine-tune's data order and head init: count the seeds where pretraining
        # is ahead, a paired view beside the unpaired `wins` (which one outlying seed can overturn); every
        # pretraining's seed k pairs with scratch's seed k
        scratch = runs["scratch"]
        pairs = [(p, scratch[i % seeds]) for i, p in enumerate(runs["pretrained"]) if i % seeds < len(scratch)]
        diffs = [oriented(metric, p - s) for p, s in pairs]
        out.update(delta=delta, gain=gain, margin=margin, wins=bool(gain > margin),
                   seeds_ahead=int(sum(d > 0 for d in diffs)))
        if len(diffs) > 1:  # the paired gain and its standard error: how far the seeds' differences are from 0
            out.update(paired_gain=float(np.mean(diffs)), paired_se=float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))))
    return out


def verdict(row: dict) -> str:
    """Issue 4's test: a win is a gain beyond the larger seed spread (max − min) of the two arms, a loss the same
    beyond it the other way."""
    if row["wins"]:
        return "**win**"
    if -row["gain"] > row["margin"]:
        return "**loss**"
    return "ahead, inside the spread" if row["gain"] > 0 else "behind, inside the spread" if row["gain"] < 0 else "tie"


def table(report: dict) -> str:
    """The JSON as the markdown table the README and the closing notes quote: per task, each arm's mean ± std over
    its runs, the gain (oriented: positive is better for lower-is-better metrics too), the spread it must beat, the
    paired seeds ahead (with the paired gain ± its standard error) and the verdict."""
    lines = ["| task (stands in for) | metric | pretraining | fine-tune | pretrained | scratch | gain | spread | "
             "seeds ahead | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, row in sorted(report["tasks"].items()):
        if "scratch" not in row or "pretrained" not in row:
            continue
        pre = report["pretrain"].get(TASKS[task].modality, {})
        runs = len(row["pretrained"]["values"])
        ahead = "—" if "seeds_ahead" not in row else f"{row['seeds_ahead']} of {runs}"  # older files lack it
        if "paired_se" in row:
            ahead += f" ({row['paired_gain']:+.4f} ± {row['paired_se']:.4f})"
        made = f"{row.get('objective', 'v1')}, {pre.get('steps', '?')} steps" + (
            f" × {row['pretrainings']}" if row.get("pretrainings", 1) > 1 else "") + (
            ", teacher" if row.get("weights") == "teacher" else "")
        tuned = f"{row.get('finetune_steps', '?')} steps" + (f", {row['folds']}-fold" if row.get("folds") else "")
        lines.append(f"| {task} ({row['stands_in_for']}) | {row['metric']} | {made} | {tuned} | "
                     f"{row['pretrained']['mean']:.4f} ± {row['pretrained']['std']:.4f} ({runs}) | "
                     f"{row['scratch']['mean']:.4f} ± {row['scratch']['std']:.4f} ({len(row['scratch']['values'])}) | "
                     f"{row['gain']:+.4f} | {row['margin']:.4f} | {ahead} | {verdict(row)} |")
    return "\n".join(lines) + "\n"


def save(out: Path, report: dict) -> None:
    """The JSON and its table beside it (`.md`), each written atomically."""
    atomic_write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), table(report))


def pretrain(modality: str, objective: str, steps: int | None, sets: dict, runs: Path,
             repeat: int = 0, tokenizer: str = "data/tokenizer/spm.model") -> tuple[Path, dict]:
    """Pretrain `modality` (a finished run under the same config is reused): its final checkpoint and a summary.
    Repeat k > 0 is another pretraining of the same recipe under seed + k (its data order, masks and init), in a
    folder of its own (`text-v2-p1`); repeat 0 is the plain run."""
    overrides: dict = {"objective": objective}
    if steps:  # the τ ramp ends with the run
        overrides.update(steps=steps, ema={"tau_steps": steps})
    cfg = pretrain_config(modality, merge(overrides, sets))
    if repeat:
        cfg = cfg.model_copy(update={"seed": cfg.seed + repeat})
    run = runs / "pretrain" / ((modality if objective == "v1" else f"{modality}-{objective}") + repeat_suffix(repeat))
    seconds = pretrain_seconds(cfg, run, tokenizer=tokenizer if modality == "text" else None)
    summary = json.loads((run / "summary.json").read_text())
    # runs older than the summary's teacher_init_share: the schedule gives it (cfg.ema is the recipe's when unset)
    share = summary.get("teacher_init_share", init_share(cfg.ema, cfg.steps) if cfg.ema else None)
    return run / "final.pt", {"objective": objective, "steps": cfg.steps, "seconds": seconds, "run": str(run),
                              "seed": cfg.seed, "overrides": sets, "teacher_init_share": share,
                              **({"tokenizer": tokenizer} if modality == "text" else {}),
                              **{k: summary.get(k) for k in ("first", "last")}}


def repeat_suffix(repeat: int) -> str:
    """The run-folder suffix of pretraining repeat k: none for the plain run, so that a one-pretraining bench and
    the first pretraining of a repeated one share their runs."""
    return f"-p{repeat}" if repeat else ""


def with_known_repeats(old: dict | None, record: dict) -> dict:
    """The record of a modality's first pretraining, keeping the output's records of its repeats when they belong to
    the same pretraining (run folder, steps and overrides): a later run for other tasks, under --pretrainings 1,
    then does not drop the provenance of rows that pool more pretrainings."""
    same = old is not None and all(old.get(k) == record[k] for k in ("run", "steps", "overrides"))
    return {**record, "repeats": old["repeats"]} if same and old.get("repeats") else record


def known_record(old: dict | None, given: dict) -> dict:
    """The record of a `--pretrained` checkpoint: the output's own record when that pretraining was made by this
    script into the same file (its time, overrides and first/last statistics, which the checkpoint does not hold),
    else what the checkpoint records."""
    same = old is not None and Path(given["checkpoint"]) in {Path(old.get("checkpoint") or "/none"),
                                                             Path(old.get("run") or "/none", "final.pt")}
    return {**old, "checkpoint": given["checkpoint"]} if same else given


def given_checkpoint(path: str) -> tuple[Path, dict]:
    """A checkpoint named on the command line, and what it records about its pretraining."""
    if not Path(path).is_file():
        raise SystemExit(f"--pretrained {path}: no such checkpoint")
    state = read_torch(path)
    return Path(path), {"objective": state.get("objective", "v1"), "steps": state.get("steps"),
                        "preset": state.get("preset"), "pretraining": state.get("pretraining", "data2vec"),
                        "checkpoint": path}


def encoder_presets(modalities: list[str], tasks: list[str], pre_sets: dict, ft_sets: dict,
                    given: dict[str, tuple[Path, dict]]) -> dict[str, str]:
    """Each modality's pretrained encoder preset (the given checkpoint's, as `given_checkpoint` read it, or the
    pretraining config's), which its tasks fine-tune, pretrained and scratch alike. A task's different preset (from
    --ft-set or --ft-profile) stops the run before any pretraining, instead of when the pretrained checkpoint fails
    to load."""
    presets = {m: given[m][1]["preset"] if m in given else pretrain_config(m, pre_sets.get(m, {})).preset
               for m in modalities}
    for task in tasks:
        modality, own = TASKS[task].modality, ft_sets.get(task, {}).get("preset")
        if own is not None and presets.get(modality) not in (None, own):
            raise SystemExit(f"{task}.preset={own}: the {modality} encoder is pretrained as {presets[modality]!r} "
                             f"(set it with --set {modality}.preset, or drop the preset from --ft-set/--ft-profile)")
    return presets


def missing_shards(tasks: list[str], ft_sets: dict, folds: dict) -> list[str]:
    """The shard folders the tasks' fine-tunes will read that hold no index (cross-validated tasks shard their own
    folds), so that a missing split stops the run before the pretraining rather than after it."""
    missing = []
    for task in tasks:
        if task in folds:
            continue
        spec = TASKS[task]
        shards = Path(finetune_config(task, ft_sets.get(task, {})).data_root) / "shards"
        folders = [shards / spec.shard_key(split) for split in spec.splits]
        missing += [f"{task}: {folder}" for folder in folders if not (folder / "index.json").is_file()]
    return missing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modalities", default="text,image,speech")
    parser.add_argument("--tasks", default=None, help="default: the chosen modalities' tasks of --ft-profile, or "
                        "without one every embedded recipe's")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrainings", type=int, default=1, help="pretrain each modality this many times (seeds "
                        "seed, seed+1, ...) and fine-tune --seeds times from each: the pretrained arm pools them all")
    parser.add_argument("--objective", type=per_key(str), default={}, help="per modality, e.g. text=v2 (default v1)")
    parser.add_argument("--pretrain-steps", type=per_key(), default={}, help="per modality, e.g. image=600")
    parser.add_argument("--finetune-steps", type=per_key(), default={}, help="per task, e.g. fashion_mnist=150")
    parser.add_argument("--set", action="append", default=[], help="pretraining override, MODALITY.FIELD=VALUE")
    parser.add_argument("--ft-set", action="append", default=[], help="fine-tuning override, TASK.FIELD=VALUE")
    parser.add_argument("--pretrained", type=per_key(str), default={}, help="per modality, a checkpoint to fine-tune "
                        "instead of pretraining, e.g. text=runs/mlm/text/final.pt")
    parser.add_argument("--folds", type=per_key(), default={}, help="per task, K-fold cross-validation by document, "
                        "e.g. lee_sts=5: each seed scores the mean over the folds")
    parser.add_argument("--ft-profile", default=None, help="fine-tune each task from this params.yaml profile's "
                        "overrides (e.g. embedded), under --finetune-steps and --ft-set")
    parser.add_argument("--params", default="params.yaml", help="the params file --ft-profile reads")
    parser.add_argument("--lm", type=Path, default=None, help="CTC tasks: also decode with this language model "
                        "folder (`d2v lm`), and compare the arms on its WER (wer_lm), the papers' metric")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="the pretrained arm starts from each pretraining's student, or its EMA teacher")
    parser.add_argument("--any-finetune-version", action="store_true", help="reuse finished fine-tunes of the same "
                        "config made under an older FINETUNE version (scored again; the JSON records each run's)")
    parser.add_argument("--tag", default="", help="run-folder suffix for a separate family of runs")
    parser.add_argument("--tokenizer", default=None, help="text: the SentencePiece model the pretraining's shards were "
                        "cut with and the fine-tunes read their text with (default: the pipeline's, "
                        "data/tokenizer/spm.model); its vocabulary must be the text preset's")
    parser.add_argument("--runs", default="runs/bench")
    parser.add_argument("--out", default="results/embedded/pretrain_vs_scratch.json")
    parser.add_argument("--render", action="store_true", help="only write --out's table (.md) from its JSON")
    args = parser.parse_args()
    if args.render:
        save(Path(args.out), json.loads(Path(args.out).read_text()))
        return
    if args.pretrainings < 1 or (args.pretrainings > 1 and args.pretrained):
        raise SystemExit(f"--pretrainings {args.pretrainings}: give 1 or more, and more only where this script "
                         "pretrains (not with --pretrained)")
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    modalities = args.modalities.split(",")
    objectives, pre_steps, ft_steps, folds = args.objective, args.pretrain_steps, args.finetune_steps, args.folds
    given = {m: given_checkpoint(path) for m, path in args.pretrained.items()}  # read once
    profile = profile_finetune(args.ft_profile, args.params)
    tasks = args.tasks.split(",") if args.tasks else [t for t in (profile if args.ft_profile else EMBEDDED_FINETUNE)
                                                      if TASKS[t].modality in modalities]
    pre_sets = parse_sets(args.set)
    # --finetune-steps last: the recorded overrides are then the ones each fine-tune ran under
    ft_sets = merge(merge(profile, parse_sets(args.ft_set)), {t: {"steps": n} for t, n in ft_steps.items()})
    if args.tokenizer:  # before the text tasks' own --ft-set, which may name another
        ft_sets = merge({t: {"tokenizer": args.tokenizer} for t in tasks if TASKS[t].modality == "text"}, ft_sets)
    runs, out = Path(args.runs + (f"-{args.tag}" if args.tag else "")), Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"benchmark": "pretrain_vs_scratch", "pretrain": {},
                                                                "tasks": {}}
    report.pop("seeds", None)  # each row records its own: rows of one file may be run over different seed counts
    report.update(machine=platform.machine(),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    presets = encoder_presets(modalities, tasks, pre_sets, ft_sets, given)
    if args.seeds and (missing := missing_shards(tasks, ft_sets, folds)):
        raise SystemExit("no shards (index.json) for\n  " + "\n  ".join(missing) + "\nrun `make run` (or `d2v "
                         "prepare` and `d2v shard`) first, or name the tasks to run with --tasks")
    checkpoints: dict[str, list[Path]] = {}
    for modality in modalities:
        if modality in given:
            checkpoint, record = given[modality]
            checkpoints[modality] = [checkpoint]
            report["pretrain"][modality] = known_record(report["pretrain"].get(modality), record)
            save(out, report)
            continue
        for repeat in range(args.pretrainings):
            checkpoint, record = pretrain(modality, objectives.get(modality, "v1"), pre_steps.get(modality),
                                          pre_sets.get(modality, {}), runs, repeat,
                                          **({"tokenizer": args.tokenizer} if args.tokenizer else {}))
            checkpoints.setdefault(modality, []).append(checkpoint)
            if repeat == 0:
                report["pretrain"][modality] = with_known_repeats(report["pretrain"].get(modality), record)
            else:  # the repeats' own records under the first's
                report["pretrain"][modality].setdefault("repeats", [])[repeat - 1:repeat] = [record]
            save(out, report)
    for task in tasks if args.seeds else []:  # --seeds 0: pretrain only
        modality = TASKS[task].modality
        objective = report["pretrain"][modality]["objective"]
        kind = report["pretrain"][modality].get("pretraining", "data2vec")
        values: dict[str, list[float]] = {}
        every: dict[str, list[dict]] = {}  # all test metrics per seed (CTC: CER moves before WER does)
        versions: dict[str, list[int]] = {}  # the FINETUNE version of each run
        pretrainings = len(checkpoints[modality])
        for init, repeat in [("pretrained", k) for k in range(pretrainings)] + [("scratch", 0)]:
            for seed in range(args.seeds):
                overrides = {"init": init, "seed": seed, "objective": objective}
                if presets.get(modality):
                    overrides["preset"] = presets[modality]
                if init == "pretrained":  # scratch runs name no checkpoint, so they are shared across pretrainings
                    overrides.update(pretrained=str(checkpoints[modality][repeat]), weights=args.weights)
                # the per-run settings (init, seed, steps…) over the task's overrides, which may come from a profile
                cfg = finetune_config(task, merge(ft_sets.get(task, {}), overrides))
                tag = init if objective == "v1" else f"{init}-{objective}"
                if init == "pretrained" and kind != "data2vec":
                    tag += f"-{kind}"  # e.g. rt_polarity-pretrained-mlm-s0
                if init == "pretrained" and args.weights == "teacher":
                    tag += "-teacher"
                run = runs / "finetune" / f"{task}-{tag}{repeat_suffix(repeat)}-s{seed}"
                every.setdefault(init, []).append(cv_test_metrics(cfg, run, folds.get(task), args.lm,
                                                                  args.any_finetune_version))
                versions.setdefault(init, []).append(finetune_version(run, folds.get(task)))
                headline = scored_metrics(TASKS[task], args.lm)[0]
                values.setdefault(init, []).append(every[init][-1][headline])
                report["tasks"][task] = {**summarize(task, values, headline, args.seeds), "objective": objective,
                                         "pretrainings": pretrainings, "seeds": args.seeds,
                                         "weights": args.weights,
                                         "lm": str(args.lm) if headline == "wer_lm" else None,
                                         "finetune_recipes": versions,
                                         "finetune_steps": cfg.steps, "ft_profile": args.ft_profile,
                                         "overrides": ft_sets.get(task, {}),
                                         "folds": folds.get(task),
                                         "test_metrics": every}
                save(out, report)
                print(f"{run.name}: {values[init][-1]:.4f}", flush=True)
        if task in folds:  # the same folds' no-learning reference
            report["tasks"][task]["raw_baseline"] = cv_baseline(task, folds[task])
            save(out, report)
        print(task, report["tasks"][task], flush=True)


if __name__ == "__main__":
    stops_with_a_checkpoint(main)()
