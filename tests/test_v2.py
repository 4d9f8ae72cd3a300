"""data2vec 2.0 (spec §8): mask counts and geometry, clone ordering, decoder shapes and locality, masked tokens never
entering the student encoder, targets against a direct computation, EMA scopes, ALiBi."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_batch
from fixtures import mae_sincos
from d2v.config import DecoderConfig, EMAConfig, V2MaskConfig
from d2v.data2vec2 import Data2Vec2
from d2v.modalities.base import Batch, Embedded, dense_indices, gather_tokens, visible_indices
from d2v.modalities.masks_v2 import block_masks, random_masks
from d2v.modalities.registry import build_modality
from d2v.nn.decoder import ConvDecoder
from d2v.nn.layers import alibi_bias, alibi_slopes, sincos_2d


def make_v2(name: str, **v2_overrides) -> Data2Vec2:
    torch.manual_seed(0)
    modality, cfg = build_modality(name, "tiny", "v2")
    v2 = cfg.v2.model_copy(update=v2_overrides)
    collapse = cfg.collapse.model_copy(update={"warmup_steps": 10**9})
    return Data2Vec2(modality, cfg.model_copy(update={"v2": v2, "collapse": collapse}))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("prob, adjust, kept", [(0.8, 0.07, 39), (0.75, 0.10, 49)])  # ViT-B, ViT-L (spec §8.3)
def test_inverse_block_mask_keeps_the_spec_count_in_blocks(prob, adjust, kept):
    cfg = V2MaskConfig(prob=prob, length=3, adjust=adjust, inverse=True)
    masks = block_masks(256, (14, 14), cfg, np.random.default_rng(0))
    assert masks.shape == (256, 196)
    assert ((~masks).sum(1) == kept).all()
    # the visible region is made of 3x3 blocks: most visible cells have a visible 4-neighbour (random: ~1-0.8^4)
    visible = (~masks).reshape(-1, 14, 14)
    padded = np.pad(visible, ((0, 0), (1, 1), (1, 1)))
    neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert (neighbour & visible).sum() / visible.sum() > 0.9
    scattered = random_masks(256, 196, prob, np.random.default_rng(0)).reshape(-1, 14, 14)
    padded = np.pad(~scattered, ((0, 0), (1, 1), (1, 1)))
    neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert (neighbour & ~scattered).sum() / (~scattered).sum() < 0.75


def test_1d_block_mask_hides_exactly_half_in_spans():
    cfg = V2MaskConfig(prob=0.5, length=5, adjust=0.05)
    masks = block_masks(64, (200,), cfg, np.random.default_rng(1))
    assert (masks.sum(1) == 100).all()
    def mean_run(m):
        return np.mean([len(r) for row in m for r in np.split(row, np.flatnonzero(np.diff(row.astype(int))) + 1)
                        if r[0]])
    # spans of 5 (merged, plus single frames from the exact-count top-up) vs ~2 for independent frames
    assert mean_run(masks) > 4 > 2.5 > mean_run(random_masks(64, 200, 0.5, np.random.default_rng(1)))


def test_random_text_masks_keep_floor_of_the_kept_fraction_uniformly():
    masks = random_masks(2000, 512, 0.48, np.random.default_rng(2))
    assert ((~masks).sum(1) == 266).all() and (masks.sum(1) == 246).all()  # spec §8.3
    freq = masks.mean(0)
    assert abs(freq.mean() - 246 / 512) < 1e-9 and freq.std() < 0.03  # no position favoured


def test_masks_are_a_function_of_the_rng_and_short_sequences_keep_both_kinds():
    cfg = V2MaskConfig(prob=0.8, length=3, adjust=0.07, inverse=True)
    a = block_masks(8, (8, 8), cfg, np.random.default_rng(5))
    assert np.array_equal(a, block_masks(8, (8, 8), cfg, np.random.default_rng(5)))
    assert not np.array_equal(a, block_masks(8, (8, 8), cfg, np.random.default_rng(6)))
    short = random_masks(4, 2, 0.99, np.random.default_rng(0))
    assert (short.sum(1) == 1).all()


def test_unequal_mask_counts_are_rejected():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number"):
        visible_indices(mask)


def test_host_side_positions_gather_exactly_what_boolean_indexing_selects():
    """The objective gathers the masked slots by positions computed on the host; the order (row-major, ascending)
    must be boolean indexing's, or predictions and targets would pair up wrongly."""
    mask = torch.from_numpy(random_masks(5, 12, 0.6, np.random.default_rng(1)))
    visible, hidden = dense_indices(mask)
    assert visible.shape == (5, 4) and hidden.shape == (5, 8)  # keeps ⌊12 · 0.4⌋
    assert (visible.diff(dim=1) > 0).all() and (hidden.diff(dim=1) > 0).all()
    assert not mask.gather(1, visible).any() and mask.gather(1, hidden).all()
    x = torch.randn(5, 12, 3)
    assert torch.equal(gather_tokens(x, hidden).flatten(0, 1), x[mask])


