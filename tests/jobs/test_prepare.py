"""`relevance prepare`: hand-worked edge cases, and equality with an independent DuckDB implementation."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepare_reference import duckdb_prepare
from pyspark.testing import assertDataFrameEqual

from jobs.prepare import PrepareConfig, content_hashes, normalise_queries, run
from jobs.spark import spark_schema
from jobs.world.config import WorldConfig
from jobs.world.generate import generate_world, write_world
from schemas.config import ConfigError
from schemas.storage import partitions, read_table, table_path, write_table
from schemas.tables import CANDIDATE_PAIRS, CATALOG, QUERY_PRODUCT_STATS, SEARCH_IMPRESSIONS

DAY = dt.date(2024, 5, 2)
OTHER_DAY = dt.date(2024, 5, 1)
UTC = dt.UTC


def _product(product_id: str, attributes: dict[str, str], description: str | None = "soft") -> dict:
    return dict(product_id=product_id, title=f"{product_id} sofa", description=description, product_type="sofa",
                category_path=None, brand=None, attributes=attributes, price=10.0, source="own")


def _hash(product: dict) -> str:
    attributes = ";".join(f"{k}={v}" for k, v in sorted(product["attributes"].items()))
    fields = [product["title"], product["description"] or "", product["product_type"], product["brand"] or "", attributes]
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()


def _imp(request: str, position: int, product: str, query: str = "q", day: dt.date = DAY, clicked=False,
         cart=False, ordered=False, quantity=0) -> dict:
    return dict(request_id=request, user_id="u", query_id=f"id-{query.strip()}", query=query, product_id=product,
                position=position, clicked=clicked, added_to_cart=cart, ordered=ordered, quantity=quantity,
                price=10.0, ts=dt.datetime.combine(day, dt.time(12), UTC), ds=DAY)


PRODUCTS = [_product("A", {"color": "grey", "b": "x"}), _product("B", {}, description=None)]
# Two requests show A above B, two show B above A: pair-matched ratio r_2 = (1 * 1/2 + 1 * 0) / (1 * 1 + 1 * 1/2) = 1/3.
GOOD = [
    _imp("r1", 1, "A", "Q", clicked=True, cart=True, ordered=True, quantity=2), _imp("r1", 2, "B", "Q"),
    _imp("r2", 1, "A", " q ", clicked=True), _imp("r2", 2, "B", " q "),
    _imp("r3", 1, "B", "\uff51", clicked=True), _imp("r3", 2, "A", "\uff51", clicked=True),
    _imp("r4", 1, "B", day=OTHER_DAY), _imp("r4", 2, "A", day=OTHER_DAY),  # late: logged a day late, counted today
]
BAD = [
    _imp("r1", 1, "A", "Q", clicked=True, cart=True, ordered=True, quantity=2),  # duplicate event
    _imp("r5", 1, "A", cart=True),  # add-to-cart without a click
    _imp("r6", 1, "Z"),  # unknown product
    _imp("r7", 1, "A", day=DAY + dt.timedelta(days=1)),  # ts after its partition day
]


def _write_inputs(root: Path, rows: list[dict]) -> None:
    write_table(CATALOG, pa.Table.from_pylist(PRODUCTS, schema=CATALOG.arrow_schema()), root)
    write_table(SEARCH_IMPRESSIONS, pa.Table.from_pylist(rows, schema=SEARCH_IMPRESSIONS.arrow_schema()), root)


def _prepare(root: Path, day: dt.date, run_suite: bool = False) -> dict:
    return run(PrepareConfig(date=day.isoformat(), data=str(root), run_suite=run_suite, spark_master="local[2]"))


def test_day_hand_worked_with_quarantine_rerun_and_empty_day(spark, tmp_path):
    _write_inputs(tmp_path, GOOD + BAD)
    # Another day's output, written before: it must come out byte for byte the same.
    earlier = dict(query="q", product_id="B", impressions=1, clicks=0, add_to_carts=0, orders=0, gmv=0.0,
                   expected_examinations=1.0, debiased_ctr=0.0, product_content_hash="h", ds=OTHER_DAY)
    write_table(QUERY_PRODUCT_STATS, pa.Table.from_pylist([earlier], schema=QUERY_PRODUCT_STATS.arrow_schema()), tmp_path)
    # The suite certifies the rows the table's rules accept, those the job's checks quarantine included.
    summary = _prepare(tmp_path, DAY, run_suite=True)

    assert summary["search_impressions"] == {
        "rows_in": 12, "accepted": 8, "quarantined": 4, "late_rows_kept": 2,
        "quarantined_by_reason": {
            "added to cart without a click": 1,
            "duplicate key ['request_id', 'position']": 1,
            "product_id not in the catalog": 1,
            f"ts after the partition day {DAY}": 1,
        },
    }
    assert summary["examination_rates"] == pytest.approx({"1": 1.0, "2": 1 / 3})
    report = Path(summary["outputs"]["quarantine"])
    assert json.loads((report.parent / "prepare.json").read_text())["pairs"] == 2
    # Every quarantined row, the job's checks' too, names its file and 1-based row.
    rows = {(r["reason"], r["row_number"]) for r in pq.read_table(report).to_pylist() if r["source_file"].endswith(".parquet")}
    assert len(rows) == 4 and all(number >= 9 for _, number in rows)

    stats = spark.read.schema(spark_schema(QUERY_PRODUCT_STATS)).parquet(str(table_path(tmp_path, QUERY_PRODUCT_STATS)))
    expected_examinations = 2 * 1.0 + 2 * (1 / 3)
    expected = spark.createDataFrame(
        [
            ("q", "A", 4, 3, 1, 1, 20.0, expected_examinations, 3 / expected_examinations, _hash(PRODUCTS[0]), DAY),
            ("q", "B", 4, 1, 0, 0, 0.0, expected_examinations, 1 / expected_examinations, _hash(PRODUCTS[1]), DAY),
            ("q", "B", 1, 0, 0, 0, 0.0, 1.0, 0.0, "h", OTHER_DAY),
        ],
        spark_schema(QUERY_PRODUCT_STATS),
    )
    assertDataFrameEqual(stats, expected, rtol=1e-12, checkRowOrder=False)
    pairs = read_table(CANDIDATE_PAIRS, tmp_path, days=[DAY]).to_pylist()
    assert sorted((p["query"], p["query_id"], p["product_id"], p["impressions"]) for p in pairs) == [
        ("q", "id-Q", "A", 4), ("q", "id-Q", "B", 4)
    ]

    # Re-running a day replaces exactly that day.
    other_files = {p: p.read_bytes() for p in (table_path(tmp_path, QUERY_PRODUCT_STATS) / f"ds={OTHER_DAY}").glob("*")}
    _write_inputs(tmp_path, GOOD[:1])
    assert _prepare(tmp_path, DAY)["pairs"] == 1
    rerun = read_table(QUERY_PRODUCT_STATS, tmp_path).to_pylist()
    assert sorted((r["ds"], r["product_id"], r["impressions"]) for r in rerun) == [(OTHER_DAY, "B", 1), (DAY, "A", 1)]
    assert {p: p.read_bytes() for p in other_files} == other_files

    # An empty day leaves no partition for it and touches nothing else.
    empty = _prepare(tmp_path, DAY + dt.timedelta(days=5))
    assert (empty["search_impressions"]["rows_in"], empty["pairs"]) == (0, 0)
    assert partitions(QUERY_PRODUCT_STATS, tmp_path) == [OTHER_DAY, DAY]


def test_normalise_queries_unicode_whitespace_synonyms(spark):
    raw = ["Grey  COUCH", "\uff23\uff4f\uff55\uff43\uff48\u3000cover", " couches\t", "caf\u0065\u0301 table"]
    frame = spark.createDataFrame([(text,) for text in raw], "raw_query string")
    expected = spark.createDataFrame(
        list(zip(raw, ["grey sofa", "sofa cover", "couches", "caf\u00e9 table"])), "raw_query string, query string"
    )
    assertDataFrameEqual(normalise_queries(frame, {"couch": "sofa"}), expected, checkRowOrder=False)


def test_content_hash_sorts_attributes_and_reads_null_as_empty(spark):
    catalog = spark.createDataFrame(PRODUCTS, spark_schema(CATALOG))
    hashes = {row["product_id"]: row["product_content_hash"] for row in content_hashes(catalog).collect()}
    assert hashes == {"A": _hash(PRODUCTS[0]), "B": _hash(PRODUCTS[1])}


def test_config_rejects_bad_date_and_unnormalised_synonyms():
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        PrepareConfig(date="02/05/2024", data="x")
    with pytest.raises(ConfigError, match="'couch'"):
        PrepareConfig(date="2024-05-02", data="x", synonyms={"Couch": "sofa"})


def test_tests_world_day_equals_duckdb_reference(spark, tmp_path):
    world = tmp_path / "world"
    write_world(generate_world(WorldConfig.tests()), world)
    day = partitions(SEARCH_IMPRESSIONS, world)[3]
    synonyms = {"couch": "sofa", "rug": "carpet"}
    summary = run(PrepareConfig(date=day.isoformat(), data=str(world), out=str(tmp_path / "out"), synonyms=synonyms,
                                run_suite=False, spark_master="local[2]"))
    reference = duckdb_prepare(world, day, synonyms)
    assert summary["search_impressions"]["quarantined"] == 0
    assert summary["examination_rates"] == pytest.approx(
        {str(r["position"]): r["examination_rate"] for r in reference["rates"].to_pylist()}, rel=1e-9
    )
    for table in (QUERY_PRODUCT_STATS, CANDIDATE_PAIRS):
        ours = spark.read.schema(spark_schema(table)).parquet(str(table_path(tmp_path / "out", table)))
        theirs = spark.createDataFrame(reference[table.name].cast(table.arrow_schema()).to_pylist(), spark_schema(table))
        assert ours.count() == reference[table.name].num_rows > 100
        assertDataFrameEqual(ours, theirs, rtol=1e-9, checkRowOrder=False)
