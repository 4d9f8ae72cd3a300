"""The benchmark scripts' own logic: command-line overrides and run reuse (the runs themselves are benchmarks)."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "gpu"))
from collapse import arms, earlier_arms  # noqa: E402
import fit_steps  # noqa: E402
from feature_probe import attention_reach, cosine_agreement, ctc_probe  # noqa: E402
from mlm_reference import LMHead, train_mlm  # noqa: E402
import pretrain_vs_scratch  # noqa: E402
from pretrain_vs_scratch import encoder_presets, known_record, parse_sets, summarize  # noqa: E402
import runs  # noqa: E402
from text_stream_order import replay_starts, shares  # noqa: E402
from runs import cv_test_metrics, mean_test_metrics, same_config  # noqa: E402

from d2v.data.shards import read_index  # noqa: E402
from d2v.data.sources import Context  # noqa: E402
from d2v.data.sources.text import LEE, LEE_SIM  # noqa: E402
from d2v.data.tokenizer import BLANK, WORD_SEP, LetterTokenizer  # noqa: E402
from d2v.modalities.base import Batch  # noqa: E402
from d2v.train.config import merge, pretrain_config  # noqa: E402
from d2v.train import recipe  # noqa: E402
from d2v.train.task_model import build_model  # noqa: E402
from d2v.train.pretrain import build_objective  # noqa: E402
from d2v.train.tasks import TASKS, eval_file_name, finetune_config  # noqa: E402


def test_overrides_nest_by_dotted_key_and_parse_yaml_values():
    sets = parse_sets(["text.data.batch_size=256", "text.top_k=2", "text.optim.betas=[0.9, 0.95]", "image.seed=1"])
    assert sets == {"text": {"data": {"batch_size": 256}, "top_k": 2, "optim": {"betas": [0.9, 0.95]}},
                    "image": {"seed": 1}}
    with pytest.raises(SystemExit, match="expected NAME.FIELD"):
        parse_sets(["text=1"])


def test_the_table_beside_the_json_gives_each_task_its_verdict_by_the_seed_spread(tmp_path):
    rows = {"fashion_mnist": summarize("fashion_mnist", {"pretrained": [0.86, 0.87], "scratch": [0.82, 0.83]}),
            "rt_polarity": summarize("rt_polarity", {"pretrained": [0.60, 0.61], "scratch": [0.67, 0.68]}),
            "lee_sts": summarize("lee_sts", {"pretrained": [0.10, 0.30], "scratch": [0.05, 0.15]}),
            # lower WER is better: a lower pretrained WER is a positive gain
            "speech_1h": summarize("speech_1h", {"pretrained": [0.54, 0.55], "scratch": [0.64, 0.66]}, "wer_lm")}
    for task, row in rows.items():
        row.update(objective="v2" if task == "speech_1h" else "v1", pretrainings=1, finetune_steps=150)
    report = {"pretrain": {"image": {"steps": 1000}, "text": {"steps": 1200}}, "tasks": rows}
    pretrain_vs_scratch.save(tmp_path / "t.json", report)
    assert json.loads((tmp_path / "t.json").read_text()) == report
    lines = {line.split(" (")[0].strip("| "): line for line in (tmp_path / "t.md").read_text().splitlines()[2:]}
    assert lines["fashion_mnist"].endswith("| +0.0400 | 0.0100 | 2 of 2 (+0.0400 ± 0.0000) | **win** |")
    assert lines["rt_polarity"].endswith("| -0.0700 | 0.0100 | 0 of 2 (-0.0700 ± 0.0000) | **loss** |")
    assert lines["lee_sts"].endswith("| +0.1000 | 0.2000 | 2 of 2 (+0.1000 ± 0.0500) | ahead, inside the spread |")
    assert "| wer_lm | v2, ? steps | 150 steps | 0.5450 ± 0.0050 (2) |" in lines["speech_1h"]
    assert lines["speech_1h"].endswith("| +0.1050 | 0.0200 | 2 of 2 (+0.1050 ± 0.0050) | **win** |")


def test_every_committed_table_is_its_json_rendered():
    # the README and the closing notes quote the .md tables: one edited by hand, or left behind by a JSON rewritten
    # since, would quote numbers the results do not hold (`--render` rewrites a table from its JSON)
    root = Path(__file__).resolve().parents[1] / "results"
    pairs = [(md, json.loads(md.with_suffix(".json").read_text())) for md in sorted(root.rglob("*.md"))
             if md.with_suffix(".json").is_file()]
    tables = [(md, report) for md, report in pairs if report.get("benchmark") == "pretrain_vs_scratch"]
    assert any(md.parent.name == "embedded" for md, _ in tables)  # the headline table is among them
    stale = [str(md.relative_to(root)) for md, report in tables if md.read_text() != pretrain_vs_scratch.table(report)]
    assert not stale, f"tables unlike their JSON (bench/pretrain_vs_scratch.py --render --out JSON): {stale}"


def test_a_given_checkpoint_keeps_the_record_of_the_pretraining_this_script_made_of_it():
    made = {"objective": "v2", "steps": 2400, "seconds": 3283.2, "run": "runs/bench-x/pretrain/text-v2",
            "overrides": {"optim": {"warmup_steps": 240}}, "last": {"target_rank": 30.4}}
    given = {"objective": "v2", "steps": 2400, "preset": "embedded", "pretraining": "data2vec",
             "checkpoint": "./runs/bench-x/pretrain/text-v2/final.pt"}
    assert known_record(made, given) == {**made, "checkpoint": given["checkpoint"]}  # time and statistics kept
    assert known_record({**made, "run": "runs/other/pretrain/text-v2"}, given) == given  # another pretraining
    assert known_record(None, given) == given
    again = known_record(made, given)
    assert known_record(again, given) == again  # a later run with the same checkpoint keeps it too


def test_stream_order_counts_each_windows_samples_by_the_source_they_start_in():
    ends = np.array([10.0, 20.0])  # source 0 holds tokens 0-9, source 1 tokens 10-19
    assert shares(np.array([0, 5, 12, 10, 9, 15]), ends, 2).tolist() == [[1, 0], [0, 1], [0.5, 0.5]]


def test_the_replay_order_is_the_loaders_shuffle_buffer_over_the_shard_read_again_and_again():
    class Chunks:  # 5 chunks of 100 tokens
        ends = np.arange(1, 6) * 100

    chunks = replay_starts(Chunks(), 15, buffer=3, seed=0) // 100
    assert chunks.tolist() != [0, 1, 2, 3, 4] * 3 and set(chunks) == set(range(5))  # shuffled, and read again
    assert chunks[0] in {0, 1, 2} and chunks[1] in {0, 1, 2, 3}  # only from what the 3-chunk buffer holds
    assert (replay_starts(Chunks(), 15, buffer=3, seed=0) // 100).tolist() == chunks.tolist()  # seeded
    assert (replay_starts(Chunks(), 15, buffer=1, seed=0) // 100).tolist() == [0, 1, 2, 3, 4] * 3  # no buffer


def test_a_run_written_before_a_field_existed_is_still_reused(tmp_path):
    cfg = finetune_config("rt_polarity", {"init": "scratch"})
    old = cfg.model_dump(mode="json")
    del old["device"], old["precision"]  # fields added later, at their defaults
    (tmp_path / "config.json").write_text(json.dumps(old))
    recipe.stamp(tmp_path, "finetune")
    assert same_config(tmp_path, cfg)
    assert not same_config(tmp_path, cfg.model_copy(update={"seed": 1}))
    (tmp_path / "config.json").write_text(json.dumps({**old, "removed_field": 1}))
    assert not same_config(tmp_path, cfg)  # written by an incompatible version: rerun


def test_a_run_made_under_another_recipe_version_is_not_reused(tmp_path, monkeypatch, capsys):
    cfg = finetune_config("rt_polarity", {"init": "scratch"})
    ft, pre = tmp_path / "ft", tmp_path / "pre"
    for run, config in ((ft, cfg), (pre, pretrain_config("text", {"steps": 3}))):
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config.model_dump(mode="json")))
    assert not same_config(ft, cfg)  # no record: made before the versions existed (1), fine-tuning is at 2 or later
    recipe.stamp(ft, "finetune")
    recipe.stamp(pre, "pretrain")
    assert same_config(ft, cfg) and same_config(pre, pretrain_config("text", {"steps": 3}))
    monkeypatch.setattr(recipe, "FINETUNE", recipe.FINETUNE + 1)  # a commit changes what fine-tuning computes
    assert not same_config(ft, cfg)
    stale = f"made under finetune recipe {recipe.FINETUNE - 1}, the code is at {recipe.FINETUNE}: not reused"
    assert stale in capsys.readouterr().err
    assert same_config(ft, cfg, any_version=True)  # --any-finetune-version: the older run is reused (scored again)
    assert not same_config(ft, cfg.model_copy(update={"seed": 1}), any_version=True)  # but only its own config
    assert same_config(pre, pretrain_config("text", {"steps": 3}))  # pretraining runs stay current
    (ft / "recipe.json").write_text('{"kind": "pretrain", "version": 3}')
    with pytest.raises(ValueError, match=r"ft/recipe.json: records a 'pretrain' run, expected a 'finetune' run"):
        same_config(ft, cfg)
    (ft / "recipe.json").write_text("{")
    with pytest.raises(ValueError, match=r"ft/recipe.json: expected JSON with a 'version' number"):
        same_config(ft, cfg)


def test_every_collapse_arm_changes_what_it_names():
    """Each arm of bench/collapse.py is a valid override of the modality's recipe, and it reaches the objective."""
    local = {"speech": ("feature_extractor.", "feature_norm.", "feature_proj."),
             "text": ("embed_tokens.", "embed_positions.", "embed_norm.")}
    for modality, preset in (("text", "tiny"), ("speech", "tiny-fbank")):
        built = {name: build_objective(pretrain_config(modality, merge({"preset": preset, "steps": 300}, overrides)))
                 for name, overrides in arms(modality, 300).items()}
        trained = {name: {n for n, p in obj.student.named_parameters() if p.requires_grad}
                   for name, obj in built.items()}
        assert any(n.startswith(local[modality]) for n in trained["recipe"])
        for frozen in ("frozen_local", "frozen_local_tau_0.999", "v2_frozen_local"):
            assert not any(n.startswith(local[modality]) for n in trained[frozen]) and trained[frozen]
        assert built["tau_0.999"].cfg.ema.tau_start == 0.999 and built["recipe"].cfg.ema.tau_start < 0.999
        assert pretrain_config(modality, arms(modality, 300)["lr_2e-4"]).optim.lr == 2e-4
        assert type(built["v2_frozen_local"]).__name__ == "Data2Vec2" and type(built["recipe"]).__name__ == "Data2Vec"
        if modality == "speech":
            assert built["front_end_grad_0.1"].student.local_grad_mult == 0.1
        else:
            assert "front_end_grad_0.1" not in built


