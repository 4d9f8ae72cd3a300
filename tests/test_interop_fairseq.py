"""Original checkpoints → d2v (`d2v import`): fairseq data2vec audio and text, BEiT-codebase vision.

The fixtures are written in the original layouts independently of the importer's tables: a randomised d2v encoder is
exported to the HF layout (checked against transformers in test_interop_hf_export.py), then renamed into the
original layout by the HF conversion scripts' mappings as shared/reference/hf-data2vec.md §1.8 lists them, and saved
with what the originals carry besides (pretraining heads, the EMA teacher, version buffers, index buffers, the
model's own config). Importing must give back the d2v weights bit for bit, the same config, and the teacher.
"""
import re

import pytest
import torch

from fixtures import randomize
from d2v.cli import main
from d2v.interop import InteropError
from d2v.interop.fairseq import load_fairseq
from d2v.interop.hf_export import export_encoder, save_pretrained
from d2v.modalities.image import ImageEncoder
from d2v.modalities.registry import encoder_config
from d2v.modalities.speech import SpeechEncoder
from d2v.modalities.text import TextEncoder
from d2v.train.task_model import build_model
from d2v.train.tasks import finetune_config

HF_TO_FAIRSEQ_AUDIO = [  # convert_data2vec_audio_original_pytorch_checkpoint_to_pytorch.py, MAPPING, reversed
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.2.1."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^masked_spec_embed$", "mask_emb"),
    (r"^encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.", r"encoder.pos_conv.\1.0."),
    (r"^encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
]
HF_TO_FAIRSEQ_TEXT = [  # convert_data2vec_text_..., reversed; below encoder.sentence_encoder.
    (r"^embeddings\.word_embeddings\.", "embed_tokens."),
    (r"^embeddings\.position_embeddings\.", "embed_positions."),
    (r"^embeddings\.LayerNorm\.", "layernorm_embedding."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.final_layer_norm."),
]
HF_TO_BEIT = [  # convert_data2vec_vision_original_pytorch_checkpoint_to_pytorch.py, reversed
    (r"^embeddings\.(cls_token|mask_token)$", r"\1"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^encoder\.relative_position_bias\.", "rel_pos_bias."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.", r"blocks.\1.attn."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.bias$", r"blocks.\1.attn.q_bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.bias$", r"blocks.\1.attn.v_bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.lambda_(\d)$", r"blocks.\1.gamma_\2"),
    (r"^layernorm\.", "norm."),
    (r"^pooler\.layernorm\.", "fc_norm."),
]


def renamed(sd: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def hf_state(kind: str, encoder) -> dict:
    return export_encoder(kind, encoder.state_dict(), encoder.cfg).state


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fairseq_audio_pretraining_checkpoint_with_its_ema_teacher(tmp_path):
    cfg = encoder_config("speech", "tiny")
    student, teacher = randomize(SpeechEncoder(cfg), 1), randomize(SpeechEncoder(cfg), 2)
    model = renamed(hf_state("speech", student), HF_TO_FAIRSEQ_AUDIO)
    ema = {k[len("encoder."):]: v for k, v in renamed(hf_state("speech", teacher), HF_TO_FAIRSEQ_AUDIO).items()
           if k.startswith("encoder.")}  # fairseq's EMA covers the transformer only
    model.update({"final_proj.weight": torch.randn(64, 64), "final_proj.bias": torch.randn(64), "_ema": ema})
    layers = " + ".join(f"[({c}, {k}, {s})]" for c, k, s in cfg.conv_layers)
    torch.save({"model": model, "cfg": {"model": {"conv_feature_layers": layers, "encoder_attention_heads": 4,
                                                  "dropout": 0.0, "encoder_layerdrop": 0.0}}},
               tmp_path / "audio_base.pt")

    assert main(["import", str(tmp_path / "audio_base.pt"), str(tmp_path / "final.pt")]) == 0
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert (final["modality"], final["preset"], final["imported"], final["has_teacher"]) == ("speech", "tiny",
                                                                                             "fairseq", True)
    assert same_weights(final["encoder"], student.state_dict())
    front_end = ("feature_extractor.", "feature_norm.", "feature_proj.", "mask_emb")
    expected_teacher = {k: (v if k.startswith(front_end) else teacher.state_dict()[k])
                        for k, v in student.state_dict().items()}
    assert same_weights(final["teacher"], expected_teacher)
    assert final["encoder_config"]["dropout"] == 0.0 and final["encoder_config"]["layerdrop"] == 0.0

    ft = build_model(finetune_config("speech_1h", {"preset": "tiny", "pretrained": str(tmp_path / "final.pt"),
                                                   "letters": str(letters(tmp_path))}))
    assert same_weights(ft.encoder.state_dict(), student.state_dict())  # d2v finetune starts from it


def letters(tmp_path):
    from d2v.data.tokenizer import LetterTokenizer

    return LetterTokenizer(["<blank>", "|", *"ETAON"]).save(tmp_path / "letters.json")


def test_fairseq_audio_finetuned_checkpoint_and_bad_inputs(tmp_path):
    cfg = encoder_config("speech", "tiny")
    student = randomize(SpeechEncoder(cfg))
    model = {f"w2v_encoder.w2v_model.{k}": v for k, v in renamed(hf_state("speech", student),
                                                                 HF_TO_FAIRSEQ_AUDIO).items()}
    model["w2v_encoder.proj.weight"] = torch.randn(32, 64)  # the CTC head: not part of the encoder
    imported = load_fairseq({"model": model})  # no cfg: 7 layers take wav2vec 2.0's strides, dim / 64 heads
    assert imported.kind == "speech" and imported.teacher is None
    assert imported.cfg.conv_layers == cfg.conv_layers and imported.cfg.num_heads == 1
    assert same_weights(imported.student, student.state_dict())

    group_norm = {k.replace(".2.1.", ".2."): v for k, v in model.items()}
    with pytest.raises(InteropError, match="group norm"):
        load_fairseq({"model": group_norm})
    with pytest.raises(InteropError, match="only lists, tuples, integers"):
        load_fairseq({"model": model, "cfg": {"model": {"conv_feature_layers": "__import__('os').getcwd()"}}})
    with pytest.raises(InteropError, match="no place for: .*encoder.layers.0.adapter.weight"):
        load_fairseq({"model": {**model, "w2v_encoder.w2v_model.encoder.layers.0.adapter.weight": torch.zeros(1)}})
    with pytest.raises(InteropError, match="not a data2vec audio, text or BEiT"):
        load_fairseq({"model": {"decoder.weight": torch.zeros(1)}})


def test_a_deepnorm_audio_checkpoint_imports_as_the_audioset_architecture():
    """data2vec's AudioSet config sets self_attn_norm_type and final_norm_type to deepnorm; the weights are laid out
    as any data2vec audio model's, and the import keeps the residual scale. fairseq keys α on the width (24^¼ for
    768), d2v on the depth: where the two disagree, or only one norm type is deepnorm, the import refuses."""
    torch.manual_seed(0)
    plain = SpeechEncoder(encoder_config("speech", "base"))  # the HF layout has no DeepNorm; the weights are the same
    model = renamed(hf_state("speech", plain), HF_TO_FAIRSEQ_AUDIO)
    deepnorm = {"self_attn_norm_type": "deepnorm", "final_norm_type": "deepnorm"}
    imported = load_fairseq({"model": model, "cfg": {"model": {"encoder_attention_heads": 12, **deepnorm}}})
    assert imported.cfg == encoder_config("speech", "audioset")  # every field the audioset preset's
    assert same_weights(imported.student, plain.state_dict())
    ours = SpeechEncoder(imported.cfg)
    ours.load_state_dict(imported.student)
    assert all(b.residual_scale == 24 ** 0.25 for b in ours.blocks)
    wav = torch.randn(1, 8000)
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(wav).x, plain.eval()(wav).x)  # the scale is in the forward pass

    tiny = renamed(hf_state("speech", SpeechEncoder(encoder_config("speech", "tiny"))), HF_TO_FAIRSEQ_AUDIO)
    with pytest.raises(InteropError, match="width 64 and 2 layers: fairseq picks α by width"):
        load_fairseq({"model": tiny, "cfg": {"model": deepnorm}})
    with pytest.raises(InteropError, match=r"\('deepnorm', 'layer'\).*one of them deepnorm"):
        load_fairseq({"model": model, "cfg": {"model": {"self_attn_norm_type": "deepnorm"}}})


def test_fairseq_text_checkpoint_with_heads_and_ema(tmp_path):
    cfg = encoder_config("text", "tiny")
    student, teacher = randomize(TextEncoder(cfg), 1), randomize(TextEncoder(cfg), 2)

    def sentence_encoder(encoder) -> dict:
        sd = renamed(hf_state("text", encoder), HF_TO_FAIRSEQ_TEXT)
        sd.pop("embeddings.token_type_embeddings.weight")  # HF's addition, zero in the export
        return sd

    model = {f"encoder.sentence_encoder.{k}": v for k, v in sentence_encoder(student).items()}
    model.update({"encoder.sentence_encoder.version": torch.tensor([3.0]),
                  "encoder.regression_head.0.weight": torch.randn(64, 64),
                  "encoder.regression_head.0.bias": torch.randn(64), "encoder._ema": sentence_encoder(teacher)})
    torch.save({"model": model, "cfg": {"model": {"transformer": {"encoder": {"attention_heads": 4}}}}},
               tmp_path / "nlp_base.pt")
    assert main(["import", str(tmp_path / "nlp_base.pt"), str(tmp_path / "final.pt")]) == 0
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["preset"] == "tiny" and final["encoder_config"]["num_heads"] == 4
    assert same_weights(final["encoder"], student.state_dict())
    assert same_weights(final["teacher"], teacher.state_dict())


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_beit_vision_checkpoint(layout, tmp_path):
    shared = layout == "shared"
    cfg = encoder_config("image", "tiny").model_copy(update={"rel_pos": layout, "abs_pos": shared,
                                                             "pooling": "final_ln" if shared else "mean_ln"})
    student, teacher = randomize(ImageEncoder(cfg)), randomize(ImageEncoder(cfg))

    def beit_state(encoder):
        hf = hf_state("image", encoder)
        for i in range(cfg.depth):  # BEiT fuses q/k/v (no key bias)
            prefix = f"encoder.layer.{i}.attention.attention"
            hf[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf.pop(f"{prefix}.{n}.weight")
                                                           for n in ("query", "key", "value")])
        model = renamed(hf, HF_TO_BEIT)
        index = "rel_pos_bias.relative_position_index" if shared else "blocks.0.attn.relative_position_index"
        return model | {index: torch.zeros(65, 65, dtype=torch.long), "lm_head.weight": torch.randn(64, 64)}

    # run_cyclical.py saves the teacher (timm's ModelEmaV2 of the whole model) as `model_ema`
    ckpt = {"model": beit_state(student)} | ({"model_ema": beit_state(teacher)} if shared else {})
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    assert main(["import", str(tmp_path / "checkpoint-799.pth"), str(tmp_path / "final.pt")]) == 0
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert same_weights(final["encoder"], student.state_dict())
    assert final["has_teacher"] == shared and (not shared or same_weights(final["teacher"], teacher.state_dict()))
    inferred = final["encoder_config"]
    for field in ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "ffn_dim", "rel_pos", "abs_pos",
                  "pooling"):
        assert inferred[field] == getattr(cfg, field), field
    assert final["preset"] == ("tiny" if layout == "shared" else "custom")


def test_huggingface_folder_imports_and_custom_architectures_say_so(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = encoder_config("text", "tiny")
    encoder = randomize(TextEncoder(cfg))
    save_pretrained(export_encoder("text", encoder.state_dict(), cfg), tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "final.pt")]) == 0
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["imported"] == "huggingface" and final["preset"] == "tiny"
    assert same_weights(final["encoder"], encoder.state_dict()) and same_weights(final["teacher"], final["encoder"])
    assert "d2v finetune TASK --set pretrained=" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), str(tmp_path / "x.pt")]) == 2
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
