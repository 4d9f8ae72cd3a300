"""The pipeline layer: params validation, one stage table behind Snakemake and DVC, conda env ↔ lock file, the
report and its cross-commit comparison, stale-checkpoint handling, and the smoke profile end to end."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from d2v.config import ConfigError
from d2v.pipeline.params import load_params, parse_params
from d2v.pipeline.report import collect, compare, stage_times, summarize, write_report
from d2v.pipeline.stages import RECIPE_FILE, StageTable, dvc_yaml
from d2v.train import recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def run(cmd: list[str], cwd: Path = ROOT, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**ENV, "D2V_INDEX_CACHE": os.environ["D2V_INDEX_CACHE"]}  # conftest's, set after ENV was read
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------------------------------ params

def test_every_profile_validates_and_builds_a_closed_graph():
    params = load_params(ROOT / "params.yaml")
    assert params.profile == "embedded" and set(params.profiles) == {
        "embedded", "smoke", "paper", "paper-v2", "paper-v2-large", "paper-large", "paper-v2-huge", "paper-audioset"}
    for name in params.profiles:
        table = StageTable(params, name, raw=RAW)
        produced = {o for s in table for o in s.outs}
        needed = {d for s in table for d in s.deps}
        assert needed <= produced, f"{name}: inputs nobody produces: {sorted(needed - produced)[:5]}"
        assert len({s.name for s in table}) == len(table.stages)
    embedded = StageTable(params, "embedded", raw=RAW)
    assert {s.kind for s in embedded} == {"prepare", "tokenizer", "lm", "shard", "pretrain", "finetune", "evaluate",
                                          "baseline", "report"}
    # the speech evaluations decode with the language model, and rerun when it changes; the others do not read it
    (lm_stage,) = embedded.of_kind("lm")
    assert lm_stage.deps == ("data/raw/mini_librispeech_lm/manifest.csv", "data/tokenizer/letters.json")
    for stage in embedded.of_kind("evaluate"):
        speech = stage.name.startswith("evaluate_speech")
        assert ("--lm data/lm" in stage.cmd) == speech and (set(lm_stage.outs) <= set(stage.deps)) == speech
    paper = StageTable(params, "paper", raw=RAW)
    (paper_lm,) = paper.of_kind("lm")  # LibriSpeech's own 4-gram: nothing to estimate, so no lm.arpa of ours
    assert paper_lm.deps == ("data/paper/tokenizer/letters.json",) and "data/paper/lm/lm.arpa" not in paper_lm.outs
    # its beam search runs in as many processes as the evaluation job has threads (the embedded job has one)
    paper_speech = [s for s in paper.of_kind("evaluate") if "--lm" in s.cmd]
    assert paper_speech and all(s.cmd.endswith("--lm data/paper/lm --decode-workers 8") for s in paper_speech)
    assert not any("--decode-workers" in s.cmd for s in embedded)
    assert len(embedded.of_kind("finetune")) == 2 * len(params.profiles["embedded"].finetune)  # + scratch
    baselines = {s.outs[0].split("/")[2]: s for s in embedded.of_kind("baseline")}
    assert set(baselines) == set(params.profiles["embedded"].finetune)  # one raw-feature baseline per task
    assert set(baselines["speech_1h"].outs) <= set(embedded.of_kind("report")[0].deps)
    assert "--extra real_speech/test_cards" in baselines["speech_1h"].cmd
    assert "--lm data/lm" in baselines["speech_1h"].cmd and set(lm_stage.outs) <= set(baselines["speech_1h"].deps)
    assert "--lm" not in baselines["rt_polarity"].cmd


def _broken(path: list, value):
    data = copy.deepcopy(RAW)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("path,value,expected", [
    (["profile"], "nope", "profile: 'nope' is not one of"),
    (["profiles", "smoke", "seeds"], "zero", "profiles.smoke.seeds"),
    (["profiles", "smoke", "pretrain", "image", "optim"], {"lr": -1.0}, "profiles.smoke.pretrain.image"),
    (["profiles", "smoke", "pretrain", "image", "optim"], {"lr": -1.0}, "optim.lr: Input should be greater than 0"),
    (["profiles", "embedded", "finetune", "lee_sts", "steps"], "many", "finetune.lee_sts"),
    (["profiles", "embedded", "sources", "imagenet_typo"], {}, "sources.imagenet_typo: unknown source"),
    (["profiles", "embedded", "sources", "fashion_mnist"], {"limt": 5}, "unknown option(s) ['limt']"),
    # each option is checked against the type `prepare` declares, before any job starts
    (["profiles", "smoke", "sources", "fashion_mnist", "limit"], "a few",
     "profiles.smoke.sources.fashion_mnist.limit: Input should be a valid integer"),
    (["profiles", "smoke", "sources", "fashion_mnist", "limit"], 0,
     "profiles.smoke.sources.fashion_mnist.limit: Input should be greater than 0"),
    # one split written as a string would be read as a list of its letters
    (["profiles", "paper", "sources", "librispeech"], {"splits": "dev-clean"},
     "profiles.paper.sources.librispeech.splits: 'str' instances are not allowed as a Sequence value"),
    (["profiles", "paper", "sources", "text_files"], {"workers": 8},
     "profiles.paper.sources.text_files.paths: Field required"),
    (["profiles", "embedded", "finetune", "no_such_task"], {}, "finetune.no_such_task: unknown task"),
    (["profiles", "embedded", "resources", "pretrain", "threads"], 0, "resources.pretrain.threads"),
    (["profiles", "smoke", "sources", "mini_librispeech", "cfg", "dev"], -1, "sources.mini_librispeech.cfg.dev"),
    (["profiles", "embedded", "pretrain", "image", "data"], {"batch_size": 8}, "data.shards: missing"),
    (["profiles", "embedded", "baselines", "glue_cola"], {}, "baselines.glue_cola: not a fine-tuning task"),
    (["profiles", "embedded", "baselines", "rt_polarity"], {"strengths": []}, "baselines.rt_polarity.strengths"),
    (["profiles", "embedded", "baselines", "speech_1h"], {"ctc_epoch": 3}, "baselines.speech_1h.ctc_epoch"),
    (["profiles", "embedded", "shards", "real_speech/test_asterisk"], {"split": "test_asterisk", "sample_seed": 0},
     "shards.real_speech/test_asterisk: Value error, sample_seed needs a limit"),
    (["profiles", "embedded", "finetune", "speech_1h", "preset"], "embedded",
     "profiles.embedded.finetune.speech_1h: preset 'embedded', but pretrain.speech builds 'embedded-fbank'"),
    # shard sets, the tokenizer and the LM read splits their source writes (what the paper profiles got wrong for
    # LibriSpeech: 'dev-clean' where the manifest says 'dev_clean')
    (["profiles", "paper", "shards", "librispeech/dev-clean"], {"split": "dev-clean"},
     "profiles.paper.shards.librispeech/dev-clean: split 'dev-clean' is not one that librispeech writes "
     "(dev_clean, dev_other, librilight_10h, test_clean, test_other, train_clean_100"),
    (["profiles", "paper", "shards", "librispeech/train-960"], {"split": "train_clean_100+train_other_960"},
     "split 'train_other_960' is not one that librispeech writes"),
    (["profiles", "paper", "sources", "librispeech"], {"librilight": False},
     "profiles.paper.shards.librispeech/librilight_10h-10min (no entry: split[-subset] read from "
     "'librilight_10h-10min'): split 'librilight_10h' is not one that librispeech writes"),
    (["profiles", "paper", "sources", "glue"], {"tasks": ["cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte"]},
     "profiles.paper.shards.glue/mnli/train (no entry: split[-subset] read from 'train'): split 'train' is not one "
     "that glue/mnli writes (none under the options of sources.glue)"),
    (["profiles", "embedded", "shards", "fashion_mnist/train_6k"], {"split": "training", "limit": 6000},
     "split 'training' is not one that fashion_mnist writes (test, train)"),
    (["profiles", "embedded", "tokenizer", "letters_split"], "train_2h",
     "profiles.embedded.tokenizer.letters_split: split 'train_2h' is not one that mini_librispeech writes"),
    (["profiles", "embedded", "lm", "corpus"], "mini_librispeech",
     "profiles.embedded.lm.corpus: split 'lm' is not one that mini_librispeech writes"),
    (["profiles", "smoke", "shards", "mini_librispeech/train_1h-10min"], {"split": "train_1h", "subset": "10mn"},
     "profiles.smoke.shards.mini_librispeech/train_1h-10min: subset '10mn' is not one that mini_librispeech tags "
     "(10min, 1h)"),
])
def test_bad_params_are_rejected_naming_the_key(path, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(_broken(path, value))
    assert expected in str(err.value)


def test_pretrained_init_needs_the_modality_pretrained():
    data = copy.deepcopy(RAW)
    del data["profiles"]["smoke"]["pretrain"]["speech"]
    with pytest.raises(ConfigError, match=r"profiles.smoke.finetune.speech_10min: init 'pretrained' needs"):
        parse_params(data)
    data["profiles"]["smoke"]["inits"] = ["scratch"]  # a scratch-only profile needs no pretraining
    parse_params(data)


def test_invalid_params_stop_snakemake_and_the_cli_before_any_work(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_broken(["profiles", "embedded", "pretrain", "text", "steps"], -5)))
    out = run([str(BIN / "d2v"), "pipeline", "stages", "--params", str(bad)], check=False)
    assert out.returncode == 2 and "profiles.embedded.pretrain.text" in out.stderr and "steps" in out.stderr
    shutil.copy(ROOT / "Snakefile", tmp_path)
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1"], cwd=tmp_path, check=False)
    assert out.returncode != 0 and "profiles.embedded.pretrain.text" in out.stdout + out.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------ one stage graph

def snakemake_jobs(profile: str) -> dict[str, tuple[set, set, str]]:
    """rule → (inputs, outputs, command) from a forced dry run: what Snakemake would actually execute."""
    out = run([str(BIN / "snakemake"), "-n", "-p", "-F", "--cores", "1", "--config", f"profile={profile}"]).stdout
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", out):
        head = re.match(r"rule (\w+):", block)
        if not head or head.group(1) == "all":
            continue
        field = {k: v for k, v in re.findall(r"^    (input|output): (.*)$", block, re.M)}
        cmd = re.search(r"^Shell command: (.*) > logs/\S+ 2>&1$", block, re.M)
        jobs[head.group(1)] = (set(field.get("input", "").split(", ")) - {""}, set(field["output"].split(", ")),
                               cmd.group(1) if cmd else None)
    return jobs


def dvc_stages(spec: dict) -> dict[str, tuple[set, set, str]]:
    def paths(entries):
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries}

    return {name: (set(s.get("deps", [])), paths(s.get("outs", []) + s.get("metrics", []) + s.get("plots", [])),
                   s["cmd"]) for name, s in spec["stages"].items()}


def test_committed_dvc_yaml_is_the_generated_one():
    out = run([str(BIN / "d2v"), "pipeline", "check"], check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("profile", ["embedded", "smoke", "paper", "paper-v2", "paper-v2-large", "paper-large",
                                     "paper-v2-huge"])
def test_snakemake_and_dvc_run_the_same_stages(profile):
    if profile == "embedded":
        spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())  # the committed file itself
    else:
        spec = dvc_yaml(StageTable(load_params(ROOT / "params.yaml", profile), raw=RAW))
    assert snakemake_jobs(profile) == dvc_stages(spec)


def test_a_recipe_bump_reruns_exactly_the_stages_of_its_kind(monkeypatch):
    """Both front doors track the code's recipe versions as params: Snakemake through a job's settings, DVC
    through the constants of d2v/train/recipe.py, which it must be able to read."""
    table = StageTable(load_params(ROOT / "params.yaml", "embedded"), raw=RAW)
    for kind in recipe.KINDS:
        before = {s.name: table.settings(s) for s in table}
        with monkeypatch.context() as m:
            m.setattr(recipe, kind.upper(), getattr(recipe, kind.upper()) + 1)
            changed = {s.name for s in table if table.settings(s) != before[s.name]}
        assert changed == {s.name for s in table.of_kind(kind)} and changed
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for s in table:
        tracked = [p for p in spec[s.name].get("params", []) if isinstance(p, dict)]
        assert tracked == ([{RECIPE_FILE: [s.kind.upper()]}] if s.kind in recipe.KINDS else []), s.name
    from dvc.utils.serialize import load_py  # DVC's own reader of Python params files

    versions = {recipe.constant(kind): recipe.current(kind) for kind in recipe.KINDS}
    assert len(versions) == 4 and versions.items() <= load_py(ROOT / RECIPE_FILE).items()


def test_dvc_sees_the_pipeline_without_network_or_remote():
    out = run([str(BIN / "dvc"), "dag", "--md"])
    assert "prepare_fashion_mnist" in out.stdout and "report" in out.stdout
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()


def test_snakemake_lint_is_clean():
    out = run([str(BIN / "snakemake"), "--lint"])
    assert "Congratulations, your workflow is in a good condition" in out.stdout + out.stderr


def test_conda_env_pins_exactly_the_lock_file():
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "d2v.yaml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    lock = [line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(p for p in pip if "==" in p) == sorted(lock)
    assert "-e ../.." in pip
    for name in ("snakemake", "dvc", "torch", "snakemake-executor-plugin-slurm"):
        assert any(line.startswith(name + "==") for line in lock), name


def test_slurm_and_local_profiles_parse():
    slurm = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    local = yaml.safe_load((ROOT / "workflow/profiles/local/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and local["cores"] == "all"
    paper = StageTable(load_params(ROOT / "params.yaml", "paper"), raw=RAW)
    image = next(s for s in paper if s.name == "pretrain_image")
    assert image.resources.gpus == 8 and image.cmd.startswith("torchrun --standalone --nproc_per_node=8 -m d2v.cli")
    fine_tune = next(s for s in paper if s.name.startswith("finetune_imagenet"))
    assert fine_tune.cmd.startswith("torchrun --standalone --nproc_per_node=8 -m d2v.cli finetune imagenet")
    evaluate = next(s for s in paper if s.name.startswith("evaluate_imagenet"))
    assert evaluate.cmd.startswith("d2v evaluate runs/paper/finetune/imagenet")  # resources: 1 GPU
    data = copy.deepcopy(RAW)
    data["profiles"]["paper"]["resources"]["evaluate"]["gpus"] = 4  # the ranks split each test set
    paper4 = StageTable(parse_params({**data, "profile": "paper"}), raw=data)
    evaluate = next(s for s in paper4 if s.name.startswith("evaluate_imagenet"))
    assert evaluate.cmd.startswith("torchrun --standalone --nproc_per_node=4 -m d2v.cli evaluate runs/paper/finetune/")


def test_paper_profile_fine_tunes_every_glue_task_on_its_own_shards():
    paper = {s.name: s for s in StageTable(load_params(ROOT / "params.yaml", "paper"), raw=RAW)}
    glue = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
    prepared = set(paper["prepare_glue"].outs)
    assert {f"data/paper/raw/glue/{t}/manifest.csv" for t in glue} <= prepared  # one manifest per task
    mnli = paper["finetune_glue_mnli_pretrained_s0"]
    assert set(mnli.deps) >= {"data/paper/shards/glue/mnli/train/index.json",
                              "data/paper/shards/glue/mnli/dev_matched/index.json", "runs/paper/pretrain/text/final.pt"}
    shard = paper["shard_glue_mnli_dev_mismatched"]
    assert shard.cmd.startswith("d2v shard glue/mnli --split dev_mismatched")
    assert shard.deps == ("data/paper/raw/glue/mnli/manifest.csv",)
    evaluated = {o for s in paper.values() if s.kind == "evaluate" for o in s.outs}
    assert {f"results/paper/glue_{t}/scratch-s0/glue_{t}-dev.json" for t in glue if t != "mnli"} <= evaluated
    cfg = load_params(ROOT / "params.yaml", "paper").active.finetune_config("glue_rte")
    gpus = load_params(ROOT / "params.yaml", "paper").active.resources_for("finetune").gpus
    assert (cfg.optim.lr, cfg.batch_size * gpus, cfg.steps, cfg.optim.schedule, cfg.max_tokens) == \
        (2e-5, 16, 2036, "linear", 512)  # RoBERTa's batch of 16, over the ranks


def test_paper_profiles_hold_the_published_recipes():
    """paper-v2 against spec §8.5 (data2vec 2.0 Base pretraining) and §9 (fine-tuning); both paper profiles against
    §5.2 (ImageNet statistics and crops) and §9.2 (wav2vec 2.0's CTC masks and fine-tuning dropouts)."""
    v1, v2 = (load_params(ROOT / "params.yaml", name).active for name in ("paper", "paper-v2"))
    gpus = v2.resources_for("pretrain").gpus
    image, speech, text = (v2.pretrain_config(m) for m in ("image", "speech", "text"))
    assert (image.objective, image.preset, image.clones, image.steps, image.data.batch_size * gpus) == \
        ("v2", "base", 16, 375300, 256)
    assert (image.optim.lr, image.optim.betas, image.optim.eps, image.optim.weight_decay, image.optim.clip_norm,
            image.optim.warmup_steps) == (1e-3, (0.9, 0.95), 1e-8, 0.05, 4.0, 50040)
    assert (image.ema.tau_start, image.ema.tau_end, image.ema.tau_steps) == (0.9998, 0.99999, 100_000)
    assert (image.data.image.min_scale, image.data.image.color_jitter) == (0.2, 0.0)
    assert (speech.clones, speech.steps, speech.optim.lr, speech.optim.betas, speech.optim.eps,
            speech.optim.clip_norm, speech.optim.warmup_steps) == (8, 400_000, 7.5e-4, (0.9, 0.98), 1e-6, None, 8000)
    assert (speech.ema.tau_start, speech.ema.tau_end, speech.ema.tau_steps) == (0.999, 0.99999, 75_000)
    assert (text.clones, text.steps, text.optim.lr, text.optim.clip_norm, text.optim.warmup_steps,
            text.data.batch_size * gpus, text.data.block_tokens) == (8, 1_000_000, 2e-4, 1.0, 4000, 64, 512)
    assert (text.ema.tau_start, text.ema.tau_end, text.ema.tau_steps) == (0.9999, 0.99999, 100_000)
    ft = v2.finetune_config("imagenet")
    assert (ft.objective, ft.optim.lr, ft.optim.betas, ft.steps, ft.batch_size * gpus, ft.optim.warmup_steps,
            ft.layer_decay, ft.regularization.drop_path, ft.mixup, ft.mix_prob) == \
        ("v2", 1e-3, (0.9, 0.95), 250_200, 512, 16_000, 0.65, 0.1, 0.7, 0.9)
    assert [v2.finetune_config(f"glue_{t}").optim.lr for t in ("rte", "stsb", "mnli")] == [2e-5, 4e-5, 2e-5]
    assert v1.finetune_config("imagenet").regularization.drop_path == 0.2  # BEiT's fine-tuning rate for ViT-B
    assert v1.pretrain_config("image").data.image.min_scale == 0.08
    image, speech, text = (v1.pretrain_config(m) for m in ("image", "speech", "text"))  # spec §4, §7
    assert (image.optim.eps, image.optim.final_lr_scale * image.optim.lr, image.optim.clip_norm) == \
        (1e-8, pytest.approx(1e-5), 3.0)
    assert image.ema.tau_start == image.ema.tau_end == 0.9998  # BEiT's constant EMA, not a ramp
    assert (speech.optim.clip_norm, text.optim.clip_norm) == (None, 5.0)
    minutes = gpus * speech.accum_steps * speech.data.batch_size * 12.2 / 60  # LibriSpeech's mean crop
    assert 55 < minutes < 65  # ≈ 63 min of audio per update
    for profile in (v1, v2):
        assert profile.pretrain_config("image").data.image.mean == (0.485, 0.456, 0.406)
        ctc = profile.finetune_config("librispeech_1h")
        assert (ctc.optim.betas, ctc.optim.eps) == ((0.9, 0.98), 1e-8)
        assert 25 < gpus * ctc.batch_size * 13 / 60 < 30  # ≈ 27 min of audio per update (2 × 4 × 3.2M samples)
        assert (ctc.ctc_masks.time_prob, ctc.ctc_masks.time_length, ctc.ctc_masks.channel_prob,
                ctc.ctc_masks.channel_length) == (0.65, 10, 0.25, 64)
        assert ctc.regularization.overrides() == {"dropout": 0.0, "attn_dropout": 0.0, "activation_dropout": 0.1,
                                                  "layerdrop": 0.1}
        ten_hours = profile.finetune_config("librispeech_10h")
        assert (ten_hours.ctc_masks.channel_prob, ten_hours.regularization.layerdrop) == (0.5, 0.05)
    assert v2.data_root == v1.data_root and v2.runs != v1.runs  # one download and shard set, separate runs
    large = load_params(ROOT / "params.yaml", "paper-v2-large").active
    for profile in (v1, v2, large):  # pretraining seeks to where a resume continues
        assert [profile.pretrain_config(m).stream_resume for m in ("image", "speech", "text")] == ["seek"] * 3
        assert [profile.finetune_config(t).stream_resume for t in ("imagenet", "librispeech_1h", "glue_rte")] == \
            ["seek", "replay", "replay"]


def test_a_profiles_log_every_reaches_every_run_that_does_not_set_its_own():
    """The GPU profiles log as fairseq's log_interval (200 updates); the embedded one keeps the configs' defaults
    (pretraining 10, fine-tuning every step), and a run's own log_every wins over the profile's."""
    params = {name: load_params(ROOT / "params.yaml", name).active
              for name in ("embedded", "paper", "paper-v2-large", "paper-audioset")}
    for name in ("paper", "paper-v2-large"):
        profile = params[name]
        assert {profile.pretrain_config(m).log_every for m in profile.pretrain} == {200}, name
        assert {profile.finetune_config(t).log_every for t in profile.finetune} == {200}, name
    audioset = params["paper-audioset"]
    assert (audioset.pretrain_config("speech").log_every, audioset.finetune_config("audioset").log_every) == (200, 200)
    embedded = params["embedded"]
    assert embedded.log_every is None
    assert (embedded.pretrain_config("text").log_every, embedded.finetune_config("rt_polarity").log_every) == (10, 1)
    own = embedded.model_copy(update={
        "log_every": 50, "pretrain": {**embedded.pretrain, "text": {**embedded.pretrain["text"], "log_every": 3}},
        "finetune": {**embedded.finetune, "rt_polarity": {**embedded.finetune["rt_polarity"], "log_every": 7}}})
    assert [own.pretrain_config(m).log_every for m in ("image", "text")] == [50, 3]
    assert [own.finetune_config(t).log_every for t in ("fashion_mnist", "rt_polarity")] == [50, 7]


def test_the_paper_profiles_fine_tune_on_100_and_960_hours_as_wav2vec2s_yamls():
    """Spec §9.2's last two rows, the 100 h and 960 h columns of [P1 Tab.2]: Base 80k updates at 3e-5 (masks 0.65 /
    0.5) and 320k at 1e-4 (0.5 / 0.1), Large 80k and 320k at 3e-5 (0.5 / 0.5, 0.5 / 0.25) with 10k frozen updates;
    on LibriSpeech's train-clean-100 and all 960 h, about 27 min of audio per update (Large 960 h: 32 min)."""
    from d2v.train.tasks import TASKS

    rows = {("paper", "100h"): (80_000, 3e-5, 0.65, 0.5, 0), ("paper", "960h"): (320_000, 1e-4, 0.5, 0.1, 0),
            ("paper-v2", "100h"): (80_000, 3e-5, 0.65, 0.5, 0), ("paper-v2", "960h"): (320_000, 1e-4, 0.5, 0.1, 0),
            ("paper-v2-large", "100h"): (80_000, 3e-5, 0.5, 0.5, 10_000),
            ("paper-v2-large", "960h"): (320_000, 3e-5, 0.5, 0.25, 10_000)}
    for (name, hours), (steps, lr, time_p, channel_p, frozen) in rows.items():
        profile = load_params(ROOT / "params.yaml", name).active
        ft = profile.finetune_config(f"librispeech_{hours}")
        assert (ft.steps, ft.optim.lr, ft.ctc_masks.time_prob, ft.ctc_masks.channel_prob, ft.freeze_encoder_steps,
                ft.optim.schedule, ft.regularization.layerdrop) == (steps, lr, time_p, channel_p, frozen, "tri_stage",
                                                                    0.1), (name, hours)
        minutes = profile.resources_for("finetune").gpus * ft.batch_size * ft.accum_steps * 13 / 60
        assert 25 < minutes < (33 if (name, hours) == ("paper-v2-large", "960h") else 30), (name, hours, minutes)
        assert profile.shard_spec(f"librispeech/{TASKS[f'librispeech_{hours}'].train}").split == \
            {"100h": "train_clean_100", "960h": "train_clean_100+train_clean_360+train_other_500"}[hours]


def test_the_audioset_profile_holds_data2vecs_audioset_recipe():
    """Spec §2.1 and fairseq's audioset.yaml: the DeepNorm preset with K=12 and layer-normalised targets, 200k
    updates of about 85 min of 10 s clips (24 GPUs x 3.4M samples), LR 5e-4 cosine after 10k; fine-tuning 13k updates
    of 21.3 min, head LR 2e-4 and encoder 3e-5, mixup p 0.7, time masks 0.45 of 4, the CNN frozen."""
    from d2v.modalities.registry import build_modality

    profile = load_params(ROOT / "params.yaml", "paper-audioset").active
    gpus = profile.resources_for("pretrain").gpus
    pre = profile.pretrain_config("speech")
    assert (pre.preset, pre.objective, pre.steps, pre.optim.lr, pre.optim.schedule, pre.optim.warmup_steps,
            pre.optim.weight_decay, pre.optim.clip_norm) == ("audioset", "v1", 200_000, 5e-4, "cosine", 10_000, 0.01,
                                                               None)
    samples = gpus * pre.accum_steps * pre.data.batch_size * 160_000  # AudioSet's clips are 10 s
    assert abs(samples / (24 * 3.4e6) - 1) < 0.02
    modality, recipe = build_modality("speech", pre.preset)
    assert modality.encoder.cfg.deepnorm and (recipe.top_k, recipe.final_norm) == (12, "layer")
    ft = profile.finetune_config("audioset")
    assert (ft.steps, ft.optim.lr, ft.optim.lr * ft.encoder_lr_scale, ft.mix_prob, ft.source_mixup, ft.train_cnn) == \
        (13_000, 2e-4, pytest.approx(3e-5), 0.7, 0.5, False)
    assert (ft.tagging_masks.time_prob, ft.tagging_masks.time_length, ft.tagging_masks.channel_prob) == (0.45, 4, 0.0)
    assert abs(gpus * ft.batch_size * 10 / 60 / 21.3 - 1) < 0.02  # 21.3 min of audio per update
    assert profile.shard_keys and set(profile.sources) == {"audioset"} and profile.tokenizer.letters is None


def v1_sources() -> set[str]:
    return set(load_params(ROOT / "params.yaml", "paper").active.sources)


def test_the_large_profile_holds_the_released_large_recipes():
    """paper-v2-large against spec §8.5 (large_{images,audio,text}_only_task: the updates per run and the samples per
    update, on 8 GPUs) and §9 (ImageNet L fine-tuning, the vox_*.yaml CTC table). Clones, K, masks, decoders and τ
    come from the Large recipe of the registry (test_v2), which an unset field keeps: the embedded recipe no longer
    fills it."""
    large = load_params(ROOT / "params.yaml", "paper-v2-large").active
    gpus = large.resources_for("pretrain").gpus
    image, speech, text = (large.pretrain_config(m) for m in ("image", "speech", "text"))
    for cfg in (image, speech, text):
        assert (cfg.preset, cfg.objective, cfg.clones, cfg.ema, cfg.top_k) == ("large", "v2", None, None, None)
    per_update = lambda cfg: cfg.data.batch_size * cfg.accum_steps * gpus  # noqa: E731
    assert (per_update(image), image.steps, image.optim.lr, image.optim.warmup_steps, image.optim.clip_norm,
            image.optim.betas) == (128, 375_300, 4e-4, 50_040, 4.0, (0.9, 0.95))
    assert (image.data.image.min_scale, image.data.image.color_jitter) == (0.2, 0.0)
    assert (per_update(speech) * speech.data.audio.max_samples, speech.steps, speech.optim.lr,
            speech.optim.warmup_steps, speech.optim.clip_norm) == (48 * 320_000, 600_000, 4e-4, 10_000, 1.0)
    # the released Large speech model pretrained on Libri-light's 60k h, not LibriSpeech (spec §2.1); the paper
    # profile's sources and shards stay (fine-tuning and evaluation are LibriSpeech's)
    assert speech.data.shards == str(large.shard_dir("librilight/unlab-60k"))
    assert large.shard_spec("librilight/unlab-60k").split == "small+medium+large"
    assert set(large.sources) == {"librilight", *v1_sources()}
    paper = load_params(ROOT / "params.yaml", "paper").active  # only the shard job (cutting 53k h) is resized
    assert [k for k in paper.resources if large.resources_for(k) != paper.resources_for(k)] == ["shard"]
    assert (per_update(text), text.data.block_tokens, text.steps, text.optim.lr, text.optim.warmup_steps,
            text.optim.clip_norm) == (64, 512, 600_000, 1e-4, 4000, 1.0)
    ft = large.finetune_config("imagenet")
    assert (ft.preset, ft.batch_size * gpus, ft.steps, ft.optim.lr, ft.optim.warmup_steps, ft.optim.clip_norm,
            ft.layer_decay, ft.regularization.drop_path, ft.optim.lr * ft.optim.final_lr_scale) == \
        ("large", 512, 125_200, 5e-4, 16_000, 4.0, 0.75, 0.2, pytest.approx(1e-6))
    vox = {"librispeech_10min": (13_000, 1e-4, 0.65, 0.25), "librispeech_1h": (13_000, 3e-4, 0.75, 0.25),
           "librispeech_10h": (20_000, 1e-4, 0.75, 0.25)}
    for task, expected in vox.items():
        ctc = large.finetune_config(task)
        assert (ctc.steps, ctc.optim.lr, ctc.ctc_masks.time_prob, ctc.ctc_masks.channel_prob) == expected, task
        assert (ctc.freeze_encoder_steps, ctc.preset) == (10_000, "large")
        assert 25 < ctc.batch_size * ctc.accum_steps * gpus * 13 / 60 < 30  # ≈ 27 min of audio (4 × 5 × 1.28M)
    assert {large.finetune_config(t).preset for t in large.finetune} == {"large"}


def test_the_huge_profile_holds_the_released_vit_h_recipe():
    """paper-v2-huge against spec §8.5 (huge_images14_only_task: 256 images per update, 500k updates) and §9.1
    (L/H fine-tuning); masks, clones, K and τ are the registry's Huge recipe (test_v2)."""
    huge = load_params(ROOT / "params.yaml", "paper-v2-huge").active
    cfg, gpus = huge.pretrain_config("image"), huge.resources_for("pretrain").gpus
    assert (cfg.preset, cfg.objective, cfg.clones, cfg.ema, cfg.top_k) == ("huge", "v2", None, None, None)
    assert (cfg.data.batch_size * cfg.accum_steps * gpus, cfg.steps, cfg.optim.lr, cfg.optim.warmup_steps,
            cfg.optim.clip_norm, cfg.optim.betas, cfg.data.image.min_scale) == \
        (256, 500_000, 4e-4, 50_040, 4.0, (0.9, 0.95), 0.2)
    ft = huge.finetune_config("imagenet")
    assert (ft.preset, ft.batch_size * ft.accum_steps * gpus, ft.steps, ft.optim.lr, ft.layer_decay,
            ft.regularization.drop_path, ft.optim.lr * ft.optim.final_lr_scale) == \
        ("huge", 512, 125_200, 5e-4, 0.75, 0.2, pytest.approx(1e-6))
    assert set(huge.pretrain) == {"image"} and set(huge.finetune) == {"imagenet"}


def test_the_v1_large_profile_pretrains_vit_l_in_two_stages_as_the_paper_did():
    """paper-large against spec §4, §7 and §9.1: 2 × 800 epochs at 4096 images per update, the second stage from the
    first's final.pt with τ 0.9999 and the schedule again, then the ViT-L fine-tuning, which reads the second."""
    large = load_params(ROOT / "params.yaml", "paper-large").active
    gpus = large.resources_for("pretrain").gpus
    first, second = (large.pretrain_config("image", stage) for stage in (1, 2))
    assert large.pretrain_config("image") == second
    epochs = lambda cfg, steps: steps * cfg.data.batch_size * cfg.accum_steps * gpus / 1_281_167  # noqa: E731
    for cfg in (first, second):
        assert (cfg.preset, cfg.objective, cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.lr * cfg.optim.final_lr_scale,
                cfg.data.batch_size * cfg.accum_steps * gpus) == ("large", "v1", 1e-3, 3.0, pytest.approx(1e-5), 4096)
        assert round(epochs(cfg, cfg.steps)) == 800
    # warm-up: 80 epochs, then 40 in the second stage ([DV] README's two commands)
    assert [round(epochs(cfg, cfg.optim.warmup_steps)) for cfg in (first, second)] == [80, 40]
    assert (first.ema.tau_start, first.ema.tau_end, first.init_from, first.seed) == (0.9998, 0.9998, None, 0)
    assert (second.ema.tau_start, second.ema.tau_end, second.seed) == (0.9999, 0.9999, 1)
    assert second.init_from == str(large.pretrain_dir("image", 1) / "final.pt") != str(large.pretrain_dir("image"))
    ft = large.finetune_config("imagenet")
    assert ft.pretrained == str(large.pretrain_dir("image") / "final.pt")
    assert (ft.preset, ft.batch_size * large.resources_for("finetune").gpus, round(ft.steps * 1024 / 1_281_167),
            ft.optim.lr, ft.regularization.drop_path, ft.optim.weight_decay) == ("large", 1024, 50, 5e-3, 0.25, 0.05)
    table = StageTable(load_params(ROOT / "params.yaml", "paper-large"), raw=RAW)
    stages = {s.name: s for s in table.of_kind("pretrain")}
    assert set(stages) == {"pretrain_image_stage1", "pretrain_image"}
    one, two = stages["pretrain_image_stage1"], stages["pretrain_image"]
    assert " --stage 1 " in one.cmd and "--stage" not in two.cmd and one.outs[0] in two.deps
    # the first stage does not rerun when only the second stage's settings change
    assert "profiles.paper-large.pretrain.image.second_stage" not in one.params
    assert "profiles.paper-large.pretrain.image" in two.params
    assert [s.name for s in table].index("pretrain_image_stage1") < [s.name for s in table].index("pretrain_image")


def test_a_second_stage_continues_the_first_stages_encoder_on_its_data():
    for key, value, named in [("preset", "base", "['preset']"), ("init_from", "x.pt", "['init_from']"),
                              ("data", {"shards": "imagenet/val"}, "['data.shards']")]:
        data = copy.deepcopy(RAW)
        data["profiles"]["paper-large"]["pretrain"]["image"]["second_stage"][key] = value
        with pytest.raises(ConfigError, match=rf"pretrain.image.second_stage: sets \{named}"):
            parse_params(data)
    with pytest.raises(ConfigError, match=r"pretrain.image: no stage 2; it has \[1\]"):
        load_params(ROOT / "params.yaml", "paper").active.pretrain_config("image", 2)


def test_image_statistics_must_match_the_channels():
    """The paper profile once normalised ImageNet with the embedded recipe's one-channel Fashion-MNIST statistics."""
    from d2v.train.config import pretrain_config

    with pytest.raises(ConfigError, match=r"mean \[0.286\] and std \[0.353\] need one value per channel "
                                          r"\(channels: 3\)"):
        pretrain_config("image", {"data": {"image": {"channels": 3}}})


def test_speech_runs_are_also_scored_on_real_speech_where_the_profile_prepares_it():
    embedded = {s.name: s for s in StageTable(load_params(ROOT / "params.yaml", "embedded"), raw=RAW)}
    evaluate = embedded["evaluate_speech_1h_scratch_s0"]
    assert "--extra real_speech/test_asterisk" in evaluate.cmd
    assert "data/shards/real_speech/test_asterisk/index.json" in evaluate.deps
    assert "results/embedded/speech_1h/scratch-s0/speech_1h-real_speech-test_asterisk.json" in evaluate.metrics
    assert not any("real_speech" in d for d in embedded["finetune_speech_1h_scratch_s0"].deps)  # eval only
    assert embedded["shard_real_speech_test_cards"].cmd.startswith("d2v shard real_speech --split test_cards")
    smoke = {s.name: s for s in StageTable(load_params(ROOT / "params.yaml", "smoke"), raw=RAW)}
    assert not any("real_speech" in s.cmd for s in smoke.values())  # CI's profile does not download it


# --------------------------------------------------------------------------------------------------- report

def _result(root: Path, task: str, init: str, seed: int, split: str, degenerate: bool | None = None,
            n: tuple[int, int] | None = None, **metrics):
    path = root / task / f"{init}-s{seed}" / f"{task}-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"task": task, "split": split, "init": init, "seed": seed, "metrics": metrics, "commit": "abc"}
    if degenerate is not None:
        result["predictions"] = {"degenerate": degenerate}
    if n is not None:
        result["n"], result["n_split"] = n
    path.write_text(json.dumps(result))


def test_summary_means_spreads_and_direction(tmp_path):
    for seed, (p, s) in enumerate([(0.80, 0.70), (0.84, 0.72)]):
        _result(tmp_path, "fashion_mnist", "pretrained", seed, "test", accuracy=p)
        _result(tmp_path, "fashion_mnist", "scratch", seed, "test", accuracy=s)
        _result(tmp_path, "speech_1h", "pretrained", seed, "dev_clean", wer=0.5 + seed * 0.1)
        _result(tmp_path, "speech_1h", "scratch", seed, "dev_clean", wer=0.4, cer=0.3)
    summary = summarize(collect(tmp_path)).set_index(["task", "split", "metric"])
    fm = summary.loc[("fashion_mnist", "test", "accuracy")]
    assert fm.pretrained == pytest.approx(0.82) and fm.pretrained_std == pytest.approx(0.02)
    assert fm.delta == pytest.approx(0.11) and fm.pretrained_better and fm.seeds == 2 and fm.paper == 0.842
    sp = summary.loc[("speech_1h", "dev_clean", "wer")]
    assert sp.delta == pytest.approx(0.15) and not sp.pretrained_better  # higher WER is worse
    assert summary.loc[("speech_1h", "dev_clean", "cer")].scratch == pytest.approx(0.3)
    assert pd.isna(fm.raw) and fm.pretrained_beats_raw is None  # no baseline run yet
    _result(tmp_path, "fashion_mnist", "raw", 0, "test", accuracy=0.83)
    _result(tmp_path, "speech_1h", "raw", 0, "dev_clean", wer=0.6)
    summary = summarize(collect(tmp_path)).set_index(["task", "split", "metric"])
    fm, sp = summary.loc[("fashion_mnist", "test", "accuracy")], summary.loc[("speech_1h", "dev_clean", "wer")]
    assert fm.raw == 0.83 and not fm.pretrained_beats_raw and fm.seeds == 2  # the baseline is not a seed
    assert sp.raw == 0.6 and sp.pretrained_beats_raw and sp.pretrained == pytest.approx(0.55)  # WER 0.55 < 0.6


def test_stage_times_leave_out_the_report_jobs_own_stale_file(tmp_path):
    for stage, seconds in [("pretrain_text", 300.5), ("shard_text_corpus_pretrain", 5.0), ("report", 99.0)]:
        (tmp_path / f"{stage}.tsv").write_text(f"s\th:m:s\n{seconds}\t0:00:00\n")
    times = stage_times(tmp_path)
    assert times.set_index("stage")["seconds"].to_dict() == {"pretrain_text": 300.5, "shard_text_corpus_pretrain": 5.0}


def test_report_files_and_compare_across_commits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = load_params(ROOT / "params.yaml").profiles["smoke"].model_copy(
        update={"results": "res", "summary": "res/summary", "runs": "runs"})
    _result(tmp_path / "res", "rt_polarity", "pretrained", 0, "test", accuracy=0.70)
    _result(tmp_path / "res", "rt_polarity", "scratch", 0, "test", accuracy=0.65)
    _result(tmp_path / "res", "rt_polarity", "raw", 0, "test", accuracy=0.73)
    text = write_report(profile, "smoke")
    assert "| rt_polarity (SST-2) | test | accuracy | 0.7000 ± 0.0000 | 0.6500 ± 0.0000 | 0.0500 ✓ | 1 | 0.7300 ✗ |" \
        in text
    assert "†" not in text  # older JSONs carry no prediction stats: nothing is flagged
    _result(tmp_path / "res", "rt_polarity", "scratch", 0, "test", degenerate=True, accuracy=0.65)
    _result(tmp_path / "res", "rt_polarity", "pretrained", 0, "test", degenerate=False, accuracy=0.70)
    text = write_report(profile, "smoke")
    assert "| 0.7000 ± 0.0000 | 0.6500 ± 0.0000 † | 0.0500 ✓ |" in text and "† At least one seed gave" in text
    assert pd.read_csv(tmp_path / "res/summary.csv")[["pretrained_degenerate", "scratch_degenerate"]].values.tolist() \
        == [[0, 1]]
    assert "‡" not in text
    _result(tmp_path / "res", "rt_polarity", "pretrained", 0, "test", n=(1274, 1275), accuracy=0.70)
    text = write_report(profile, "smoke")
    assert "| 0.7000 ± 0.0000 ‡ | 0.6500 ± 0.0000 † |" in text and "‡ At least one seed was scored on part" in text
    _result(tmp_path / "res", "rt_polarity", "pretrained", 0, "test", n=(1275, 1275), accuracy=0.70)
    assert (tmp_path / "res/summary.csv").is_file() and (tmp_path / "res/plots/finetune.png").stat().st_size > 0
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:1] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "res/summary.csv"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    _result(tmp_path / "res", "rt_polarity", "pretrained", 0, "test", accuracy=0.75)
    write_report(profile, "smoke")
    diff = compare(profile, "HEAD")
    assert "+0.0500" in diff and "res/summary.csv: HEAD → work tree" in diff
    with pytest.raises(FileNotFoundError, match="not in git"):
        compare(profile, "no-such-rev")


