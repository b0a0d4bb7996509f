"""Offline relevance metrics as pure functions: arrays in, arrays or frozen dataclasses out.

Conventions
- Labels are integer indices into the label set's order (best first); `n_classes` is its length.
- Confusion matrices have gold labels on rows and predicted labels on columns.
- Functions documented with a leading batch shape `...` take sufficient statistics summed over a
  (re)sample of queries: one bootstrap replicate is one weighted sum, and the point estimate is the
  same function on the plain sum (weights of one). ROC-AUC and average precision start from
  per-query counts at each distinct score (`ranked_counts`), weighted the same way.
- A ratio with a zero denominator is 0 for per-class precision/recall/F1 (scikit-learn's
  `zero_division=0`) and NaN for whole-metric values that are undefined (AUC with one class, the
  NDCG of a query with no gain).

Algorithmic choices
- Macro-F1 averages F1 over the labels present in the gold or the predicted labels of the sample
  (scikit-learn's `labels=None`), so a label absent from a segment does not count as F1 = 0. This is
  the project's one definition: training validation, benchmarks and evaluation all call
  `scores_from_confusion` (label strings through `label_scores`). A pair whose prediction is no label
  of the set (an unparsed CoT) counts against its gold label's recall and predicts no label.
- ROC-AUC counts ties as one half; PR-AUC is average precision (step interpolation, one step per
  distinct score), both as in scikit-learn.
- NDCG@k uses linear gains from the label set and the log2 discount 1/log2(rank + 1); products with
  equal predicted scores share the average discount of the ranks they occupy (McSherry and Najork,
  2008; scikit-learn's default), so a model that ties everything is not rewarded by input order.
- Calibration is top-label: the confidence of the predicted label against whether it is right,
  in `ECE_BINS` = 15 equal-width bins (i/15, (i+1)/15] (the first bin also holds 0); ECE is
  sum over bins of |accuracy - mean confidence| weighted by the bin's share of pairs.
- McNemar uses the exact binomial test when fewer than 25 pairs disagree and the chi-square
  test with continuity correction otherwise; it treats pairs as independent, which pairs of one
  query are not, so the query bootstrap is the comparison to trust, McNemar a second opinion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse, stats

ECE_BINS = 15
MCNEMAR_EXACT_BELOW = 25


def ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator elementwise, `empty` where the denominator is 0."""
    denominator = np.asarray(denominator, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, np.asarray(numerator, float) / denominator, empty)


# ---------------------------------------------------------------- classification (multi-class)


def per_query_confusion(
    query_index: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_queries: int, n_classes: int
) -> np.ndarray:
    """Confusion matrix of each query: `(n_queries, C, C)` counts, gold on rows.

    `query_index`, `y_true`, `y_pred`: `(N,)` ints; every pair counted once under its query.
    """
    flat = (np.asarray(query_index) * n_classes + np.asarray(y_true)) * n_classes + np.asarray(y_pred)
    counts = np.bincount(flat, minlength=n_queries * n_classes * n_classes)
    return counts.reshape(n_queries, n_classes, n_classes)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """`(C, C)` counts, gold on rows, predicted on columns."""
    return per_query_confusion(np.zeros(len(y_true), dtype=int), y_true, y_pred, 1, n_classes)[0]


@dataclass(frozen=True)
class ClassScores:
    """Scores of confusion matrices with batch shape `...`.

    accuracy, macro_f1: `(...)`; precision, recall, f1, support: `(..., C)`.
    """

    accuracy: np.ndarray
    macro_f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def scores_from_confusion(confusion: np.ndarray, unlabelled: np.ndarray | None = None) -> ClassScores:
    """Accuracy, macro-F1 and per-class precision/recall/F1 of `(..., C, C)` confusion matrices.

    `unlabelled`: `(..., C)` counts of gold pairs whose prediction is no label of the set (an
    unparsed CoT); they are wrong, count in each gold label's support and predict nothing.
    """
    confusion = np.asarray(confusion, dtype=float)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(axis=-1) + (0.0 if unlabelled is None else np.asarray(unlabelled, dtype=float))
    predicted = confusion.sum(axis=-2)
    total = support.sum(axis=-1)
    f1 = ratio(2 * true_positive, support + predicted, 0.0)
    present = (support + predicted) > 0
    return ClassScores(
        accuracy=ratio(true_positive.sum(axis=-1), total, np.nan),
        macro_f1=ratio((f1 * present).sum(axis=-1), present.sum(axis=-1), np.nan),
        precision=ratio(true_positive, predicted, 0.0),
        recall=ratio(true_positive, support, 0.0),
        f1=f1,
        support=support,
    )


