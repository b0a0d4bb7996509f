"""Hostile and careless inputs, given where a user gives them: through the `relevance` CLI.

SQL in the paths `abtest` reads, pickles that would run code planted where `train` and `score` load
weights, catalogs that drifted from their schema, invalid UTF-8, a 10 MB title, config values of the
wrong form, A/B logs with values outside the schema and no pre-period. Each case checks what the
user sees (exit code 0, or 1 for bad data and 2 for bad usage, with one line naming the file or field
and no traceback) and measures the damage the ledger sums: rows lost, outputs half-written, injected
commands run; every one must be 0.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import shutil

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner, Result

from abtest.metrics import DEFAULT_METRICS
from abtest.simulate import SimulationSpec, simulate, write
from jobs.cli import app
from schemas.logs import PLAIN_LINE
from schemas.storage import read_table, table_path, write_table
from schemas.tables import (
    CANDIDATE_PAIRS,
    CATALOG,
    EXPERIMENT_ASSIGNMENT,
    EXPERIMENT_EVENTS,
    JUDGMENTS,
    QUARANTINE,
    QUERIES,
    RELEVANCE,
    TRAINING_EXAMPLES,
)

START = dt.date(2024, 3, 1)
DAY = dt.date(2024, 3, 2)
HOSTILE_DUCKDB = "e' AS z; COPY (SELECT 42) TO 'pwned.csv'; --.duckdb"
HOSTILE_PARQUET = "x.parquet', hive_partitioning = false); COPY (SELECT 42) TO 'pwned.csv'; --.parquet"

runner = CliRunner()


def invoke(*args: str | pathlib.Path) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


def failure_line(result: Result, exit_code: int, command: str) -> str:
    """The one line a failed command printed after its log, after checking the exit code, that no exception
    escaped the CLI, no traceback was printed and every line before it is a log record."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), f"an exception escaped the CLI: {result.exception!r}"
    assert "Traceback" not in result.output
    *logged, line = result.stderr.strip().splitlines()
    assert line.startswith(f"relevance {command}: ") and all(PLAIN_LINE.match(record) for record in logged), result.stderr
    return line


def new_entries(folder: pathlib.Path, before: set[pathlib.Path]) -> set[pathlib.Path]:
    return set(folder.rglob("*")) - before


# --- SQL in the paths abtest reads ---------------------------------------------------------------


@pytest.fixture(scope="module")
def experiment() -> tuple[pa.Table, pa.Table]:
    """A small two-variant experiment with a pre-period: (events, assignment)."""
    return simulate(SimulationSpec(n_users=1500, pre_days=4, exp_days=4, start=START, seed=3))


def as_duckdb(path: pathlib.Path, events: pa.Table, assignment: pa.Table) -> None:
    with duckdb.connect(str(path)) as con:
        for table, rows in ((EXPERIMENT_EVENTS, events), (EXPERIMENT_ASSIGNMENT, assignment)):
            con.register("rows", rows)
            con.execute(f"CREATE TABLE {table.name} AS SELECT * FROM rows")
            con.unregister("rows")


def hostile_duckdb(tmp_path, events, assignment) -> tuple[pathlib.Path, pathlib.Path]:
    database = tmp_path / HOSTILE_DUCKDB
    as_duckdb(database, events, assignment)
    return database, database


def hostile_parquet(tmp_path, events, assignment) -> tuple[pathlib.Path, pathlib.Path]:
    pq.write_table(events, tmp_path / "x.parquet")  # what the name's first statement would read, so the COPY would run
    pq.write_table(events, tmp_path / HOSTILE_PARQUET)
    return tmp_path / HOSTILE_PARQUET, write(events, assignment, tmp_path / "data")


def quoted_root(tmp_path, events, assignment) -> tuple[pathlib.Path, pathlib.Path]:
    root = write(events, assignment, tmp_path / "o'brien")
    return root, root


def quoted_root_database(tmp_path, events, assignment) -> tuple[pathlib.Path, pathlib.Path]:
    database = tmp_path / "o'brien" / "it's.duckdb"
    database.parent.mkdir()
    as_duckdb(database, events, assignment)
    return database, database


