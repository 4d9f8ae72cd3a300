"""d2v's run files to and from the other formats: `d2v export` (a pretraining `final.pt` or a fine-tuned `best.pt`
→ a Hugging Face folder) and `d2v import` (a Hugging Face folder, or an original fairseq/BEiT checkpoint → a d2v
`final.pt` that `d2v finetune` starts from, like one of d2v's own pretrainings)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from d2v.interop.layouts import InteropError
from d2v.interop.hf_export import export_classifier, export_encoder, save_pretrained
from d2v.io import atomic_torch_save, not_a_file, read_json, read_torch
from d2v.train.tasks import Regularization

TRAINING_ONLY = (*Regularization.model_fields, "init")  # encoder fields that are not architecture
HF_MODEL_TYPES = {"data2vec-vision": "image", "data2vec-audio": "speech", "data2vec-text": "text"}


# ---------------------------------------------------------------- export


def export_checkpoint(path: str | Path, out_dir: str | Path, weights: str = "student",
                      tokenizer: str | Path | None = None) -> Path:
    """Export a d2v pretraining `final.pt` (the student or the EMA teacher, as the HF base model) or a fine-tuning
    checkpoint (`best.pt`/`last.pt`, as the HF task model) to `out_dir`. The tokenizer goes along when it exists:
    the SentencePiece model as `spm.model` (text), the letters as `vocab.json` for `Wav2Vec2CTCTokenizer` (CTC)."""
    from d2v.modalities.heads import CTC_HEAD_DROPOUT, TEXT_HEAD_DROPOUT
    from d2v.modalities.registry import ENCODER_CONFIGS, encoder_config
    from d2v.train.tasks import TASKS, FinetuneConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} {not_a_file(path)}: no checkpoint to export")
    state = read_torch(path)
    provenance = {"source": str(path)}
    if {"encoder", "teacher", "modality", "encoder_config"} <= state.keys():  # a pretraining's final.pt
        if weights not in ("student", "teacher"):
            raise InteropError(f"weights={weights!r}: expected 'student' or 'teacher'")
        kind = state["modality"]
        cfg = ENCODER_CONFIGS[kind].model_validate(state["encoder_config"])
        export = export_encoder(kind, state["encoder" if weights == "student" else "teacher"], cfg)
        provenance.update(weights=weights, steps=state.get("steps"), objective=state.get("objective", "v1"),
                          preset=state.get("preset"))
    elif {"model", "config"} <= state.keys():  # a fine-tuning checkpoint
        ft = FinetuneConfig.model_validate(state["config"])
        task = TASKS[ft.task]
        cfg = encoder_config(task.modality, ft.preset, ft.objective, **ft.regularization.overrides())
        head = "classification" if task.modality == "image" else task.kind
        num_labels = state["model"]["head.weight"].shape[0] if head == "ctc" else task.num_outputs
        dropout = CTC_HEAD_DROPOUT if head == "ctc" else TEXT_HEAD_DROPOUT  # fine-tuning builds heads with these
        export = export_classifier(task.modality, head, state["model"], cfg, num_labels, dropout,
                                   task.labels if head != "ctc" else ())
        tokenizer = tokenizer or (ft.letters if head == "ctc" else ft.tokenizer if task.modality == "text" else None)
        provenance.update(task=ft.task, init=ft.init, seed=ft.seed, steps=state.get("step"), objective=ft.objective,
                          preset=ft.preset)
    else:
        raise InteropError(f"{path}: neither a pretraining final.pt (encoder, teacher, modality, encoder_config) "
                           f"nor a fine-tuning checkpoint (model, config); its keys are {sorted(state)}")
    if tokenizer is not None:
        ctc = export.config["architectures"][0].endswith("CTC")
        # text: RoBERTa's position table has max_positions + pad + 1 rows
        max_length = None if ctc else export.config["max_position_embeddings"] - export.config["pad_token_id"] - 1
        export.files.update(tokenizer_files(Path(tokenizer), ctc, max_length))
    return save_pretrained(export, out_dir, provenance)


def tokenizer_files(path: Path, ctc: bool, max_length: int | None = None) -> dict[str, bytes]:
    """The tokenizer beside the model: letters as `vocab.json` for `Wav2Vec2CTCTokenizer`; the SentencePiece model as
    `spm.model` and, when the `tokenizers` library is installed, as a fast tokenizer that `AutoTokenizer` loads."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer missing (run `d2v tokenizer`, or pass --tokenizer)")
    if not ctc:
        files = {"spm.model": path.read_bytes()}
        try:
            from d2v.interop.hf_tokenizer import hf_tokenizer_files

            files.update(hf_tokenizer_files(files["spm.model"], max_length or 512))
        except ImportError as err:
            print(f"{path}: exported as spm.model only; `pip install tokenizers` for an AutoTokenizer ({err})",
                  file=sys.stderr)
        return files
    from d2v.data.tokenizer import BLANK, WORD_SEP, LetterTokenizer

    symbols = LetterTokenizer.load(path).symbols
    vocab = {s: i for i, s in enumerate(symbols)}
    config = {"tokenizer_class": "Wav2Vec2CTCTokenizer", "pad_token": BLANK, "word_delimiter_token": WORD_SEP,
              "unk_token": BLANK, "bos_token": None, "eos_token": None, "do_lower_case": False}
    return {"vocab.json": json.dumps(vocab, indent=2).encode(), "tokenizer_config.json": json.dumps(config).encode()}


