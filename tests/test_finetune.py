"""Fine-tuning on tiny shards (built here, and by conftest.toy_image_task): it learns, probes leave the encoder
alone, CTC freezing works and CTC learns to transcribe, pretrained weights load, and evaluation writes the promised
JSON."""
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import flac_bytes, tone_task_shards

from d2v.data.manifest import make_manifest, write_manifest
from d2v.data.shards import ShardConfig, write_shards
from d2v.data.tokenizer import LetterTokenizer, build_letter_vocab
from d2v.eval import lm
from d2v.modalities.registry import build_encoder
from d2v.config import config_digest
from d2v.eval import evaluate as ev
from d2v.modalities.base import Batch
from d2v.train import finetune as ft
from d2v.train import recipe
from d2v.train import task_data, task_model
from d2v.train import tasks
from d2v.train.distributed import resolve_device


def test_image_finetune_learns_and_evaluate_writes_json(toy_image_task, tmp_path, capsys):
    ft.run_finetune(toy_image_task, tmp_path / "run", progress=False)
    (result,) = ev.evaluate(tmp_path / "run")
    assert result["metrics"]["accuracy"] >= 0.9 and result["n"] == result["n_split"] == 16
    saved = json.loads((tmp_path / "run" / "eval" / "toy_image-test.json").read_text())
    assert {"metrics", "n", "seed", "commit", "params_digest", "split", "task"} <= saved.keys()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", saved["commit"])
    assert saved["params_digest"] == config_digest(toy_image_task)
    assert saved["recipe"] == {"finetune": recipe.FINETUNE, "evaluate": recipe.EVALUATE}
    assert saved["predictions"] == {"classes_predicted": 2, "majority_share": 0.5, "degenerate": False}
    assert recipe.in_result(saved, "finetune") == recipe.recorded(tmp_path / "run", "finetune")
    import tarfile  # an image damaged in its test shard (same size): skipped, and the JSON and stderr say so
    shard = tmp_path / "shards" / "toy" / "test" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        png = next(m for m in tar if m.name.endswith(".png"))
    with open(shard, "r+b") as f:
        f.seek(png.offset_data)
        f.write(b"not a png")
    (damaged,) = ev.evaluate(tmp_path / "run")
    assert (damaged["n"], damaged["n_split"]) == (15, 16)
    assert "toy_image test: scored 15 of the split's 16 examples" in capsys.readouterr().err


def test_linear_probe_leaves_the_encoder_untouched(toy_image_task, tmp_path):
    cfg = toy_image_task.model_copy(update={"mode": "probe", "steps": 5})
    before = task_model.build_model(cfg).encoder.state_dict()
    ft.run_finetune(cfg, tmp_path / "probe", progress=False)
    after = torch.load(tmp_path / "probe" / "final.pt", weights_only=False)["model"]
    for k, v in before.items():
        assert torch.equal(after[f"encoder.{k}"], v), k
    assert not torch.equal(after["head.weight"], task_model.build_model(cfg).head.weight)


@pytest.mark.parametrize("objective", ["v1", "v2"])
def test_layer_decay_is_beit_for_v1_blocks_only_for_v2_and_off_from_scratch(toy_image_task, objective):
    cfg = toy_image_task.model_copy(update={"objective": objective})
    model = task_model.build_model(cfg)
    scratch_groups = task_model.param_groups(model, cfg)  # a random encoder trains every layer at the full LR
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in scratch_groups)
    assert sum(len(g["params"]) for g in scratch_groups) == len(list(model.parameters()))
    cfg = cfg.model_copy(update={"init": "pretrained"})
    depth, decay = model.encoder.cfg.depth, cfg.layer_decay
    scale_of = {id(p): g["lr_scale"] for g in task_model.param_groups(model, cfg) for p in g["params"]}
    scales = {name: scale_of[id(p)] for name, p in model.named_parameters()}
    for name, scale in scales.items():
        if name.startswith("encoder.blocks."):  # block i: decay^(depth - i), the top block decay^1
            expected = decay ** (depth - int(name.split(".")[2]))
        elif objective == "v1" and name.split(".")[1] in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
            expected = decay ** (depth + 1)
        else:  # v1: relative-position table, norms and head (BEiT); v2: everything outside the blocks (fairseq)
            expected = 1.0
        assert scale == pytest.approx(expected), name
    assert scales["encoder.patch_embed.weight"] == pytest.approx(1.0 if objective == "v2" else decay ** (depth + 1))
    if objective == "v1":
        assert scales["encoder.rel_pos_bias.table"] == scales["head.weight"] == 1.0
    # an encoder LR share multiplies into layer decay: every encoder parameter at 0.15 of its decayed LR
    shared = cfg.model_copy(update={"encoder_lr_scale": 0.15})
    shared_of = {id(p): g["lr_scale"] for g in task_model.param_groups(model, shared) for p in g["params"]}
    for name, p in model.named_parameters():
        expected = scales[name] * (0.15 if name.startswith("encoder.") else 1.0)
        assert shared_of[id(p)] == pytest.approx(expected), name


def test_pretrained_weights_load_and_mismatches_are_refused(toy_image_task, tmp_path):
    encoder = build_encoder("image", "tiny")
    torch.save({"encoder": encoder.state_dict(), "modality": "image", "preset": "tiny"}, tmp_path / "final.pt")
    cfg = toy_image_task.model_copy(update={"init": "pretrained", "pretrained": str(tmp_path / "final.pt")})
    model = task_model.build_model(cfg)
    for k, v in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)
    torch.save({"encoder": {}, "modality": "speech", "preset": "tiny"}, tmp_path / "speech.pt")
    with pytest.raises(ValueError, match="the encoder speech/tiny/v1, finetune.toy_image.pretrained needs "
                                         "image/tiny/v1"):
        task_model.build_model(cfg.model_copy(update={"pretrained": str(tmp_path / "speech.pt")}))
    with pytest.raises(FileNotFoundError, match="missing.pt' does not exist; expected a pretraining final.pt"):
        task_model.build_model(cfg.model_copy(update={"pretrained": str(tmp_path / "missing.pt")}))
    with pytest.raises(FileNotFoundError, match=r"is a folder \(holding .*/final.pt\); expected a "):
        task_model.build_model(cfg.model_copy(update={"pretrained": str(tmp_path)}))  # the run, not its final.pt


