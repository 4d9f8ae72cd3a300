"""The data2vec 1.0 objective: EMA, targets, losses, teacher isolation, collapse guard (spec §1, §3-§6)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_objective, synthetic_batch
from d2v.config import CollapseConfig, EMAConfig, LossConfig
from d2v.data2vec import (CollapseError, build_targets, center_per_position, check_collapse, effective_rank,
                          instance_norm_over_time, regression_loss, representation_std)
from d2v.ema import ema_decay, init_share

# ---------------------------------------------------------------- init


def _has_torch_default_init(linear: torch.nn.Linear) -> bool:
    """PyTorch's Linear init: weight and bias U(±1/√fan_in), so the weight's std is that bound over √3."""
    bound = 1 / linear.in_features ** 0.5
    w, b = linear.weight, linear.bias
    return (w.abs().max() <= bound and abs(w.std() - bound / 3 ** 0.5) < 0.05 * bound
            and b.abs().max() <= bound and b.abs().max() > 0.5 * bound)


def _has_bert_init(linear: torch.nn.Linear) -> bool:
    return abs(linear.weight.std() - 0.02) < 0.002 and (linear.bias is None or not linear.bias.any())


@pytest.mark.parametrize("objective", ["v1", "v2"])
def test_speech_projection_and_head_keep_pytorch_init_like_fairseq(objective):
    """fairseq applies BERT init inside data2vec_audio's TransformerEncoder only (post_extract_proj and final_proj
    keep PyTorch's init), and data2vec 2.0's AudioEncoder resets project_features; text and images use BERT init
    for the regression head too."""
    from d2v.modalities.registry import build_objective

    torch.manual_seed(0)
    speech = build_objective("speech", "embedded", objective)
    assert _has_torch_default_init(speech.student.feature_proj)
    assert all(_has_bert_init(m) for m in speech.student.blocks.modules() if isinstance(m, torch.nn.Linear))
    if objective == "v1":
        assert _has_torch_default_init(speech.head.net)
        text = build_objective("text", "embedded")
        assert all(_has_bert_init(m) for m in text.head.modules() if isinstance(m, torch.nn.Linear))


# ---------------------------------------------------------------- EMA


def test_ema_schedule_endpoints_and_midpoint():
    cfg = EMAConfig(tau_start=0.999, tau_end=0.9999, tau_steps=30_000)
    assert ema_decay(cfg, 0) == pytest.approx(0.999)
    assert ema_decay(cfg, 15_000) == pytest.approx(0.99945)
    assert ema_decay(cfg, 30_000) == 0.9999
    assert ema_decay(cfg, 10**6) == 0.9999
    const = EMAConfig.constant(0.9998)
    assert ema_decay(const, 0) == ema_decay(const, 10**6) == 0.9998


def test_init_share_is_what_a_teacher_keeps_of_its_start_against_a_zero_student():
    cfg = EMAConfig(tau_start=0.9, tau_end=0.99, tau_steps=3)
    obj = make_objective("image", ema=cfg)
    name = "blocks.0.mlp.fc1.weight"
    start = dict(obj.teacher.named_parameters())[name].detach().clone()
    with torch.no_grad():
        for p in obj.student.parameters():
            p.zero_()
    for step in range(1, 6):
        obj.ema_step(step)
    kept = dict(obj.teacher.named_parameters())[name]
    assert init_share(cfg, 5) == pytest.approx(0.93 * 0.96 * 0.99 ** 3)
    assert torch.allclose(kept, start * init_share(cfg, 5), atol=1e-7)
    assert init_share(cfg, 0) == 1.0 and init_share(EMAConfig.constant(0.0), 1) == 0.0
    # the embedded v1 text schedule leaves a quarter of the teacher at its init; the paper's leaves nothing
    assert init_share(EMAConfig(tau_start=0.998, tau_end=0.9998, tau_steps=1200), 1200) == pytest.approx(0.2671, 1e-3)
    assert init_share(EMAConfig(tau_start=0.999, tau_end=0.9999, tau_steps=30_000), 400_000) < 1e-10


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_ema_updates_are_exact_over_several_steps():
    obj = make_objective("image", ema=EMAConfig(tau_start=0.9, tau_end=0.99, tau_steps=3))
    name = "blocks.0.mlp.fc1.weight"
    expected = dict(obj.teacher.named_parameters())[name].detach().double().clone()
    for step in range(1, 5):
        _perturb(obj.student, step)
        tau = obj.ema_step(step)
        assert tau == pytest.approx([0.93, 0.96, 0.99, 0.99][step - 1])
        student = dict(obj.student.named_parameters())[name].detach().double()
        expected = tau * expected + (1 - tau) * student
        got = dict(obj.teacher.named_parameters())[name].double()
        assert torch.allclose(got, expected, atol=1e-7, rtol=0)
    assert all(p.dtype == torch.float32 for p in obj.teacher.parameters())  # fp32 shadow


@pytest.mark.parametrize("name, shared, averaged", [
    ("speech", ["feature_extractor.0.conv.weight", "feature_proj.weight", "pos_conv.convs.0.weight"],
     ["blocks.0.attn.qkv.weight", "norm.weight"]),
    ("text", ["embed_tokens.weight", "embed_positions.weight", "embed_norm.weight"], ["blocks.0.mlp.fc2.weight"]),
    ("image", [], ["patch_embed.weight", "cls_token", "rel_pos_bias.table", "blocks.1.gamma_1"]),
])
def test_shared_parameters_are_copied_not_averaged(name, shared, averaged):
    obj = make_objective(name, ema=EMAConfig.constant(0.5))
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    _perturb(obj.student, 0)
    obj.ema_step(1)
    student, teacher = dict(obj.student.named_parameters()), dict(obj.teacher.named_parameters())
    for key in shared:
        assert torch.equal(teacher[key], student[key]), key
    for key in averaged:
        assert torch.allclose(teacher[key], 0.5 * before[key] + 0.5 * student[key], atol=1e-6), key
        assert not torch.equal(teacher[key], student[key])
    assert all(not obj.ema.is_shared(k) for k in teacher) == (name == "image")  # vision: whole-model EMA


def test_ema_freezes_averaged_parameters_at_tau_one():
    obj = make_objective("text", ema=EMAConfig.constant(1.0))
    before = {k: v.clone() for k, v in obj.teacher.named_parameters()}
    _perturb(obj.student, 0)
    obj.ema_step(1)
    after = dict(obj.teacher.named_parameters())
    assert torch.equal(after["blocks.0.mlp.fc2.weight"], before["blocks.0.mlp.fc2.weight"])
    assert torch.equal(after["embed_tokens.weight"], dict(obj.student.named_parameters())["embed_tokens.weight"])


def test_teacher_follows_persistent_buffers_and_leaves_the_constant_ones():
    """A persistent buffer (running statistics) is state the teacher copies, as fairseq's EMA copies the state
    dict's buffers; a non-persistent one (a position table, a drop-path rate) is built from the config and is
    left alone, so the encoders' buffers cost no copy a step."""
    from d2v.ema import EMATeacher, persistent_buffers

    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    student[0].register_buffer("table", torch.zeros(3), persistent=False)
    teacher = EMATeacher(student, EMAConfig.constant(0.5))
    student.train()(torch.randn(8, 3))  # moves the running statistics
    student[0].table.fill_(7.0)
    teacher.step(student, 1)
    assert torch.equal(teacher.model[1].running_mean, student[1].running_mean)
    assert teacher.model[1].num_batches_tracked == 1
    assert not teacher.model[0].table.any()
    assert [n for n, _ in persistent_buffers(student)] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    for name in ("image", "speech", "text"):
        obj = make_objective(name)
        assert list(obj.student.buffers()) and not list(persistent_buffers(obj.student)), name


