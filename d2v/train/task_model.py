"""A downstream task's model: the encoder (from a pretraining or scratch) under the task's head, its AdamW groups
(layer-wise LR decay, the encoder's LR scale), and the fine-tuned checkpoints (`final.pt`, `best.pt`) written and read
back."""
from __future__ import annotations

from pathlib import Path

import torch

from d2v.config import Objective
from d2v.data.tokenizer import LetterTokenizer
from d2v.io import atomic_torch_save, read_torch
from d2v.modalities.heads import AudioTagger, CTCModel, ImageClassifier, TextClassifier
from d2v.modalities.image import require_image_shape
from d2v.modalities.registry import build_encoder
from d2v.train import checkpoint, recipe
from d2v.train.distributed import resolve_device
from d2v.train.optim import adamw, fused_kernel, layer_decay_groups
from d2v.train.pretrain import load_final
from d2v.train.tasks import TASKS, FinetuneConfig


def build_model(cfg: FinetuneConfig) -> torch.nn.Module:
    task = TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(task.modality, cfg.preset, cfg.objective, **cfg.regularization.overrides())
    if cfg.init == "pretrained":
        encoder.load_state_dict(pretrained_weights(cfg, task.modality))
    if task.modality == "image" and cfg.image is not None:
        require_image_shape(cfg.image.channels, cfg.image.size, encoder.cfg,
                            f"finetune.{cfg.task}.image ({cfg.preset})")
    probe = cfg.mode == "probe"
    if task.kind == "ctc":
        model = CTCModel(encoder, len(LetterTokenizer.load(cfg.letters).symbols), cfg.ctc_masks, linear_probe=probe,
                         freeze_cnn=not cfg.train_cnn)
    elif task.kind == "tagging":
        model = AudioTagger(encoder, task.num_outputs, cfg.tagging_masks, linear_probe=probe,
                            freeze_cnn=not cfg.train_cnn)
    elif task.modality == "image":
        model = ImageClassifier(encoder, task.num_outputs, linear_probe=probe)
    else:
        model = TextClassifier(encoder, task.num_outputs, linear_probe=probe)
    if probe:
        encoder.requires_grad_(False)
    return model


def pretrained_weights(cfg: FinetuneConfig, modality: str) -> dict:
    """The encoder weights `cfg.weights` names in the pretraining's final.pt: the student, or the EMA teacher. An
    imported checkpoint without an EMA teacher stores the student twice, so its teacher is refused by name."""
    where = f"finetune.{cfg.task}"
    state = load_final(cfg.pretrained or "", modality, cfg.preset, cfg.objective, f"{where}.pretrained")
    if cfg.weights == "student":
        return state["encoder"]
    if "teacher" not in state:
        raise ValueError(f"{where}.weights: teacher, but {cfg.pretrained} holds no teacher (only the student)")
    if state.get("has_teacher") is False:
        raise ValueError(f"{where}.weights: teacher, but {cfg.pretrained} was imported from {state.get('source')} "
                         "without an EMA teacher (its teacher is a copy of the student)")
    return state["teacher"]


# BEiT's embedding group (layer 0, the most decayed LR); every other non-block parameter trains at the full LR
BEIT_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed.")


def vit_layer_id(name: str, depth: int, objective: Objective) -> int:
    """Layer of an image classifier's parameter for layer-wise LR decay: 0 = embeddings, block i = i + 1,
    depth + 1 = full LR. v1 follows BEiT's `get_num_layer_for_vit` (the shared relative-position table and the norms
    are top-level, like the head); v2 follows fairseq's data2vec_multi fine-tuning, which decays the blocks only
    (spec §9.1: patch embedding, [CLS] and norms keep the full LR)."""
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if objective == "v1" and name.removeprefix("encoder.").startswith(BEIT_EMBEDDINGS):
        return 0
    return depth + 1


def finetune_optimizer(model, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel where the model is on CUDA (`optim.fused_kernel`)."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=fused_kernel(model.parameters()))


def param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """Layer-wise LR decay protects what the lower layers of a pretrained encoder learned; a scratch encoder has
    nothing to protect, so it trains every layer at the full LR, as MAE's and DeiT's from-scratch recipes do. With
    decay 0.75 the embedded scratch ViT's patch embedding would learn at 0.75^7 ≈ 0.13 of the LR, a straw-man baseline
    (docs/findings.md, image)."""
    task = TASKS[cfg.task]
    if task.modality == "image" and cfg.layer_decay < 1.0 and cfg.mode == "full" and cfg.init == "pretrained":
        depth = model.encoder.cfg.depth
        groups = layer_decay_groups(model.named_parameters(), lambda name: vit_layer_id(name, depth, cfg.objective),
                                    depth, cfg.layer_decay, cfg.optim.weight_decay)
    else:
        groups = adamw([p for p in model.parameters() if p.requires_grad], cfg.optim.lr, cfg.optim.weight_decay,
                       cfg.optim.betas, cfg.optim.eps).param_groups
    return scaled_encoder_lr(groups, model, cfg.encoder_lr_scale)


def scaled_encoder_lr(groups: list[dict], model, scale: float) -> list[dict]:
    """The encoder's parameters at `scale` of their group's LR (the head keeps it): each group split in two, its
    `lr_scale` (layer decay's, or 1) multiplied for the encoder's half; empty halves dropped. Unchanged at 1."""
    if scale == 1.0:
        return groups
    encoder = {id(p) for p in model.encoder.parameters()}
    split = [{**group, "params": [p for p in group["params"] if (id(p) in encoder) == in_encoder],
              "lr_scale": group.get("lr_scale", 1.0) * (scale if in_encoder else 1.0)}
             for group in groups for in_encoder in (True, False)]
    return [group for group in split if group["params"]]


def save_finetuned(model_state: dict, cfg: FinetuneConfig, path: Path, step: int) -> None:
    """A fine-tuned model's weights with its config (what `load_finetuned` rebuilds it from), atomically."""
    atomic_torch_save(path, {"model": model_state, "config": cfg.model_dump(mode="json"), "step": step,
                             "recipe": recipe.FINETUNE})


def load_finetuned(path: Path, device: torch.device | None = None) -> tuple[torch.nn.Module, FinetuneConfig, dict]:
    """A fine-tuned checkpoint's model (on `device`, else its config's), its config and the saved state."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned model (run `d2v finetune` first)")
    state = read_torch(path)
    kind = checkpoint.kind_of(state)
    if kind != "fine-tuning":
        kind = "a pretraining's encoders" if kind == "pretraining" else "no fine-tuned model"
        raise ValueError(f"{path} holds {kind}, not a fine-tuned checkpoint (`d2v finetune` writes best.pt)")
    cfg = FinetuneConfig.model_validate(state["config"])
    model = build_model(cfg.model_copy(update={"init": "scratch"}))
    model.load_state_dict(state["model"])
    return model.to(device if device is not None else resolve_device(cfg.device, "finetune.device")), cfg, state
