"""Raw-feature baselines: pair features, TF-IDF cosine, strength selection, stacked log-mels, and whole runs on toy
image and tone-speech tasks that write evaluation JSONs the report reads."""
import json

import numpy as np
import pytest
import torch
from fixtures import tone_task_shards

from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.baselines import bags, cosine, fit_selected, pair_features, run_baseline, stack_frames
from d2v.eval.lm import LanguageModelConfig
from d2v.eval.lm import build as build_lm
from d2v.modalities.speech import FbankConfig, FbankFrontEnd
from d2v.train import recipe, tasks
from d2v.train.tasks import BaselineConfig, baseline_config


def test_a_pair_is_the_pieces_both_texts_have_and_the_pieces_only_one_has():
    a, b = bags([([5, 6, 6, 7], [6, 8]), ([9], [9])], vocabulary=10)
    x = pair_features(a, b).toarray()
    assert x.shape == (2, 20)
    assert np.flatnonzero(x[0, :10]).tolist() == [6] and np.flatnonzero(x[0, 10:]).tolist() == [5, 7, 8]
    assert np.flatnonzero(x[1, :10]).tolist() == [9] and not x[1, 10:].any()
    assert x.max() == 1  # a repeated piece counts once
    single, none = bags([([1, 2], None)], vocabulary=4)
    assert none is None and pair_features(single, None).toarray().tolist() == [[0, 1, 1, 0]]


def test_tfidf_cosine_is_one_for_the_same_text_and_zero_for_disjoint_ones():
    from sklearn.feature_extraction.text import TfidfTransformer

    a, b = bags([([1, 2, 3], [1, 2, 3]), ([1, 2], [3, 4]), ([1, 2, 3], [1, 4])], vocabulary=5)
    tfidf = TfidfTransformer().fit(a)
    sims = cosine(tfidf.transform(a), tfidf.transform(b))
    assert sims[0] == pytest.approx(1.0) and sims[1] == pytest.approx(0.0) and 0 < sims[2] < 1


class Recorder:
    """An estimator whose quality depends only on its strength: 1.0 reads the label off feature 0, others guess 0."""

    def __init__(self, strength):
        self.strength = strength

    def fit(self, x, y):
        self.n_fitted = len(y)
        return self

    def predict(self, x):
        return (x[:, 0] > 0).astype(int) if self.strength == 1.0 else np.zeros(len(x), int)