# ---------------------------------------------------------------- targets


def test_instance_norm_is_over_time_per_channel():
    x = torch.randn(2, 50, 8) * 3 + 5
    y = instance_norm_over_time(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 8), atol=1e-3)


def test_masked_instance_norm_ignores_padding():
    x = torch.randn(2, 30, 4)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[1, 20:] = True
    y = instance_norm_over_time(x, pad)
    assert torch.allclose(y[1, :20], instance_norm_over_time(x[1:2, :20])[0], atol=1e-5)
    assert torch.allclose(y[0], instance_norm_over_time(x[:1])[0], atol=1e-5)
    assert (y[1, 20:] == 0).all()


def test_layer_norm_targets_are_over_channels_and_top_k_averaged():
    taps = [torch.randn(2, 5, 16) * (i + 1) + i for i in range(6)]
    y = build_targets(taps, 3, "layer", "none")
    manual = sum(F.layer_norm(t, (16,)) for t in taps[-3:]) / 3
    assert torch.allclose(y, manual, atol=1e-6)
    y_final = build_targets(taps, 3, "layer", "layer")
    assert torch.allclose(y_final.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(y_final.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3)
    with pytest.raises(ValueError, match="top_k"):
        build_targets(taps, 7, "layer", "none")


def test_speech_targets_equal_direct_computation_from_teacher_ffn_taps():
    obj = make_objective("speech")
    batch = synthetic_batch("speech", obj)
    teacher = obj.teacher.eval()
    with torch.no_grad():
        out = teacher(batch.source)
        direct = sum(F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in out.ffn_outputs[-2:]) / 2
        got = obj.teacher_targets(batch.source, None)
    assert torch.allclose(got, direct, atol=1e-5)


def test_position_centred_targets_remove_what_position_alone_predicts():
    """The experimental `center_targets: position`: a per-position offset shared by every row disappears; what
    differs between rows stays; padded slots neither count nor keep a value."""
    offset, content = torch.randn(1, 6, 4), torch.randn(3, 6, 4)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[2, 4:] = True
    y = center_per_position(offset + content, pad)
    valid = content.clone()
    valid[2, 4:] = float("nan")
    expected = content - valid.nanmean(0, keepdim=True)
    assert torch.allclose(y[~pad], expected[~pad], atol=1e-6)
    assert (y[pad] == 0).all()
    assert torch.allclose(center_per_position(offset + content), content - content.mean(0, keepdim=True), atol=1e-6)

    obj = make_objective("text")
    batch = synthetic_batch("text", obj)
    plain = obj.teacher_targets(batch.source, None)
    obj.cfg = obj.cfg.model_copy(update={"center_targets": "position"})
    assert torch.allclose(obj.teacher_targets(batch.source, None), plain - plain.mean(0, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------- loss


def test_l2_loss_sums_over_dim_and_scales_by_inv_sqrt_dim():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    # row sums of squares: 1 + 0 + 4 + 0 = 5 and 4; mean 4.5; times 1/sqrt(4)
    assert regression_loss(pred, target, LossConfig()).item() == pytest.approx(4.5 / 2)


def test_smooth_l1_beta4_summed_over_dim():
    cfg = LossConfig(kind="smooth_l1", beta=4.0, reduction="sum_over_dim", scale=1.0)
    pred, target = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 6.0]])
    # |d|=2 <= 4: 0.5*4/4 = 0.5 ; |d|=6 > 4: 6 - 2 = 4  -> 4.5
    assert regression_loss(pred, target, cfg).item() == pytest.approx(4.5)