def test_weights_teacher_starts_from_the_ema_teacher(toy_image_task, tmp_path):
    torch.manual_seed(0)
    student, teacher = build_encoder("image", "tiny"), build_encoder("image", "tiny")
    final = {"encoder": student.state_dict(), "teacher": teacher.state_dict(), "modality": "image", "preset": "tiny"}
    torch.save(final, tmp_path / "final.pt")
    cfg = toy_image_task.model_copy(update={"init": "pretrained", "pretrained": str(tmp_path / "final.pt")})
    for weights, expected in (("student", student), ("teacher", teacher)):
        loaded = task_model.build_model(cfg.model_copy(update={"weights": weights})).encoder.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.state_dict().items()), weights
    assert not torch.equal(student.state_dict()["patch_embed.weight"],
                           teacher.state_dict()["patch_embed.weight"])
    # an imported checkpoint without an EMA teacher stores the student twice: its "teacher" is refused
    torch.save({**final, "teacher": final["encoder"], "imported": "fairseq", "has_teacher": False,
                "source": "release.pt"}, tmp_path / "imported.pt")
    with pytest.raises(ValueError, match="weights: teacher, but .*imported.pt was imported from release.pt without"):
        task_model.build_model(cfg.model_copy(update={"pretrained": str(tmp_path / "imported.pt"),
                                                      "weights": "teacher"}))
    torch.save({k: v for k, v in final.items() if k != "teacher"}, tmp_path / "student_only.pt")
    with pytest.raises(ValueError, match="student_only.pt holds no teacher"):
        task_model.build_model(cfg.model_copy(update={"pretrained": str(tmp_path / "student_only.pt"),
                                                      "weights": "teacher"}))
    with pytest.raises(ValueError, match="weights: teacher needs init: pretrained"):
        tasks.finetune_config("rt_polarity", {"init": "scratch", "weights": "teacher"})


def test_fine_tuning_sets_its_own_regularization_and_still_loads_the_pretrained_encoder(toy_image_task, tmp_path):
    encoder = build_encoder("image", "tiny", "v2")  # pretrained without drop-path, as data2vec 2.0
    torch.save({"encoder": encoder.state_dict(), "modality": "image", "preset": "tiny", "objective": "v2"},
               tmp_path / "final.pt")
    cfg = toy_image_task.model_copy(update={"init": "pretrained", "pretrained": str(tmp_path / "final.pt"),
                                            "objective": "v2", "regularization": tasks.Regularization(drop_path=0.1)})
    model = task_model.build_model(cfg)
    assert model.encoder.cfg.drop_path == 0.1 and encoder.cfg.drop_path == 0.0
    rates = [block.drop_path.p for block in model.encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)  # linear in depth
    for k, v in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    speech = tasks.finetune_config("speech_1h", {"preset": "tiny", "regularization": {"layerdrop": 0.1,
                                                                                     "activation_dropout": 0.1}})
    letters = tmp_path / "letters.json"
    LetterTokenizer(build_letter_vocab(["ab c"])).save(letters)
    ctc = task_model.build_model(speech.model_copy(update={"init": "scratch", "letters": str(letters)}))
    assert (ctc.encoder.cfg.layerdrop, ctc.encoder.cfg.activation_dropout) == (0.1, 0.1)
    assert ctc.encoder.cfg.dropout == build_encoder("speech", "tiny").cfg.dropout  # unset: the preset's


def test_regularization_that_does_not_fit_the_encoder_is_refused():
    with pytest.raises(ValueError, match=r"\['layerdrop'\] do not apply to the image encoder; it takes "
                                         r"\['dropout', 'attn_dropout', 'drop_path'\]"):
        tasks.finetune_config("fashion_mnist", {"regularization": {"layerdrop": 0.1}})
    with pytest.raises(ValueError, match="finetune.speech_1h.regularization.dropout: Input should be less than 1"):
        tasks.finetune_config("speech_1h", {"regularization": {"dropout": 1.5}})
    for modality, fields in tasks.REGULARIZERS.items():  # each names a field of that encoder's config
        assert set(fields) <= set(type(build_encoder(modality, "tiny").cfg).model_fields), modality


def test_mixing_mixes_the_mix_prob_share_of_batches_with_mixup_or_cutmix(toy_image_task):
    cfg = toy_image_task.model_copy(update={"mixup": 0.8, "cutmix": 1.0, "mix_prob": 0.5})
    x, y = torch.rand(8, 1, 32, 32), torch.arange(8) % 4
    torch.manual_seed(0)
    mixer, mixed, changed = ft.mix(cfg, 4), 0, 0
    for _ in range(200):
        xs, ys = mixer(x, y)
        if ys.ndim == 2:  # soft labels: a mixed batch (a CutMix box can come out empty, leaving the images)
            mixed, changed = mixed + 1, changed + (not torch.equal(xs, x))
            torch.testing.assert_close(ys.sum(1), torch.ones(8))
        else:
            assert torch.equal(xs, x) and torch.equal(ys, y)
    assert 70 < mixed < 130 and changed > 0.9 * mixed  # binomial(200, 0.5): 100 ± 7
    always = ft.mix(cfg.model_copy(update={"mix_prob": 1.0}), 4)
    assert all(always(x, y)[1].ndim == 2 for _ in range(20))
    assert ft.mix(cfg.model_copy(update={"mix_prob": 0.0}), 4) is None
    assert ft.mix(cfg.model_copy(update={"mixup": 0.0, "cutmix": 0.0}), 4) is None


TOY_TEXTS = ["AB A", "B AB", "A A B", "BA"]


def toy_ctc_data(root: Path, shards: ShardConfig | None = None) -> None:
    """8 tone utterances of TOY_TEXTS as the "toy" dataset's train split, its first 3 as another dataset's
    ("human/test"), their letters, and a bigram LM of the texts in `root / "lm"`."""
    rows = []
    (root / "raw").mkdir()
    for i, text in enumerate(TOY_TEXTS * 2):
        (root / "raw" / f"{i}.flac").write_bytes(flac_bytes(0.6 + 0.1 * (i % 3), freq=150 + 40 * i))
        rows.append(dict(id=f"u{i}", path=f"{i}.flac", split="train", duration=0.7, text=text))
    write_manifest(root / "raw", make_manifest(rows), source="mini_librispeech")
    write_shards(root / "raw", "train", root / "shards" / "toy" / "train", shards)
    write_shards(root / "raw", "train", root / "shards" / "human" / "test", limit=3)  # another dataset
    LetterTokenizer(build_letter_vocab(TOY_TEXTS)).save(root / "letters.json")
    (root / "lm.txt").write_text("\n".join(TOY_TEXTS) + "\n")
    lm.build(lm.LanguageModelConfig(corpus="toy", order=2, lm_weights=(0.5, 1.0), word_scores=(0.0,)),
             LetterTokenizer.load(root / "letters.json").symbols, root / "lm", [root / "lm.txt"])


