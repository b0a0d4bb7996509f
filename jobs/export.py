"""`relevance export --date D`: validate one night's relevance table, publish it atomically, report churn.

1. Read `relevance/ds=D` under the data root with the declared schema, rows sorted by the key, so
   the same input publishes the same parquet and CSV bytes.
2. Validate with great-expectations before anything is written. One suite: the RELEVANCE suite
   compiled from the declaration (`schemas.expectations`: columns, nullability, allowed values,
   bounds, key uniqueness), a non-empty partition, and expectations on columns derived per row in
   DuckDB (`DERIVED_CHECKS`): label_probs sum to 1 within `max_prob_sum_error` and are
   probabilities; label_probs holds exactly the labels of the row's label set, each once (a repeated
   map key counts as wrong); `label` is a label of `label_set` and has the largest probability (ties
   allowed: the scorer breaks them in label-set order); expected_gain = sum of probability x gain
   (within `RECOMPUTE_TOLERANCE`: both come from the same floats); one model_version per
   model_name (two versions of one model in a night mean a half-finished rollout). Labels and gains
   come from each row's `label_set` column, which the scorer wrote with the label set it used, so
   a night holding two models on different label sets validates; `label_set` in the config pins the
   one every row must use. A failure raises `ExportValidationError` naming the partition, each failed
   expectation with its field and a few offending rows; nothing is written then.
3. Churn against the previous night: the newest partition published under the same `out` with
   ds < D (none: the report says it is the first night). Pairs are matched on (model_name, query,
   product_id): a night may hold several models (a policy and its student) and each is compared
   with itself. For each model: label transitions (previous -> current), the share of pairs whose
   label changed by previous label and by query segment (QUERIES.segment joined on query_id,
   'unknown' where the query or its segment is not known), pairs added and removed, mean and p95
   (linear interpolation) of |delta expected_gain|, and whether the model version changed. Joins
   and aggregates run in DuckDB; Python only sees the aggregates.
4. Publish `<out>/relevance/ds=D/` through `schemas.storage.replace_folder`: every file is written
   into a hidden staging folder that is then renamed into place, so a reader sees the previous
   export of D or the new one, never part of one (while a re-export swaps folders, for the instant
   between two renames, no folder), and re-exporting D replaces it whole. After the
   rename, `<out>/relevance/_LATEST` is rewritten (`schemas.storage.replace_file`) with the newest published
   ds, so a backfill of an older day never moves it backwards.

Files of a published partition:
- `relevance.parquet`: the RELEVANCE schema, `ds` included (a reader of one file has it).
- `relevance.duckdb`: a DuckDB database with one table `relevance` holding the same rows.
- `relevance.csv`: UTF-8, header row, comma separated, RFC 4180 quoting (cells may hold newlines);
  an empty cell is null, `""` the empty string; `label_probs` and `node_decisions` are JSON objects;
  `scored_at` is ISO 8601 UTC (`2024-05-02T03:04:05.123456Z`); `ds` is YYYY-MM-DD.
- `churn.json`, `churn.md`, and `churn.png` (row-normalised transition heatmaps, counts written in
  the cells; absent on a first night).
- `manifest.json`, written last: schema name and version, ds, rows per data file (read back from
  each written file), sha256 and size of every file but itself, models with versions, label sets,
  rows and label counts, the validation summary, the churn headline and `exported_at`.

The published root is not a `schemas.storage` data root (each day holds several formats): read a day
with `pyarrow.parquet.read_table(".../ds=D/relevance.parquet")` or all days with DuckDB's
`read_parquet('<out>/relevance/ds=*/relevance.parquet')`.

Scale: the suite runs on one machine's pandas frame of the partition (a 200k-row night exports in
about 5 s on 2 cores, churn included); derived columns, churn joins and file writes run in DuckDB.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.config import ConfigError, config_date, help_field
from schemas.expectations import ExpectationOutcome, SuiteResult, expectations_for, validate_with_gx
from schemas.graph import LabelSet
from schemas.storage import partitions, read_table, replace_file, replace_folder
from schemas.tables import QUERIES, RELEVANCE

PARQUET_FILE = "relevance.parquet"
DUCKDB_FILE = "relevance.duckdb"
CSV_FILE = "relevance.csv"
CHURN_JSON = "churn.json"
CHURN_MARKDOWN = "churn.md"
CHURN_PLOT = "churn.png"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "_LATEST"
DATA_FILES = (PARQUET_FILE, DUCKDB_FILE, CSV_FILE)

# expected_gain and the argmax are recomputed from the very floats the scorer used: only rounding differs.
RECOMPUTE_TOLERANCE = 1e-6
# What identifies a failing row in an error message: the key, and the model it belongs to.
EXAMPLE_COLUMNS = (*RELEVANCE.key, "model_name")
UNKNOWN_SEGMENT = "unknown"
SEGMENTS = (*QUERIES.column("segment").allowed, UNKNOWN_SEGMENT)


class ExportValidationError(ValueError):
    """The partition breaks an expectation; the message names it, the fields and offending rows."""


@dataclass(frozen=True)
class ExportConfig:
    relevance: str = help_field("Data root holding the relevance table (partitioned by ds), as `relevance score` writes.")
    date: str = help_field("The ds partition (YYYY-MM-DD) to validate and publish.")
    out: str = help_field("Publish root: the day goes to <out>/relevance/ds=D/, the newest day into relevance/_LATEST.")
    queries: str | None = help_field(
        "Data root with the queries table, for churn by query segment; none: no segment breakdown.", None
    )
    label_set: str | None = help_field(
        "Label set (name or .yaml) every row must use; default: each row's own label_set column.", None
    )
    max_prob_sum_error: float = help_field("Largest accepted |sum of label_probs - 1| per row.", 1e-4)

    def __post_init__(self) -> None:
        config_date(self.date)
        if not self.relevance or not self.out:
            raise ConfigError("relevance (the data root to read) and out (the publish root) are both required")
        # <out>/relevance/ds=D is where the input partition lives when both roots are one folder.
        if Path(self.out).resolve() == Path(self.relevance).resolve():
            raise ConfigError(
                f"out must differ from the relevance data root ({self.out}): publishing would replace the input"
            )
        if not 0 < self.max_prob_sum_error < 1:
            raise ConfigError(f"max_prob_sum_error must be in (0, 1), e.g. 1e-4; got {self.max_prob_sum_error}")
        if self.label_set is not None:
            try:
                LabelSet.load(self.label_set)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"label_set: {error}") from None

    @property
    def day(self) -> dt.date:
        return config_date(self.date)


# --- validation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedCheck:
    """A column computed per row (`derived_columns`) and what its expectation says about a field."""

    column: str
    field: str
    rule: str


DERIVED_CHECKS = (
    DerivedCheck("label_probs_sum_error", "label_probs", "must sum to 1 within max_prob_sum_error={max_prob_sum_error:g}"),
    DerivedCheck("label_probs_min", "label_probs", "every probability must lie in [0, 1]"),
    DerivedCheck("label_probs_match_label_set", "label_probs", "must hold each label of the row's label set once"),
    DerivedCheck("label_outside_label_set", "label", "must be a label of the row's label_set"),
    DerivedCheck("label_probability_shortfall", "label", "must have the largest probability (within {tolerance:g})"),
    DerivedCheck("expected_gain_error", "expected_gain", "must equal sum of probability x gain (within {tolerance:g})"),
    DerivedCheck("versions_of_model_name", "model_version", "must be one value per model_name in the partition"),
)
# Expectations over several columns (no single `column`), explained by the field they are about.
MULTI_COLUMN_CHECKS = {"expect_compound_columns_to_be_unique": (",".join(RELEVANCE.key), "the key must be unique")}

DERIVED_SQL = """
WITH entries AS (
    SELECT row_id, entry.key AS label, entry.value AS probability
    FROM (SELECT row_id, unnest(label_probs) AS entry FROM relevance_rows)
),
per_row AS (
    SELECT r.row_id,
           sum(e.probability) AS probability_sum,
           min(e.probability) AS probability_min,
           max(e.probability) AS probability_max,
           max(e.probability) FILTER (WHERE e.label = r.label) AS label_probability,
           count(e.label) AS entries,
           count(DISTINCT g.label) AS known_labels,
           sum(e.probability * g.gain) AS recomputed_gain
    FROM relevance_rows r
    LEFT JOIN entries e ON e.row_id = r.row_id
    LEFT JOIN label_gains g ON g.label_set = r.label_set AND g.label = e.label
    GROUP BY r.row_id
),
set_sizes AS (SELECT label_set, count(*) AS labels FROM label_gains GROUP BY label_set),
versions AS (SELECT model_name, count(DISTINCT model_version) AS versions FROM relevance_rows GROUP BY model_name)
SELECT abs(p.probability_sum - 1) AS label_probs_sum_error,
       p.probability_min AS label_probs_min,
       coalesce(p.entries = s.labels AND p.known_labels = s.labels, false) AS label_probs_match_label_set,
       CASE WHEN known.label IS NULL THEN r.label END AS label_outside_label_set,
       p.probability_max - p.label_probability AS label_probability_shortfall,
       abs(r.expected_gain - p.recomputed_gain) AS expected_gain_error,
       v.versions AS versions_of_model_name
