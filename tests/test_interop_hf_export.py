"""d2v → Hugging Face export: `transformers` opens the exported folder with `from_pretrained`, with no missing or
unexpected key, and reproduces every hidden state (and every task head's logits) of the d2v model within 1e-5 (fp32,
eval); importing the export back gives the d2v weights bit for bit; architectures HF lacks are refused by name.

Every d2v parameter is randomised first, so that zero-initialised tables, tokens and biases cannot hide a mapping bug.
"""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from fixtures import randomize  # noqa: E402

from d2v.cli import main  # noqa: E402
from d2v.data.tokenizer import LetterTokenizer, SentencePieceConfig, TextTokenizer, train_sentencepiece  # noqa: E402
from d2v.eval.metrics import ctc_greedy  # noqa: E402
from d2v.interop import InteropError, load_hf  # noqa: E402
from d2v.interop.hf_export import HFExport, export_classifier, export_encoder, save_pretrained  # noqa: E402
from d2v.interop.checkpoints import tokenizer_files  # noqa: E402
from d2v.modalities.base import Batch  # noqa: E402
from d2v.modalities.heads import CTCModel, ImageClassifier, TextClassifier  # noqa: E402
from d2v.modalities.image import ImageEncoder  # noqa: E402
from d2v.modalities.registry import build_encoder, encoder_config  # noqa: E402
from d2v.modalities.speech import SpeechEncoder  # noqa: E402
from d2v.modalities.text import TextEncoder  # noqa: E402
from d2v.train.config import pretrain_config  # noqa: E402
from d2v.train.task_model import save_finetuned  # noqa: E402
from d2v.train.pretrain import save_encoder  # noqa: E402
from d2v.train.tasks import finetune_config  # noqa: E402

TOL = 1e-5
IMAGE_TINY = encoder_config("image", "tiny")
SPEECH_TINY = encoder_config("speech", "tiny")
TEXT_TINY = encoder_config("text", "tiny")


def reopen(export: HFExport, tmp_path, cls, **kwargs):
    """Save, then load with transformers; no key may be missing, unexpected or mismatched."""
    folder = save_pretrained(export, tmp_path / "hf")
    model, info = getattr(transformers, cls).from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def worst(ours: list[torch.Tensor], theirs, valid: torch.Tensor | None = None) -> float:
    assert len(ours) == len(theirs)
    return max(((a - b).abs()[valid] if valid is not None else (a - b).abs()).max().item()
               for a, b in zip(ours, theirs))


def assert_imports_back(kind: str, hf, ours) -> None:
    """Importing the exported model gives the d2v weights bit for bit, and no others."""
    back, original = load_hf(kind, hf).state_dict(), ours.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())


IMAGE_LAYOUTS = {
    "tiny preset: shared rel-pos, abs positions, final LN": IMAGE_TINY,
    "per-layer rel-pos, mean pooling": IMAGE_TINY.model_copy(update={"rel_pos": "per_layer", "pooling": "mean_ln",
                                                                     "abs_pos": False}),
    "no rel-pos, no LayerScale, no final norm": IMAGE_TINY.model_copy(update={"rel_pos": "none", "pooling": "none",
                                                                              "layer_scale_init": None}),
}


@pytest.mark.parametrize("layout", IMAGE_LAYOUTS)
def test_image_export_matches_in_transformers_and_imports_back(layout, tmp_path):
    cfg = IMAGE_LAYOUTS[layout].model_copy(update={"drop_path": 0.0})
    ours = randomize(ImageEncoder(cfg))
    pooled = cfg.pooling == "mean_ln"
    hf = reopen(export_encoder("image", ours.state_dict(), cfg), tmp_path, "Data2VecVisionModel",
                add_pooling_layer=pooled)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out, ref = ours(images), hf(pixel_values=images, output_hidden_states=True)
    diff = max(worst(out.hidden_states, ref.hidden_states), (out.x - ref.last_hidden_state).abs().max().item())
    if pooled:
        diff = max(diff, (out.pooled - ref.pooler_output).abs().max().item())
    assert diff < TOL
    assert_imports_back("image", hf, ours)