# ---------------------------------------------------------------- import


def import_checkpoint(source: str | Path, out: str | Path, kind: str | None = None) -> dict:
    """Write `out` (a d2v `final.pt`) from a Hugging Face model folder or an original fairseq/BEiT checkpoint. The
    teacher is the checkpoint's EMA teacher when it has one, else a copy of the student. Returns what was written,
    without the weights."""
    source = Path(source)
    if source.is_dir():
        kind, cfg, student, teacher, origin, objective = *_from_hf(source, kind), "huggingface", "v1"
    else:
        from d2v.interop.fairseq import load_fairseq

        imported = load_fairseq(source, kind)
        kind, cfg, student, teacher, objective = (imported.kind, imported.cfg, imported.student, imported.teacher,
                                                  imported.objective)
        origin = "fairseq"
    encoder = _encoder_class(kind)(cfg)
    for name, weights in (("student", student), ("teacher", teacher)):
        if weights is not None:  # strict: every d2v parameter must come from the checkpoint
            missing, unexpected = encoder.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise InteropError(f"{source}: the {name} does not fit a d2v {kind} encoder: missing={missing} "
                                   f"unexpected={unexpected}")
    from d2v.train.pretrain import encoder_checkpoint

    info = {"source": str(source), "imported": origin, "has_teacher": teacher is not None}
    state = encoder_checkpoint(student, teacher if teacher is not None else dict(student), kind,
                               matching_preset(kind, cfg, objective), objective, cfg, None, **info)
    atomic_torch_save(out, state)
    return {k: v for k, v in state.items() if k not in ("encoder", "teacher")}


def _from_hf(folder: Path, kind: str | None):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    config = read_json(config_file, "a Hugging Face model config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_MODEL_TYPES:
        raise InteropError(f"{config_file}: model_type {model_type!r} is not one of {sorted(HF_MODEL_TYPES)}")
    kind = kind or HF_MODEL_TYPES[model_type]
    import transformers

    from d2v.interop.hf import load_hf

    model = transformers.AutoModel.from_pretrained(folder)
    encoder = load_hf(kind, model)
    return kind, encoder.cfg, encoder.state_dict(), None


def matching_preset(kind: str, cfg, objective: str = "v1") -> str:
    """The preset with this architecture under `objective` (regularisation and initialisation aside), so that
    `d2v finetune --set preset=... --set objective=...` builds the same encoder; 'custom' when none has it."""
    from d2v.modalities.registry import ENCODERS, encoder_config, objectives_of

    def architecture(c) -> dict:
        fields = c.model_dump(exclude=set(TRAINING_ONLY) & set(type(c).model_fields))
        if "layer_scale_init" in fields:  # its value is only an initialisation; whether there is LayerScale counts
            fields["layer_scale_init"] = fields["layer_scale_init"] is not None
        return fields

    return next((name for name in ENCODERS[kind][0] if objective in objectives_of(kind, name)
                 and architecture(encoder_config(kind, name, objective)) == architecture(cfg)), "custom")


def _encoder_class(kind: str):
    from d2v.modalities.registry import ENCODERS

    return ENCODERS[kind][1]
