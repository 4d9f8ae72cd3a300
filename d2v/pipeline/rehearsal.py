"""`d2v rehearse`: every training stage of a profile takes one step on this machine before a cluster run does.

Validation (`params.py`) checks each config on its own and stays torch-free. A profile can still be inconsistent
across its parts in ways only the models show, and a GPU profile shows them hours in, after the downloads, the
tokenizer and the shards: a tokenizer whose ids are not the text encoder's vocabulary, images of another size or
channel count than the patch embedding, blocks longer than the learned positions, CTC masks wider than the encoder.
Here each pretraining and fine-tuning stage builds its model at the profile's preset, takes one optimizer step on
synthetic inputs of the configured shapes, and, for fine-tuning, runs the evaluation forward too. A quick rehearsal
takes `batch` examples (the speech crop the shortest the loader keeps); `batch=None` takes each stage's configured
per-GPU micro-batch at the longest inputs the loader makes, the memory pre-flight of a GPU profile (peak memory is
reported on CUDA).
"""
from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2v.config import AudioConfig, ImageAugConfig
from d2v.data import synthetic
from d2v.data.loaders import collate_images, pad_tokens, pad_waveforms
from d2v.data.tokenizer import LetterTokenizer, build_letter_vocab
from d2v.pipeline.params import Profile
from d2v.train.optim import adamw, clip_and_step, fp16_scaling, scaled_backward
from d2v.train.tasks import TASKS

@dataclass
class Rehearsal:
    stage: str
    model: str = ""  # preset, objective and, for fine-tuning, the initialisation
    parameters: int = 0
    batch: int = 0  # examples in the step
    loss: float = float("nan")
    seconds: float = 0.0
    peak_gib: float | None = None  # CUDA: the step's peak allocated memory
    error: str | None = None


def rehearse_profile(profile: Profile, batch: int | None = 2, device: str = "cpu", only: list[str] | None = None,
                     progress=None) -> list[Rehearsal]:
    """Every pretraining stage, then every fine-tuning task, or the `only` ones ('pretrain image', 'finetune
    glue_rte'). A task fine-tunes the encoder its modality's rehearsal saved as `final.pt` (from scratch when that
    stage was left out or failed). A failure is recorded, not raised."""
    stages = [(f"pretrain {m}" + ("" if s == profile.pretrain_stages(m)[-1] else f" stage {s}"), _pretrain, (m, s))
              for m in profile.pretrain for s in profile.pretrain_stages(m)]
    stages += [(f"finetune {t}", _finetune, t) for t in profile.finetune]
    if only:
        unknown = sorted(set(only) - {name for name, _, _ in stages})
        if unknown:
            raise ValueError(f"no stage {unknown} in this profile; it has {[name for name, _, _ in stages]}")
        stages = [s for s in stages if s[0] in only]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # the CTC letters: the profile's are made from its transcripts, A-Z, ' and |
        LetterTokenizer(build_letter_vocab([])).save(Path(tmp) / "letters.json")
        for name, rehearse, what in stages:
            results.append(_timed(name, torch.device(device),
                                  lambda: rehearse(profile, what, batch, torch.device(device), Path(tmp))))
            if progress is not None:
                progress(results[-1])
    return results


def _timed(name: str, device: torch.device, rehearse) -> Rehearsal:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        result = Rehearsal(name, **rehearse())
        if cuda:
            result.peak_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except Exception as err:  # noqa: BLE001 - each stage's failure is the report, whatever it is
        frame = traceback.extract_tb(err.__traceback__)[-1]
        result = Rehearsal(name, error=f"{type(err).__name__}: {err} ({Path(frame.filename).name}:{frame.lineno})")
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _vocabulary(profile: Profile, encoder_cfg, where: str) -> int:
    """The ids the profile's tokenizer will make, which must be the text encoder's vocabulary."""
    from d2v.modalities.text import require_vocabulary

    require_vocabulary(profile.tokenizer.vocab_size, encoder_cfg, "the profile's tokenizer (tokenizer.vocab_size)",
                       where)
    return profile.tokenizer.vocab_size


def _seconds(audio: AudioConfig | None, batch: int | None) -> float:
    """The longest crop the loader makes for the memory pre-flight, else the shortest it keeps (at least 1 s)."""
    audio = audio or AudioConfig()
    return (audio.max_samples if batch is None else max(audio.min_samples, audio.sample_rate)) / audio.sample_rate


