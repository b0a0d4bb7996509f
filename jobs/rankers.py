"""`relevance rankers`: judge rankers offline on their result lists under one label source.

    relevance rankers --lists ranked_lists/ --labels judgments --label-path world --k 10 --out rankers_report
    relevance rankers --logs world --labels relevance --label-path models/sft_policy --out rankers_report

The lists are a RANKED_LISTS table (`--lists`) or the lists an A/B test showed (`--logs`: a folder holding
search_impressions and experiment_assignment, e.g. the world or one experiment of a series), one ranker per
variant. The labels are human judgments (a JUDGMENTS table; every non-weak annotator but `gold`, or the
`annotators` chosen), gold (a GOLD_NODES table) or a relevance table (a model's, or a multi-judge combination's).
The metrics, the unjudged policy and the intervals: `evaluation/rankers.py`. Writes rankers.json and rankers.html.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from evaluation.inputs import read_input
from evaluation.rankers import (
    METRICS,
    UNJUDGED_POLICIES,
    LabelSource,
    RankerEvaluation,
    evaluate_rankers,
    evaluation_dict,
    labels_from_gold_nodes,
    labels_from_judgments,
    labels_from_relevance,
    lists_from_logs,
    lists_from_ranked,
)
from jobs.pages import page, table
from schemas.config import ConfigError, help_field
from schemas.graph import DEFAULT_GRAPH, LabelSet, ReasoningGraph
from schemas.provenance import Provenance
from schemas.tables import EXPERIMENT_ASSIGNMENT, GOLD_NODES, JUDGMENTS, RANKED_LISTS, RELEVANCE, SEARCH_IMPRESSIONS

log = logging.getLogger(__name__)

LABEL_KINDS = ("judgments", "gold", "relevance")
RANKERS_PAGE = "rankers.html"
RANKERS_JSON = "rankers.json"
METRIC_NAMES = {"ndcg": "NDCG@{k}", "precision": "P@{k}", "mean_gain": "mean gain@{k}"}


@dataclass(frozen=True)
class RankersConfig:
    """Config of `relevance rankers`."""

    label_path: str = help_field("The label source's table (a .parquet file, the table's folder or a data root).")
    lists: str | None = help_field("RANKED_LISTS table (a .parquet file, the table's folder or a data root); or give `logs`.", None)
    logs: str | None = help_field("Folder holding search_impressions and experiment_assignment: judge each A/B variant's logged lists.", None)
    experiment_id: str | None = help_field("With `logs`: the experiment to judge when the assignment holds several.", None)
    labels: Literal["judgments", "gold", "relevance"] = help_field("Label source kind: judgments (human), gold (GOLD_NODES) or relevance.",
                                                                   "judgments")
    label_name: str = help_field("Name of the label source in the report (empty: the kind).", "")
    annotators: tuple[str, ...] = help_field("With judgments: the annotators to use (empty: every non-weak one except 'gold').", ())
    label_set: str = help_field("Label set (wands, esci or a YAML path): its gains and relevant labels.", "wands")
    graph: str = help_field("Reasoning graph of the gold nodes (its label node).", DEFAULT_GRAPH)
    k: int = help_field("Rank cutoff of NDCG@k, P@k and mean gain.", 10)
    unjudged: str = help_field("Unjudged products in the first k: zero (gain 0, keeps its rank) or condense (removed).", "zero",
                               choices=UNJUDGED_POLICIES)
    n_bootstrap: int = help_field("Query-bootstrap replicates.", 1000)
    seed: int = help_field("Bootstrap seed.", 0)
    level: float = help_field("Confidence level of the intervals.", 0.95)
    out: str = help_field("Folder for rankers.json and rankers.html.", "rankers_report")

    def __post_init__(self) -> None:
        if (self.lists is None) == (self.logs is None):
            raise ConfigError("give exactly one of lists (a RANKED_LISTS table) and logs (an A/B test's folder)")
        if self.unjudged not in UNJUDGED_POLICIES:
            raise ConfigError(f"unjudged: {self.unjudged!r} unknown; use one of {list(UNJUDGED_POLICIES)}")
        if self.k < 1 or self.n_bootstrap < 1 or not 0 < self.level < 1:
            raise ConfigError(f"k and n_bootstrap must be >= 1 and level in (0, 1), got {self.k}, {self.n_bootstrap}, {self.level}")


def read_labels(kind: str, path: str | Path, label_set: LabelSet, graph: ReasoningGraph, name: str = "",
                annotators: tuple[str, ...] = ()) -> LabelSource:
    """A label source from its table: human judgments, gold nodes or a relevance table."""
    name = name or kind
    if kind == "judgments":
        frame = read_input(JUDGMENTS, path, ["query_id", "product_id", "label", "label_set", "annotator", "is_weak"]).to_pandas()
        chosen = frame["annotator"].isin(annotators) if annotators else (~frame["is_weak"] & (frame["annotator"] != "gold"))
        if not chosen.any():
            raise ConfigError(f"{path}: no judgments of annotators {list(annotators) or 'non-weak, not gold'}; "
                              f"annotators present: {sorted(frame['annotator'].unique())}")
        return labels_from_judgments(frame[chosen].reset_index(drop=True), label_set, name)
    if kind == "gold":
        return labels_from_gold_nodes(read_input(GOLD_NODES, path, ["query_id", "product_id", "nodes"]), label_set, graph, name)
    if kind == "relevance":
        columns = ["query_id", "product_id", "label", "label_set", "expected_gain", "ds"]
        return labels_from_relevance(read_input(RELEVANCE, path, columns).to_pandas(), label_set, name)
    raise ConfigError(f"labels: {kind!r} unknown; use one of {list(LABEL_KINDS)}")


def read_ranked_lists(path: str | Path) -> pd.DataFrame:
    return lists_from_ranked(read_input(RANKED_LISTS, path, RANKED_LISTS.names).to_pandas())


def read_logged_lists(folder: str | Path, experiment_id: str | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Each variant's logged lists of one experiment (`evaluation.rankers.lists_from_logs`)."""
    assignment = read_input(EXPERIMENT_ASSIGNMENT, folder, ["experiment_id", "user_id", "variant", "first_exposure_ts"]).to_pandas()
    experiments = sorted(assignment["experiment_id"].unique())
    if experiment_id is None and len(experiments) > 1:
        raise ConfigError(f"{folder}: the assignment holds experiments {experiments}; choose one with experiment_id")
    chosen = experiment_id or experiments[0]
    if chosen not in experiments:
        raise ConfigError(f"{folder}: no experiment {chosen!r} in the assignment; experiments: {experiments}")
    impressions = read_input(SEARCH_IMPRESSIONS, folder, ["request_id", "user_id", "query_id", "product_id", "position", "ts"]).to_pandas()
    return lists_from_logs(impressions, assignment[assignment["experiment_id"] == chosen])