# ---------------------------------------------------------------- decoder


def test_decoder_shapes_projection_and_config_errors():
    one = ConvDecoder(DecoderConfig(dim=16, kernel=5, groups=4, layers=3), out_dim=32)
    assert one(torch.randn(2, 10, 32)).shape == (2, 10, 32)
    two = ConvDecoder(DecoderConfig(dim=16, kernel=9, layers=2, projection_layers=2, residual=False), out_dim=24)
    assert [m.weight.shape for m in two.proj if isinstance(m, torch.nn.Linear)] == [(32, 16), (24, 32)]
    assert two(torch.randn(3, 7, 24)).shape == (3, 7, 24)
    grid = ConvDecoder(DecoderConfig(dim=16, kernel=3, groups=16, layers=6), out_dim=16, grid=(4, 6))
    assert grid(torch.randn(2, 24, 16)).shape == (2, 24, 16)
    with pytest.raises(ValueError, match="4x6"):
        grid(torch.randn(2, 25, 16))
    with pytest.raises(ValueError, match="odd"):
        DecoderConfig(dim=16, kernel=4, layers=1)
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(dim=18, kernel=3, groups=4, layers=1)


def test_decoder_residual_only_where_widths_match():
    cfg = DecoderConfig(dim=8, kernel=3, layers=2)
    dec = ConvDecoder(cfg, out_dim=12)
    x = torch.randn(1, 6, 12)
    h = x.transpose(1, 2)
    block = lambda conv, h: F.gelu(F.layer_norm(conv(h).transpose(1, 2), (8,)).transpose(1, 2))  # noqa: E731
    h1 = block(dec.convs[0], h)  # 12 -> 8: no residual
    h2 = block(dec.convs[1], h1) + h1  # 8 -> 8: residual
    assert torch.allclose(dec(x), dec.proj(h2.transpose(1, 2)), atol=1e-6)


def test_2d_decoder_is_local_on_the_patch_grid():
    dec = ConvDecoder(DecoderConfig(dim=8, kernel=3, layers=2), out_dim=8, grid=(8, 8))
    x = torch.randn(1, 64, 8)
    y = x.clone()
    y[0, 4 * 8 + 4] += 1.0  # cell (4, 4)
    changed = (dec(x) - dec(y)).abs().sum(-1).reshape(8, 8) > 0
    rows, cols = np.nonzero(changed.numpy())
    assert changed[4, 4] and changed[6, 6] and changed[2, 4]  # two 3x3 layers: radius 2 in both axes
    assert max(np.abs(rows - 4).max(), np.abs(cols - 4).max()) == 2


# ---------------------------------------------------------------- student sees only visible tokens