def _pretrain(profile: Profile, stage: tuple[str, int], batch: int | None, device: torch.device, tmp: Path) -> dict:
    """One step of a pretraining stage (a second stage's encoder is the first's: it is not loaded from it here)."""
    from d2v.train.batches import step_rng
    from d2v.train.precision import autocast
    from d2v.train.pretrain import build_objective, save_encoder

    modality, number = stage
    cfg = profile.pretrain_config(modality, number)
    n = batch or cfg.data.batch_size
    objective = build_objective(cfg).to(device)
    rng = np.random.default_rng(0)
    if modality == "image":
        image = cfg.data.image or ImageAugConfig()  # what the loader makes
        inputs = synthetic.images(rng, n, size=image.size, channels=image.channels)
    elif modality == "speech":
        inputs = synthetic.waveforms(rng, n, seconds=_seconds(cfg.data.audio, batch))
    else:
        vocab = _vocabulary(profile, objective.student.cfg, f"pretrain.{modality}")
        inputs = synthetic.tokens(rng, n, cfg.data.block_tokens, vocab)
    params = objective.student_parameters()
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    amp, scaler = autocast(device, cfg.precision, fp16_scaling(cfg.fp16_init_scale, cfg.fp16_scale_window, 1, 1))
    objective.train()
    with amp:
        out = objective(inputs.to(device), step_rng(cfg.seed, 1, 0))
    scaled_backward(out.loss, scaler)
    clip_and_step(optimizer, params, cfg.optim.clip_norm, scaler)
    objective.ema_step(1)
    if number == profile.pretrain_stages(modality)[-1]:
        save_encoder(tmp / modality, cfg, objective.student, objective.teacher, 1)  # what its fine-tuning loads
    return dict(model=f"{cfg.preset} {cfg.objective}", parameters=sum(p.numel() for p in params), batch=n,
                loss=_finite(out.loss))


def _finetune(profile: Profile, task_name: str, batch: int | None, device: torch.device, tmp: Path) -> dict:
    from d2v.train.batches import step_rng
    from d2v.train.finetune import fp16_scaling_of, mix, train_loss
    from d2v.train.precision import autocast
    from d2v.train.task_data import as_inputs
    from d2v.train.task_model import build_model, finetune_optimizer

    task = TASKS[task_name]
    pretrained = tmp / task.modality / "final.pt"
    init = "pretrained" if pretrained.is_file() and "pretrained" in profile.inits else "scratch"
    letters = tmp / "letters.json"
    cfg = profile.finetune_config(task_name, init, profile.seeds[0])
    cfg = cfg.model_copy(update={"letters": str(letters), "pretrained": str(pretrained)})
    model = build_model(cfg).to(device)
    if task.modality == "text":
        _vocabulary(profile, model.encoder.cfg, f"finetune.{task_name}")
    n = batch or cfg.batch_size
    item = _task_item(task, cfg, n, _seconds(cfg.audio, batch), LetterTokenizer.load(letters), model.encoder.cfg)
    inputs = as_inputs(item, task.modality, device)
    optimizer = finetune_optimizer(model, cfg)
    amp, scaler = autocast(device, cfg.precision, fp16_scaling_of(cfg, task, 1))
    model.train()
    with amp:
        loss = train_loss(model, inputs, task, cfg, mix(cfg, task.num_outputs) if task.modality == "image" else None,
                          step_rng(cfg.seed, 1))
    scaled_backward(loss, scaler)
    clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], cfg.optim.clip_norm, scaler)
    model.eval()
    with torch.no_grad(), amp:
        model(inputs["batch"])
    return dict(model=f"{cfg.preset} {cfg.objective} {init}", parameters=sum(p.numel() for p in model.parameters()),
                batch=n, loss=_finite(loss))


def _task_item(task, cfg, batch: int, seconds: float, letters: LetterTokenizer, encoder_cfg):
    """A loader item of `batch` synthetic examples, collated as the task's loader collates; the second example is
    shorter where inputs are padded, so padding and its mask take part. Text ids span the encoder's vocabulary (the
    tokenizer's, checked) and pad with its padding id."""
    rng = np.random.default_rng(0)
    if task.modality == "image":
        image = cfg.image or ImageAugConfig()
        images = synthetic.images(rng, batch, image.size, image.channels).source
        return collate_images([(x, i % task.num_outputs) for i, x in enumerate(images)])
    if task.kind == "ctc":
        waves = synthetic.waveforms(rng, batch, seconds=seconds)
        return pad_waveforms([(w[: len(w) // (1 + i % 2)], "A CAT'S TALE") for i, w in enumerate(waves.source)],
                             letters)
    if task.kind == "tagging":  # one or two classes per clip
        waves = synthetic.waveforms(rng, batch, seconds=seconds)
        return pad_waveforms([(w[: len(w) // (1 + i % 2)], "", tuple({i % task.num_outputs, 2 * i % task.num_outputs}))
                              for i, w in enumerate(waves.source)], num_classes=task.num_outputs)
    ids = synthetic.tokens(rng, batch, cfg.max_tokens, encoder_cfg.vocab_size).source
    return pad_tokens([(x[: len(x) // (1 + i % 2)], float(i % max(task.num_outputs, 1))) for i, x in enumerate(ids)],
                      encoder_cfg.pad_idx)


def _finite(loss: torch.Tensor) -> float:
    value = float(loss.detach())
    if not np.isfinite(value):
        raise FloatingPointError(f"the loss is {value}")
    return value


def report(results: list[Rehearsal]) -> str:
    lines = [f"{'stage':28s} {'model':30s} {'parameters':>10s} {'batch':>5s} {'loss':>9s} {'seconds':>8s} "
             f"{'peak GiB':>8s}"]
    for r in results:
        if r.error:
            lines.append(f"{r.stage:28s} FAILED: {r.error}")
        else:
            peak = "" if r.peak_gib is None else f"{r.peak_gib:8.2f}"
            lines.append(f"{r.stage:28s} {r.model:30s} {r.parameters / 1e6:9.1f}M {r.batch:5d} {r.loss:9.4f} "
                         f"{r.seconds:8.1f} {peak}")
    return "\n".join(lines)
