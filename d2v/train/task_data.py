"""A downstream task's batches: its shard sets under the data root, the loaders of training (streamed, or seekable
for `stream_resume: seek`) and of evaluation, and a loader item as model inputs on the device."""
from __future__ import annotations

from pathlib import Path

import torch

from d2v.data.loaders import AudioConfig, ImageAugConfig, image_loader, seekable_image_batches, \
    seekable_speech_batches, seekable_text_task_batches, speech_loader, text_task_loader, web_loader
from d2v.data.tokenizer import LetterTokenizer, TextTokenizer
from d2v.modalities.base import Batch, from_host
from d2v.train.tasks import TASKS, FinetuneConfig


def shards_of(cfg: FinetuneConfig, split: str) -> Path:
    return Path(cfg.data_root) / "shards" / TASKS[cfg.task].shard_key(split)


# fairseq's CTC fine-tuning neither drops nor crops labelled utterances (no min/max_sample_size); LibriSpeech's
# longest is 35 s. AudioConfig's own defaults (2 to 20 s) are the pretraining crop's.
FINETUNE_AUDIO = AudioConfig(min_samples=0, max_samples=60 * 16_000)


def loader(cfg: FinetuneConfig, split: str, train: bool, split_ranks: bool = True):
    """A split's batches: training resampled without end, evaluation once in shard order, each rank reading its own
    share of the shards under torchrun, or all of them (`split_ranks` False: FSDP's collective forward passes)."""
    task = TASKS[cfg.task]
    shards = shards_of(cfg, split)
    mode = "finetune" if train else "eval"
    if task.modality == "image":
        ds = image_loader(shards, cfg.image or ImageAugConfig(), mode, cfg.batch_size, resampled=train,
                          seed=cfg.seed, partial=not train, split_ranks=split_ranks)
    elif task.modality == "speech":
        ds = speech_loader(shards, cfg.audio or FINETUNE_AUDIO, mode, cfg.batch_size, resampled=train,
                           seed=cfg.seed, partial=not train, split_ranks=split_ranks, **speech_targets(cfg))
    else:
        ds = text_task_loader(shards, TextTokenizer(cfg.tokenizer), cfg.batch_size, cfg.max_tokens, mode,
                              seed=cfg.seed, resampled=train, split_ranks=split_ranks)
    return web_loader(ds, cfg.num_workers if train else 0, seed=cfg.seed)


def seekable_loader(cfg: FinetuneConfig, start: int):
    """The training batches of `stream_resume: seek` from batch `start` on (d2v.data.seekable)."""
    task, shards = TASKS[cfg.task], shards_of(cfg, TASKS[cfg.task].train)
    if task.modality == "image":
        ds = seekable_image_batches(shards, cfg.image or ImageAugConfig(), "finetune", cfg.batch_size, seed=cfg.seed,
                                    start=start)
    elif task.modality == "speech":
        ds = seekable_speech_batches(shards, cfg.audio or FINETUNE_AUDIO, "finetune", cfg.batch_size, seed=cfg.seed,
                                     start=start, **speech_targets(cfg))
    else:
        ds = seekable_text_task_batches(shards, TextTokenizer(cfg.tokenizer), cfg.batch_size, cfg.max_tokens,
                                        seed=cfg.seed, start=start)
    return web_loader(ds, cfg.num_workers, seed=cfg.seed)


def speech_targets(cfg: FinetuneConfig) -> dict:
    """What a speech loader adds to its batches: CTC targets from the letter vocabulary, or tagged clips' labels."""
    task = TASKS[cfg.task]
    if task.kind == "tagging":
        return {"num_classes": task.num_outputs}
    return {"letters": LetterTokenizer.load(cfg.letters)}


def as_inputs(item, modality: str, device: torch.device) -> dict:
    """A loader item as a dict of model inputs on `device` (transcripts stay on the host)."""
    inputs = {"batch": Batch(source=item[0]), "labels": item[1]} if modality == "image" else dict(item)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[key] = from_host(value, device)
        elif isinstance(value, Batch):
            inputs[key] = value.to(device)
    return inputs