@pytest.mark.parametrize("name", ["image", "speech", "text"])
def test_masked_tokens_never_enter_the_student_encoder(name):
    obj = make_v2(name).eval()
    batch = synthetic_batch(name, obj, batch=2)
    masks = obj.modality.v2_masks(batch, obj.cfg.v2.mask, 3, np.random.default_rng(0))
    emb = obj.student.embed(batch.source).tokens.repeat_interleave(3, 0)
    seen = []
    hook = obj.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    out = obj.student.encode_visible(Embedded(emb), masks)
    hook.remove()
    visible = int((~masks[0]).sum())
    assert seen == [obj.student.num_extra_tokens + visible]
    # anything at masked positions, however large, leaves the student's output unchanged
    noisy = torch.where(masks.unsqueeze(-1), torch.randn_like(emb) * 100, emb)
    again = obj.student.encode_visible(Embedded(noisy), masks)
    assert torch.allclose(out.x, again.x, atol=1e-5)
    # with nothing masked the visible path is the full encoder
    none = torch.zeros_like(masks[:1])
    full = obj.student.encode(Embedded(emb[:1]), None)
    assert torch.allclose(obj.student.encode_visible(Embedded(emb[:1]), none).x, full.x, atol=1e-5)


def test_speech_zeroes_masked_frames_before_the_positional_conv():
    obj = make_v2("speech").eval()
    enc = obj.student
    emb = torch.randn(2, 30, enc.dim)
    mask = torch.from_numpy(block_masks(2, (30,), obj.cfg.v2.mask, np.random.default_rng(0)))
    zeroed = emb.masked_fill(mask.unsqueeze(-1), 0.0)
    keep = visible_indices(mask)
    expected = enc._transformer(torch.gather(zeroed + enc.pos_conv(zeroed), 1,
                                             keep.unsqueeze(-1).expand(-1, -1, enc.dim)), None, keep)
    assert torch.allclose(enc.encode_visible(Embedded(emb), mask).x, expected.x, atol=1e-6)


# ---------------------------------------------------------------- clones, targets, loss


@pytest.mark.parametrize("name", ["image", "speech", "text"])
def test_loss_equals_a_per_clone_computation_in_sample_major_order(name):
    obj = make_v2(name, clones=3, mask_noise_std=0.0).eval()
    batch = synthetic_batch(name, obj, batch=2)
    out = obj(batch, np.random.default_rng(7))
    masks = obj.modality.v2_masks(batch, obj.cfg.v2.mask, 3, np.random.default_rng(7))
    with torch.no_grad():
        emb = obj.student.embed(batch.source)
        y = obj.teacher_targets(batch.source, None, emb if obj.cfg.v2.teacher_reads_student_features else None)
        errors, count, cls_total = 0.0, 0, 0.0
        for row in range(masks.shape[0]):
            sample = row // 3  # sample-major: rows 0-2 are sample 0, rows 3-5 sample 1
            enc = obj.student.encode_visible(Embedded(emb.tokens[sample:sample + 1]), masks[row:row + 1])
            pred = obj.decode(enc, masks[row:row + 1])[0][masks[row]]
            errors += ((pred - y[sample][masks[row]]) ** 2).sum()
            count += int(masks[row].sum())
            if enc.num_extra_tokens:
                cls_total += ((enc.x[0, 0] - y[sample].mean(0)) ** 2).sum() / math.sqrt(obj.student.dim)
    scale = 1 / math.sqrt(obj.student.dim) if obj.cfg.loss.scale == "inv_sqrt_dim" else obj.cfg.loss.scale
    expected = errors / count * scale + obj.cfg.v2.cls_loss * cls_total
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-4)
    assert out.metrics["masked_frac"].item() == pytest.approx(masks.float().mean().item())


