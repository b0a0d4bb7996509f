"""Score prediction tables against gold and compare models (the math behind `relevance evaluate`).

The walk: read gold (JUDGMENTS -> majority label per pair, see `evaluation.inputs`) and each
prediction table (RELEVANCE schema) -> join on (query_id, product_id) -> per-query sufficient
statistics -> metrics with query-bootstrap intervals (`evaluation.bootstrap`) for the whole set and
per segment (query traffic segment from QUERIES, product type from CATALOG) -> paired comparisons
on the pairs both models cover (paired bootstrap of the differences with the same resampled
queries, and McNemar on accuracy): every model against the baseline (the first model unless
named), and each stage of the lineage against the one before it. `evaluation.command` reads the
tables and `evaluation.report` writes report.md, report.html and metrics.json.

The lineage is the models in stage order (e.g. SFT -> Graph-GRPO -> student); by default the
models other than the baseline, in the order given, so that `rater, sft, grpo, student` compares
each with the rater and sft -> grpo -> student step by step. A majority-class predictor (the most
frequent gold label for every pair, probabilities the gold label shares) is evaluated beside the
models: the floor any model must clear.

Metric names (keys of `ModelEvaluation.metrics`): see `METRICS`. Accuracy, macro-F1, per-class
scores, the binary view, AUCs, NDCG and ECE are computed on covered pairs (gold and prediction);
`coverage` and `coverage_adjusted_accuracy` (uncovered gold pairs scored as wrong) on all gold pairs.
The binary view calls a pair relevant when its label is in the label set's `relevant`; its score
for ROC-AUC/PR-AUC is the predicted probability of the relevant labels. NDCG@k ranks each query's
covered pairs by the predicted `expected_gain`. Agreement (Cohen's kappa, Krippendorff's alpha;
`evaluation.agreement`) is the model against gold on covered pairs and, on the covered pairs with
several judgments, the judges among themselves (`humans_`: the ceiling), the model against one judge
(`vs_humans_`) and the paired gap between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa

from evaluation import agreement as A
from evaluation import metrics as M
from evaluation.bootstrap import Interval, Statistic, bootstrap
from evaluation.inputs import (
    Context,
    Gold,
    ScoredPairs,
    build_context,
    gold_from_judgments,
    join,
    predictions_from_table,
)
from schemas.graph import LabelSet, ReasoningGraph
from schemas.logs import progress

METRICS = {
    "accuracy": "share of covered pairs whose predicted label is the gold label",
    "macro_f1": "mean F1 over labels present in gold or predictions",
    "precision": "per label: right / predicted",
    "recall": "per label: right / gold",
    "f1": "per label: harmonic mean of precision and recall",
    "coverage": "share of gold pairs with a prediction",
    "coverage_adjusted_accuracy": "right / all gold pairs (uncovered pairs count as wrong)",
    "binary_accuracy": "relevant-vs-not accuracy",
    "binary_precision": "relevant-vs-not precision of 'relevant'",
    "binary_recall": "relevant-vs-not recall of 'relevant'",
    "binary_f1": "relevant-vs-not F1 of 'relevant'",
    "roc_auc": "ROC-AUC of P(relevant)",
    "pr_auc": "average precision of P(relevant)",
    "ndcg": "mean NDCG@k over queries with some gain",
    "ece": "top-label expected calibration error",
    "node_accuracy": "per reasoning node: share of pairs with a gold value whose decided value matches",
    **{name: f"{doc}, the model against gold" for name, doc in A.AGREEMENT.items()},
    f"{A.HUMANS}<agreement>": "on covered pairs with several human judgments: the judges among themselves (the ceiling)",
    f"{A.AGAINST_HUMANS}<agreement>": "on the same pairs: the model against one judge (each judgment paired with its label)",
    f"{A.AGAINST_HUMANS}<agreement>{A.GAP}": "model against one judge minus judges among themselves (paired bootstrap)",
}
DIFFERENCES = ("macro_f1", "accuracy", "ndcg")


# ---------------------------------------------------------------- per-query sufficient statistics


@dataclass(frozen=True)
class QueryStats:
    """One model's sufficient statistics per query (Q queries; covered pairs only unless said).

    confusion: (Q, C, C); n_gold: (Q,) gold pairs incl. uncovered; calibration: (Q, bins, 3);
    nodes: (Q, M, 2) [pairs with a gold value, right]; ndcg, ndcg_defined: (Q,);
    ranked: relevant / not relevant pairs per query and distinct P(relevant), for the AUCs;
    humans, against_humans: (Q, C, C) over covered pairs with several judgments, the judges' coincidences
    and their judgments against the model's label (see `evaluation.agreement`); n_several_judged: those pairs.
    """

    n_queries: int
    confusion: np.ndarray
    n_gold: np.ndarray
    calibration: np.ndarray
    nodes: np.ndarray
    ndcg: np.ndarray
    ndcg_defined: np.ndarray
    ranked: M.RankedCounts
    humans: np.ndarray
    against_humans: np.ndarray
    n_several_judged: int


def _sum_by_query(query_index: np.ndarray, values: np.ndarray, n_queries: int) -> np.ndarray:
    """`(n_queries, ...)` sums of per-pair `values` `(N, ...)` by query."""
    sums = np.zeros((n_queries, *values.shape[1:]))
    np.add.at(sums, query_index, values)
    return sums


def query_stats(pairs: ScoredPairs, relevant: np.ndarray, gains: np.ndarray, k: int) -> QueryStats:
    """Per-query sufficient statistics of `pairs` (queries numbered in order of appearance).

    relevant: (C,) bool, the relevant labels; gains: (C,) label gains.
    """
    query_index, query_ids = pd.factorize(pairs.query_id)
    n_queries, n_classes = len(query_ids), len(relevant)
    covered = pairs.covered
    q, gold, label = query_index[covered], pairs.gold[covered], pairs.label[covered]
    probs = pairs.probs[covered]
    confidence = probs[np.arange(len(label)), label]
    node_correct = pairs.node_correct[covered]
    n_nodes = node_correct.shape[1]
    cell = (q[:, None] * n_nodes + np.arange(n_nodes)).ravel()
    nodes = np.stack(
        [
            np.bincount(cell, weights=(~np.isnan(node_correct)).ravel(), minlength=n_queries * n_nodes),
            np.bincount(cell, weights=np.nan_to_num(node_correct).ravel(), minlength=n_queries * n_nodes),
        ],
        axis=-1,
    ).reshape(n_queries, n_nodes, 2)
    ndcg, defined = M.ndcg_per_query(q, pairs.expected_gain[covered], gains[gold], n_queries, k)
    votes = np.zeros((len(gold), n_classes)) if pairs.votes is None else pairs.votes[covered]
    several = votes.sum(axis=1) >= 2
    return QueryStats(
        n_queries=n_queries,
        confusion=M.per_query_confusion(q, gold, label, n_queries, n_classes),
        n_gold=np.bincount(query_index, minlength=n_queries).astype(float),
        calibration=M.per_query_calibration_bins(q, confidence, gold == label, n_queries),
        nodes=nodes,
        ndcg=np.nan_to_num(ndcg),
        ndcg_defined=defined,
        ranked=M.ranked_counts(q, probs[:, relevant].sum(axis=1), relevant[gold], n_queries),
        humans=_sum_by_query(q[several], A.coincidences(votes[several]), n_queries),
        against_humans=_sum_by_query(q[several], A.against_votes(votes[several], label[several]), n_queries),
        n_several_judged=int(several.sum()),
    )


def node_accuracy(weights: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """(B, M) accuracy of each node under each weighting of queries; `nodes` as in `QueryStats`."""
    node_sums = np.einsum("bq,qmc->bmc", weights, nodes)
    return M.ratio(node_sums[..., 1], node_sums[..., 0], np.nan)


def model_statistic(stats: QueryStats, relevant: np.ndarray, with_ndcg: bool = True, full: bool = True) -> Statistic:
    """The bootstrap statistic of one model: weights (B, Q) -> every metric of `METRICS`, or with
    `full=False` only those of `DIFFERENCES` (what a paired comparison needs)."""
    n_classes = len(relevant)
    flat_confusion = stats.confusion.reshape(stats.n_queries, -1).astype(float)
    flat_calibration = stats.calibration.reshape(stats.n_queries, -1)
    flat_humans = stats.humans.reshape(stats.n_queries, -1)
    flat_against_humans = stats.against_humans.reshape(stats.n_queries, -1)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        confusion = (weights @ flat_confusion).reshape(-1, n_classes, n_classes)
        scores = M.scores_from_confusion(confusion)
        out = {"accuracy": scores.accuracy, "macro_f1": scores.macro_f1}
        if with_ndcg:
            out["ndcg"] = M.ratio(weights @ stats.ndcg, weights @ stats.ndcg_defined, np.nan)
        if not full:
            return out
        binary = M.binary_scores(M.binary_confusion(confusion, relevant))
        n_gold = weights @ stats.n_gold
        roc_auc, pr_auc = M.roc_auc_and_average_precision(stats.ranked, weights)
        out |= {
            "precision": scores.precision,
            "recall": scores.recall,
            "f1": scores.f1,
            "coverage": M.ratio(confusion.sum(axis=(-2, -1)), n_gold, np.nan),
            "coverage_adjusted_accuracy": M.ratio(np.trace(confusion, axis1=-2, axis2=-1), n_gold, np.nan),
            "binary_accuracy": binary.accuracy,
            "binary_precision": binary.precision,
            "binary_recall": binary.recall,
            "binary_f1": binary.f1,
            "roc_auc": roc_auc,
            "pr_auc": pr_auc,
            "ece": M.expected_calibration_error((weights @ flat_calibration).reshape(len(weights), -1, 3)),
        }
        if stats.nodes.shape[1]:
            out["node_accuracy"] = node_accuracy(weights, stats.nodes)
        out |= A.agreement_scores(confusion)
        if stats.n_several_judged:
            out |= A.ceiling_scores(
                (weights @ flat_humans).reshape(confusion.shape), (weights @ flat_against_humans).reshape(confusion.shape)
            )
        return out

    return statistic


# ---------------------------------------------------------------- one model


@dataclass(frozen=True)
class ModelEvaluation:
    """One model on one set of gold pairs: counts, metrics with intervals, and plot data.

    metrics: name -> Interval (see `METRICS`); per-label metrics hold (C,) arrays, node_accuracy
    (M,) arrays in `node_names` order. node_counts: (M, 3) [pairs with a gold value, right,
    prediction lacks the node]. segments: (kind, segment, evaluation) with kind 'query segment'
    or 'product type'. n_several_judged, n_several_judged_queries: covered pairs with several human
    judgments and their queries (what the `humans_` and `vs_humans_` metrics rest on; 0: none).
    """

    name: str
    labels: tuple[str, ...]
    n_gold_pairs: int
    n_covered: int
    n_predictions_without_gold: int
    n_queries: int
    n_ndcg_queries: int
    metrics: dict[str, Interval]
    confusion: np.ndarray
    reliability: M.Reliability
    node_names: tuple[str, ...]
    node_counts: np.ndarray
    segments: tuple[tuple[str, str, ModelEvaluation], ...] = ()
    n_several_judged: int = 0
    n_several_judged_queries: int = 0


def evaluate_pairs(
    name: str,
    pairs: ScoredPairs,
    label_set: LabelSet,
    k: int,
    n_bootstrap: int,
    seed: int,
    level: float,
    n_predictions_without_gold: int = 0,
    with_ndcg: bool = True,
) -> ModelEvaluation:
    """Metrics of one model's `pairs` with query-bootstrap intervals (no segments)."""
    relevant = np.isin(label_set.names, label_set.relevant)
    gains = np.array([label_set.gains[name] for name in label_set.names])
    stats = query_stats(pairs, relevant, gains, k)
    intervals = bootstrap(model_statistic(stats, relevant, with_ndcg), stats.n_queries, n_bootstrap, seed, level)
    covered = pairs.covered
    several_judged = stats.against_humans.sum(axis=(1, 2))
    node_counts = np.stack(
        [
            (~np.isnan(pairs.node_correct[covered])).sum(axis=0),
            np.nansum(pairs.node_correct[covered], axis=0),
            pairs.node_missing[covered].sum(axis=0),
        ],
        axis=-1,
    ).astype(int)
    return ModelEvaluation(
        name=name,
        labels=tuple(label_set.names),
        n_gold_pairs=len(pairs.gold),
        n_covered=int(covered.sum()),
        n_predictions_without_gold=n_predictions_without_gold,
        n_queries=stats.n_queries,
        n_ndcg_queries=int(stats.ndcg_defined.sum()),
        metrics=intervals,
        confusion=stats.confusion.sum(axis=0),
        reliability=M.reliability(stats.calibration.sum(axis=0)),
        node_names=pairs.node_names,
        node_counts=node_counts,
        n_several_judged=stats.n_several_judged,
        n_several_judged_queries=int((several_judged > 0).sum()),
    )


