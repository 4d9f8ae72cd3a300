"""A short CPU pretraining run per modality on small structured inputs: the loss falls, and the collapse guard
(armed for the last quarter of the run) never fires, i.e. target_var, pred_var (and local_var) stay above minimums."""
import numpy as np
import pytest
import torch

from conftest import make_objective
from d2v.config import CollapseConfig
from d2v.data import synthetic
from d2v.train.loop import pretrain

RUNS = {  # modality: (steps, lr, batch size, batch kwargs); image needs longer to leave the predict-the-mean plateau
    "image": (400, 2e-3, 8, dict(size=32)),
    "speech": (60, 3e-4, 8, dict(seconds=1.0)),
    "text": (80, 1e-3, 16, dict(length=32, vocab_size=64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_short_pretraining_learns_without_collapse(name):
    steps, lr, batch, kw = RUNS[name]
    guard = CollapseConfig(min_target_var=0.1, min_pred_var=0.01, min_local_var=0.01 if name == "speech" else 0.0,
                           warmup_steps=3 * steps // 4)
    obj = make_objective(name, collapse=guard)
    batches = synthetic.batches(name, np.random.default_rng(0), batch, **kw)
    history = pretrain(obj, batches, steps, lr, warmup=steps // 10)
    losses = np.array([m["loss"] for m in history])
    first, last = losses[:10].mean(), losses[-10:].mean()
    print(f"{name}: loss {first:.3f} -> {last:.3f}; final target_var {history[-1]['target_var']:.3f} "
          f"pred_var {history[-1]['pred_var']:.3f}")
    assert last < 0.9 * first
    assert all(np.isfinite(losses))
    assert history[-1]["tau"] == pytest.approx(obj.ema.cfg.tau_start if obj.ema.cfg.tau_steps == 0 else
                                               obj.ema.cfg.tau_start + (obj.ema.cfg.tau_end - obj.ema.cfg.tau_start)
                                               * steps / obj.ema.cfg.tau_steps)
    # the teacher moved towards the student, but is not the student
    s = dict(obj.student.named_parameters())["blocks.0.mlp.fc1.weight"]
    t = dict(obj.teacher.named_parameters())["blocks.0.mlp.fc1.weight"]
    assert not torch.equal(s, t)


V2_RUNS = {"image": (150, 2e-3, dict(size=32)), "speech": (60, 5e-4, dict(seconds=1.0)),
           "text": (80, 1e-3, dict(length=32, vocab_size=64))}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(V2_RUNS))
def test_short_v2_pretraining_learns_without_collapse(name):
    from d2v.data2vec2 import Data2Vec2
    from d2v.modalities.registry import build_modality

    steps, lr, kw = V2_RUNS[name]
    torch.manual_seed(0)
    modality, cfg = build_modality(name, "tiny", "v2")
    guard = CollapseConfig(min_target_var=0.1, min_pred_var=0.01, warmup_steps=3 * steps // 4)
    obj = Data2Vec2(modality, cfg.model_copy(update={"collapse": guard, "v2": cfg.v2.model_copy(update={"clones": 4})}))
    history = pretrain(obj, synthetic.batches(name, np.random.default_rng(0), 8, **kw), steps, lr, warmup=steps // 10)
    losses = np.array([m["loss"] for m in history])
    print(f"{name} v2: loss {losses[:10].mean():.3f} -> {losses[-10:].mean():.3f}; "
          f"target_var {history[-1]['target_var']:.3f} pred_var {history[-1]['pred_var']:.3f}")
    assert losses[-10:].mean() < 0.8 * losses[:10].mean() and np.isfinite(losses).all()
