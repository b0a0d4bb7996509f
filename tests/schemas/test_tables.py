import datetime as dt

import pyarrow as pa
import pytest

from jobs.spark import spark_schema
from schemas.storage import partitions, read_table, write_table
from schemas.table import Column, Table
from schemas.tables import ALL_TABLES, INPUT_TABLES, RELEVANCE, SEARCH_IMPRESSIONS, table


def test_every_table_has_arrow_and_spark_types_from_one_declaration():
    from pyspark.sql import types as T

    arrow_to_spark = {
        pa.string(): T.StringType(),
        pa.int32(): T.IntegerType(),
        pa.int64(): T.LongType(),
        pa.float64(): T.DoubleType(),
        pa.bool_(): T.BooleanType(),
        pa.date32(): T.DateType(),
        pa.timestamp("us", tz="UTC"): T.TimestampType(),
        pa.map_(pa.string(), pa.string()): T.MapType(T.StringType(), T.StringType()),
        pa.map_(pa.string(), pa.float64()): T.MapType(T.StringType(), T.DoubleType()),
    }
    for declared in ALL_TABLES.values():
        arrow, spark = declared.arrow_schema(), spark_schema(declared)
        assert arrow.names == spark.fieldNames() == declared.names
        for arrow_field, spark_field in zip(arrow, spark.fields):
            assert arrow_to_spark[arrow_field.type] == spark_field.dataType, (declared.name, arrow_field.name)
            assert arrow_field.nullable == spark_field.nullable
    assert set(INPUT_TABLES) <= set(ALL_TABLES)


def test_relevance_table_carries_what_search_teams_import():
    for name in ("query", "product_id", "label", "label_probs", "expected_gain", "node_decisions", "reasoning",
                 "model_name", "model_version", "scored_at", "ds"):
        RELEVANCE.column(name)
    assert RELEVANCE.column("reasoning").nullable


def test_unknown_table_and_column_and_type_are_named():
    with pytest.raises(KeyError, match="known tables"):
        table("nope")
    with pytest.raises(KeyError, match="has no column 'nope'"):
        RELEVANCE.column("nope")
    with pytest.raises(ValueError, match="unknown logical type 'decimal'"):
        Column("x", "decimal")
    with pytest.raises(ValueError, match="not declared"):
        Table("t", (Column("a", "string"),), key=("b",))
    with pytest.raises(ValueError, match="optional columns \\['a'\\] must be declared nullable"):
        Table("t", (Column("a", "string"),), optional=("a",))


def _impressions(days):
    n = len(days)
    return pa.table(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "user_id": ["u"] * n,
            "query_id": ["q"] * n,
            "query": ["sofa"] * n,
            "product_id": ["p"] * n,
            "position": pa.array([1] * n, pa.int32()),
            "clicked": [True] * n,
            "added_to_cart": [False] * n,
            "ordered": [False] * n,
            "quantity": pa.array([0] * n, pa.int32()),
            "price": [10.0] * n,
            "ts": pa.array([dt.datetime(d.year, d.month, d.day, 12, tzinfo=dt.UTC) for d in days],
                           pa.timestamp("us", tz="UTC")),
            "ds": pa.array(days, pa.date32()),
        }
    )


def test_rewriting_a_day_replaces_that_partition_only(tmp_path):
    day1, day2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
    write_table(SEARCH_IMPRESSIONS, _impressions([day1, day2, day2]), tmp_path)
    assert partitions(SEARCH_IMPRESSIONS, tmp_path) == [day1, day2]
    write_table(SEARCH_IMPRESSIONS, _impressions([day2]), tmp_path)
    both = read_table(SEARCH_IMPRESSIONS, tmp_path)
    assert both.schema == SEARCH_IMPRESSIONS.arrow_schema()
    assert sorted(both["ds"].to_pylist()) == [day1, day2]
    assert not [p for p in (tmp_path / "search_impressions").iterdir() if p.name.startswith(".")]


def test_spark_reads_what_storage_writes_with_the_declared_schema(spark, tmp_path):
    from pyspark.testing import assertDataFrameEqual

    days = [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
    data = _impressions(days)
    write_table(SEARCH_IMPRESSIONS, data, tmp_path)
    frame = spark.read.schema(spark_schema(SEARCH_IMPRESSIONS)).parquet(str(tmp_path / "search_impressions"))
    expected = spark.createDataFrame(data.to_pylist(), schema=spark_schema(SEARCH_IMPRESSIONS))
    assertDataFrameEqual(frame, expected)
