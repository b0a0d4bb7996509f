"""CoT targets rendered from gold nodes (`jobs/datasets.py`, step 7): the only Python per row."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from jobs.training_data.labels import GOLD
from schemas.graph import ReasoningGraph
from training.cot import parse_cot, render_cot

PROBLEM = "_nodes_problem"  # working column: why gold nodes did not render (never written)


def _render_batch(nodes: pd.Series, graph: ReasoningGraph, order: str, labels: Sequence[str]) -> pd.DataFrame:
    """One Arrow batch of gold-node maps (dicts or None) -> (target, problem)."""
    targets, problems = [], []
    for values in nodes:
        target = problem = None
        if values is not None:
            try:
                text = render_cot(values, graph, order)
            except ValueError as error:
                problem = str(error)
            else:
                parsed = parse_cot(text, graph, order, labels)
                if parsed.well_formed:
                    target = text
                else:
                    problem = "; ".join(parsed.problems)
        targets.append(target)
        problems.append(problem)
    return pd.DataFrame({"target": targets, "problem": problems})


def render_targets(examples, graph: ReasoningGraph, order: str, labels: Sequence[str]):
    """`_gold_nodes` -> `nodes` (the graph's nodes), `target` (render_cot) and `_nodes_problem`.

    Gold nodes that do not render, or whose text does not parse back strictly (a value invalid for
    its node, a label outside `labels`), give null `nodes` / `target` and the reason in
    `_nodes_problem`.
    """
    from pyspark.sql import functions as F

    def render(nodes: pd.Series) -> pd.DataFrame:
        return _render_batch(nodes, graph, order, list(labels))

    rendered = F.pandas_udf(render, "struct<target:string,problem:string>")(F.col(GOLD))
    names = F.array(*[F.lit(name) for name in graph.node_names])
    kept_nodes = F.map_filter(F.col(GOLD), lambda key, _: F.array_contains(names, key))
    return (
        examples.withColumn("_rendered", rendered)
        .withColumn(PROBLEM, F.col("_rendered.problem"))
        .withColumn("target", F.col("_rendered.target"))
        .withColumn("nodes", F.when(F.col(PROBLEM).isNull(), kept_nodes))
        .drop("_rendered")
    )
