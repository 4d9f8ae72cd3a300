"""GLUE (paper scale): CoLA, SST-2, MRPC, QQP, STS-B, MNLI-m/mm, QNLI, RTE in their released TSV formats.

The archives come from the URLs of the official GLUE download script. GLUE publishes no checksums, so content is
checked instead: each split must have the published number of examples (train/dev), and the observed sha256 of
every archive is recorded in the manifest so later runs and commits can be compared. A row that cannot be parsed
(wrong column count, a label outside the task's set) is skipped, named by file and line, and counted.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from d2v.data.download import Artifact, bytes_sha256, fetch, file_digest
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, log, register, staged
from d2v.io import text_lines

BASE = "https://dl.fbaipublicfiles.com/glue/data/"
SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"


@dataclass(frozen=True)
class Task:
    archive: str  # zip name, or "" for MRPC's plain files
    folder: str
    files: Mapping[str, str]  # split → TSV file inside the folder
    text: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None  # None: regression
    header: bool = True
    columns: tuple[str, ...] | None = None  # for header-less files (CoLA)
    sizes: Mapping[str, int] | None = None  # published example counts


TASKS: dict[str, Task] = {
    "cola": Task("CoLA.zip", "CoLA", {"train": "train.tsv", "dev": "dev.tsv"}, "sentence", None, "label", ("0", "1"),
                 header=False, columns=("source", "label", "original_label", "sentence"),
                 sizes={"train": 8551, "dev": 1043}),
    "sst2": Task("SST-2.zip", "SST-2", {"train": "train.tsv", "dev": "dev.tsv"}, "sentence", None, "label",
                 ("0", "1"), sizes={"train": 67349, "dev": 872}),
    "mrpc": Task("", "MRPC", {"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"},
                 "#1 String", "#2 String", "Quality", ("0", "1"), sizes={"train": 3668, "dev": 408, "test": 1725}),
    "qqp": Task("QQP-clean.zip", "QQP", {"train": "train.tsv", "dev": "dev.tsv"}, "question1", "question2",
                "is_duplicate", ("0", "1"), sizes={"train": 363846, "dev": 40430}),
    "stsb": Task("STS-B.zip", "STS-B", {"train": "train.tsv", "dev": "dev.tsv"}, "sentence1", "sentence2", "score",
                 None, sizes={"train": 5749, "dev": 1500}),
    "mnli": Task("MNLI.zip", "MNLI", {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                                      "dev_mismatched": "dev_mismatched.tsv"}, "sentence1", "sentence2", "gold_label",
                 ("contradiction", "entailment", "neutral"),
                 sizes={"train": 392702, "dev_matched": 9815, "dev_mismatched": 9832}),
    "qnli": Task("QNLIv2.zip", "QNLI", {"train": "train.tsv", "dev": "dev.tsv"}, "question", "sentence", "label",
                 ("entailment", "not_entailment"), sizes={"train": 104743, "dev": 5463}),
    "rte": Task("RTE.zip", "RTE", {"train": "train.tsv", "dev": "dev.tsv"}, "sentence1", "sentence2", "label",
                ("entailment", "not_entailment"), sizes={"train": 2490, "dev": 277}),
}
MRPC_DEV_IDS = "mrpc_dev_ids.tsv"


def glue_splits(task: str, prepared: Iterable[str] = tuple(TASKS)) -> list[str]:
    """The splits a task's manifest holds, where `prepared` holds the task: its files', and MRPC's dev, cut from its
    train file."""
    if task not in TASKS or task not in prepared:
        return []
    return [*TASKS[task].files, *([] if TASKS[task].archive else ["dev"])]


def default_artifacts(tasks: Iterable[str]) -> dict[str, Artifact]:
    arts = {}
    for name in tasks:
        task = TASKS[name]
        if task.archive:
            arts[task.archive] = Artifact(task.archive, (BASE + task.archive,), unpinned=True)
        else:
            for f in task.files.values():
                arts[f] = Artifact(f, (SENTEVAL + f,), unpinned=True)
            arts[MRPC_DEV_IDS] = Artifact(MRPC_DEV_IDS, (BASE + MRPC_DEV_IDS,), unpinned=True)
    return arts


def read_tsv(data: bytes, where: str, task: Task, skipped: Skipped) -> pd.DataFrame:
    """Parse one GLUE TSV (no quoting, as released); rows with a wrong field count are skipped and named."""
    lines = text_lines(data.decode("utf-8-sig"))
    header = lines[0].split("\t") if task.header else list(task.columns)
    body = lines[1:] if task.header else lines
    rows = []
    for n, line in enumerate(body, start=2 if task.header else 1):
        fields = line.split("\t")
        if len(fields) != len(header):
            skipped.add(f"{where}:{n}", f"{len(fields)} fields, expected {len(header)}", log)
            continue
        rows.append(fields)
    return pd.DataFrame(rows, columns=header)


def task_rows(name: str, task: Task, split: str, df: pd.DataFrame, where: str, skipped: Skipped) -> list[dict]:
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        raw = str(rec[task.label]).strip()
        if task.labels is None:
            try:
                label = float(raw)
            except ValueError:
                skipped.add(f"{where}:{i}", f"score {raw!r} is not a number", log)
                continue
        elif raw in task.labels:
            label = float(task.labels.index(raw))
        else:
            skipped.add(f"{where}:{i}", f"label {raw!r} not in {task.labels}", log)
            continue
        text_b = rec[task.text_b] if task.text_b else None
        joined = rec[task.text] + ("" if text_b is None else "\t" + text_b)
        rows.append(dict(id=f"{name}-{split}-{i:06d}", path=where.split(":")[0], split=split,
                         bytes=len(joined.encode()), label=label, text=rec[task.text], text_b=text_b,
                         sha256=bytes_sha256(joined.encode())))
    return rows


def _mrpc_frames(ctx: Context, arts: Mapping[str, Artifact], task: Task, skipped: Skipped) -> dict[str, tuple]:
    """MRPC ships as MSR's train/test files; GLUE's dev split is the listed (#1 ID, #2 ID) pairs of train."""
    read = {s: fetch(arts[f], ctx.cache_dir).read_bytes() for s, f in task.files.items()}
    frames = {s: (read_tsv(b, task.files[s], task, skipped), task.files[s]) for s, b in read.items()}
    dev_ids = {tuple(line.split("\t")[:2]) for line in text_lines(fetch(arts[MRPC_DEV_IDS], ctx.cache_dir)
               .read_text(encoding="utf-8")) if line.strip()}
    train, where = frames["train"]
    is_dev = [(a, b) in dev_ids for a, b in zip(train["#1 ID"], train["#2 ID"])]
    frames["dev"] = (train[is_dev].reset_index(drop=True), where)
    frames["train"] = (train[[not d for d in is_dev]].reset_index(drop=True), where)
    return frames


@register("glue", "text", "paper", "GLUE CoLA, SST-2, MRPC, QQP, STS-B, MNLI-m/mm, QNLI, RTE (released TSVs)",
          datasets=lambda options: [f"glue/{t}" for t in options.get("tasks", TASKS)],
          splits=lambda options, dataset: glue_splits(dataset.removeprefix("glue/"), options.get("tasks", TASKS)))
def prepare(ctx: Context, tasks: Sequence[str] = tuple(TASKS), artifacts: Mapping[str, Artifact] | None = None,
            check_sizes: bool = True) -> Path:
    tasks = list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"glue: unknown task(s) {unknown}; expected some of {list(TASKS)}")
    arts = {**default_artifacts(tasks), **(artifacts or {})}
    observed = {}
    with staged(ctx.out_dir) as out:
        for name in tasks:
            task, skipped = TASKS[name], Skipped()
            if task.archive:
                path = fetch(arts[task.archive], ctx.cache_dir)
                observed[task.archive] = file_digest(path)
                with zipfile.ZipFile(path) as z:
                    frames = {s: (read_tsv(z.read(f"{task.folder}/{f}"), f"{task.archive}:{task.folder}/{f}", task,
                                           skipped), f"{task.folder}/{f}") for s, f in task.files.items()}
            else:
                frames = _mrpc_frames(ctx, arts, task, skipped)
            rows = [r for s, (df, where) in frames.items() for r in task_rows(name, task, s, df, where, skipped)]
            df = make_manifest(rows)
            counts = df["split"].value_counts().to_dict()
            if check_sizes and task.sizes:
                wrong = {s: (counts.get(s, 0), n) for s, n in task.sizes.items() if counts.get(s, 0) != n}
                if wrong:
                    raise ValueError(f"glue/{name}: example counts (got, published) differ: {wrong}; the archive is "
                                     "not the released GLUE data")
            write_manifest(out / name, df, source=f"glue/{name}", skipped=skipped.as_json(),
                           labels=list(task.labels) if task.labels else None, observed_sha256=observed)
    return ctx.out_dir

