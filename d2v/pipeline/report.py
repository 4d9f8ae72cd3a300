"""`d2v report`: the evaluation JSONs of a profile → `summary.md` + `summary.csv` (pretrained vs scratch, seed
spread, Δ, the paper's number for the task each one stands in for) and training-curve plots; `--compare REV`
prints the metric deltas between two commits' summaries."""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from d2v.eval.metrics import oriented, scored_in_part
from d2v.io import atomic_write_text, git_commit, short_commit
from d2v.pipeline.params import Profile
from d2v.train.tasks import RAW, TASKS

# What the paper reports for the benchmark each embedded task stands in for (data2vec 1.0, Base): ImageNet-1K
# top-1 [P1 Tab.1]; AudioSet mAP [P1 Tab.3]; LibriSpeech WER with a 4-gram LM [P1 Tab.6], so beside wer_lm (beam
# search with a word n-gram), not the greedy wer; GLUE dev [P1 Tab.4]. For the embedded stand-ins (different data
# and scale) a compass, not a target; for the paper profile's tasks the number to reproduce.
# data2vec Base, 4-gram LM, dev-clean / dev-other / test-clean / test-other, per labelled subset [P1 Tab.6]
LIBRISPEECH_WER = {"10min": (0.073, 0.116, 0.079, 0.123), "1h": (0.040, 0.085, 0.046, 0.091),
                   "10h": (0.033, 0.075, 0.039, 0.081), "100h": (0.022, 0.064, 0.028, 0.068)}


def _speech_rows(task: str, subset: str) -> dict:
    return {(task, split, "wer_lm"): v for split, v in zip(TASKS[task].tests, LIBRISPEECH_WER[subset])}


PAPER = {
    ("fashion_mnist", "test", "accuracy"): 0.842,
    **_speech_rows("speech_10min", "10min"), **_speech_rows("speech_1h", "1h"),
    **{k: v for subset in LIBRISPEECH_WER for k, v in _speech_rows(f"librispeech_{subset}", subset).items()},
    ("rt_polarity", "test", "accuracy"): 0.918,
    ("bible_para", "test", "accuracy"): 0.902,  # MRPC: the paper reports the mean of accuracy and F1
    ("lee_sts", "test", "pearson"): 0.872,  # STS-B: mean of Pearson and Spearman
    # GLUE dev, data2vec with BERT masking [P1 Tab.4]
    ("glue_mnli", "dev_matched", "accuracy"): 0.832, ("glue_mnli", "dev_mismatched", "accuracy"): 0.830,
    ("glue_qnli", "dev", "accuracy"): 0.909, ("glue_rte", "dev", "accuracy"): 0.670,
    ("glue_mrpc", "dev", "acc_and_f1"): 0.902, ("glue_qqp", "dev", "acc_and_f1"): 0.891,
    ("glue_stsb", "dev", "pearson_and_spearman"): 0.872, ("glue_cola", "dev", "mcc"): 0.622,
    ("glue_sst2", "dev", "accuracy"): 0.918,
    ("librispeech_960h", "test-other", "wer_lm"): 0.055,  # [P1 Tab.2]; [P1] gives no 960 h dev or test-clean
    ("audioset", "eval", "map"): 0.345,  # pretrained on AudioSet, fine-tuned on the balanced 20k [P1 Tab.3]
}

