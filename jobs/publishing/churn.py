"""Churn of one night's relevance table against the last published night (`jobs/export.py`, step 3).

Joins and aggregates run in DuckDB; Python only sees the aggregates. The report is written as
churn.json (machines), churn.md and churn.html (people) and churn.png (transition heatmaps); each model
is named by its model_name and model_version.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.pages import page, table
from schemas.graph import LabelSet
from schemas.tables import QUERIES

CHURN_JSON = "churn.json"
CHURN_MARKDOWN = "churn.md"
CHURN_PAGE = "churn.html"
CHURN_PLOT = "churn.png"
UNKNOWN_SEGMENT = "unknown"
SEGMENTS = (*QUERIES.column("segment").allowed, UNKNOWN_SEGMENT)

PAIRS_SQL = """
SELECT coalesce(c.model_name, p.model_name) AS model_name,
       p.label AS previous_label,
       c.label AS current_label,
       abs(c.expected_gain - p.expected_gain) AS gain_change,
       coalesce(c.query_id, p.query_id) AS query_id,
       p.product_id IS NOT NULL AS in_previous,
       c.product_id IS NOT NULL AS in_current
FROM current_rows c
FULL OUTER JOIN previous_rows p
  ON c.model_name = p.model_name AND c.query = p.query AND c.product_id = p.product_id
"""
COUNTS_SQL = """
SELECT model_name,
       count(*) FILTER (WHERE in_previous) AS pairs_previous,
       count(*) FILTER (WHERE in_current) AS pairs_current,
       count(*) FILTER (WHERE in_previous AND in_current) AS pairs_both,
       count(*) FILTER (WHERE in_current AND NOT in_previous) AS pairs_added,
       count(*) FILTER (WHERE in_previous AND NOT in_current) AS pairs_removed,
       avg(gain_change) AS mean_abs_expected_gain_change,
       quantile_cont(gain_change, 0.95) AS p95_abs_expected_gain_change
FROM pairs GROUP BY model_name ORDER BY model_name
"""
TRANSITIONS_SQL = """
SELECT model_name, previous_label, current_label, count(*) AS pairs
FROM pairs WHERE in_previous AND in_current GROUP BY ALL ORDER BY ALL
"""
SEGMENTS_SQL = """
SELECT p.model_name, coalesce(q.segment, '{unknown}') AS segment,
       count(*) AS pairs, count(*) FILTER (WHERE p.previous_label <> p.current_label) AS changed
FROM pairs p LEFT JOIN query_segments q ON q.query_id = p.query_id
WHERE p.in_previous AND p.in_current GROUP BY ALL ORDER BY ALL
"""
MODELS_SQL = """
SELECT model_name, list(DISTINCT model_version ORDER BY model_version) AS versions,
       list(DISTINCT label_set ORDER BY label_set) AS label_sets