def test_ctc_freezes_the_cnn_and_trains_only_the_head_at_first(tmp_path, monkeypatch):
    toy_ctc_data(tmp_path)
    monkeypatch.setitem(tasks.TASKS, "toy_ctc", tasks.Task("speech", "ctc", "toy", "train", "train", ("train",),
                                                           ("wer", "cer"), extra_tests=("human/test",)))
    cfg = tasks.FinetuneConfig(task="toy_ctc", init="scratch", preset="tiny", steps=4, batch_size=4,
                               optim=dict(lr=1e-3, schedule="tri_stage"), freeze_encoder_steps=2,
                               audio=dict(min_samples=0), data_root=str(tmp_path),
                               letters=str(tmp_path / "letters.json"))
    before = task_model.build_model(cfg).state_dict()
    ft.run_finetune(cfg.model_copy(update={"steps": 2}), tmp_path / "frozen", progress=False)
    after = torch.load(tmp_path / "frozen" / "final.pt", weights_only=False)["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # only the output layer during the frozen phase
    ft.run_finetune(cfg, tmp_path / "thawed", progress=False)
    after = torch.load(tmp_path / "thawed" / "final.pt", weights_only=False)["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder.blocks") for k in changed)
    assert not any(k.startswith("encoder.feature_extractor") for k in changed)  # the CNN stays frozen
    result, human = ev.evaluate(tmp_path / "thawed", extra=("human/test",))
    assert result["n"] == 8 and set(result["metrics"]) == {"wer", "cer"} and result["metrics"]["wer"] >= 0
    assert (human["split"], human["n"]) == ("human/test", 3)  # read from the other dataset's shards
    assert (tmp_path / "thawed" / "eval" / "toy_ctc-human-test.json").is_file()
    with pytest.raises(ValueError, match=r"toy_ctc: no extra test set \['other/test'\]; it has \['human/test'\]"):
        ev.evaluate(tmp_path / "thawed", extra=("other/test",))
    # with a language model: greedy as before, plus beam search under the weights the dev split ("train") chose
    decoded, human_decoded = ev.evaluate(tmp_path / "thawed", extra=("human/test",), lm=tmp_path / "lm",
                                         out=tmp_path / "lm_eval")
    assert decoded["metrics"]["wer"] == result["metrics"]["wer"] and {"wer_lm", "cer_lm"} <= set(decoded["metrics"])
    assert decoded["lm"]["tuned_on"] == human_decoded["lm"]["tuned_on"] == "train"
    assert len(decoded["lm"]["tuning"]["grid"]) == 2 and decoded["lm"]["lm_weight"] in (0.5, 1.0)
    assert set(json.loads((tmp_path / "lm_eval" / "toy_ctc-train.json").read_text())["metrics"]) == \
        {"wer", "cer", "wer_lm", "cer_lm"}
    pooled = ev.evaluate(tmp_path / "thawed", extra=("human/test",), lm=tmp_path / "lm", out=tmp_path / "lm_eval2",
                         decode_workers=2)  # beam search in forked workers, after the model ran in this process
    assert [r["metrics"] for r in pooled] == [decoded["metrics"], human_decoded["metrics"]]
    ft.run_finetune(cfg.model_copy(update={"train_cnn": True}), tmp_path / "cnn", progress=False)
    after = torch.load(tmp_path / "cnn" / "final.pt", weights_only=False)["model"]
    assert any(k.startswith("encoder.feature_extractor") and not torch.equal(before[k], v) for k, v in after.items())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-fbank"])
def test_ctc_fine_tuning_learns_to_transcribe_end_to_end(tmp_path, monkeypatch, preset):
    """Shards -> loader -> CTC loss -> greedy decoding -> WER: a scratch model learns to transcribe tone 'speech'
    (it memorises four utterances; any misaligned length, label or decoding step would keep it at WER 1)."""
    texts = ["AB C", "CA", "B CB", "AC B"]
    letters = tone_task_shards(tmp_path, texts)
    monkeypatch.setitem(tasks.TASKS, "tones",
                        tasks.Task("speech", "ctc", "tones", "train", None, ("train",), ("wer", "cer")))
    cfg = tasks.FinetuneConfig(task="tones", init="scratch", preset=preset, steps=160, batch_size=4,
                               optim=dict(lr=3e-3, schedule="constant"), ctc_masks=dict(time_prob=0, channel_prob=0),
                               audio=dict(min_samples=0), data_root=str(tmp_path), letters=str(letters))
    ft.run_finetune(cfg, tmp_path / "run", progress=False)
    (result,) = ev.evaluate(tmp_path / "run", checkpoint_name="final.pt")
    # WER and CER reach 0 from about 120 steps, seeds 0-2
    assert result["n"] == 4 and result["metrics"]["wer"] <= 0.25 and result["metrics"]["cer"] <= 0.25
    # beam search with a bigram of the transcripts keeps what greedy got right: every word, the last ones too
    (tmp_path / "lm.txt").write_text("\n".join(texts) + "\n")
    lm.build(lm.LanguageModelConfig(corpus="tones", order=2), LetterTokenizer.load(letters).symbols, tmp_path / "lm",
             [tmp_path / "lm.txt"])
    monkeypatch.setitem(tasks.TASKS, "tones", tasks.Task("speech", "ctc", "tones", "train", "train", ("train",),
                                                         ("wer", "cer")))
    (decoded,) = ev.evaluate(tmp_path / "run", checkpoint_name="final.pt", lm=tmp_path / "lm")
    assert decoded["metrics"]["wer_lm"] <= result["metrics"]["wer"]


def test_unknown_task_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.finetune_config("nope")
    with pytest.raises(ValueError, match="finetune.lee_sts.layer_decay: Input should be less than or equal to 1"):
        tasks.finetune_config("lee_sts", {"layer_decay": 2})


def test_inputs_move_to_the_device_and_transcripts_stay_on_the_host():
    item = {"batch": Batch(source=torch.zeros(2, 8), padding_mask=torch.zeros(2, 8, dtype=torch.bool)),
            "targets": torch.ones(2, 3, dtype=torch.long), "target_lengths": torch.tensor([3, 2]),
            "text": ["A B", "C"]}
    inputs = task_data.as_inputs(item, "speech", torch.device("meta"))
    assert inputs["batch"].source.is_meta and inputs["batch"].padding_mask.is_meta
    assert inputs["targets"].is_meta and inputs["target_lengths"].is_meta and inputs["text"] == ["A B", "C"]
    image = task_data.as_inputs((torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])), "image", torch.device("meta"))
    assert image["batch"].source.is_meta and image["batch"].padding_mask is None and image["labels"].is_meta


TOY_CTC = tasks.Task("speech", "ctc", "toy", "train", "train", ("test",), ("wer", "cer"), extra_tests=("human/test",))

