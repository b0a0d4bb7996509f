"""Metrics against scikit-learn / statsmodels on seeded random inputs, and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from evaluation import metrics as M

SEEDS = [0, 1, 2, 3]


def random_labels(seed: int, n: int = 300, n_classes: int = 4):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, n_classes, n))
    return y_true, y_pred


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_matches_sklearn(seed):
    y_true, y_pred = random_labels(seed)
    confusion = M.confusion_matrix(y_true, y_pred, 4)
    scores = M.scores_from_confusion(confusion)
    np.testing.assert_array_equal(confusion, skm.confusion_matrix(y_true, y_pred, labels=range(4)))
    assert scores.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert scores.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=range(4), zero_division=0
    )
    np.testing.assert_allclose(scores.precision, precision)
    np.testing.assert_allclose(scores.recall, recall)
    np.testing.assert_allclose(scores.f1, f1)
    np.testing.assert_array_equal(scores.support, support)


def test_macro_f1_averages_present_labels_like_sklearn():
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 0, 0])  # labels 2 and 3 never occur
    scores = M.scores_from_confusion(M.confusion_matrix(y_true, y_pred, 4))
    assert scores.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert scores.macro_f1 == pytest.approx(2 / 3)  # both present labels: P = R = 2/3


def test_classification_hand_worked():
    # gold [E, E, P, I], predicted [E, P, P, I]
    scores = M.scores_from_confusion(M.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3))
    assert scores.accuracy == pytest.approx(0.75)
    np.testing.assert_allclose(scores.precision, [1.0, 0.5, 1.0])
    np.testing.assert_allclose(scores.recall, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(scores.f1, [2 / 3, 2 / 3, 1.0])
    assert scores.macro_f1 == pytest.approx(7 / 9)


def test_batched_confusion_scores_equal_one_at_a_time():
    batch = np.stack([M.confusion_matrix(*random_labels(seed), 4) for seed in SEEDS])
    batched = M.scores_from_confusion(batch)
    for i, confusion in enumerate(batch):
        single = M.scores_from_confusion(confusion)
        assert batched.macro_f1[i] == pytest.approx(single.macro_f1)
        np.testing.assert_allclose(batched.f1[i], single.f1)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_view_matches_sklearn(seed):
    y_true, y_pred = random_labels(seed)
    relevant = np.array([True, True, False, False])
    binary = M.binary_scores(M.binary_confusion(M.confusion_matrix(y_true, y_pred, 4), relevant))
    t, p = relevant[y_true], relevant[y_pred]
    assert binary.accuracy == pytest.approx(skm.accuracy_score(t, p))
    assert binary.precision == pytest.approx(skm.precision_score(t, p))
    assert binary.recall == pytest.approx(skm.recall_score(t, p))
    assert binary.f1 == pytest.approx(skm.f1_score(t, p))


def auc_and_ap(score, positive, weights=None):
    """Pair-level ROC-AUC and AP: every pair is its own 'query' with weight `weights` (default 1)."""
    n = len(score)
    counts = M.ranked_counts(np.arange(n), score, positive, n)
    weights = np.ones((1, n)) if weights is None else np.atleast_2d(weights)
    return M.roc_auc_and_average_precision(counts, weights)


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_and_average_precision_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 400
    positive = rng.random(n) < 0.4
    score = np.round(rng.random(n) * 0.6 + 0.4 * positive, 2)  # rounding makes ties
    auc, ap = auc_and_ap(score, positive)
    assert auc[0] == pytest.approx(skm.roc_auc_score(positive, score))
    assert ap[0] == pytest.approx(skm.average_precision_score(positive, score))
    weights = rng.integers(0, 4, size=(3, n)).astype(float)
    auc, ap = auc_and_ap(score, positive, weights)
    for row, (auc_row, ap_row) in enumerate(zip(auc, ap)):
        assert auc_row == pytest.approx(skm.roc_auc_score(positive, score, sample_weight=weights[row]))
        assert ap_row == pytest.approx(skm.average_precision_score(positive, score, sample_weight=weights[row]))


def test_query_weights_equal_pair_weights_of_their_queries():
    rng = np.random.default_rng(9)
    query_index = rng.integers(0, 12, 200)
    score, positive = rng.random(200).round(1), rng.random(200) < 0.5
    weights = rng.integers(0, 3, size=(4, 12)).astype(float)
    by_query = M.ranked_counts(query_index, score, positive, 12)
    for mine, by_pairs in zip(
        M.roc_auc_and_average_precision(by_query, weights), auc_and_ap(score, positive, weights[:, query_index])
    ):
        np.testing.assert_allclose(mine, by_pairs)


def test_auc_hand_worked_and_undefined():
    score = np.array([0.9, 0.8, 0.8, 0.1])
    positive = np.array([True, False, True, False])
    auc, ap = auc_and_ap(score, positive)
    # (pos, neg) pairs: 0.9>0.8, 0.9>0.1, 0.8=0.8 (one half), 0.8>0.1 -> 3.5 / 4
    assert auc[0] == pytest.approx(0.875)
    # thresholds 0.9: P=1, recall 1/2; 0.8: P=2/3, recall 2/2 -> 1/2 * 1 + 1/2 * 2/3
    assert ap[0] == pytest.approx(5 / 6)
    assert np.isnan(auc_and_ap(score, np.ones(4, bool))[0][0])
    assert np.isnan(auc_and_ap(score, np.zeros(4, bool))[1][0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_ndcg_per_query_matches_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, size=20)
    query_index = np.repeat(np.arange(20), sizes)
    rng.shuffle(query_index)  # pairs of a query need not be contiguous
    gain = rng.choice([0.0, 0.5, 1.0], size=len(query_index))
    score = rng.choice([0.1, 0.3, 0.5, 0.9], size=len(query_index))  # many ties
    ndcg, defined = M.ndcg_per_query(query_index, score, gain, 20, k)
    for q in range(20):
        mine = query_index == q
        if gain[mine].sum() == 0:
            assert not defined[q] and np.isnan(ndcg[q])
            continue
        expected = skm.ndcg_score(gain[mine][None], score[mine][None], k=k)
        assert ndcg[q] == pytest.approx(expected)


def test_ndcg_hand_worked():
    # ranking by score: gains 0.5 (rank 1), 0 (rank 2), 1 (rank 3): DCG = 0.5 + 1/log2(4) = 1.0
    # ideal: 1 + 0.5/log2(3)
    ndcg, _ = M.ndcg_per_query(np.zeros(3, int), np.array([0.2, 0.9, 0.5]), np.array([1.0, 0.5, 0.0]), 1, 10)
    assert ndcg[0] == pytest.approx(1.0 / (1.0 + 0.5 / np.log2(3)))
    # a tie over ranks 1-2 with k=1: the tied pair shares discount (1 + 0) / 2, mean gain 1/2 ... = 0.5
    tied, _ = M.ndcg_per_query(np.zeros(2, int), np.array([0.7, 0.7]), np.array([1.0, 0.0]), 1, 1)
    assert tied[0] == pytest.approx(0.5)


def reference_ece(confidence, correct, n_bins):
    """ECE from scikit-learn's calibration_curve (uniform bins) and a histogram of pair counts."""
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(accuracy - mean_confidence)) / len(confidence))