def test_a_collapse_run_of_some_arms_adds_to_the_table_of_the_same_setting(tmp_path):
    out = tmp_path / "collapse.json"
    assert earlier_arms(str(out), "text", "embedded", 300) == {}
    out.write_text(json.dumps({"modality": "text", "preset": "embedded", "steps": 300, "arms": {"recipe": {"x": 1}}}))
    assert earlier_arms(str(out), "text", "embedded", 300) == {"recipe": {"x": 1}}
    assert earlier_arms(str(out), "text", "embedded", 800) == {}
    assert earlier_arms(str(out), "speech", "embedded", 300) == {}
    assert earlier_arms(str(out), "text", "tiny", 300) == {}


def test_time_to_accuracy_refuses_a_reference_fine_tuned_for_another_length(tmp_path, monkeypatch):
    import v2_vs_v1

    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({"tasks": {"fashion_mnist": {"finetune_steps": 1000}}}))
    monkeypatch.setattr(runs, "pretrain_seconds", lambda *a: pytest.fail("pretrained before checking the reference"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's own thread count
    monkeypatch.setattr(sys, "argv", ["v2_vs_v1.py", "time-to-accuracy", "--finetune-steps", "150",
                                      "--reference", str(reference), "--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="fine-tuned 1000 steps, not --finetune-steps 150"):
        v2_vs_v1.main()


def test_time_to_accuracy_fine_tunes_v2_like_its_reference_and_times_both_by_wall_clock(tmp_path, monkeypatch):
    import v2_vs_v1

    flips = {"image": {"min_scale": 1.0, "randaugment_magnitude": 0}, "label_smoothing": 0.0, "steps": 100}
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({
        "pretrain": {"image": {"steps": 1500, "seconds": 1000.0, "last": {"samples_per_s": 64.0}}},
        "tasks": {"fashion_mnist": {"finetune_steps": 300, "overrides": flips,
                                    "pretrained": {"mean": 0.8, "spread": 0.01}, "scratch": {"mean": 0.7}}}}))
    tuned = []
    monkeypatch.setattr(runs, "pretrain_seconds", lambda cfg, run: {150: 100.0, 250: 250.0}[cfg.steps])
    monkeypatch.setattr(runs, "headline_metric", lambda cfg, *_: tuned.append(cfg) or cfg.steps / 1000 + 0.5)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "tta.json"
    monkeypatch.setattr(sys, "argv", ["v2_vs_v1.py", "time-to-accuracy", "--budgets", "150,250", "--seeds", "2",
                                      "--finetune-steps", "300", "--reference", str(reference),
                                      "--runs", str(tmp_path / "runs"), "--out", str(out)])
    v2_vs_v1.main()
    report = json.loads(out.read_text())
    assert len(tuned) == 4 and {(c.seed, c.steps, c.init, c.image.min_scale, c.image.randaugment_magnitude,
                                 c.label_smoothing) for c in tuned} == {(s, 300, "pretrained", 1.0, 0, 0.0)
                                                                        for s in (0, 1)}
    assert report["v1"]["pretrain_seconds"] == 1000.0  # the recorded wall time, not 1500 * 64 / 64 = 1500
    assert report["v2"]["150"]["speedup_vs_v1"] == pytest.approx(10.0) and report["v2"]["150"]["reaches_v1"]
    assert report["finetune_overrides"] == {**flips, "steps": 300}  # the reference's, at --finetune-steps
    assert report["v2"]["250"]["speedup_vs_v1"] == pytest.approx(4.0)
    given = json.loads(reference.read_text())  # a row of a --pretrained checkpoint records no pretraining time
    given["pretrain"]["image"] = {"steps": 1500, "checkpoint": "x/final.pt"}
    reference.write_text(json.dumps(given))
    with pytest.raises(SystemExit, match="records no v1 pretraining time .*; pass --v1-seconds"):
        v2_vs_v1.main()
    monkeypatch.setattr(sys, "argv", sys.argv + ["--v1-seconds", "500"])
    v2_vs_v1.main()
    assert json.loads(out.read_text())["v2"]["150"]["speedup_vs_v1"] == pytest.approx(5.0)


def pretrained_budget(cfg) -> int:
    """The v2 step budget of the pretraining a time-to-accuracy fine-tune starts from (.../MODALITY-v2-BUDGET/...)."""
    return int(Path(cfg.pretrained).parent.name.split("-")[-1])


def test_time_to_accuracy_adds_a_budget_to_the_rows_an_earlier_run_wrote(tmp_path, monkeypatch):
    import v2_vs_v1

    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({
        "pretrain": {"image": {"steps": 1500, "seconds": 1000.0}},
        "tasks": {"fashion_mnist": {"finetune_steps": 300, "pretrained": {"mean": 0.8, "spread": 0.01}}}}))
    monkeypatch.setattr(runs, "pretrain_seconds", lambda cfg, run: cfg.steps * 2.0)
    monkeypatch.setattr(runs, "headline_metric", lambda cfg, *_: 0.7 + cfg.seed / 100 + pretrained_budget(cfg) / 10_000)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "tta.json"
    args = ["v2_vs_v1.py", "time-to-accuracy", "--seeds", "2", "--finetune-steps", "300", "--reference",
            str(reference), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", args + ["--budgets", "100,1000"])
    v2_vs_v1.main()
    first = json.loads(out.read_text())["v2"]
    monkeypatch.setattr(sys, "argv", args + ["--budgets", "500", "--seeds", "3"])
    v2_vs_v1.main()
    rows = json.loads(out.read_text())["v2"]
    assert set(rows) == {"100", "500", "1000"}  # the earlier rows kept as they were
    assert rows["100"] == first["100"] and rows["1000"] == first["1000"]
    assert rows["500"]["values"] == pytest.approx([0.75, 0.76, 0.77]) and rows["500"]["speedup_vs_v1"] == 1.0
    assert [rows[b]["reaches_v1"] for b in ("100", "500", "1000")] == [False, False, True]  # means vs 0.8
    given = json.loads(reference.read_text())  # a new target judges the kept rows again
    given["tasks"]["fashion_mnist"]["pretrained"]["mean"] = 0.7
    reference.write_text(json.dumps(given))
    monkeypatch.setattr(sys, "argv", args + ["--budgets", "500", "--v1-seconds", "4000"])
    v2_vs_v1.main()
    rows = json.loads(out.read_text())["v2"]
    assert rows["100"]["reaches_v1"] and rows["500"]["speedup_vs_v1"] == 4.0  # v1 timed again with this budget
    assert (rows["100"]["speedup_vs_v1"], rows["100"]["v1_pretrain_seconds"]) == (5.0, 1000.0)  # as first timed
    monkeypatch.setattr(sys, "argv", args[:-1] + [str(out), "--budgets", "500", "--finetune-steps", "150"])
    reference.write_text(json.dumps({**given, "tasks": {"fashion_mnist": {**given["tasks"]["fashion_mnist"],
                                                                          "finetune_steps": 150}}}))
    with pytest.raises(SystemExit, match="holds another comparison .finetune_steps 300, not 150.; pass another --out"):
        v2_vs_v1.main()
    assert json.loads(out.read_text())["v2"] == rows  # refused before anything was written


def test_speech_time_to_accuracy_reaches_v1_by_a_lower_wer_and_reuses_given_v2_runs(tmp_path, monkeypatch):
    import v2_vs_v1

    profile = {"preset": "embedded-fbank", "eval_every": 250, "steps": 100}
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({
        "pretrain": {"speech": {"objective": "v1", "steps": 800, "seconds": 660.0}},
        "tasks": {"speech_1h": {"finetune_steps": 1000, "overrides": profile,
                                "pretrained": {"mean": 0.88, "spread": 0.01}, "scratch": {"mean": 0.90}}}}))
    pretrained, tuned = [], []

    def pretrain_seconds(cfg, run):
        pretrained.append((cfg, run))
        return {2400: 600.0, 6000: 1500.0}[cfg.steps]

    monkeypatch.setattr(runs, "pretrain_seconds", pretrain_seconds)
    decoded_with = []

    def headline_metric(cfg, out, lm=None, any_version=False):
        tuned.append(cfg)
        decoded_with.append(lm)
        return {2400: 0.89, 6000: 0.87}[pretrained_budget(cfg)]

    monkeypatch.setattr(runs, "headline_metric", headline_metric)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "tta.json"
    monkeypatch.setattr(sys, "argv", ["v2_vs_v1.py", "time-to-accuracy", "--task", "speech_1h", "--budgets",
                                      "2400,6000", "--seeds", "2", "--finetune-steps", "1000", "--reference",
                                      str(reference), "--runs", str(tmp_path / "runs"), "--pretrained",
                                      f"6000={tmp_path}/old/speech-v2-6000", "--out", str(out)])
    v2_vs_v1.main()
    report = json.loads(out.read_text())
    assert report["metric"] == "wer" and report["v1"]["pretrain_seconds"] == 660.0
    assert not report["v2"]["2400"]["reaches_v1"] and report["v2"]["6000"]["reaches_v1"]  # 0.87 <= 0.88: lower wins
    assert report["v2"]["6000"]["speedup_vs_v1"] == pytest.approx(0.44)
    assert [str(run) for _, run in pretrained] == [str(tmp_path / "runs" / "speech-v2-2400"),
                                                   f"{tmp_path}/old/speech-v2-6000"]
    cfg = pretrained[1][0]  # the recipe that won on CPU, its schedule ending with the budget
    assert (cfg.objective, cfg.preset, cfg.freeze_local_encoder, cfg.ema.tau_start, cfg.ema.tau_steps,
            cfg.optim.warmup_steps) == ("v2", "embedded-fbank", True, 0.999, 6000, 600)
    assert {(c.preset, c.eval_every, c.steps, c.objective) for c in tuned} == {("embedded-fbank", 250, 1000, "v2")}
    assert set(decoded_with) == {None}
    # with a language model: WER decoded with it on both sides, so a greedy reference is refused
    out = tmp_path / "tta_lm.json"
    monkeypatch.setattr(sys, "argv", sys.argv[:-1] + [str(out), "--lm", str(tmp_path / "lm")])
    with pytest.raises(SystemExit, match=r"its v1 row scores wer \(language model None\), not wer_lm"):
        v2_vs_v1.main()
    given = json.loads(reference.read_text())
    given["tasks"]["speech_1h"].update(metric="wer_lm", lm=str(tmp_path / "lm"))
    reference.write_text(json.dumps(given))
    v2_vs_v1.main()
    report = json.loads(out.read_text())
    assert report["metric"] == "wer_lm" and report["lm"] == str(tmp_path / "lm")
    assert decoded_with[-1] == tmp_path / "lm"


def test_a_win_needs_a_gain_beyond_the_seed_spread():
    close = summarize("rt_polarity", {"pretrained": [0.72, 0.74], "scratch": [0.70, 0.73]})
    assert close["gain"] == pytest.approx(0.015) and close["margin"] == pytest.approx(0.03) and not close["wins"]
    clear = summarize("speech_10min", {"pretrained": [0.30, 0.32], "scratch": [0.50, 0.52]})  # WER: lower wins
    assert clear["gain"] == pytest.approx(0.20) and clear["wins"] and clear["seeds_ahead"] == 2
    assert close["seeds_ahead"] == 2  # ahead in every pair, yet within the spread: not a win
    outlier = summarize("fashion_mnist", {"pretrained": [0.64, 0.61, 0.67], "scratch": [0.53, 0.55, 0.62]})
    assert outlier["seeds_ahead"] == 3 and not outlier["wins"]  # one scratch seed widens the spread past the gain
    behind = summarize("speech_10min", {"pretrained": [0.30, 0.60], "scratch": [0.50, 0.52]})
    assert behind["seeds_ahead"] == 1
    # paired: the differences 0.02 and 0.01 (WER: 0.20 and 0.20 lower), their mean and standard error
    assert close["paired_gain"] == pytest.approx(0.015) and close["paired_se"] == pytest.approx(0.005)
    assert clear["paired_gain"] == pytest.approx(0.20) and clear["paired_se"] == pytest.approx(0.0, abs=1e-12)
    assert "paired_se" not in summarize("rt_polarity", {"pretrained": [0.7], "scratch": [0.6]})  # one pair
    assert "| 2 of 2 (+0.0150 ± 0.0050) | ahead, inside the spread |" in pretrain_vs_scratch.table(
        {"tasks": {"rt_polarity": close}, "pretrain": {}})


def test_several_pretrainings_pool_into_one_arm_and_pair_with_the_scratch_seeds():
    # pretraining 0's seeds agree to a point, pretraining 1 lands 5 points lower: the pooled spread shows it
    row = summarize("rt_polarity", {"pretrained": [0.67, 0.68, 0.62, 0.63], "scratch": [0.66, 0.70]}, seeds=2)
    assert row["pretrained"]["per_pretraining"] == pytest.approx([0.675, 0.625])
    assert row["pretrained"]["mean"] == pytest.approx(0.65) and row["pretrained"]["spread"] == pytest.approx(0.06)
    assert row["seeds_ahead"] == 1  # 0.67 > 0.66 only: each pretraining's seed k against scratch's seed k
    assert not row["wins"] and row["gain"] == pytest.approx(-0.03)
    partial = summarize("rt_polarity", {"pretrained": [0.67, 0.68, 0.62], "scratch": [0.66]}, seeds=2)
    assert partial["pretrained"]["per_pretraining"] == pytest.approx([0.675, 0.62]) and partial["seeds_ahead"] == 1
    assert "per_pretraining" not in summarize("rt_polarity", {"pretrained": [0.7, 0.6], "scratch": [0.6]}, seeds=2)[
        "pretrained"]


def test_each_repeated_pretraining_has_its_seed_and_folder_and_its_own_fine_tunes(tmp_path, monkeypatch):
    made, tuned = [], []

    def fake_pretraining(cfg, run, tokenizer=None):
        made.append((run.name, cfg.seed))
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"first": {"loss": 1.0}, "last": {"loss": 0.5}}))
        return 1.0

    monkeypatch.setattr(pretrain_vs_scratch, "pretrain_seconds", fake_pretraining)
    monkeypatch.setattr(pretrain_vs_scratch, "missing_shards", lambda *a: [])
    monkeypatch.setattr(pretrain_vs_scratch, "cv_test_metrics", lambda cfg, run, folds, lm, any_version: tuned.append(
        (run.name, cfg.pretrained)) or {"accuracy": 0.6 + 0.01 * len(tuned)})
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "rt_polarity",
                                      "--objective", "text=v2", "--seeds", "2", "--pretrainings", "3",
                                      "--set", "text.seed=5", "--runs", str(tmp_path), "--out", str(out)])
    pretrain_vs_scratch.main()
    assert made == [("text-v2", 5), ("text-v2-p1", 6), ("text-v2-p2", 7)]
    finals = [str(tmp_path / "pretrain" / name / "final.pt") for name in ("text-v2", "text-v2-p1", "text-v2-p2")]
    assert tuned == [("rt_polarity-pretrained-v2-s0", finals[0]), ("rt_polarity-pretrained-v2-s1", finals[0]),
                     ("rt_polarity-pretrained-v2-p1-s0", finals[1]), ("rt_polarity-pretrained-v2-p1-s1", finals[1]),
                     ("rt_polarity-pretrained-v2-p2-s0", finals[2]), ("rt_polarity-pretrained-v2-p2-s1", finals[2]),
                     ("rt_polarity-scratch-v2-s0", None), ("rt_polarity-scratch-v2-s1", None)]
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["pretrain"]["text"]["repeats"]] == [6, 7]
    row = report["tasks"]["rt_polarity"]
    assert row["pretrainings"] == 3 and len(row["pretrained"]["values"]) == 6
    assert row["pretrained"]["per_pretraining"] == pytest.approx([0.615, 0.635, 0.655])
    # a later run for another task under one pretraining keeps the repeats' records the pooled row stands on
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "bible_para",
                                      "--objective", "text=v2", "--seeds", "1", "--set", "text.seed=5",
                                      "--runs", str(tmp_path), "--out", str(out)])
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain_seconds", lambda cfg, run, tokenizer=None: 1.0)
    pretrain_vs_scratch.main()
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["pretrain"]["text"]["repeats"]] == [6, 7]
    assert report["tasks"]["bible_para"]["pretrainings"] == 1 and report["tasks"]["rt_polarity"]["pretrainings"] == 3
    # each row keeps the seed count it was run over; the file has none of its own that a later run would overwrite
    assert report["tasks"]["bible_para"]["seeds"] == 1 and report["tasks"]["rt_polarity"]["seeds"] == 2
    assert "seeds" not in report
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "bible_para",
                                      "--objective", "text=v2", "--seeds", "1", "--runs", str(tmp_path),
                                      "--out", str(out)])
    pretrain_vs_scratch.main()  # another pretraining (seed 0): its record carries no repeats of seed 5's
    assert "repeats" not in json.loads(out.read_text())["pretrain"]["text"]
    # --weights teacher: the pretrained arm in its own runs, from each pretraining's teacher; scratch unchanged
    started = []
    monkeypatch.setattr(pretrain_vs_scratch, "cv_test_metrics", lambda cfg, run, folds, lm, any_version: started.append(
        (run.name, cfg.weights)) or {"accuracy": 0.6})
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "rt_polarity",
                                      "--objective", "text=v2", "--seeds", "1", "--pretrainings", "2",
                                      "--weights", "teacher", "--runs", str(tmp_path), "--out", str(out)])
    pretrain_vs_scratch.main()
    assert started == [("rt_polarity-pretrained-v2-teacher-s0", "teacher"),
                       ("rt_polarity-pretrained-v2-teacher-p1-s0", "teacher"), ("rt_polarity-scratch-v2-s0", "student")]
    assert json.loads(out.read_text())["tasks"]["rt_polarity"]["weights"] == "teacher"
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--pretrainings", "2",
                                      "--pretrained", f"text={finals[0]}", "--out", str(out)])
    with pytest.raises(SystemExit, match="not with --pretrained"):
        pretrain_vs_scratch.main()