FROM relevance_rows r
JOIN per_row p ON p.row_id = r.row_id
LEFT JOIN set_sizes s ON s.label_set = r.label_set
LEFT JOIN label_gains known ON known.label_set = r.label_set AND known.label = r.label
LEFT JOIN versions v ON v.model_name = r.model_name
ORDER BY r.row_id
"""
PROBABILITY_ENTRIES = pa.list_(pa.struct([("key", pa.string()), ("value", pa.float64())]))
# Derived errors that are NaN or null (a NaN probability, a label missing from label_probs, an unknown
# label set) become +inf, which fails the bound; GE would skip a NaN as missing.
ERROR_COLUMNS = ("label_probs_sum_error", "label_probability_shortfall", "expected_gain_error")


def label_gains_table(label_sets: dict[str, LabelSet]) -> pa.Table:
    """(label_set, label, gain) for every label of the given label sets."""
    rows = [(name, label.name, label.gain) for name, labels in label_sets.items() for label in labels.labels]
    return pa.table(
        {
            "label_set": pa.array([r[0] for r in rows], pa.string()),
            "label": pa.array([r[1] for r in rows], pa.string()),
            "gain": pa.array([r[2] for r in rows], pa.float64()),
        }
    )


def derived_columns(data: pa.Table, label_sets: dict[str, LabelSet]) -> pa.Table:
    """The `DERIVED_CHECKS` columns of `data` (RELEVANCE rows), one row per input row, same order."""
    import duckdb

    columns = ["label", "label_set", "expected_gain", "model_name", "model_version"]
    rows = data.select(columns).append_column("row_id", pa.array(np.arange(len(data)), pa.int64()))
    # As a list of (key, value) entries: DuckDB refuses a map with a repeated key, which is a defect to report.
    rows = rows.append_column("label_probs", data["label_probs"].cast(PROBABILITY_ENTRIES))
    with duckdb.connect() as con:
        con.register("relevance_rows", rows)
        con.register("label_gains", label_gains_table(label_sets))
        derived = con.sql(DERIVED_SQL).to_arrow_table()
    for name in ERROR_COLUMNS:
        values = derived[name].to_numpy(zero_copy_only=False).astype(float)
        derived = derived.set_column(
            derived.schema.get_field_index(name), name, pa.array(np.where(np.isfinite(values), values, np.inf))
        )
    return derived


def relevance_expectations(
    label_sets: dict[str, LabelSet], max_prob_sum_error: float, required_label_set: str | None
) -> list[Any]:
    """The compiled RELEVANCE suite plus the partition's own expectations (see the module docstring).

    `required_label_set`: the name every row's label_set must have (None: any of `label_sets`).
    """
    import great_expectations.expectations as gxe

    expectations = expectations_for(RELEVANCE, derived_columns=[check.column for check in DERIVED_CHECKS])
    expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="label_probs_sum_error", min_value=0.0, max_value=max_prob_sum_error),
        gxe.ExpectColumnValuesToBeBetween(column="label_probs_min", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeInSet(column="label_probs_match_label_set", value_set=[True]),
        gxe.ExpectColumnValuesToBeNull(column="label_outside_label_set"),
        gxe.ExpectColumnValuesToBeBetween(column="label_probability_shortfall", max_value=RECOMPUTE_TOLERANCE),
        gxe.ExpectColumnValuesToBeBetween(column="expected_gain_error", max_value=RECOMPUTE_TOLERANCE),
        gxe.ExpectColumnValuesToBeBetween(column="versions_of_model_name", min_value=1, max_value=1),
    ]
    if required_label_set is not None:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="label_set", value_set=[required_label_set]))
    return expectations


def _shown(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def field_and_rule(outcome: ExpectationOutcome, max_prob_sum_error: float) -> tuple[str, str]:
    """The RELEVANCE field an expectation is about and, for the job's own checks, the rule in words."""
    for check in DERIVED_CHECKS:
        if outcome.column == check.column:
            return check.field, check.rule.format(max_prob_sum_error=max_prob_sum_error, tolerance=RECOMPUTE_TOLERANCE)
    return MULTI_COLUMN_CHECKS.get(outcome.expectation) or (outcome.column or "(table)", "")


