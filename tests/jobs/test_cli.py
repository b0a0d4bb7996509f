import json
import subprocess
import sys

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
    assert result.exit_code != 0
    assert "no input tables found" in str(result.exception)