EVAL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_finetune import TOY_CTC
from d2v.cli import main
from d2v.train import tasks
tasks.TASKS["toy_ctc"] = TOY_CTC
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_under_torchrun_evaluate_splits_the_shards_and_the_first_rank_writes_what_one_process_writes(tmp_path):
    """2 gloo ranks: each runs the model over its share of a split's shards (the 3-utterance test set's one shard
    leaves rank 1 none), rank 0 gathers the CTC logits, tunes the LM on the dev split it reads after the test split,
    beam-searches and writes; its JSONs are one process's, field for field."""
    three_a_shard = ShardConfig(max_count=3)
    toy_ctc_data(tmp_path, three_a_shard)  # train: 3 shards; human/test: 1
    write_shards(tmp_path / "raw", "train", tmp_path / "shards" / "toy" / "test", three_a_shard, limit=6)  # 2
    cfg = tasks.FinetuneConfig(task="toy_ctc", init="scratch", preset="tiny", steps=3, batch_size=2,
                               optim=dict(lr=1e-3), audio=dict(min_samples=0), data_root=str(tmp_path),
                               letters=str(tmp_path / "letters.json"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tasks.TASKS, "toy_ctc", TOY_CTC)
        ft.run_finetune(cfg, tmp_path / "run", progress=False)
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT.format(tests=str(Path(__file__).parent)))
    args = ["evaluate", str(tmp_path / "run"), "--extra", "human/test", "--lm", str(tmp_path / "lm")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both: the logits to the last bit
    for out, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                "2"])):
        run = subprocess.run([sys.executable, *launcher, str(script), *args, "--out", str(tmp_path / out)],
                             env=env, cwd=Path(__file__).parents[1], timeout=300, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("toy_ctc/") == 2, run.stdout  # one rank prints
    for name in ("toy_ctc-test.json", "toy_ctc-human-test.json"):
        one, two = (json.loads((tmp_path / out / name).read_text()) for out in ("one", "two"))
        assert two == one
    assert (one["n"], one["lm"]["tuned_on"]) == (3, "train") and {"wer_lm", "cer_lm"} <= set(one["metrics"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["toy_ctc-human-test.json", "toy_ctc-test.json"]


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(toy_image_task, tmp_path):
    """Both loops and the evaluation check their config's device before any work, naming the key."""
    from test_train import tiny_cfg

    from d2v.train.pretrain import pretrain_main

    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="finetune.device: 'cuda' asked for, but torch sees no CUDA device"):
        ft.run_finetune(toy_image_task.model_copy(update={"device": "cuda"}), tmp_path / "ft", progress=False)
    with pytest.raises(RuntimeError, match="pretrain.device: 'cuda:1' asked for, but torch sees no CUDA device"):
        pretrain_main(tiny_cfg("image").model_copy(update={"device": "cuda:1"}), tmp_path / "pt")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "pt").exists()


def test_bf16_autocast_fine_tuning_learns_and_evaluates(toy_image_task, tmp_path):
    cfg = toy_image_task.model_copy(update={"precision": "bf16"})
    ft.run_finetune(cfg, tmp_path / "bf16", progress=False)
    (result,) = ev.evaluate(tmp_path / "bf16")
    assert result["metrics"]["accuracy"] >= 0.9


def test_the_best_checkpoint_breaks_wer_ties_on_cer_and_never_keeps_an_undefined_score(toy_image_task, tmp_path,
                                                                                         monkeypatch):
    # dev checks every 2 steps; WER stays at 1.0 (as at small CTC budgets) while CER falls, then rises
    monkeypatch.setitem(tasks.TASKS, "toy_ctc", tasks.Task("image", "classification", "toy", "train", "test",
                                                           ("test",), ("wer", "cer"), 2, "LibriSpeech"))
    scripted = iter([{"wer": float("nan"), "cer": 0.2}, {"wer": 1.0, "cer": 0.95}, {"wer": 1.0, "cer": 0.8},
                     {"wer": 1.0, "cer": 0.9}])
    monkeypatch.setattr(ft, "predict", lambda *a, **k: ([], []))
    monkeypatch.setattr(ft, "score", lambda task, preds, refs: next(scripted))
    cfg = toy_image_task.model_copy(update={"task": "toy_ctc", "steps": 8, "eval_every": 2})
    summary = ft.run_finetune(cfg, tmp_path / "run", progress=False)
    assert summary["best_dev"] == {"wer": 1.0, "cer": 0.8}
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == 6
    speech = tasks.TASKS["speech_1h"]
    assert ev.selection_key(speech, {"wer": 0.9, "cer": 0.9}) > ev.selection_key(speech, {"wer": 1.0, "cer": 0.1})
    assert ev.headline(speech, {"wer": 0.25, "cer": 0.1}) == -0.25


def toy_dev_config(toy_image_task, monkeypatch, steps: int, keep: int) -> tasks.FinetuneConfig:
    """The toy image task with a dev split (its test shards), 2 micro-batches a step, dev every 3 steps and a
    checkpoint every 4."""
    monkeypatch.setitem(tasks.TASKS, "toy_dev", tasks.Task("image", "classification", "toy", "train", "test",
                                                           ("test",), ("accuracy",), 2, "ImageNet"))
    return tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "task": "toy_dev", "steps": steps,
                                                "batch_size": 8, "accum_steps": 2, "eval_every": 3,
                                                "checkpoint": {"every": 4, "keep": keep}})


def test_an_interrupted_fine_tune_resumes_bit_for_bit_and_refuses_another_config(toy_image_task, tmp_path,
                                                                                monkeypatch, capsys):
    """Killed after step 6 with its step-4 checkpoint on disk, the run resumes (weights, AdamW, stream position with
    its random crops, best dev so far, RNG) to the uninterrupted run's models and log; finished, it drops the
    checkpoints. A checkpoint of another config is refused by name, or discarded with restart_on_change."""
    cfg = toy_dev_config(toy_image_task, monkeypatch, steps=10, keep=2)
    straight = ft.run_finetune(cfg, tmp_path / "a", progress=False)
    ft.run_finetune(cfg, tmp_path / "b", progress=False, stop_after=6)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert (saved["step"], saved["batches"]) == (4, 8) and saved["best_metrics"] is not None
    assert not (tmp_path / "b" / "final.pt").exists()
    other = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ValueError, match=r"step-00000004.pt: written under a different config or data \(optim "
                                         r"changed\)"):
        ft.run_finetune(other, tmp_path / "b", progress=False)
    resumed = ft.run_finetune(cfg, tmp_path / "b", progress=False)
    assert "resumed from" in capsys.readouterr().err
    for name in ("final.pt", "best.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=False) for run in ("a", "b"))
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
        for k, v in a["model"].items():
            assert torch.equal(b["model"][k], v), (name, k)
    log_a, log_b = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("a", "b"))
    assert list(log_b["step"]) == list(range(1, 11))  # rows after the checkpoint replaced, not duplicated
    pd.testing.assert_frame_equal(log_a, log_b)
    assert resumed["best_dev"] == straight["best_dev"]
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()
    ft.run_finetune(cfg, tmp_path / "c", progress=False, stop_after=5)
    ft.run_finetune(other, tmp_path / "c", progress=False, stop_after=1, restart_on_change=True)
    assert "discarded (optim); starting afresh" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "c" / "metrics.csv")["step"].tolist() == [1]


