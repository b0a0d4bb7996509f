import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.validate import (
    INVALID_UTF8,
    ValidateConfig,
    check_spark_files,
    read_with_provenance,
    run,
    split_pandas,
    validate_pandas,
    validate_spark,
)
from schemas.expectations import validate_with_gx
from schemas.storage import SchemaMismatchError, read_table, write_table
from schemas.tables import CATALOG, JUDGMENTS, QUARANTINE


def _judgments() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query_id": ["q1", "q1", "q2", None, "q3", "q1"],
            "product_id": ["p1", "p2", "p2", "p3", "p4", "p1"],
            "label": ["Exact", "Partial", "Exact", "Exact", "Irrelevant", "Irrelevant"],
            "label_set": ["wands", "wands", "bogus", "wands", "wands", "wands"],
            "annotator": ["a", "a", "a", "a", "a", "a"],
            "is_weak": [False] * 6,
        }
    )


EXPECTED_QUARANTINE = [
    (3, "label_set", "value not in ['wands', 'esci']"),
    (4, "query_id", "null in a non-nullable column"),
    (6, "query_id,product_id,annotator", "duplicate key ['query_id', 'product_id', 'annotator']"),
]


def test_pandas_split_names_row_field_reason_and_reconciles():
    validated = validate_pandas(JUDGMENTS, _judgments(), source_file="judgments.parquet")
    assert (validated.counts.rows_in, validated.counts.accepted, validated.counts.quarantined) == (6, 3, 3)
    quarantine = validated.quarantine
    assert list(zip(quarantine.row_number, quarantine.field, quarantine.reason)) == EXPECTED_QUARANTINE
    assert set(quarantine.source_file) == {"judgments.parquet"}
    assert json.loads(quarantine.record.iloc[1]) == {
        "query_id": None, "product_id": "p3", "label": "Exact", "label_set": "wands", "annotator": "a", "is_weak": False,
    }
    assert validated.suite.success
    assert list(validated.accepted.product_id) == ["p1", "p2", "p4"]


def test_the_ge_suite_itself_fails_on_bad_rows():
    result = validate_with_gx(JUDGMENTS, _judgments(), "pandas")
    assert not result.success
    failed = {(f.expectation, f.column) for f in result.failures}
    assert ("expect_column_values_to_not_be_null", "query_id") in failed
    assert ("expect_column_values_to_be_in_set", "label_set") in failed
    assert ("expect_compound_columns_to_be_unique", None) in failed


def test_a_passing_suite_keeps_what_each_expectation_expected_and_observed():
    result = validate_with_gx(JUDGMENTS, _judgments().iloc[[0, 1, 4]], "pandas")
    assert result.success
    outcomes = {(o.expectation, o.column): o for o in result.outcomes}
    assert outcomes[("expect_table_columns_to_match_ordered_list", None)].observed_value == JUDGMENTS.names
    in_set = outcomes[("expect_column_values_to_be_in_set", "label_set")]
    assert (in_set.unexpected_count, in_set.element_count, in_set.arguments) == (0, 3, {"value_set": ["wands", "esci"]})


def test_missing_and_unexpected_columns_name_the_source():
    frame = _judgments().drop(columns=["label"]).assign(extra=1)
    with pytest.raises(SchemaMismatchError, match=r"j.csv: .*missing \['label'\], unexpected \['extra'\]"):
        split_pandas(JUDGMENTS, frame, "j.csv")


