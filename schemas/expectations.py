"""great-expectations 1.x suites compiled from the table declarations.

The row rules of `schemas.table.Column` (nullability, allowed values, bounds, regex) and the table's
key become expectations, so the suite and the quarantine split (`jobs.validate`) state one contract.
`validate_with_gx` runs a suite on a pandas or Spark DataFrame in an ephemeral context (no files,
no network). A job may append its own expectations on derived columns (computed checks such as
"probabilities sum to 1") to the compiled suite: `expectations_for(table, derived_columns=...)` lets the
frame carry those columns after the table's. great_expectations is imported lazily: it takes seconds
to import.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.table import Table

CERTIFY_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 0}


def import_in_background() -> None:
    """Start importing great_expectations on a thread of its own, for a job to call before it waits on something
    else (a JVM starting): the import is seconds of one core. A later import waits for this one to finish."""
    threading.Thread(target=importlib.import_module, args=("great_expectations.expectations",), name="import-gx", daemon=True).start()


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int | None
    # A few failing rows: the `example_columns` asked for plus the checked columns (pandas engine).
    examples: tuple[dict[str, Any], ...] = ()
    # What was expected: the expectation's arguments less its column (value_set, min_value, regex, ...).
    arguments: dict[str, Any] = field(default_factory=dict)
    # An aggregate expectation's measured value (the row count, the column list); None for row-wise ones.
    observed_value: Any = None
    # Rows a row-wise expectation checked (nulls included); None for aggregate ones.
    element_count: int | None = None


@dataclass(frozen=True)
class SuiteResult:
    table: str
    engine: str
    success: bool
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def summary(self) -> str:
        failed = self.failures
        head = f"{self.table} ({self.engine}): {len(self.outcomes) - len(failed)}/{len(self.outcomes)} expectations met"
        lines = [head] + [
            f"  FAILED {f.expectation} on {f.column or '(table)'}: {f.unexpected_count} unexpected" for f in failed
        ]
        return "\n".join(lines)


def expectations_for(table: Table, derived_columns: Sequence[str] = ()) -> list[Any]:
    """The GE expectation objects for `table`: its columns in order, its key, its row rules.

    `derived_columns`: columns the validated frame carries after the table's, for the caller's own
    expectations on them.
    """
    import great_expectations.expectations as gxe

    expectations: list[Any] = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=[*table.names, *derived_columns])]
    for column in table.columns:
        if not column.nullable:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column.name))
        if column.allowed is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=column.name, value_set=list(column.allowed)))
        if column.min_value is not None or column.max_value is not None:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=column.name, min_value=column.min_value, max_value=column.max_value
                )
            )
        if column.pattern is not None:
            expectations.append(gxe.ExpectColumnValuesToMatchRegex(column=column.name, regex=f"^(?:{column.pattern})$"))
    if len(table.key) == 1:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column=table.key[0]))
    elif len(table.key) > 1:
        expectations.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(table.key)))
    return expectations


def validate_with_gx(
    table: Table,
    dataframe: Any,
    engine: str,
    expectations: Sequence[Any] | None = None,
    example_columns: Sequence[str] = (),
    examples: int = 5,
) -> SuiteResult:
    """Run `table`'s suite on a pandas (`engine="pandas"`) or Spark (`engine="spark"`) DataFrame.

    `expectations`: the suite to run instead of `expectations_for(table)` (e.g. it plus a job's own).
    `example_columns`: columns that identify a row (pandas engine); each failed expectation then keeps
    up to `examples` failing rows with those columns and the checked ones.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if engine not in ("pandas", "spark"):
        raise ValueError(f"engine must be 'pandas' or 'spark', got {engine!r}")
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = (
        context.data_sources.add_pandas(name=f"{engine}_source")
        if engine == "pandas"
        else context.data_sources.add_spark(name=f"{engine}_source")
    )
    asset = source.add_dataframe_asset(name=table.name)
    batch = asset.add_batch_definition_whole_dataframe(name=f"{table.name}_batch")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{table.name}_suite"))
    for expectation in expectations if expectations is not None else expectations_for(table):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{table.name}_validation", data=batch, suite=suite)
    )
    # Certify with the counts and observed values success is decided on, but no unexpected-value samples:
    # a sample of 0 rows costs no Spark job (as fast as BOOLEAN_ONLY), where BASIC's 20 cost one scan
    # per expectation. Only a failing suite is re-run to show what failed.
    result = definition.run(batch_parameters={"dataframe": dataframe}, result_format=CERTIFY_FORMAT)
    if not result.success:
        result_format: Any = "SUMMARY"
        if example_columns:
            result_format = {
                "result_format": "SUMMARY",
                "unexpected_index_column_names": list(example_columns),
                "partial_unexpected_count": examples,
            }
        result = definition.run(batch_parameters={"dataframe": dataframe}, result_format=result_format)
    outcomes = tuple(
        ExpectationOutcome(
            expectation=r.expectation_config.type,
            column=r.expectation_config.kwargs.get("column"),
            success=bool(r.success),
            unexpected_count=(r.result or {}).get("unexpected_count"),
            examples=tuple((r.result or {}).get("partial_unexpected_index_list") or ())[:examples] if example_columns else (),
            arguments={key: value for key, value in r.expectation_config.kwargs.items() if key not in ("batch_id", "column")},
            observed_value=(r.result or {}).get("observed_value"),
            element_count=(r.result or {}).get("element_count"),
        )
        for r in result.results
    )
    return SuiteResult(table=table.name, engine=engine, success=bool(result.success), outcomes=outcomes)
