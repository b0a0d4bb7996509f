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


def derived_expectations(max_prob_sum_error: float) -> list[tuple[str, str, dict[str, Any]]]:
    """(expectation type, column, arguments) of the derived checks, as `relevance_expectations` states them."""
    return [
        ("expect_column_values_to_be_between", "label_probs_sum_error", {"min_value": 0.0, "max_value": max_prob_sum_error}),
        ("expect_column_values_to_be_between", "label_probs_min", {"min_value": 0.0, "max_value": 1.0}),
        ("expect_column_values_to_be_in_set", "label_probs_match_label_set", {"value_set": [True]}),
        ("expect_column_values_to_be_null", "label_outside_label_set", {}),
        ("expect_column_values_to_be_between", "label_probability_shortfall", {"max_value": RECOMPUTE_TOLERANCE}),
        ("expect_column_values_to_be_between", "expected_gain_error", {"max_value": RECOMPUTE_TOLERANCE}),
    ]


def relevance_expectations(
    label_sets: dict[str, LabelSet], max_prob_sum_error: float, required_label_set: str | None
) -> list[Any]:
    """The compiled RELEVANCE suite plus the partition's own expectations (see the module docstring).

    `required_label_set`: the name every row's label_set must have (None: any of `label_sets`).
    """
    import great_expectations.expectations as gxe

    expectations = expectations_for(RELEVANCE, derived_columns=[check.column for check in DERIVED_CHECKS])
    classes = {"expect_column_values_to_be_between": gxe.ExpectColumnValuesToBeBetween,
               "expect_column_values_to_be_in_set": gxe.ExpectColumnValuesToBeInSet,
               "expect_column_values_to_be_null": gxe.ExpectColumnValuesToBeNull}
    expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *(classes[kind](column=column, **arguments) for kind, column, arguments in derived_expectations(max_prob_sum_error)),
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
        "engine": f"great_expectations ({suite.engine})",
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


# --- on Spark: great-expectations for the declared suite, one aggregate pass for the derived checks -----------------


def derived_column_exprs(label_sets: dict[str, LabelSet]) -> dict[str, Any]:
    """The `DERIVED_CHECKS` columns as Spark expressions of one row (the DuckDB `DERIVED_SQL` per row, less the
    per-model version count, which is an aggregate: `versions_by_model`)."""
    from pyspark.sql import functions as F

    gains_of_set = F.create_map(*[item for name, labels in sorted(label_sets.items()) for item in (
        F.lit(name), F.create_map(*[value for label in labels.labels for value in (F.lit(label.name), F.lit(float(label.gain)))]))])
    gains = F.element_at(gains_of_set, F.col("label_set")) if label_sets else F.lit(None).cast("map<string,double>")
    probabilities = F.map_values("label_probs")
    total = F.aggregate(probabilities, F.lit(0.0), lambda acc, p: acc + p)
    known = F.size(F.filter(F.map_keys("label_probs"), lambda key: F.coalesce(F.map_contains_key(gains, key), F.lit(False))))
    recomputed = F.aggregate(F.map_entries("label_probs"), F.lit(0.0),
                             lambda acc, entry: acc + F.coalesce(entry["value"] * F.element_at(gains, entry["key"]), F.lit(0.0)))

    def finite(error):  # NaN or null (a NaN probability, a missing label, an unknown set) fails the bound, as in DuckDB
        return F.when(error.isNull() | F.isnan(error), F.lit(float("inf"))).otherwise(error)

    return {
        "label_probs_sum_error": finite(F.abs(total - 1)),
        "label_probs_min": F.array_min(probabilities),
        "label_probs_match_label_set": F.coalesce((F.size("label_probs") == F.size(gains)) & (known == F.size(gains)), F.lit(False)),
        "label_outside_label_set": F.when(~F.coalesce(F.map_contains_key(gains, F.col("label")), F.lit(False)), F.col("label")),
        "label_probability_shortfall": finite(F.array_max(probabilities) - F.element_at("label_probs", F.col("label"))),
        "expected_gain_error": finite(F.abs(F.col("expected_gain") - recomputed)),
    }