@pytest.mark.parametrize("name", ["image", "speech", "text"])
def test_v2_targets_equal_direct_computation_from_ffn_outputs(name):
    obj = make_v2(name)
    batch = synthetic_batch(name, obj, batch=2)
    ffn = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: ffn.append(o)) for b in obj.teacher.blocks]
    with torch.no_grad():
        emb = obj.student.embed(batch.source) if obj.cfg.v2.teacher_reads_student_features else None
        y = obj.teacher_targets(batch.source, None, emb)
    for h in hooks:
        h.remove()
    extra = obj.student.num_extra_tokens
    layers = [F.instance_norm(t[:, extra:].transpose(1, 2)).transpose(1, 2) for t in ffn[-obj.cfg.top_k:]]
    expected = sum(layers) / len(layers)
    if name == "image":  # IN per layer -> average -> LN (spec §8.5)
        expected = F.layer_norm(expected, expected.shape[-1:])
    assert obj.cfg.top_k == {"image": 3, "speech": 2, "text": 3}[name]  # image: the 4 tiny blocks less a prenet
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("name, copied, averaged", [
    ("image", [], ["patch_embed.weight", "cls_token", "input_norm.weight", "blocks.0.attn.qkv.weight"]),
    ("speech", ["feature_extractor.0.conv.weight", "feature_proj.weight"],
     ["pos_conv.convs.0.weight", "alibi_scale", "norm.weight", "blocks.0.mlp.fc1.weight"]),
    ("text", ["embed_tokens.weight", "embed_positions.weight", "embed_norm.weight"], ["blocks.0.mlp.fc2.weight"]),
])
def test_v2_ema_scope_per_modality(name, copied, averaged):
    obj = make_v2(name)
    obj.ema.cfg = EMAConfig.constant(0.5)
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(1.0)
    obj.ema_step(1)
    student, teacher = obj.student.state_dict(), obj.teacher.state_dict()
    for key in copied:
        assert torch.equal(teacher[key], student[key]), key
    for key in averaged:
        assert torch.allclose(teacher[key], 0.5 * before[key] + 0.5 * student[key]), key
    assert not any(k.startswith("convs") or "decoder" in k for k in teacher)  # the decoder has no teacher copy


# ---------------------------------------------------------------- positions


def test_alibi_bias_is_gathered_at_kept_positions_in_frame_units():
    slopes = alibi_slopes(12)
    assert slopes[:8].tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert slopes[8:].tolist() == pytest.approx([2 ** -(i + 0.5) for i in range(4)])
    keep = torch.tensor([[0, 3, 4, 9]])
    full = alibi_bias(slopes, torch.arange(10)[None])
    assert torch.equal(alibi_bias(slopes, keep), full[:, :, keep[0]][:, :, :, keep[0]])
    assert full[0, 0, 2, 7].item() == pytest.approx(-5 * 0.5)


def test_text_alibi_sees_original_distances_and_is_the_plain_encoder_at_scale_zero():
    from d2v.modalities.text import TEXT_PRESETS, TextEncoder

    torch.manual_seed(0)
    cfg = TEXT_PRESETS["tiny"].model_copy(update={"alibi": True})
    encoder = TextEncoder(cfg).eval()
    tokens = torch.randint(4, cfg.vocab_size, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 2, 7]] = mask[1, [0, 5, 11]] = True
    with torch.no_grad():
        emb = encoder.embed(tokens)
        visible = encoder.encode_visible(emb, mask)
        # the visible-only pass equals the full pass with the masked tokens hidden as keys: same distances
        full = encoder.encode(Embedded(emb.tokens, mask))
        assert torch.allclose(visible.x, full.x[~mask].view(2, 9, -1), atol=1e-5)
        contiguous = encoder._transformer(gather_tokens(emb.tokens, visible_indices(mask)), None)
        assert not torch.allclose(visible.x, contiguous.x, atol=1e-3)  # closing the gaps would change the output
        plain = TextEncoder(cfg.model_copy(update={"alibi": False})).eval()
        plain.load_state_dict({k: v for k, v in encoder.state_dict().items() if k != "alibi_scale"})
        encoder.alibi_scale.zero_()
        assert torch.allclose(encoder.encode(emb).x, plain.encode(emb).x, atol=1e-6)


