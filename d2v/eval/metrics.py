"""Benchmark metrics, implemented here (numpy only) and checked in tests against jiwer, scikit-learn and scipy:
top-1 accuracy, WER, Matthews correlation, F1, Pearson and Spearman, and for multi-label tagging (AudioSet) mean
average precision and mean ROC AUC; plus greedy CTC decoding and a check for outputs that ignore the input
(`prediction_stats`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    _same_length(pred, gold)
    return float((pred == gold).mean())


def f1_binary(pred, gold, positive: int = 1) -> float:
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp, fp, fn = np.sum(pred & gold), np.sum(pred & ~gold), np.sum(~pred & gold)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(pred, gold) -> float:
    """Multi-class MCC (Gorodkin's R_K), as GLUE reports for CoLA; 0 when undefined."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    _same_length(pred, gold)
    labels = np.union1d(pred, gold)
    index = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.float64)
    np.add.at(cm, ([index[g] for g in gold], [index[p] for p in pred]), 1)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    _same_length(x, y)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def _scored_classes(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) scores and 0/1 targets as arrays, checked."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"expected (clips, classes) scores and targets of one shape, got {scores.shape} and "
                         f"{targets.shape}")
    _same_length(scores, targets)
    return scores, targets > 0.5


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall steps of one class: Σ (R_n − R_n−1)·P_n over the distinct score thresholds
    (tied scores form one threshold), as sklearn's average_precision_score. NaN when the class has no positive."""
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[last_of_tie]
    precision, recall = tp / (last_of_tie + 1), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, targets) -> float:
    """AudioSet's mAP: the mean AP over the classes with at least one positive clip (a class without one has no
    AP; the eval set has positives for all 527)."""
    scores, positive = _scored_classes(scores, targets)
    per_class = [average_precision(scores[:, c], positive[:, c]) for c in range(scores.shape[1])]
    return _mean_defined(per_class, "positive")


def mean_roc_auc(scores, targets) -> float:
    """Mean ROC AUC over the classes with positives and negatives: per class, the Mann-Whitney U of the positive
    clips' score ranks (ties share ranks) over positives × negatives."""
    scores, positive = _scored_classes(scores, targets)
    per_class = []
    for c in range(scores.shape[1]):
        pos = int(positive[:, c].sum())
        neg = len(scores) - pos
        if pos == 0 or neg == 0:
            per_class.append(float("nan"))
            continue
        ranks = _ranks(scores[:, c])
        per_class.append(float((ranks[positive[:, c]].sum() - pos * (pos + 1) / 2) / (pos * neg)))
    return _mean_defined(per_class, "positive and a negative")


def _mean_defined(per_class: list[float], needs: str) -> float:
    defined = [v for v in per_class if not np.isnan(v)]
    if not defined:
        raise ValueError(f"no class has a {needs} clip: nothing to score")
    return float(np.mean(defined))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two token sequences (one row of the DP table at a time)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate: total word edits / total reference words (LibriSpeech convention)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    edits = sum(edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    words = sum(len(r.split()) for r in references)
    if words == 0:
        raise ValueError("references contain no words")
    return edits / words


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate, inner spaces included, ends stripped (jiwer's convention). It moves before WER
    does while a CTC model is still learning to spell, so it separates two runs that both sit at WER 1."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    hypotheses, references = [h.strip() for h in hypotheses], [r.strip() for r in references]
    chars = sum(len(r) for r in references)
    if chars == 0:
        raise ValueError("references contain no characters")
    return sum(edit_distance(h, r) for h, r in zip(hypotheses, references)) / chars


def ctc_greedy(logits: np.ndarray, lengths: Sequence[int] | None = None, blank: int = 0) -> list[list[int]]:
    """Best path per utterance: argmax per frame, merge repeats, drop blanks. logits: (B, T, V)."""
    best = np.asarray(logits).argmax(-1)
    out = []
    for i, path in enumerate(best):
        path = path[: lengths[i]] if lengths is not None else path
        merged = path[np.r_[True, path[1:] != path[:-1]]] if len(path) else path
        out.append([int(t) for t in merged if t != blank])
    return out


def greedy_transcripts(logits: Sequence[np.ndarray], letters) -> list[str]:
    """The best-path transcript of each utterance's (frames, letters) logits; `letters` decodes label ids."""
    return [letters.decode(ctc_greedy(x[None])[0]) for x in logits]


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} labels")
    if len(a) == 0:
        raise ValueError("no examples to score")


LOWER_IS_BETTER = frozenset({"wer", "cer", "wer_lm", "cer_lm"})  # error rates (greedy, LM-decoded); every other
# metric is better when higher


def oriented(metric: str, value: float) -> float:
    """`value` with its sign turned so that higher is better (error rates negated)."""
    return -value if metric in LOWER_IS_BETTER else value

TASK_METRICS = {
    "wer": wer,  # transcripts: (hypotheses, references)
    "cer": cer,
    "accuracy": lambda p, g: accuracy(p, g),
    "f1": lambda p, g: f1_binary(p, g),
    "mcc": lambda p, g: matthews_corrcoef(p, g),
    "pearson": lambda p, g: pearson(p, g),
    "spearman": lambda p, g: spearman(p, g),
    # GLUE's combined scores (spec §9.3): MRPC and QQP report the mean of accuracy and F1, STS-B of the correlations
    "acc_and_f1": lambda p, g: (accuracy(p, g) + f1_binary(p, g)) / 2,
    "pearson_and_spearman": lambda p, g: (pearson(p, g) + spearman(p, g)) / 2,
    # tagging: (per-clip class scores, per-clip 0/1 targets)
    "map": mean_average_precision,
    "mauc": mean_roc_auc,
}


def prediction_stats(kind: str, preds: Sequence, refs: Sequence) -> dict:
    """How varied a model's outputs are, beside its metrics: a classifier that predicts one class everywhere scores
    its label prior, a CTC model on the blank plateau emits empty transcripts (WER 1.0), a constant regressor has no
    correlation. `degenerate` says the output did not depend on the input at all."""
    if kind == "classification":
        top = Counter(refs).most_common(1)[0][1]
        stats = {"classes_predicted": len(set(preds)), "majority_share": top / len(refs)}
        stats["degenerate"] = stats["classes_predicted"] == 1
    elif kind == "ctc":
        stats = {"empty_share": sum(not h.strip() for h in preds) / len(preds)}
        stats["degenerate"] = len(set(preds)) == 1
    elif kind == "tagging":  # per-clip score vectors: the mean number of labels beside how many clips differ
        scores, targets = np.asarray(preds, np.float64), np.asarray(refs)
        stats = {"labels_per_clip": float(targets.sum(1).mean()),
                 "classes_with_positives": int((targets.sum(0) > 0).sum())}
        stats["degenerate"] = bool(len(scores) > 1 and np.all(scores == scores[0]))
    elif kind == "regression":
        # a correlation ignores scale, so a small spread can still rank well; the labels' spread is beside it
        stats = {"std": float(np.std(np.asarray(preds, dtype=np.float64))),
                 "reference_std": float(np.std(np.asarray(refs, dtype=np.float64)))}
        stats["degenerate"] = stats["std"] == 0.0
    else:
        raise ValueError(f"unknown task kind {kind!r}; expected classification, ctc, regression or tagging")
    return stats


def scored_in_part(result: dict) -> bool:
    """Whether an evaluation JSON scored other than its whole split (`n` against the index's `n_split`): samples
    that failed to decode were skipped. JSONs written before `n_split` existed are taken as whole."""
    return "n_split" in result and result["n"] != result["n_split"]