def test_smooth_l1_beta2_mean_over_elements():
    cfg = LossConfig(kind="smooth_l1", beta=2.0, reduction="mean", scale=1.0)
    pred, target = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 3.0], [0.0, -4.0]])
    # 0.25, 2.0, 0, 3.0 -> mean 1.3125
    assert regression_loss(pred, target, cfg).item() == pytest.approx(1.3125)


def test_representation_std_matches_numpy():
    x = torch.randn(100, 6) * torch.arange(1, 7)
    expected = np.sqrt(np.var(x.numpy(), axis=0, ddof=1) + 1e-6).mean()
    assert representation_std(x).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- teacher isolation, gradients


def test_teacher_never_sees_the_masked_input(modality_name):
    obj = make_objective(modality_name)
    batch = synthetic_batch(modality_name, obj)
    seen = {}
    encode = obj.teacher.encode

    def spy(embedded, mask=None):
        seen["mask"], seen["tokens"] = mask, embedded.tokens.detach().clone()
        return encode(embedded, mask)

    obj.teacher.encode = spy
    out = obj(batch, np.random.default_rng(0))
    assert out.metrics["masked_frac"] > 0.05
    assert seen["mask"] is None
    with torch.no_grad():  # the teacher's input is the embedding of the original, uncorrupted source
        full = obj.teacher.embed(batch.source, batch.padding_mask).tokens
    assert torch.allclose(seen["tokens"], full, atol=1e-6)
    if modality_name == "text":
        assert not (batch.source == obj.modality.vocab.mask).any()


def test_gradients_reach_the_student_only(modality_name):
    obj = make_objective(modality_name)
    obj.train()
    assert not obj.teacher.training  # the teacher stays in eval mode
    out = obj(synthetic_batch(modality_name, obj), np.random.default_rng(0))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    grads = [p.grad for p in obj.student_parameters()]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.8 * len(grads)
    assert all(p.requires_grad for p in obj.student_parameters())


def test_loss_positions_are_the_masked_ones():
    obj = make_objective("text")
    batch = synthetic_batch("text", obj)
    views = obj.modality.make_views(batch, np.random.default_rng(0))
    assert (views.student_source[views.loss_mask] == obj.modality.vocab.mask).all()


# ---------------------------------------------------------------- collapse guard


def test_collapse_guard_names_the_signal_after_warmup():
    cfg = CollapseConfig(min_target_var=0.1, min_pred_var=0.01, min_local_var=0.05, warmup_steps=100)
    check_collapse(cfg, 99, {"target_var": 0.0, "pred_var": 0.0})  # not armed yet
    check_collapse(cfg, 100, {"target_var": 0.5, "pred_var": 0.5, "local_var": 0.5})
    with pytest.raises(CollapseError, match="pred_var=0.005"):
        check_collapse(cfg, 100, {"target_var": 0.5, "pred_var": 0.005})
    with pytest.raises(CollapseError, match="target_var"):
        check_collapse(cfg, 5000, {"target_var": 0.01, "pred_var": 0.5})
    with pytest.raises(CollapseError, match="local_var"):
        check_collapse(cfg, 5000, {"target_var": 0.5, "pred_var": 0.5, "local_var": 0.01})


def test_effective_rank_sees_a_collapse_that_per_channel_variance_misses():
    g = torch.Generator().manual_seed(0)
    assert effective_rank(torch.randn(20_000, 16, generator=g)) == pytest.approx(16, abs=0.1)  # isotropic
    axes = torch.cat([torch.eye(16)[:3], -torch.eye(16)[:3]])  # +-e_0, +-e_1, +-e_2: three equal directions
    assert effective_rank(axes.repeat(10, 1)) == pytest.approx(3.0, abs=1e-4)
    # 16 channels that all follow one signal, then normalised per channel over time like speech targets
    signal = torch.randn(1, 400, 1, generator=g)
    y = instance_norm_over_time(signal + 0.01 * torch.randn(1, 400, 16, generator=g))[0]
    assert representation_std(y, all_ranks=False) == pytest.approx(1.0, abs=0.01)  # the variance guard sees no harm
    assert effective_rank(y) < 1.1
    cfg = CollapseConfig(min_target_var=0.1, min_target_rank=2.0, warmup_steps=0)
    with pytest.raises(CollapseError, match="target_rank=1.0"):
        check_collapse(cfg, 1, {"target_var": 1.0, "pred_var": 1.0, "target_rank": float(effective_rank(y))})


def test_collapsed_teacher_stops_training():
    """A teacher whose outputs are constant gives target_var ~ 0: the loop must stop with a clear message."""
    from d2v.data import synthetic
    from d2v.train.loop import pretrain

    obj = make_objective("text", collapse=CollapseConfig(warmup_steps=2))
    with torch.no_grad():
        for block in obj.teacher.blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.fill_(1.0)
    obj.cfg = obj.cfg.model_copy(update={"ema": EMAConfig.constant(1.0)})
    obj.ema.cfg = obj.cfg.ema
    batches = synthetic.batches("text", np.random.default_rng(0), 4, length=16, vocab_size=64)
    with pytest.raises(CollapseError, match="target_var"):
        pretrain(obj, batches, steps=5, lr=1e-3, warmup=1)
