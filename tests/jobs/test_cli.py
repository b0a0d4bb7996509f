import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "ingest", "validate", "evaluate", "abtest", "demo"):
        assert command in result.output


def test_cli_import_stays_light():
    # --help must be instant: the CLI module may not pull in the heavy engines.
    code = (
        "import sys, json; import jobs.cli; "
        "print(json.dumps([m for m in ('pyspark', 'torch', 'great_expectations', 'transformers', 'duckdb') "
        "if m in sys.modules]))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == []


def test_unknown_config_key_is_named(tmp_path):
    result = runner.invoke(app, ["validate", "--data", str(tmp_path), "--set", "enginee=spark"])
    assert result.exit_code != 0
    assert "unknown keys ['enginee']" in result.output


def test_validate_on_an_empty_folder_says_what_it_expected(tmp_path):
    result = runner.invoke(app, ["validate", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert "no input tables found" in result.output


def test_evaluate_reads_wands_labels_through_the_ingest_reader(tmp_path):
    import datetime as dt
    from pathlib import Path

    import pyarrow as pa

    from jobs.ingest.wands import read_wands
    from schemas.graph import LabelSet
    from schemas.storage import write_table
    from schemas.tables import RELEVANCE

    wands = Path(__file__).parents[1] / "data" / "wands"
    judgments = read_wands(wands, ["label"]).judgments.to_pylist()
    labels = LabelSet.load("wands")
    # A model that is right on every pair but the first.
    wrong = {"Exact": "Partial", "Partial": "Irrelevant", "Irrelevant": "Exact"}
    rows = []
    for i, judgment in enumerate(judgments):
        label = wrong[judgment["label"]] if i == 0 else judgment["label"]
        rows.append({
            "query": judgment["query_id"], "query_id": judgment["query_id"], "product_id": judgment["product_id"],
            "label": label, "label_set": "wands", "label_probs": [(name, float(name == label)) for name in labels.names],
            "expected_gain": labels.gains[label], "node_decisions": [], "reasoning": None,
            "product_content_hash": None, "model_name": "m", "model_version": "1",
            "scored_at": dt.datetime(2026, 11, 1, tzinfo=dt.UTC), "ds": dt.date(2026, 11, 1),
        })
    write_table(RELEVANCE, pa.Table.from_pylist(rows, schema=RELEVANCE.arrow_schema()), tmp_path / "pred")
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--pred", f"m={tmp_path / 'pred'}", "--gold", str(wands),
                                 "--gold-format", "wands", "--out", str(out), "--n-bootstrap", "50"])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "metrics.json").read_text())["models"][0]
    assert model["n_gold_pairs"] == model["n_covered"] == len(judgments)
    assert model["metrics"]["accuracy"]["estimate"] == pytest.approx(1 - 1 / len(judgments))
    assert (out / "gold_tables" / "judgments").is_dir()


def export_missing_partition(tmp_path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *options, "export", "--date", "2024-03-02", "--relevance",
                           str(tmp_path / "scores"), "--out", str(tmp_path / "published")], capture_output=True, text=True, timeout=120)


def test_a_failed_job_prints_one_line_naming_the_file_and_exits_1(tmp_path):
    failed = export_missing_partition(tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"relevance export: FileNotFoundError: no relevance partition {tmp_path / 'scores' / 'relevance' / 'ds=2024-03-02'} "
        "(latest partitions there: none) (relevance --debug shows the trace)"]
    assert "Traceback" not in failed.stdout + failed.stderr


def test_debug_shows_the_trace_and_the_log_file_keeps_it(tmp_path, monkeypatch):
    debug = export_missing_partition(tmp_path, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "no relevance partition" in debug.stderr

    log = tmp_path / "relevance.log"
    monkeypatch.setenv("RELEVANCE_LOG", str(log))
    logged = export_missing_partition(tmp_path)
    assert logged.returncode == 1 and logged.stderr.strip().endswith(f"(trace in {log})")
    assert "Traceback (most recent call last)" in log.read_text()


def test_bad_usage_exits_2():
    assert runner.invoke(app, ["score", "--date", "2024-0302"]).exit_code == 2
    assert runner.invoke(app, ["score", "--no-such-option"]).exit_code == 2


def test_a_jvm_error_is_cut_to_the_java_exception_line():
    from jobs.cli import error_line

    Py4JJavaError = type("Py4JJavaError", (Exception,), {"__module__": "py4j.protocol"})
    jvm = Py4JJavaError("An error occurred while calling o41.parquet.\n: java.io.FileNotFoundException: File file:/w/x.parquet "
                        "does not exist\n\tat org.apache.hadoop.fs.RawLocalFileSystem.deprecatedGetFileStatus(RawLocalFileSystem.java:779)")
    assert error_line(jvm) == "Py4JJavaError: java.io.FileNotFoundException: File file:/w/x.parquet does not exist"
    assert error_line(ValueError("x.csv row 5, field price: not a number\nmore")) == "ValueError: x.csv row 5, field price: not a number"
