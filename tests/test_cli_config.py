import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v import cli
from d2v.cli import main
from d2v.data.manifest import make_manifest, write_manifest
from d2v.config import ConfigError, ObjectiveConfig, load_yaml, nested_overrides, validate
from d2v.io import (atomic_torch_save, atomic_write_json, git_commit, new_dir_mode, new_file_mode, read_commit,
                    short_commit)
from d2v.modalities import IMAGE_PRESETS, SPEECH_PRESETS, TEXT_PRESETS, ImageEncoder, SpeechEncoder, TextEncoder
from d2v.modalities.speech import frame_lengths
from d2v.train import checkpoint


def test_demo_writes_summary_atomically(tmp_path):
    assert main(["demo", "--modality", "text", "--preset", "tiny", "--steps", "12", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "text" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["inputs"] == "synthetic"
    assert len(json.loads((tmp_path / "text" / "history.json").read_text())) == 12
    assert not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_ends_a_command_with_a_line_and_130_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Outside a training loop's stop handling (here the demo's), Ctrl-C is KeyboardInterrupt: the CLI says what it
    means and exits as the shell reports a process Ctrl-C ended, and nothing half-written is left behind."""
    from d2v.data import synthetic

    def batches_until_ctrl_c(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    real = synthetic.batches
    monkeypatch.setattr(synthetic, "batches", batches_until_ctrl_c)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background test run inherits it ignored
    try:
        code = main(["demo", "--modality", "text", "--preset", "tiny", "--steps", "12", "--out", str(tmp_path)])
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130
    assert "d2v demo: interrupted. Outputs are renamed into place only once complete, so nothing is half-written: " \
           "the same command starts again" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_atomic_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)
    try:
        json_path = atomic_write_json(tmp_path / "r.json", {"a": 1})
        ckpt = checkpoint.save(tmp_path / "ckpt", 1, {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(json_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o640
    assert json.loads(json_path.read_text()) == {"a": 1}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux reports the umask in /proc")
def test_the_umask_is_read_without_changing_it(monkeypatch):
    """Setting it to 0 to read it, however briefly, left files another thread created then world-writable."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("the umask was changed to be read"))
        assert new_file_mode() == 0o640 and new_dir_mode() == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_the_recorded_commit_is_the_packages_head_dirty_only_for_its_own_tracked_files(tmp_path):
    assert read_commit(tmp_path) == "unknown"  # not a git checkout
    package, git = tmp_path / "pkg", ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "code.py").write_text("x = 1\n")
    (tmp_path / "results.json").write_text("{}")
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results.json").write_text('{"new": 1}')  # outside the package: a pipeline rewriting its results
    (package / "scratch.py").write_text("")  # untracked
    assert read_commit(package) == head and len(head) == 40
    (package / "code.py").write_text("x = 2\n")
    assert read_commit(package) == head + "-dirty" and short_commit(head + "-dirty") == head[:10] + "-dirty"
    (tmp_path / "venv" / "d2v").mkdir(parents=True)  # an installed copy the enclosing repository does not track
    (tmp_path / "venv" / "d2v" / "__init__.py").write_text("")
    assert read_commit(tmp_path / "venv" / "d2v") == "unknown"


def test_the_process_commit_is_read_at_import_not_when_a_result_is_written(monkeypatch):
    loaded = git_commit()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("git ran after import"))
    assert git_commit() == loaded  # a HEAD that moves under a running job does not change what it records


