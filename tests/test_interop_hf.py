"""Our encoders loaded with HF Data2Vec* weights must reproduce every HF hidden state within 1e-5 (fp32, eval).

Every HF parameter is randomised first: HF init zeroes the [CLS]/mask tokens and relative-position tables and sets
LayerScale and LayerNorm weights to constants, which would hide mapping bugs.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from fixtures import randomize  # noqa: E402

from d2v.interop import InteropError, load_hf  # noqa: E402

TOL = 1e-5
MAX_DIFFS: dict[str, float] = {}


def max_diff_over_states(ours: list[torch.Tensor], theirs: tuple, valid: torch.Tensor | None = None) -> float:
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape, (a.shape, b.shape)
        d = (a - b).abs()
        if valid is not None:
            d = d[valid]
        worst = max(worst, d.max().item())
    return worst


def vision_config(layout: str):
    common = dict(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=192, drop_path_rate=0.0, layer_scale_init_value=0.1)
    if layout == "pretrained":  # facebook/data2vec-vision-base: shared rel-pos, final LayerNorm
        return transformers.Data2VecVisionConfig(use_shared_relative_position_bias=True,
                                                 use_relative_position_bias=False, use_mean_pooling=False,
                                                 layer_norm_eps=1e-12, **common)
    # *-ft1k: per-layer rel-pos bias, mean pooling + fc_norm
    return transformers.Data2VecVisionConfig(use_relative_position_bias=True, use_mean_pooling=True, **common)


@pytest.mark.parametrize("layout", ["pretrained", "finetuned"])
def test_vision_matches_hf(layout):
    torch.manual_seed(0)
    hf = randomize(transformers.Data2VecVisionModel(vision_config(layout), add_pooling_layer=layout == "finetuned"))
    ours = load_hf("image", hf).eval()
    assert (ours.rel_pos_bias is not None) == (layout == "pretrained")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=images, output_hidden_states=True)
        out = ours(images)
    diff = max_diff_over_states(out.hidden_states, ref.hidden_states)
    diff = max(diff, (out.x - ref.last_hidden_state).abs().max().item())
    if layout == "finetuned":
        diff = max(diff, (out.pooled - ref.pooler_output).abs().max().item())
    MAX_DIFFS[f"vision-{layout}"] = diff
    print(f"vision {layout}: max |diff| over {len(out.hidden_states)} hidden states = {diff:.2e}")
    assert diff < TOL


def test_speech_matches_hf_with_padding():
    cfg = transformers.Data2VecAudioConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=5,
                                           conv_pos_kernel_size=19, num_conv_pos_embedding_groups=16,
                                           mask_time_prob=0.05)
    hf = randomize(transformers.Data2VecAudioModel(cfg))
    ours = load_hf("speech", hf).eval()
    wav = torch.randn(2, 24_000)
    attention = torch.ones(2, 24_000, dtype=torch.long)
    attention[1, 16_000:] = 0
    wav[1, 16_000:] = 0
    with torch.no_grad():
        ref = hf(wav, attention_mask=attention, output_hidden_states=True)
        out = ours(wav, padding_mask=attention == 0)
    valid = ~out.padding_mask
    assert valid.sum(1).tolist() == [74, 49]  # the frame-length formula: 24 000 -> 74, 16 000 -> 49 frames
    diff = max_diff_over_states(out.hidden_states, ref.hidden_states, valid)
    MAX_DIFFS["speech-padded"] = diff
    print(f"speech padded: max |diff| on valid frames = {diff:.2e}")
    assert diff < TOL


def test_text_matches_hf_with_padding():
    cfg = transformers.Data2VecTextConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=34, type_vocab_size=1,
                                          layer_norm_eps=1e-5, pad_token_id=1)
    hf = randomize(transformers.Data2VecTextModel(cfg))
    ours = load_hf("text", hf).eval()
    tokens = torch.randint(4, 100, (2, 16))
    tokens[:, 0] = 0
    tokens[1, 10:] = 1  # padding
    with torch.no_grad():
        ref = hf(tokens, attention_mask=(tokens != 1).long(), output_hidden_states=True)
        out = ours(tokens)
    valid = tokens != 1
    diff = max_diff_over_states(out.hidden_states, ref.hidden_states, valid)
    MAX_DIFFS["text-padded"] = diff
    print(f"text padded: max |diff| on non-pad tokens = {diff:.2e}")
    assert diff < TOL


def test_state_dict_source_and_task_prefix():
    """A task model's state dict (prefixed keys, classifier head) loads given our config."""
    cfg = transformers.Data2VecTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=20, type_vocab_size=1,
                                          num_labels=3)
    hf = randomize(transformers.Data2VecTextForSequenceClassification(cfg))
    from d2v.interop.hf import text_config_from_hf

    ours = load_hf("text", hf.state_dict(), text_config_from_hf(cfg)).eval()
    tokens = torch.randint(4, 50, (1, 8))
    with torch.no_grad():
        ref = hf.data2vec_text(tokens, output_hidden_states=True).hidden_states
    assert max_diff_over_states(ours(tokens).hidden_states, ref) < TOL


def test_mismatched_checkpoint_is_a_clear_error():
    hf = transformers.Data2VecTextModel(transformers.Data2VecTextConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=20, type_vocab_size=1))
    from d2v.modalities.text import TextEncoderConfig

    wrong = TextEncoderConfig(vocab_size=50, dim=32, depth=3, num_heads=2, ffn_dim=64, max_positions=18)
    with pytest.raises(InteropError, match="missing=.*blocks.2"):
        load_hf("text", hf.state_dict(), wrong)
    with pytest.raises(InteropError, match="unknown kind"):
        load_hf("video", hf)
