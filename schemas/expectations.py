"""great-expectations 1.x suites compiled from the table declarations.

The row rules of `schemas.table.Column` (nullability, allowed values, bounds, regex) and the table's
key become expectations, so the suite and the quarantine split (`jobs.validate`) state one contract.
`validate_with_gx` runs a suite on a pandas or Spark DataFrame in an ephemeral context (no files,
no network). great_expectations is imported lazily: it takes seconds to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.table import Table


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int | None


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


def expectations_for(table: Table) -> list[Any]:
    """The GE expectation objects for `table`: its columns in order, its key, its row rules."""
    import great_expectations.expectations as gxe

    expectations: list[Any] = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=table.names)]
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


def validate_with_gx(table: Table, dataframe: Any, engine: str) -> SuiteResult:
    """Run `table`'s suite on a pandas (`engine="pandas"`) or Spark (`engine="spark"`) DataFrame."""
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
    for expectation in expectations_for(table):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{table.name}_validation", data=batch, suite=suite)
    )
    # Certify with booleans only (no unexpected-value samples: one Spark job less per expectation);
    # only a failing suite is re-run to count and show what failed.
    result = definition.run(batch_parameters={"dataframe": dataframe}, result_format="BOOLEAN_ONLY")
    if not result.success:
        result = definition.run(batch_parameters={"dataframe": dataframe}, result_format="SUMMARY")
    outcomes = tuple(
        ExpectationOutcome(
            expectation=r.expectation_config.type,
            column=r.expectation_config.kwargs.get("column"),
            success=bool(r.success),
            unexpected_count=(r.result or {}).get("unexpected_count"),
        )
        for r in result.results
    )
    return SuiteResult(table=table.name, engine=engine, success=bool(result.success), outcomes=outcomes)
