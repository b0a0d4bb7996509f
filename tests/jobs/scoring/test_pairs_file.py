"""`relevance score --pairs FILE`: a CSV or parquet file of pairs scored with the catalog's text or its own,
reused on a re-run without opening the model, bad rows quarantined with file, row, field and reason,
and a file with other columns refused in one line."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from training_world import PRODUCTS, QUERY_ROWS
from typer.testing import CliRunner

from jobs.cli import app
from jobs.scoring import run as score_job
from jobs.scoring.config import ScoreConfig
from jobs.scoring.pairs_file import product_content_hash
from schemas.storage import read_table
from schemas.tables import CATALOG, PAIRS_FILE, PAIRS_FILE_WITH_TEXT, QUARANTINE, RELEVANCE

DAY = dt.date(2024, 3, 2)
CSV_HEADER = "query,product_id,query_id\n"


def config(tmp_path: Path, pairs: Path, world: Path, model: Path, **overrides) -> ScoreConfig:
    return ScoreConfig(date=DAY.isoformat(), pairs=str(pairs), catalog=str(world), out=str(tmp_path / "scores"), backend="hf",
                       model=str(model), batch_size=16, **overrides)


def scored_rows(tmp_path: Path) -> pa.Table:
    return read_table(RELEVANCE, tmp_path / "scores", days=[DAY]).sort_by([("query", "ascending"), ("product_id", "ascending")])


def quarantined(tmp_path: Path) -> list[dict]:
    return read_table(QUARANTINE, tmp_path / "scores" / "_scoring" / f"ds={DAY}").to_pylist()


def never_opened(spec):
    raise AssertionError(f"the re-run opened the model {spec.model}")


def catalog_text(world: Path) -> dict[str, dict]:
    return {row["product_id"]: row for row in read_table(CATALOG, world).to_pylist()}


def inline_pairs(world: Path, products: list[str]) -> pa.Table:
    """Every query of the tiny world with `products`, each row carrying its product's catalog text."""
    catalog = catalog_text(world)
    rows = [{"query": text, "product_id": pid, **{name: catalog[pid][name] for name in ("title", "description", "product_type", "brand")},
             "attributes": catalog[pid]["attributes"]}
            for _, text, _, _ in QUERY_ROWS for pid in products]
    schema = PAIRS_FILE_WITH_TEXT.arrow_schema(without=("query_id",))
    return pa.Table.from_pylist(rows, schema=schema)


def test_a_csv_of_pairs_is_scored_with_catalog_text_and_a_rerun_opens_no_model(tmp_path, tiny_world, tiny_model, monkeypatch):
    pairs = tmp_path / "pairs.csv"
    lines = [f"{text},{pid},{qid if pid == 'p1' else ''}\n" for qid, text, _, _ in QUERY_ROWS for pid, *_ in PRODUCTS]
    pairs.write_text(CSV_HEADER + "".join(lines))
    result = CliRunner().invoke(app, ["score", "--date", DAY.isoformat(), "--pairs", str(pairs), "--catalog", str(tiny_world),
                                      "--out", str(tmp_path / "scores"), "--model", str(tiny_model), "--set", "batch_size=16"])
    assert result.exit_code == 0, result.output
    n = len(QUERY_ROWS) * len(PRODUCTS)
    assert f"score: {n} pairs in {pairs}: 0 reused" in result.output
    report = json.loads((tmp_path / "scores" / "_scoring" / f"ds={DAY}" / "score.json").read_text())
    assert (report["candidates"], report["scored"], report["reused"], report["quarantined"], report["pairs"]) == (n, n, 0, 0, str(pairs))

    rows = scored_rows(tmp_path)
    assert rows.num_rows == n and rows.schema == RELEVANCE.arrow_schema() and quarantined(tmp_path) == []
    catalog = catalog_text(tiny_world)
    by_pair = {(row["query"], row["product_id"]): row for row in rows.to_pylist()}
    for query_id, text, _, _ in QUERY_ROWS:
        assert by_pair[(text, "p1")]["query_id"] == query_id, "a given query_id is kept"
        assert by_pair[(text, "p2")]["query_id"] == "q-" + hashlib.sha256(text.encode()).hexdigest()[:16], "an empty one is derived"
    assert all(row["product_content_hash"] == product_content_hash({**catalog[pid], "attributes": dict(catalog[pid]["attributes"])})
               for (_, pid), row in by_pair.items())

    monkeypatch.setattr(score_job, "open_scorer", never_opened)
    again = score_job.run(config(tmp_path, pairs, tiny_world, tiny_model))
    assert (again["scored"], again["reused"], again["shards"]) == (0, n, 0)
    assert scored_rows(tmp_path).equals(rows)


