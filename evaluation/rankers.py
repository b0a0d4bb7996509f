"""Rankers judged offline: NDCG@k, precision@k and mean gain of result lists under one label source.

Inputs (pandas frames; `jobs/rankers.py` reads the tables)
- Lists: one row per (ranker, list, rank): `ranker`, `list_id`, `query_id`, `rank`, `product_id`. A RANKED_LISTS
  table holds one list per (ranker, query) (`list_id` = query_id); the logs of an A/B test hold one list per search
  request, its ranker the user's variant (`lists_from_logs`).
- Labels (`LabelSource`): one row per (query_id, product_id) with `label` (one label of the set), `gain` (the label
  set's gain; the mean over annotators for human judgments; `expected_gain` for a relevance table) and `relevant`
  (1 when the label is one of the set's relevant labels; the share of annotators for human judgments).

Metrics: each list's, then the mean over a query's lists (a ranker's own query), then the mean over queries, so
every query weighs the same however often it was searched.
- DCG@k = sum over the first k of gain / log2(rank + 1). IDCG@k: the same sum over the k largest gains the label
  source holds for the query: the ideal comes from everything the source labelled, not from the list itself, so a
  ranker that retrieves worse products scores lower. A query whose labels hold no gain has no NDCG: it is left out
  and counted.
- P@k = relevant products among the first k / k; mean gain = gain summed over the first k / products counted.
- Unjudged products (in the first k, not labelled by the source) follow an explicit policy, `unjudged`:
  "zero" (default, TREC's convention): gain 0, not relevant, keeping its rank;
  "condense" (Sakai's condensed lists, SIGIR 2007): removed before the cut at k, so a list is judged on its
  labelled products only, and mean gain averages over them.
  Either way each ranker's coverage (labelled / shown among the first k) is reported with its counts.

Comparison: on the queries where every ranker has all three metrics (the others are counted by reason), each
ranker's metrics and every pairwise difference get query-bootstrap percentile intervals (`evaluation.bootstrap`):
both rankers of a difference see the same resampled queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from evaluation.bootstrap import Interval, bootstrap
from evaluation.inputs import EvaluationInputError, judgments_from_gold_nodes, majority_labels
from schemas.graph import LabelSet, ReasoningGraph

UNJUDGED_POLICIES = ("zero", "condense")
METRICS = ("ndcg", "precision", "mean_gain")
LIST_KEY = ["ranker", "list_id"]
PAIR = ["query_id", "product_id"]
LIST_COLUMNS = ["ranker", "list_id", "query_id", "rank", "product_id"]
EXAMPLES = 5


class RankerInputError(EvaluationInputError):
    """Lists or labels that cannot be judged as given (the message names the rows)."""


@dataclass(frozen=True)
class LabelSource:
    """Labels of one source, one row per pair: query_id, product_id, label, gain, relevant.

    `left_out`: rows of the input that give no label here and why (reason -> rows), so nothing vanishes unsaid."""

    name: str
    pairs: pd.DataFrame
    left_out: dict[str, int] = field(default_factory=dict)


def _examples(frame: pd.DataFrame, columns: list[str]) -> str:
    return ", ".join(str(tuple(row)) for row in frame[columns].head(EXAMPLES).itertuples(index=False))


def _check_unique(frame: pd.DataFrame, key: list[str], source: str, hint: str) -> None:
    duplicated = frame.duplicated(key, keep=False)
    if duplicated.any():
        rows = [int(i) + 1 for i in np.flatnonzero(duplicated.to_numpy())[:EXAMPLES]]
        raise RankerInputError(f"{source}: {int(duplicated.sum())} rows repeat a {tuple(key)} key (rows {rows}: "
                               f"{_examples(frame[duplicated], key)}); {hint}")


def _check_labels(labels: pd.Series, label_set: LabelSet, source: str) -> None:
    unknown = ~labels.isin(label_set.names)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0]) + 1
        raise RankerInputError(f"{source}: row {row}, field label: {labels[unknown].iloc[0]!r} is not a label of "
                               f"{label_set.name!r} {list(label_set.names)}")


def labels_from_judgments(judgments: pd.DataFrame, label_set: LabelSet, name: str) -> LabelSource:
    """Human (or any) judgments -> one row per pair: majority label, mean gain and share relevant over annotators.

    `judgments`: query_id, product_id, label, annotator (the annotators already chosen)."""
    _check_labels(judgments["label"], label_set, name)
    _check_unique(judgments, [*PAIR, "annotator"], name, "an annotator judges a pair once")
    frame = judgments.assign(gain=judgments["label"].map(label_set.gains),
                             relevant=judgments["label"].isin(label_set.relevant).astype(float))
    means = frame.groupby(PAIR, sort=True)[["gain", "relevant"]].mean().reset_index()
    majority = majority_labels(judgments[[*PAIR, "label"]], label_set)[[*PAIR, "label"]]
    return LabelSource(name, means.merge(majority, on=PAIR, how="inner", validate="one_to_one")[[*PAIR, "label", "gain", "relevant"]])


def labels_from_gold_nodes(gold_nodes, label_set: LabelSet, graph: ReasoningGraph, name: str = "gold") -> LabelSource:
    """The noise-free gold labels a GOLD_NODES (Arrow) table implies (its label node, else the set's rule)."""
    judgments = judgments_from_gold_nodes(gold_nodes, label_set, graph, annotator=name).to_pandas()
    return labels_from_judgments(judgments, label_set, name)


def labels_from_relevance(relevance: pd.DataFrame, label_set: LabelSet, name: str) -> LabelSource:
    """A relevance table (a model's, a multi-judge combination's): its label and `expected_gain` per pair.

    `relevance`: query_id (nullable), product_id, label, label_set, expected_gain and optionally ds. Rows without a
    query_id cannot be joined to lists by query; with `ds`, a pair's latest night stands; both are counted in
    `left_out`. A pair scored twice on one night is an error (choose one model version)."""
    other = relevance["label_set"] != label_set.name
    if other.any():
        raise RankerInputError(f"{name}: label_set must be {label_set.name!r}, found {relevance.loc[other, 'label_set'].value_counts().to_dict()}")
    missing = relevance["query_id"].isna()
    kept = relevance[~missing].reset_index(drop=True)
    left_out = {"rows without query_id": int(missing.sum())} if missing.any() else {}
    if "ds" in kept.columns:  # a table of several nights: each pair's latest score is what ranking imports
        latest = kept["ds"] == kept.groupby(PAIR)["ds"].transform("max")
        if (~latest).any():
            left_out["older nights' scores of a pair scored again later"] = int((~latest).sum())
        kept = kept[latest].reset_index(drop=True)
    _check_labels(kept["label"], label_set, name)
    _check_unique(kept, PAIR, name, "score each pair once per night (one model version) per label source")
    pairs = pd.DataFrame({"query_id": kept["query_id"], "product_id": kept["product_id"], "label": kept["label"],
                          "gain": kept["expected_gain"].astype(float),
                          "relevant": kept["label"].isin(label_set.relevant).astype(float)})
    return LabelSource(name, pairs, left_out)


def lists_from_ranked(ranked: pd.DataFrame) -> pd.DataFrame:
    """A RANKED_LISTS frame (query_id, ranker, rank, product_id) -> lists, one per (ranker, query)."""
    return ranked.assign(list_id=ranked["query_id"])[LIST_COLUMNS]


def lists_from_logs(impressions: pd.DataFrame, assignment: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The lists an A/B test showed: each request of an assigned user from the user's first exposure on, its ranker the
    user's variant, its ranks the logged positions.

    impressions: request_id, user_id, query_id, product_id, position, ts; assignment (one experiment): user_id,
    variant, first_exposure_ts. Returns the lists and the requests counted by what happened to them."""
    requests = impressions.drop_duplicates("request_id")[["request_id", "user_id", "ts"]]
    joined = requests.merge(assignment[["user_id", "variant", "first_exposure_ts"]], on="user_id", how="left", validate="many_to_one")
    unassigned = joined["variant"].isna()
    before = ~unassigned & (joined["ts"] < joined["first_exposure_ts"])
    kept = joined[~unassigned & ~before][["request_id", "variant"]]
    lists = impressions.merge(kept, on="request_id", how="inner", validate="many_to_one")
    counts = {"requests": len(requests), "requests judged": len(kept), "requests of unassigned users": int(unassigned.sum()),
              "requests before the user's first exposure": int(before.sum())}
    lists = lists.rename(columns={"variant": "ranker", "request_id": "list_id", "position": "rank"})
    return lists[LIST_COLUMNS], counts


def _check_lists(lists: pd.DataFrame) -> None:
    _check_unique(lists, [*LIST_KEY, "rank"], "lists", "each rank of a list holds one product")
    _check_unique(lists, [*LIST_KEY, "product_id"], "lists", "a list shows a product once")
    nonpositive = lists["rank"] < 1
    if nonpositive.any():
        row = int(np.flatnonzero(nonpositive.to_numpy())[0]) + 1
        raise RankerInputError(f"lists: row {row}, field rank: {lists['rank'][nonpositive].iloc[0]} (ranks start at 1)")


def discount(position: np.ndarray) -> np.ndarray:
    """1 / log2(position + 2) for 0-based positions."""
    return 1.0 / np.log2(np.asarray(position, float) + 2.0)


def ideal_dcg(labels: pd.DataFrame, k: int) -> pd.Series:
    """IDCG@k per query_id: the DCG of the query's k largest gains."""
    ordered = labels.sort_values(["query_id", "gain"], ascending=[True, False], kind="mergesort")
    position = ordered.groupby("query_id", sort=False).cumcount().to_numpy()
    top = position < k
    contribution = ordered["gain"].to_numpy()[top] * discount(position[top])
    return pd.Series(contribution, index=ordered["query_id"].to_numpy()[top]).groupby(level=0).sum()


def list_metrics(lists: pd.DataFrame, labels: pd.DataFrame, k: int, unjudged: str = "zero") -> pd.DataFrame:
    """One row per list: ranker, list_id, query_id, shown and judged (among the first k), ndcg, precision, mean_gain.

    `lists`: LIST_COLUMNS; `labels`: query_id, product_id, gain, relevant (one row per pair)."""
    if unjudged not in UNJUDGED_POLICIES:
        raise ValueError(f"unjudged policy {unjudged!r} unknown; use one of {list(UNJUDGED_POLICIES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ordered = lists.sort_values([*LIST_KEY, "rank"], kind="mergesort").reset_index(drop=True)
    ordered = ordered.merge(labels[[*PAIR, "gain", "relevant"]], on=PAIR, how="left", validate="many_to_one")
    ordered["position"] = ordered.groupby(LIST_KEY, sort=False).cumcount()
    ordered["judged"] = ordered["gain"].notna()
    shown = ordered[ordered["position"] < k]
    per_list = shown.groupby(LIST_KEY, sort=False).agg(query_id=("query_id", "first"), shown=("product_id", "size"),
                                                       judged=("judged", "sum"))
    if unjudged == "zero":
        counted = shown.fillna({"gain": 0.0, "relevant": 0.0})
    else:
        counted = ordered[ordered["judged"]].copy()
        counted["position"] = counted.groupby(LIST_KEY, sort=False).cumcount()
        counted = counted[counted["position"] < k]
    counted = counted.assign(discounted=counted["gain"] * discount(counted["position"].to_numpy()))
    sums = counted.groupby(LIST_KEY, sort=False).agg(dcg=("discounted", "sum"), gain=("gain", "sum"),
                                                     relevant=("relevant", "sum"), counted=("gain", "size"))
    per_list = per_list.join(sums, how="left").fillna({"dcg": 0.0, "gain": 0.0, "relevant": 0.0, "counted": 0})
    ideal = ideal_dcg(labels, k).reindex(per_list["query_id"]).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        per_list["ndcg"] = np.where(ideal > 0, per_list["dcg"].to_numpy() / ideal, np.nan)
        per_list["mean_gain"] = np.where(per_list["counted"] > 0, per_list["gain"] / per_list["counted"], np.nan)
    per_list["precision"] = per_list["relevant"] / k
    per_list["judged"] = per_list["judged"].astype(int)
    return per_list.reset_index()[[*LIST_KEY, "query_id", "shown", "judged", *METRICS]]


@dataclass(frozen=True)
class RankerScores:
    """One ranker on the compared queries (`metrics`: NDCG@k, P@k, mean gain with intervals) and its coverage over
    every list it showed (`judged` of `shown` products among the first k)."""

    ranker: str
    lists: int
    queries: int
    shown: int
    judged: int
    metrics: dict[str, Interval]

    @property
    def coverage(self) -> float:
        return self.judged / self.shown if self.shown else float("nan")


@dataclass(frozen=True)
class RankerDifference:
    """`other` minus `baseline` on one metric, over the same resampled queries."""

    baseline: str
    other: str
    metric: str
    interval: Interval


@dataclass(frozen=True)
class RankerEvaluation:
    label_source: str
    k: int
    unjudged: str
    queries_compared: int
    queries_left_out: dict[str, int]
    labels_left_out: dict[str, int]
    rankers: tuple[RankerScores, ...]
    differences: tuple[RankerDifference, ...]

    def ranker(self, name: str) -> RankerScores:
        for scores in self.rankers:
            if scores.ranker == name:
                return scores
        raise KeyError(f"no ranker {name!r}; rankers: {[scores.ranker for scores in self.rankers]}")

    def difference(self, baseline: str, other: str, metric: str = "ndcg") -> Interval:
        for difference in self.differences:
            if (difference.baseline, difference.other, difference.metric) == (baseline, other, metric):
                return difference.interval
        raise KeyError(f"no difference {other} - {baseline} on {metric}")

    def estimates(self, metric: str = "ndcg") -> dict[str, float]:
        return {scores.ranker: scores.metrics[metric].estimate for scores in self.rankers}


def per_query_means(per_list: pd.DataFrame, rankers: list[str]) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Query x ranker matrices of each metric (the mean over the ranker's lists of the query) on the queries where
    every ranker has every metric, and the queries left out by reason."""
    means = per_list.groupby(["query_id", "ranker"], sort=True)[list(METRICS)].mean()
    matrices = {metric: means[metric].unstack("ranker").reindex(columns=rankers) for metric in METRICS}
    listed = matrices["ndcg"].index
    everywhere = per_list.groupby("query_id")["ranker"].nunique().reindex(listed) == len(rankers)
    defined = np.logical_and.reduce([matrix.notna().all(axis=1).to_numpy() for matrix in matrices.values()])
    left_out = {"not listed by every ranker": int((~everywhere).sum()),
                "no labelled gain for the query (NDCG undefined)": int((everywhere.to_numpy() & ~defined).sum())}
    keep = everywhere.to_numpy() & defined
    return {metric: matrix[keep] for metric, matrix in matrices.items()}, left_out


def compare_rankers(per_list: pd.DataFrame, rankers: list[str], n_bootstrap: int, seed: int, level: float
                    ) -> tuple[dict[str, dict[str, Interval]], list[RankerDifference], int, dict[str, int]]:
    """Bootstrap each ranker's metrics and every pairwise difference over the compared queries."""
    matrices, left_out = per_query_means(per_list, rankers)
    n_queries = len(matrices["ndcg"])
    if n_queries == 0:
        raise RankerInputError(f"no query has every metric for every ranker {rankers} (left out: {left_out}); "
                               "check that the label source labels the lists' queries")
    values = {metric: matrix.to_numpy() for metric, matrix in matrices.items()}
    pairs = list(combinations(range(len(rankers)), 2))

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for metric, matrix in values.items():
            means = weights @ matrix / weights.sum(axis=1, keepdims=True)  # (B, rankers)
            out[metric] = means
            for i, j in pairs:
                out[f"{metric}:{i}:{j}"] = means[:, j] - means[:, i]
        return out

    intervals = bootstrap(statistic, n_queries, n_bootstrap, seed, level)

    def part(interval: Interval, index: int) -> Interval:
        return Interval(float(interval.estimate[index]), float(interval.low[index]), float(interval.high[index]), interval.level,
                        interval.n_replicates, int(interval.n_undefined[index]))

    per_ranker = {name: {metric: part(intervals[metric], index) for metric in METRICS} for index, name in enumerate(rankers)}
    differences = [RankerDifference(rankers[i], rankers[j], metric, intervals[f"{metric}:{i}:{j}"])
                   for metric in METRICS for i, j in pairs]
    return per_ranker, differences, n_queries, left_out


def evaluate_rankers(lists: pd.DataFrame, labels: LabelSource, k: int = 10, unjudged: str = "zero", n_bootstrap: int = 1000,
                     seed: int = 0, level: float = 0.95, rankers: list[str] | None = None) -> RankerEvaluation:
    """Judge every ranker's lists under `labels` (see the module docstring). `rankers`: their order in the result
    (default: sorted); a named ranker without lists is an error."""
    _check_lists(lists)
    present = sorted(lists["ranker"].unique())
    order = list(rankers) if rankers else present
    missing = [name for name in order if name not in present]
    if missing or len(order) < 1:
        raise RankerInputError(f"rankers {missing} have no lists; rankers present: {present}")
    lists = lists[lists["ranker"].isin(order)]
    per_list = list_metrics(lists, labels.pairs, k, unjudged)
    per_ranker, differences, n_queries, left_out = compare_rankers(per_list, order, n_bootstrap, seed, level)
    totals = per_list.groupby("ranker").agg(lists=("list_id", "size"), queries=("query_id", "nunique"), shown=("shown", "sum"),
                                            judged=("judged", "sum"))
    scores = tuple(RankerScores(name, int(totals.at[name, "lists"]), int(totals.at[name, "queries"]), int(totals.at[name, "shown"]),
                                int(totals.at[name, "judged"]), per_ranker[name]) for name in order)
    return RankerEvaluation(labels.name, k, unjudged, n_queries, left_out, dict(labels.left_out), scores, tuple(differences))


def interval_dict(interval: Interval) -> dict:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "level": interval.level,
            "n_replicates": interval.n_replicates}


def evaluation_dict(evaluation: RankerEvaluation) -> dict:
    """A JSON-ready dict of `evaluation`."""
    return {
        "label_source": evaluation.label_source, "k": evaluation.k, "unjudged": evaluation.unjudged,
        "queries_compared": evaluation.queries_compared, "queries_left_out": evaluation.queries_left_out,
        "labels_left_out": evaluation.labels_left_out,
        "rankers": [{"ranker": s.ranker, "lists": s.lists, "queries": s.queries, "shown": s.shown, "judged": s.judged,
                     "coverage": s.coverage, "metrics": {name: interval_dict(value) for name, value in s.metrics.items()}}
                    for s in evaluation.rankers],
        "differences": [{"baseline": d.baseline, "other": d.other, "metric": d.metric, **interval_dict(d.interval)}
                        for d in evaluation.differences],
    }