def test_a_stop_signal_checkpoints_the_fine_tunes_step_and_the_run_resumes_bit_for_bit(toy_image_task, tmp_path,
                                                                                      monkeypatch):
    """SIGTERM during step 5 (a scheduler's time limit): the step ends, its checkpoint (weights, AdamW, stream
    position, best dev so far) is written beside the periodic step-4 one, and the run stops with status 143; started
    again it ends with the uninterrupted run's best and final models and log, where the pipeline had deleted the
    job's outputs: the checkpoint restores the log and best.pt (the best dev model so far, of step 3)."""
    from d2v.train.preemption import Interrupted

    cfg = toy_dev_config(toy_image_task, monkeypatch, steps=8, keep=3)
    straight = ft.run_finetune(cfg, tmp_path / "a", progress=False)
    real = ft.optimizer_step

    def signalled(optimizer, trainable, encoder_params, cfg, step, scaler):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(optimizer, trainable, encoder_params, cfg, step, scaler)
    monkeypatch.setattr(ft, "optimizer_step", signalled)
    with pytest.raises(Interrupted, match="stopped by SIGTERM after step 5") as stopped:
        ft.run_finetune(cfg, tmp_path / "b", progress=False)
    assert stopped.value.exit_code == 143
    monkeypatch.setattr(ft, "optimizer_step", real)
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*.pt"))
    assert checkpoints == ["step-00000004.pt", "step-00000005.pt"]
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert (saved["step"], saved["batches"]) == (5, 10) and saved["best_metrics"] is not None
    assert not (tmp_path / "b" / "final.pt").exists() and saved["seconds"] > 0
    torch.save({**saved, "seconds": 1000.0}, tmp_path / "b" / "checkpoints" / "last.pt")  # as if 1000 s before
    for output in ("metrics.csv", "best.pt"):  # the pipeline deletes a failed job's outputs; the checkpoint has them
        (tmp_path / "b" / output).unlink()
    ft.run_finetune(cfg, tmp_path / "b", progress=False, stop_after=5)  # resumed at step 5, no step taken
    restored = torch.load(tmp_path / "b" / "best.pt", weights_only=False)
    assert restored["step"] == 3 and (tmp_path / "b" / "best.pt").read_bytes() == saved["best_pt"]
    assert pd.read_csv(tmp_path / "b" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4, 5]
    start = time.perf_counter()
    resumed = ft.run_finetune(cfg, tmp_path / "b", progress=False)
    assert 1000.0 <= resumed["seconds"] <= 1000.0 + time.perf_counter() - start + 0.1  # the whole run's time
    for name in ("final.pt", "best.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=False) for run in ("a", "b"))
        assert a["step"] == b["step"]
        for k, v in a["model"].items():
            assert torch.equal(b["model"][k], v), (name, k)
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / run / "metrics.csv") for run in ("a", "b")))
    assert resumed["best_dev"] == straight["best_dev"]


def test_fp16_fine_tuning_scales_text_as_fairseqs_glue_recipes_and_the_rest_by_its_defaults(toy_image_task, tmp_path,
                                                                                               monkeypatch):
    """fairseq's GLUE fine-tuning configs set fp16_init_scale 4 and fp16_scale_window 128; other tasks get its
    defaults (2^7; 2^14 / (ranks · update_freq)); a config's own values win. The run hands them to its scaler."""
    text = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "task": "rt_polarity"})
    assert ft.fp16_scaling_of(text, tasks.TASKS["rt_polarity"], 1) == {"init_scale": 4.0, "growth_interval": 128}
    assert ft.fp16_scaling_of(toy_image_task, tasks.TASKS[toy_image_task.task], 2) == \
        {"init_scale": 128.0, "growth_interval": 8192}
    own = text.model_copy(update={"fp16_init_scale": 1024.0, "fp16_scale_window": 50})
    assert ft.fp16_scaling_of(own, tasks.TASKS["rt_polarity"], 1) == {"init_scale": 1024.0, "growth_interval": 50}
    from test_train import scaling_recorder

    seen = []
    monkeypatch.setattr(ft, "autocast", scaling_recorder(seen))
    cfg = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "precision": "fp16", "steps": 2,
                                               "fp16_scale_window": 9})
    ft.run_finetune(cfg, tmp_path / "run", progress=False)
    assert seen[0] == {"init_scale": 128.0, "growth_interval": 9}


def test_an_fp16_fine_tune_scales_its_loss_skips_overflows_and_resumes_at_its_loss_scale(toy_image_task, tmp_path,
                                                                                          monkeypatch):
    """fp16 fine-tuning (fairseq's GLUE recipes) steps through a gradient scaler, as pretraining does. On CPU, torch's
    CPU scaler (a GPU run gets the CUDA one) with its scale doubling every step: the logged gradient norm is the
    unscaled one (the fp32 run's at step 1), the steps that overflow are skipped, and a run resumed from its step-4
    checkpoint continues at the scale it had reached, ending on the uninterrupted run's weights and log (this fails
    without the scaler in the checkpoint)."""
    from test_train import cpu_fp16_autocast

    cfg = toy_dev_config(toy_image_task, monkeypatch, steps=10, keep=2)
    ft.run_finetune(cfg, tmp_path / "fp32", progress=False)
    monkeypatch.setattr(ft, "autocast", cpu_fp16_autocast)
    cfg = tasks.FinetuneConfig.model_validate({**cfg.model_dump(), "precision": "fp16"})
    ft.run_finetune(cfg, tmp_path / "a", progress=False)
    log = pd.read_csv(tmp_path / "a" / "metrics.csv")
    fp32_norm = pd.read_csv(tmp_path / "fp32" / "metrics.csv")["grad_norm"][0]
    assert log["grad_norm"][0] == pytest.approx(fp32_norm, rel=0.05)
    overflowed = list(log["step"][~np.isfinite(log["grad_norm"])])
    assert any(step > 4 for step in overflowed) and len(overflowed) < 5, overflowed  # some after the checkpoint
    ft.run_finetune(cfg, tmp_path / "b", progress=False, stop_after=6)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    scale = 2.0 ** 16 * math.prod(0.5 if step in overflowed else 2.0 for step in range(1, 5))  # halved or doubled
    assert saved["step"] == 4 and saved["scaler"]["scale"] == scale
    ft.run_finetune(cfg, tmp_path / "b", progress=False)
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=False)["model"] for run in ("a", "b"))
    for k, v in a.items():
        assert torch.equal(b[k], v), k
    pd.testing.assert_frame_equal(log, pd.read_csv(tmp_path / "b" / "metrics.csv"))


