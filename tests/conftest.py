import numpy as np
import pytest
import torch

from d2v.data2vec import Data2Vec
from d2v.modalities.registry import build_modality


def make_objective(name: str, **overrides) -> Data2Vec:
    """A tiny-preset data2vec objective (K capped at its depth by the registry), guard disarmed unless asked."""
    torch.manual_seed(0)
    modality, cfg = build_modality(name, "tiny")
    update = {"collapse": cfg.collapse.model_copy(update={"warmup_steps": 10**9})}
    update.update(overrides)
    return Data2Vec(modality, cfg.model_copy(update=update))


def synthetic_batch(name: str, objective: Data2Vec, seed: int = 0, batch: int = 4):
    from d2v.data import synthetic

    rng = np.random.default_rng(seed)
    if name == "image":
        return synthetic.images(rng, batch)
    if name == "speech":
        return synthetic.waveforms(rng, batch, seconds=0.5)
    return synthetic.tokens(rng, batch, 24, objective.student.cfg.vocab_size)


@pytest.fixture(params=["image", "speech", "text"])
def modality_name(request):
    return request.param
