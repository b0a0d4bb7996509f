"""`jobs.certify.SparkSuite` (one aggregate) against great-expectations itself on the same Spark rows."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from jobs.certify import SparkSuite
from schemas.expectations import validate_with_gx
from schemas.table import Column, Table

CODES = Table(
    name="codes",
    doc="Every kind of row rule the suites compile, and a compound key.",
    key=("code", "version"),
    columns=(
        Column("code", "string", pattern=r"[A-Z]{2}\d"),
        Column("version", "int32", min_value=1),
        Column("kind", "string", nullable=True, allowed=("a", "b")),
        Column("score", "float64", nullable=True, min_value=0.0, max_value=1.0),
    ),
)
# Nullable, as an outside producer writes them: the broken rows must fit.
SCHEMA = "code string, version int, kind string, score double"
GOOD = [("AB1", 1, "a", 0.0), ("AB1", 2, None, 1.0), ("CD2", 1, "b", None)]
BROKEN = {  # one row that breaks exactly one expectation, by what it breaks
    ("expect_column_values_to_match_regex", "code"): ("ab1", 3, "a", 0.5),
    ("expect_column_values_to_not_be_null", "version"): ("EF3", None, "a", 0.5),
    ("expect_column_values_to_be_between", "version"): ("EF3", 0, "a", 0.5),
    ("expect_column_values_to_be_in_set", "kind"): ("EF3", 1, "c", 0.5),
    ("expect_column_values_to_be_between", "score"): ("EF3", 1, "a", 1.5),
    ("expect_compound_columns_to_be_unique", None): ("AB1", 1, "b", 0.5),
}


def _suite(spark, rows):
    frame = spark.createDataFrame(rows, SCHEMA).withColumn("_keep", F.lit(True))
    suite = SparkSuite(CODES, F.col("_keep"))
    return suite, frame.agg(*suite.aggregates()).first().asDict(), frame


def _outcomes(result):
    return sorted((o.expectation, o.column or "", str(o.arguments), o.success, o.unexpected_count, str(o.observed_value),
                   o.element_count) for o in result.outcomes)


def test_passing_rows_give_what_ge_reports(spark):
    suite, measured, frame = _suite(spark, GOOD)
    ours, theirs = suite.result(measured, frame), validate_with_gx(CODES, frame.drop("_keep"), "spark")
    assert ours.success and theirs.success
    assert _outcomes(ours) == _outcomes(theirs)


@pytest.mark.parametrize("broken", list(BROKEN))
def test_each_broken_expectation_is_measured_as_not_met(spark, broken):
    suite, measured, frame = _suite(spark, [*GOOD, BROKEN[broken]])
    assert suite.readable and not suite.met(measured, frame)


def test_a_failing_suite_is_ges_own_report(spark):
    suite, measured, frame = _suite(spark, [*GOOD, *BROKEN.values()])
    ours, theirs = suite.result(measured, frame), validate_with_gx(CODES, frame.drop("_keep"), "spark")
    assert {(o.expectation, o.column) for o in ours.failures} == set(BROKEN)
    assert _outcomes(ours) == _outcomes(theirs)


def test_only_the_rows_where_the_condition_holds_are_certified(spark):
    rows = [(*row, True) for row in GOOD] + [(*row, False) for row in BROKEN.values()]
    frame = spark.createDataFrame(rows, f"{SCHEMA}, _keep boolean")
    suite = SparkSuite(CODES, F.col("_keep"))
    result = suite.result(frame.agg(*suite.aggregates()).first().asDict(), frame)
    assert result.success
    assert {o.element_count for o in result.outcomes} == {None, len(GOOD)}


def test_an_expectation_it_does_not_read_is_left_to_ge(spark):
    import great_expectations.expectations as gxe

    frame = spark.createDataFrame(GOOD, SCHEMA)
    mostly = [gxe.ExpectColumnValuesToNotBeNull(column="kind", mostly=0.5)]
    suite = SparkSuite(CODES, F.lit(True), expectations=mostly)
    result = suite.result(frame.agg(*suite.aggregates()).first().asDict(), frame)
    assert not suite.readable and result.success
    assert result.outcomes[0].unexpected_count == 1


def test_a_key_the_duplicate_search_proved_distinct_is_not_measured_again(spark):
    """`mark_duplicates` counts the key hashes its clean rows repeat; none proves every subset's keys distinct, and the suite
    takes that proof for the same key (and only for it) instead of its own aggregate."""
    from jobs.validate import mark_duplicates, mark_rule_breaks

    def repeated_hashes(rows):
        return mark_duplicates(CODES, mark_rule_breaks(CODES, spark.createDataFrame(rows, SCHEMA)))[1]

    setting = "spark.sql.execution.bypassPartialAggregation"  # the search's own, while it plans
    before = spark.conf.get(setting)
    duplicate = BROKEN[("expect_compound_columns_to_be_unique", None)]
    assert repeated_hashes(GOOD) == 0 and repeated_hashes([*GOOD, duplicate]) == 1
    assert spark.conf.get(setting) == before  # and it does not outlive the search

    frame = spark.createDataFrame([*GOOD, duplicate], SCHEMA).withColumn("_keep", F.lit(True))
    for unique_key, met in ((CODES.key, True), (("code",), False), (None, False)):
        suite = SparkSuite(CODES, F.col("_keep"), unique_key=unique_key)
        assert suite.met(frame.agg(*suite.aggregates()).first().asDict(), frame) is met, unique_key