def test_report_rejects_a_foreign_json(tmp_path):
    (tmp_path / "t" / "r").mkdir(parents=True)
    (tmp_path / "t" / "r" / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="x.json: not an evaluation result"):
        collect(tmp_path)


# -------------------------------------------------------------------------------------------- end to end

def _copy_of_repo(dest: Path) -> Path:
    files = run(["git", "ls-files", "-co", "--exclude-standard"]).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    cache = ROOT / "data" / "cache"  # downloads are shared with the checkout (content-addressed, verified)
    cache.mkdir(parents=True, exist_ok=True)
    (dest / "data").mkdir(exist_ok=True)
    (dest / "data" / "cache").symlink_to(cache)
    return dest


def _unreachable_registry() -> str | None:
    """Why the registries are unreachable, or None: the smoke profile prepares real data from the Debian pool
    and PyPI (cached in data/cache after the first run)."""
    import urllib.error
    import urllib.request

    for url in ("http://deb.debian.org/debian/pool/main/", "https://files.pythonhosted.org/"):
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15)
        except OSError as err:
            if not (isinstance(err, urllib.error.HTTPError) and err.code < 500):  # 403/404 still means reachable
                return f"{url}: {err}"
    return None


@pytest.mark.slow
def test_smoke_profile_end_to_end_through_snakemake_and_dvc(tmp_path):
    if not any((ROOT / "data" / "cache").rglob("dataset-fashion-mnist_*.deb")) and (why := _unreachable_registry()):
        pytest.skip(f"the package registries the embedded data ships in are unreachable ({why})")
    repo = _copy_of_repo(tmp_path / "repo")
    run([str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2", "--config", "profile=smoke"],
        cwd=repo, timeout=900)
    summary = pd.read_csv(repo / "results/smoke/summary.csv")
    params = load_params(repo / "params.yaml", "smoke").active
    assert set(summary["task"]) == set(params.finetune)
    assert summary[["pretrained", "scratch", "raw"]].notna().all().all()  # raw features are LM-decoded too
    result = json.loads((repo / "results/smoke/rt_polarity/pretrained-s0/rt_polarity-test.json").read_text())
    assert result["n"] == 48 and result["init"] == "pretrained" and len(result["params_digest"]) == 16
    assert (repo / "runs/smoke/pretrain/text/final.pt").is_file()
    raw = json.loads((repo / "results/smoke/bible_para/raw-s0/bible_para-test.json").read_text())
    assert raw["init"] == "raw" and raw["n"] == 48 and set(raw["metrics"]) == {"accuracy", "f1"}
    speech = json.loads((repo / "results/smoke/speech_10min/scratch-s0/speech_10min-test_clean.json").read_text())
    assert {"wer_lm", "cer_lm"} <= set(speech["metrics"]) and speech["lm"]["tuned_on"] == "dev_clean"
    assert {"wer_lm", "cer_lm"} <= set(summary["metric"])  # the report's rows, beside the greedy ones
    again = run([str(BIN / "snakemake"), "-n", "--cores", "2", "--config", "profile=smoke"], cwd=repo)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the same graph through DVC: generated for the smoke profile, planned without network or remote
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(git + ["init", "-q"], cwd=repo)
    run([str(BIN / "d2v"), "pipeline", "dvc", "--profile", "smoke"], cwd=repo)
    run(git + ["add", "-A"], cwd=repo)
    run(git + ["commit", "-qm", "smoke"], cwd=repo)
    dry = run([str(BIN / "dvc"), "repro", "--dry"], cwd=repo)
    assert "Running stage 'prepare_fashion_mnist'" in dry.stdout and "Running stage 'report'" in dry.stdout
    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=repo).stdout)
    files = next(iter(metrics.values()))["data"]
    assert "results/smoke/rt_polarity/pretrained-s0/rt_polarity-test.json" in files


def test_fine_tuning_takes_the_pretraining_encoders_preset_when_it_names_none():
    data = copy.deepcopy(RAW)
    del data["profiles"]["embedded"]["finetune"]["speech_1h"]["preset"]
    profile = parse_params(data).profiles["embedded"]
    assert profile.pretrain_config("speech").preset == "embedded-fbank"
    for init in ("pretrained", "scratch"):  # the scratch baseline is the same model, randomly initialised
        assert profile.finetune_config("speech_1h", init).preset == "embedded-fbank"
    assert profile.finetune_config("fashion_mnist", "scratch").preset == profile.pretrain_config("image").preset
