"""Metrics against the reference libraries, greedy CTC decoding on hand-made logits, and the check for outputs that
ignore the input."""
import jiwer
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from d2v.eval.metrics import (TASK_METRICS, accuracy, cer, ctc_greedy, f1_binary, matthews_corrcoef, pearson,
                              prediction_stats, spearman, wer)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    assert accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred))
    assert f1_binary(pred, gold) == pytest.approx(skm.f1_score(gold, pred))
    assert matthews_corrcoef(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred))
    gold3, pred3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert matthews_corrcoef(pred3, gold3) == pytest.approx(skm.matthews_corrcoef(gold3, pred3))


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn's, on the case tested
def test_degenerate_cases_match_sklearn():
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == skm.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy_including_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    y_ties = np.round(y)  # many ties: average ranks matter
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert spearman(x, y_ties) == pytest.approx(stats.spearmanr(x, y_ties).statistic)


def test_glue_combined_scores_are_the_means_of_the_reference_values():
    rng = np.random.default_rng(7)
    gold = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, gold, 1 - gold)
    expected = (skm.accuracy_score(gold, pred) + skm.f1_score(gold, pred)) / 2  # MRPC, QQP
    assert TASK_METRICS["acc_and_f1"](pred, gold) == pytest.approx(expected)
    x = rng.normal(size=200)
    y = np.round(x + rng.normal(size=200), 1)
    expected = (stats.pearsonr(x, y).statistic + stats.spearmanr(x, y).statistic) / 2  # STS-B
    assert TASK_METRICS["pearson_and_spearman"](x, y) == pytest.approx(expected)


def test_wer_matches_jiwer():
    refs = ["THE CAT SAT ON THE MAT", "HELLO WORLD", "A B C D"]
    hyps = ["THE CAT SAT ON MAT", "HELLO WORD THERE", "A X C D E"]
    assert wer(hyps, refs) == pytest.approx(jiwer.wer(refs, hyps))
    rng = np.random.default_rng(0)
    words = np.array("A B C D E F G".split())
    refs = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(50)]
    hyps = [" ".join(rng.choice(words, rng.integers(0, 12))) for _ in range(50)]
    assert wer(hyps, refs) == pytest.approx(jiwer.wer(refs, hyps))


def test_cer_matches_jiwer_and_separates_what_wer_cannot():
    refs = ["THE CAT SAT", "HELLO  WORLD", "A B"]
    hyps = ["THE CAT SAD", "HELO WORLD", ""]
    assert cer(hyps, refs) == pytest.approx(jiwer.cer(refs, hyps))
    rng = np.random.default_rng(1)
    refs = ["".join(rng.choice(list("AB C"), rng.integers(1, 20))) for _ in range(40)]
    hyps = ["".join(rng.choice(list("AB C"), rng.integers(0, 20))) for _ in range(40)]
    assert cer(hyps, refs) == pytest.approx(jiwer.cer(refs, hyps))
    # both hypotheses get every word wrong, but the second has learned to spell most of it
    assert wer(["XX"], ["CAT"]) == wer(["CT"], ["CAT"]) == 1.0
    assert cer(["CT"], ["CAT"]) < cer(["XX"], ["CAT"])
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        cer(["A", "B"], ["A"])


def test_ctc_greedy_merges_repeats_then_drops_blanks():
    # frames:  a a _ a b b _ _ b  -> "a a b b" (a blank separates the repeated a's and b's)
    path = [1, 1, 0, 1, 2, 2, 0, 0, 2]
    logits = np.full((1, len(path), 3), -5.0)
    logits[0, np.arange(len(path)), path] = 5.0
    assert ctc_greedy(logits) == [[1, 1, 2, 2]]
    assert ctc_greedy(logits, lengths=[4]) == [[1, 1]]  # frames past the length are padding
    assert ctc_greedy(np.zeros((1, 3, 3))) == [[]]  # all-blank argmax


def test_prediction_stats_flag_outputs_that_ignore_the_input():
    prior = prediction_stats("classification", [1, 1, 1, 1], [1, 0, 1, 1])
    assert prior == {"classes_predicted": 1, "majority_share": 0.75, "degenerate": True}
    assert not prediction_stats("classification", [1, 0, 1, 1], [1, 1, 1, 1])["degenerate"]  # a mistake is not
    blank = prediction_stats("ctc", ["", "", ""], ["a b", "c", "d"])
    assert blank == {"empty_share": 1.0, "degenerate": True}
    one_word = prediction_stats("ctc", ["the", "the", "the"], ["a b", "c", "d"])  # not empty, still constant
    assert one_word["empty_share"] == 0.0 and one_word["degenerate"]
    assert prediction_stats("ctc", ["", "a", ""], ["a", "a", "b"]) == {"empty_share": 2 / 3, "degenerate": False}
    assert prediction_stats("regression", [0.3, 0.3], [1.0, 2.0]) == {"std": 0.0, "reference_std": 0.5,
                                                                      "degenerate": True}
    assert not prediction_stats("regression", [0.3, 0.4], [1.0, 2.0])["degenerate"]
    with pytest.raises(ValueError, match="unknown task kind 'ranking'"):
        prediction_stats("ranking", [0], [0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tagging_map_and_auc_match_sklearn_including_ties_and_classes_without_positives(seed):
    """AudioSet's metrics: per-class AP and ROC AUC averaged over the classes that have positives (and, for AUC,
    negatives); scores rounded to one decimal so that many clips tie."""
    from d2v.eval.metrics import mean_average_precision, mean_roc_auc

    rng = np.random.default_rng(seed)
    targets = (rng.random((60, 7)) < 0.2).astype(int)
    targets[:, 3] = 0  # no positive: left out of both means
    targets[:, 5] = 1  # no negative: in the mAP, not in the AUC
    scores = np.round(rng.random((60, 7)) + 0.5 * targets, 1)
    scored = [c for c in range(7) if targets[:, c].any()]
    ap = np.mean([skm.average_precision_score(targets[:, c], scores[:, c]) for c in scored])
    auc = np.mean([skm.roc_auc_score(targets[:, c], scores[:, c]) for c in scored if not targets[:, c].all()])
    assert mean_average_precision(scores, targets) == pytest.approx(ap, abs=1e-12)
    assert mean_roc_auc(scores, targets) == pytest.approx(auc, abs=1e-12)
    assert TASK_METRICS["map"](list(scores), list(targets)) == pytest.approx(ap, abs=1e-12)  # lists of clip rows
    assert mean_average_precision(targets, targets) == 1.0  # perfect ranking
    with pytest.raises(ValueError, match="one shape"):
        mean_average_precision(scores, targets[:, :6])
    with pytest.raises(ValueError, match="no class has a positive clip"):
        mean_average_precision(scores, np.zeros_like(targets))


def test_prediction_stats_of_tagging_count_labels_and_see_constant_scores():
    refs = [[1, 0, 1], [0, 0, 1], [0, 0, 0]]
    stats = prediction_stats("tagging", [[0.1, 0.2, 0.3]] * 3, refs)
    assert stats == {"labels_per_clip": 1.0, "classes_with_positives": 2, "degenerate": True}
    assert not prediction_stats("tagging", [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]], refs)["degenerate"]