def test_ctc_test_metrics_average_the_test_splits_only_and_reuse_the_evaluation(tmp_path, monkeypatch):
    cfg = finetune_config("speech_1h", {"init": "scratch"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    recipe.stamp(tmp_path, "finetune")
    (tmp_path / "eval").mkdir()
    for split, wer, cer in [("dev_clean", 0.1, 0.05), ("dev_other", 0.1, 0.05), ("test_clean", 0.6, 0.2),
                            ("test_other", 0.8, 0.4)]:
        (tmp_path / "eval" / f"speech_1h-{split}.json").write_text(
            json.dumps({"split": split, "metrics": {"wer": wer, "cer": cer}, "recipe": {"evaluate": recipe.EVALUATE}}))
    assert mean_test_metrics(cfg, tmp_path) == pytest.approx({"wer": 0.7, "cer": 0.3})  # no fine-tuning was run
    # evaluation code bumped: the same fine-tuned model is scored again, not trained again
    monkeypatch.setattr(recipe, "EVALUATE", recipe.EVALUATE + 1)
    monkeypatch.setattr(runs, "run_finetune", lambda *a, **k: pytest.fail("fine-tuned again"))
    rescored = [{"split": s, "metrics": {"wer": 0.5, "cer": 0.1}} for s in ("test_clean", "test_other")]
    monkeypatch.setattr(runs, "evaluate", lambda run, lm=None, **_: rescored if run == tmp_path else pytest.fail(run))
    assert mean_test_metrics(cfg, tmp_path) == pytest.approx({"wer": 0.5, "cer": 0.1})
    assert recipe.in_result({"recipe": 2}, "finetune") == 2 and recipe.in_result({"recipe": 2}, "evaluate") == 1
    rescored[1].update(n=99, n_split=100)  # one utterance failed to decode: no number for the arm
    with pytest.raises(SystemExit, match=r"test_other scored 99 of its 100 examples"):
        mean_test_metrics(cfg, tmp_path)


def test_with_a_language_model_ctc_runs_are_decoded_again_once_and_compared_on_wer_lm(tmp_path, monkeypatch):
    from d2v.eval import lm

    LetterTokenizer(["<blank>", "|", "A", "B"]).save(tmp_path / "letters.json")
    (tmp_path / "corpus.txt").write_text("AB A\nB\n")
    lm.build(lm.LanguageModelConfig(corpus="c", order=2), ["<blank>", "|", "A", "B"], tmp_path / "lm",
             [tmp_path / "corpus.txt"])
    digest = lm.LanguageModel(tmp_path / "lm", ["<blank>", "|", "A", "B"]).digest
    cfg = finetune_config("speech_1h", {"init": "scratch", "letters": str(tmp_path / "letters.json")})
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    recipe.stamp(run, "finetune")

    def write(wer_lm=None):
        for split in TASKS["speech_1h"].tests:
            metrics = {"wer": 0.8, "cer": 0.4} | ({"wer_lm": wer_lm, "cer_lm": 0.3} if wer_lm else {})
            (run / "eval" / f"speech_1h-{split}.json").write_text(json.dumps(
                {"split": split, "metrics": metrics, "recipe": {"evaluate": recipe.EVALUATE},
                 **({"lm": {"digest": digest}} if wer_lm else {})}))
        return [json.loads((run / "eval" / f"speech_1h-{s}.json").read_text()) for s in TASKS["speech_1h"].tests]

    write()  # scored greedily only
    decoded = []
    monkeypatch.setattr(runs, "run_finetune", lambda *a, **k: pytest.fail("fine-tuned again"))
    monkeypatch.setattr(runs, "evaluate", lambda out, lm=None, **_: decoded.append(lm) or write(wer_lm=0.5))
    assert mean_test_metrics(cfg, run, tmp_path / "lm") == pytest.approx(
        {"wer_lm": 0.5, "cer_lm": 0.3, "wer": 0.8, "cer": 0.4})
    assert decoded == [tmp_path / "lm"]
    assert mean_test_metrics(cfg, run, tmp_path / "lm")["wer_lm"] == 0.5 and len(decoded) == 1  # reused
    assert list(runs.scored_metrics(TASKS["speech_1h"], tmp_path / "lm"))[0] == "wer_lm"
    assert runs.scored_metrics(TASKS["rt_polarity"], tmp_path / "lm") == ("accuracy",)
    (tmp_path / "lm" / lm.META).write_text((tmp_path / "lm" / lm.META).read_text().replace('"order": 2', '"order": 3'))
    mean_test_metrics(cfg, run, tmp_path / "lm")  # another model in the folder: decoded again
    assert len(decoded) == 2


def test_a_finished_fine_tune_of_another_config_is_not_fine_tuned_over(tmp_path, monkeypatch):
    """Another budget under the same --tag stops, naming what differs, instead of replacing the finished run."""
    def finished(run, cfg):
        run.mkdir()
        (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        recipe.stamp(run, "finetune")
        (run / "summary.json").write_text("{}")
        (run / "eval").mkdir()
        (run / "eval" / eval_file_name("fashion_mnist", "test")).write_text(
            json.dumps({"split": "test", "metrics": {"accuracy": 0.8}, "recipe": {"evaluate": recipe.EVALUATE}}))

    fine_tuned = []
    monkeypatch.setattr(runs, "run_finetune", lambda cfg, out, **k: fine_tuned.append((out, k["restart_on_change"])))
    monkeypatch.setattr(runs, "evaluate", lambda run, lm=None, **_: [{"split": "test", "metrics": {"accuracy": 0.5}}])
    long = finetune_config("fashion_mnist", {"init": "scratch", "steps": 1000, "optim": {"lr": 1e-3}})
    short = finetune_config("fashion_mnist", {"init": "scratch", "steps": 300, "optim": {"lr": 1e-3}})
    finished(tmp_path / "a", long)
    with pytest.raises(SystemExit, match=r"a: holds a finished fine-tune under another config \(steps: 1000 -> 300\)"
                       r"; give this benchmark its own --tag"):
        mean_test_metrics(short, tmp_path / "a")
    assert mean_test_metrics(long, tmp_path / "a") == {"accuracy": 0.8} and not fine_tuned  # its own config: reused
    with pytest.raises(SystemExit, match=r"optim.lr: 0.001 -> 0.002"):
        mean_test_metrics(long.model_copy(update={"optim": long.optim.model_copy(update={"lr": 2e-3})}), tmp_path / "a")
    monkeypatch.setattr(recipe, "FINETUNE", recipe.FINETUNE + 1)  # stale, not another config: run again
    assert mean_test_metrics(long, tmp_path / "a") == {"accuracy": 0.5} and fine_tuned == [(tmp_path / "a", True)]
    (tmp_path / "b").mkdir()  # unfinished (no summary, no evaluation): its checkpoints decide (another config: refused)
    (tmp_path / "b" / "config.json").write_text(json.dumps(long.model_dump(mode="json")))
    mean_test_metrics(short, tmp_path / "b")
    assert fine_tuned[-1] == (tmp_path / "b", False)
    (tmp_path / "a" / "eval" / eval_file_name("fashion_mnist", "test")).unlink()  # trained, never scored
    with pytest.raises(SystemExit, match=r"a: holds a finished fine-tune under another config \(steps: 1000 -> 300\)"):
        mean_test_metrics(short, tmp_path / "a")


def test_cross_validation_scores_each_fold_on_its_own_documents_and_averages_the_folds(tmp_path, monkeypatch):
    docs = "\n".join(f"document {i} is about topic {i % 3}" for i in range(9)).encode("latin-1")
    buf = io.StringIO()
    np.savetxt(buf, np.triu(np.random.default_rng(0).random((9, 9)), 1))
    members = {LEE.path: docs, LEE_SIM.path: buf.getvalue().encode()}

    class Served(Context):  # the Lee files without the gensim wheel
        def read(self, member):
            return members[member.path]

    monkeypatch.setattr(runs, "Context", Served)
    monkeypatch.chdir(tmp_path)
    cfg = finetune_config("lee_sts", {"init": "scratch"})
    out, tested = tmp_path / "lee_sts-scratch-s0", []
    for fold, pearson in enumerate([0.1, 0.2, 0.6]):
        root = runs.cv_data_root("lee_sts", 3, fold)
        assert root == Path("data/folds") / f"lee_sts-{fold}of3"
        assert [read_index(root / "shards" / "lee_sts" / s)["count"] for s in ("train", "dev", "test")] == [3, 3, 3]
        tested += json.loads((root / "raw" / "lee_sts" / "manifest.json").read_text())["documents"]["test"]
        run = tmp_path / f"lee_sts-scratch-s0-f{fold}"  # a finished fine-tune of this fold: reused, not rerun
        (run / "eval").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json") | {"data_root": str(root)}))
        recipe.stamp(run, "finetune")
        (run / "eval" / "lee_sts-test.json").write_text(json.dumps({"split": "test", "metrics": {
            "pearson": pearson, "spearman": pearson / 2}, "recipe": {"evaluate": recipe.EVALUATE}}))
    assert sorted(tested) == list(range(9))
    metrics = cv_test_metrics(cfg, out, 3)
    assert (metrics["pearson"], metrics["spearman"]) == pytest.approx((0.3, 0.15))
    assert [f["pearson"] for f in metrics["folds"]] == [0.1, 0.2, 0.6]
    assert not out.exists()  # the unfolded run is never made
    assert runs.finetune_version(out, 3) == recipe.current("finetune")  # read from the folds, not from OUT


def test_zero_shot_similarity_pairs_each_cosine_with_its_own_rating():
    rng = np.random.default_rng(0)
    topic = rng.integers(0, 4, 40)
    features = np.eye(4)[topic] + 0.3 + 0.05 * rng.standard_normal((40, 4))  # a shared offset, as in transformers
    same_topic = np.triu((topic[:, None] == topic[None]).astype(float), 1)
    scores = cosine_agreement(features, same_topic)
    assert scores["pearson"] > 0.9 and scores["centred_pearson"] > 0.9 and scores["spearman"] > 0.7  # ties: 0/1
    shuffled = cosine_agreement(features, same_topic[rng.permutation(40)][:, rng.permutation(40)])
    assert abs(shuffled["pearson"]) < 0.2


def test_attention_reach_is_the_uniform_reach_without_learned_attention_and_shorter_with_a_locality_bias():
    """Zero queries attend uniformly: each example's reach is exactly the mean |i - j| over its own unpadded tokens
    (n/3 - 1/(3n) over all queries, (n - 1)/2 from the first), padding left out; ALiBi's distance bias shortens it."""
    from d2v.modalities.registry import build_encoder

    source = torch.randint(4, 60, (3, 12))
    padding = torch.arange(12)[None] >= torch.tensor([[12], [7], [4]])
    batch = Batch(source=source.masked_fill(padding, 1), padding_mask=padding)
    torch.manual_seed(0)
    plain = build_encoder("text", "tiny", "v1")
    for block in plain.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
    uniform = [(n / 3 - 1 / (3 * n), (n - 1) / 2) for n in (12, 7, 4)]
    expected = tuple(round(float(np.mean(col)), 2) for col in zip(*uniform))
    for block in attention_reach(plain, [batch]):
        assert (block["all"], block["first"]) == (block["uniform_all"], block["uniform_first"]) == expected
    local = build_encoder("text", "embedded-alibi", "v1")
    for block in attention_reach(local, [batch]):
        assert block["all"] < 0.9 * block["uniform_all"] and block["first"] < 0.9 * block["uniform_first"]


def spoken(text: str, letters: LetterTokenizer, dim: int, rng, frames_per_letter: int = 3):
    """Frames that hold each letter's one-hot code (plus noise) for a few frames, with a silent frame after each."""
    ids = letters.encode(text)
    codes = np.eye(dim)[np.repeat(np.stack([ids, np.zeros_like(ids)], 1), [frames_per_letter, 1], axis=1).ravel()]
    return torch.tensor(codes + 0.1 * rng.standard_normal(codes.shape), dtype=torch.half), torch.tensor(ids)


def test_ctc_probe_reads_letters_that_frames_encode_linearly_and_not_from_noise():
    letters = LetterTokenizer([BLANK, WORD_SEP, "a", "b", "c", "d"])
    rng = np.random.default_rng(0)
    texts = [" ".join("".join(rng.choice(list("abcd  "), 12)).split()) or "a" for _ in range(80)]
    pairs = [spoken(t, letters, 8, rng) for t in texts]
    frames, targets = [f for f, _ in pairs], [t for _, t in pairs]
    clear = ctc_probe(frames[:64], targets[:64], frames[64:], targets[64:], texts[64:], letters, epochs=20, lr=2e-2)
    assert clear["cer"] < 0.05, clear
    noise = [torch.randn_like(f.float()).half() for f in frames]
    blind = ctc_probe(noise[:64], targets[:64], noise[64:], targets[64:], texts[64:], letters, epochs=20, lr=2e-2)
    assert blind["cer"] > 0.5 and blind["dev_loss"] > 5 * clear["dev_loss"], blind


def one_piece_blocks(batch: int = 8, length: int = 32):
    """Blocks of <s> then one random piece (4..59) repeated: a masked piece is any of its unmasked neighbours, which
    only the context tells (every piece is equally frequent)."""
    rng = np.random.default_rng(0)
    while True:
        ids = np.repeat(rng.integers(4, 60, (batch, 1)), length - 1, axis=1)
        yield Batch(source=torch.from_numpy(np.concatenate([np.zeros((batch, 1), int), ids], 1)), padding_mask=None)


def test_the_lm_head_reads_logits_through_the_token_embeddings():
    embed = torch.nn.Embedding(10, 8)
    head = LMHead(embed)
    x = torch.randn(3, 8)
    logits = head(x)
    assert logits.shape == (3, 10)
    assert torch.allclose(logits, head.norm(torch.nn.functional.gelu(head.dense(x))) @ embed.weight.T + head.bias)
    logits.sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


def test_mlm_reference_learns_a_predictable_corpus_and_writes_a_checkpoint_fine_tuning_loads(tmp_path):
    cfg = pretrain_config("text", {"preset": "tiny", "steps": 80, "optim": {"lr": 3e-3, "warmup_steps": 8}})
    result = train_mlm(cfg, one_piece_blocks(), tmp_path, log_every=20)
    assert result["first"]["loss"] > 3.5  # ln(64) = 4.16 at random init
    assert result["last"]["loss"] < 3.0 and result["last"]["masked_accuracy"] > 0.5, result["last"]  # chance: 1/56
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 20, 40, 60, 80]  # each a mean since the previous row
    state = torch.load(tmp_path / "final.pt", weights_only=False)
    assert state["pretraining"] == "mlm" and state["steps"] == 80
    model = build_model(finetune_config("rt_polarity", {"preset": "tiny", "init": "pretrained",
                                                         "pretrained": str(tmp_path / "final.pt")}))
    assert torch.equal(model.encoder.embed_tokens.weight, state["encoder"]["embed_tokens.weight"])


def test_tasks_fine_tune_the_pretrained_encoders_preset_and_a_different_one_stops_before_pretraining(tmp_path,
                                                                                                     monkeypatch):
    sets = parse_sets(["speech.preset=embedded-fbank"])
    assert encoder_presets(["speech", "text"], ["speech_1h", "lee_sts"], sets, {}, {}) == \
        {"speech": "embedded-fbank", "text": "embedded"}
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain", lambda *a: pytest.fail("pretrained despite the mismatch"))
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "speech", "--tasks", "speech_1h",
                                      "--set", "speech.preset=embedded-fbank", "--ft-set", "speech_1h.preset=embedded",
                                      "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match="speech_1h.preset=embedded: the speech encoder is pretrained as "
                                         "'embedded-fbank'"):
        pretrain_vs_scratch.main()
    assert not (tmp_path / "out.json").exists()


def test_tasks_default_to_the_profiles_and_a_missing_split_stops_before_pretraining(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for split in ("train_1h", "dev_clean", "test_clean", "test_other"):  # dev_other missing
        (data / "shards" / "mini_librispeech" / split).mkdir(parents=True)
        (data / "shards" / "mini_librispeech" / split / "index.json").write_text("{}")
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain", lambda *a: pytest.fail("pretrained despite missing shards"))
    # the embedded profile fine-tunes speech_1h only (speech_10min's train_1h-10min is never sharded by it)
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "speech", "--ft-profile", "embedded",
                                      "--set", "speech.preset=embedded-fbank", "--ft-set",
                                      f"speech_1h.data_root={data}", "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as stop:
        pretrain_vs_scratch.main()
    assert str(stop.value).splitlines()[1:3] == [f"  speech_1h: {data}/shards/mini_librispeech/dev_other",
                                                 "run `make run` (or `d2v prepare` and `d2v shard`) first, or name the "
                                                 "tasks to run with --tasks"]
    assert not (tmp_path / "out.json").exists()
    assert pretrain_vs_scratch.missing_shards(["speech_1h"], {"speech_1h": {"data_root": str(data)}}, {}) == \
        [f"speech_1h: {data}/shards/mini_librispeech/dev_other"]
    assert pretrain_vs_scratch.missing_shards(["speech_10min"], {}, {"speech_10min": 5}) == []  # folds shard their own


def test_per_modality_and_per_task_options_parse_key_value_lists_and_name_a_bare_value(monkeypatch, capsys):
    assert pretrain_vs_scratch.per_key()("image=600,text=150") == {"image": 600, "text": 150}
    assert pretrain_vs_scratch.per_key(str)("text=runs/mlm/final.pt") == {"text": "runs/mlm/final.pt"}
    assert pretrain_vs_scratch.per_key()("") == {}
    for argv, expected in ((["--pretrain-steps", "600"], "argument --pretrain-steps: '600' is not KEY=VALUE"),
                           (["--folds", "lee_sts=x"], "argument --folds: 'lee_sts=x': 'x' is not int")):
        monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", *argv])
        with pytest.raises(SystemExit):
            pretrain_vs_scratch.main()
        assert expected in capsys.readouterr().err


def test_a_params_profile_gives_each_task_the_pipelines_fine_tuning_under_the_benchs_own_overrides(tmp_path,
                                                                                                    monkeypatch):
    from d2v.pipeline.params import load_params

    profile = load_params("params.yaml", "embedded").active
    built = []
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain", lambda *a: (tmp_path / "final.pt", {"objective": "v2"}))
    monkeypatch.setattr(pretrain_vs_scratch, "cv_test_metrics",
                        lambda cfg, run, folds, lm, any_version: built.append(cfg) or {"accuracy": 0.5})
    out, data = tmp_path / "out.json", tmp_path / "data"
    for split in ("train_6k", "test"):
        (data / "shards" / "fashion_mnist" / split).mkdir(parents=True)
        (data / "shards" / "fashion_mnist" / split / "index.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "image", "--tasks", "fashion_mnist",
                                      "--seeds", "1", "--objective", "image=v2", "--ft-profile", "embedded",
                                      "--finetune-steps", "fashion_mnist=7", "--ft-set", "fashion_mnist.batch_size=16",
                                      "--ft-set", f"fashion_mnist.data_root={data}",
                                      "--runs", str(tmp_path / "runs"), "--out", str(out)])
    pretrain_vs_scratch.main()
    for cfg, init in zip(built, ("pretrained", "scratch"), strict=True):
        pipeline = profile.finetune_config("fashion_mnist", init, 0).model_dump()
        pipeline.update(steps=7, batch_size=16, pretrained=str(tmp_path / "final.pt") if init == "pretrained" else None,
                        data_root=str(data))
        assert cfg.model_dump() == pipeline  # flips only, as the pipeline fine-tunes
    row = json.loads(out.read_text())["tasks"]["fashion_mnist"]
    assert row["ft_profile"] == "embedded" and row["overrides"]["image"]["randaugment_magnitude"] == 0
    assert row["overrides"]["batch_size"] == 16 and row["finetune_steps"] == 7

    # the profile's speech_1h fine-tunes the log-mel encoder: a waveform pretraining stops before it starts
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain", lambda *a: pytest.fail("pretrained despite the mismatch"))
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "speech", "--tasks", "speech_1h",
                                      "--ft-profile", "embedded", "--out", str(tmp_path / "speech.json")])
    with pytest.raises(SystemExit, match="speech_1h.preset=embedded-fbank: the speech encoder is pretrained as "
                                         "'embedded'"):
        pretrain_vs_scratch.main()


