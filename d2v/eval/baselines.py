"""Raw-feature baselines: a linear model on the inputs themselves, with no encoder. The embedded benchmark asks the
data2vec encoder to beat these as well as the same encoder trained from scratch (design, "Success").

- images: logistic regression on standardised pixels (the evaluation transform);
- text classification: logistic regression on binary bags of SentencePiece pieces; a pair is represented by the
  pieces both sentences share and the pieces only one of them has;
- text similarity (regression): the cosine of the two texts' TF-IDF bags of pieces;
- speech: a linear CTC head on log-mel frames (CMVN per utterance, ±`context` frames stacked, every second frame:
  50 frames/s, the encoders' rate), decoded greedily.

Every split comes through the fine-tuning loaders, so a baseline sees the same examples, tokens and transcripts.
The logistic regularisation strength and the CTC epoch are chosen on the dev split (a seeded hold-out of the
training split when the task has none). `run_baseline` writes one JSON per test split in the evaluation format with
init `raw`, so `d2v report` sets the baseline beside the pretrained and scratch rows.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from d2v.data.tokenizer import LetterTokenizer
from d2v.eval.evaluate import headline, require_ctc_for_lm, require_extra_tests, result_record, score
from d2v.eval.linear_ctc import fit_linear_ctc
from d2v.eval.lm import CTCScorer, with_lm_fields
from d2v.io import atomic_write_json
from d2v.modalities.speech import FbankConfig, FbankFrontEnd
from d2v.train import recipe
from d2v.train.task_data import as_inputs, loader
from d2v.train.tasks import RAW, TASKS, BaselineConfig, FinetuneConfig, Task, eval_file_name

# --------------------------------------------------------------------------------------------------- features

def _items(cfg: FinetuneConfig, split: str):
    for item in loader(cfg, split, train=False):
        yield as_inputs(item, TASKS[cfg.task].modality, torch.device("cpu"))


def pixels(cfg: FinetuneConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for inputs in _items(cfg, split):
        xs.append(inputs["batch"].source.flatten(1).numpy())
        ys.append(inputs["labels"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def pieces(cfg: FinetuneConfig, split: str, eos: int) -> tuple[list[tuple[list[int], list[int] | None]], np.ndarray]:
    """Each example's pieces without `<s>`/`</s>`: (a, None), or (a, b) for a pair `<s> a </s></s> b </s>`."""
    examples, labels = [], []
    for inputs in _items(cfg, split):
        batch = inputs["batch"]
        pad = batch.padding_mask if batch.padding_mask is not None else torch.zeros_like(batch.source, dtype=bool)
        for row, mask in zip(batch.source, pad):
            ids = row[~mask].tolist()[1:-1]
            if eos in ids:
                cut = ids.index(eos)
                examples.append((ids[:cut], ids[cut + 2:]))
            else:
                examples.append((ids, None))
        labels += inputs["labels"].tolist()
    return examples, np.asarray(labels)


def stack_frames(mels: torch.Tensor, context: int) -> torch.Tensor:
    """(M, F) log-mels → (⌈F / 2⌉, M·(2·context + 1)): every second frame with `context` neighbours on each side
    (zeros past the ends), mel-major. Stride 2 gives the encoders' 50 frames/s."""
    windows = F.pad(mels, (context, context)).unfold(1, 2 * context + 1, 2)  # (M, frames, window)
    return windows.permute(1, 0, 2).flatten(1)


def log_mel_frames(cfg: FinetuneConfig, split: str, fbank: FbankFrontEnd, context: int) -> tuple[
        list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Per utterance: stacked log-mel frames (float16, to halve the cache), letter targets, transcript."""
    frames, targets, texts = [], [], []
    with torch.no_grad():
        for inputs in _items(cfg, split):
            batch = inputs["batch"]
            mels, samples = fbank.log_mel(batch.source, batch.padding_mask)
            for x, n in zip(mels, fbank.mel_frames(samples).tolist()):
                frames.append(stack_frames(x[:, :n], context).half())
            targets += list(inputs["targets"].split(inputs["target_lengths"].tolist()))
            texts += inputs["text"]
    return frames, targets, texts


def bags(examples: list, vocabulary: int) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Binary bags of pieces of the first texts, and of the second ones (None for single texts)."""
    def bag(seqs):
        rows = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
        cols = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=len(rows))
        m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(seqs), vocabulary))
        m.data[:] = 1.0  # repeated pieces count once
        return m

    pairs = bool(examples) and examples[0][1] is not None
    return bag([a for a, _ in examples]), bag([b for _, b in examples]) if pairs else None


