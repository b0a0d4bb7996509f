"""A table's great-expectations suite decided by one Spark aggregate instead of GE's many jobs.

GE stays the source of the expectations (`schemas.expectations.expectations_for` builds the objects)
and of every failure report; this module only reads each expectation's type and arguments and counts
its unexpected rows with the Spark condition GE's own Spark metric uses (a null is never unexpected
except for not-null; a regex is `rlike`; between is inclusive). The counts are aggregate Columns the
caller adds to the one pass it already makes over its cached rows, so certifying costs no extra scan
of the data, where GE's Spark engine runs a job per metric and sorts every row to check a key
(a window over the key). Uniqueness is decided by a second, narrow aggregate: the number of distinct
64-bit hashes of the key equals the number of keys (equal keys hash equally, so this proves the keys
distinct; a hash collision only sends the suite to GE). A caller that has already proved the checked
rows' key distinct the same way (the duplicate search finds no key hash twice among rows that include
them: `jobs.validate.mark_duplicates`) passes that key as `unique_key`, and that pass is not repeated.

When every expectation is met the outcomes are what GE reports on success (unexpected 0 of the rows
checked, the observed column list); when one is not, or the suite holds an expectation or argument
this module does not read, GE itself validates the rows, so a failure is always GE's own report.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

from schemas.expectations import ExpectationOutcome, SuiteResult, expectations_for, validate_with_gx
from schemas.table import Table

ROWS = "_suite_rows"
# Arguments that change which rows count or how many may fail: read only at their defaults (else GE decides).
DEFAULTS = {"mostly": 1, "row_condition": None, "condition_parser": None}
UNIQUE = ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique")
ROW_WISE = ("expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set",
            "expect_column_values_to_be_between", "expect_column_values_to_match_regex", *UNIQUE)
TABLE_COLUMNS = "expect_table_columns_to_match_ordered_list"


def _unexpected(kind: str, kwargs: Mapping[str, Any]):
    """The Spark condition of a row GE counts as unexpected for a row-wise, non-key expectation."""
    from pyspark.sql import functions as F

    value = F.col(kwargs["column"])
    if kind == "expect_column_values_to_not_be_null":
        return value.isNull()
    if kind == "expect_column_values_to_be_in_set":
        return value.isNotNull() & ~value.isin(list(kwargs["value_set"]))
    if kind == "expect_column_values_to_match_regex":
        return value.isNotNull() & ~value.rlike(kwargs["regex"])
    below = value < F.lit(kwargs["min_value"]) if kwargs.get("min_value") is not None else F.lit(False)
    above = value > F.lit(kwargs["max_value"]) if kwargs.get("max_value") is not None else F.lit(False)
    return value.isNotNull() & (below | above)


def _key(kind: str, kwargs: Mapping[str, Any]) -> list[str]:
    return [kwargs["column"]] if kind == "expect_column_values_to_be_unique" else list(kwargs["column_list"])


class SparkSuite:
    """`table`'s suite measured over the rows of a frame where `rows` (a boolean Column) holds.

    `aggregates` go into the caller's `agg` (grouped or not: they are counts, summed over groups);
    `result(measured, frame)` decides the suite from those counts and one key-uniqueness aggregate
    over `frame` (none for `unique_key`, a key the caller proved distinct on those rows), or hands
    `frame`'s rows to GE when it cannot say every expectation is met.
    """

    def __init__(self, table: Table, rows, expectations: Sequence[Any] | None = None, unique_key: Sequence[str] | None = None) -> None:
        self.table = table
        self.rows = rows
        self.unique_key = frozenset(unique_key) if unique_key else None
        self.expectations = list(expectations if expectations is not None else expectations_for(table))
        self.configs = [(e.configuration.type, dict(e.configuration.kwargs), e) for e in self.expectations]
        self.readable = all(self._readable(kind, kwargs, expectation) for kind, kwargs, expectation in self.configs)

    @staticmethod
    def _readable(kind: str, kwargs: Mapping[str, Any], expectation: Any) -> bool:
        defaults = all(getattr(expectation, name, default) == default for name, default in DEFAULTS.items())
        known = {"expect_column_values_to_be_between": {"column", "min_value", "max_value"},
                 "expect_column_values_to_be_in_set": {"column", "value_set"},
                 "expect_column_values_to_match_regex": {"column", "regex"},
                 "expect_column_values_to_not_be_null": {"column"},
                 "expect_column_values_to_be_unique": {"column"},
                 "expect_compound_columns_to_be_unique": {"column_list"},
                 TABLE_COLUMNS: {"column_list"}}.get(kind)
        return defaults and known is not None and set(kwargs) <= known

    def aggregates(self) -> list:
        """Count Columns: the rows checked, then the unexpected rows of each row-wise, non-key expectation."""
        from pyspark.sql import functions as F

        counts = [F.count(F.when(self.rows, F.lit(1))).alias(ROWS)]
        if not self.readable:
            return counts
        return counts + [
            F.count(F.when(self.rows & _unexpected(kind, kwargs), F.lit(1))).alias(f"_suite_{index}")
            for index, (kind, kwargs, _) in enumerate(self.configs)
            if kind in ROW_WISE and kind not in UNIQUE
        ]

    def _keys_distinct(self, frame, key: list[str]) -> bool:
        """Whether the checked rows' keys (rows with every key field null left out, as GE does) are distinct."""
        from pyspark.sql import functions as F

        present = reduce(operator.or_, [F.col(name).isNotNull() for name in key])
        hashes = frame.where(self.rows & present).select(F.xxhash64(*key).alias("_key_hash"))
        tally = hashes.agg(F.count(F.lit(1)).alias("keys"), F.count_distinct("_key_hash").alias("distinct")).first()
        return tally["keys"] == tally["distinct"]

    def _met(self, index: int, kind: str, kwargs: Mapping[str, Any], measured: Mapping[str, int], frame) -> bool:
        if kind == TABLE_COLUMNS:
            return frame.select(*self.table.names).columns == kwargs["column_list"]
        if kind in UNIQUE:
            key = _key(kind, kwargs)
            return frozenset(key) == self.unique_key or self._keys_distinct(frame, key)
        return measured[f"_suite_{index}"] == 0

    def met(self, measured: Mapping[str, int], frame) -> bool:
        """Whether every expectation is met on the checked rows of `frame` (False too when this cannot say)."""
        return self.readable and all(
            self._met(index, kind, kwargs, measured, frame) for index, (kind, kwargs, _) in enumerate(self.configs)
        )

    def result(self, measured: Mapping[str, int], frame) -> SuiteResult:
        """The SuiteResult of the checked rows of `frame`; `measured`: the `aggregates`' values (summed over groups)."""
        if not self.met(measured, frame):
            return validate_with_gx(self.table, frame.where(self.rows).select(*self.table.names), "spark",
                                    expectations=self.expectations)
        outcomes = (
            ExpectationOutcome(
                expectation=kind,
                column=kwargs.get("column"),
                success=True,
                unexpected_count=None if kind == TABLE_COLUMNS else 0,
                arguments={name: value for name, value in kwargs.items() if name != "column"},
                observed_value=list(self.table.names) if kind == TABLE_COLUMNS else None,
                element_count=None if kind == TABLE_COLUMNS else measured[ROWS],
            )
            for kind, kwargs, _ in self.configs
        )
        return SuiteResult(table=self.table.name, engine="spark", success=True, outcomes=tuple(outcomes))