def test_speech_export_matches_with_padding_and_imports_back(tmp_path):
    ours = randomize(SpeechEncoder(SPEECH_TINY))
    hf = reopen(export_encoder("speech", ours.state_dict(), SPEECH_TINY), tmp_path, "Data2VecAudioModel")
    wav = torch.randn(2, 24_000)
    attention = torch.ones(2, 24_000, dtype=torch.long)
    attention[1, 16_000:] = 0
    wav[1, 16_000:] = 0
    with torch.no_grad():
        out, ref = ours(wav, padding_mask=attention == 0), hf(wav, attention_mask=attention, output_hidden_states=True)
    assert worst(out.hidden_states, ref.hidden_states, ~out.padding_mask) < TOL
    assert torch.equal(hf.masked_spec_embed, ours.mask_emb)  # the mask embedding travels too
    assert_imports_back("speech", hf, ours)


def test_text_export_matches_with_padding_and_imports_back(tmp_path):
    ours = randomize(TextEncoder(TEXT_TINY))
    hf = reopen(export_encoder("text", ours.state_dict(), TEXT_TINY), tmp_path, "Data2VecTextModel",
                add_pooling_layer=False)
    tokens = torch.randint(4, TEXT_TINY.vocab_size, (2, 16))
    tokens[:, 0] = 0
    tokens[1, 10:] = TEXT_TINY.pad_idx
    with torch.no_grad():
        out = ours(tokens)
        ref = hf(tokens, attention_mask=(tokens != TEXT_TINY.pad_idx).long(), output_hidden_states=True)
    assert worst(out.hidden_states, ref.hidden_states, tokens != TEXT_TINY.pad_idx) < TOL
    assert_imports_back("text", hf, ours)


@pytest.mark.parametrize("kind,cfg,field", [
    ("image", encoder_config("image", "tiny", "v2"), "norm_first"),
    ("speech", encoder_config("speech", "tiny-fbank"), "frontend"),
    ("speech", encoder_config("speech", "tiny", "v2"), "alibi"),
    ("speech", encoder_config("speech", "tiny", deepnorm=True), "deepnorm"),
    ("text", TEXT_TINY.model_copy(update={"norm_first": True}), "norm_first"),
    ("text", TEXT_TINY.model_copy(update={"alibi": True}), "alibi"),
])
def test_architectures_transformers_lacks_are_refused_by_name(kind, cfg, field):
    encoder = build_encoder(kind, "tiny")  # any weights: the config check comes first
    with pytest.raises(InteropError, match=f"{field}=.*no Hugging Face Data2Vec layout"):
        export_encoder(kind, encoder.state_dict(), cfg)


def test_text_heads_export_as_sequence_classification(tmp_path):
    tokens = torch.randint(4, TEXT_TINY.vocab_size, (3, 12))
    tokens[:, 0] = 0
    tokens[2, 7:] = TEXT_TINY.pad_idx
    for head, outputs in (("classification", 3), ("regression", 1)):
        ours = randomize(TextClassifier(TextEncoder(TEXT_TINY), outputs), seed=outputs)
        export = export_classifier("text", head, ours.state_dict(), TEXT_TINY, outputs, head_dropout=0.1)
        hf = reopen(export, tmp_path / head, "Data2VecTextForSequenceClassification")
        assert hf.config.problem_type == ("regression" if head == "regression" else "single_label_classification")
        with torch.no_grad():
            mine = ours(Batch(tokens, tokens.eq(TEXT_TINY.pad_idx)))
            theirs = hf(tokens, attention_mask=(tokens != TEXT_TINY.pad_idx).long()).logits
        assert theirs.shape == (3, outputs) and (mine - theirs).abs().max().item() < TOL
    probe = TextClassifier(TextEncoder(TEXT_TINY), 2, linear_probe=True)
    with pytest.raises(InteropError, match="linear probe"):
        export_classifier("text", "classification", probe.state_dict(), TEXT_TINY, 2)
    with pytest.raises(InteropError, match=r"2 label names \['no', 'yes'\] for a head of 3 outputs"):
        export_classifier("text", "classification", ours.state_dict(), TEXT_TINY, 3, labels=("no", "yes"))