def failure_message(partition: str, suite: SuiteResult, max_prob_sum_error: float) -> str:
    """Each failed expectation: the field, the rule, how many rows and a few of them."""
    failed = suite.failures
    lines = [f"relevance {partition}: {len(failed)} of {len(suite.outcomes)} expectations failed; nothing published"]
    for outcome in failed:
        if outcome.expectation == "expect_table_row_count_to_be_between":
            lines.append("  - (table): the partition has no rows")
            continue
        field, rule = field_and_rule(outcome, max_prob_sum_error)
        where = f" on {outcome.column}" if outcome.column else ""
        what = f"{rule} [{outcome.expectation}{where}]" if rule else outcome.expectation
        rows = "?" if outcome.unexpected_count is None else outcome.unexpected_count
        examples = "; ".join(
            "(" + ", ".join(f"{key}={_shown(value)}" for key, value in example.items()) + ")"
            for example in outcome.examples
        )
        lines.append(f"  - {field}: {what}: {rows} row(s)" + (f", e.g. {examples}" if examples else ""))
    return "\n".join(lines)


def label_sets_of(data: pa.Table, pinned: str | None) -> dict[str, LabelSet]:
    """The label sets to check rows against: the pinned one, else those named by the rows (known ones)."""
    if pinned is not None:
        labels = LabelSet.load(pinned)
        return {labels.name: labels}
    known = [name for name in pc.unique(data["label_set"]).to_pylist() if name in RELEVANCE.column("label_set").allowed]
    return {name: LabelSet.load(name) for name in sorted(known)}


