"""`relevance export`: validation, atomic publish, read-back of every format, manifest and churn.

Two hand-written nights of two models (a policy on wands, a student on esci); the churn numbers below
are counted by hand from these rows.
"""

import csv
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.export import ExportConfig, ExportValidationError, run
from jobs.publishing.churn import CHURN_PLOT
from jobs.publishing.publish import (
    CSV_FILE,
    DUCKDB_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    PARQUET_FILE,
    latest_published_day,
    read_published,
)
from schemas.config import ConfigError
from schemas.storage import write_table
from schemas.tables import QUERIES, RELEVANCE

NIGHT_1 = dt.date(2024, 5, 1)
NIGHT_2 = dt.date(2024, 5, 2)
WANDS = ("Exact", "Partial", "Irrelevant")
ESCI = ("E", "S", "C", "I")
SCORED_AT = dt.datetime(2024, 5, 2, 1, 2, 3, 456789, tzinfo=dt.UTC)
QUERY_IDS = {"sofa": "q1", "lamp": "q2", "rug": "q3"}  # q3 is not in the queries table: segment unknown


def _row(day, query, product_id, label, probs, gain, model="policy", version="pol-1", label_set="wands", **extra):
    names = WANDS if label_set == "wands" else ESCI
    return {
        "query": query, "query_id": QUERY_IDS[query], "product_id": product_id, "label": label, "label_set": label_set,
        "label_probs": list(zip(names, probs)), "expected_gain": gain, "node_decisions": [("ms", "match")],
        "reasoning": None, "product_content_hash": f"h-{product_id}", "model_name": model, "model_version": version,
        "scored_at": SCORED_AT, "ds": day, **extra,
    }


def _student(day, label, probs, gain):
    return _row(day, "sofa", "p1", label, probs, gain, model="student", version="stu-1", label_set="esci")


# Gains: wands Exact 1, Partial 0.5, Irrelevant 0; esci E 1, S 0.1, C 0.01, I 0.
NIGHT_1_ROWS = [
    _row(NIGHT_1, "sofa", "p1", "Exact", (0.8, 0.2, 0.0), 0.9),
    _row(NIGHT_1, "sofa", "p2", "Partial", (0.2, 0.6, 0.2), 0.5),
    _row(NIGHT_1, "sofa", "p3", "Irrelevant", (0.0, 0.1, 0.9), 0.05),
    _row(NIGHT_1, "lamp", "p4", "Exact", (0.7, 0.2, 0.1), 0.8),
    _row(NIGHT_1, "lamp", "p5", "Partial", (0.1, 0.8, 0.1), 0.5),
    _row(NIGHT_1, "rug", "p6", "Irrelevant", (0.1, 0.2, 0.7), 0.2),
    _student(NIGHT_1, "E", (0.9, 0.1, 0.0, 0.0), 0.91),
]
NIGHT_2_ROWS = [
    _row(NIGHT_2, "sofa", "p1", "Exact", (0.8, 0.2, 0.0), 0.9, version="pol-2"),  # unchanged, |dgain| 0
    _row(NIGHT_2, "sofa", "p2", "Exact", (0.6, 0.4, 0.0), 0.8, version="pol-2"),  # Partial -> Exact, 0.3
    _row(NIGHT_2, "lamp", "p4", "Partial", (0.3, 0.6, 0.1), 0.6, version="pol-2"),  # Exact -> Partial, 0.2
    _row(NIGHT_2, "lamp", "p5", "Partial", (0.1, 0.8, 0.1), 0.5, version="pol-2"),  # unchanged, 0
    _row(NIGHT_2, "rug", "p6", "Exact", (0.5, 0.3, 0.2), 0.65, version="pol-2"),  # Irrelevant -> Exact, 0.45
    _row(NIGHT_2, "sofa", "p7", "Partial", (0.2, 0.5, 0.3), 0.45, version="pol-2"),  # added; p3 removed
    _student(NIGHT_2, "S", (0.3, 0.6, 0.1, 0.0), 0.361),  # E -> S, 0.549
]


