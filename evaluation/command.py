"""`relevance evaluate`: the typed config and `run(config)` (read tables, evaluate, write reports).

CLI (wired in jobs/cli.py): `relevance evaluate --pred NAME=PATH [--pred NAME=PATH ...] --gold PATH
[--gold-source judgments|nodes] [--gold-nodes PATH] [--queries PATH] [--catalog PATH] [--label-set wands] [--k 10]
[--n-bootstrap 1000] [--seed 0] [--out DIR] [--config FILE.yaml] [--set KEY=VALUE ...]`; each
`--pred NAME=PATH` becomes the override `predictions.NAME=PATH`, in order. `--set baseline=NAME` picks
the model every other is compared with (default: the first); `--set lineage=A,B,C` the stages compared
one after the other (default: the models other than the baseline, in order).
`--gold-source nodes` takes gold labels from GOLD_NODES instead of a JUDGMENTS table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evaluation.evaluate import EvaluationResult, evaluate, resolve_lineage
from evaluation.inputs import JUDGMENT_COLUMNS, PREDICTION_COLUMNS, judgments_from_gold_nodes, read_input
from evaluation.report import write_reports
from schemas.config import ConfigError, help_field
from schemas.graph import DEFAULT_GRAPH, LabelSet, ReasoningGraph
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES, RELEVANCE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Config of `relevance evaluate`."""

    predictions: dict[str, str] = help_field(
        "model name -> prediction table in the RELEVANCE schema (a .parquet file, the table's folder or a "
        "data root holding relevance/), in order",
        {},
    )
    baseline: str = help_field("the model every other model is compared with (a name of `predictions`); empty: the first", "")
    lineage: tuple[str, ...] = help_field(
        "models in stage order, e.g. sft,grpo,student: each stage is compared with the one before it; empty: the "
        "models other than the baseline, in the order of `predictions`",
        (),
    )
    gold: str = help_field("gold JUDGMENTS table (a .parquet file, the table's folder or a data root)", "")
    gold_source: Literal["judgments", "nodes"] = help_field(
        "where gold labels come from: 'judgments' (the gold table, majority vote per pair) or 'nodes' (the "
        "GOLD_NODES table's label node, else the label set's rule on ms/ma; `gold` is then not needed)",
        "judgments",
    )
    gold_nodes: str | None = help_field("optional GOLD_NODES table, for per-node accuracy", None)
    queries: str | None = help_field("optional QUERIES table, for head/torso/tail segments", None)
    catalog: str | None = help_field("optional CATALOG table, for product-type segments", None)
    label_set: str = help_field("label set name (wands, esci) or path to a label-set YAML", "wands")
    graph: str = help_field("reasoning graph name or YAML path (node kinds for node accuracy)", DEFAULT_GRAPH)
    annotators: tuple[str, ...] = help_field(
        "judgments of these annotators are gold (majority vote per pair); empty: every non-weak judgment", ()
    )
    include_weak: bool = help_field("also count weak (engagement-derived) judgments as gold", False)
    k: int = help_field("rank cutoff of NDCG@k", 10)
    n_bootstrap: int = help_field("query-bootstrap replicates for intervals and paired comparisons", 1000)
    seed: int = help_field("seed of the bootstrap (same seed, same resampled queries)", 0)
    level: float = help_field("confidence level of the intervals", 0.95)
    out: str = help_field("folder for report.md, report.html, metrics.json and plots/", "evaluation_report")

    def __post_init__(self) -> None:
        if not self.predictions:
            raise ConfigError("predictions: give at least one model, e.g. predictions.model_a=path/to/relevance")
        bad = [name for name in self.predictions if not name or not str(name).strip() or "=" in str(name)]
        if bad:
            raise ConfigError(f"predictions: model names must be non-empty and contain no '=': {bad}")
        try:
            resolve_lineage(list(self.predictions), self.baseline or next(iter(self.predictions)), tuple(self.lineage))
        except ValueError as error:
            raise ConfigError(f"baseline/lineage: {error}") from None
        if self.gold_source == "judgments" and not self.gold:
            raise ConfigError("gold: give the JUDGMENTS table, e.g. gold=data/judgments (or gold_source=nodes)")
        if self.gold_source == "nodes" and not self.gold_nodes:
            raise ConfigError("gold_nodes: gold_source=nodes reads gold labels from GOLD_NODES; give gold_nodes=PATH")
        if self.gold_source not in ("judgments", "nodes"):
            raise ConfigError(f"gold_source: use 'judgments' or 'nodes', got {self.gold_source!r}")
        if self.k < 1:
            raise ConfigError(f"k: NDCG@k needs k >= 1, got {self.k}")
        if self.n_bootstrap < 1:
            raise ConfigError(f"n_bootstrap: need at least 1 replicate (1000 is a good default), got {self.n_bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"level: a confidence level strictly between 0 and 1 (e.g. 0.95), got {self.level}")
        for field, loader in (("label_set", LabelSet.load), ("graph", ReasoningGraph.load)):
            try:
                loader(getattr(self, field))
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"{field}: {error}") from None


def run(config: EvaluateConfig) -> EvaluationResult:
    """Read the configured tables, evaluate, and write report.md, report.html and metrics.json."""
    label_set = LabelSet.load(config.label_set)
    graph = ReasoningGraph.load(config.graph)
    optional = {
        name: read_input(table, path, columns) if path else None
        for name, table, path, columns in (
            ("gold_nodes", GOLD_NODES, config.gold_nodes, GOLD_NODES.names),
            ("queries", QUERIES, config.queries, ["query_id", "segment"]),
            ("catalog", CATALOG, config.catalog, ["product_id", "product_type"]),
        )
    }
    if config.gold_source == "nodes":
        judgments = judgments_from_gold_nodes(optional["gold_nodes"], label_set, graph)
        gold_path = f"{config.gold_nodes} (label node of gold_nodes)"
    else:
        judgments = read_input(JUDGMENTS, config.gold, JUDGMENT_COLUMNS)
        gold_path = str(config.gold)
    sources = {"gold": gold_path, **{name: str(path) for name, path in config.predictions.items()}}
    if config.gold_nodes:
        sources["gold_nodes"] = str(config.gold_nodes)
    result = evaluate(
        predictions={name: read_input(RELEVANCE, path, PREDICTION_COLUMNS) for name, path in config.predictions.items()},
        judgments=judgments,
        label_set=label_set,
        graph=graph,
        annotators=tuple(config.annotators),
        include_weak=config.include_weak,
        k=config.k,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
        level=config.level,
        sources=sources,
        baseline=config.baseline or None,
        lineage=tuple(config.lineage),
        **optional,
    )
    write_reports(result, Path(config.out))
    log.info("evaluation report: %s (and report.md, metrics.json)", Path(config.out) / "report.html")
    return result