def test_a_checkpoint_save_that_fails_midway_keeps_the_previous_file(tmp_path):
    path = atomic_torch_save(tmp_path / "final.pt", {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception, match="lambda"):  # the tensor is written, then pickling the lambda fails
        atomic_torch_save(path, {"step": 2, "w": torch.zeros(3), "hook": lambda: 0})
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_an_unreadable_checkpoint_is_named_wherever_it_is_read(tmp_path, capsys, damage):
    from d2v.interop.checkpoints import export_checkpoint
    from d2v.interop.fairseq import load_checkpoint
    from d2v.train.task_model import load_finetuned
    from d2v.train.pretrain import load_final

    whole = atomic_torch_save(tmp_path / "whole.pt", {"weights": torch.zeros(1000)}).read_bytes()
    bad = tmp_path / "run" / "best.pt"
    bad.parent.mkdir()
    bad.write_bytes(whole[:len(whole) // 2] if damage == "truncated" else b"not a checkpoint" * 64)
    readers = [lambda: load_final(bad, "text", "embedded", "v1", "finetune"), lambda: load_finetuned(bad),
               lambda: export_checkpoint(bad, tmp_path / "hf"), lambda: load_checkpoint(bad)]
    for read in readers:
        with pytest.raises(ValueError, match=f"{bad}: unreadable checkpoint"):
            read()
    assert main(["evaluate", str(bad.parent)]) == 2  # the CLI's message, not a traceback
    assert f"error: {bad}: unreadable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_of_the_other_kind_is_refused_as_one(tmp_path):
    from d2v.train.task_model import load_finetuned
    from d2v.train.pretrain import load_final

    fine_tuned = atomic_torch_save(tmp_path / "best.pt", {"model": {}, "config": {}, "step": 3})
    other = atomic_torch_save(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(ValueError, match=f"finetune: {fine_tuned} holds a fine-tuned model, not a pretraining"):
        load_final(fine_tuned, "text", "embedded", "v1", "finetune")
    with pytest.raises(ValueError, match=f"finetune: {other} holds no pretrained encoder, not a pretraining"):
        load_final(other, "text", "embedded", "v1", "finetune")
    pretrained = atomic_torch_save(tmp_path / "final.pt", {"encoder": {}, "teacher": {}, "modality": "text"})
    with pytest.raises(ValueError, match=f"{pretrained} holds a pretraining's encoders, not a fine-tuned checkpoint"):
        load_finetuned(pretrained)
    with pytest.raises(ValueError, match=f"{other} holds no fine-tuned model, not a fine-tuned checkpoint"):
        load_finetuned(other)


def test_evaluate_says_what_it_was_given_instead_of_a_fine_tuning_run(tmp_path, capsys):
    from d2v.train import recipe

    missing, pretraining, unfinished = tmp_path / "missing", tmp_path / "pretrain", tmp_path / "finetune"
    for run, kind in ((pretraining, "pretrain"), (unfinished, "finetune")):
        run.mkdir()
        recipe.stamp(run, kind)
    atomic_torch_save(pretraining / "final.pt", {"encoder": {}, "teacher": {}, "modality": "text"})
    expected = {missing: f"{missing}: no such run folder",
                pretraining / "final.pt": f"{pretraining / 'final.pt'} is a file; pass its run folder, and "
                                          "--checkpoint final.pt",
                pretraining: f"{pretraining} is a pretraining run; fine-tune it first (`d2v finetune TASK "
                             f"--pretrained {pretraining / 'final.pt'}`)",
                unfinished: f"{unfinished / 'best.pt'}: no fine-tuned model (run `d2v finetune` first, or let it "
                            "finish)"}
    for run, message in expected.items():
        assert main(["evaluate", str(run)]) == 2
        assert f"error: {message}" in capsys.readouterr().err


def test_a_checkpoint_argument_that_is_no_file_says_whether_it_is_missing_or_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    atomic_torch_save(run / "final.pt", {"encoder": {}})
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert f"error: {run} is a folder (holding {run / 'final.pt'}): no checkpoint to export" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "model.pt"), str(tmp_path / "final.pt")]) == 2
    assert f"error: {tmp_path / 'model.pt'} does not exist: no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize("text, problem", [("{\"symbols\": [", "not valid JSON"), ("[]", "expected an object")])