def test_the_recorded_fine_tuning_overrides_are_the_ones_each_run_used(tmp_path, monkeypatch):
    """--finetune-steps once replaced the steps in every config but not in the record, which kept the profile's 100."""
    used = []
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain", lambda *a: (tmp_path / "final.pt", {"objective": "v1"}))
    monkeypatch.setattr(pretrain_vs_scratch, "missing_shards", lambda *a: [])
    monkeypatch.setattr(pretrain_vs_scratch, "cv_test_metrics",
                        lambda cfg, run, folds, lm, any_version:
                        used.append(cfg) or {"accuracy": 0.6 + 0.01 * cfg.seed})
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "rt_polarity",
                                      "--seeds", "2", "--ft-profile", "embedded", "--ft-set", "rt_polarity.steps=7",
                                      "--finetune-steps", "rt_polarity=40", "--runs", str(tmp_path), "--out", str(out)])
    pretrain_vs_scratch.main()
    row = json.loads(out.read_text())["tasks"]["rt_polarity"]
    assert [(c.init, c.seed, c.steps) for c in used] == [("pretrained", 0, 40), ("pretrained", 1, 40),
                                                         ("scratch", 0, 40), ("scratch", 1, 40)]
    assert row["finetune_steps"] == row["overrides"]["steps"] == 40
    assert row["overrides"]["optim"]["lr"] == used[0].optim.lr == 1e-3  # the profile's recipe, recorded as run
    assert row["scratch"]["values"] == [0.6, 0.61]


