"""Validate one night's RELEVANCE rows before anything is published (`jobs/export.py`, step 2).

The RELEVANCE suite compiled from the declaration plus expectations on columns derived per row in
DuckDB (`DERIVED_CHECKS`); a failure raises `ExportValidationError` naming each failed expectation,
its field and a few offending rows. A passing suite is published as validation.html: each expectation,
what it checks, the observed value and the unexpected rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.pages import page, suite_heading, suite_table
from schemas.expectations import ExpectationOutcome, SuiteResult, expectations_for, validate_with_gx
from schemas.graph import LabelSet
from schemas.tables import RELEVANCE

# expected_gain and the argmax are recomputed from the very floats the scorer used: only rounding differs.
RECOMPUTE_TOLERANCE = 1e-6
VALIDATION_PAGE = "validation.html"
# What identifies a failing row in an error message: the key, and the model it belongs to.
EXAMPLE_COLUMNS = (*RELEVANCE.key, "model_name")


class ExportValidationError(ValueError):
    """The partition breaks an expectation; the message names it, the fields and offending rows."""


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


def validation_page(suite: SuiteResult, day: str, max_prob_sum_error: float) -> str:
    """validation.html: every expectation of the suite, with what the job's own ones check in words."""

    def explain(outcome: ExpectationOutcome) -> str:
        field, rule = field_and_rule(outcome, max_prob_sum_error)
        return f"{field} {rule}" if rule else ""

    return page(f"Relevance validation: ds={day}", [suite_heading(suite), suite_table(suite, explain)])
