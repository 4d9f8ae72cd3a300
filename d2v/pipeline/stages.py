"""The stage graph, in one place. Snakemake (`workflow/rules/*.smk`) defines one rule per stage from this table and
`d2v pipeline dvc` writes `dvc.yaml` from it, so both front doors run the same commands on the same files.

    prepare SOURCE → tokenizer → shard DATASET/NAME → pretrain MODALITY → finetune TASK × init × seed
    → evaluate (one JSON per test split) → report
                 tokenizer → lm (a word n-gram for CTC beam search) → evaluate of the speech tasks
                                           shard → baseline TASK (raw features, one JSON per test split) → report

Outputs are files the stage writes atomically: a prepared folder is named by its `manifest.csv`, a shard set by
its `index.json` (both list the sha256 of every file they cover), a run by its checkpoint and logs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from d2v.data.sources import SOURCES
from d2v.eval.lm import ARPA, LEXICON, META, WORDS
from d2v.pipeline.params import SECOND_STAGE, Params, Profile, Resources
from d2v.train import recipe
from d2v.train.tasks import RAW, TASKS, eval_file_name


@dataclass(frozen=True)
class Stage:
    name: str  # a valid Python identifier (Snakemake rule name) and DVC stage name
    kind: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...] = ()  # dotted keys of params.yaml the command reads
    versions: tuple[str, ...] = ()  # constants of d2v/train/recipe.py: versions of the code it runs
    metrics: tuple[str, ...] = ()  # outputs that are metrics (JSON)
    plots: tuple[str, ...] = ()  # outputs that are plots (PNG)
    resources: Resources = field(default_factory=Resources)
    log: str = ""  # Snakemake's log file for the job
    priority: int = 0  # Snakemake starts higher first: the pretraining chains are the critical path


# Where DVC reads the recipe versions from, relative to the repository root (dvc.yaml's folder).
RECIPE_FILE = "d2v/train/recipe.py"


def identifier(*parts: str) -> str:
    return re.sub(r"\W", "_", "_".join(parts))


class StageTable:
    """Every stage of one profile, in dependency order."""

    def __init__(self, params: Params, profile: str | None = None, params_file: str = "params.yaml",
                 raw: dict | None = None):
        self.name = profile or params.profile
        self.profile: Profile = params.profiles[self.name]
        self.params_file = params_file
        self.raw = raw  # the YAML as written: DVC may only track keys that exist in it
        self.stages: list[Stage] = []
        self._build()

    def __iter__(self):
        return iter(self.stages)

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind]

    def targets(self) -> list[str]:
        """What `snakemake`'s default target asks for: the report and everything it summarises."""
        return [o for s in self.of_kind("report") for o in s.outs]

    def settings(self, stage: Stage) -> str:
        """The values of the params a stage reads and of its recipe versions, as JSON: Snakemake reruns a job when
        its params change."""
        values = {}
        for key in stage.params:
            node = self.raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = node
        values |= {f"recipe.{name}": getattr(recipe, name) for name in stage.versions}
        return json.dumps(values, sort_keys=True)

    # ------------------------------------------------------------------------------------------- helpers
    def _d2v(self, *args: str, launcher: tuple[str, ...] = ("d2v",)) -> str:
        extra = () if self.params_file == "params.yaml" else ("--params", self.params_file)
        return " ".join((*launcher, *args, "--profile", self.name, *extra))

    def _launcher(self, kind: str) -> tuple[str, ...]:
        """Pretraining, fine-tuning and evaluation on several GPUs of one node run under torchrun (DDP, or FSDP for
        `parallel: fsdp` pretraining; batch sizes are per GPU; an evaluation's ranks split each test set and the
        first scores it); everything else is one process."""
        gpus = self.profile.resources_for(kind).gpus
        if kind in ("pretrain", "finetune", "evaluate") and gpus > 1:
            return ("torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "d2v.cli")
        return ("d2v",)

    def _keys(self, *keys: str) -> tuple[str, ...]:
        """`profiles.NAME.KEY` for each key present in the written params (defaults have nothing to track)."""
        out = []
        for key in keys:
            node, present = self.raw, self.raw is not None
            for part in ("profiles", self.name, *key.split(".")):
                if not (present and isinstance(node, dict) and part in node):
                    present = False
                    break
                node = node[part]
            if present or self.raw is None:
                out.append(f"profiles.{self.name}.{key}")
        return tuple(out)

    def _add(self, kind: str, name: str, cmd: str, deps, outs, params=(), metrics=(), plots=()) -> None:
        stage = identifier(kind, *name.split("/")) if name else kind
        versions = (recipe.constant(kind),) if kind in recipe.KINDS else ()
        self.stages.append(Stage(stage, kind, cmd, tuple(map(str, deps)), tuple(map(str, outs)), self._keys(*params),
                                 versions, tuple(map(str, metrics)), tuple(map(str, plots)),
                                 self.profile.resources_for(kind), f"logs/{self.name}/{stage}.log"))

    def _manifest(self, source: str) -> Path:
        return self.profile.raw / source / "manifest.csv"

    # ------------------------------------------------------------------------------------------- graph
    def _build(self) -> None:
        p = self.profile
        for source, options in p.sources.items():
            datasets = SOURCES[source].datasets
            manifests = [self._manifest(d) for d in (datasets(options or {}) if datasets else [source])]
            self._add("prepare", source, self._d2v("prepare", source), [],
                      [f for m in manifests for f in (m, m.with_suffix(".json"))], [f"sources.{source}"])
        tok = p.tokenizer
        tok_outs = ([p.spm_model] if tok.corpus else []) + ([p.letters] if tok.letters else [])
        if tok_outs:
            deps = [self._manifest(s) for s in (tok.corpus, tok.letters) if s]
            self._add("tokenizer", "", self._d2v("tokenizer"), deps, tok_outs, ["tokenizer"])
        if p.lm is not None:
            self._add("lm", "", self._d2v("lm"), ([self._manifest(p.lm.corpus)] if p.lm.corpus else []) + [p.letters],
                      self.lm_files(), ["lm"])
        threads = p.resources_for("shard").threads  # processes cutting pieces of long recordings
        shard_workers = ["--workers", str(threads)] if threads > 1 else []
        for key in p.shard_keys:
            dataset, name = key.rsplit("/", 1)  # DATASET may be nested (glue/cola)
            deps = [self._manifest(dataset)]
            if dataset == tok.corpus:
                deps.append(p.spm_model)  # the pretraining corpus is stored as token ids
            params = ["shard_limit"] + ([f"shards.{key}"] if key in p.shards else [])
            self._add("shard", key, self._d2v("shard", dataset, "--split", name, *shard_workers), deps,
                      [p.shard_dir(key) / "index.json"], params)
        for modality in p.pretrain:
            for stage in p.pretrain_stages(modality):
                self._pretrain(modality, stage)
        for task, init, seed in self.finetune_runs():
            self._finetune(task, init, seed)
        for task in p.baselines:
            self._baseline(task)
        self._report()
        self._prioritise()

    def _prioritise(self) -> None:
        """Pretraining and everything upstream of it first (2), then the runs that wait for it (1); scratch
        baselines (0) fill the free cores meanwhile."""
        producer = {o: s for s in self.stages for o in s.outs}
        upstream, todo = set(), [s for s in self.stages if s.kind == "pretrain"]
        while todo:
            stage = todo.pop()
            if stage.name not in upstream:
                upstream.add(stage.name)
                todo += [producer[d] for d in stage.deps if d in producer]
        pretrained = {o for s in self.of_kind("pretrain") for o in s.outs}
        after = {s.name for s in self.stages if s.kind == "finetune" and pretrained & set(s.deps)}
        after |= {s.name for s in self.of_kind("evaluate") if s.name.replace("evaluate_", "finetune_", 1) in after}
        self.stages = [replace(s, priority=2 if s.name in upstream else 1 if s.name in after else 0)
                       for s in self.stages]

    def finetune_runs(self) -> list[tuple[str, str, int]]:
        p = self.profile
        return [(t, i, s) for t in p.finetune for i in p.inits for s in p.seeds]

    def _task_inputs(self, task: str) -> list[Path]:
        """The shard indices of a task's splits, then the tokenizer or letter vocabulary it reads them with."""
        p, spec = self.profile, TASKS[task]
        deps = [p.shard_dir(k) / "index.json" for k in p.task_shards(task)]
        return deps + ([p.spm_model] if spec.modality == "text" else [p.letters] if spec.kind == "ctc" else [])

    def _extra_tests(self, task: str) -> tuple[str, list[Path]]:
        """The `--extra` flags of a task's extra test sets, and their shard indices."""
        keys = self.profile.extra_tests(task)
        return "".join(f" --extra {key}" for key in keys), [self.profile.shard_dir(k) / "index.json" for k in keys]

    def lm_files(self) -> list[Path]:
        """What the lm stage writes (lm.json first; lm.arpa only when it estimates the model itself)."""
        p = self.profile
        if p.lm is None:
            return []
        return [p.lm_dir / name for name in (META, LEXICON, WORDS, *([ARPA] if p.lm.corpus else []))]

    def _pretrain(self, modality: str, stage: int) -> None:
        """One pretraining stage; the first of two is `pretrain_MODALITY_stage1`, and reads only its own params."""
        p = self.profile
        run, final = p.pretrain_dir(modality, stage), stage == p.pretrain_stages(modality)[-1]
        deps = [p.shard_dir(p.pretrain_corpus(modality)) / "index.json"]
        if modality == "text":
            deps.append(p.spm_model)
        if stage > 1:
            deps.append(p.pretrain_dir(modality, stage - 1) / "final.pt")
        params = [f"pretrain.{modality}"] if final else \
            [f"pretrain.{modality}.{key}" for key in p.pretrain[modality] if key != SECOND_STAGE]
        cmd = self._d2v("pretrain", modality, "--quiet", *(() if final else ("--stage", str(stage))),
                        launcher=self._launcher("pretrain"))
        self._add("pretrain", modality if final else f"{modality}/stage{stage}", cmd, deps,
                  [run / "final.pt", run / "metrics.csv", run / "summary.json", run / "curves.png"],
                  ["objective", *params], plots=[run / "curves.png"])

    def _decoding(self, task: str, kind: str) -> tuple[str, list[Path]]:
        """The `--lm` flag of a CTC task's evaluation or baseline (stage `kind`) and the files it reads, when the
        profile has an LM; the beam search runs in as many processes as the stage has threads."""
        files = self.lm_files() if TASKS[task].kind == "ctc" else []
        if not files:
            return "", []
        threads = self.profile.resources_for(kind).threads
        return f" --lm {self.profile.lm_dir}" + (f" --decode-workers {threads}" if threads > 1 else ""), files

    def _finetune(self, task: str, init: str, seed: int) -> None:
        p, modality = self.profile, TASKS[task].modality
        run, name = p.finetune_dir(task, init, seed), f"{task}/{init}/s{seed}"
        deps = self._task_inputs(task)
        if init == "pretrained":
            deps.append(p.pretrain_dir(modality) / "final.pt")
        self._add("finetune", name,
                  self._d2v("finetune", task, "--init", init, "--seed", str(seed), "--quiet",
                            launcher=self._launcher("finetune")), deps,
                  [run / "best.pt", run / "metrics.csv", run / "summary.json"],
                  ["objective", f"pretrain.{modality}.objective", f"finetune.{task}"])
        evals = self.eval_files(task, init, seed)
        extra, extra_shards = self._extra_tests(task)
        lm, lm_files = self._decoding(task, "evaluate")
        launcher = " ".join(self._launcher("evaluate"))
        self._add("evaluate", name, f"{launcher} evaluate {run} --out {p.eval_dir(task, init, seed)}{extra}{lm}",
                  [run / "best.pt"] + deps[:len(p.task_shards(task))] + extra_shards + lm_files, evals, metrics=evals)

    def _baseline(self, task: str) -> None:
        evals = self.eval_files(task, RAW, self.profile.seeds[0])
        extra, extra_shards = self._extra_tests(task)
        lm, lm_files = self._decoding(task, "baseline")
        self._add("baseline", task, self._d2v("baseline", task, "--out", str(evals[0].parent)) + extra + lm,
                  self._task_inputs(task) + extra_shards + lm_files, evals, [f"baselines.{task}"], metrics=evals)

    def eval_files(self, task: str, init: str, seed: int) -> list[Path]:
        splits = [*TASKS[task].tests, *self.profile.extra_tests(task)]
        return [self.profile.eval_dir(task, init, seed) / eval_file_name(task, split) for split in splits]

    def _report(self) -> None:
        p = self.profile
        evals = [f for run in self.finetune_runs() for f in self.eval_files(*run)]
        evals += [f for s in self.of_kind("baseline") for f in s.outs]
        logs = [p.pretrain_dir(m) / "metrics.csv" for m in p.pretrain]
        logs += [p.finetune_dir(*run) / "metrics.csv" for run in self.finetune_runs()]
        plots = [Path(p.results) / "plots" / f"{kind}.png" for kind in ("pretrain", "finetune")]
        outs = [Path(p.summary + ".md"), Path(p.summary + ".csv"), *plots]
        self._add("report", "", self._d2v("report"), evals + logs, outs, plots=plots)


def dvc_yaml(table: StageTable) -> dict:
    """`dvc.yaml` for one profile. Outputs are not cached: there is no remote, the data folders are large and
    rebuilt from their manifests, and the results are committed to git."""
    stages = {}
    for s in table:
        entry: dict = {"cmd": s.cmd}
        if s.deps:
            entry["deps"] = list(dict.fromkeys(s.deps))
        if s.params or s.versions:
            entry["params"] = list(s.params) + ([{RECIPE_FILE: list(s.versions)}] if s.versions else [])
        plain = [o for o in s.outs if o not in s.metrics and o not in s.plots]
        if plain:
            entry["outs"] = [{o: {"cache": False}} for o in plain]
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        if s.plots:
            entry["plots"] = [{pl: {"cache": False}} for pl in s.plots]
        stages[s.name] = entry
    return {"stages": stages}