FROM {rows} GROUP BY model_name
"""

# Spark's SQL spells these differently from DuckDB's (no GROUP BY ALL with ORDER BY ALL, no ordered list aggregate).
GROUP_TRANSITIONS = "GROUP BY model_name, previous_label, current_label ORDER BY model_name, previous_label, current_label"
GROUP_SEGMENTS = f"GROUP BY p.model_name, coalesce(q.segment, '{UNKNOWN_SEGMENT}') ORDER BY 1, 2"
MODELS_SPARK_SQL = """
SELECT model_name, sort_array(collect_set(model_version)) AS versions, sort_array(collect_set(label_set)) AS label_sets
FROM {rows} GROUP BY model_name
"""


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _changed_by(groups: dict[str, tuple[int, int]], order: list[str]) -> dict[str, dict]:
    """{group: {pairs, changed, share}} for `groups` of (pairs, changed): those in `order` first, in
    that order, then any others sorted (a value outside the declared vocabulary is shown, not lost)."""
    names = [name for name in order if name in groups] + sorted(set(groups) - set(order))
    return {
        name: {"pairs": groups[name][0], "changed": groups[name][1], "share": _share(groups[name][1], groups[name][0])}
        for name in names
    }


def query_segments(queries: pa.Table, root: str) -> pa.Table:
    """(query_id, segment) of the queries table, refusing a repeated query_id (it would multiply pairs)."""
    counts = queries.group_by("query_id").aggregate([("query_id", "count")])
    repeated = counts.filter(pc.greater(counts["query_id_count"], 1))["query_id"].to_pylist()
    if repeated:
        raise ValueError(f"queries table under {root}: query_id is not unique, e.g. {repeated[:3]}")
    return queries.select(["query_id", "segment"])


def churn_report(
    current: pa.Table,
    previous: pa.Table | None,
    previous_ds: dt.date | None,
    day: dt.date,
    segments: pa.Table | None,
    label_sets: dict[str, LabelSet],
) -> dict:
    """The churn of `current` (RELEVANCE rows of `day`) against `previous` (the last published night).

    `segments`: (query_id, segment) rows, or None (no segment breakdown). `label_sets` orders the
    labels of the transition matrices; label sets the rows name and it lacks are loaded by name.
    """
    import duckdb

    report: dict[str, Any] = {"ds": day.isoformat(), "previous_ds": None, "first_night": previous is None, "models": {}}
    if previous is None:
        return report
    report["previous_ds"] = previous_ds.isoformat()
    columns = ["model_name", "model_version", "label_set", "query", "query_id", "product_id", "label", "expected_gain"]
    with duckdb.connect() as con:
        con.register("current_rows", current.select(columns))
        con.register("previous_rows", previous.select(columns))
        con.register("query_segments", segments if segments is not None else pa.table(
            {"query_id": pa.array([], pa.string()), "segment": pa.array([], pa.string())}
        ))
        con.execute(f"CREATE TEMP TABLE pairs AS {PAIRS_SQL}")
        counts = con.sql(COUNTS_SQL).to_arrow_table().to_pylist()
        transitions = con.sql(TRANSITIONS_SQL).to_arrow_table().to_pylist()
        by_segment = con.sql(SEGMENTS_SQL.format(unknown=UNKNOWN_SEGMENT)).to_arrow_table().to_pylist()
        models = {
            night: {row["model_name"]: row for row in con.sql(MODELS_SQL.format(rows=view)).to_arrow_table().to_pylist()}
            for night, view in (("previous", "previous_rows"), ("current", "current_rows"))
        }
    return report_from_aggregates(report, counts, transitions, by_segment if segments is not None else None, models, label_sets)


def churn_report_spark(current, previous, previous_ds: dt.date | None, day: dt.date, segments, label_sets: dict[str, LabelSet]) -> dict:
    """`churn_report` of Spark frames: the same joins and aggregates run by Spark (the SQL above in Spark's dialect),
    so a night of any size is compared without its rows leaving the executors; the driver gets the aggregates."""
    report: dict[str, Any] = {"ds": day.isoformat(), "previous_ds": None, "first_night": previous is None, "models": {}}
    if previous is None:
        return report
    report["previous_ds"] = previous_ds.isoformat()
    spark = current.sparkSession
    columns = ["model_name", "model_version", "label_set", "query", "query_id", "product_id", "label", "expected_gain"]
    current.select(*columns).createOrReplaceTempView("current_rows")
    previous.select(*columns).createOrReplaceTempView("previous_rows")
    spark.sql(PAIRS_SQL).createOrReplaceTempView("pairs")

    def rows(sql: str) -> list[dict]:
        return [row.asDict(recursive=True) for row in spark.sql(sql).collect()]

    counts = rows(COUNTS_SQL.replace("quantile_cont(gain_change, 0.95)", "percentile(gain_change, 0.95)"))
    transitions = rows(TRANSITIONS_SQL.replace("GROUP BY ALL ORDER BY ALL", GROUP_TRANSITIONS))
    by_segment = None
    if segments is not None:
        segments.createOrReplaceTempView("query_segments")
        by_segment = rows(SEGMENTS_SQL.format(unknown=UNKNOWN_SEGMENT).replace("GROUP BY ALL ORDER BY ALL", GROUP_SEGMENTS))
    models = {night: {row["model_name"]: row for row in rows(MODELS_SPARK_SQL.format(rows=view))}
              for night, view in (("previous", "previous_rows"), ("current", "current_rows"))}
    return report_from_aggregates(report, counts, transitions, by_segment, models, label_sets)


def report_from_aggregates(report: dict, counts: list[dict], transitions: list[dict], by_segment: list[dict] | None,
                           models: dict[str, dict], label_sets: dict[str, LabelSet]) -> dict:
    """`report` filled with each model's churn from the aggregates of either engine (`by_segment` None: no segments)."""
    for row in counts:
        name = row.pop("model_name")
        models_by_night = {night: models[night].get(name, {"versions": [], "label_sets": []}) for night in models}
        report["models"][name] = _model_churn(
            row,
            models_by_night,
            [t for t in transitions if t["model_name"] == name],
            [s for s in by_segment if s["model_name"] == name] if by_segment is not None else None,
            label_sets,
        )
    return report


def _model_churn(
    counts: dict, models: dict[str, dict], transitions: list[dict], by_segment: list[dict] | None,
    label_sets: dict[str, LabelSet],
) -> dict:
    """One model's churn from its rows of the DuckDB aggregates (`by_segment` None: no segment breakdown)."""
    previous_model, current_model = models["previous"], models["current"]
    set_names = list(dict.fromkeys(current_model["label_sets"] + previous_model["label_sets"]))
    labels = list(dict.fromkeys(
        label for set_name in set_names for label in (label_sets.get(set_name) or LabelSet.load(set_name)).names
    ))
    matrix = {source: {target: 0 for target in labels} for source in labels}
    for transition in transitions:
        matrix[transition["previous_label"]][transition["current_label"]] = transition["pairs"]
    by_label = {
        source: (sum(targets.values()), sum(targets.values()) - targets[source]) for source, targets in matrix.items()
    }
    changed = sum(changed for _, changed in by_label.values())
    return {
        "previous_model_versions": previous_model["versions"],
        "model_versions": current_model["versions"],
        "model_version_changed": previous_model["versions"] != current_model["versions"],
        **{key: value for key, value in counts.items() if key.startswith("pairs_")},
        "label_changed": {"pairs": changed, "share": _share(changed, counts["pairs_both"])},
        "labels": labels,
        "transitions": matrix,
        "changed_by_previous_label": _changed_by(by_label, labels),
        "changed_by_segment": None if by_segment is None else _changed_by(
            {s["segment"]: (s["pairs"], s["changed"]) for s in by_segment}, list(SEGMENTS)
        ),
        "abs_expected_gain_change": {
            "mean": counts["mean_abs_expected_gain_change"], "p95": counts["p95_abs_expected_gain_change"],
        },
    }


def churn_lines(report: dict) -> list[str]:
    """The churn headline for the console: one line per model, or that this is the first night."""
    if report["previous_ds"] is None:
        return ["churn: first night (no earlier partition published)"]
    return [
        f"churn vs ds={report['previous_ds']} ({name}): label changed on {_percent(model['label_changed']['share'])} "
        "of pairs in both nights"
        for name, model in report["models"].items()
    ]


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


@dataclass(frozen=True)
class Block:
    """A piece of the churn report, rendered as Markdown (churn.md) and HTML (churn.html) alike."""

    kind: str  # h2, h3, p, table or image (text: the image file)
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()


def model_title(name: str, model: dict) -> str:
    """The model as the report names it: its model_name and model_version (both nights' when it changed),
    since a folder name such as `model` says nothing about which policy labelled the night."""
    before, after = (", ".join(model[key]) or "-" for key in ("previous_model_versions", "model_versions"))
    return f"{name}, model_version {after}" if before == after else f"{name}, model_version {before} → {after}"


def _changed_table(group: str, groups: dict[str, dict]) -> Block:
    rows = tuple((name, g["pairs"], g["changed"], _percent(g["share"])) for name, g in groups.items())
    return Block("table", header=(group, "pairs", "changed", "share"), rows=rows)


def churn_title(report: dict) -> str:
    if report["first_night"]:
        return f"Relevance churn: ds={report['ds']}"
    return f"Relevance churn: ds={report['ds']} vs ds={report['previous_ds']}"


def churn_blocks(report: dict, has_plot: bool) -> list[Block]:
    """The report for people, below its title (churn.json holds the same numbers for machines)."""
    if report["first_night"]:
        return [Block("p", "First night: no partition with an earlier ds is published under this root, so there is nothing to compare with.")]
    blocks = []
    for name, model in report["models"].items():
        changed = "changed" if model["model_version_changed"] else "unchanged"
        counts = ("pairs_previous", "pairs_current", "pairs_both", "pairs_added", "pairs_removed")
        gain = model["abs_expected_gain_change"]
        gain_text = "-" if gain["mean"] is None else f"mean {gain['mean']:.4f}, p95 {gain['p95']:.4f}"
        blocks += [
            Block("h2", model_title(name, model)),
            Block("p", f"Model version {changed} since ds={report['previous_ds']}."),
            Block("table", header=("pairs previous night", "pairs this night", "in both", "added", "removed"),
                  rows=(tuple(model[key] for key in counts),)),
            Block("p", f"Label changed on {model['label_changed']['pairs']} of {model['pairs_both']} pairs present both nights "
                       f"({_percent(model['label_changed']['share'])}). |Δ expected_gain| on those pairs: {gain_text}."),
            Block("h3", "Transitions (rows: previous label, columns: this night's label)"),
            Block("table", header=("previous \\ current", *model["labels"]),
                  rows=tuple((source, *targets.values()) for source, targets in model["transitions"].items())),
            Block("h3", "Label changed, by previous label"),
            _changed_table("previous label", model["changed_by_previous_label"]),
            Block("h3", "Label changed, by query segment"),
            Block("p", "No queries table was given: no segment breakdown.") if model["changed_by_segment"] is None
            else _changed_table("segment", model["changed_by_segment"]),
        ]
    if has_plot:
        blocks.append(Block("image", CHURN_PLOT))
    return blocks


def churn_markdown(report: dict, has_plot: bool) -> str:
    """churn.md: the report for people (churn.json holds the same numbers for machines)."""
    lines = [f"# {churn_title(report)}", ""]
    for block in churn_blocks(report, has_plot):
        if block.kind in ("h2", "h3"):
            lines += [f"{'#' * int(block.kind[1])} {block.text}", ""]
        elif block.kind == "p":
            lines += [block.text, ""]
        elif block.kind == "table":
            lines += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in block.rows] + [""]
        else:
            lines += [f"![label transitions]({block.text})", ""]
    return "\n".join(lines)