def test_log_every_thins_the_log_not_the_training_and_still_stops_a_diverged_run(toy_image_task, tmp_path,
                                                                                  monkeypatch):
    """Rows (each a host sync on a GPU) at the first, every N-th and last steps only (and where the dev split is
    scored); the weights and the rows kept are those of a run logging every step. A NaN between log steps stops the
    run before its checkpoint."""
    from d2v.train.optim import DivergenceError

    cfg = toy_image_task.model_copy(update={"steps": 5, "batch_size": 4})
    ft.run_finetune(cfg, tmp_path / "every", progress=False)
    ft.run_finetune(cfg.model_copy(update={"log_every": 2}), tmp_path / "thin", progress=False)
    every, thin = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("every", "thin"))
    assert thin["step"].tolist() == [1, 2, 4, 5]
    pd.testing.assert_frame_equal(thin, every[every["step"].isin(thin["step"])].reset_index(drop=True))
    weights = [torch.load(tmp_path / run / "final.pt", weights_only=False)["model"] for run in ("every", "thin")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    real = ft.optimizer_step

    def poisoning(optimizer, trainable, encoder_params, cfg, step, scaler):
        if step == 2:
            trainable[0].grad.fill_(float("nan"))
        return real(optimizer, trainable, encoder_params, cfg, step, scaler)
    monkeypatch.setattr(ft, "optimizer_step", poisoning)
    thin_cfg = tasks.FinetuneConfig.model_validate({**cfg.model_dump(), "log_every": 10,
                                                    "checkpoint": {"every": 3, "keep": 1}})
    with pytest.raises(DivergenceError, match=r"training diverged at step 3 \(grad_norm=nan\)"):
        ft.run_finetune(thin_cfg, tmp_path / "nan", progress=False)
    assert not list((tmp_path / "nan").glob("checkpoints/*.pt"))


def test_a_diverged_last_step_writes_no_final_model(toy_image_task, tmp_path, monkeypatch):
    """The loss is measured before the update: a gradient that turns NaN at the last step would put NaN weights into
    final.pt unless its norm is checked too."""
    from d2v.train.optim import DivergenceError

    real = ft.optimizer_step

    def poisoning(optimizer, trainable, encoder_params, cfg, step, scaler):
        if step == cfg.steps:
            trainable[0].grad.fill_(float("nan"))
        return real(optimizer, trainable, encoder_params, cfg, step, scaler)
    monkeypatch.setattr(ft, "optimizer_step", poisoning)
    cfg = toy_image_task.model_copy(update={"steps": 3})
    with pytest.raises(DivergenceError, match=r"training diverged at step 3 \(grad_norm=nan\)"):
        ft.run_finetune(cfg, tmp_path, progress=False)
    assert not (tmp_path / "final.pt").exists()


def test_an_fp16_fine_tune_whose_every_step_overflows_stops_at_fairseqs_minimum_loss_scale(toy_image_task, tmp_path,
                                                                                            monkeypatch):
    """As pretraining's fp16 guard: a scale of 2^-13, doubled over the finite step 1, halved by NaN gradients from
    step 2, is 2^-14 < 1e-4 at step 3, and the run stops there instead of skipping steps until its scale is zero."""
    from test_train import cpu_fp16_autocast, nan_gradients_from

    from d2v.train.optim import DivergenceError

    monkeypatch.setattr(ft, "autocast", functools.partial(cpu_fp16_autocast, init_scale=2.0 ** -13))
    monkeypatch.setattr(ft, "clip_and_step", nan_gradients_from(2, ft.clip_and_step))
    cfg = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "precision": "fp16", "steps": 6})
    with pytest.raises(DivergenceError, match=r"diverged at step 3 \(fp16 loss scale=6.1e-05 < 0.0001\)"):
        ft.run_finetune(cfg, tmp_path, progress=False)
    assert not (tmp_path / "final.pt").exists()


def test_a_finished_fine_tune_started_again_does_nothing_and_is_never_trained_over(toy_image_task, tmp_path,
                                                                                   capsys):
    """Its best.pt may already be evaluated: the same config returns the stored summary without touching the folder;
    another config is refused by name, or trained again with restart_on_change (pipeline stages)."""
    cfg = toy_image_task.model_copy(update={"steps": 4})
    run = tmp_path / "run"
    first = ft.run_finetune(cfg, run, progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    assert ft.run_finetune(cfg, run, progress=False) == first
    assert f"{run}: finished already under this config; nothing to do" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == written
    other = cfg.model_copy(update={"steps": 5})
    with pytest.raises(ValueError, match=r"run: holds a finished run of another config, data or recipe "
                                         r"\(steps changed\)"):
        ft.run_finetune(other, run, progress=False)
    assert ft.run_finetune(other, run, progress=False, restart_on_change=True)["steps"] == 5
    assert torch.load(run / "final.pt", weights_only=False)["step"] == 5


def test_a_diverged_fine_tune_stops_before_it_saves_nan_weights(toy_image_task, tmp_path, monkeypatch):
    from d2v.train.optim import DivergenceError

    real = ft.optimizer_step

    def poisoning(optimizer, trainable, encoder_params, cfg, step, scaler):  # an update that leaves a weight NaN
        norm = real(optimizer, trainable, encoder_params, cfg, step, scaler)
        if step == 2:
            trainable[0].data.fill_(float("nan"))
        return norm
    monkeypatch.setattr(ft, "optimizer_step", poisoning)
    cfg = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "steps": 6,
                                               "checkpoint": {"every": 2, "keep": 3}})
    with pytest.raises(DivergenceError, match=r"training diverged at step 3 \(loss=nan, grad_norm=nan\)"):
        ft.run_finetune(cfg, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")] == ["step-00000002.pt"]
    assert not (tmp_path / "final.pt").exists() and not (tmp_path / "best.pt").exists()


def test_ctc_fine_tuning_without_an_audio_config_keeps_every_labelled_utterance(monkeypatch):
    """As fairseq's fine-tuning task: no 2 s minimum and no 20 s maximum (AudioConfig's pretraining defaults), so
    a paper-profile LibriSpeech fine-tune trains on every utterance of its labelled split."""
    seen = []
    monkeypatch.setattr(task_data, "speech_loader", lambda shards, audio, *a, **k: seen.append(audio) or [])
    monkeypatch.setattr(LetterTokenizer, "load", lambda path: None)
    cfg = tasks.FinetuneConfig(task="librispeech_1h", init="scratch", steps=1, batch_size=2, optim={"lr": 1e-4})
    task_data.loader(cfg, "train", train=True)
    assert (seen[0].min_samples, seen[0].max_samples) == (0, 960_000)


def test_a_reseeded_fine_tune_resumes_without_decoding_the_consumed_batches(toy_image_task, tmp_path, monkeypatch):
    """`stream_resume: reseed`: the resumed run reads one fresh batch per micro-batch, from the stream of
    `resumed_seed(seed, consumed)`, and finishes; `replay` would decode the 6 consumed batches first."""
    from d2v.data import loaders
    from d2v.train.batches import resumed_seed

    cfg = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "steps": 8, "batch_size": 4,
                                               "accum_steps": 2, "checkpoint": {"every": 3, "keep": 1},
                                               "stream_resume": "reseed"})
    ft.run_finetune(cfg, tmp_path / "run", progress=False, stop_after=4)
    decoded = []
    decode = loaders._decode_image
    monkeypatch.setattr(loaders, "_decode_image", lambda *a: decoded.append(1) or decode(*a))
    stream = ft.resumed_stream(cfg, tasks.TASKS[cfg.task], 6)
    torch.manual_seed(0)
    first = next(stream)[0]
    assert len(decoded) == 4  # one batch, not 7
    fresh = iter(task_data.loader(cfg.model_copy(update={"seed": resumed_seed(cfg.seed, 6)}), "train", train=True))
    torch.manual_seed(0)
    assert torch.equal(first, next(fresh)[0])
    decoded.clear()
    torch.manual_seed(0)
    next(ft.resumed_stream(cfg.model_copy(update={"stream_resume": "replay"}), tasks.TASKS[cfg.task], 6))
    assert len(decoded) == 28
    ft.run_finetune(cfg, tmp_path / "run", progress=False)
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["step"].tolist() == list(range(1, 9))
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=False)["step"] == 8