def test_spark_split_agrees_with_pandas_and_names_file_and_row(spark, tmp_path):
    frame = _judgments()
    # Storage conforms to the schema, which rejects nulls in non-nullable fields: write the raw file
    # the way an outside producer would, with every field nullable.
    raw_schema = pa.schema([f.with_nullable(True) for f in JUDGMENTS.arrow_schema()])
    folder = tmp_path / "judgments"
    folder.mkdir()
    pa.parquet.write_table(pa.Table.from_pandas(frame, schema=raw_schema, preserve_index=False), folder / "part-0.parquet")
    validated = validate_spark(JUDGMENTS, read_with_provenance(spark, JUDGMENTS, str(folder)))
    assert (validated.counts.rows_in, validated.counts.accepted, validated.counts.quarantined) == (6, 3, 3)
    rows = sorted(validated.quarantine.collect(), key=lambda r: r.row_number)
    assert [(r.row_number, r.field, r.reason) for r in rows] == EXPECTED_QUARANTINE
    assert all(r.source_file.endswith("judgments/part-0.parquet") for r in rows)
    pandas_accepted = validate_pandas(JUDGMENTS, frame, run_suite=False).accepted
    spark_accepted = validated.accepted.toPandas().sort_values("product_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(spark_accepted, pandas_accepted.sort_values("product_id").reset_index(drop=True))
    assert validated.suite.success and validated.suite.engine == "spark"


def test_bounds_on_numbers_and_maps_survive(tmp_path):
    catalog = pd.DataFrame(
        {
            "product_id": ["p1", "p2"],
            "title": ["oak table", "red sofa"],
            "description": [None, "soft"],
            "product_type": ["table", "sofa"],
            "category_path": ["furniture/table", "furniture/sofa"],
            "brand": [None, "acme"],
            "attributes": [{"material": "oak"}, {"color": "red"}],
            "price": [-1.0, 10.0],
            "source": ["synthetic", "synthetic"],
        }
    )
    validated = validate_pandas(CATALOG, catalog)
    assert list(validated.quarantine.reason) == ["value below the minimum 0"]
    assert json.loads(validated.quarantine.record.iloc[0])["attributes"] == {"material": "oak"}
    write_table(CATALOG, CATALOG.from_pandas(validated.accepted), tmp_path)
    assert read_table(CATALOG, tmp_path).to_pylist()[0]["attributes"] == [("color", "red")]


# --- one reader contract, the same answer from both engines ---------------------------------------

def _catalog_rows() -> list[dict]:
    return [
        dict(product_id="p1", title="oak table", description=None, product_type="table", category_path=None,
             brand="acme", attributes=[("material", "oak")], price=12.5, source="own"),
        dict(product_id="p2", title="red sofa", description="soft", product_type="sofa", category_path=None,
             brand=None, attributes=[("color", "red")], price=10.0, source="own"),
    ]


def _write_catalog(root, data: pa.Table) -> None:
    folder = root / CATALOG.name
    folder.mkdir(parents=True)
    pq.write_table(data, folder / "part-0.parquet")


def _validate(root, engine: str) -> list:
    return run(ValidateConfig(data=str(root), out=str(root / "_validation"), tables=["catalog"], engine=engine,
                              spark_master="local[2]"))


ENGINES = ["pandas", "spark"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_catalog_without_brand_is_refused_by_both_engines(spark, tmp_path, engine):
    _write_catalog(tmp_path, pa.Table.from_pylist(_catalog_rows(), schema=CATALOG.arrow_schema()).drop_columns(["brand"]))
    with pytest.raises(SchemaMismatchError, match=r"part-0.parquet: columns do not match table 'catalog': missing \['brand'\];"):
        _validate(tmp_path, engine)
    assert not (tmp_path / "_validation").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_renamed_price_is_refused_naming_both_names(spark, tmp_path, engine):
    data = pa.Table.from_pylist(_catalog_rows(), schema=CATALOG.arrow_schema())
    _write_catalog(tmp_path, data.rename_columns(["pric" if name == "price" else name for name in data.column_names]))
    with pytest.raises(SchemaMismatchError, match=r"missing \['price'\], unexpected \['pric'\]; expected schema: "):
        _validate(tmp_path, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_numeric_string_where_a_double_is_declared_is_refused_by_both_engines(spark, tmp_path, engine):
    data = pa.Table.from_pylist(_catalog_rows(), schema=CATALOG.arrow_schema())
    _write_catalog(tmp_path, data.set_column(7, "price", pa.array(["12.5", "10"])))
    with pytest.raises(SchemaMismatchError, match=r"wrong types \['price: string \(expected double\)'\]"):
        _validate(tmp_path, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_invalid_utf8_quarantines_the_row_in_both_engines(spark, tmp_path, engine):
    data = pa.Table.from_pylist(_catalog_rows(), schema=CATALOG.arrow_schema())
    titles = pa.array([b"oak \xff table", b"red sofa"], pa.binary()).view(pa.string())  # bytes no encoder writes
    _write_catalog(tmp_path, data.set_column(1, "title", titles))
    assert [c.line() for c in _validate(tmp_path, engine)] == ["catalog: 2 in = 1 accepted + 1 quarantined"]
    quarantine = read_table(QUARANTINE, tmp_path / "_validation").to_pylist()
    assert [(q["row_number"], q["field"], q["reason"]) for q in quarantine] == [(1, "title", INVALID_UTF8)]
    assert json.loads(quarantine[0]["record"])["title"].startswith("oak \ufffd")


def test_spark_files_pyarrow_cannot_open_are_checked_on_sparks_merged_footers(spark, tmp_path):
    data = pa.Table.from_pylist(_catalog_rows(), schema=CATALOG.arrow_schema())
    _write_catalog(tmp_path, data.drop_columns(["brand"]))
    with pytest.raises(SchemaMismatchError, match=r"catalog: columns do not match table 'catalog': missing \['brand'\];"):
        check_spark_files(spark, CATALOG, str(tmp_path / "catalog"), ["nosuchscheme://bucket/catalog/part-0.parquet"])


def test_spark_checks_the_files_of_the_days_it_reads_only(spark, tmp_path, drifted_impressions):
    from jobs.hadoop_fs import table_uri
    from schemas.tables import SEARCH_IMPRESSIONS

    good, drifted = drifted_impressions
    path = table_uri(str(tmp_path), SEARCH_IMPRESSIONS)
    assert read_with_provenance(spark, SEARCH_IMPRESSIONS, path, days=[good]).count() == 0
    for days in ([drifted], None):
        with pytest.raises(SchemaMismatchError, match=r"missing \['price'\]"):
            read_with_provenance(spark, SEARCH_IMPRESSIONS, path, days=days)