COLUMNS = ["task", "stands_in_for", "split", "metric", "pretrained", "pretrained_std", "scratch", "scratch_std",
           "delta", "pretrained_better", "seeds", "raw", "pretrained_beats_raw", "paper", "commit",
           "pretrained_degenerate", "scratch_degenerate",  # seeds whose outputs ignore the input
           "pretrained_partial", "scratch_partial"]  # seeds scored on part of the split (samples failed to decode)


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per (task, split, init, seed, metric) from `RESULTS/TASK/INIT-sSEED/TASK-SPLIT.json`; `degenerate`
    when the model gave every test example the same output (`prediction_stats`), `partial` when it scored fewer
    examples than the split holds (`n_split`; both absent in older JSONs)."""
    rows = []
    for path in sorted(Path(results_dir).glob("*/*/*.json")):
        try:
            r = json.loads(path.read_text())
            rows += [dict(task=r["task"], split=r["split"], init=r["init"], seed=r["seed"], metric=k, value=v,
                          commit=r.get("commit", "unknown"),
                          degenerate=bool(r.get("predictions", {}).get("degenerate", False)),
                          partial=scored_in_part(r))
                     for k, v in r["metrics"].items()]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not an evaluation result ({err})") from None
    return pd.DataFrame(rows, columns=["task", "split", "init", "seed", "metric", "value", "commit", "degenerate",
                                       "partial"])


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (task, split, metric), g in results.groupby(["task", "split", "metric"], sort=False):
        row = dict(task=task, stands_in_for=TASKS[task].stands_in_for if task in TASKS else "", split=split,
                   metric=metric, paper=PAPER.get((task, split, metric), np.nan),
                   commit=",".join(sorted(set(g["commit"].map(short_commit)))))
        for init in ("pretrained", "scratch"):
            arm = g[g["init"] == init]
            v = arm["value"]
            row[init], row[f"{init}_std"] = (v.mean(), v.std(ddof=0)) if len(v) else (np.nan, np.nan)
            row[f"{init}_degenerate"] = int(arm["degenerate"].sum())
            row[f"{init}_partial"] = int(arm["partial"].sum())
        raw = g.loc[g["init"] == RAW, "value"]
        row["raw"] = raw.mean() if len(raw) else np.nan
        row["seeds"] = int(g.loc[g["init"] != RAW, "seed"].nunique())
        row["delta"] = row["pretrained"] - row["scratch"]
        row["pretrained_better"] = _better(row["delta"], metric)
        row["pretrained_beats_raw"] = _better(row["pretrained"] - row["raw"], metric)
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS)


def _better(difference: float, metric: str) -> bool | None:
    """Whether a difference (first − second) favours the first; None when either is missing."""
    if np.isnan(difference):
        return None
    return bool(oriented(metric, difference) > 0)


def stage_times(bench_dir: str | Path) -> pd.DataFrame:
    """Wall time per stage from Snakemake's `benchmark:` files (absent when the graph ran under DVC). The report job
    that reads them is left out: its own file is written after it finishes, so it would be the previous run's."""
    files = sorted(p for p in Path(bench_dir).glob("*.tsv") if p.stem != "report")
    rows = [dict(stage=p.stem, seconds=float(pd.read_csv(p, sep="\t")["s"].iloc[0])) for p in files]
    times = pd.DataFrame(rows, columns=["stage", "seconds"])
    if files:
        newest = max(p.stat().st_mtime for p in files)
        times.attrs["when"] = pd.Timestamp(newest, unit="s").strftime("%Y-%m-%d %H:%M UTC")
    return times


def markdown(summary: pd.DataFrame, profile_name: str, pretrain: pd.DataFrame,
             times: pd.DataFrame | None = None) -> str:
    def fmt(x):
        return "—" if pd.isna(x) else f"{x:.4f}"

    lines = [f"# d2v results — profile `{profile_name}`", "",
             "Pretrained = data2vec encoder fine-tuned; scratch = the same model from a random initialisation. "
             "Mean ± std over seeds on the test splits; Δ = pretrained − scratch (lower WER and CER are better). "
             "Raw features = a linear model on the inputs themselves, no encoder (`d2v baseline`; ✓ where the "
             "pretrained model beats it). "
             "Embedded tasks are stand-ins, named after the benchmark they mirror; the paper column is that "
             "benchmark's published data2vec Base number (different data and scale).", "",
             "| task (stands in for) | split | metric | pretrained | scratch | Δ | seeds | raw features | paper |",
             "|---|---|---|---|---|---|---|---|---|"]

    def mark(better):
        return "" if better is None else (" ✓" if better else " ✗")

    def dagger(seeds, partial):
        return (" †" if seeds > 0 else "") + (" ‡" if partial > 0 else "")

    for r in summary.itertuples():
        lines.append(f"| {r.task} ({r.stands_in_for}) | {r.split} | {r.metric} | {fmt(r.pretrained)} ± "
                     f"{fmt(r.pretrained_std)}{dagger(r.pretrained_degenerate, r.pretrained_partial)} | "
                     f"{fmt(r.scratch)} ± {fmt(r.scratch_std)}{dagger(r.scratch_degenerate, r.scratch_partial)} | "
                     f"{fmt(r.delta)}{mark(r.pretrained_better)} | {r.seeds} | "
                     f"{fmt(r.raw)}{mark(r.pretrained_beats_raw)} | {fmt(r.paper)} |")
    if (summary[["pretrained_degenerate", "scratch_degenerate"]] > 0).any(axis=None):
        lines += ["", "† At least one seed gave every test example the same output (one class, one transcript or one "
                  "score): that number measures the labels, not a learned model."]
    if (summary[["pretrained_partial", "scratch_partial"]] > 0).any(axis=None):
        lines += ["", "‡ At least one seed was scored on part of the split: samples that failed to decode were "
                  "skipped (the evaluation log names them), so the number is not the whole split's."]
    if not pretrain.empty:
        lines += ["", "## Pretraining", "", "| modality | steps | loss first → last | target_var | pred_var | "
                  "samples/s |", "|---|---|---|---|---|---|"]
        for r in pretrain.itertuples():
            lines.append(f"| {r.modality} | {r.steps} | {r.loss_first:.3f} → {r.loss_last:.3f} | "
                         f"{r.target_var:.3f} | {r.pred_var:.3f} | {r.samples_per_s:.1f} |")
    if times is not None and not times.empty:
        kinds = times.assign(kind=times["stage"].str.split("_").str[0]).groupby("kind", sort=False)["seconds"]
        lines += ["", "## Stage times (seconds)", "",
                  f"From the Snakemake `benchmark:` files of the last Snakemake run ({times.attrs.get('when', '?')}); "
                  "jobs of one thread run two at a time on 2 cores, so the sum exceeds the wall time (the report job "
                  "itself is not counted).", "",
                  "| stage | jobs | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {n} | {t:.0f} |" for k, n, t in zip(kinds.sum().index, kinds.count(), kinds.sum())]
        lines.append(f"| **all** | {len(times)} | {times['seconds'].sum():.0f} |")
        lines += ["", "Per job: " + ", ".join(f"{r.stage} {r.seconds:.0f}" for r in times.itertuples()) + "."]
    lines += ["", f"Commit: `{short_commit(git_commit())}`.", ""]
    return "\n".join(lines)