def test_a_tokenizer_reaches_the_text_pretraining_and_every_text_fine_tune_unless_a_task_names_its_own(tmp_path,
                                                                                                       monkeypatch):
    """A smaller vocabulary (preset embedded-vocab1k) must be read by the pretraining's vocabulary check and by
    every fine-tune's loader, or the encoder meets ids of the pipeline's 8,000-piece model."""
    asked, used, real_pretrain = [], [], pretrain_vs_scratch.pretrain
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain",
                        lambda *a, **kw: asked.append(kw) or (tmp_path / "final.pt", {"objective": "v1"}))
    monkeypatch.setattr(pretrain_vs_scratch, "missing_shards", lambda *a: [])
    monkeypatch.setattr(pretrain_vs_scratch, "cv_test_metrics",
                        lambda cfg, run, folds, lm, any_version: used.append(cfg) or {"accuracy": 0.6, "mcc": 0.1})
    spm = str(tmp_path / "vocab1000" / "spm.model")
    argv = ["pretrain_vs_scratch.py", "--modalities", "text", "--tasks", "rt_polarity,bible_para", "--seeds", "1",
            "--tokenizer", spm, "--set", "text.preset=embedded-vocab1k", "--runs", str(tmp_path),
            "--out", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", argv)
    pretrain_vs_scratch.main()
    assert asked == [{"tokenizer": spm}]
    assert [(c.task, c.init, c.tokenizer, c.preset) for c in used] == [
        (task, init, spm, "embedded-vocab1k") for task in ("rt_polarity", "bible_para")
        for init in ("pretrained", "scratch")]
    used.clear()
    monkeypatch.setattr(sys, "argv", argv[:-1] + [str(tmp_path / "own.json"), "--ft-set",
                                                  "bible_para.tokenizer=other.model"])
    pretrain_vs_scratch.main()
    assert [c.tokenizer for c in used] == [spm, spm, "other.model", "other.model"]

    # the pretraining itself: its vocabulary check reads the given model, and the record names it
    checked = []
    monkeypatch.setattr(pretrain_vs_scratch, "pretrain_seconds",
                        lambda cfg, run, tokenizer: checked.append(tokenizer) or 1.0)
    for modality in ("text", "image"):
        (tmp_path / "runs" / "pretrain" / modality).mkdir(parents=True)
        (tmp_path / "runs" / "pretrain" / modality / "summary.json").write_text(json.dumps({"first": {}, "last": {}}))
    _, record = real_pretrain("text", "v1", None, {"preset": "embedded-vocab1k"}, tmp_path / "runs", tokenizer=spm)
    assert checked == [spm] and record["tokenizer"] == spm
    real_pretrain("image", "v1", None, {}, tmp_path / "runs")  # no tokenizer for another modality
    assert checked == [spm, None]


def test_a_stopped_bench_pretraining_hands_its_time_to_the_call_that_resumes_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM stops a bench's pretraining after a checkpoint (Interrupted): the bench ends as the CLI does,
    and the call that resumes the run records the time of both parts, not the resumed part's alone."""
    import signal

    from d2v.train.preemption import Interrupted

    now, run = [0.0], tmp_path / "run"
    monkeypatch.setattr("d2v.train.logging.time.perf_counter", lambda: now[0])  # the clock pretrain_seconds reads

    def stopped_after_30_seconds(cfg, out, tokenizer=None, progress=True):
        out.mkdir(parents=True, exist_ok=True)
        now[0] += 30.0
        raise Interrupted(signal.SIGINT, 4, str(out / "checkpoints"))

    def finished_after_20_seconds(cfg, out, tokenizer=None, progress=True):
        now[0] += 20.0
        (out / "final.pt").write_bytes(b"")

    cfg = pretrain_config("text", {"steps": 6})
    monkeypatch.setattr(runs, "pretrain_main", stopped_after_30_seconds)
    monkeypatch.setattr(sys, "argv", ["pretrain_vs_scratch.py"])
    with pytest.raises(SystemExit) as ended:
        runs.stops_with_a_checkpoint(lambda: runs.pretrain_seconds(cfg, run))()
    assert ended.value.code == 130
    assert capsys.readouterr().err == ("pretrain_vs_scratch.py: stopped by SIGINT after step 4; its checkpoint in "
                                       f"{run / 'checkpoints'} resumes the run: start the same command again\n")
    assert json.loads((run / "timing.partial.json").read_text()) == {"seconds": 30.0}
    monkeypatch.setattr(runs, "pretrain_main", finished_after_20_seconds)
    assert runs.pretrain_seconds(cfg, run) == 50.0
    assert json.loads((run / "timing.json").read_text()) == {"seconds": 50.0}
    assert not (run / "timing.partial.json").exists()


def test_the_probe_times_a_step_without_its_start_up_and_picks_the_longest_run_that_fits(tmp_path, monkeypatch,
                                                                                          capsys):
    # a loop that spends 8 s starting up, then 25 ms a step at 16 samples a step: the cumulative throughput it logs
    steps = np.array([1, *range(10, 201, 10)])
    elapsed = 8.0 + 0.025 * steps
    log = pd.DataFrame({"step": steps, "loss": 1.0, "samples_per_s": steps * 16 / elapsed})
    assert fit_steps.step_seconds(log, 16, skip=50) == pytest.approx(0.025)
    assert 16 / log.samples_per_s.iloc[-1] == pytest.approx(0.065)  # the loop's average counts the start-up
    assert fit_steps.longest_fitting([2400, 4800, 9600, 19200], 0.025, budget=300, margin=1.15) == 9600
    assert fit_steps.longest_fitting([2400, 4800], 0.2, budget=300, margin=1.15) is None
    with pytest.raises(ValueError, match="two logged steps past step 200"):
        fit_steps.step_seconds(log, 16, skip=200)

    probe = tmp_path / "probe"
    probe.mkdir()
    log.to_csv(probe / "metrics.csv", index=False)
    (probe / "config.json").write_text(json.dumps({"data": {"batch_size": 8}, "accum_steps": 2}))
    record = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["fit_steps.py", str(probe / "metrics.csv"), "--budget", "300",
                                      "--candidates", "19200,9600,4800,2400", "--out", str(record)])
    fit_steps.main()
    assert capsys.readouterr().out.strip() == "9600"
    assert json.loads(record.read_text())["step_seconds"] == pytest.approx(0.025)
    monkeypatch.setattr(sys, "argv", ["fit_steps.py", str(probe / "metrics.csv"), "--budget", "30",
                                      "--candidates", "4800,2400"])
    with pytest.raises(SystemExit, match="25.0 ms.*not even 2400 steps fit 30 s"):
        fit_steps.main()