# A broken night 2 (its defects commented) that the local and the Spark export must both refuse, naming each defect.
BROKEN_NIGHT_2_ROWS = [
    _row(NIGHT_2, "sofa", "p1", "Exact", (0.8, 0.2, 0.0), 0.9),
    _row(NIGHT_2, "sofa", "p2", "Exact", (0.6, 0.3, 0.0), 0.75),  # probabilities sum to 0.9
    _row(NIGHT_2, "lamp", "p4", "Partial", (0.3, 0.6, 0.1), 0.6),
    _row(NIGHT_2, "lamp", "p4", "Partial", (0.3, 0.6, 0.1), 0.6),  # the key again
    _row(NIGHT_2, "rug", "p6", "Great", (0.5, 0.3, 0.2), 0.65),  # not a wands label
    _row(NIGHT_2, "rug", "p8", "Partial", (0.2, 0.5, 0.3), 0.9),  # expected_gain should be 0.45
    _row(NIGHT_2, "sofa", "p9", "Exact", (1.0, 0.0, 0.0), 1.0, version="pol-9"),  # a second policy version
    _row(NIGHT_2, "sofa", "p10", "Exact", (1.0, float("nan"), 0.0), 1.0),  # NaN sums to NaN, not within any bound
]


def _relevance(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RELEVANCE.arrow_schema())


def _queries() -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"query_id": "q1", "query": "sofa", "query_class": "sofa", "segment": "head", "frequency": 0.1, "locale": None, "source": "own"},
            {"query_id": "q2", "query": "lamp", "query_class": "lamp", "segment": "tail", "frequency": 0.01, "locale": None, "source": "own"},
        ],
        schema=QUERIES.arrow_schema(),
    )


@pytest.fixture()
def roots(tmp_path):
    data = tmp_path / "data"
    write_table(RELEVANCE, _relevance(NIGHT_1_ROWS + NIGHT_2_ROWS), data)
    write_table(QUERIES, _queries(), data)
    return data, tmp_path / "published"


def _config(data, out, day, **overrides) -> ExportConfig:
    return ExportConfig(relevance=str(data), date=day.isoformat(), out=str(out), queries=str(data), **overrides)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hidden_entries(out: Path) -> list[str]:
    return [p.name for p in (out / "relevance").iterdir() if p.name.startswith(".")]


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(name, "ascending") for name in RELEVANCE.key])


