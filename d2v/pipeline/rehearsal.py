"""`d2v rehearse`: every training stage of a profile takes one step on this machine before a cluster run does.

Validation (`params.py`) checks each config on its own and stays torch-free. A profile can still be inconsistent
across its parts in ways only the models show, and a GPU profile shows them hours in, after the downloads, the
tokenizer and the shards: a tokenizer whose ids are not the text encoder's vocabulary, images of another size or
channel count than the patch embedding, blocks longer than the learned positions, CTC masks wider than the encoder.
Here each pretraining and fine-tuning stage builds its model at the profile's preset, takes one optimizer step on
synthetic inputs of the configured shapes (`batch` examples and one micro-batch instead of the configured batch; the
speech crop is the shortest the loader keeps), and, for fine-tuning, runs the evaluation forward too.
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
from d2v.train.optim import adamw
from d2v.train.tasks import TASKS

PAD = 1  # fairseq's <pad> id (d2v.data.tokenizer)


@dataclass
class Rehearsal:
    stage: str
    parameters: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    error: str | None = None


def rehearse_profile(profile: Profile, batch: int = 2, device: str = "cpu", only: list[str] | None = None,
                     progress=None) -> list[Rehearsal]:
    """Every pretraining stage, then every fine-tuning task (from scratch: the pretrained encoder has the same
    architecture), or the `only` ones ('pretrain image', 'finetune glue_rte'). A failure is recorded, not raised."""
    stages = [(f"pretrain {m}", _pretrain, m) for m in profile.pretrain]
    stages += [(f"finetune {t}", _finetune, t) for t in profile.finetune]
    if only:
        unknown = sorted(set(only) - {name for name, _, _ in stages})
        if unknown:
            raise ValueError(f"no stage {unknown} in this profile; it has {[name for name, _, _ in stages]}")
        stages = [s for s in stages if s[0] in only]
    results = []
    for name, rehearse, what in stages:
        start = time.perf_counter()
        try:
            parameters, loss = rehearse(profile, what, batch, torch.device(device))
            result = Rehearsal(name, parameters, loss)
        except Exception as err:  # noqa: BLE001 - each stage's failure is the report, whatever it is
            frame = traceback.extract_tb(err.__traceback__)[-1]
            result = Rehearsal(name, error=f"{type(err).__name__}: {err} ({Path(frame.filename).name}:{frame.lineno})")
        result.seconds = round(time.perf_counter() - start, 1)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def _vocabulary(profile: Profile, encoder_cfg, where: str) -> int:
    """The ids the profile's tokenizer will make, which must be the text encoder's vocabulary."""
    from d2v.modalities.text import require_vocabulary

    require_vocabulary(profile.tokenizer.vocab_size, encoder_cfg, "the profile's tokenizer (tokenizer.vocab_size)",
                       where)
    return profile.tokenizer.vocab_size


def _pretrain(profile: Profile, modality: str, batch: int, device: torch.device) -> tuple[int, float]:
    from d2v.train.pretrain import autocast, build_objective, step_rng, to_device

    cfg = profile.pretrain_config(modality)
    objective = build_objective(cfg).to(device)
    rng = np.random.default_rng(0)
    if modality == "image":
        image = cfg.data.image or ImageAugConfig()  # what the loader makes
        inputs = synthetic.images(rng, batch, size=image.size, channels=image.channels)
    elif modality == "speech":
        audio = cfg.data.audio or AudioConfig()
        inputs = synthetic.waveforms(rng, batch, seconds=max(audio.min_samples, audio.sample_rate) / audio.sample_rate)
    else:
        vocab = _vocabulary(profile, objective.student.cfg, f"pretrain.{modality}")
        inputs = synthetic.tokens(rng, batch, cfg.data.block_tokens, vocab)
    params = objective.student_parameters()
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    amp, _ = autocast(device, cfg.precision)
    objective.train()
    with amp:
        out = objective(to_device(inputs, device), step_rng(cfg.seed, 1, 0))
    out.loss.backward()
    optimizer.step()
    objective.ema_step(1)
    return sum(p.numel() for p in params), _finite(out.loss)


def _finetune(profile: Profile, task_name: str, batch: int, device: torch.device) -> tuple[int, float]:
    from d2v.train.finetune import as_inputs, build_model, mix, param_groups, train_loss
    from d2v.train.pretrain import autocast, step_rng

    task = TASKS[task_name]
    with tempfile.TemporaryDirectory() as tmp:
        letters = Path(tmp) / "letters.json"  # the profile's is made from its transcripts: A-Z, ' and |
        LetterTokenizer(build_letter_vocab([])).save(letters)
        cfg = profile.finetune_config(task_name, "scratch", profile.seeds[0]).model_copy(
            update={"letters": str(letters)})
        model = build_model(cfg).to(device)
        rng = np.random.default_rng(0)
        if task.modality == "image":
            image = cfg.image or ImageAugConfig()
            item = collate_images([(x, i % task.num_outputs) for i, x in
                                   enumerate(synthetic.images(rng, batch, image.size, image.channels).source)])
        elif task.kind == "ctc":
            audio = cfg.audio or AudioConfig()
            seconds = max(audio.min_samples, audio.sample_rate) / audio.sample_rate
            waves = synthetic.waveforms(rng, batch, seconds=seconds).source
            # the second utterance shorter: padding and its mask take part
            item = pad_waveforms([(w[: len(w) // (1 + i % 2)], "A CAT'S TALE") for i, w in enumerate(waves)],
                                 LetterTokenizer.load(letters))
        else:
            vocab = _vocabulary(profile, model.encoder.cfg, f"finetune.{task_name}")
            ids = synthetic.tokens(rng, batch, cfg.max_tokens, vocab).source
            item = pad_tokens([(x[: len(x) // (1 + i % 2)], float(i % max(task.num_outputs, 1)))
                               for i, x in enumerate(ids)], PAD)
        inputs = as_inputs(item, task.modality, device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      eps=cfg.optim.eps)
        amp, _ = autocast(device, cfg.precision)
        mixer = mix(cfg, task.num_outputs) if task.modality == "image" else None
        model.train()
        with amp:
            loss = train_loss(model, inputs, task, cfg, mixer, step_rng(cfg.seed, 1))
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad(), amp:
            model(inputs["batch"])
        return sum(p.numel() for p in model.parameters()), _finite(loss)


def _finite(loss: torch.Tensor) -> float:
    value = float(loss.detach())
    if not np.isfinite(value):
        raise FloatingPointError(f"the loss is {value}")
    return value


def report(results: list[Rehearsal]) -> str:
    lines = [f"{'stage':28s} {'parameters':>12s} {'loss':>10s} {'seconds':>8s}"]
    for r in results:
        if r.error:
            lines.append(f"{r.stage:28s} FAILED: {r.error}")
        else:
            lines.append(f"{r.stage:28s} {r.parameters / 1e6:11.1f}M {r.loss:10.4f} {r.seconds:8.1f}")
    return "\n".join(lines)