def test_the_update_profile_records_an_updates_wall_time_and_its_costliest_host_ops(tmp_path, monkeypatch):
    import update_profile

    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["update_profile.py", "--modality", "image", "--objective", "v2", "--preset",
                                      "tiny", "--batch", "2", "--clones", "2", "--steps", "2", "--profiled", "1",
                                      "--out", str(out)])
    update_profile.main()
    report = json.loads(out.read_text())
    assert report["clones"] == 2 and report["wall_ms"] > 0 and report["samples_per_s"] > 0
    costs = [row["self_ms"] for row in report["host_ops"]]
    assert costs and costs == sorted(costs, reverse=True)
    assert any(row["op"] in ("aten::mm", "aten::addmm") for row in report["host_ops"])
    assert report["device_busy_share"] is None and report["launches"] == 0  # a CPU run has no kernels to count


def test_the_decoder_layout_bench_times_each_layout_and_they_compute_the_same(tmp_path, monkeypatch):
    import decoder_layouts

    out = tmp_path / "layouts.json"
    monkeypatch.setattr(sys, "argv", ["decoder_layouts.py", "--rows", "2", "--steps", "2", "--out", str(out)])
    decoder_layouts.main()
    report = json.loads(out.read_text())
    assert [(r["layout"], r["cudnn_benchmark"]) for r in report["results"]] == \
        [(layout, bench) for bench in (False, True) for layout in ("view", "channels_first", "channels_last")]
    assert all(r["median_ms"] > 0 and r["max_abs_diff"] < 1e-5 for r in report["results"])
    assert not torch.backends.cudnn.benchmark  # left as training has it
    decoder = build_objective(pretrain_config("image", {"preset": "tiny", "objective": "v2"})).decoder
    with decoder_layouts.laid_out(decoder, "channels_last"):
        assert decoder.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert decoder.convs[0].weight.is_contiguous() and "_to_channels_first" not in vars(decoder)


