"""`d2v rehearse`: each training stage of a profile takes one step on synthetic inputs of its configured shapes, and
what does not fit across the profile's parts is named by stage, before any download or cluster job."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from d2v.cli import main
from d2v.pipeline.params import load_params, parse_params
from d2v.pipeline.rehearsal import rehearse_profile
from d2v.train.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_smoke_stage_takes_a_step_and_what_does_not_fit_is_named_by_stage():
    results = rehearse_profile(load_params(ROOT / "params.yaml", "smoke").active)
    assert [r.stage for r in results] == ["pretrain image", "pretrain speech", "pretrain text",
                                          "finetune fashion_mnist", "finetune speech_10min", "finetune rt_polarity",
                                          "finetune bible_para", "finetune lee_sts"]
    assert all(r.error is None and np.isfinite(r.loss) and r.parameters > 1e6 for r in results), results
    # each task fine-tunes the encoder its modality's rehearsal saved, as the pipeline does
    assert [r.model for r in results[3:]] == ["embedded v1 pretrained"] * 5
    # two mistakes validation lets through, as each config is valid alone: a tokenizer of 4000 ids for the 8000-id
    # text encoders, and Fashion-MNIST fine-tuned at 28 px on a ViT built for 32
    data = copy.deepcopy(RAW)
    smoke = data["profiles"]["smoke"]
    smoke["tokenizer"]["vocab_size"] = 4000
    smoke["finetune"]["fashion_mnist"]["image"] = {"size": 28, "channels": 1, "mean": [0.5], "std": [0.5]}
    failed = {r.stage: r.error for r in rehearse_profile(parse_params(data).profiles["smoke"]) if r.error}
    assert set(failed) == {"pretrain text", "finetune fashion_mnist", "finetune rt_polarity", "finetune bible_para",
                           "finetune lee_sts"}
    assert failed["pretrain text"].startswith("ValueError: pretrain.text: the profile's tokenizer (tokenizer."
                                              "vocab_size) makes 4000 ids (pieces + <mask>), the text encoder has "
                                              "vocab_size=8000")
    assert "finetune.fashion_mnist.image (embedded): channels/size 1/28 do not match the encoder's 1/32" in \
        failed["finetune fashion_mnist"]


def test_the_command_reports_each_stage_and_its_configured_batch(capsys, tmp_path):
    assert main(["rehearse", "--profile", "smoke", "--stage", "finetune lee_sts"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["stage", "model", "parameters", "batch", "loss", "seconds", "peak", "GiB"]
    assert out[2].split()[:6] == ["finetune", "lee_sts", "embedded", "v1", "scratch", "5.3M"]  # nothing pretrained
    assert out[-1] == "1 of 1 stages took a step"
    # the memory pre-flight: each stage's own micro-batch (smoke: 4 crops of pretraining speech, 2 utterances of CTC)
    # at the longest crop its loader makes
    out_json = tmp_path / "rehearsal.json"
    assert main(["rehearse", "--profile", "smoke", "--batch", "config", "--out", str(out_json), "--stage",
                 "pretrain speech", "--stage", "finetune speech_10min"]) == 0
    saved = json.loads(out_json.read_text())
    assert (saved["profile"], saved["batch"], saved["device"]) == ("smoke", "config", "cpu")
    assert [(r["stage"], r["batch"], r["error"], r["peak_gib"]) for r in saved["stages"]] == \
        [("pretrain speech", 4, None, None), ("finetune speech_10min", 2, None, None)]
    assert main(["rehearse", "--profile", "smoke", "--stage", "finetune imagenet"]) == 2
    assert "no stage ['finetune imagenet'] in this profile" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["rehearse", "--profile", "smoke", "--device", "cuda"]) == 2
        assert "rehearse --device: 'cuda' asked for, but torch sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rehearse", "--profile", "smoke", "--batch", "0"])
    assert "'0': expected a positive number of examples or 'config'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("profile, stages", [
    ("paper", ["pretrain image", "pretrain speech", "pretrain text", "finetune imagenet", "finetune librispeech_10h",
               "finetune glue_mnli"]),
    ("paper-v2", ["pretrain image", "pretrain speech", "finetune imagenet", "finetune librispeech_1h",
                  "finetune glue_rte"]),
    ("paper-audioset", ["finetune audioset"]),  # the DeepNorm encoder, 527 linear-softmax outputs, clip mixup
])
def test_the_gpu_profiles_rehearse_on_cpu(profile, stages):
    """The published recipes at full model size and input shape (224 px RGB, 2 s of audio, 512-token blocks), one
    example each: padding across a batch is rehearsed at the smoke size. This found the paper profile's tokenizer
    of 50,000 ids for text encoders of 50,265. The other GLUE and CTC rows share these shapes (STS-B's regression
    head is rehearsed at the smoke size, as lee_sts); `d2v rehearse --profile paper-v2` runs all 15 stages in about
    2 minutes here."""
    results = rehearse_profile(load_params(ROOT / "params.yaml", profile).active, batch=1, only=stages)
    assert [r.stage for r in results] == stages
    assert [r.error for r in results] == [None] * len(stages)
    assert all(r.parameters > 80e6 for r in results)  # base size
    pretrained = {r.stage.split()[1] for r in results if r.stage.startswith("pretrain")}
    for r in results[len(pretrained):]:  # from the rehearsed pretraining's final.pt where there is one
        assert r.model.endswith("pretrained" if TASKS[r.stage.split()[1]].modality in pretrained else "scratch")


def test_an_fp16_rehearsal_steps_through_the_loops_loss_scaler(monkeypatch):
    """As the training loops, an fp16 stage scales its loss before the backward and steps through the scaler, with
    the loop's settings (pretraining: fairseq's 2^7 and 2^14; text fine-tuning: its GLUE recipes' 4 and 128); the
    CPU scaler here doubles after a finite step."""
    from test_train import cpu_fp16_autocast

    from d2v.train import precision

    seen, scalers = [], []

    def recording(device, precision, scaling=None):
        amp, scaler = cpu_fp16_autocast(device, precision)
        seen.append(scaling)
        scalers.append(scaler)
        return amp, scaler

    monkeypatch.setattr(precision, "autocast", recording)
    results = rehearse_profile(load_params(ROOT / "params.yaml", "smoke").active,
                               only=["pretrain text", "finetune rt_polarity"])
    assert [r.error for r in results] == [None, None] and all(np.isfinite(r.loss) for r in results)
    assert seen == [{"init_scale": 2.0 ** 7, "growth_interval": 2 ** 14}, {"init_scale": 4, "growth_interval": 128}]
    assert [s.get_scale() for s in scalers] == [2.0 ** 17] * 2  # one unskipped step each