def validate_relevance(
    data: pa.Table,
    label_sets: dict[str, LabelSet],
    max_prob_sum_error: float,
    partition: str,
    required_label_set: str | None = None,
) -> SuiteResult:
    """Run the export suite on RELEVANCE rows; raise `ExportValidationError` when any expectation fails."""
    frame = data.to_pandas(maps_as_pydicts="lossy")  # a repeated map key is caught by label_probs_match_label_set
    derived = derived_columns(data, label_sets)
    for name in derived.column_names:
        frame[name] = derived[name].to_numpy(zero_copy_only=False)
    suite = validate_with_gx(
        RELEVANCE, frame, "pandas",
        expectations=relevance_expectations(label_sets, max_prob_sum_error, required_label_set),
        example_columns=EXAMPLE_COLUMNS,
        examples=3,
    )
    if not suite.success:
        raise ExportValidationError(failure_message(partition, suite, max_prob_sum_error))
    return suite


def validation_summary(suite: SuiteResult, max_prob_sum_error: float) -> dict:
    return {
        "engine": "great_expectations (pandas)",
        "success": suite.success,
        "expectations": len(suite.outcomes),
        "met": sum(outcome.success for outcome in suite.outcomes),
        "max_prob_sum_error": max_prob_sum_error,
        "recompute_tolerance": RECOMPUTE_TOLERANCE,
        "checked": sorted(
            f"{o.expectation} on {o.column or field_and_rule(o, max_prob_sum_error)[0]}" for o in suite.outcomes
        ),
    }