def violation(expectation: str, column, arguments: dict[str, Any]):
    """The Spark condition of a row breaking a derived expectation (a null breaks none but `to_be_in_set`, as in GE)."""
    from pyspark.sql import functions as F

    if expectation == "expect_column_values_to_be_null":
        return column.isNotNull()
    if expectation == "expect_column_values_to_be_in_set":
        return F.coalesce(~column.isin(arguments["value_set"]), F.lit(True))
    low, high = arguments.get("min_value"), arguments.get("max_value")
    outside = F.lit(False)
    if low is not None:
        outside = outside | (column < F.lit(low))
    if high is not None:
        outside = outside | (column > F.lit(high))
    return F.coalesce(outside, F.lit(False))


def derived_outcomes_spark(frame, label_sets: dict[str, LabelSet], max_prob_sum_error: float, examples: int = 3) -> list[ExpectationOutcome]:
    """The derived checks of `frame` (RELEVANCE rows) in one aggregate pass; a few failing rows fetched only for a failed one."""
    from pyspark.sql import functions as F

    columns = derived_column_exprs(label_sets)
    checks = derived_expectations(max_prob_sum_error)
    derived = frame.select(*EXAMPLE_COLUMNS, "model_name", "model_version", *(expr.alias(name) for name, expr in columns.items()))
    counts = derived.agg(F.count(F.lit(1)).alias("rows"), *(
        F.sum(F.when(violation(kind, F.col(name), arguments), 1).otherwise(0)).alias(name) for kind, name, arguments in checks)).first()
    outcomes = []
    for kind, name, arguments in checks:
        failed = counts[name] or 0
        shown = () if not failed else tuple(
            row.asDict() for row in derived.where(violation(kind, F.col(name), arguments)).select(*dict.fromkeys([*EXAMPLE_COLUMNS, name]))
            .limit(examples).collect())
        outcomes.append(ExpectationOutcome(kind, name, failed == 0, failed, shown, arguments, element_count=counts["rows"]))
    versions = frame.groupBy("model_name").agg(F.count_distinct("model_version").alias("versions"), F.count(F.lit(1)).alias("rows")).collect()
    mixed = [row for row in versions if row["versions"] != 1]
    outcomes.append(ExpectationOutcome(
        "expect_column_values_to_be_between", "versions_of_model_name", not mixed, sum(row["rows"] for row in mixed),
        tuple({"model_name": row["model_name"], "versions_of_model_name": row["versions"]} for row in mixed[:examples]),
        {"min_value": 1, "max_value": 1}, element_count=counts["rows"]))
    return outcomes


def validate_relevance_spark(
    frame, label_sets: dict[str, LabelSet], max_prob_sum_error: float, partition: str, required_label_set: str | None = None,
) -> SuiteResult:
    """`validate_relevance` on a Spark frame of RELEVANCE rows: great-expectations runs the declared suite (columns,
    nullability, allowed values, bounds, key uniqueness, a non-empty table, the pinned label set) on the frame, and
    the derived checks run as one aggregate pass (GE would scan the frame once per expectation)."""
    import great_expectations.expectations as gxe

    expectations = expectations_for(RELEVANCE) + [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    if required_label_set is not None:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="label_set", value_set=[required_label_set]))
    declared = validate_with_gx(RELEVANCE, frame, "spark", expectations=expectations)
    outcomes = (*declared.outcomes, *derived_outcomes_spark(frame, label_sets, max_prob_sum_error))
    suite = SuiteResult(table=RELEVANCE.name, engine="spark", success=all(outcome.success for outcome in outcomes), outcomes=outcomes)
    if not suite.success:
        raise ExportValidationError(failure_message(partition, suite, max_prob_sum_error))
    return suite
