"""Shard readers per modality: WebDataset pipelines that are rank- and worker-aware, with an infinite resampled
mode for pretraining and a single ordered pass for evaluation.

- image: decoded with PIL, augmented with torchvision.transforms.v2 (the spec's pretraining / fine-tuning / eval
  transforms, scaled to the resolution) → (C,H,W) float tensors and class ids;
- speech: decoded with soundfile, normalised per utterance, randomly cropped to `max_samples`; pretraining batches
  crop every item to the shortest at a random offset (no padding), fine-tuning batches pad and carry CTC labels;
- text: corpus chunks packed into blocks of `block_tokens` (each starting with <s>); task examples tokenized as
  RoBERTa pairs and padded with <pad>.
A corrupt sample is skipped with a warning naming its key and shard (WebDataset's warn-and-continue handler); a
shard that ends short of the samples its index.json records (a corrupt tar header) is an error.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from d2v.config import AudioConfig, ImageAugConfig
from d2v.data.seekable import SeekableBatches, TarIndex, TokenBlocks, with_torch_seed
from d2v.data.shards import ShardError, read_index
from d2v.modalities.base import Batch
from d2v.processes import worker_init_for_stops

log = logging.getLogger("d2v.data")

Mode = Literal["pretrain", "finetune", "eval"]


def _warn(exn: Exception) -> bool:
    log.warning("skipping a sample: %r", exn)
    return True  # keep going


def worker_rng(seed: int) -> np.random.Generator:
    """Distinct, reproducible stream per (seed, rank, dataloader worker)."""
    from webdataset.utils import pytorch_worker_info

    rank, _, worker, _ = pytorch_worker_info()
    return np.random.default_rng([seed, rank, worker])


def shard_source(urls: list[str], resampled: bool, seed: int, split_ranks: bool = True) -> list:
    """Shard list stages: resampled (infinite, seeded per rank/worker) or split across ranks (unless every rank is
    to read them all: `split_ranks` False), then workers."""
    import webdataset as wds

    if resampled:
        return [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    return [wds.SimpleShardList(urls), *([wds.split_by_node] if split_ranks else []), wds.split_by_worker]


def counted_samples(counts: dict[str, int]) -> Callable[[Iterator], Iterator]:
    """WebDataset's tar reader, one shard at a time, checking that a shard read to its end gave the samples its
    index.json records. Python's tarfile ends a stream silently at a corrupt header, which would drop the rest of
    the shard (10 of 10,000 samples read, and training goes on): that is an error naming the shard."""
    import webdataset as wds

    def stage(src: Iterator) -> Iterator:
        for shard in src:
            read = 0
            for sample in wds.tarfile_samples(iter([shard]), handler=_warn):
                read += 1
                yield sample
            url = shard["url"]
            if counts.get(url) is not None and read != counts[url]:
                raise ShardError(f"{url}: {read} samples read, index.json says {counts[url]}; the tar is corrupt "
                                 "(write the split again with `d2v shard`)")
    return stage


def shuffle_buffer(buffer: int, seed: int) -> Callable[[Iterator], Iterator]:
    """A stream stage: keep `buffer` samples and yield one drawn at random as each new one comes in."""
    def stage(src: Iterator) -> Iterator:
        rng = random.Random(int(worker_rng(seed).integers(2 ** 63)))
        pool = []
        for sample in src:
            pool.append(sample)
            if len(pool) >= buffer:
                yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool
    return stage


def pipeline(shard_dir, stages: list, *, resampled: bool, shuffle: int, seed: int, split_ranks: bool = True):
    import webdataset as wds

    counts = {str(Path(shard_dir) / s["name"]): s.get("count") for s in read_index(shard_dir)["shards"]}
    head = shard_source(list(counts), resampled, seed, split_ranks) + [counted_samples(counts)]
    if shuffle > 1:
        head.append(shuffle_buffer(shuffle, seed))
    return wds.DataPipeline(*head, *stages)


def _map(fn: Callable) -> Callable[[Iterator], Iterator]:
    """Apply `fn` per sample; a sample whose decoding fails is skipped with a warning naming it."""
    def stage(src: Iterator) -> Iterator:
        for sample in src:
            try:
                out = fn(sample)
            except Exception as err:
                log.warning("skipping %s from %s: %r", sample.get("__key__"), sample.get("__url__"), err)
                continue
            if out is not None:
                yield out
    return stage


def _batched(size: int, collate: Callable, partial: bool) -> Callable[[Iterator], Iterator]:
    def stage(src: Iterator) -> Iterator:
        batch = []
        for item in src:
            batch.append(item)
            if len(batch) == size:
                yield collate(batch)
                batch = []
        if batch and partial:
            yield collate(batch)
    return stage


# --------------------------------------------------------------------------------------------------------- images

def image_transform(cfg: ImageAugConfig, mode: Mode):
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    # 3 channels: RGB kept, grayscale repeated (ImageNet holds a few of those); 1 channel: luminance
    first = [v2.ToImage(), v2.RGB() if cfg.channels == 3 else v2.Grayscale(num_output_channels=1)]
    ImageAugConfig.model_validate(cfg.model_dump())  # a copy made with `model_copy(update=...)` skipped its checks
    last = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    if mode == "eval":
        middle = [v2.Resize(int(round(cfg.size / cfg.crop_pct)), interpolation=bicubic, antialias=True),
                  v2.CenterCrop(cfg.size)]
    else:
        middle = [v2.RandomResizedCrop(cfg.size, scale=(cfg.min_scale, 1.0), interpolation=bicubic, antialias=True),
                  v2.RandomHorizontalFlip(cfg.hflip)]
        if mode == "pretrain" and cfg.color_jitter > 0:
            middle = [v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)] + middle
        if mode == "finetune" and cfg.randaugment_magnitude > 0:
            middle.append(v2.RandAugment(num_ops=2, magnitude=cfg.randaugment_magnitude))
        if mode == "finetune" and cfg.random_erasing > 0:
            last.append(v2.RandomErasing(cfg.random_erasing))
    return v2.Compose(first + middle + last)


def _decode_image(sample: dict, transform) -> tuple[torch.Tensor, int]:
    key = next(k for k in ("png", "jpg", "jpeg", "webp") if k in sample)
    with Image.open(io.BytesIO(sample[key])) as im:
        image = transform(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
    return image, int(sample["cls"]) if "cls" in sample else -1


def collate_images(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def image_loader(shard_dir, cfg: ImageAugConfig, mode: Mode, batch_size: int, *, resampled: bool | None = None,
                 shuffle: int = 2000, seed: int = 0, partial: bool | None = None, split_ranks: bool = True):
    transform = image_transform(cfg, mode)
    resampled = mode == "pretrain" if resampled is None else resampled
    partial = mode == "eval" if partial is None else partial
    return pipeline(shard_dir, [_map(lambda s: _decode_image(s, transform)),
                                _batched(batch_size, collate_images, partial)],
                    resampled=resampled, shuffle=0 if mode == "eval" else shuffle, seed=seed, split_ranks=split_ranks)


def seekable_image_batches(shard_dir, cfg: ImageAugConfig, mode: Mode, batch_size: int, *, seed: int, start: int):
    """`image_loader`'s batches from a seekable stream (d2v.data.seekable), positioned at batch `start`."""
    transform = image_transform(cfg, mode)
    return SeekableBatches(TarIndex(shard_dir).index_all(), batch_size, seed, start,
                           decode=lambda s, rng: with_torch_seed(lambda: _decode_image(s, transform), rng),
                           collate=lambda items, rng: collate_images(items))