def test_the_attention_bench_times_the_biased_kernel_against_flash_and_checks_the_bias_gradient(tmp_path,
                                                                                                monkeypatch):
    import attention_kernels

    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["attention_kernels.py", "--batch", "2", "--heads", "2", "--tokens", "9",
                                      "--head-dim", "8", "--steps", "2", "--out", str(out)])
    attention_kernels.main()
    sdpa, unbiased = json.loads(out.read_text())["results"]  # FlexAttention only on CUDA (no CPU backward)
    assert (sdpa["kernel"], unbiased["kernel"]) == ("sdpa_bias", "sdpa_no_bias")
    assert sdpa["max_abs_diff_bias_grad"] == 0.0 and "max_abs_diff_out" not in unbiased
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    bias = torch.randn(2, 9, 9)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5 + bias  # what the biased kernels compute
    torch.testing.assert_close(attention_kernels.sdpa_biased(q, k, v, bias), scores.softmax(-1) @ v)


def test_count_vectors_put_ids_that_share_their_contexts_together():
    """Ids 0 and 1 only ever stand between 2 and 3, ids 4 and 5 between 6 and 7: positive PMI + SVD makes each pair
    alike and the two pairs unlike; ids < 0 (out of the vocabulary) count for nothing."""
    from count_embeddings import ppmi_vectors

    rng = np.random.default_rng(0)
    sequences = [np.array(list(p) + [-1]) for p in
                 [(2, rng.choice([0, 1]), 3) if rng.random() < 0.5 else (6, rng.choice([4, 5]), 7) for _ in range(400)]]
    vectors, counts = ppmi_vectors(sequences, 8, dim=4, window=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > 0.9 and unit[4] @ unit[5] > 0.9 and abs(unit[0] @ unit[4]) < 0.1
    assert counts.sum() == 1200 and counts[2] + counts[6] == 400


def test_word_similarity_reads_each_word_alone_and_scores_cosines_by_rank(tmp_path):
    import word_similarity as ws

    from d2v.data.sources import Context
    from d2v.data.sources.text import WORDSIM, word_pairs
    from d2v.data.tokenizer import SentencePieceConfig, TextTokenizer, train_sentencepiece
    from d2v.modalities.registry import build_encoder

    class Served(Context):  # WordSim's file without the gensim wheel
        def read(self, member):
            return b"# a comment\nold\tnew\t1.5\ncat\ttiger\t7.35\n" if member is WORDSIM else b"a\tb\n"

    ctx = Served(tmp_path, tmp_path)
    assert word_pairs(ctx, WORDSIM) == [("old", "new", 1.5), ("cat", "tiger", 7.35)]
    with pytest.raises(ValueError, match=r"simlex999.txt:1: expected 'word<TAB>word<TAB>rating', got 'a\\tb'"):
        word_pairs(ctx, ws.SIMLEX)
    lines = [f"the {w} sat on the mat near a tigerish catalogue number {i}" for i, w in
             enumerate(["cat", "tiger", "dog", "old", "new"] * 60)]
    spm = train_sentencepiece(lines, tmp_path / "spm.model", SentencePieceConfig(vocab_size=60, num_threads=1,
                                                                                seed_sentencepiece_size=10_000))
    tokenizer, encoder = TextTokenizer(spm), build_encoder("text", "tiny").eval()
    words = ["cat", "tigerish", "catalogue"]
    together = ws.encoder_word_vectors(encoder, tokenizer, words)
    for i, word in enumerate(words):  # padded beside longer words, a word's vectors are its own
        alone = ws.encoder_word_vectors(encoder, tokenizer, [word])
        for kind in ("table", "layers"):
            for a, b in zip(alone[kind], together[kind]):
                np.testing.assert_allclose(a[0], b[i], atol=1e-5)
    ids = tokenizer.encode("catalogue")[1:-1]
    np.testing.assert_allclose(together["table"][0][2], encoder.embed_tokens.weight[ids].mean(0).detach(), atol=1e-6)
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    angles = np.array([0.0, 0.3, 1.0, 1.5])  # cos(a, x) falls as the angle grows
    vectors = np.stack([np.cos(angles), np.sin(angles)], 1)
    pairs = [("a", "b", 9.0), ("a", "c", 5.0), ("a", "d", 1.0)]
    assert ws.agreement(vectors, index, pairs)["spearman"] == 1.0
    assert ws.agreement(vectors, index, [(a, b, -r) for a, b, r in pairs])["spearman"] == -1.0


def test_word_similarity_times_each_checkpoint_to_the_references_scores():
    import word_similarity as ws

    def entry(layers, table, steps):
        scores = lambda values: [{"all": {"centred_spearman": v}, "covered": {}} for v in values]  # noqa: E731
        return {"steps": steps, "wordsim353": {"layers": scores(layers), "table": scores([table])}}
    encoders = {"random": entry([0.04, 0.05], 0.0, 0), "v1/student": entry([0.10, 0.08], 0.20, 1200),
                "v2-600/student": entry([0.06, 0.11], 0.12, 600), "v2-1200/student": entry([0.05, 0.09], 0.25, 1200),
                "counts/student": entry([0.2, 0.2], 0.3, 0)}
    out = ws.time_to_reference(encoders, "v1", {"v1": 1000.0, "v2-600": 1250.0, "v2-1200": 2500.0})
    rows = {row["encoder"]: row for row in out["rows"]}
    assert set(rows) == {"v2-600/student", "v2-1200/student"}  # no time for the count vectors
    assert rows["v2-600/student"]["reaches_best_layer"] and not rows["v2-600/student"]["reaches_table"]
    assert rows["v2-600/student"]["best_layer"] == 0.11 and rows["v2-600/student"]["reference_best_layer"] == 0.10
    assert not rows["v2-1200/student"]["reaches_best_layer"] and rows["v2-1200/student"]["reaches_table"]
    assert rows["v2-600/student"]["speedup"] == 0.8 and rows["v2-1200/student"]["speedup"] == 0.4
    rng = np.random.default_rng(0)  # the bootstrap: a clearly better encoder's interval excludes 0, a copy's is 0
    ratings = rng.random(300)
    good, poor = ratings + 0.1 * rng.standard_normal(300), ratings + 0.6 * rng.standard_normal(300)
    cosines = {"v1/student": {"best_layer": poor, "table": good}, "v2-600/student": {"best_layer": good, "table": good}}
    out = ws.time_to_reference({k: encoders[k] for k in cosines}, "v1", {"v1": 1000.0, "v2-600": 1250.0},
                               cosines=cosines, ratings=ratings)
    assert out["rows"][0]["best_layer_gain_interval"][0] > 0.1 and out["rows"][0]["table_gain_interval"] == [0, 0]
    with pytest.raises(SystemExit, match="no pretraining time"):
        ws.time_to_reference(encoders, "v1", {"v2-600": 1.0})
    with pytest.raises(SystemExit, match="not the NAME of a --pretrained"):
        ws.time_to_reference(encoders, "v3", {"v3": 1.0})