def pair_features(a: sp.csr_matrix, b: sp.csr_matrix | None) -> sp.csr_matrix:
    """A single text's bag, or for a pair [pieces in both, pieces in exactly one]."""
    return a if b is None else sp.hstack([a.multiply(b), abs(a - b)]).tocsr()


def cosine(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Row-wise cosine similarity of two sparse matrices with L2-normalised rows."""
    return np.asarray(a.multiply(b).sum(1)).ravel()


# --------------------------------------------------------------------------------------------------- models

def linear_model(strength: float, dense: bool):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = LogisticRegression(C=strength, max_iter=1000)
    return make_pipeline(StandardScaler(), model) if dense else model


def fit_selected(task: Task, cfg: BaselineConfig, make: Callable, train, dev) -> tuple[object, float, float]:
    """Fit one model per strength, keep the best on dev (the headline metric); without a dev split, select on a
    seeded hold-out of train and refit the chosen strength on all of it. Returns (model, strength, dev score)."""
    (x, y), refit = train, dev is None
    if refit:
        order = np.random.default_rng(cfg.seed).permutation(len(y))
        cut = max(1, int(len(y) * cfg.holdout))
        dev, train = (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])
    best = None
    for strength in cfg.strengths:
        model = make(strength).fit(*train)
        value = headline(task, score(task, _predict(model, dev[0]), dev[1].tolist()))
        if best is None or value > best[2]:
            best = (model, strength, value)
    if refit:
        best = (make(best[1]).fit(x, y), best[1], best[2])
    return best


def _predict(model, x) -> list:
    return model.predict(x).astype(int).tolist()


# --------------------------------------------------------------------------------------------------- runs

def classical_baseline(cfg: BaselineConfig, splits: list[str]) -> tuple[str, dict, dict]:
    """Images and text classification: (description, {split: (predictions, references)}, selection)."""
    task, lcfg = TASKS[cfg.task], cfg.loader_config()
    if task.modality == "image":
        read, dense, what = (lambda s: pixels(lcfg, s)), True, "standardised pixels"
    else:
        text = text_reader(cfg, lcfg)
        read, dense = (lambda s: (pair_features(*text(s)[:2]), text(s)[2])), False
        what = "binary bags of SentencePiece pieces (pairs: pieces in both, pieces in one only)"
    train = read(task.train)
    model, strength, dev_value = fit_selected(task, cfg, lambda c: linear_model(c, dense), train,
                                              read(task.dev) if task.dev else None)
    outputs = {}
    for split in splits:
        x, y = read(split)
        outputs[split] = (_predict(model, x), y.astype(int).tolist())
    selection = {"strength": strength, "selected_on": task.dev or f"{cfg.holdout:.0%} of {task.train}",
                 "dev_headline": round(dev_value, 4), "n_train": int(train[1].shape[0])}
    return f"logistic regression on {what}", outputs, selection


def similarity_baseline(cfg: BaselineConfig, splits: list[str]) -> tuple[str, dict, dict]:
    """Graded similarity of text pairs: the cosine of their TF-IDF bags of pieces (IDF from the training texts).
    Nothing else is fitted: Pearson and Spearman do not change under a regression on this one feature."""
    from sklearn.feature_extraction.text import TfidfTransformer

    task = TASKS[cfg.task]
    text = text_reader(cfg, cfg.loader_config())
    a, b, _ = text(task.train)
    if b is None:
        raise ValueError(f"{cfg.task}: the similarity baseline needs sentence pairs")
    tfidf, n_train = TfidfTransformer().fit(sp.vstack([a, b])), a.shape[0]
    outputs = {}
    for split in splits:
        a, b, y = text(split)
        outputs[split] = (cosine(tfidf.transform(a), tfidf.transform(b)).tolist(), y.astype(float).tolist())
    return "cosine of TF-IDF bags of SentencePiece pieces", outputs, {"n_train": int(n_train)}


def text_reader(cfg: BaselineConfig, lcfg: FinetuneConfig) -> Callable:
    """split → (bags of the first texts, bags of the second or None, labels); each split is read once."""
    from functools import cache

    from d2v.data.tokenizer import TextTokenizer

    tok = TextTokenizer(cfg.tokenizer)

    @cache
    def read(split: str):
        examples, y = pieces(lcfg, split, tok.eos)
        return (*bags(examples, tok.vocab_size), y)

    return read


def ctc_baseline(cfg: BaselineConfig, splits: list[str], lm: str | Path | None = None,
                 decode_workers: int = 1) -> tuple[str, dict, dict]:
    """Speech: a linear CTC head on stacked log-mels, decoded greedily and, given a language model folder, by beam
    search as the fine-tuned models are (`d2v.eval.lm.CTCScorer`, in `decode_workers` processes)."""
    from d2v.eval.metrics import cer

    task, lcfg = TASKS[cfg.task], cfg.loader_config()
    letters = LetterTokenizer.load(cfg.letters)
    fbank = FbankFrontEnd(FbankConfig(n_mels=cfg.n_mels))
    read = lambda split: log_mel_frames(lcfg, split, fbank, cfg.context)  # noqa: E731
    frames, targets, _ = read(task.train)
    dev_frames, _, dev_texts = read(task.dev) if task.dev else ([], [], [])
    select = (lambda head: cer(head.transcribe(dev_frames, letters), dev_texts)) if task.dev else None
    head, train_loss, epoch = fit_linear_ctc(frames, targets, len(letters.symbols), epochs=cfg.ctc_epochs,
                                             lr=cfg.ctc_lr, batch_size=cfg.ctc_batch_size, seed=cfg.seed,
                                             score=select, every=cfg.ctc_check_every)

    def logits_of(split: str):
        split_frames, _, texts = read(split)
        return head.utterance_logits(split_frames), list(texts)

    scorer = CTCScorer(logits_of, letters, lm, task.tests, task.dev, decode_workers)
    outputs = {split: scorer.score(split) for split in splits}
    what = (f"linear CTC head on {cfg.n_mels} log-mels, ±{cfg.context} frames stacked, 50 frames/s, "
            f"Adam {cfg.ctc_lr}, greedy decoding" + (" and beam search with a word n-gram" if lm else ""))
    selection = {"epoch": epoch, "selected_on": task.dev or "last epoch", "train_loss": round(train_loss, 4),
                 "n_train": len(frames)}
    return what, outputs, selection


def run_baseline(cfg: BaselineConfig, out_dir: str | Path, extra: tuple[str, ...] = (),
                 lm: str | Path | None = None, decode_workers: int = 1) -> list[dict]:
    """Fit the task's raw-feature baseline on its training split and score it on every test split (and the `extra`
    test sets); one JSON per split in `out_dir`. CTC tasks are also decoded with the language model folder `lm`, in
    `decode_workers` processes."""
    task = TASKS[cfg.task]
    require_extra_tests(cfg.task, extra)
    require_ctc_for_lm(cfg.task, lm)
    splits = [*task.tests, *extra]
    if task.kind == "ctc":
        what, outputs, selection = ctc_baseline(cfg, splits, lm, decode_workers)
    else:
        fit = similarity_baseline if task.kind == "regression" else classical_baseline
        what, outputs, selection = fit(cfg, splits)
    results = []
    for split in splits:
        preds, refs, *lm_fields = outputs[split]
        result = with_lm_fields(result_record(cfg, split, preds, refs, init=RAW, mode="baseline", baseline=what,
                                              selection=selection, recipe={"baseline": recipe.BASELINE}),
                                lm_fields[0] if lm_fields else {})
        atomic_write_json(Path(out_dir) / eval_file_name(cfg.task, split), result)
        results.append(result)
    return results