@pytest.mark.parametrize("seed", SEEDS)
def test_ece_matches_calibration_curve(seed):
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.34, 1.0, 500)
    correct = rng.random(500) < confidence**1.5
    bins = M.per_query_calibration_bins(rng.integers(0, 7, 500), confidence, correct, 7)
    assert M.expected_calibration_error(bins.sum(axis=0)) == pytest.approx(reference_ece(confidence, correct, 15))
    curve = M.reliability(bins.sum(axis=0))
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    filled = np.array(curve.count) > 0
    np.testing.assert_allclose(np.array(curve.accuracy)[filled], accuracy)
    np.testing.assert_allclose(np.array(curve.mean_confidence)[filled], mean_confidence)


def test_ece_hand_worked():
    # bin (14/15, 1]: confidences 0.95, 0.95, one right -> |0.5 - 0.95|; bin (8/15, 9/15]: 0.55, 0.55,
    # both right -> |1 - 0.55|; each bin holds half the pairs -> ECE = 0.45
    bins = M.per_query_calibration_bins(np.zeros(4, int), np.array([0.95, 0.95, 0.55, 0.55]),
                                        np.array([True, False, True, True]), 1)
    assert M.expected_calibration_error(bins[0]) == pytest.approx(0.45)


@pytest.mark.parametrize("only_a,only_b", [(3, 9), (0, 0), (10, 12), (20, 35), (40, 12)])
def test_mcnemar_matches_statsmodels(only_a, only_b):
    both, neither = 50, 7
    correct_a = np.r_[np.ones(both), np.ones(only_a), np.zeros(only_b), np.zeros(neither)].astype(bool)
    correct_b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)].astype(bool)
    result = M.mcnemar(correct_a, correct_b)
    table = [[both, only_a], [only_b, neither]]
    exact = only_a + only_b < 25
    expected = sm_mcnemar(table, exact=exact, correction=True)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.statistic == pytest.approx(expected.statistic)


def test_mcnemar_hand_worked():
    # 3 vs 9 discordant: exact two-sided p = 2 * P(X <= 3 | n=12, 1/2) = 2 * (1 + 12 + 66 + 220) / 4096
    result = M.mcnemar(np.r_[np.ones(3), np.zeros(9)].astype(bool), np.r_[np.zeros(3), np.ones(9)].astype(bool))
    assert result.p_value == pytest.approx(2 * 299 / 4096)


def test_label_scores_are_sklearns_over_the_labels_present_and_count_unparsed_predictions_as_wrong():
    rng = np.random.default_rng(5)
    names = ["Exact", "Partial", "Irrelevant"]
    for _ in range(100):
        n = int(rng.integers(1, 40))
        gold = [names[i] for i in rng.integers(0, int(rng.integers(1, 4)), n)]
        predicted = [[*names, None][i] for i in rng.integers(0, 4, n)]
        shown = [label or "<none>" for label in predicted]  # an unparsed CoT: a prediction of no label
        present = [name for name in names if name in gold or name in shown]
        scores = M.label_scores(gold, predicted, names)
        assert scores.macro_f1 == pytest.approx(skm.f1_score(gold, shown, labels=present, average="macro", zero_division=0))
        assert scores.accuracy == pytest.approx(skm.accuracy_score(gold, shown))