# --- churn ----------------------------------------------------------------------------------------

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
    for row in counts:
        name = row.pop("model_name")
        previous_model = models["previous"].get(name, {"versions": [], "label_sets": []})
        current_model = models["current"].get(name, {"versions": [], "label_sets": []})
        set_names = list(dict.fromkeys(current_model["label_sets"] + previous_model["label_sets"]))
        labels = list(dict.fromkeys(
            label for set_name in set_names for label in (label_sets.get(set_name) or LabelSet.load(set_name)).names
        ))
        matrix = {source: {target: 0 for target in labels} for source in labels}
        for transition in transitions:
            if transition["model_name"] == name:
                matrix[transition["previous_label"]][transition["current_label"]] = transition["pairs"]
        by_label = {
            source: (sum(targets.values()), sum(targets.values()) - targets[source]) for source, targets in matrix.items()
        }
        changed = sum(changed for _, changed in by_label.values())
        segment_groups = {s["segment"]: (s["pairs"], s["changed"]) for s in by_segment if s["model_name"] == name}
        report["models"][name] = {
            "previous_model_versions": previous_model["versions"],
            "model_versions": current_model["versions"],
            "model_version_changed": previous_model["versions"] != current_model["versions"],
            **{key: value for key, value in row.items() if key.startswith("pairs_")},
            "label_changed": {"pairs": changed, "share": _share(changed, row["pairs_both"])},
            "labels": labels,
            "transitions": matrix,
            "changed_by_previous_label": _changed_by(by_label, labels),
            "changed_by_segment": _changed_by(segment_groups, list(SEGMENTS)) if segments is not None else None,
            "abs_expected_gain_change": {
                "mean": row["mean_abs_expected_gain_change"], "p95": row["p95_abs_expected_gain_change"],
            },
        }
    return report


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ] + [""]


def _changed_table(group: str, groups: dict[str, dict]) -> list[str]:
    rows = [[name, g["pairs"], g["changed"], _percent(g["share"])] for name, g in groups.items()]
    return _markdown_table([group, "pairs", "changed", "share"], rows)