def pretrain_table(profile: Profile) -> pd.DataFrame:
    rows = []
    for modality in profile.pretrain:
        path = profile.pretrain_dir(modality) / "metrics.csv"
        if path.is_file():
            df = pd.read_csv(path)
            rows.append(dict(modality=modality, steps=int(df["step"].iloc[-1]), loss_first=df["loss"].iloc[0],
                             loss_last=df["loss"].iloc[-1], target_var=df["target_var"].iloc[-1],
                             pred_var=df["pred_var"].iloc[-1], samples_per_s=df["samples_per_s"].iloc[-1]))
    return pd.DataFrame(rows)


def plot_pretraining(profile: Profile, out: Path) -> None:
    curves = {m: pd.read_csv(profile.pretrain_dir(m) / "metrics.csv") for m in profile.pretrain
              if (profile.pretrain_dir(m) / "metrics.csv").is_file()}
    _panels(out, "data2vec pretraining", [(f"{m}: {col}", [(df["step"], df[col], m)]) for m, df in curves.items()
                                          for col in ("loss", "target_var") if col in df])


def plot_finetuning(profile: Profile, out: Path) -> None:
    panels = []
    for task in profile.finetune:
        lines = []
        for init in profile.inits:
            path = profile.finetune_dir(task, init, profile.seeds[0]) / "metrics.csv"
            if path.is_file():
                df = pd.read_csv(path)
                lines.append((df["step"], df["loss"].rolling(10, min_periods=1).mean(), init))
        panels.append((f"{task}: train loss (seed {profile.seeds[0]})", lines))
    _panels(out, "fine-tuning: pretrained vs scratch", panels)


def _panels(out: Path, title: str, panels: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, lines) in zip(axes.flat, panels):
        for x, y, label in lines:
            ax.plot(x, y, lw=1, label=label)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    from d2v.io import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())


def write_report(profile: Profile, profile_name: str) -> str:
    results = collect(profile.results)
    if results.empty:
        raise FileNotFoundError(f"{profile.results}: no evaluation JSONs (run the evaluate stages first)")
    summary = summarize(results)
    atomic_write_text(profile.summary + ".csv", summary.to_csv(index=False, float_format="%.6g"))
    text = markdown(summary, profile_name, pretrain_table(profile), stage_times(Path("benchmarks") / profile_name))
    atomic_write_text(profile.summary + ".md", text)
    plots = Path(profile.results) / "plots"
    plot_pretraining(profile, plots / "pretrain.png")
    plot_finetuning(profile, plots / "finetune.png")
    return text


# --------------------------------------------------------------------------------------------------- compare

def summary_at(path: str, rev: str | None) -> pd.DataFrame:
    """A summary CSV from git revision `rev`, or from the work tree when `rev` is None."""
    if rev is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no summary in the work tree (run `d2v report`)")
        return pd.read_csv(path)
    show = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    if show.returncode != 0:
        raise FileNotFoundError(f"{rev}:{path}: not in git ({show.stderr.strip()})")
    return pd.read_csv(io.StringIO(show.stdout))


def compare_frames(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    keys = ["task", "split", "metric"]
    both = old[keys + ["pretrained", "scratch"]].merge(new[keys + ["pretrained", "scratch"]], on=keys, how="outer",
                                                       suffixes=("_old", "_new"))
    for init in ("pretrained", "scratch"):
        both[f"{init}_change"] = both[f"{init}_new"] - both[f"{init}_old"]
    return both


def compare(profile: Profile, rev: str, against: str | None = None) -> str:
    path = profile.summary + ".csv"
    table = compare_frames(summary_at(path, rev), summary_at(path, against))
    head = f"{path}: {rev} → {against or 'work tree'}"
    signed = {c: (lambda x: f"{x:+.4f}") for c in table.columns if c.endswith("_change")}
    return head + "\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4f}", formatters=signed)