# --------------------------------------------------------------------------------------------------------- speech

class Clip(NamedTuple):
    """A decoded speech sample: the waveform, its transcript, and its class ids when it is a tagged clip."""

    wave: torch.Tensor
    text: str
    labels: tuple[int, ...] | None = None


def _decode_audio(sample: dict, cfg: AudioConfig, mode: Mode, rng_holder: list, seed: int) -> Clip | None:
    """Waveform, transcript and a tagged clip's labels. Pretraining crops long utterances; labeled training drops
    them instead (a crop would cut the audio away from its transcript); both drop those under `min_samples`.
    Evaluation keeps everything: a test set scored in part is not the test set."""
    key = next(k for k in ("flac", "wav") if k in sample)
    wave, rate = sf.read(io.BytesIO(sample[key]), dtype="float32")
    if rate != cfg.sample_rate:
        raise ValueError(f"{rate} Hz, expected {cfg.sample_rate}")
    if wave.ndim != 1:
        wave = wave.mean(axis=1)
    if mode != "eval" and (len(wave) < cfg.min_samples or (mode == "finetune" and len(wave) > cfg.max_samples)):
        return None
    if mode == "pretrain" and len(wave) > cfg.max_samples:
        if not rng_holder:
            rng_holder.append(worker_rng(seed))
        start = int(rng_holder[0].integers(len(wave) - cfg.max_samples + 1))
        wave = wave[start:start + cfg.max_samples]
    if cfg.normalize:
        wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)  # F.layer_norm over the waveform, as fairseq
    text = sample.get("txt", b"")
    labels = json.loads(sample["json"]).get("labels") if "json" in sample else None
    return Clip(torch.from_numpy(np.ascontiguousarray(wave)), text.decode() if isinstance(text, bytes) else text,
                None if labels is None else tuple(labels))