def churn_markdown(report: dict, has_plot: bool) -> str:
    """churn.md: the report for people (churn.json holds the same numbers for machines)."""
    if report["first_night"]:
        return (
            f"# Relevance churn: ds={report['ds']}\n\nFirst night: no partition with an earlier ds is published "
            "under this root, so there is nothing to compare with.\n"
        )
    lines = [f"# Relevance churn: ds={report['ds']} vs ds={report['previous_ds']}", ""]
    for name, model in report["models"].items():
        before, after = (", ".join(model[key]) or "-" for key in ("previous_model_versions", "model_versions"))
        changed = "changed" if model["model_version_changed"] else "unchanged"
        lines += [f"## {name}", "", f"Model version: {before} -> {after} ({changed}).", ""]
        counts = ("pairs_previous", "pairs_current", "pairs_both", "pairs_added", "pairs_removed")
        lines += _markdown_table(
            ["pairs previous night", "pairs this night", "in both", "added", "removed"], [[model[key] for key in counts]]
        )
        gain = model["abs_expected_gain_change"]
        gain_text = "-" if gain["mean"] is None else f"mean {gain['mean']:.4f}, p95 {gain['p95']:.4f}"
        lines += [
            f"Label changed on {model['label_changed']['pairs']} of {model['pairs_both']} pairs present both nights "
            f"({_percent(model['label_changed']['share'])}). |Δ expected_gain| on those pairs: {gain_text}.", "",
            "### Transitions (rows: previous label, columns: this night's label)", "",
        ]
        lines += _markdown_table(
            ["previous \\ current", *model["labels"]],
            [[source, *targets.values()] for source, targets in model["transitions"].items()],
        )
        lines += ["### Label changed, by previous label", ""]
        lines += _changed_table("previous label", model["changed_by_previous_label"])
        lines += ["### Label changed, by query segment", ""]
        if model["changed_by_segment"] is None:
            lines += ["No queries table was given: no segment breakdown.", ""]
        else:
            lines += _changed_table("segment", model["changed_by_segment"])
    if has_plot:
        lines += [f"![label transitions]({CHURN_PLOT})", ""]
    return "\n".join(lines)


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
        axes.set_title(name)
        figure.colorbar(image, ax=axes, label="share of previous label's pairs")
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_churn(report: dict, folder: Path) -> list[str]:
    """churn.json, churn.md and (when there is something to compare) churn.png; returns the file names."""
    has_plot = bool(report["models"])
    (folder / CHURN_JSON).write_text(json.dumps(report, indent=2, allow_nan=False))
    (folder / CHURN_MARKDOWN).write_text(churn_markdown(report, has_plot))
    if has_plot:
        plot_transitions(report, folder / CHURN_PLOT)
    return [CHURN_JSON, CHURN_MARKDOWN] + ([CHURN_PLOT] if has_plot else [])


# --- publishing -----------------------------------------------------------------------------------

CSV_SQL = """
COPY (
    SELECT * REPLACE (
        to_json(label_probs) AS label_probs,
        to_json(node_decisions) AS node_decisions,
        strftime(scored_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS scored_at
    ) FROM relevance
) TO '{path}' (FORMAT csv, HEADER true, DELIMITER ',', QUOTE '"', ESCAPE '"')
"""
CSV_COUNT_SQL = """SELECT count(*) FROM read_csv('{path}', header = true, all_varchar = true, quote = '"', escape = '"')"""


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_data_files(data: pa.Table, folder: Path) -> dict[str, int]:
    """relevance.parquet, relevance.duckdb and relevance.csv under `folder`; rows read back from each."""
    import duckdb

    pq.write_table(data, folder / PARQUET_FILE)
    database = folder / DUCKDB_FILE
    with duckdb.connect(str(database)) as con:
        con.execute("SET TimeZone = 'UTC'")  # strftime renders scored_at in UTC for the CSV
        con.register("published_rows", data)
        con.execute("CREATE TABLE relevance AS SELECT * FROM published_rows")
        con.execute(CSV_SQL.format(path=str(folder / CSV_FILE).replace("'", "''")))
        database_rows = con.execute("SELECT count(*) FROM relevance").fetchone()[0]
        csv_rows = con.execute(CSV_COUNT_SQL.format(path=str(folder / CSV_FILE).replace("'", "''"))).fetchone()[0]
    parquet_rows = pq.read_metadata(folder / PARQUET_FILE).num_rows
    rows = {PARQUET_FILE: parquet_rows, DUCKDB_FILE: database_rows, CSV_FILE: csv_rows}
    wrong = {name: count for name, count in rows.items() if count != len(data)}
    if wrong:
        raise OSError(f"{folder}: files read back with {wrong} rows, {len(data)} were written")
    return rows


def models_summary(data: pa.Table, label_sets: dict[str, LabelSet]) -> list[dict]:
    """Per (model_name, model_version, label_set): rows and the count of each label (label-set order)."""
    keys = ["model_name", "model_version", "label_set"]
    counts = data.group_by([*keys, "label"]).aggregate([("label", "count")]).to_pylist()
    models: dict[tuple, dict] = {}
    for row in sorted(counts, key=lambda r: tuple(r[k] for k in keys)):
        key = tuple(row[k] for k in keys)
        if key not in models:
            names = label_sets[row["label_set"]].names
            models[key] = {**dict(zip(keys, key)), "rows": 0, "label_counts": dict.fromkeys(names, 0)}
        models[key]["rows"] += row["label_count"]
        models[key]["label_counts"][row["label"]] = row["label_count"]
    return list(models.values())