def test_sincos_positions_are_fixed_distinct_and_maes_table():
    pos = sincos_2d(16, (4, 4))
    assert pos.shape == (16, 16) and torch.unique(pos, dim=0).shape[0] == 16
    assert torch.allclose(pos[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    for dim, n in ((16, 4), (64, 7), (768, 14)):
        assert np.allclose(sincos_2d(dim, (n, n)).numpy(), mae_sincos(dim, n), atol=1e-6)
    assert torch.equal(sincos_2d(8, (2, 3))[1, :4], sincos_2d(8, (3, 2))[2, 4:])  # patch (0, 1): column 1, row 0
    obj = make_v2("image")
    assert "sincos" not in obj.student.state_dict() and not any("sincos" in n for n, _ in obj.named_parameters())


# ---------------------------------------------------------------- configuration


def test_objective_v2_selects_the_v2_recipe_and_architecture(tmp_path):
    from d2v.config import ConfigError
    from d2v.train.config import pretrain_config
    from d2v.train.task_model import build_model
    from d2v.train.tasks import finetune_config
    from d2v.train.pretrain import build_objective

    cfg = pretrain_config("image", {"objective": "v2", "preset": "tiny", "data": {"image": None}})
    assert (cfg.clones, cfg.optim.betas, cfg.data.batch_size) == (8, (0.9, 0.95), 32)  # EMBEDDED_PRETRAIN_V2
    obj = build_objective(cfg)
    assert isinstance(obj, Data2Vec2) and obj.cfg.v2.clones == 8
    assert obj.student.cfg.sincos_pos and obj.student.rel_pos_bias is None and not obj.student.cfg.norm_first
    v1 = pretrain_config("image", {"preset": "tiny", "data": {"image": None}, "clones": 4})
    with pytest.raises(ValueError, match="clones"):
        build_objective(v1)
    with pytest.raises(ConfigError, match="pretrain.text.objective"):
        pretrain_config("text", {"objective": "v3"})
    # a v2 encoder is fine-tuned as a v2 architecture; a v1 fine-tune of it is refused with the reason
    final = tmp_path / "final.pt"
    torch.save({"encoder": obj.student.state_dict(), "modality": "image", "preset": "tiny", "objective": "v2"}, final)
    ft = finetune_config("fashion_mnist", {"preset": "tiny", "pretrained": str(final), "objective": "v2",
                                           "image": None})
    model = build_model(ft)
    assert torch.equal(model.encoder.patch_embed.weight, obj.student.patch_embed.weight)
    with pytest.raises(ValueError, match="the encoder image/tiny/v2"):
        build_model(ft.model_copy(update={"objective": "v1"}))


def test_the_profile_objective_reaches_pretraining_and_finetuning():
    from d2v.pipeline.params import load_params

    params = load_params("params.yaml", "embedded")
    profile = params.active.model_copy(update={"objective": "v2"})
    assert profile.pretrain_config("speech").objective == "v2"
    assert profile.pretrain_config("speech").clones == 4
    assert profile.finetune_config("speech_1h", "scratch").objective == "v2"


def test_v2_speech_fine_tuning_masks_fill_frames_with_noise_not_the_mask_embedding():
    """fairseq fine-tunes data2vec_multi audio with `zero_mask` off: masked frames become N(0, 0.01²) noise (spec
    §9.2); the v2 mask embedding is never trained, so it must not be what a masked frame reads."""
    from d2v.modalities.registry import build_encoder

    encoder = build_encoder("speech", "tiny", "v2").eval()
    assert encoder.cfg.mask_noise_std == 0.01 and build_encoder("speech", "tiny").cfg.mask_noise_std is None
    emb = Embedded(torch.randn(2, 12, encoder.dim))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 3:7] = True
    torch.manual_seed(0)
    noisy = encoder.encode(emb, mask).x
    with torch.no_grad():
        encoder.mask_emb.fill_(5.0)
    torch.manual_seed(0)
    assert torch.equal(encoder.encode(emb, mask).x, noisy)  # the mask embedding is not read
    zeroed = Embedded(emb.tokens.masked_fill(mask.unsqueeze(-1), 0.0))
    gap = (noisy - encoder.encode(zeroed).x).abs().mean()
    assert 1e-5 < gap < 0.02  # noise of σ 0.01: near the zeroed frames, not equal to them
    encoder.cfg = encoder.cfg.model_copy(update={"mask_noise_std": None})  # v1: the mask embedding
    expected = Embedded(torch.where(mask.unsqueeze(-1), encoder.mask_emb, emb.tokens))
    assert torch.equal(encoder.encode(emb, mask).x, encoder.encode(expected).x)


def test_v2_image_encoder_takes_fairseqs_init_and_v1_keeps_beits():
    """Spec §8.2/§8.4: BERT's N(0, 0.02) Linear (no depth scaling), a Xavier-uniform patch embedding over its
    flattened shape, the [CLS] token N(0, 1) (init_extra_token_zero: false); v1 keeps BEiT's init."""
    from d2v.modalities.registry import build_encoder

    torch.manual_seed(0)
    v2, v1 = build_encoder("image", "embedded", "v2"), build_encoder("image", "embedded")
    D, fan_in = v2.dim, v2.patch_embed.weight[0].numel()
    assert v2.cfg.init == "data2vec2" and v1.cfg.init == "beit"
    assert 0.8 < v2.cls_token.std() < 1.2 and v1.cls_token.std() < 0.03
    bound = math.sqrt(6 / (fan_in + D))
    w = v2.patch_embed.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound
    last = len(v2.blocks) - 1
    assert abs(v2.blocks[last].mlp.fc2.weight.std() - 0.02) < 0.002
    assert abs(v1.blocks[last].mlp.fc2.weight.std() - 0.02 / math.sqrt(2 * (last + 1))) < 0.002  # BEiT's rescale


@pytest.mark.parametrize("name, preset, k, clones, mask, decoder, tau", [
    ("image", "base", 10, 16, (0.8, 0.07, 3), (768, 3, 16, 6), (0.9998, 0.99999, 100_000)),
    ("image", "large", 18, 16, (0.75, 0.1, 3), (1024, 5, 16, 3), (0.9998, 0.99999, 150_000)),
    ("image", "huge", 24, 16, (0.75, 0.1, 3), (1024, 5, 16, 3), (0.9998, 1.0, 300_000)),  # decoder narrower than D
    ("speech", "base", 8, 8, (0.5, 0.05, 5), (384, 7, 16, 4), (0.999, 0.99999, 75_000)),
    ("speech", "large", 16, 12, (0.55, 0.1, 5), (768, 7, 16, 4), (0.9997, 1.0, 300_000)),
    ("text", "base", 12, 8, (0.48, 0.0, 1), (768, 9, 1, 5), (0.9999, 0.99999, 100_000)),
    ("text", "large", 24, 8, (0.5, 0.0, 1), (768, 9, 1, 5), (0.9999, 0.99999, 100_000)),
])
def test_base_and_large_presets_take_their_released_v2_recipes(name, preset, k, clones, mask, decoder, tau):
    """Spec §8.5, column by column ({base,large}_{images,audio,text}_only_task, huge_images14_only_task)."""
    with torch.device("meta"):  # the recipe and the architecture, without 600M weights to initialise
        modality, cfg = build_modality(name, preset, "v2")
    assert (cfg.top_k, cfg.v2.clones) == (k, clones)
    assert (cfg.v2.mask.prob, cfg.v2.mask.adjust, cfg.v2.mask.length) == mask
    assert (cfg.v2.decoder.dim, cfg.v2.decoder.kernel, cfg.v2.decoder.groups, cfg.v2.decoder.layers) == decoder
    assert (cfg.ema.tau_start, cfg.ema.tau_end, cfg.ema.tau_steps) == tau
    norms = {("text", "large"): ("layer", "instance"), ("image", "base"): ("instance", "layer"),
             ("image", "large"): ("instance", "layer"), ("image", "huge"): ("instance", "layer")}  # else IN -> avg
    assert (cfg.layer_norm_targets, cfg.final_norm) == norms.get((name, preset), ("instance", "none"))
    if name == "speech":  # LayerDrop 0.05 in Base, none in Large
        assert modality.encoder.cfg.layerdrop == (0.0 if preset == "large" else 0.05)
    if preset == "huge":  # ViT-H/14: 32 blocks of 1280 (16 heads) over a 16 x 16 grid, a quarter of it visible
        enc = modality.encoder.cfg
        assert (enc.depth, enc.dim, enc.num_heads, enc.ffn_dim, enc.patch_size, enc.grid) == \
            (32, 1280, 16, 5120, 14, (16, 16))
        masks = modality.v2_masks(Batch(torch.zeros(2, 3, 224, 224)), cfg.v2.mask, cfg.v2.clones,
                                  np.random.default_rng(0))
        assert masks.shape == (32, 256) and ((~masks).sum(1) == 64).all()