def crop_to_shortest(items: list, rng: np.random.Generator) -> Batch:
    """Pretraining batches have no padding: each item is cut to the shortest at a random offset (spec §2.1)."""
    n = min(len(w) for w, *_ in items)
    crops = []
    for w, *_ in items:
        start = int(rng.integers(len(w) - n + 1))
        crops.append(w[start:start + n])
    return Batch(source=torch.stack(crops), padding_mask=None)


def pad_waveforms(items: list, letters=None, num_classes: int | None = None) -> dict:
    """Fine-tuning / eval batches: zero-padded waveforms, a padding mask (True = pad), and CTC targets (`letters`)
    or multi-hot labels (`num_classes`, tagged clips)."""
    items = [Clip(*item) for item in items]
    lengths = torch.tensor([len(c.wave) for c in items])
    source = torch.zeros(len(items), int(lengths.max()))
    for i, clip in enumerate(items):
        source[i, :len(clip.wave)] = clip.wave
    mask = torch.arange(source.shape[1])[None, :] >= lengths[:, None]
    out = {"batch": Batch(source=source, padding_mask=mask if mask.any() else None), "text": [c.text for c in items]}
    if num_classes is not None:
        out["labels"] = multi_hot([c.labels for c in items], num_classes)
    if letters is not None:
        targets = [torch.from_numpy(letters.encode(c.text)) for c in items]
        out["targets"] = torch.cat(targets)
        out["target_lengths"] = torch.tensor([len(t) for t in targets])
    return out


def multi_hot(labels: list[tuple[int, ...] | None], num_classes: int) -> torch.Tensor:
    """(B, num_classes) 0/1 targets of the clips' class ids; a clip without labels, or with an id outside the
    classes, is an error: tagging shards carry `labels` in every sample's json."""
    out = torch.zeros(len(labels), num_classes)
    for i, ids in enumerate(labels):
        if ids is None:
            raise ValueError("a clip without `labels` in its json: tagging needs shards of a source with clip labels "
                             "(audioset)")
        if any(not 0 <= c < num_classes for c in ids):
            raise ValueError(f"class ids {sorted(ids)} outside the task's {num_classes} classes")
        out[i, list(ids)] = 1.0
    return out


def speech_loader(shard_dir, cfg: AudioConfig, mode: Mode, batch_size: int, *, letters=None,
                  num_classes: int | None = None, resampled: bool | None = None, shuffle: int = 500, seed: int = 0,
                  partial: bool | None = None, split_ranks: bool = True):
    resampled = mode == "pretrain" if resampled is None else resampled
    partial = mode == "eval" if partial is None else partial
    holder: list = []
    decode = _map(lambda s: _decode_audio(s, cfg, mode, holder, seed))
    if mode == "pretrain":
        collate = lambda items: crop_to_shortest(items, holder[0] if holder else worker_rng(seed))  # noqa: E731
    else:
        collate = lambda items: pad_waveforms(items, letters, num_classes)  # noqa: E731
    return pipeline(shard_dir, [decode, _batched(batch_size, collate, partial)], resampled=resampled,
                    shuffle=0 if mode == "eval" else shuffle, seed=seed, split_ranks=split_ranks)


def seekable_speech_batches(shard_dir, cfg: AudioConfig, mode: Mode, batch_size: int, *, seed: int, start: int,
                            letters=None, num_classes: int | None = None):
    """`speech_loader`'s training batches from a seekable stream (d2v.data.seekable), positioned at batch `start`."""
    if mode == "pretrain":
        return SeekableBatches(TarIndex(shard_dir).index_all(), batch_size, seed, start,
                               decode=lambda s, rng: _decode_audio(s, cfg, "pretrain", [rng], seed),
                               collate=crop_to_shortest)
    return SeekableBatches(TarIndex(shard_dir).index_all(), batch_size, seed, start,
                           decode=lambda s, rng: _decode_audio(s, cfg, "finetune", [], seed),
                           collate=lambda items, rng: pad_waveforms(items, letters, num_classes))