def test_the_strength_is_chosen_on_dev_or_on_a_holdout_then_refit_on_all_of_train():
    task = tasks.TASKS["rt_polarity"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    y = (x[:, 0] > 0).astype(int)
    cfg = baseline_config("rt_polarity", {"strengths": [0.01, 1.0, 100.0]})
    model, strength, value = fit_selected(task, cfg, Recorder, (x[:150], y[:150]), (x[150:], y[150:]))
    assert (strength, value, model.n_fitted) == (1.0, 1.0, 150)
    model, strength, value = fit_selected(task, cfg, Recorder, (x, y), None)
    assert (strength, value, model.n_fitted) == (1.0, 1.0, 200)  # selected on 20 held out, refit on all 200


def test_stacked_log_mels_run_at_the_encoders_frame_rate_with_zero_context_past_the_ends():
    fbank = FbankFrontEnd(FbankConfig(n_mels=8))
    for samples in (400, 4000, 4160, 16_000):
        mels, _ = fbank.log_mel(torch.randn(1, samples))
        stacked = stack_frames(mels[0], context=2)
        assert stacked.shape == (fbank.num_frames(torch.tensor([samples])).item(), 8 * 5)
    m = torch.arange(3 * 5, dtype=torch.float).reshape(3, 5)  # 3 mels, 5 frames
    s = stack_frames(m, context=1).reshape(-1, 3, 3)  # (frames, mel, window)
    assert s.shape[0] == 3 and torch.equal(s[:, :, 1], m[:, ::2].T)  # centre: frames 0, 2, 4
    assert torch.equal(s[0, :, 0], torch.zeros(3)) and torch.equal(s[2, :, 2], torch.zeros(3))
    assert torch.equal(s[1, :, 0], m[:, 1]) and torch.equal(s[1, :, 2], m[:, 3])


def test_image_baseline_writes_one_raw_result_per_test_split(toy_image_task, tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.EMBEDDED_FINETUNE, "toy_image", toy_image_task.model_dump(exclude={"task", "data_root"}))
    cfg = baseline_config("toy_image", {"data_root": toy_image_task.data_root, "strengths": [0.1, 1.0]})
    (result,) = run_baseline(cfg, tmp_path / "raw")
    assert result["init"] == "raw" and result["n"] == 16 and result["metrics"]["accuracy"] == 1.0  # bright vs dark
    assert result["selection"]["selected_on"] == "10% of train" and result["selection"]["n_train"] == 48
    saved = json.loads((tmp_path / "raw" / "toy_image-test.json").read_text())
    assert saved["params_digest"] == result["params_digest"] and recipe.in_result(saved, "baseline") == recipe.BASELINE
    assert saved["predictions"]["classes_predicted"] == 2 and not saved["predictions"]["degenerate"]
    with pytest.raises(ValueError, match=r"toy_image: no extra test set \['x/y'\]"):
        run_baseline(cfg, tmp_path / "raw", extra=("x/y",))


def test_a_linear_ctc_head_on_log_mels_transcribes_tone_speech(tmp_path, monkeypatch):
    """Each letter is a tone, so letters are linear in the log-mels: the baseline must transcribe nearly all of
    them; a misaligned frame rate, target or decoding step would leave it at CER ~1."""
    texts = ["AB C", "CA", "B CB", "AC B", "CAB", "BA C"]
    letters = tone_task_shards(tmp_path, texts)
    monkeypatch.setitem(tasks.TASKS, "tones",
                        tasks.Task("speech", "ctc", "tones", "train", None, ("train",), ("wer", "cer")))
    monkeypatch.setitem(tasks.EMBEDDED_FINETUNE, "tones", {"steps": 1, "batch_size": 4, "optim": {"lr": 1e-3},
                                                        "audio": {"min_samples": 0}})
    cfg = BaselineConfig(task="tones", data_root=str(tmp_path), letters=str(letters),
                         ctc_epochs=60, ctc_lr=2e-2, ctc_batch_size=2)
    (result,) = run_baseline(cfg, tmp_path / "out")
    assert result["n"] == 6 and result["metrics"]["cer"] < 0.2, result
    selection = result["selection"]
    assert (selection["epoch"], selection["selected_on"], selection["n_train"]) == (60, "last epoch", 6)
    assert selection["train_loss"] < 1.0  # far below the letters' entropy: it left the blank plateau
    # decoded with a bigram of the transcripts too, as the fine-tuned models are; the greedy scores stay
    (tmp_path / "lm.txt").write_text("\n".join(texts) + "\n")
    build_lm(LanguageModelConfig(corpus="tones", order=2, lm_weights=(0.5, 1.0), word_scores=(0.0,)),
             LetterTokenizer.load(letters).symbols, tmp_path / "lm", [tmp_path / "lm.txt"])
    monkeypatch.setitem(tasks.TASKS, "tones",
                        tasks.Task("speech", "ctc", "tones", "train", "train", ("train",), ("wer", "cer")))
    (decoded,) = run_baseline(cfg, tmp_path / "out_lm", lm=tmp_path / "lm")
    assert decoded["metrics"]["cer"] < 0.2 and decoded["metrics"]["wer_lm"] <= decoded["metrics"]["wer"]
    assert decoded["lm"]["tuned_on"] == "train" and "beam search with a word n-gram" in decoded["baseline"]
    with pytest.raises(ValueError, match="rt_polarity: --lm decodes CTC tasks; this one is classification"):
        run_baseline(BaselineConfig(task="rt_polarity"), tmp_path / "x", lm=tmp_path / "lm")