def test_a_parquet_file_with_its_own_text_is_scored_as_the_catalog_would_be(tmp_path, tiny_world, tiny_model, monkeypatch):
    products = ["p1", "p3", "p6"]
    with_text = tmp_path / "with_text.parquet"
    pq.write_table(inline_pairs(tiny_world, products), with_text)
    first = score_job.run(config(tmp_path, with_text, tmp_path / "no_catalog_here", tiny_model))  # the catalog is not read
    n = len(QUERY_ROWS) * len(products)
    assert (first["candidates"], first["scored"], first["reused"], first["quarantined"]) == (n, n, 0, 0)
    rows = scored_rows(tmp_path)

    # the same pairs looked up in the catalog: the same text, so the same content hash, reused whole
    by_catalog = tmp_path / "by_catalog.parquet"
    pq.write_table(pa.table({"query": [text for _, text, _, _ in QUERY_ROWS for _ in products],
                             "product_id": [pid for _ in QUERY_ROWS for pid in products]}, schema=PAIRS_FILE.arrow_schema(without=("query_id",))),
                   by_catalog)
    with monkeypatch.context() as patched:
        patched.setattr(score_job, "open_scorer", never_opened)
        looked_up = score_job.run(config(tmp_path, by_catalog, tiny_world, tiny_model))
    assert (looked_up["scored"], looked_up["reused"]) == (0, n)
    assert scored_rows(tmp_path).equals(rows)

    # a new title for p3 in the file: its pairs only are scored again
    changed = inline_pairs(tiny_world, products)
    titles = [title + " (new)" if pid == "p3" else title for pid, title in zip(changed["product_id"].to_pylist(), changed["title"].to_pylist())]
    pq.write_table(changed.set_column(changed.schema.get_field_index("title"), "title", pa.array(titles)), with_text)
    edited = score_job.run(config(tmp_path, with_text, tmp_path / "no_catalog_here", tiny_model))
    assert (edited["scored"], edited["reused"]) == (len(QUERY_ROWS), n - len(QUERY_ROWS))
    after = scored_rows(tmp_path)
    assert set(after.filter(pc.equal(after["product_id"], "p3"))["product_content_hash"].to_pylist()).isdisjoint(
        rows.filter(pc.equal(rows["product_id"], "p3"))["product_content_hash"].to_pylist())


def test_bad_rows_are_quarantined_with_file_row_field_and_reason_and_counts_reconcile(tmp_path, tiny_world, tiny_model):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(CSV_HEADER + "\n".join([
        "gray sofa,p1,",  # 1: scored
        " ,p2,",  # 2: blank query
        "gray sofa,,q1",  # 3: no product_id
        "gray sofa,p1,q9",  # 4: the pair of row 1 again
        "gray sofa,p-gone,",  # 5: not in the catalog
        "gray sofa,p2",  # 6: two fields
        '"oak coffee table,p3,',  # 7: a stray quote, which would swallow row 8
        "oak coffee table,p3,",  # 8: scored
    ]) + "\n")
    report = score_job.run(config(tmp_path, pairs, tiny_world, tiny_model))
    assert (report["candidates"], report["scored"], report["reused"], report["quarantined"]) == (8, 2, 0, 6)
    assert report["candidates"] == report["scored"] + report["reused"] + report["quarantined"]
    rows = quarantined(tmp_path)
    assert {row["source_file"] for row in rows} == {str(pairs)} and {row["source_table"] for row in rows} == {"pairs_file"}
    assert [(row["row_number"], row["field"]) for row in rows] == [
        (2, "query"), (3, "product_id"), (4, "query,product_id"), (5, "product_id"), (6, None), (7, None)]
    reasons = [row["reason"] for row in rows]
    assert reasons[:3] == ["query is empty", "product_id is empty", "duplicate pair (query, product_id): first seen at row 1"]
    assert reasons[3].startswith("product not in the catalog") and reasons[4] == "expected 3 comma-separated fields, got 2"
    assert reasons[5].startswith("unbalanced quote")
    assert json.loads(rows[3]["record"]) == {"query": "gray sofa", "product_id": "p-gone", "query_id": ""}
    assert sorted(scored_rows(tmp_path)["product_id"].to_pylist()) == ["p1", "p3"]


