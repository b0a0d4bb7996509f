"""The query bootstrap: weights, replicate statistics against a slow reference, paired determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from evaluation.bootstrap import bootstrap, resample_weights
from evaluation.evaluate import compare, model_statistic, query_stats
from evaluation.inputs import ScoredPairs
from schemas.graph import LabelSet

WANDS = LabelSet.load("wands")
RELEVANT = np.array([True, True, False])
GAINS = np.array([1.0, 0.5, 0.0])


def scored_pairs(seed: int, n_queries: int = 25, per_query: int = 6, accuracy: float = 0.6) -> ScoredPairs:
    rng = np.random.default_rng(seed)
    n = n_queries * per_query
    gold = rng.integers(0, 3, n)
    label = np.where(rng.random(n) < accuracy, gold, rng.integers(0, 3, n))
    probs = rng.dirichlet(np.ones(3), n)
    probs[np.arange(n), label] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    covered = rng.random(n) < 0.9
    return ScoredPairs(
        query_id=np.array([f"q{i // per_query}" for i in range(n)], dtype=object),
        product_id=np.array([f"p{i}" for i in range(n)], dtype=object),
        gold=gold,
        covered=covered,
        label=np.where(covered, label, -1),
        probs=np.where(covered[:, None], probs, np.nan),
        expected_gain=np.where(covered, probs @ GAINS, np.nan),
        node_names=("ms",),
        node_correct=np.where(covered, (rng.random(n) < 0.7).astype(float), np.nan)[:, None],
        node_missing=np.zeros((n, 1), bool),
        query_segment=np.full(n, "head", dtype=object),
        product_type=np.full(n, "sofa", dtype=object),
    )


def test_weights_count_query_draws():
    chunks = list(resample_weights(n_queries=7, n_replicates=150, seed=3))
    weights = np.concatenate(chunks)
    assert weights.shape == (150, 7)
    np.testing.assert_array_equal(weights.sum(axis=1), 7)
    assert weights.mean() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(weights, np.concatenate(list(resample_weights(7, 150, seed=3))))


def test_replicate_statistics_equal_metrics_of_the_resampled_pairs():
    """Slow reference: materialise a replicate (repeat each query's pairs by its draw count) and
    score it with scikit-learn; the weighted sufficient statistics must give the same numbers."""
    pairs = scored_pairs(seed=5)
    stats = query_stats(pairs, RELEVANT, GAINS, k=3)
    weights = next(resample_weights(stats.n_queries, 4, seed=11))
    fast = model_statistic(stats, RELEVANT)(weights)
    first_seen = {query: i for i, query in enumerate(dict.fromkeys(pairs.query_id))}  # query_stats' numbering
    query_index = np.array([first_seen[query] for query in pairs.query_id])
    for b, row in enumerate(weights):
        repeat = row[query_index].astype(int) * pairs.covered
        gold, label = np.repeat(pairs.gold, repeat), np.repeat(pairs.label, repeat)
        probs = np.repeat(pairs.probs, repeat, axis=0)
        assert fast["accuracy"][b] == pytest.approx(skm.accuracy_score(gold, label))
        assert fast["macro_f1"][b] == pytest.approx(skm.f1_score(gold, label, average="macro"))
        relevant_score = probs[:, :2].sum(axis=1)
        assert fast["roc_auc"][b] == pytest.approx(skm.roc_auc_score(RELEVANT[gold], relevant_score))
        assert fast["pr_auc"][b] == pytest.approx(skm.average_precision_score(RELEVANT[gold], relevant_score))
        total = np.repeat(np.ones(len(pairs.gold)), row[query_index].astype(int)).sum()
        assert fast["coverage_adjusted_accuracy"][b] == pytest.approx((gold == label).sum() / total)
        node = np.repeat(pairs.node_correct[:, 0], repeat)
        assert fast["node_accuracy"][b][0] == pytest.approx(node.mean())
        # NDCG: mean over drawn queries (with multiplicity) of each query's sklearn NDCG@3
        per_query = {}
        for q in range(stats.n_queries):
            mine = (query_index == q) & pairs.covered
            gains = GAINS[pairs.gold[mine]]
            if mine.sum() > 1 and gains.sum() > 0:
                per_query[q] = skm.ndcg_score(gains[None], pairs.expected_gain[mine][None], k=3)
        drawn = [(row[q], value) for q, value in per_query.items() if row[q] > 0]
        expected = sum(count * value for count, value in drawn) / sum(count for count, _ in drawn)
        assert fast["ndcg"][b] == pytest.approx(expected)


def test_query_resampling_is_wider_than_pair_resampling_when_queries_move_together():
    # 40 queries of 25 pairs; a query's pairs are all right or all wrong
    rng = np.random.default_rng(0)
    right = np.repeat(rng.random(40) < 0.6, 25)
    query_index = np.repeat(np.arange(40), 25)

    def accuracy_over(groups: np.ndarray, n_groups: int):
        right_per_group = np.bincount(groups, weights=right, minlength=n_groups)
        size = np.bincount(groups, minlength=n_groups)
        return lambda w: {"accuracy": (w @ right_per_group) / (w @ size)}

    by_query = bootstrap(accuracy_over(query_index, 40), 40, 1000, seed=1)["accuracy"]
    by_pair = bootstrap(accuracy_over(np.arange(1000), 1000), 1000, 1000, seed=1)["accuracy"]
    assert by_query.estimate == pytest.approx(by_pair.estimate)
    # the clustered standard error is sqrt(25) = 5 times the naive one
    assert (by_query.high - by_query.low) > 3 * (by_pair.high - by_pair.low)


def test_interval_brackets_estimate_and_counts_undefined_replicates():
    weights_seen = []

    def statistic(w):
        weights_seen.append(w)
        value = w[:, 0] / w.sum(axis=1)
        return {"share": value, "sometimes": np.where(w[:, 0] > 0, value, np.nan)}

    intervals = bootstrap(statistic, 4, 500, seed=2)
    assert intervals["share"].low <= intervals["share"].estimate == 0.25 <= intervals["share"].high
    never_drawn = int(sum((w[:, 0] == 0).sum() for w in weights_seen[1:]))
    assert intervals["sometimes"].n_undefined == never_drawn > 0  # (3/4)^4 of replicates miss query 0


def test_paired_comparison_is_deterministic_and_uses_the_same_queries():
    a = scored_pairs(seed=1, accuracy=0.5)
    # b: a copy of a that is right wherever a was wrong on the first query's pairs only
    fixed = (a.query_id == "q0") & a.covered
    b = ScoredPairs(**{**a.__dict__, "label": np.where(fixed, a.gold, a.label)})
    assert (b.label != a.label).any()
    first = compare("a", a, "b", b, WANDS, k=10, n_bootstrap=300, seed=7, level=0.95)
    again = compare("a", a, "b", b, WANDS, k=10, n_bootstrap=300, seed=7, level=0.95)
    other_seed = compare("a", a, "b", b, WANDS, k=10, n_bootstrap=300, seed=8, level=0.95)
    assert first.metrics["macro_f1_difference"] == again.metrics["macro_f1_difference"]
    assert first.metrics["macro_f1_difference"].high != other_seed.metrics["macro_f1_difference"].high
    # same resampled queries for both: b is never worse on accuracy, in any replicate
    accuracy = first.metrics["accuracy_difference"]
    assert accuracy.estimate > 0 and accuracy.low >= 0
    assert first.mcnemar.only_a == 0 and first.mcnemar.only_b == int((a.label[fixed] != a.gold[fixed]).sum())
    itself = compare("a", a, "a2", a, WANDS, k=10, n_bootstrap=100, seed=7, level=0.95)
    d = itself.metrics["macro_f1_difference"]
    assert d.estimate == d.low == d.high == 0.0
    assert "no significant difference" in itself.verdict


def test_paired_comparison_differences_the_nodes_both_models_write():
    a = scored_pairs(seed=3)
    # b: a's node right wherever a had it wrong on the first query's pairs, and the same elsewhere
    fixed = (a.query_id == "q0") & a.covered
    b = ScoredPairs(**{**a.__dict__, "node_correct": np.where(fixed[:, None], 1.0, a.node_correct)})
    result = compare("a", a, "b", b, WANDS, k=10, n_bootstrap=300, seed=7, level=0.95)
    difference = result.metrics["node_accuracy_difference"]
    gained = (a.node_correct[fixed, 0] == 0).sum()
    assert result.node_names == ("ms",) and gained > 0
    assert difference.estimate[0] == pytest.approx(gained / (~np.isnan(a.node_correct[:, 0])).sum())
    assert difference.low[0] >= 0  # the same resampled queries for both: b is never worse on ms
    # a labeller that writes no reasoning (every gold node missing) has no node to compare
    silent = ScoredPairs(**{**a.__dict__, "node_correct": np.where(a.covered, 0.0, np.nan)[:, None], "node_missing": a.covered[:, None]})
    without = compare("a", a, "silent", silent, WANDS, k=10, n_bootstrap=50, seed=7, level=0.95)
    assert without.node_names == () and "node_accuracy_difference" not in without.metrics


def test_verdict_names_the_better_model():
    a = scored_pairs(seed=2, accuracy=0.3)
    b = ScoredPairs(**{**a.__dict__, "label": np.where(a.covered, a.gold, -1)})  # b is always right
    result = compare("a", a, "b", b, WANDS, k=10, n_bootstrap=200, seed=0, level=0.95)
    d = result.metrics["macro_f1_difference"]
    assert result.verdict == (
        f"b - a macro-F1 = {d.estimate:+.3f} [{d.low:.3f}, {d.high:.3f}] (95% CI, 200 query-bootstrap replicates): "
        "b is better"
    )
    reverse = compare("b", b, "a", a, WANDS, k=10, n_bootstrap=200, seed=0, level=0.95)
    assert reverse.verdict.endswith(": b is better") and reverse.verdict.startswith("a - b macro-F1 = -")