LINES = [f"Paragraph {i} talks about the weather and the garden, and then about tea with {w}." for i, w in
         zip(range(300), ["Anne", "Emma", "Mr. Darcy", "the vicar"] * 75)]


def test_hf_tokenizer_gives_d2vs_ids_and_refuses_bpe(tmp_path):
    from d2v.interop.hf_tokenizer import hf_tokenizer_files

    bpe = train_sentencepiece(LINES, tmp_path / "bpe.model", SentencePieceConfig(
        vocab_size=80, model_type="bpe", num_threads=1, seed_sentencepiece_size=10_000))
    with pytest.raises(InteropError, match="only a unigram SentencePiece model"):
        hf_tokenizer_files(bpe.read_bytes(), 64)


def test_task_label_names_follow_the_label_ids_the_sources_write():
    from d2v.data.sources import fashion_mnist, glue
    from d2v.train.tasks import TASKS

    assert TASKS["fashion_mnist"].labels == fashion_mnist.CLASSES
    for name, source in glue.TASKS.items():
        task = TASKS[f"glue_{name}"]
        if source.labels is None:
            assert task.kind == "regression" and task.labels == ()
        elif not all(label.isdigit() for label in source.labels):  # named in the data: the same names, same order
            assert task.labels == source.labels
        else:
            assert len(task.labels) == len(source.labels) == task.num_outputs
    for task in TASKS.values():
        assert task.labels == () or (task.kind == "classification" and len(task.labels) == task.num_outputs)


def test_ctc_export_matches_and_its_tokenizer_decodes_like_ours(tmp_path):
    letters = LetterTokenizer(["<blank>", "|", *"ETAONISH"])
    ours = randomize(CTCModel(SpeechEncoder(SPEECH_TINY), len(letters.symbols)))
    export = export_classifier("speech", "ctc", ours.state_dict(), SPEECH_TINY, len(letters.symbols))
    letters.save(tmp_path / "letters.json")

    export.files.update(tokenizer_files(tmp_path / "letters.json", ctc=True))
    hf = reopen(export, tmp_path, "Data2VecAudioForCTC")
    wav = torch.randn(2, 16_000)
    with torch.no_grad():
        mine, lengths = ours(Batch(wav, None))
        theirs = hf(wav).logits
    assert (mine - theirs).abs().max().item() < TOL
    hf_tokenizer = transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp_path / "hf")
    ids = theirs.argmax(-1)
    ours_text = [letters.decode(seq) for seq in ctc_greedy(mine.numpy(), lengths.tolist())]
    assert hf_tokenizer.batch_decode(ids) == ours_text
    assert any(ours_text)  # random logits still decode to some letters, so the comparison means something


def test_image_classifier_exports_when_hf_can_pool_it(tmp_path):
    cfg = IMAGE_LAYOUTS["no rel-pos, no LayerScale, no final norm"].model_copy(update={"drop_path": 0.0})
    ours = randomize(ImageClassifier(ImageEncoder(cfg), 10))
    hf = reopen(export_classifier("image", "classification", ours.state_dict(), cfg, 10), tmp_path,
                "Data2VecVisionForImageClassification")
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (ours(Batch(images, None)) - hf(pixel_values=images).logits).abs().max().item() < TOL
    final_ln = randomize(ImageClassifier(ImageEncoder(IMAGE_TINY), 10))
    with pytest.raises(InteropError, match="pooling='final_ln'"):
        export_classifier("image", "classification", final_ln.state_dict(), IMAGE_TINY, 10)