def churn_page(report: dict, has_plot: bool) -> str:
    """churn.html: churn.md's content as a page (the heatmap linked from the same folder)."""
    body = []
    for block in churn_blocks(report, has_plot):
        if block.kind in ("h2", "h3", "p"):
            body.append(f"<{block.kind}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "table":
            body.append(table(block.header, block.rows))
        else:
            body.append(f"<img alt='label transitions' src='{html.escape(block.text)}'>")
    return page(churn_title(report), body)


def plot_transitions(report: dict, path: Path) -> None:
    """One heatmap per model: colour = share of the previous label's pairs, text = pair counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    size = 1.2 + 0.9 * max(len(model["labels"]) for model in models.values())
    figure, axes_row = plt.subplots(1, len(models), figsize=((size + 1.2) * len(models), size), squeeze=False)
    for axes, (name, model) in zip(axes_row[0], models.items()):
        labels = model["labels"]
        counts = np.array([[model["transitions"][s][t] for t in labels] for s in labels], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for row in range(len(labels)):
            for column in range(len(labels)):
                axes.text(column, row, f"{int(counts[row, column]):d}", ha="center", va="center",
                          color="white" if shares[row, column] > 0.6 else "black")
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel(f"label on {report['ds']}")
        axes.set_ylabel(f"label on {report['previous_ds']}")
        axes.set_title(model_title(name, model))
        figure.colorbar(image, ax=axes, label="share of previous label's pairs")
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_churn(report: dict, folder: Path) -> list[str]:
    """churn.json, churn.md, churn.html and (when there is something to compare) churn.png; returns the file names."""
    has_plot = bool(report["models"])
    (folder / CHURN_JSON).write_text(json.dumps(report, indent=2, allow_nan=False))
    (folder / CHURN_MARKDOWN).write_text(churn_markdown(report, has_plot))
    (folder / CHURN_PAGE).write_text(churn_page(report, has_plot))
    if has_plot:
        plot_transitions(report, folder / CHURN_PLOT)
    return [CHURN_JSON, CHURN_MARKDOWN, CHURN_PAGE] + ([CHURN_PLOT] if has_plot else [])
