"""Rankers judged offline: NDCG@k, P@k and mean gain on hand-worked lists, scikit-learn's NDCG where the two
definitions meet, the unjudged policies, coverage and what a label source leaves out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score

from evaluation.rankers import (
    RankerInputError,
    evaluate_rankers,
    labels_from_judgments,
    labels_from_relevance,
    list_metrics,
    lists_from_logs,
    lists_from_ranked,
)
from schemas.graph import LabelSet

WANDS = LabelSet.load("wands")


def labels(rows: dict[str, str], query: str = "q1"):
    frame = pd.DataFrame({"query_id": query, "product_id": list(rows), "label": list(rows.values()), "annotator": "r1"})
    return labels_from_judgments(frame, WANDS, "human")


def ranked(lists: dict[str, list[str]], query: str = "q1") -> pd.DataFrame:
    rows = [(query, ranker, rank, product) for ranker, products in lists.items() for rank, product in enumerate(products, start=1)]
    return lists_from_ranked(pd.DataFrame(rows, columns=["query_id", "ranker", "rank", "product_id"]))


# q1 labels: a Exact (1), b Partial (0.5), c Irrelevant (0), d Exact (1); x is unjudged.
# IDCG@3 = 1 + 1/log2(3) + 0.5/log2(4) = 1.880930
LABELS = {"a": "Exact", "b": "Partial", "c": "Irrelevant", "d": "Exact"}
IDCG3 = 1 + 1 / math.log2(3) + 0.5 / 2


def test_hand_worked_metrics_under_both_unjudged_policies():
    lists = ranked({"A": ["a", "b", "x"], "B": ["c", "x", "d"]})
    zero = list_metrics(lists, labels(LABELS).pairs, k=3, unjudged="zero").set_index("ranker")
    # A: 1 + 0.5/log2(3); B: the Exact d at rank 3 -> 1/log2(4); x counts as gain 0 and keeps its rank.
    assert zero.at["A", "ndcg"] == pytest.approx((1 + 0.5 / math.log2(3)) / IDCG3)
    assert zero.at["B", "ndcg"] == pytest.approx(0.5 / IDCG3)
    assert zero.at["A", "precision"] == pytest.approx(2 / 3)
    assert zero.at["B", "precision"] == pytest.approx(1 / 3)
    assert zero.at["A", "mean_gain"] == pytest.approx(1.5 / 3)
    condensed = list_metrics(lists, labels(LABELS).pairs, k=3, unjudged="condense").set_index("ranker")
    # condensed B is (c, d): d moves up to rank 2; mean gain averages over the two labelled products.
    assert condensed.at["B", "ndcg"] == pytest.approx((1 / math.log2(3)) / IDCG3)
    assert condensed.at["B", "mean_gain"] == pytest.approx(0.5)
    assert condensed.at["A", "ndcg"] == pytest.approx(zero.at["A", "ndcg"])
    assert list(zero["shown"]) == [3, 3] and list(zero["judged"]) == [2, 2]


def test_ndcg_matches_scikit_learn_when_the_list_ranks_every_labelled_product():
    rng = np.random.default_rng(3)
    for seed in range(5):
        gains = rng.choice([0.0, 0.5, 1.0], size=12)
        scores = rng.permutation(12).astype(float)  # no ties: sklearn's tie averaging does not apply
        products = [f"p{i}" for i in range(12)]
        label_frame = labels({p: WANDS.names[[1.0, 0.5, 0.0].index(g)] for p, g in zip(products, gains)})
        order = [products[i] for i in np.argsort(-scores)]
        for k in (1, 5, 12):
            ours = list_metrics(ranked({"R": order}), label_frame.pairs, k=k)["ndcg"].iloc[0]
            if gains.max() == 0:
                assert math.isnan(ours)
            else:
                assert ours == pytest.approx(ndcg_score([gains], [scores], k=k)), (seed, k)


def test_coverage_and_differences_with_intervals():
    rows, label_rows = [], {}
    rng = np.random.default_rng(0)
    for q in range(30):
        query = f"q{q:02d}"
        for i in range(6):
            label_rows[(query, f"p{i}")] = WANDS.names[i % 3]
        rows += [(query, "good", r + 1, f"p{i}") for r, i in enumerate([0, 3, 1, 4, 2, 5])]  # Exact first
        rows += [(query, "bad", r + 1, f"p{i}") for r, i in enumerate([2, 5, 1, 4, 0, 3])]
        rows += [(query, "good", 7, "unjudged"), (query, "bad", 7, "unjudged")]
    lists = lists_from_ranked(pd.DataFrame(rows, columns=["query_id", "ranker", "rank", "product_id"]))
    frame = pd.DataFrame([(q, p, label, "r1") for (q, p), label in label_rows.items()],
                         columns=["query_id", "product_id", "label", "annotator"])
    result = evaluate_rankers(lists, labels_from_judgments(frame, WANDS, "human"), k=7, n_bootstrap=200, seed=rng.integers(100),
                              rankers=["bad", "good"])
    good, bad = result.ranker("good"), result.ranker("bad")
    assert (good.shown, good.judged) == (30 * 7, 30 * 6) and good.coverage == pytest.approx(6 / 7)
    assert result.queries_compared == 30
    difference = result.difference("bad", "good", "ndcg")
    assert difference.estimate == pytest.approx(good.metrics["ndcg"].estimate - bad.metrics["ndcg"].estimate)
    assert difference.low <= difference.estimate <= difference.high and difference.low > 0
    assert result.difference("bad", "good", "precision").estimate == pytest.approx(0)  # same products, other order


def test_relevance_source_reports_rows_it_cannot_use():
    relevance = pd.DataFrame({
        "query_id": ["q1", "q1", None, "q1"], "product_id": ["a", "b", "a", "a"], "label": ["Exact", "Partial", "Exact", "Partial"],
        "label_set": "wands", "expected_gain": [0.9, 0.4, 0.9, 0.5],
        "ds": pd.to_datetime(["2024-03-02", "2024-03-02", "2024-03-02", "2024-03-01"]).date,
    })
    source = labels_from_relevance(relevance, WANDS, "policy")
    assert source.left_out == {"rows without query_id": 1, "older nights' scores of a pair scored again later": 1}
    assert source.pairs.set_index("product_id")["gain"].to_dict() == {"a": 0.9, "b": 0.4}
    with pytest.raises(RankerInputError, match="repeat a"):
        labels_from_relevance(relevance.assign(ds=relevance["ds"].iloc[0]), WANDS, "policy")


def test_lists_from_logs_keep_exposed_requests_only():
    ts = pd.to_datetime(["2024-03-01", "2024-03-05", "2024-03-06", "2024-03-06"], utc=True)
    impressions = pd.DataFrame({"request_id": ["r1", "r2", "r3", "r4"], "user_id": ["u1", "u1", "u2", "u9"], "query_id": "q1",
                                "product_id": "a", "position": 1, "ts": ts})
    assignment = pd.DataFrame({"user_id": ["u1", "u2"], "variant": ["control", "treatment"],
                               "first_exposure_ts": pd.to_datetime(["2024-03-05", "2024-03-06"], utc=True)})
    lists, counts = lists_from_logs(impressions, assignment)
    assert sorted(zip(lists["list_id"], lists["ranker"])) == [("r2", "control"), ("r3", "treatment")]
    assert counts == {"requests": 4, "requests judged": 2, "requests of unassigned users": 1, "requests before the user's first exposure": 1}


def test_malformed_lists_are_refused_with_their_rows():
    lists = ranked({"A": ["a", "b"]})
    with pytest.raises(RankerInputError, match=r"rows \[1, 2\]"):
        evaluate_rankers(lists.assign(rank=1), labels(LABELS), k=2, n_bootstrap=10)
    with pytest.raises(RankerInputError, match="have no lists"):
        evaluate_rankers(lists, labels(LABELS), k=2, n_bootstrap=10, rankers=["A", "Z"])