def test_a_damaged_json_file_of_ours_is_named(tmp_path, capsys, text, problem):
    from d2v.data.tokenizer import LetterTokenizer
    from d2v.eval.lm import LanguageModel

    letters = tmp_path / "letters.json"
    (tmp_path / "lm").mkdir()
    (tmp_path / "hf").mkdir()
    for path in (letters, tmp_path / "lm" / "lm.json", tmp_path / "hf" / "config.json"):
        path.write_text(text)
    with pytest.raises(ValueError, match=f"{letters}: {problem}"):
        LetterTokenizer.load(letters)
    with pytest.raises(ValueError, match=f"{tmp_path / 'lm' / 'lm.json'}: {problem}"):
        LanguageModel(tmp_path / "lm", ["<blank>", "|"])
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imported.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'hf' / 'config.json'}: " in err and ("not valid JSON" in err or "model_type None" in err)


def test_a_params_file_that_is_not_yaml_or_comes_without_a_profile_is_refused(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: embedded\nprofiles:\n  embedded: [\n")
    assert main(["pretrain", "text", "--profile", "embedded", "--params", str(bad)]) == 2
    err = capsys.readouterr().err  # the file and the line, not a traceback
    assert f"error: {bad}: not valid YAML" in err and f'in "{bad}", line 4' in err
    assert main(["pretrain", "text", "--params", str(bad)]) == 2  # not a run on the embedded defaults
    assert f"--params {bad} takes effect with --profile" in capsys.readouterr().err


def test_exponent_floats_read_as_numbers_in_params_config_files_and_sets(tmp_path):
    """PyYAML alone reads `1e-3` (no dot) as a string; d2v reads it as YAML 1.2 does, everywhere."""
    from d2v.pipeline.params import load_params

    written = "rt_polarity: {steps: 150, optim: {lr: 1.0e-3,"
    params = tmp_path / "params.yaml"
    params.write_text(Path("params.yaml").read_text().replace(written, written.replace("1.0e-3", "1e-3")))
    embedded = load_yaml(params.read_text(), "params")["profiles"]["embedded"]
    assert embedded["finetune"]["rt_polarity"]["optim"]["lr"] == 0.001
    assert load_params(params).active.finetune["rt_polarity"]["optim"]["lr"] == 0.001  # recorded as given: a number
    assert nested_overrides(["optim.lr=3e-4", "tag='1e-3'", "steps=2E3"]) == \
        {"optim": {"lr": 0.0003}, "tag": "1e-3", "steps": 2000.0}
    assert [load_yaml(v, "v") for v in ["-2.5e+2", ".5e1", "e5", "1e", "[1e-3, 2]"]] == \
        [-250.0, 5.0, "e5", "1e", [0.001, 2]]


def test_a_config_file_or_set_value_that_is_not_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("optim: {lr: [1e-3,\n")
    assert main(["pretrain", "text", "--config", str(bad)]) == 2
    assert f"error: {bad}: not valid YAML" in capsys.readouterr().err
    assert main(["finetune", "rt_polarity", "--config", str(bad)]) == 2
    assert f"error: {bad}: not valid YAML" in capsys.readouterr().err
    assert main(["pretrain", "text", "--set", "optim.lr=[1e-3,"]) == 2
    assert "error: --set optim.lr=[1e-3,: not valid YAML" in capsys.readouterr().err
    for command in (["prepare", "fashion_mnist"], ["lm", "--corpus", "c", "--letters", "l", "--out", "o"]):
        assert main([*command, "--set", "limit"]) == 2  # the prepare and lm options parse as every stage's
        assert "error: --set expects key=value (dotted keys allowed), got 'limit'" in capsys.readouterr().err


def test_params_the_stage_graph_and_the_data_stages_import_no_torch(tmp_path):
    """31 of the embedded pipeline's jobs (prepare, shard, tokenizer, report) and every Snakemake/DVC parse load the
    params and the stage table; torch's import would be most of their start-up. A shard job writes its tars without
    webdataset, whose package imports torch."""
    code = ("import sys\n"
            "from d2v.cli import main\n"
            "assert main(['pipeline', 'stages', '--profile', 'smoke']) == 0\n"
            "import d2v.data.shards, d2v.data.sources, d2v.data.tokenizer, d2v.pipeline.report\n"
            "from d2v.data.manifest import make_manifest, write_manifest\n"
            f"write_manifest({str(tmp_path)!r}, make_manifest([dict(id='a', split='train', text='t', label=1.0)]), "
            "source='rt_polarity', task='rt_polarity')\n"
            f"d2v.data.shards.write_shards({str(tmp_path)!r}, 'train', {str(tmp_path / 'shards')!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio', 'torchvision', "
            "'webdataset')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "smoke" in run.stdout and run.stdout.splitlines()[-1] == "[]"


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["demo", "--modality", "image", "--preset", "gigantic", "--steps", "1"]) == 2
    assert "unknown image preset 'gigantic'" in capsys.readouterr().err


def test_invalid_params_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.loss\.beta"):
        validate(ObjectiveConfig, {"loss": {"kind": "smooth_l1", "beta": -1}}, where="objective")
    with pytest.raises(ConfigError, match=r"objective\.top_k.*greater than or equal to 1"):
        validate(ObjectiveConfig, {"top_k": 0}, where="objective")
    with pytest.raises(ConfigError, match=r"objective\.targets"):
        validate(ObjectiveConfig, {"targets": 3}, where="objective")


def test_presets_match_the_papers():
    assert sum(p.numel() for p in SpeechEncoder(SPEECH_PRESETS["base"]).parameters()) == 93_164_288  # = HF audio base
    # = HF text base (124,645,632) minus the pooler (590,592) and token-type row (768) we do not carry
    assert sum(p.numel() for p in TextEncoder(TEXT_PRESETS["base"]).parameters()) == 124_054_272
    large = IMAGE_PRESETS["large"]
    assert (large.dim, large.depth, large.num_heads, large.layer_scale_init) == (1024, 24, 16, 1e-5)
    assert IMAGE_PRESETS["base"].layer_scale_init == 1e-4 and IMAGE_PRESETS["base"].rel_pos == "shared"


def test_frame_length_formula():
    # 1 s at 16 kHz -> 49 frames; 320-sample hop, 400-sample receptive field
    assert frame_lengths(torch.tensor([16_000, 24_000, 400, 720])).tolist() == [49, 74, 1, 2]
    enc = SpeechEncoder(SPEECH_PRESETS["tiny"])
    assert enc.receptive_field == 400
    with pytest.raises(ValueError, match="at least 400 samples"):
        enc(torch.zeros(1, 399))


def test_fbank_front_end_counts_its_frames_and_ignores_padding():
    enc = SpeechEncoder(SPEECH_PRESETS["tiny-fbank"]).eval()
    lengths = [400, 719, 720, 16_000, 24_000]
    # 25 ms windows every 10 ms, then stride 2: 50 frames/s, the CNN's rate (1 s -> 49 frames for both)
    assert enc.frame_lengths(torch.tensor(lengths)).tolist() == [1, 1, 2, 49, 74]
    wav = torch.randn(len(lengths), max(lengths))
    pad = torch.arange(wav.shape[1])[None] >= torch.tensor(lengths)[:, None]
    batched = enc.embed(wav, pad)
    assert (~batched.padding_mask).sum(-1).tolist() == [1, 1, 2, 49, 74]
    for i, n in enumerate(lengths):  # uncentred windows and per-utterance CMVN: padding changes no valid frame
        alone = enc.embed(wav[i:i + 1, :n]).tokens[0]
        assert alone.shape[0] == enc.frame_lengths(torch.tensor(n)) and torch.allclose(batched.tokens[i, :len(alone)],
                                                                                      alone, atol=1e-5)
    assert enc.receptive_field == 400
    with pytest.raises(ValueError, match="at least 400 samples"):
        enc(torch.zeros(1, 399))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fbank_log_mels_stay_fp32_under_autocast(dtype):
    """Waveforms are standardised per utterance (task.normalize), and a tone at 4 standard deviations has a power
    spectrum past fp16's largest value (65504): the mel filterbank's matmul, which autocast would run in fp16 (or in
    bf16, at 8 bits of mantissa), runs in fp32."""
    front = SpeechEncoder(SPEECH_PRESETS["tiny-fbank"]).feature_extractor
    wav = torch.sin(torch.arange(16_000) * 0.3)[None] * 4.0
    exact, _ = front.log_mel(wav)
    with torch.autocast("cpu", dtype=dtype):
        autocast, _ = front.log_mel(wav)
    assert torch.isfinite(autocast).all() and autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, exact)


def test_bad_input_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 32, 32\)"):
        ImageEncoder(IMAGE_PRESETS["tiny"])(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="exceeds max_positions"):
        TextEncoder(TEXT_PRESETS["tiny"])(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer dtype"):
        TextEncoder(TEXT_PRESETS["tiny"])(torch.ones(1, 5))


def test_every_encoder_returns_both_taps_per_layer():
    for enc, x in ((ImageEncoder(IMAGE_PRESETS["tiny"]), torch.randn(2, 1, 32, 32)),
                   (SpeechEncoder(SPEECH_PRESETS["tiny"]), torch.randn(2, 8000)),
                   (TextEncoder(TEXT_PRESETS["tiny"]), torch.randint(4, 60, (2, 10)))):
        out = enc.eval()(x)
        depth = len(enc.blocks)
        assert len(out.hidden_states) == depth + 1 and len(out.ffn_outputs) == depth
        assert all(f.shape == out.hidden_states[0].shape for f in out.ffn_outputs)


def test_pre_or_post_ln_is_a_config_choice():
    from d2v.nn import PostLNBlock, PreLNBlock

    img = IMAGE_PRESETS["tiny"].model_copy(update={"norm_first": False, "layer_scale_init": None})
    speech = SPEECH_PRESETS["tiny"].model_copy(update={"norm_first": True})
    text = TEXT_PRESETS["tiny"].model_copy(update={"norm_first": True})
    for enc, x, block in ((ImageEncoder(img), torch.randn(1, 1, 32, 32), PostLNBlock),
                          (SpeechEncoder(speech), torch.randn(1, 4000), PreLNBlock),
                          (TextEncoder(text), torch.randint(4, 60, (1, 7)), PreLNBlock)):
        assert all(isinstance(b, block) for b in enc.blocks)
        out = enc.eval()(x)
        assert torch.isfinite(out.x).all()
    # a pre-LN stack ends with a LayerNorm: every output token is normalised (unit weight, zero bias at init)
    out = TextEncoder(text).eval()(torch.randint(4, 60, (1, 7)))
    assert torch.allclose(out.x.mean(-1), torch.zeros(1, 7), atol=1e-5)
    with pytest.raises(ValueError, match="only implemented for pre-LN"):
        ImageEncoder(IMAGE_PRESETS["tiny"].model_copy(update={"norm_first": False}))


def test_post_ln_drop_path_is_data2vec2s_alt_block():
    """fairseq's AltBlock (layer_norm_first=False): x = LN1(x + DP(Attn(x))); out = LN2(x + DP(FFN(x)))."""
    from d2v.nn.blocks import PostLNBlock, make_block

    block = make_block(False, 32, 4, 64, "qkv", 1e-6, drop_path=0.5)
    assert isinstance(block, PostLNBlock)
    x = torch.randn(64, 5, 32)
    torch.manual_seed(0)
    out, ffn = block.train()(x)
    torch.manual_seed(0)  # the same two per-sample draws, in the same order
    h = block.norm1(x + block.drop_path(block.attn(x)))
    t = block.mlp(h)
    torch.testing.assert_close((out, ffn), (block.norm2(h + block.drop_path(t)), t))
    plain = make_block(False, 32, 4, 64, "qkv", 1e-6)
    plain.load_state_dict(block.state_dict())  # drop-path adds no parameters
    torch.testing.assert_close(block.eval()(x), plain.eval()(x))  # and is off in evaluation
    assert not torch.allclose(out, block(x)[0])  # some samples dropped a branch in training


def test_deepnorm_blocks_scale_the_residual_by_alpha_inside_the_norms():
    """DeepNorm (data2vec's AudioSet recipe, spec §2.1): x = LN1(α·x + Attn(x)); out = LN2(α·x + FFN(x)), with the
    FFN output before the residual still the target tap; α = (2N)^¼ and β = (8N)^-¼ are fairseq's width-keyed
    constants at Base (768, N=12) and Large (1024, N=24)."""
    from d2v.nn.blocks import PostLNBlock, deepnorm_constants, make_block

    assert deepnorm_constants(12) == pytest.approx((24 ** 0.25, (8 * 12) ** -0.25))
    assert deepnorm_constants(24) == pytest.approx((48 ** 0.25, (8 * 24) ** -0.25))
    block = make_block(False, 32, 4, 64, "qkv", 1e-5, residual_scale=1.7).eval()
    assert isinstance(block, PostLNBlock)
    x = torch.randn(3, 5, 32)
    h = block.norm1(1.7 * x + block.attn(x))
    t = block.mlp(h)
    torch.testing.assert_close(block(x), (block.norm2(1.7 * h + t), t))
    plain = make_block(False, 32, 4, 64, "qkv", 1e-5).eval()
    plain.load_state_dict(block.state_dict())  # α is a constant, not a parameter
    assert not torch.allclose(plain(x)[0], block(x)[0])
    with pytest.raises(ValueError, match="only implemented for post-LN"):
        make_block(True, 32, 4, 64, "qkv", 1e-5, residual_scale=1.7)
    with pytest.raises(ConfigError, match="deepnorm.*norm_first: false"):
        validate(type(SPEECH_PRESETS["base"]), {"deepnorm": True, "norm_first": True}, "encoder")


def test_the_audioset_preset_is_base_with_deepnorm_init_and_its_own_v1_recipe():
    """audio/pretraining/audioset.yaml: Base size, DeepNorm blocks, K=12 instance-normed FFN taps whose average is
    layer-normalised, L2/√D, τ 0.999 → 0.9999 over 30k. DeepNet init: Xavier-normal, gain β for v, out, fc1, fc2 and
    1 for q, k; biases zero (BERT init first)."""
    from d2v.modalities.registry import build_encoder, build_modality

    torch.manual_seed(0)
    modality, recipe = build_modality("speech", "audioset")
    encoder = modality.encoder
    assert sum(p.numel() for p in encoder.parameters()) == 93_164_288  # Base's parameters: α adds none
    base = build_modality("speech", "base")[1]
    assert (recipe.top_k, recipe.layer_norm_targets, recipe.final_norm) == (12, "instance", "layer")
    assert recipe.model_dump(exclude={"top_k", "final_norm"}) == base.model_dump(exclude={"top_k", "final_norm"})
    alpha, beta = 24 ** 0.25, 96 ** -0.25
    assert all(b.residual_scale == alpha for b in encoder.blocks)
    assert all(b.residual_scale == 1.0 for b in build_encoder("speech", "base").blocks)
    D, F = 768, 3072
    block = encoder.blocks[5]
    q, k, v = block.attn.qkv.weight.detach().split(D)
    xavier = {"q": (q, (1 / D) ** 0.5), "k": (k, (1 / D) ** 0.5), "v": (v, beta * (1 / D) ** 0.5),
              "out": (block.attn.proj.weight.detach(), beta * (1 / D) ** 0.5),
              "fc1": (block.mlp.fc1.weight.detach(), beta * (2 / (D + F)) ** 0.5),
              "fc2": (block.mlp.fc2.weight.detach(), beta * (2 / (D + F)) ** 0.5)}
    for name, (weight, std) in xavier.items():
        assert abs(weight.std().item() - std) < 0.01 * std, name
        assert abs(weight.mean().item()) < 0.01 * std, name
    assert not block.mlp.fc1.bias.any() and not block.attn.q_bias.any() and not block.attn.proj.bias.any()
    with pytest.raises(ValueError, match=r"no DeepNorm .*\(objective: v1\)"):
        build_encoder("speech", "audioset", "v2")
    from d2v.interop.checkpoints import matching_preset
    from d2v.modalities.registry import objectives_of

    assert objectives_of("speech", "audioset") == ("v1",) and objectives_of("speech", "base") == ("v1", "v2")
    assert matching_preset("speech", encoder.cfg) == "audioset"  # `d2v import` names it
    assert matching_preset("speech", build_encoder("speech", "base", "v2").cfg, "v2") == "base"  # v2 skips it


def test_registry_caps_top_k_at_the_preset_depth():
    from d2v.modalities.registry import build_modality

    assert build_modality("speech", "base")[1].top_k == 8  # the paper's K where the depth allows it
    assert build_modality("text", "tiny")[1].top_k == 3  # recipe K=10, tiny text has 3 blocks


def test_a_result_whose_outputs_ignore_the_input_is_printed_with_a_warning(capsys):
    result = {"task": "rt_polarity", "split": "test", "metrics": {"accuracy": 0.5678}, "n": 1275,
              "predictions": {"classes_predicted": 1, "majority_share": 0.5678, "degenerate": True}}
    cli._print_result(result, "scratch, full")
    out, err = capsys.readouterr()
    assert out == "rt_polarity/test (scratch, full): accuracy=0.5678  n=1275\n"
    assert "warning: rt_polarity/test (scratch, full): every example got the same output" in err
    cli._print_result({**result, "predictions": {"classes_predicted": 2, "degenerate": False}}, "scratch, full")
    cli._print_result({k: v for k, v in result.items() if k != "predictions"}, "raw")  # written before the field
    assert capsys.readouterr().err == ""


def test_tokenizer_options_are_checked_by_name_before_any_training(tmp_path, capsys):
    write_manifest(tmp_path / "corpus", make_manifest([dict(id="a", path="a.txt", split="pretrain")]),
                   source="text_corpus")
    (tmp_path / "corpus" / "a.txt").write_text("Hello world.\n")
    assert main(["tokenizer", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "tok"),
                 "--num-threads", "0", "--sample-lines", "-1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.num_threads: Input should be greater than or equal to 1 (got 0)" in err
    assert "tokenizer.sample_lines: Input should be greater than or equal to 0 (got -1)" in err
    assert not (tmp_path / "tok").exists()


def test_a_loader_workers_error_is_printed_in_its_own_words():
    """torch re-raises an exception from a DataLoader worker with the worker's traceback as its message; the CLI
    prints what the error said and where, as it does for the same error raised in the main process."""
    from d2v.cli import error_message
    from d2v.data.shards import ShardError

    class Broken(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise ShardError("/d/shard-000000.tar: 10 samples read, index.json says 10000;\nwrite the split again")

    with pytest.raises(ShardError) as err:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert str(err.value).startswith("Caught ShardError in DataLoader worker process 0.")
    assert error_message(err.value) == ("/d/shard-000000.tar: 10 samples read, index.json says 10000;\nwrite the "
                                        "split again (ShardError in DataLoader worker process 0)")
    assert error_message(ShardError("in the main process")) == "in the main process"


def test_finetune_flags_override_the_config_file_and_leave_it_alone_when_not_given(tmp_path, monkeypatch):
    """`--config` set init, seed and mode once, and the flags' defaults (pretrained, 0, full) silently won."""
    import d2v.train.finetune as ft

    seen = []
    monkeypatch.setattr(ft, "run_finetune", lambda cfg, out, **kw: seen.append((cfg, out)) or
                        {"steps": cfg.steps, "seconds": 0.0, "best_dev": None})
    config = tmp_path / "run.yaml"
    config.write_text("init: scratch\nseed: 3\nmode: probe\nsteps: 7\n")
    assert main(["finetune", "rt_polarity", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    assert (seen[-1][0].init, seen[-1][0].seed, seen[-1][0].mode, seen[-1][0].steps) == ("scratch", 3, "probe", 7)
    assert main(["finetune", "rt_polarity", "--config", str(config), "--seed", "5", "--mode", "full"]) == 0
    cfg, out = seen[-1]
    assert (cfg.init, cfg.seed, cfg.mode) == ("scratch", 5, "full")
    assert str(out) == "runs/embedded/finetune/rt_polarity-scratch-full-s5"
    assert main(["finetune", "rt_polarity", "--init", "scratch", "--out", str(tmp_path / "b")]) == 0
    assert (seen[-1][0].seed, seen[-1][0].mode) == (0, "full")  # the defaults without a config file
