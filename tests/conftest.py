import io

import numpy as np
import pytest
import torch
from PIL import Image

from d2v.data.manifest import make_manifest, write_manifest
from d2v.data.shards import write_shards
from d2v.data2vec import Data2Vec
from d2v.modalities.registry import build_modality
from d2v.train import tasks


@pytest.fixture(autouse=True)
def _caches_in_the_session_folder(tmp_path_factory):
    """The seekable streams' index cache (d2v.data.index_cache) under the session's temp folder, not ~/.cache, and
    the temp folder of subprocesses (the CLI, torchrun) there too: torchrun leaves a `torchelastic_*` log folder in
    it after every launch. Its own MonkeyPatch: a test's `monkeypatch.undo()` leaves both in place."""
    base = tmp_path_factory.getbasetemp()
    (base / "subprocess-tmp").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("D2V_INDEX_CACHE", str(base / "shard-index"))
        patch.setenv("TMPDIR", str(base / "subprocess-tmp"))
        yield


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


def _image_shards(root, n=64):
    rows = []
    for i in range(n):
        label = i % 2
        pixels = np.random.default_rng(i).integers(0, 60, (28, 28)) + (160 if label else 0)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
        rel = f"{i}.png"
        (root / "raw").mkdir(parents=True, exist_ok=True)
        (root / "raw" / rel).write_bytes(buf.getvalue())
        rows.append(dict(id=f"im{i}", path=rel, split="train" if i < 48 else "test", label=label))
    write_manifest(root / "raw", make_manifest(rows), source="fashion_mnist")
    for split in ("train", "test"):
        write_shards(root / "raw", split, root / "shards" / "toy" / split)


@pytest.fixture
def toy_image_task(tmp_path, monkeypatch):
    _image_shards(tmp_path)
    monkeypatch.setitem(tasks.TASKS, "toy_image", tasks.Task("image", "classification", "toy", "train", None,
                                                             ("test",), ("accuracy",), 2, "ImageNet"))
    image = dict(size=32, channels=1, mean=(0.5,), std=(0.5,), crop_pct=1.0, min_scale=0.8, randaugment_magnitude=0,
                 random_erasing=0.0, color_jitter=0.0)
    return tasks.FinetuneConfig(task="toy_image", init="scratch", preset="tiny", steps=40, batch_size=16,
                                optim=dict(lr=2e-3, warmup_steps=4), image=image, data_root=str(tmp_path),
                                layer_decay=0.75)