def png_html(figure, alt: str) -> str:
    """`figure` as an inline PNG <img> (the figure is closed)."""
    from evaluation.report import png_bytes

    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png_bytes(figure)).decode('ascii')}'>"


def interval_text(interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{interval.estimate:{sign}.4f} [{interval.low:{sign}.4f}, {interval.high:{sign}.4f}]"


def forest_plot(evaluation: RankerEvaluation, metric: str = "ndcg"):
    """Each ranker's metric with its interval, one row per ranker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [scores.ranker for scores in evaluation.rankers]
    intervals = [scores.metrics[metric] for scores in evaluation.rankers]
    figure, axis = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    estimates = [i.estimate for i in intervals]
    errors = [[i.estimate - i.low for i in intervals], [i.high - i.estimate for i in intervals]]
    axis.errorbar(estimates, range(len(names)), xerr=errors, fmt="o", capsize=3)
    axis.set_yticks(range(len(names)), names)
    axis.invert_yaxis()
    axis.set_xlabel(f"{METRIC_NAMES[metric].format(k=evaluation.k)} under {evaluation.label_source} ({intervals[0].level:.0%} CI)")
    return figure


def ranker_tables(evaluation: RankerEvaluation) -> list[str]:
    """The per-ranker table and the pairwise differences, as page blocks."""
    k = evaluation.k
    header = ["ranker", "lists", "queries", *(METRIC_NAMES[m].format(k=k) for m in METRICS), "coverage@k (judged / shown)"]
    rows = [[s.ranker, s.lists, s.queries, *(interval_text(s.metrics[m]) for m in METRICS),
             f"{s.coverage:.1%} ({s.judged} / {s.shown})"] for s in evaluation.rankers]
    differences = [[d.other, d.baseline, METRIC_NAMES[d.metric].format(k=k), interval_text(d.interval, signed=True),
                    "yes" if d.interval.low > 0 or d.interval.high < 0 else "no"] for d in evaluation.differences]
    left_out = "; ".join(f"{reason}: {count}" for reason, count in {**evaluation.queries_left_out, **evaluation.labels_left_out}.items())
    return [
        f"<p>Label source <b>{html.escape(evaluation.label_source)}</b>; unjudged products in the first {k}: "
        f"<b>{html.escape(evaluation.unjudged)}</b> ({'gain 0, keeping their rank' if evaluation.unjudged == 'zero' else 'removed before the cut'}). "
        f"{evaluation.queries_compared} queries compared (every query weighs the same); left out: {html.escape(left_out) or 'none'}.</p>",
        table(header, rows),
        "<h3>Differences (other - baseline, same resampled queries)</h3>",
        table(["other", "baseline", "metric", "difference [CI]", "interval excludes 0"], differences),
    ]


def run(config: RankersConfig) -> RankerEvaluation:
    label_set, graph = LabelSet.load(config.label_set), ReasoningGraph.load(config.graph)
    labels = read_labels(config.labels, config.label_path, label_set, graph, config.label_name, config.annotators)
    if config.lists is not None:
        lists, counts = read_ranked_lists(config.lists), {}
    else:
        lists, counts = read_logged_lists(config.logs, config.experiment_id)
    evaluation = evaluate_rankers(lists, labels, config.k, config.unjudged, config.n_bootstrap, config.seed, config.level)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = Provenance.now()
    (out / RANKERS_JSON).write_text(json.dumps({**evaluation_dict(evaluation), "logged_requests": counts,
                                                "provenance": provenance.line()}, indent=2) + "\n")
    source = f"logged lists of {config.logs}" if config.logs else f"lists of {config.lists}"
    counted = "; ".join(f"{name}: {count}" for name, count in counts.items())
    body = [f"<p class='meta'>{html.escape(provenance.line())}</p>", f"<p>{html.escape(source)}{'; ' + html.escape(counted) if counted else ''}</p>",
            *ranker_tables(evaluation), png_html(forest_plot(evaluation), "NDCG per ranker")]
    (out / RANKERS_PAGE).write_text(page(f"Rankers judged offline under {labels.name}", body))
    for scores in evaluation.rankers:
        log.info(f"{scores.ranker}: NDCG@{config.k} {interval_text(scores.metrics['ndcg'])}, coverage {scores.coverage:.1%}")
    log.info(f"reports: {out / RANKERS_PAGE}, {out / RANKERS_JSON}")
    return evaluation