@pytest.mark.parametrize("make_inputs", [hostile_duckdb, hostile_parquet, quoted_root, quoted_root_database])
def test_sql_in_paths_given_to_abtest_is_read_as_a_name(experiment, tmp_path, monkeypatch, ledger, make_inputs):
    events, assignment = experiment
    monkeypatch.chdir(tmp_path)  # where a relative 'pwned.csv' (or an attached 'e') would land
    events_path, assignment_path = make_inputs(tmp_path, events, assignment)
    before = set(tmp_path.rglob("*"))
    result = invoke("abtest", "--events", events_path, "--assignment", assignment_path, "--experiment-start", START.isoformat(),
                    "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    written = new_entries(tmp_path, before)
    stray = {path for path in written if tmp_path / "report" not in path.parents and path != tmp_path / "report"}
    assert stray == set(), "the file name ran as SQL"
    reconciliation = json.loads((tmp_path / "report" / "result.json").read_text())["reconciliation"]
    assert reconciliation["events_in"] == events.num_rows and reconciliation["events_quarantined"] == 0
    ledger.input(f"abtest path: {make_inputs.__name__}", rows_lost=events.num_rows - reconciliation["events_in"],
                 commands_run=len(stray))


# --- A/B edge cases ------------------------------------------------------------------------------


def test_query_segment_outside_the_allowed_values_is_quarantined_and_counts_reconcile(experiment, tmp_path, ledger):
    events, assignment = experiment
    segments = events["query_segment"].to_pylist()
    segments[3], segments[8] = "body", "head'); DROP TABLE ev; --"
    bad = events.set_column(events.schema.get_field_index("query_segment"), "query_segment", pa.array(segments))
    root = write(bad, assignment, tmp_path / "data")
    result = invoke("abtest", "--events", root, "--assignment", root, "--experiment-start", START.isoformat(), "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "report" / "result.json").read_text())["reconciliation"]
    accounted = (rec["events_experiment_used"] + rec["events_pre_period_used"] + rec["events_pre_period_outside_experiment"]
                 + rec["events_quarantined"])
    assert rec["events_in"] == events.num_rows == accounted and rec["events_quarantined"] == 2
    quarantined = pq.read_table(tmp_path / "report" / "quarantine.parquet")
    assert quarantined["field"].to_pylist() == ["query_segment"] * 2
    assert sorted(json.loads(record)["request_id"] for record in quarantined["record"].to_pylist()) == sorted(
        events["request_id"].take([3, 8]).to_pylist())
    ledger.input("abtest: query_segment outside the allowed values", rows_lost=events.num_rows - accounted)


def test_an_experiment_without_a_pre_period_keeps_its_primary_metrics(tmp_path, ledger):
    events, assignment = simulate(SimulationSpec(n_users=1500, pre_days=0, exp_days=4, start=START, seed=11))
    assert pc.min(events["ds"]).as_py() == START
    root = write(events, assignment, tmp_path / "data")
    result = invoke("abtest", "--events", root, "--assignment", root, "--experiment-start", START.isoformat(), "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "no data" not in result.output
    metrics = {row["metric"]: row for row in json.loads((tmp_path / "report" / "result.json").read_text())["metrics"]}
    assert set(metrics) == {metric.name for metric in DEFAULT_METRICS}
    assert {metric.name for metric in DEFAULT_METRICS if metric.tier == "primary"} == {"ctr", "query_good_rate"}
    for row in metrics.values():
        assert not row["cuped"] and row["pvalue"] is not None and 0 <= row["pvalue"] <= 1, row
    ledger.input("abtest: no pre-period")


# --- pickles where weights are loaded ------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling it creates `marker`: stands in for any command a hostile pickle would run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def assert_armed(planted: pathlib.Path, marker: pathlib.Path) -> None:
    """The planted file does run code when loaded unsafely, so the absent marker above was a real check."""
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_a_planted_checkpoint_is_refused_by_train_sft(tiny_world, tiny_model, tmp_path, ledger):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "run" / "checkpoints" / "step-000009" / "state.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"step": 9, "model": TouchOnUnpickle(marker)}, planted)
    result = invoke("train", "sft", "--data", tiny_world, "--model", tiny_model, "--out", tmp_path / "run", "--max-steps", "1")
    line = failure_line(result, 1, "train")
    assert str(planted) in line
    commands_run = int(marker.exists())
    assert commands_run == 0
    assert not (tmp_path / "run" / "model").exists(), "nothing trained from it"
    assert_armed(planted, marker)
    ledger.input("train sft: planted state.pt", commands_run=commands_run)


@pytest.fixture
def pickled_model(tiny_model, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(a copy of the tiny model whose weights are only a hostile `pytorch_model.bin`, its marker)."""
    folder = shutil.copytree(tiny_model, tmp_path / "pickled_model")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": TouchOnUnpickle(marker)}, folder / "pytorch_model.bin")
    return folder, marker


@pytest.mark.parametrize("command", ["score", "train sft"])
def test_a_model_folder_holding_only_a_pickle_is_refused(pickled_model, tiny_world, tmp_path, ledger, command):
    folder, marker = pickled_model
    if command == "score":
        result = invoke("score", "--date", DAY.isoformat(), "--model", folder, "--pairs", tmp_path, "--catalog", tiny_world,
                        "--out", tmp_path / "scores")
        line = failure_line(result, 2, "score")  # the model option names no loadable model: bad usage
    else:
        result = invoke("train", "sft", "--data", tiny_world, "--model", folder, "--out", tmp_path / "run", "--max-steps", "1")
        line = failure_line(result, 1, "train")
    assert str(folder) in line
    commands_run = int(marker.exists())
    assert commands_run == 0
    assert not (tmp_path / "scores").exists() and not (tmp_path / "run" / "model").exists()
    assert_armed(folder / "pytorch_model.bin", marker)
    ledger.input(f"{command}: model folder with a pickled pytorch_model.bin", commands_run=commands_run)


# --- schema drift and invalid UTF-8 --------------------------------------------------------------


def drop_brand(catalog: pa.Table) -> pa.Table:
    return catalog.drop_columns(["brand"])


def rename_price(catalog: pa.Table) -> pa.Table:
    return catalog.rename_columns(["pric" if name == "price" else name for name in catalog.column_names])


def add_a_column(catalog: pa.Table) -> pa.Table:
    return catalog.append_column("colour", pa.array(["red"] * catalog.num_rows))


def price_as_text(catalog: pa.Table) -> pa.Table:
    index = catalog.schema.get_field_index("price")
    return catalog.set_column(index, "price", pc.cast(catalog["price"], pa.string()))


DRIFTS = {drop_brand: "missing ['brand']", rename_price: "missing ['price'], unexpected ['pric']",
          add_a_column: "unexpected ['colour']", price_as_text: "wrong types ['price: string (expected double)']"}


def catalog_root(world: pathlib.Path, root: pathlib.Path, change) -> pathlib.Path:
    """`root` holding the world's catalog as one parquet file, changed by `change`; returns the file."""
    file = root / CATALOG.name / "part-0.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(change(read_table(CATALOG, world)), file)
    return file


ENGINES = ["pandas", pytest.param("spark", marks=pytest.mark.spark)]


@pytest.fixture
def engine_session(request):
    """The shared Spark session for the spark engine (so the CLI's `get_spark` reuses it), nothing for pandas."""
    if request.node.callspec.params["engine"] == "spark":
        request.getfixturevalue("spark")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("drift", DRIFTS, ids=lambda drift: drift.__name__)
def test_validate_refuses_a_drifted_catalog_naming_file_and_columns(tiny_world, tmp_path, ledger, engine, engine_session, drift):
    file = catalog_root(tiny_world, tmp_path / "data", drift)
    out = tmp_path / "validation"
    result = invoke("validate", "--data", tmp_path / "data", "--engine", engine, "--out", out, "--set", "spark_master=local[2]")
    line = failure_line(result, 1, "validate")
    assert "SchemaMismatchError" in line and str(file) in line and DRIFTS[drift] in line
    half_written = len(list(out.rglob("*"))) if out.exists() else 0
    assert half_written == 0
    ledger.input(f"validate ({engine}): catalog {drift.__name__}", half_written=half_written)


@pytest.mark.parametrize("engine", ENGINES)
def test_invalid_utf8_in_a_title_is_quarantined_and_counts_reconcile(tiny_world, tmp_path, ledger, engine, engine_session):
    def invalid_title(catalog: pa.Table) -> pa.Table:
        titles = [title.encode() for title in catalog["title"].to_pylist()]
        titles[2] = b"Oak \xff coffee table"  # bytes no encoder writes
        return catalog.set_column(catalog.schema.get_field_index("title"), "title", pa.array(titles, pa.binary()).view(pa.string()))

    file = catalog_root(tiny_world, tmp_path / "data", invalid_title)
    rows_in = pq.read_metadata(file).num_rows
    out = tmp_path / "validation"
    result = invoke("validate", "--data", tmp_path / "data", "--engine", engine, "--out", out, "--set", "spark_master=local[2]")
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "validation.json").read_text())["tables"]["catalog"]
    quarantine = read_table(QUARANTINE, out)
    assert (counts["rows_in"], counts["quarantined"], quarantine.num_rows) == (rows_in, 1, 1)
    assert quarantine["field"].to_pylist() == ["title"] and json.loads(quarantine["record"][0].as_py())["product_id"] == "p3"
    rows_lost = rows_in - counts["accepted"] - quarantine.num_rows
    assert rows_lost == 0
    ledger.input(f"validate ({engine}): invalid UTF-8 in a title", rows_lost=rows_lost)


def drop_title(catalog: pa.Table) -> pa.Table:
    return catalog.drop_columns(["title"])


DATASETS_DRIFTS = {drop_title: "missing ['title']", price_as_text: DRIFTS[price_as_text]}


@pytest.mark.spark
@pytest.mark.parametrize("drift", DATASETS_DRIFTS, ids=lambda drift: drift.__name__)
def test_datasets_over_a_drifted_catalog_keeps_the_previous_training_examples(tiny_world, tmp_path, ledger, spark, drift):
    data = shutil.copytree(tiny_world, tmp_path / "data")
    examples = table_path(data, TRAINING_EXAMPLES)
    good = {path.relative_to(examples): path.read_bytes() for path in examples.rglob("*") if path.is_file()}
    rows_before = pq.read_table(examples).num_rows
    shutil.rmtree(data / CATALOG.name)
    file = catalog_root(tiny_world, data, drift)
    before = set(data.iterdir())
    result = invoke("datasets", "--data", data, "--set", "spark_master=local[2]")
    line = failure_line(result, 1, "datasets")
    assert str(file) in line and DATASETS_DRIFTS[drift] in line
    now = {path.relative_to(examples): path.read_bytes() for path in examples.rglob("*") if path.is_file()}
    leftovers = [path for path in set(data.iterdir()) - before if path.name.startswith((".staging-", ".retired-"))]
    half_written = len(leftovers) + int(now != good)
    assert half_written == 0, f"training_examples changed ({now != good}) or staging left: {leftovers}"
    rows_lost = rows_before - pq.read_table(examples).num_rows
    assert rows_lost == 0
    ledger.input(f"datasets: catalog {drift.__name__}", rows_lost=rows_lost, half_written=half_written)


# --- a huge field --------------------------------------------------------------------------------


def test_a_10_mb_title_is_scored_label_only(tiny_world, tiny_model, tmp_path, ledger):
    catalog = read_table(CATALOG, tiny_world)
    titles = catalog["title"].to_pylist()
    titles[0] = "Gray wool sofa " * 700_000  # 10.5 MB
    write_table(CATALOG, catalog.set_column(catalog.schema.get_field_index("title"), "title", pa.array(titles)), tmp_path / "world")
    queries = read_table(QUERIES, tiny_world).to_pylist()
    candidates = [{"query": q["query"], "query_id": q["query_id"], "product_id": pid, "product_content_hash": f"{pid}-v1",
                   "impressions": 3, "ds": DAY} for q in queries for pid in ("p1", "p2")]
    write_table(CANDIDATE_PAIRS, pa.Table.from_pylist(candidates, schema=CANDIDATE_PAIRS.arrow_schema()), tmp_path / "prepared")
    result = invoke("score", "--date", DAY.isoformat(), "--model", tiny_model, "--pairs", tmp_path / "prepared",
                    "--catalog", tmp_path / "world", "--out", tmp_path / "scores", "--reasoning", "none")
    assert result.exit_code == 0, result.output
    rows = read_table(RELEVANCE, tmp_path / "scores", days=[DAY])
    keys = set(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))
    assert rows.num_rows == len(keys) == len(candidates)
    huge = rows.filter(pc.equal(rows["product_id"], "p1"))
    assert huge.num_rows == len(queries) and all(label is not None for label in huge["label"].to_pylist())
    assert all(abs(sum(p for _, p in probs) - 1) < 1e-4 for probs in huge["label_probs"].to_pylist())
    ledger.input("score: a 10 MB title", rows_lost=len(candidates) - len(keys))


# --- bad config values ---------------------------------------------------------------------------


BAD_CONFIG = {
    "date without dashes": (["score", "--date", "20240313", "--model", "model"], "date: must look like YYYY-MM-DD, got '20240313'"),
    "a day that does not exist": (["prepare", "--date", "2024-02-30", "--data", "world"], "date: must look like YYYY-MM-DD"),
    "a bool for a step count": (["train", "sft", "--set", "max_steps=true"], "max_steps: expected a whole number"),
    "a word for a bool": (["train", "sft", "--set", "resume=maybe"], "resume: expected true or false, got 'maybe'"),
    "an unknown key": (["validate", "--set", "enginee=spark"], "unknown keys ['enginee']"),
    "an unknown key in a section": (["nightly", "--date", "2024-03-13", "--set", "score.promt_tokens=40"], "unknown keys ['promt_tokens']"),
}


@pytest.mark.parametrize("case", BAD_CONFIG)
def test_a_bad_config_value_is_a_one_line_usage_error(tmp_path, monkeypatch, ledger, case):
    monkeypatch.chdir(tmp_path)  # nothing may be written, not even in the default output folders
    args, message = BAD_CONFIG[case]
    line = failure_line(invoke(*args), 2, args[0])
    assert message in line
    half_written = len(list(tmp_path.iterdir()))
    assert half_written == 0
    ledger.input(f"config: {case}", half_written=half_written)


# --- public dataset files: encodings, truncation, stray quotes ------------------------------------


def wands_labels(folder: pathlib.Path, rows: int) -> pathlib.Path:
    """A WANDS label.csv of `rows` judgments whose data row 5 opens a quote it never closes."""
    folder.mkdir()
    labels = ['"Exact' if i == 4 else "Exact" for i in range(rows)]
    lines = ["id\tquery_id\tproduct_id\tlabel"] + [f"{i}\t0\t{i}\t{label}" for i, label in enumerate(labels)]
    (folder / "label.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_a_stray_quote_in_a_wands_file_costs_its_own_row(tmp_path, ledger):
    source = wands_labels(tmp_path / "wands", 40)
    result = invoke("ingest", "--format", "wands", "--source", source, "--out", tmp_path / "out", "--files", "label")
    assert result.exit_code == 0, result.output
    written = read_table(JUDGMENTS, tmp_path / "out").num_rows
    quarantined = read_table(QUARANTINE, tmp_path / "out").to_pylist()
    assert written == 39 and [row["row_number"] for row in quarantined] == [5]
    ledger.input("ingest: an unbalanced quote in row 5 of a WANDS file", rows_lost=40 - written - len(quarantined))


def not_utf8_wands(folder: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    folder.mkdir()
    (folder / "query.csv").write_bytes("query_id\tquery\tquery_class\n0\tsofa\tSofas\n1\tb\xe9d\tBeds\n".encode("latin-1"))
    return folder, "wands", "query.csv: line 3 is not UTF-8 text"


def truncated_esci(folder: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    folder.mkdir()
    products = folder / "shopping_queries_dataset_products.parquet"
    pq.write_table(pa.table({name: ["B1", "B2"] for name in ("product_id", "product_title", "product_description", "product_bullet_point",
                                                              "product_brand", "product_color", "product_locale")}), products)
    products.write_bytes(products.read_bytes()[: products.stat().st_size // 2])
    return folder, "esci", "products.parquet: not a readable parquet file"


@pytest.mark.parametrize("source", [not_utf8_wands, truncated_esci], ids=lambda source: source.__name__)
def test_an_unreadable_dataset_file_is_named_and_nothing_is_written(tmp_path, ledger, source):
    folder, form, message = source(tmp_path / "source")
    line = failure_line(invoke("ingest", "--format", form, "--source", folder, "--out", tmp_path / "out"), 1, "ingest")
    assert message in line
    half_written = len(list((tmp_path / "out").rglob("*"))) if (tmp_path / "out").exists() else 0
    assert half_written == 0
    ledger.input(f"ingest: {source.__name__.replace('_', ' ')}", half_written=half_written)
