"""`params.yaml`: named profiles (embedded, smoke, paper, paper-v2, paper-v2-large) and the active one, validated
before any work.

Each profile names the corpora to prepare, how to shard them, the tokenizer, and per-stage overrides of the typed
training configs. Loading validates the whole file, including every training config a stage will build, so a bad
value fails at `snakemake`/`dvc repro` parse time with its full key, e.g. `profiles.smoke.pretrain.image.optim.lr`.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from d2v.config import ConfigError, Objective, StrictModel, load_yaml, validate
from d2v.data.manifest import LM_SPLIT, PRETRAIN_SPLIT
from d2v.data.sources import SOURCES
from d2v.eval.lm import LanguageModelConfig
from d2v.train.config import PretrainConfig, merge, pretrain_config
from d2v.train.tasks import TASKS, BaselineConfig, FinetuneConfig, baseline_config, finetune_config

PARAMS_FILE = "params.yaml"
STAGE_KINDS = ("prepare", "tokenizer", "lm", "shard", "pretrain", "finetune", "evaluate", "baseline", "report")
# A `pretrain.MODALITY` key: the overrides of a second pretraining stage, which continues the first one's student with
# the teacher reset to it (`init_from`; v1 ViT-L's second 800 epochs). Fine-tuning reads the second stage's encoder.
SECOND_STAGE = "second_stage"
# what a second stage may not change: it continues the same encoder on the same data, from the first stage
FIXED_IN_SECOND_STAGE = ("modality", "preset", "objective", "init_from")


class Resources(StrictModel):
    """What one job of a stage kind needs; Snakemake schedules and SLURM allocates from these."""

    threads: int = Field(1, ge=1)
    mem_mb: int = Field(4000, ge=100)
    runtime: int = Field(30, ge=1)  # minutes
    gpus: int = Field(0, ge=0)

    def snakemake(self) -> dict:
        """Snakemake's standard resource names (threads are a directive of their own)."""
        return {"mem_mb": self.mem_mb, "runtime": self.runtime, "gpu": self.gpus}


class ShardSpec(StrictModel):
    """How a shard set `DATASET/NAME` is cut from a prepared split (default: split NAME, or SPLIT-SUBSET)."""

    split: str
    subset: str | None = None
    limit: int | None = Field(None, ge=1)
    sample_seed: int | None = Field(None, ge=0)  # with limit: a seeded random sample instead of the first rows

    @model_validator(mode="after")
    def _sample_needs_limit(self):
        if self.sample_seed is not None and self.limit is None:
            raise ValueError("sample_seed needs a limit (how many rows to draw)")
        return self


class TokenizerSpec(StrictModel):
    corpus: str | None = None  # prepared text source whose 'pretrain' split trains SentencePiece
    letters: str | None = None  # prepared speech source whose transcripts define the CTC letters
    letters_split: str = "train_1h"
    vocab_size: int = Field(8000, ge=16)
    num_threads: int = Field(2, ge=1)
    sample_lines: int = Field(0, ge=0)  # SentencePiece trains on a seeded sample of this many lines (0: all)