def test_first_night_publishes_every_format_and_a_manifest_that_checks_out(roots, caplog):
    caplog.set_level(logging.INFO, logger="jobs")
    data, out = roots
    manifest = run(_config(data, out, NIGHT_1))
    folder = out / "relevance" / "ds=2024-05-01"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["relevance.parquet", "relevance.duckdb", "relevance.csv", "validation.html", "churn.json", "churn.md", "churn.html", "manifest.json"]
    )
    expected = _sorted(_relevance(NIGHT_1_ROWS))

    parquet = pq.read_table(folder / PARQUET_FILE)
    assert parquet.schema.equals(RELEVANCE.arrow_schema())
    assert parquet.schema.metadata == {b"table": b"relevance", b"schema_version": b"1"}
    assert parquet.equals(expected)
    with duckdb.connect(str(folder / DUCKDB_FILE), read_only=True) as con:
        from_duckdb = con.sql("SELECT * FROM relevance").to_arrow_table()
    assert from_duckdb.cast(RELEVANCE.arrow_schema()).equals(expected)

    with (folder / CSV_FILE).open(newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 7
    assert list(records[0]) == RELEVANCE.names
    sofa_p1 = next(r for r in records if (r["query"], r["product_id"], r["model_name"]) == ("sofa", "p1", "policy"))
    assert json.loads(sofa_p1["label_probs"]) == {"Exact": 0.8, "Partial": 0.2, "Irrelevant": 0.0}
    assert json.loads(sofa_p1["node_decisions"]) == {"ms": "match"}
    assert sofa_p1["scored_at"] == "2024-05-02T01:02:03.456789Z"
    assert (sofa_p1["ds"], sofa_p1["reasoning"]) == ("2024-05-01", "")

    assert json.loads((folder / MANIFEST_FILE).read_text()) == manifest
    assert (manifest["table"], manifest["schema_version"], manifest["ds"], manifest["rows"]) == ("relevance", 1, "2024-05-01", 7)
    assert set(manifest["files"]) == {"relevance.parquet", "relevance.duckdb", "relevance.csv", "validation.html", "churn.json", "churn.md",
                                      "churn.html"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(folder / name), name
        assert entry["bytes"] == (folder / name).stat().st_size
    assert {name: manifest["files"][name]["rows"] for name in (PARQUET_FILE, DUCKDB_FILE, CSV_FILE)} == dict.fromkeys(
        (PARQUET_FILE, DUCKDB_FILE, CSV_FILE), 7
    )
    assert manifest["models"] == [
        {"model_name": "policy", "model_version": "pol-1", "label_set": "wands", "rows": 6,
         "label_counts": {"Exact": 2, "Partial": 2, "Irrelevant": 2}},
        {"model_name": "student", "model_version": "stu-1", "label_set": "esci", "rows": 1,
         "label_counts": {"E": 1, "S": 0, "C": 0, "I": 0}},
    ]
    validation = manifest["validation"]
    assert validation["success"] and validation["met"] == validation["expectations"] > 20
    assert manifest["churn"]["previous_ds"] is None

    churn = json.loads((folder / "churn.json").read_text())
    assert (churn["first_night"], churn["models"]) == (True, {})
    assert "First night" in (folder / "churn.md").read_text()
    assert (out / "relevance" / LATEST_FILE).read_text() == "2024-05-01\n"
    assert _hidden_entries(out) == []
    assert str(folder) in caplog.text


def test_churn_against_the_previous_night_matches_a_hand_count(roots):
    data, out = roots
    run(_config(data, out, NIGHT_1))
    manifest = run(_config(data, out, NIGHT_2))
    folder = out / "relevance" / "ds=2024-05-02"
    churn = json.loads((folder / "churn.json").read_text())
    assert (churn["ds"], churn["previous_ds"], churn["first_night"]) == ("2024-05-02", "2024-05-01", False)

    policy = churn["models"]["policy"]
    assert (policy["previous_model_versions"], policy["model_versions"], policy["model_version_changed"]) == (
        ["pol-1"], ["pol-2"], True
    )
    assert (policy["pairs_previous"], policy["pairs_current"], policy["pairs_both"]) == (6, 6, 5)
    assert (policy["pairs_added"], policy["pairs_removed"]) == (1, 1)
    assert policy["label_changed"] == {"pairs": 3, "share": pytest.approx(3 / 5)}
    assert policy["transitions"] == {
        "Exact": {"Exact": 1, "Partial": 1, "Irrelevant": 0},
        "Partial": {"Exact": 1, "Partial": 1, "Irrelevant": 0},
        "Irrelevant": {"Exact": 1, "Partial": 0, "Irrelevant": 0},
    }
    assert policy["changed_by_previous_label"] == {
        "Exact": {"pairs": 2, "changed": 1, "share": 0.5},
        "Partial": {"pairs": 2, "changed": 1, "share": 0.5},
        "Irrelevant": {"pairs": 1, "changed": 1, "share": 1.0},
    }
    assert policy["changed_by_segment"] == {
        "head": {"pairs": 2, "changed": 1, "share": 0.5},
        "tail": {"pairs": 2, "changed": 1, "share": 0.5},
        "unknown": {"pairs": 1, "changed": 1, "share": 1.0},
    }
    # |dgain| over the pairs of both nights: 0, 0.3, 0.2, 0, 0.45 -> mean 0.19; p95 = 0.3 + 0.8 * 0.15.
    assert policy["abs_expected_gain_change"] == {"mean": pytest.approx(0.19), "p95": pytest.approx(0.42)}

    student = churn["models"]["student"]
    assert (student["model_version_changed"], student["pairs_both"], student["label_changed"]["pairs"]) == (False, 1, 1)
    assert student["labels"] == list(ESCI)
    assert student["transitions"]["E"] == {"E": 0, "S": 1, "C": 0, "I": 0}
    assert student["changed_by_segment"] == {"head": {"pairs": 1, "changed": 1, "share": 1.0}}
    assert student["abs_expected_gain_change"]["mean"] == pytest.approx(0.549)

    assert (folder / CHURN_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["files"][CHURN_PLOT]["sha256"] == _sha256(folder / CHURN_PLOT)
    assert manifest["churn"]["label_changed_share"] == {"policy": pytest.approx(0.6), "student": 1.0}
    markdown = (folder / "churn.md").read_text()
    assert "Label changed on 3 of 5 pairs" in markdown and "| unknown | 1 | 1 | 100.0% |" in markdown
    # each model is titled by its name and version, in the Markdown, the page and the heatmap alike
    assert "## policy, model_version pol-1 → pol-2" in markdown and "## student, model_version stu-1" in markdown
    page = (folder / "churn.html").read_text()
    assert "<h2>policy, model_version pol-1 → pol-2</h2>" in page and "<td>unknown</td><td>1</td><td>1</td><td>100.0%</td>" in page
    assert (out / "relevance" / LATEST_FILE).read_text() == "2024-05-02\n"

    # A backfill of the older night replaces that night whole and leaves _LATEST on the newest.
    run(_config(data, out, NIGHT_1))
    assert (out / "relevance" / LATEST_FILE).read_text() == "2024-05-02\n"
    assert _hidden_entries(out) == []


def test_reexporting_a_night_is_idempotent(roots):
    data, out = roots
    first = run(_config(data, out, NIGHT_1))
    folder = out / "relevance" / "ds=2024-05-01"
    (folder / "stray.txt").write_text("left by hand")  # a re-export replaces the folder whole
    second = run(_config(data, out, NIGHT_1))
    assert not (folder / "stray.txt").exists()
    for name in ("relevance.parquet", "relevance.csv", "churn.json", "churn.md"):
        assert second["files"][name]["sha256"] == first["files"][name]["sha256"], name
    for key in ("rows", "models", "validation", "churn"):
        assert second[key] == first[key]
    with duckdb.connect(str(folder / DUCKDB_FILE), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM relevance").fetchone()[0] == 7
    assert _hidden_entries(out) == []
    assert sorted(p.name for p in (out / "relevance").iterdir()) == [LATEST_FILE, "ds=2024-05-01"]


def test_copies_left_by_a_killed_export_are_cleaned_up_by_the_next(roots, caplog):
    caplog.set_level(logging.INFO, logger="jobs")
    data, out = roots
    run(_config(data, out, NIGHT_1))
    run(_config(data, out, NIGHT_2))
    published = out / "relevance"
    # Killed between the two renames of a re-export of night 2: its folder retired, the new copy staged.
    (published / "ds=2024-05-02").rename(published / ".retired-ds=2024-05-02-0123abcd")
    (published / ".staging-ds=2024-05-02-0123abcd").mkdir()
    (published / ".staging-ds=2024-05-02-0123abcd" / PARQUET_FILE).write_bytes(b"half")
    caplog.clear()

    run(_config(data, out, NIGHT_2))
    printed = caplog.text
    assert "restored from .retired-ds=2024-05-02-0123abcd" in printed
    assert "removed .staging-ds=2024-05-02-0123abcd" in printed
    assert _hidden_entries(out) == []
    assert read_published(published).equals(_sorted(_relevance(NIGHT_2_ROWS)))


def test_readers_fall_back_to_the_newest_complete_day_when_latest_names_a_missing_folder(roots):
    data, out = roots
    published = out / "relevance"
    assert latest_published_day(published) is None
    with pytest.raises(FileNotFoundError, match="no day is published yet"):
        read_published(published)
    run(_config(data, out, NIGHT_1))
    run(_config(data, out, NIGHT_2))
    assert latest_published_day(published) == NIGHT_2
    # The instant between the two renames of a re-export of night 2: _LATEST names a missing folder.
    (published / "ds=2024-05-02").rename(published / ".retired-ds=2024-05-02-0123abcd")
    assert (published / LATEST_FILE).read_text() == "2024-05-02\n"
    assert latest_published_day(published) == NIGHT_1
    assert read_published(published).equals(_sorted(_relevance(NIGHT_1_ROWS)))
    (published / LATEST_FILE).unlink()  # a first publish killed before writing it
    assert latest_published_day(published) == NIGHT_1


def test_a_broken_night_names_each_defect_and_publishes_nothing(tmp_path):
    data, out = tmp_path / "data", tmp_path / "published"
    repeated_label = {**_row(NIGHT_2, "sofa", "p11", "Exact", (1.0, 0.0, 0.0), 1.0),
                      "label_probs": [("Exact", 0.5), ("Exact", 0.5), ("Partial", 0.0)]}  # a repeated key, no Irrelevant
    write_table(RELEVANCE, _relevance(NIGHT_1_ROWS + BROKEN_NIGHT_2_ROWS + [repeated_label]), data)
    run(ExportConfig(relevance=str(data), date="2024-05-01", out=str(out)))
    night_1 = out / "relevance" / "ds=2024-05-01"
    before = {p.name: _sha256(p) for p in night_1.iterdir()}

    with pytest.raises(ExportValidationError) as raised:
        run(ExportConfig(relevance=str(data), date="2024-05-02", out=str(out)))
    message = str(raised.value)
    assert "ds=2024-05-02" in message and "nothing published" in message
    assert "label_probs: must sum to 1 within max_prob_sum_error=0.0001 [" in message
    assert "on label_probs_sum_error]: 2 row(s)" in message and "product_id='p2'" in message and "product_id='p10'" in message
    assert "label_probs: must hold each label of the row's label set once" in message and "product_id='p11'" in message
    assert "query,product_id,model_version: the key must be unique" in message and "product_id='p4'" in message
    assert "label: must be a label of the row's label_set" in message and "label_outside_label_set='Great'" in message
    assert "expected_gain: must equal sum of probability x gain" in message and "product_id='p8'" in message
    assert "model_version: must be one value per model_name" in message

    assert not (out / "relevance" / "ds=2024-05-02").exists()
    assert {p.name: _sha256(p) for p in night_1.iterdir()} == before
    assert (out / "relevance" / LATEST_FILE).read_text() == "2024-05-01\n"
    assert _hidden_entries(out) == []


def test_an_empty_or_missing_partition_is_refused(tmp_path):
    data, out = tmp_path / "data", tmp_path / "published"
    empty = data / "relevance" / "ds=2024-05-02"
    empty.mkdir(parents=True)
    pq.write_table(RELEVANCE.arrow_schema(without=("ds",)).empty_table(), empty / "part-00000.parquet")
    with pytest.raises(ExportValidationError, match=r"ds=2024-05-02.*\n.*the partition has no rows"):
        run(ExportConfig(relevance=str(data), date="2024-05-02", out=str(out)))
    with pytest.raises(FileNotFoundError, match=r"ds=2024-05-03 .*latest partitions there: \['2024-05-02'\]"):
        run(ExportConfig(relevance=str(data), date="2024-05-03", out=str(out)))
    assert not (out / "relevance").exists() or not any((out / "relevance").iterdir())


def test_a_pinned_label_set_must_be_the_rows(roots):
    data, out = roots
    with pytest.raises(ExportValidationError, match=r"label_set: expect_column_values_to_be_in_set: 6 row"):
        run(_config(data, out, NIGHT_1, label_set="esci"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"date": "2024-5-1"}, "date: must look like YYYY-MM-DD"),
        ({"out": "DATA"}, "out must differ from the relevance data root"),
        ({"max_prob_sum_error": 0.0}, "max_prob_sum_error must be in"),
        ({"label_set": "nope"}, "label_set: unknown label set 'nope'"),
    ],
)
def test_config_errors_say_what_is_wrong(tmp_path, overrides, message):
    values = {"relevance": str(tmp_path), "date": "2024-05-01", "out": str(tmp_path / "published"), **overrides}
    if values["out"] == "DATA":
        values["out"] = str(tmp_path)
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**values)


def test_a_3_mb_reasoning_cell_publishes_and_reads_back_in_every_format(tmp_path):
    data, out = tmp_path / "data", tmp_path / "published"
    reasoning = "the title names the queried type; " * 90_000  # 3 MB in one CSV cell
    rows = [{**NIGHT_1_ROWS[0], "reasoning": reasoning}, *NIGHT_1_ROWS[1:]]
    write_table(RELEVANCE, _relevance(rows), data)
    manifest = run(ExportConfig(relevance=str(data), date=NIGHT_1.isoformat(), out=str(out)))
    assert manifest["files"][CSV_FILE]["rows"] == 7
    csv.field_size_limit(len(reasoning) + 1)
    with (out / "relevance" / "ds=2024-05-01" / CSV_FILE).open(newline="", encoding="utf-8") as handle:
        assert max(len(record["reasoning"]) for record in csv.DictReader(handle)) == len(reasoning)


# --- engine=spark: the same nights validated, compared and written by Spark ---------------------------------------------


@pytest.mark.spark
def test_on_spark_the_nights_publish_what_the_local_export_publishes_with_a_duckdb_view_over_the_parquet(roots, spark, tmp_path):
    data, out = roots
    for night in (NIGHT_1, NIGHT_2):
        local = run(_config(data, out, night))
        on_spark = run(_config(data, tmp_path / "on_spark", night, engine="spark"))
    folder = tmp_path / "on_spark" / "relevance" / "ds=2024-05-02"
    assert _sorted(read_published(tmp_path / "on_spark" / "relevance")).equals(_sorted(_relevance(NIGHT_2_ROWS)))
    assert json.loads((folder / "churn.json").read_text()) == json.loads((out / "relevance" / "ds=2024-05-02" / "churn.json").read_text())
    assert (on_spark["validation"]["engine"], on_spark["validation"]["met"]) == ("great_expectations (spark)", local["validation"]["met"])
    assert on_spark["validation"]["checked"] == local["validation"]["checked"]
    assert on_spark["models"] == local["models"]
    assert not (folder / CSV_FILE).exists()  # opt-in on Spark
    assert (folder / PARQUET_FILE).is_dir()  # part files written by the executors, each in the manifest
    assert all(_sha256(folder / name) == entry["sha256"] for name, entry in on_spark["files"].items())
    with duckdb.connect(str(folder / DUCKDB_FILE), read_only=True) as con:
        assert con.sql("SELECT table_name FROM duckdb_tables()").fetchall() == []  # no second copy of the night
        from_duckdb = con.sql("SELECT * FROM relevance").to_arrow_table()
    assert _sorted(from_duckdb.cast(RELEVANCE.arrow_schema())).equals(_sorted(_relevance(NIGHT_2_ROWS)))
    with_csv = run(_config(data, tmp_path / "with_csv", NIGHT_1, engine="spark", csv=True))
    assert with_csv["files"][CSV_FILE]["rows"] == len(NIGHT_1_ROWS)


@pytest.mark.spark
def test_on_spark_great_expectations_and_the_aggregate_pass_refuse_a_broken_night(tmp_path, spark):
    data, out = tmp_path / "data", tmp_path / "published"
    missing_label = _row(NIGHT_2, "sofa", "p12", "Exact", (0.7, 0.3), 0.85)  # no Irrelevant entry
    write_table(RELEVANCE, _relevance(BROKEN_NIGHT_2_ROWS + [missing_label]), data)
    with pytest.raises(ExportValidationError) as raised:
        run(ExportConfig(relevance=str(data), date="2024-05-02", out=str(out), engine="spark"))
    message = str(raised.value)
    assert "ds=2024-05-02" in message and "nothing published" in message
    assert "on label_probs_sum_error]: 2 row(s)" in message and "product_id='p2'" in message and "product_id='p10'" in message
    assert "label_probs: must hold each label of the row's label set once" in message and "product_id='p12'" in message
    assert "query,product_id,model_version: the key must be unique" in message  # great-expectations on the Spark frame
    assert "label: must be a label of the row's label_set" in message and "label_outside_label_set='Great'" in message
    assert "expected_gain: must equal sum of probability x gain" in message and "product_id='p8'" in message
    assert "model_version: must be one value per model_name" in message
    assert not (out / "relevance" / "ds=2024-05-02").exists()