def label_scores(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> ClassScores:
    """`scores_from_confusion` of label strings: `labels` is the label set's order, every gold label
    is one of them, and a prediction outside them (None, an unparsed CoT) is an unlabelled pair."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({label for label in gold if label not in index})
    if unknown:
        raise ValueError(f"label_scores: gold labels {unknown} are not in the label set {list(labels)}")
    n_classes = len(labels)
    confusion = np.zeros((n_classes, n_classes))
    unlabelled = np.zeros(n_classes)
    for truth, guess in zip(gold, predicted, strict=True):
        if guess in index:
            confusion[index[truth], index[guess]] += 1
        else:
            unlabelled[index[truth]] += 1
    return scores_from_confusion(confusion, unlabelled)


# ---------------------------------------------------------------- binary view (relevant vs not)


def binary_confusion(confusion: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Collapse `(..., C, C)` confusion matrices to `(..., 2, 2)`: index 1 = relevant, 0 = not.

    `relevant`: `(C,)` bool, which labels count as relevant (the label set's `relevant`).
    """
    membership = np.stack([~np.asarray(relevant, bool), np.asarray(relevant, bool)], axis=1).astype(float)
    return np.einsum("ca,...cd,db->...ab", membership, np.asarray(confusion, float), membership)


@dataclass(frozen=True)
class BinaryScores:
    """Accuracy and the relevant class's precision, recall, F1, batch shape `...`."""

    accuracy: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


def binary_scores(confusion2: np.ndarray) -> BinaryScores:
    """Scores of `(..., 2, 2)` relevant-vs-not confusion matrices (positive class = index 1)."""
    scores = scores_from_confusion(confusion2)
    return BinaryScores(
        accuracy=scores.accuracy,
        precision=scores.precision[..., 1],
        recall=scores.recall[..., 1],
        f1=scores.f1[..., 1],
    )


@dataclass(frozen=True)
class RankedCounts:
    """Positive and negative pairs per (query, distinct score), scores highest first.

    positive, negative: sparse `(n_queries, G)` counts; `weights @ positive` gives the weighted
    positives per distinct score of a replicate without materialising per-pair weights.
    """

    positive: sparse.csr_matrix
    negative: sparse.csr_matrix


def ranked_counts(query_index: np.ndarray, score: np.ndarray, positive: np.ndarray, n_queries: int) -> RankedCounts:
    """Count each query's positive and negative pairs at each distinct score (`(N,)` inputs)."""
    score = np.asarray(score, float)
    positive = np.asarray(positive, bool)
    distinct, inverse = np.unique(-score, return_inverse=True)  # ascending -score: highest score first
    shape = (n_queries, len(distinct))

    def counts(mask: np.ndarray) -> sparse.csr_matrix:
        ones = np.ones(int(mask.sum()))
        return sparse.csr_matrix((ones, (np.asarray(query_index)[mask], inverse[mask])), shape=shape)

    return RankedCounts(counts(positive), counts(~positive))


def roc_auc_and_average_precision(counts: RankedCounts, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision (PR-AUC) per row of query weights `(B, n_queries)`.

    Returns two `(B,)` arrays; AUC is NaN with one class only, average precision without positives.
    """
    weights = np.atleast_2d(np.asarray(weights, float))
    true_positive = (counts.positive.T @ weights.T).T  # (B, G), highest score first
    false_positive = (counts.negative.T @ weights.T).T
    cum_tp = np.cumsum(true_positive, axis=1)
    positives, negatives = true_positive.sum(axis=1), false_positive.sum(axis=1)
    concordant = (false_positive * (cum_tp - 0.5 * true_positive)).sum(axis=1)
    precision = ratio(cum_tp, cum_tp + np.cumsum(false_positive, axis=1), 0.0)
    return (
        ratio(concordant, positives * negatives, np.nan),
        ratio((true_positive * precision).sum(axis=1), positives, np.nan),
    )


# ---------------------------------------------------------------- ranking


def ndcg_per_query(
    query_index: np.ndarray, score: np.ndarray, gain: np.ndarray, n_queries: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tie-averaged NDCG@k of each query, ranking its pairs by `score` (highest first).

    query_index, score, gain: `(N,)`. Returns `(ndcg, defined)`, both `(n_queries,)`; a query
    without pairs or whose pairs all have gain 0 is undefined (NaN in `ndcg`).
    """
    query_index = np.asarray(query_index, int)
    score = np.asarray(score, float)
    gain = np.asarray(gain, float)
    query_start = np.r_[0, np.cumsum(np.bincount(query_index, minlength=n_queries))[:-1]]

    def discounts(order: np.ndarray) -> np.ndarray:
        rank = np.arange(len(order)) - query_start[query_index[order]]  # 0-based rank within the query
        return np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)

    order = np.lexsort((-score, query_index))
    sorted_query, sorted_score = query_index[order], score[order]
    new_group = np.ones(len(order), dtype=bool)  # a new tie group starts: new query or new score
    new_group[1:] = (sorted_query[1:] != sorted_query[:-1]) | (sorted_score[1:] != sorted_score[:-1])
    group = np.cumsum(new_group) - 1
    group_size = np.bincount(group)
    group_gain = np.bincount(group, weights=gain[order]) / group_size
    group_discount = np.bincount(group, weights=discounts(order))
    dcg = np.bincount(sorted_query[new_group], weights=group_gain * group_discount, minlength=n_queries)

    ideal_order = np.lexsort((-gain, query_index))
    ideal = np.bincount(
        query_index[ideal_order], weights=gain[ideal_order] * discounts(ideal_order), minlength=n_queries
    )
    return ratio(dcg, ideal, np.nan), ideal > 0


# ---------------------------------------------------------------- calibration


def per_query_calibration_bins(
    query_index: np.ndarray, confidence: np.ndarray, correct: np.ndarray, n_queries: int, n_bins: int = ECE_BINS
) -> np.ndarray:
    """`(n_queries, n_bins, 3)`: per query and bin, [pairs, sum of confidence, sum of correct]."""
    confidence = np.asarray(confidence, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_index = np.searchsorted(edges[1:-1], confidence, side="left")
    flat = np.asarray(query_index) * n_bins + bin_index
    size = n_queries * n_bins
    columns = [
        np.bincount(flat, minlength=size),
        np.bincount(flat, weights=confidence, minlength=size),
        np.bincount(flat, weights=np.asarray(correct, float), minlength=size),
    ]
    return np.stack(columns, axis=-1).reshape(n_queries, n_bins, 3)


def expected_calibration_error(bins: np.ndarray) -> np.ndarray:
    """ECE of `(..., n_bins, 3)` bin sums: sum over bins |correct - confidence| / pairs."""
    bins = np.asarray(bins, float)
    gap = np.abs(bins[..., 2] - bins[..., 1]).sum(axis=-1)
    return ratio(gap, bins[..., 0].sum(axis=-1), np.nan)


@dataclass(frozen=True)
class Reliability:
    """The reliability diagram's data: per bin its edges, pair count, mean confidence, accuracy."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    count: tuple[int, ...]
    mean_confidence: tuple[float, ...]
    accuracy: tuple[float, ...]


def reliability(bins: np.ndarray) -> Reliability:
    """Reliability diagram of `(n_bins, 3)` bin sums (empty bins have NaN confidence/accuracy)."""
    bins = np.asarray(bins, float)
    edges = np.linspace(0.0, 1.0, len(bins) + 1)
    return Reliability(
        lower=tuple(edges[:-1].tolist()),
        upper=tuple(edges[1:].tolist()),
        count=tuple(int(c) for c in bins[:, 0]),
        mean_confidence=tuple(ratio(bins[:, 1], bins[:, 0], np.nan).tolist()),
        accuracy=tuple(ratio(bins[:, 2], bins[:, 0], np.nan).tolist()),
    )


# ---------------------------------------------------------------- paired test on accuracy


@dataclass(frozen=True)
class McNemar:
    """McNemar's test: `only_a` pairs only model A got right, `only_b` only model B."""

    only_a: int
    only_b: int
    statistic: float
    p_value: float
    method: str


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test on the same pairs' correctness under two models (`(N,)` bools each)."""
    correct_a = np.asarray(correct_a, bool)
    correct_b = np.asarray(correct_b, bool)
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    if discordant < MCNEMAR_EXACT_BELOW:
        smaller = min(only_a, only_b)
        p_value = min(1.0, 2.0 * stats.binom.cdf(smaller, discordant, 0.5))
        return McNemar(only_a, only_b, float(smaller), float(p_value), "exact binomial")
    statistic = (abs(only_a - only_b) - 1.0) ** 2 / discordant
    return McNemar(only_a, only_b, statistic, float(stats.chi2.sf(statistic, 1)), "chi-square, continuity-corrected")