def test_bad_product_text_in_a_csv_is_quarantined_naming_the_field(tmp_path, tiny_world, tiny_model):
    pairs = tmp_path / "with_text.csv"
    pairs.write_text("\n".join([
        "query,product_id,title,product_type,attributes",
        'gray sofa,x1,Gray sofa,sofa,"{""color"": ""gray""}"',  # 1: scored with its facets
        "gray sofa,x2,,sofa,",  # 2: no title
        "gray sofa,x3,Gray sofa, ,",  # 3: blank product_type
        'gray sofa,x4,Gray sofa,sofa,"{""size"": 2}"',  # 4: a facet that is not text
        "gray sofa,x5,Gray sofa,sofa,color=gray",  # 5: not JSON
    ]) + "\n")
    report = score_job.run(config(tmp_path, pairs, tmp_path / "no_catalog_here", tiny_model))
    assert (report["candidates"], report["scored"], report["quarantined"]) == (5, 1, 4)
    rows = quarantined(tmp_path)
    assert [(row["row_number"], row["field"]) for row in rows] == [(2, "title"), (3, "product_type"), (4, "attributes"), (5, "attributes")]
    assert {row["source_table"] for row in rows} == {"pairs_file_with_text"}
    assert rows[2]["reason"].startswith("attributes is not a JSON object of text values")
    assert rows[3]["reason"].startswith("attributes is not JSON")
    scored = scored_rows(tmp_path).to_pylist()
    assert [row["product_id"] for row in scored] == ["x1"]
    assert scored[0]["product_content_hash"] == product_content_hash(
        {"title": "Gray sofa", "description": None, "product_type": "sofa", "brand": None, "attributes": {"color": "gray"}})


@pytest.mark.parametrize(("name", "write", "named"), [
    ("renamed.csv", lambda path: path.write_text("qry,product_id\nsofa,p1\n"), ["missing ['query']", "unexpected ['qry']"]),
    ("extra.csv", lambda path: path.write_text("query,product_id,score\nsofa,p1,3\n"), ["unexpected ['score']"]),
    ("text_without_title.csv", lambda path: path.write_text("query,product_id,description\nsofa,p1,A sofa\n"),
     ["'pairs_file_with_text'", "missing ['title', 'product_type']"]),
    ("typed.parquet", lambda path: pq.write_table(pa.table({"query": ["sofa"], "product_id": ["p1"], "query_id": [7]}), path),
     ["wrong types ['query_id: int64 (expected string)']"]),
])
def test_a_file_with_other_columns_is_refused_in_one_line_naming_file_and_columns(tmp_path, tiny_world, tiny_model, name, write, named):
    pairs = tmp_path / name
    write(pairs)
    result = CliRunner().invoke(app, ["score", "--date", DAY.isoformat(), "--pairs", str(pairs), "--catalog", str(tiny_world),
                                      "--out", str(tmp_path / "scores"), "--model", str(tiny_model)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("relevance score:")]
    assert len(errors) == 1 and "SchemaMismatchError" in errors[0] and str(pairs) in errors[0]
    assert all(part in errors[0] for part in named), errors[0]
    assert not (tmp_path / "scores" / "relevance").exists()


@pytest.mark.spark
def test_the_content_hash_of_a_pairs_file_is_the_one_prepare_gives_candidates(spark, tiny_world):
    from jobs.prepare import content_hashes
    from jobs.spark import spark_schema

    catalog = read_table(CATALOG, tiny_world).to_pylist()
    catalog.append({**catalog[0], "product_id": "p-odd", "title": "Sofá «naïve» 2 m", "description": None, "brand": "Ünï",
                    "attributes": [("zeta", "1"), ("Alpha", "x=y;z"), ("alpha", "")]})
    catalog.append({**catalog[0], "product_id": "p-bare", "attributes": []})
    catalog = [{**row, "attributes": dict(row["attributes"])} for row in catalog]
    frame = spark.createDataFrame(catalog, schema=spark_schema(CATALOG))
    by_spark = {row["product_id"]: row["product_content_hash"] for row in content_hashes(frame).collect()}
    assert by_spark == {row["product_id"]: product_content_hash(row) for row in catalog}


def test_an_empty_missing_or_unknown_kind_of_file_is_refused_naming_it(tmp_path, tiny_world, tiny_model):
    header_only, tsv = tmp_path / "header_only.csv", tmp_path / "pairs.tsv"
    header_only.write_text(CSV_HEADER)
    tsv.write_text("query\tproduct_id\nsofa\tp1\n")
    for pairs, error, message in ((header_only, ValueError, "header_only.csv: no pairs to score"),
                                  (tsv, ValueError, "pairs.tsv: a pairs file is read by its suffix, .csv or .parquet"),
                                  (tmp_path / "nowhere.parquet", FileNotFoundError, "pairs file .*nowhere.parquet does not exist")):
        with pytest.raises(error, match=message):
            score_job.run(config(tmp_path, pairs, tiny_world, tiny_model))