def test_a_seekable_fine_tune_resumes_bit_for_bit_reading_only_its_own_batches(toy_image_task, tmp_path, monkeypatch):
    """`stream_resume: seek`: killed after step 4 with its step-3 checkpoint, the run decodes only the 5 updates × 2
    micro-batches it has left (RandAugment, erasing and crops keyed by each sample's place) and ends with the
    uninterrupted run's weights; so does its checkpoint relabelled as written by 2 ranks of 1 micro-batch each
    (d2v.train.checkpoint.rescaled: the position becomes step × 2 micro-batches)."""
    from d2v.data import loaders

    image = {**toy_image_task.image.model_dump(), "randaugment_magnitude": 9, "random_erasing": 0.25}
    cfg = tasks.FinetuneConfig.model_validate({**toy_image_task.model_dump(), "steps": 8, "batch_size": 4,
                                               "accum_steps": 2, "checkpoint": {"every": 3, "keep": 1},
                                               "stream_resume": "seek", "image": image})
    ft.run_finetune(cfg, tmp_path / "a", progress=False)
    ft.run_finetune(cfg, tmp_path / "b", progress=False, stop_after=4)
    # the same checkpoint as 2 ranks × 1 micro-batch would have written it: one process continues it with 2
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000003.pt", weights_only=False)
    state.update(ranks=2, batches=3, config={**state["config"], "accum_steps": 1})
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "c" / "checkpoints" / "step-00000003.pt")
    decoded = []
    decode = loaders._decode_image
    monkeypatch.setattr(loaders, "_decode_image", lambda *a: decoded.append(1) or decode(*a))
    ft.run_finetune(cfg, tmp_path / "b", progress=False)
    assert len(decoded) == 5 * 2 * 4
    ft.run_finetune(cfg, tmp_path / "c", progress=False)
    a, b, c = (torch.load(tmp_path / run / "final.pt", weights_only=False) for run in ("a", "b", "c"))
    assert a["step"] == b["step"] == c["step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v) and torch.equal(c["model"][k], v), k
    pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / run / "metrics.csv") for run in ("a", "b")))


def accumulating_loader(accum: int, rank: int = 0, world: int = 1, eval_size: int = 10):
    """Rank `rank`'s micro-batches: shares rank·accum, ..., rank·accum + accum − 1 of global batch k (of accum·world
    shares), in turn, as the RNG keys of `run_finetune` number them."""
    shares = [synthetic_loader(rank * accum + m, accum * world) for m in range(accum)]

    def loader(cfg, split, train, split_ranks=True):
        if not train:
            return synthetic_loader(rank, world, eval_size=eval_size)(cfg, split, train, split_ranks)
        return itertools.chain.from_iterable(zip(*(share(cfg, split, True) for share in shares)))
    return loader


def test_accumulated_micro_batches_make_the_update_of_the_whole_batch(tmp_path, monkeypatch):
    """2 micro-batches of 4 accumulate to one batch of 8: the same weights, and the logged loss is the batch mean."""
    monkeypatch.setattr(task_data, "loader", synthetic_loader(0, 1))
    ft.run_finetune(ddp_cfg(), tmp_path / "whole", progress=False)
    monkeypatch.setattr(task_data, "loader", accumulating_loader(2))
    ft.run_finetune(ddp_cfg().model_copy(update={"batch_size": 4, "accum_steps": 2}), tmp_path / "accum",
                    progress=False)
    whole, accum = (torch.load(tmp_path / run / "final.pt", weights_only=False)["model"] for run in ("whole", "accum"))
    initial = task_model.build_model(ddp_cfg()).state_dict()
    assert any(not torch.equal(whole[k], v) for k, v in initial.items())
    for k, v in whole.items():
        torch.testing.assert_close(accum[k], v, rtol=1e-5, atol=1e-5, msg=k)
    losses = [pd.read_csv(tmp_path / run / "metrics.csv")["loss"] for run in ("whole", "accum")]
    torch.testing.assert_close(torch.tensor(losses[1].values), torch.tensor(losses[0].values), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- DDP

def synthetic_loader(rank: int, world: int, batch: int = 8, eval_size: int = 10):
    """In place of `task_data.loader`: global training batch k (seeded by k) split by rank, as the rank-aware shard
    readers split a stream; the eval split's examples dealt out by rank, as `split_by_node` deals out shards (all of
    them to every rank without `split_ranks`)."""
    def loader(cfg, split, train, split_ranks=True):
        if train:
            def stream():
                for k in itertools.count():
                    g = torch.Generator().manual_seed(k)
                    images, labels = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 10, (batch,),
                                                                                              generator=g)
                    share = slice(rank * batch // world, (rank + 1) * batch // world)
                    yield images[share], labels[share]
            return stream()
        g = torch.Generator().manual_seed(10**6)
        images, labels = torch.randn(eval_size, 1, 32, 32, generator=g), torch.arange(eval_size) % 10
        mine = torch.arange(eval_size) % world == rank if split_ranks else torch.ones(eval_size, dtype=torch.bool)
        return [(images[mine][i:i + 4], labels[mine][i:i + 4]) for i in range(0, int(mine.sum()), 4)]
    return loader


def ddp_cfg(**update):
    image = dict(size=32, channels=1, mean=(0.5,), std=(0.5,), crop_pct=1.0, randaugment_magnitude=0,
                 random_erasing=0.0, color_jitter=0.0)
    return tasks.finetune_config("fashion_mnist", {**dict(init="scratch", preset="tiny", steps=3, batch_size=8,
                                                          optim=dict(warmup_steps=1), image=image, device="cpu"),
                                                   **update})


FT_DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_finetune import accumulating_loader, ddp_cfg, synthetic_loader
from d2v.eval import evaluate as ev
from d2v.train import finetune as ft, task_data, task_model
from d2v.train.distributed import init, shutdown
world = init("cpu")
task_data.loader = accumulating_loader(2, world.rank, world.size)
ft.run_finetune(ddp_cfg(batch_size=2, accum_steps=2), {out!r}, progress=False)
model = task_model.build_model(ddp_cfg())
model.load_state_dict(torch.load({out!r} + "/final.pt", weights_only=False)["model"])
preds, refs = ev.predict(model, ddp_cfg(), "test", world=world)
if world.is_main:
    torch.save({{"preds": preds, "refs": refs}}, {out!r} + "/predictions.pt")
shutdown()
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_fine_tuning_matches_one_process_and_gathers_predictions(tmp_path, monkeypatch):
    """Each rank trains on half of every global batch, in 2 micro-batches (gradients are all-reduced on the second
    only): the averaged gradients give one process's update on the whole batch; only rank 0 writes the run;
    dev/test predictions split over the ranks come back whole on every rank."""
    script = tmp_path / "ddp.py"
    script.write_text(FT_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    monkeypatch.setattr(task_data, "loader", synthetic_loader(0, 1))
    ft.run_finetune(ddp_cfg(), tmp_path / "single", progress=False)
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=False)["model"]
    single = torch.load(tmp_path / "single" / "final.pt", weights_only=False)["model"]
    initial = task_model.build_model(ddp_cfg()).state_dict()
    assert any(not torch.equal(single[k], v) for k, v in initial.items())  # the runs did train
    for k, v in single.items():  # AdamW's first steps magnify summation-order noise in small gradients (eps 1e-6)
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-5, msg=k)
    assert len(pd.read_csv(tmp_path / "ddp" / "metrics.csv")) == 3  # one writer
    model = task_model.build_model(ddp_cfg())
    model.load_state_dict(single)
    gathered = torch.load(tmp_path / "ddp" / "predictions.pt")
    preds, refs = ev.predict(model, ddp_cfg(), "test")
    assert len(gathered["preds"]) == len(preds) == 10
    assert sorted(zip(gathered["refs"], gathered["preds"])) == sorted(zip(refs, preds))