class Profile(StrictModel):
    description: str = ""
    data_root: str = "data"
    cache: str = "data/cache"  # content-addressed downloads, shared by all profiles
    runs: str
    results: str
    summary: str  # path prefix of summary.md / summary.csv
    seeds: list[int] = Field([0], min_length=1)
    inits: list[Literal["pretrained", "scratch"]] = Field(["pretrained", "scratch"], min_length=1)
    objective: Objective = "v1"  # data2vec 1.0 or 2.0 for every modality (pretrain.M.objective overrides)
    shard_limit: int | None = Field(None, ge=1)  # cap on every shard set (smoke runs)
    # updates between metric rows of every pretraining and fine-tuning that does not set its own (None: the configs'
    # defaults, 10 and 1). Each row reads the metrics back from the device, a sync that drains a GPU's queue
    log_every: int | None = Field(None, ge=1)
    sources: dict[str, dict] = {}  # source → options of `d2v prepare SOURCE`
    tokenizer: TokenizerSpec = TokenizerSpec()
    shards: dict[str, ShardSpec] = {}  # 'DATASET/NAME' → spec, for names that are not a plain split
    pretrain: dict[Literal["image", "speech", "text"], dict] = {}  # overrides of the typed pretraining config
    finetune: dict[str, dict] = {}  # task → overrides of the typed fine-tuning config
    # fine-tuning task → overrides of its raw-feature baseline ({}: the defaults), scored beside pretrained and scratch
    baselines: dict[str, dict] = {}
    # a word n-gram LM for CTC beam search: speech tasks are scored greedily and with it (wer_lm, cer_lm)
    lm: LanguageModelConfig | None = None
    resources: dict[str, Resources] = {}

    @model_validator(mode="after")
    def _known_names(self):
        for name, options in self.sources.items():
            if name not in SOURCES:
                raise ValueError(f"sources.{name}: unknown source; expected one of {sorted(SOURCES)}")
        for task in self.finetune:
            if task not in TASKS:
                raise ValueError(f"finetune.{task}: unknown task; expected one of {sorted(TASKS)}")
        for task in self.baselines:
            if task not in self.finetune:
                raise ValueError(f"baselines.{task}: not a fine-tuning task of this profile; a baseline is scored "
                                 f"beside one of {sorted(self.finetune)}")
        for kind in self.resources:
            if kind not in STAGE_KINDS:
                raise ValueError(f"resources.{kind}: unknown stage kind; expected one of {list(STAGE_KINDS)}")
        for key in self.shards:
            if key.count("/") not in (1, 2):
                raise ValueError(f"shards.{key}: expected DATASET/NAME (DATASET may be SOURCE/PART, e.g. glue/cola)")
        return self

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def raw(self) -> Path:
        return Path(self.data_root) / "raw"

    def shard_dir(self, key: str) -> Path:
        return Path(self.data_root) / "shards" / key

    @property
    def spm_model(self) -> Path:
        return Path(self.data_root) / "tokenizer" / "spm.model"

    @property
    def letters(self) -> Path:
        return Path(self.data_root) / "tokenizer" / "letters.json"

    @property
    def lm_dir(self) -> Path:
        return Path(self.data_root) / "lm"

    def pretrain_dir(self, modality: str, stage: int | None = None) -> Path:
        """A modality's pretraining run: its final stage (what fine-tuning reads), or `stage` 1 of two."""
        final = stage is None or stage == self.pretrain_stages(modality)[-1]
        return Path(self.runs) / "pretrain" / (modality if final else f"{modality}-stage{stage}")

    def pretrain_stages(self, modality: str) -> tuple[int, ...]:
        return (1, 2) if SECOND_STAGE in self.pretrain[modality] else (1,)

    def finetune_dir(self, task: str, init: str, seed: int) -> Path:
        return Path(self.runs) / "finetune" / task / f"{init}-s{seed}"

    def eval_dir(self, task: str, init: str, seed: int) -> Path:
        return Path(self.results) / task / f"{init}-s{seed}"

    # ---------------------------------------------------------------------------------------------- stages
    def resources_for(self, kind: str) -> Resources:
        return self.resources.get(kind, Resources())

    def shard_spec(self, key: str) -> ShardSpec:
        if key in self.shards:
            spec = self.shards[key]
        else:
            split, _, subset = key.rsplit("/", 1)[1].partition("-")
            spec = ShardSpec(split=split, subset=subset or None)
        if self.shard_limit is not None:
            spec = spec.model_copy(update={"limit": min(spec.limit or self.shard_limit, self.shard_limit)})
        return spec

    def pretrain_config(self, modality: str, stage: int | None = None) -> PretrainConfig:
        """The profile's overrides on the recipe defaults; `data.shards` is DATASET/SPLIT under the data root. With a
        second stage, stage 1 is the overrides without it, and the final stage those overrides under the second
        stage's, starting from stage 1's final.pt."""
        stages = self.pretrain_stages(modality)
        if stage is not None and stage not in stages:
            raise ConfigError(f"pretrain.{modality}: no stage {stage}; it has {list(stages)} (a second stage is "
                              f"pretrain.{modality}.{SECOND_STAGE})")
        first = {k: v for k, v in self.pretrain[modality].items() if k != SECOND_STAGE}
        overrides = {"objective": self.objective, **self._log_every, **first}
        key = overrides.get("data", {}).get("shards")
        if key is None:
            raise ConfigError(f"pretrain.{modality}.data.shards: missing (expected DATASET/SPLIT)")
        overrides = merge(overrides, {"data": {"shards": str(self.shard_dir(key))}})
        if len(stages) == 2 and stage != 1:
            second = self.pretrain[modality][SECOND_STAGE] or {}
            fixed = [k for k in FIXED_IN_SECOND_STAGE if k in second] + (["data.shards"] if "shards" in
                                                                          second.get("data", {}) else [])
            if fixed:
                raise ConfigError(f"pretrain.{modality}.{SECOND_STAGE}: sets {fixed}; the second stage continues the "
                                  "first stage's encoder on its data")
            overrides = merge(overrides, {**second, "init_from": str(self.pretrain_dir(modality, 1) / "final.pt")})
        return pretrain_config(modality, overrides)

    def objective_of(self, modality: str) -> str:
        return self.pretrain.get(modality, {}).get("objective", self.objective)

    def pretrain_corpus(self, modality: str) -> str:
        return self.pretrain[modality]["data"]["shards"]

    def finetune_config(self, task: str, init: str = "pretrained", seed: int = 0) -> FinetuneConfig:
        modality = TASKS[task].modality
        fixed = {"init": init, "seed": seed, "data_root": self.data_root, "tokenizer": str(self.spm_model),
                 "letters": str(self.letters), "objective": self.objective_of(modality)}
        if modality in self.pretrain:  # pretrained and scratch runs are the pretraining encoder's architecture
            fixed["preset"] = self._pretrain_preset(task, modality)
        if init == "pretrained":
            fixed["pretrained"] = str(self.pretrain_dir(modality) / "final.pt")
        return finetune_config(task, merge({**self._log_every, **self.finetune[task]}, fixed))

    @property
    def _log_every(self) -> dict:
        return {} if self.log_every is None else {"log_every": self.log_every}

    def _pretrain_preset(self, task: str, modality: str) -> str:
        """The pretraining encoder's preset, which the task's own `preset` (optional) must repeat: a mismatch would
        otherwise surface only when fine-tuning loads the pretrained encoder, after pretraining has run."""
        preset, own = self.pretrain_config(modality).preset, self.finetune[task].get("preset")
        if own is not None and own != preset:
            raise ValueError(f"preset {own!r}, but pretrain.{modality} builds {preset!r}; fine-tuning uses the "
                             f"pretrained encoder's preset (drop the key or repeat it)")
        return preset

    def baseline_config(self, task: str) -> BaselineConfig:
        fixed = {"data_root": self.data_root, "tokenizer": str(self.spm_model), "letters": str(self.letters),
                 "seed": self.seeds[0]}
        return baseline_config(task, merge(self.baselines[task], fixed))

    def task_shards(self, task: str) -> list[str]:
        spec = TASKS[task]
        return [spec.shard_key(split) for split in spec.splits]

    def extra_tests(self, task: str) -> list[str]:
        """The task's extra test sets whose source this profile prepares (real speech in the embedded profile)."""
        return [key for key in TASKS[task].extra_tests if key.rsplit("/", 1)[0] in self.sources]

    @cached_property
    def shard_keys(self) -> list[str]:
        keys = [self.pretrain_corpus(m) for m in self.pretrain]
        for task in self.finetune:
            keys += self.task_shards(task) + self.extra_tests(task)
        return list(dict.fromkeys(keys))