def test_cli_exports_pretraining_and_finetuning_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    student, teacher = randomize(TextEncoder(TEXT_TINY), 1), randomize(TextEncoder(TEXT_TINY), 2)
    save_encoder(tmp_path, pretrain_config("text", {"preset": "tiny", "steps": 7}), student, teacher, 7)
    for weights, encoder in (("student", student), ("teacher", teacher)):
        out = tmp_path / f"hf-{weights}"
        assert main(["export", str(tmp_path / "final.pt"), str(out), "--weights", weights]) == 0
        hf = transformers.Data2VecTextModel.from_pretrained(out, add_pooling_layer=False).eval()
        tokens = torch.randint(4, TEXT_TINY.vocab_size, (1, 9))
        with torch.no_grad():
            assert (encoder(tokens).x - hf(tokens).last_hidden_state).abs().max().item() < TOL
        d2v = json.loads((out / "config.json").read_text())["d2v"]
        assert d2v == {"source": str(tmp_path / "final.pt"), "weights": weights, "steps": 7, "objective": "v1",
                       "preset": "tiny"}

    spm = train_sentencepiece(LINES, tmp_path / "spm.model", SentencePieceConfig(
        vocab_size=TEXT_TINY.vocab_size, num_threads=1, seed_sentencepiece_size=10_000))
    cfg = finetune_config("rt_polarity", {"preset": "tiny", "tokenizer": str(spm), "seed": 3,
                                          "regularization": {"dropout": 0.2}})
    model = randomize(TextClassifier(TextEncoder(TEXT_TINY), 2))
    save_finetuned(model.state_dict(), cfg, tmp_path / "best.pt", step=11)
    assert main(["export", str(tmp_path / "best.pt"), str(tmp_path / "hf-ft")]) == 0
    assert (tmp_path / "hf-ft" / "spm.model").read_bytes() == spm.read_bytes()
    hf = transformers.Data2VecTextForSequenceClassification.from_pretrained(tmp_path / "hf-ft").eval()
    tokens = torch.randint(4, TEXT_TINY.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(Batch(tokens, None)) - hf(tokens).logits).abs().max().item() < TOL
    assert json.loads((tmp_path / "hf-ft" / "config.json").read_text())["d2v"]["task"] == "rt_polarity"
    assert hf.config.hidden_dropout_prob == 0.2  # the fine-tuning's own, not the preset's 0.0
    assert hf.config.id2label == {0: "rotten", 1: "fresh"} and hf.config.label2id == {"rotten": 0, "fresh": 1}
    auto, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-ft"), TextTokenizer(spm)
    for text, pair in [(LINES[3], None), ("  The garden,   tea!  ", None), ("Naïve café ½", "the weather"),
                       (LINES[7], LINES[8])]:
        assert auto(text, pair)["input_ids"] == ours.encode(text, pair).tolist()
    assert (auto.mask_token_id, auto.pad_token_id, auto.model_max_length) == (ours.mask, 1, TEXT_TINY.max_positions)
    assert auto.decode(auto(LINES[3])["input_ids"], skip_special_tokens=True) == LINES[3]

    torch.save({"something": 1}, tmp_path / "other.pt")
    assert main(["export", str(tmp_path / "other.pt"), str(tmp_path / "x")]) == 2
    assert "neither a pretraining final.pt" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_save_is_atomic_and_never_replaces_a_foreign_folder(tmp_path):
    ours = randomize(TextEncoder(TEXT_TINY))
    good = export_encoder("text", ours.state_dict(), TEXT_TINY)
    out = save_pretrained(good, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = HFExport(good.config, {**good.state, "bad": np.zeros(3)})  # not a tensor: safetensors refuses it
    with pytest.raises(Exception):
        save_pretrained(broken, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # and no temp folder is left behind
    save_pretrained(export_encoder("text", randomize(TextEncoder(TEXT_TINY), 5).state_dict(), TEXT_TINY), out)
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # a re-export replaces it
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        save_pretrained(good, foreign)
    assert (foreign / "todo.txt").read_text() == "mine"