# ----------------------------------------------------------------------------------------------------------- text

def pack_blocks(block_tokens: int, bos: int) -> Callable[[Iterator], Iterator]:
    """Concatenate token chunks into a stream and cut it into blocks of `block_tokens` ids, each led by <s>."""
    def stage(src: Iterator) -> Iterator:
        buffer = np.zeros(0, dtype=np.int64)
        for sample in src:
            ids = sample["ids.npy"]
            if isinstance(ids, bytes):
                ids = np.load(io.BytesIO(ids))
            buffer = np.concatenate([buffer, ids.astype(np.int64)])
            while len(buffer) >= block_tokens - 1:
                yield torch.from_numpy(np.concatenate([[bos], buffer[:block_tokens - 1]]))
                buffer = buffer[block_tokens - 1:]
    return stage


def collate_blocks(blocks: list[torch.Tensor]) -> Batch:
    return Batch(source=torch.stack(blocks), padding_mask=None)


def text_pretrain_loader(shard_dir, block_tokens: int, batch_size: int, *, bos: int = 0, resampled: bool = True,
                         shuffle: int = 1000, seed: int = 0):
    return pipeline(shard_dir, [pack_blocks(block_tokens, bos), _batched(batch_size, collate_blocks, False)],
                    resampled=resampled, shuffle=shuffle, seed=seed)


def seekable_text_pretrain_batches(shard_dir, block_tokens: int, batch_size: int, *, bos: int = 0, seed: int,
                                   start: int):
    """Text pretraining batches from a seekable stream (d2v.data.seekable) positioned at `start`: fairseq's blocks, cut
    once from the corpus in shard order and shuffled as units, where `text_pretrain_loader` packs shuffled chunks."""
    return SeekableBatches(TokenBlocks(shard_dir, block_tokens, bos), batch_size, seed, start,
                           decode=lambda block, rng: torch.from_numpy(block["ids"]),
                           collate=lambda blocks, rng: collate_blocks(blocks))


def _task_example(sample: dict, tokenizer, max_tokens: int) -> tuple[torch.Tensor, float]:
    record = json.loads(sample["json"])
    ids = tokenizer.encode(record["text"], record.get("text_b"), max_tokens=max_tokens)
    return torch.from_numpy(ids.astype(np.int64)), record["label"]


def pad_tokens(items: list, pad: int) -> dict:
    lengths = torch.tensor([len(x) for x, _ in items])
    tokens = torch.full((len(items), int(lengths.max())), pad, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        tokens[i, :len(x)] = x
    mask = tokens == pad
    return {"batch": Batch(source=tokens, padding_mask=mask if mask.any() else None),
            "labels": torch.tensor([y for _, y in items], dtype=torch.float32)}


def text_task_loader(shard_dir, tokenizer, batch_size: int, max_tokens: int, mode: Mode, *, shuffle: int = 2000,
                     seed: int = 0, resampled: bool = False, split_ranks: bool = True):
    return pipeline(shard_dir, [_map(lambda s: _task_example(s, tokenizer, max_tokens)),
                                _batched(batch_size, lambda items: pad_tokens(items, tokenizer.pad), True)],
                    resampled=resampled, shuffle=0 if mode == "eval" else shuffle, seed=seed, split_ranks=split_ranks)


def seekable_text_task_batches(shard_dir, tokenizer, batch_size: int, max_tokens: int, *, seed: int, start: int):
    """`text_task_loader`'s training batches from a seekable stream (d2v.data.seekable), positioned at `start`."""
    return SeekableBatches(TarIndex(shard_dir).index_all(), batch_size, seed, start,
                           decode=lambda s, rng: _task_example(s, tokenizer, max_tokens),
                           collate=lambda items, rng: pad_tokens(items, tokenizer.pad))


def web_loader(dataset, num_workers: int = 0, seed: int | None = None):
    """A DataLoader over an already-batched pipeline (batching happens inside each worker). With `seed`, worker
    RNGs (augmentation draws) come from a fixed generator, so the stream is reproducible with workers too."""
    from torch.utils.data import DataLoader

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers else None, generator=generator,
                      worker_init_fn=worker_init_for_stops() if num_workers else None)