FT_FSDP_SCRIPT = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from test_finetune import accumulating_loader, ddp_cfg
from d2v.train import finetune as ft, task_data, tasks
from d2v.train.distributed import barrier, init, shutdown
tasks.TASKS["fashion_mnist"] = dataclasses.replace(tasks.TASKS["fashion_mnist"], dev="test")
world = init("cpu")
task_data.loader = accumulating_loader(2, world.rank, world.size, eval_size=9)  # dev: 2 batches and 1
sharded, shard = [], ft.fsdp.shard
def recording_shard(model, *args):  # the runs do shard: their parameters become DTensors
    shard(model, *args)
    sharded.append({{type(p).__name__ for p in model.parameters()}})
ft.fsdp.shard = recording_shard
cfg = ddp_cfg(batch_size=2, accum_steps=2, parallel="fsdp", **{update!r})
ft.run_finetune(cfg, {out!r} + "/straight", progress=False)
ft.run_finetune(cfg, {out!r} + "/stopped", progress=False, stop_after=3)
ft.run_finetune(cfg, {out!r} + "/resumed", progress=False, stop_after=3)
barrier(world)  # rank 0 has written the step-3 checkpoint that every rank resumes from
ft.run_finetune(cfg, {out!r} + "/resumed", progress=False)
assert sharded == [{{"DTensor"}}] * 4, sharded
shutdown()
"""


@pytest.mark.slow
def test_two_process_gloo_fsdp_fine_tuning_matches_one_process_scores_dev_and_resumes_exactly(tmp_path,
                                                                                            monkeypatch):
    """`parallel: fsdp`: 2 ranks, each encoder block sharded, half the global batch each in 2 micro-batches, reach one
    process's weights; every rank scores the whole dev split (an FSDP forward is collective, so the ranks must run
    the same batches), giving one process's dev accuracies; the checkpoints hold the full state in the
    single-process layout, and a run stopped after its step-3 checkpoint resumes to the uninterrupted weights."""
    update = {"steps": 4, "eval_every": 2, "checkpoint": {"every": 3, "keep": 1}}
    script = tmp_path / "fsdp.py"
    script.write_text(FT_FSDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "fsdp"),
                                            update=update))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    monkeypatch.setitem(tasks.TASKS, "fashion_mnist", dataclasses.replace(tasks.TASKS["fashion_mnist"], dev="test"))
    monkeypatch.setattr(task_data, "loader", synthetic_loader(0, 1, eval_size=9))
    ft.run_finetune(ddp_cfg(**update), tmp_path / "single", progress=False, stop_after=3)
    one_ckpt = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=False)
    ft.run_finetune(ddp_cfg(**update), tmp_path / "single", progress=False)
    single = torch.load(tmp_path / "single" / "final.pt", weights_only=False)["model"]
    initial = task_model.build_model(ddp_cfg()).state_dict()
    assert any(not torch.equal(single[k], v) for k, v in initial.items())  # the runs did train
    straight, resumed = (torch.load(tmp_path / "fsdp" / run / "final.pt", weights_only=False)["model"]
                         for run in ("straight", "resumed"))
    assert straight.keys() == single.keys()
    for k, v in single.items():  # AdamW's first steps magnify summation-order noise in small gradients (eps 1e-6)
        torch.testing.assert_close(straight[k], v, rtol=1e-5, atol=1e-5, msg=k)
        assert torch.equal(resumed[k], straight[k]), k
    sharded_ckpt = torch.load(tmp_path / "fsdp" / "stopped" / "checkpoints" / "last.pt", weights_only=False)
    assert sharded_ckpt["step"] == 3 and sharded_ckpt["ranks"] == 2
    assert sharded_ckpt["optimizer"]["param_groups"] == one_ckpt["optimizer"]["param_groups"]  # the same layout
    torch.testing.assert_close(sharded_ckpt["optimizer"]["state"], one_ckpt["optimizer"]["state"], rtol=1e-5,
                               atol=1e-6)
    logs = {run: pd.read_csv(tmp_path / run / "metrics.csv") for run in ("single", "fsdp/straight", "fsdp/resumed")}
    assert [len(log) for log in logs.values()] == [4, 4, 4]  # one writer
    dev = [log["dev_accuracy"].dropna().tolist() for log in logs.values()]
    assert len(dev[0]) == 2 and dev[1] == dev[2] == dev[0]
    best = torch.load(tmp_path / "fsdp" / "straight" / "best.pt", weights_only=False)
    assert best["model"].keys() == single.keys() and best["config"]["parallel"] == "fsdp"


FT_FSDP_CTC_SCRIPT = """
import sys
from d2v.train import finetune as ft, tasks
from d2v.train.distributed import init, shutdown
tasks.TASKS["tones"] = tasks.Task("speech", "ctc", "tones", "train", "train", ("train",), ("wer", "cer"))
world = init("cpu")
cfg = tasks.FinetuneConfig(task="tones", init="scratch", preset="tiny", steps=6, batch_size=2, eval_every=3,
                           freeze_encoder_steps=2, parallel="fsdp", regularization=dict(layerdrop=0.5),
                           optim=dict(lr=3e-3, schedule="tri_stage"), audio=dict(min_samples=0),
                           data_root={data!r}, letters={letters!r}, device="cpu")
ft.run_finetune(cfg, {out!r}, progress=False)
shutdown()
"""


@pytest.mark.slow
def test_an_fsdp_ctc_fine_tune_shares_layerdrop_across_ranks(tmp_path):
    """The speech path under FSDP: frozen CNN, output-layer-only steps, tri-stage LR, CTC dev scoring, and LayerDrop
    at 0.5, whose draws every rank must share (each rank's torch RNG is keyed by its rank: a block one rank skipped
    and another ran would leave their collectives unmatched)."""
    letters = tone_task_shards(tmp_path, ["AB C", "CA", "B CB", "AC B"])
    script = tmp_path / "ctc.py"
    script.write_text(FT_FSDP_CTC_SCRIPT.format(data=str(tmp_path), letters=str(letters), out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert log["step"].tolist() == list(range(1, 7)) and log["dev_wer"].notna().sum() == 2
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=False)["step"] == 6


def test_a_text_fine_tune_refuses_a_tokenizer_of_another_vocabulary_before_training(tmp_path):
    """As pretraining does: the tiny text encoder embeds 64 ids, a tokenizer of 60 would leave rows no input reaches
    (and one of more would index past the table mid-run)."""
    from d2v.data.tokenizer import SentencePieceConfig, train_sentencepiece

    lines = [f"Paragraph {i} talks about the weather and the garden, and then about tea." for i in range(300)]
    spm_cfg = SentencePieceConfig(vocab_size=60, num_threads=1, seed_sentencepiece_size=10_000)
    spm = train_sentencepiece(lines, tmp_path / "spm.model", spm_cfg)
    cfg = tasks.finetune_config("rt_polarity", {"init": "scratch", "preset": "tiny", "tokenizer": str(spm),
                                                "data_root": str(tmp_path / "no-shards")})
    with pytest.raises(ValueError, match=rf"finetune.rt_polarity \(tiny\): {re.escape(str(spm))} makes 60 ids "
                                         r"\(pieces \+ <mask>\), the text encoder has vocab_size=64"):
        ft.run_finetune(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder
