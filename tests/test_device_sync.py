"""What a step asks of the device, from bench/update_profile.py's H200 profile. Masks are drawn on the host; their
copies must not make the GPU wait (`from_host`), and the logged variances must not copy a count to it (three stalls
a step before); AdamW takes the fused kernel on CUDA. The CUDA tests run only where there is a GPU (never in CI)."""
import numpy as np
import pytest
import torch

from conftest import synthetic_batch
from d2v.data2vec import representation_std
from d2v.modalities.base import Batch, from_host, host_positions
from d2v.modalities.registry import build_objective
from d2v.train.optim import adamw, fused_kernel, load_optimizer_state


def test_from_host_on_the_cpu_is_the_tensor_itself():
    mask = torch.from_numpy(np.random.default_rng(0).random((3, 5)) < 0.5)
    moved = from_host(mask, torch.device("cpu"))
    assert moved.device.type == "cpu" and torch.equal(moved, mask)


def test_a_moved_batch_keeps_the_loaders_host_copy_which_text_masking_reads():
    """Text masking reads token values (no <s>, </s> or padding masked); from the loader's copy, not from a copy
    back from the device, which would wait for the GPU's queue. A batch on the meta device cannot be copied back."""
    objective = build_objective("text", "tiny", "v1")
    host = synthetic_batch("text", objective)
    moved = host.to(torch.device("meta"))
    assert moved.source.is_meta and moved.host_source is host.source and moved.host() is host.source
    assert moved.to(torch.device("meta")).host_source is host.source  # moved again: still the loader's
    on_cpu = objective.modality.make_views(host, np.random.default_rng(0))
    on_meta = objective.modality.make_views(moved, np.random.default_rng(0))
    assert on_meta.student_source.is_meta and on_meta.loss_mask.is_meta
    assert on_meta.loss_mask.shape == on_cpu.loss_mask.shape
    with pytest.raises(NotImplementedError):
        objective.modality.make_views(Batch(moved.source), np.random.default_rng(0))


def test_text_padding_is_decided_on_the_host_never_asked_of_the_device():
    """The loaders give a padding mask only to a batch that holds padding; the encoder uses it as given off the host
    (on `meta` any question to the device raises) and checks ids on the host, where it costs nothing."""
    encoder = build_objective("text", "tiny", "v1").student.eval()
    pad = encoder.cfg.pad_idx
    tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 5, 2, pad, pad]])
    mask = tokens.eq(pad)
    with pytest.raises(ValueError, match=f"pad id {pad} but no padding_mask"):
        encoder.embed(tokens)
    assert encoder.embed(tokens, mask).padding_mask is mask
    assert encoder.embed(tokens[:1]).padding_mask is None
    assert encoder.embed(tokens[:1], mask[:1]).padding_mask is None  # all False: attention's unmasked path
    by_hand = encoder(tokens)  # forward finds the padding itself, as its callers expect
    assert torch.equal(by_hand.padding_mask, mask) and torch.equal(by_hand.x, encoder(tokens, mask).x)
    meta = encoder.to("meta")
    on_meta = meta.embed(tokens.to("meta"), mask.to("meta"))
    assert on_meta.tokens.is_meta and on_meta.padding_mask.is_meta
    assert meta.embed(tokens[:1].to("meta")).padding_mask is None
    with pytest.raises((RuntimeError, NotImplementedError)):  # what the old `pad.any()` asked
        bool(mask.to("meta").any())


def test_host_positions_gather_what_the_boolean_mask_does_in_its_order():
    mask = np.random.default_rng(0).random((5, 9)) < 0.4
    x = torch.randn(5, 9, 3)
    rows, cols = host_positions(mask, torch.device("cpu"))
    assert torch.equal(x[rows, cols], x[torch.from_numpy(mask)])


def test_representation_std_is_fairseqs_compute_var():
    x = torch.randn(7, 3, 16, dtype=torch.float64).float()
    flat = x.reshape(-1, 16).double()
    expected = torch.sqrt(flat.var(0, unbiased=True) + 1e-6).mean()
    assert representation_std(x, all_ranks=False).item() == pytest.approx(expected.item(), rel=1e-5)
    assert representation_std(x[:1, :1]).item() == pytest.approx(1e-3, rel=1e-3)  # one row: variance 0, not NaN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name,kind", [("image", "v1"), ("image", "v2"), ("speech", "v2"), ("text", "v1"),
                                       ("text", "v2")])
def test_a_step_never_waits_on_the_gpu(name, kind):
    objective = build_objective(name, "tiny", kind).cuda().train()
    cuda = torch.device("cuda")
    objective(synthetic_batch(name, objective).to(cuda), np.random.default_rng(0)).loss.backward()  # lazy inits
    torch.cuda.synchronize()
    host = synthetic_batch(name, objective, seed=1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = objective(host.to(cuda), np.random.default_rng(1))  # the batch's copy queued too
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


def test_adamw_keeps_torchs_default_kernel_off_cuda():
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    assert fused_kernel(params) is None
    assert all(group["fused"] is None for group in adamw(params, 1e-3, 0.01).param_groups)


def test_a_resumed_optimizer_keeps_this_runs_kernel_not_the_checkpoints():
    """A GPU run saves `fused: True` in its groups; resumed on a CPU, load_state_dict alone would bring it back."""
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    saved = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    saved.step()
    resumed = adamw(params, 1e-3, 0.01)
    load_optimizer_state(resumed, saved.state_dict())
    assert all(group["fused"] is None for group in resumed.param_groups)
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], saved.state_dict()["state"][0]["exp_avg"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_adamw_takes_the_fused_kernel_on_cuda():
    params = [torch.nn.Parameter(torch.randn(4, 4, device="cuda"))]
    assert all(group["fused"] for group in adamw(params, 1e-3, 0.01).param_groups)