def published_days(root: Path) -> list[dt.date]:
    """Days fully published under `<out>/relevance` (a manifest is the last file a publish writes)."""
    complete = [folder for folder in root.glob("ds=*") if (folder / MANIFEST_FILE).is_file()]
    return sorted(dt.date.fromisoformat(folder.name[3:]) for folder in complete)


def write_latest(root: Path) -> str:
    """Point `_LATEST` at the newest published day (temp file + atomic replace); returns that day."""
    newest = max(published_days(root)).isoformat()
    replace_file(root / LATEST_FILE, lambda staging: staging.write_text(newest + "\n"))
    return newest


def read_published(root: Path, day: dt.date) -> pa.Table:
    return pq.read_table(root / f"ds={day.isoformat()}" / PARQUET_FILE, schema=RELEVANCE.arrow_schema())


def run(config: ExportConfig) -> dict:
    """Validate the day's relevance partition, publish it with its churn report; returns the manifest."""
    day = config.day
    available = partitions(RELEVANCE, config.relevance)
    source = Path(config.relevance) / RELEVANCE.name / f"ds={day.isoformat()}"
    if day not in available:
        recent = [d.isoformat() for d in available[-5:]]
        raise FileNotFoundError(f"no relevance partition {source} (latest partitions there: {recent or 'none'})")
    data = RELEVANCE.conform(read_table(RELEVANCE, config.relevance, days=[day]))
    data = data.sort_by([(name, "ascending") for name in RELEVANCE.key])
    label_sets = label_sets_of(data, config.label_set)
    required_label_set = next(iter(label_sets)) if config.label_set is not None else None
    partition = f"ds={day.isoformat()} ({source})"
    suite = validate_relevance(data, label_sets, config.max_prob_sum_error, partition, required_label_set)

    published_root = Path(config.out) / RELEVANCE.name
    earlier = [d for d in published_days(published_root) if d < day]
    previous_ds = earlier[-1] if earlier else None
    previous = read_published(published_root, previous_ds) if previous_ds else None
    segments = None
    if config.queries:
        segments = query_segments(read_table(QUERIES, config.queries, columns=["query_id", "segment"]), config.queries)
    churn = churn_report(data, previous, previous_ds, day, segments, label_sets)

    manifest: dict[str, Any] = {}

    def write(folder: Path) -> None:
        rows = write_data_files(data, folder)
        churn_files = write_churn(churn, folder)
        manifest.update(
            {
                "table": RELEVANCE.name,
                "schema_version": RELEVANCE.version,
                "ds": day.isoformat(),
                "rows": len(data),
                "source": str(source),
                "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "files": {
                    name: {
                        **({"rows": rows[name]} if name in rows else {}),
                        "bytes": (folder / name).stat().st_size,
                        "sha256": sha256_of(folder / name),
                    }
                    for name in [*DATA_FILES, *churn_files]
                },
                "models": models_summary(data, label_sets),
                "validation": validation_summary(suite, config.max_prob_sum_error),
                "churn": {
                    "previous_ds": churn["previous_ds"],
                    "label_changed_share": {name: m["label_changed"]["share"] for name, m in churn["models"].items()},
                    "model_version_changed": {name: m["model_version_changed"] for name, m in churn["models"].items()},
                },
            }
        )
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False))

    final = replace_folder(published_root / f"ds={day.isoformat()}", write)
    latest = write_latest(published_root)
    print(f"relevance ds={day}: {len(data)} rows passed {len(suite.outcomes)} expectations; published to {final}")
    if previous_ds is None:
        print("churn: first night (no earlier partition published)")
    else:
        for name, share in manifest["churn"]["label_changed_share"].items():
            print(f"churn vs ds={previous_ds} ({name}): label changed on {_percent(share)} of pairs in both nights")
    print(f"{published_root / LATEST_FILE} -> {latest}")
    return manifest