def evaluate_model(
    name: str,
    pairs: ScoredPairs,
    n_predictions_without_gold: int,
    label_set: LabelSet,
    k: int,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> ModelEvaluation:
    """`evaluate_pairs` on all pairs plus each query segment and product type present."""
    settings = dict(label_set=label_set, k=k, n_bootstrap=n_bootstrap, seed=seed, level=level)
    overall = evaluate_pairs(name, pairs, n_predictions_without_gold=n_predictions_without_gold, **settings)
    segments = []
    for kind, values, with_ndcg in (("query segment", pairs.query_segment, True), ("product type", pairs.product_type, False)):
        present = pd.unique(values)
        if len(present) < 2:  # one segment (often all 'unknown'): nothing beyond the overall numbers
            continue
        for segment in sorted(present):
            subset = pairs.subset(values == segment)
            segments.append((kind, segment, evaluate_pairs(name, subset, with_ndcg=with_ndcg, **settings)))
    return ModelEvaluation(**{**overall.__dict__, "segments": tuple(segments)})


# ---------------------------------------------------------------- two models


@dataclass(frozen=True)
class Comparison:
    """`other` against `baseline` on the gold pairs both cover.

    metrics: `<metric>_difference` (other - baseline) and each model's value, for `DIFFERENCES`,
    and `node_accuracy_difference` ((M,) in `node_names` order: the nodes both models decide), from
    one paired query bootstrap (both models see the same resampled queries).
    """

    baseline: str
    other: str
    n_pairs: int
    n_queries: int
    metrics: dict[str, Interval]
    mcnemar: M.McNemar
    verdict: str
    node_names: tuple[str, ...] = ()


def verdict(baseline: str, other: str, difference: Interval, metric: str = "macro-F1") -> str:
    """One line stating the difference, its interval and what it means at that level."""
    if difference.low > 0:
        meaning = f"{other} is better"
    elif difference.high < 0:
        meaning = f"{baseline} is better"
    else:
        meaning = "no significant difference (the interval contains 0)"
    return (
        f"{other} - {baseline} {metric} = {difference.estimate:+.3f} [{difference.low:.3f}, {difference.high:.3f}] "
        f"({difference.level:.0%} CI, {difference.n_replicates} query-bootstrap replicates): {meaning}"
    )


def compare(
    baseline: str,
    baseline_pairs: ScoredPairs,
    other: str,
    other_pairs: ScoredPairs,
    label_set: LabelSet,
    k: int,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> Comparison:
    """Paired query bootstrap of the differences and McNemar on accuracy, on commonly covered pairs."""
    if not (
        np.array_equal(baseline_pairs.query_id, other_pairs.query_id)
        and np.array_equal(baseline_pairs.product_id, other_pairs.product_id)
    ):
        raise ValueError("compare needs both models joined to the same gold pairs in the same order")
    common = baseline_pairs.covered & other_pairs.covered
    if not common.any():
        raise ValueError(f"{baseline} and {other} have no gold pair in common; nothing to compare")
    relevant = np.isin(label_set.names, label_set.relevant)
    gains = np.array([label_set.gains[name] for name in label_set.names])
    stats_a = query_stats(baseline_pairs.subset(common), relevant, gains, k)
    stats_b = query_stats(other_pairs.subset(common), relevant, gains, k)
    statistic_a = model_statistic(stats_a, relevant, full=False)
    statistic_b = model_statistic(stats_b, relevant, full=False)
    common_a, common_b = baseline_pairs.subset(common), other_pairs.subset(common)

    def decides(pairs: ScoredPairs, m: int) -> bool:  # writes node m for some gold pair (a labeller without reasoning writes none)
        return pairs.node_missing[:, m].sum() < (~np.isnan(pairs.node_correct[:, m])).sum()

    decided = [m for m in range(len(common_a.node_names)) if decides(common_a, m) and decides(common_b, m)]

    def paired(weights: np.ndarray) -> dict[str, np.ndarray]:
        a, b = statistic_a(weights), statistic_b(weights)
        out = {}
        for name in DIFFERENCES:
            out[f"{name}_difference"] = b[name] - a[name]
            out[f"{name}_baseline"] = a[name]
            out[f"{name}_other"] = b[name]
        if decided:
            out["node_accuracy_difference"] = node_accuracy(weights, stats_b.nodes[:, decided]) - node_accuracy(weights, stats_a.nodes[:, decided])
        return out

    intervals = bootstrap(paired, stats_a.n_queries, n_bootstrap, seed, level)
    return Comparison(
        baseline=baseline,
        other=other,
        n_pairs=int(common.sum()),
        n_queries=stats_a.n_queries,
        metrics=intervals,
        mcnemar=M.mcnemar(common_a.label == common_a.gold, common_b.label == common_b.gold),
        verdict=verdict(baseline, other, intervals["macro_f1_difference"]),
        node_names=tuple(common_a.node_names[m] for m in decided),
    )


# ---------------------------------------------------------------- everything


def resolve_lineage(names: list[str], baseline: str, lineage: tuple[str, ...]) -> tuple[str, ...]:
    """The lineage's models in stage order (empty `lineage`: the models other than `baseline`, in
    order), after checking that `baseline` and `lineage` name models of `names`."""
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the models {names}")
    if len(lineage) == 1:
        raise ValueError(f"lineage {list(lineage)} has one stage; name at least two, in order, e.g. sft,grpo")
    lineage = lineage or tuple(name for name in names if name != baseline)
    unknown = [name for name in lineage if name not in names]
    if unknown:
        raise ValueError(f"lineage names {unknown}, which are not models; models: {names}")
    if len(set(lineage)) != len(lineage):
        raise ValueError(f"lineage {list(lineage)} names a model twice; give each stage once, in order")
    return lineage


def majority_class(pairs: ScoredPairs, label_set: LabelSet) -> ScoredPairs:
    """A predictor of the most frequent gold label (ties to the lower gain, as in gold) for every
    gold pair of `pairs`, with the gold label shares as its probabilities and no node outputs."""
    n, n_classes = len(pairs.gold), len(label_set.names)
    shares = np.bincount(pairs.gold, minlength=n_classes) / n
    gains = np.array([label_set.gains[name] for name in label_set.names])
    tied = np.flatnonzero(shares == shares.max())
    majority = int(tied[np.argmin(gains[tied])])
    return replace(
        pairs,
        covered=np.ones(n, dtype=bool),
        label=np.full(n, majority),
        probs=np.tile(shares, (n, 1)),
        expected_gain=np.full(n, shares @ gains),
        node_names=(),
        node_correct=np.zeros((n, 0)),
        node_missing=np.zeros((n, 0), dtype=bool),
    )


@dataclass(frozen=True)
class GoldSummary:
    n_pairs: int
    n_judgments: int
    n_pairs_with_several_judgments: int
    n_ties: int
    annotators: tuple[str, ...]


@dataclass(frozen=True)
class EvaluationResult:
    """All models, their comparisons against the baseline and along the lineage, the majority-class
    floor, and the settings. node_descriptions: node name -> the graph's description of it. humans: the
    judges' agreement among themselves on every gold pair with several judgments (the ceiling; empty
    when no pair has several), `agreement.HUMANS`-prefixed metrics."""

    label_set: str
    labels: tuple[str, ...]
    relevant: tuple[str, ...]
    gold: GoldSummary
    models: tuple[ModelEvaluation, ...]
    baseline: str
    comparisons: tuple[Comparison, ...]
    lineage: tuple[str, ...]
    lineage_comparisons: tuple[Comparison, ...]
    majority: ModelEvaluation
    humans: dict[str, Interval]
    node_descriptions: dict[str, str]
    k: int
    n_bootstrap: int
    seed: int
    level: float
    sources: dict[str, str]


def evaluate(
    predictions: dict[str, pa.Table],
    judgments: pa.Table,
    label_set: LabelSet,
    graph: ReasoningGraph,
    gold_nodes: pa.Table | None = None,
    queries: pa.Table | None = None,
    catalog: pa.Table | None = None,
    annotators: tuple[str, ...] = (),
    include_weak: bool = False,
    k: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    sources: dict[str, str] | None = None,
    baseline: str | None = None,
    lineage: tuple[str, ...] = (),
) -> EvaluationResult:
    """Evaluate in-memory tables: `predictions` (name -> RELEVANCE-schema table) against `judgments`
    (JUDGMENTS schema), with optional GOLD_NODES, QUERIES and CATALOG tables. `baseline` (default:
    the first model) is compared with every other model; `lineage` (default: the other models in
    order) is compared stage by stage."""
    if not predictions:
        raise ValueError("evaluate needs at least one prediction table")
    names = list(predictions)
    baseline = baseline or names[0]
    lineage = resolve_lineage(names, baseline, tuple(lineage))
    baseline_steps = [(baseline, name) for name in names if name != baseline]
    lineage_steps = list(zip(lineage, lineage[1:]))
    sources = dict(sources or {})
    gold: Gold = gold_from_judgments(judgments, label_set, annotators, include_weak, sources.get("gold", "gold"))
    context: Context = build_context(graph, gold_nodes, queries, catalog, sources.get("gold_nodes", "gold_nodes"))
    joined: dict[str, ScoredPairs] = {}
    models = []
    steps = dict.fromkeys(baseline_steps + lineage_steps)  # a lineage step that is also a baseline comparison runs once
    # every model, every comparison and the majority class: each a query bootstrap
    bar = progress(desc=f"evaluate ({n_bootstrap} bootstrap replicates each)", total=len(names) + len(steps) + 1, unit="evaluation")
    for name, table in predictions.items():
        model = predictions_from_table(name, table, label_set, sources.get(name, name))
        joined[name], n_without_gold = join(gold, model, context, graph)
        models.append(evaluate_model(name, joined[name], n_without_gold, label_set, k, n_bootstrap, seed, level))
        bar.update()
    compared: dict[tuple[str, str], Comparison] = {}
    for before, after in steps:
        compared[before, after] = compare(before, joined[before], after, joined[after], label_set, k, n_bootstrap, seed, level)
        bar.update()
    floor = majority_class(joined[baseline], label_set)
    majority = evaluate_pairs(f"majority class ({label_set.names[floor.label[0]]})", floor, label_set, k, n_bootstrap, seed, level)
    bar.update()
    bar.close()
    return EvaluationResult(
        label_set=label_set.name,
        labels=tuple(label_set.names),
        relevant=tuple(label_set.relevant),
        gold=GoldSummary(
            n_pairs=len(gold.pairs),
            n_judgments=gold.n_judgments,
            n_pairs_with_several_judgments=int((gold.pairs["n_judgments"] > 1).sum()),
            n_ties=int(gold.pairs["tied"].sum()),
            annotators=gold.annotators,
        ),
        models=tuple(models),
        baseline=baseline,
        comparisons=tuple(compared[step] for step in baseline_steps),
        lineage=lineage,
        lineage_comparisons=tuple(compared[step] for step in lineage_steps),
        majority=majority,
        # the floor covers every gold pair, so its judges' metrics are those of all pairs judged several times
        humans={name: value for name, value in majority.metrics.items() if name.startswith(A.HUMANS)},
        node_descriptions={node.name: node.description for node in graph.nodes if node.description},
        k=k,
        n_bootstrap=n_bootstrap,
        seed=seed,
        level=level,
        sources=sources,
    )