class Params(StrictModel):
    profile: str
    profiles: dict[str, Profile]

    @model_validator(mode="after")
    def _active_profile_exists(self):
        if self.profile not in self.profiles:
            raise ValueError(f"profile: {self.profile!r} is not one of {sorted(self.profiles)}")
        return self

    @property
    def active(self) -> Profile:
        return self.profiles[self.profile]


def check_profile(name: str, profile: Profile) -> None:
    """Build every config a stage will build, and check the stage graph is closed (inputs have producers)."""
    where = f"profiles.{name}"
    for source, options in profile.sources.items():
        SOURCES[source].options(options, f"{where}.sources.{source}")
    for modality in profile.pretrain:
        for stage in profile.pretrain_stages(modality):
            _checked(lambda: profile.pretrain_config(modality, stage), f"{where}.pretrain.{modality}")
    for task in profile.finetune:
        modality = TASKS[task].modality
        if "pretrained" in profile.inits and modality not in profile.pretrain:
            raise ConfigError(f"{where}.finetune.{task}: init 'pretrained' needs {where}.pretrain.{modality}")
        for init in profile.inits:
            _checked(lambda: profile.finetune_config(task, init, profile.seeds[0]), f"{where}.finetune.{task}")
    for task in profile.baselines:
        _checked(lambda: profile.baseline_config(task), f"{where}.baselines.{task}")
    for key in profile.shard_keys:
        source = key.split("/")[0]
        if source not in profile.sources:
            raise ConfigError(f"{where}.sources: shard set {key} needs source {source!r}, which is not prepared")
        dataset, name = key.rsplit("/", 1)
        named = "" if key in profile.shards else f" (no entry: split[-subset] read from {name!r})"
        spec = profile.shard_spec(key)
        _require_declared(f"{where}.shards.{key}{named}", profile, source, dataset, "splits", spec.split.split("+"))
        if spec.subset is not None:
            _require_declared(f"{where}.shards.{key}{named}", profile, source, dataset, "subsets", [spec.subset])
    needs_spm = "text" in profile.pretrain or any(TASKS[t].modality == "text" for t in profile.finetune)
    needs_letters = any(TASKS[t].kind == "ctc" for t in profile.finetune)
    for needed, field in ((needs_spm, "corpus"), (needs_letters, "letters")):
        source = getattr(profile.tokenizer, field)
        if needed and source is None:
            raise ConfigError(f"{where}.tokenizer.{field}: required by the profile's text/speech stages")
        if source is not None and source not in profile.sources:
            raise ConfigError(f"{where}.tokenizer.{field}: source {source!r} is not in {where}.sources")
    tok = profile.tokenizer
    if tok.corpus is not None:  # SentencePiece trains on the corpus's pretraining split
        _require_declared(f"{where}.tokenizer.corpus", profile, tok.corpus, tok.corpus, "splits", [PRETRAIN_SPLIT])
    if tok.letters is not None:
        _require_declared(f"{where}.tokenizer.letters_split", profile, tok.letters, tok.letters, "splits",
                          [tok.letters_split])
    if profile.lm is not None:
        if not needs_letters:
            raise ConfigError(f"{where}.lm: a language model decodes CTC tasks, and the profile fine-tunes none")
        if (corpus := profile.lm.corpus) is not None:
            if corpus not in profile.sources:
                raise ConfigError(f"{where}.lm.corpus: source {corpus!r} is not in {where}.sources")
            _require_declared(f"{where}.lm.corpus", profile, corpus, corpus, "splits", [LM_SPLIT])


def _require_declared(where: str, profile: Profile, source: str, dataset: str, kind: Literal["splits", "subsets"],
                      wanted: list[str]) -> None:
    """Splits (or subset tags) a stage reads must be ones the source writes for `dataset`: caught here, not after
    hours of downloads."""
    if source not in SOURCES:
        raise ConfigError(f"{where}: no source {source!r}; `d2v prepare` knows {sorted(SOURCES)}")
    declared = SOURCES[source].declared(kind, profile.sources.get(source) or {}, dataset)
    noun, verb = {"splits": ("split", "writes"), "subsets": ("subset", "tags")}[kind]
    for name in wanted:
        if name not in declared:
            raise ConfigError(f"{where}: {noun} {name!r} is not one that {dataset} {verb} "
                              f"({', '.join(sorted(declared)) or f'none under the options of sources.{source}'})")


def _checked(build, where: str):
    try:
        return build()
    except ConfigError as err:
        raise ConfigError(str(err).replace("invalid configuration:", f"invalid configuration in {where}:")) from None
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_params(data: dict, where: str = "params") -> Params:
    params = validate(Params, data, where)
    for name, profile in params.profiles.items():
        check_profile(name, profile)
    return params


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """params.yaml as written, unvalidated (the stage table asks it which keys exist, for DVC)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no params file (expected a YAML with 'profile' and 'profiles')")
    with path.open() as f:
        data = load_yaml(f, str(path))  # from the file, so that the error marks name it
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'profile' and 'profiles', got {type(data).__name__}")
    return data


def load_params(path: str | Path = PARAMS_FILE, profile: str | None = None) -> Params:
    """Read and validate params.yaml; `profile` overrides the active one (e.g. `--config profile=smoke`)."""
    data = read_params(path)
    if profile is not None:
        data = {**data, "profile": profile}
    return parse_params(data, str(path))
