import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from jobs.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "ingest", "validate", "evaluate", "abtest", "demo", "rankers", "judge-report"):
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


# --- what a user sees: required options, help, version, completion, config show, exit codes -------


def help_lines(*command: str) -> dict[str, str]:
    """`relevance COMMAND --help` on a terminal wide enough for one line per option: {option: its line}."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = [line.strip("│ ") for line in result.output.splitlines() if line.startswith("│")]
    return {match[1]: line for line in lines if (match := re.match(r"\*?\s*(--[\w-]+)", line))}


@pytest.mark.parametrize("args, missing", [
    (["score", "--date", "2024-03-02"], "option --model (or set model"),
    (["export", "--date", "2024-03-02"], "options --relevance, --out (or set relevance, out"),
    (["ingest", "--format", "wands"], "options --source, --out (or set source, out"),
])
def test_a_missing_required_option_is_named_by_its_flag_and_exits_2(args, missing):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"relevance {args[0]}: ConfigError: missing required {missing} in the --config file or with "
                                          "--set KEY=VALUE)"]
    assert "__init__" not in result.output and "TypeError" not in result.output


def test_a_required_key_may_come_from_set_instead_of_its_option(tmp_path):
    result = runner.invoke(app, ["export", "--date", "2024-03-02", "--set", f"relevance={tmp_path / 'scores'}", "--set",
                                 f"out={tmp_path / 'published'}"])
    assert result.exit_code == 1 and "no relevance partition" in result.stderr, result.output  # past the config, on to the data


def test_help_marks_required_options_and_shows_defaults_and_allowed_values():
    from jobs.scoring.spec import BACKENDS

    score = help_lines("score")
    assert score["--date"].startswith("*") and score["--date"].endswith("[required]")
    assert score["--model"].startswith("*") and score["--model"].endswith("[required]")
    assert "[hf|vllm|student]" in score["--backend"] and score["--backend"].endswith("[default: hf]")
    assert f"[{'|'.join(BACKENDS)}]" in score["--backend"], "drawn from the constant the config checks against"
    assert "[none|sample|all]" in score["--reasoning"] and score["--reasoning"].endswith("[default: none]")
    assert "[local|spark]" in score["--engine"] and score["--out"].endswith("[default: scores]")
    assert "[required]" not in score["--pairs"] and score["--pairs"].endswith("[default: prepared]")

    ingest = help_lines("ingest")
    assert "[wands|esci]" in ingest["--format"] and ingest["--format"].endswith("[required]")  # a Literal field
    assert ingest["--strict"].endswith("[default: no-strict]")
    engine = help_lines("validate")["--engine"]
    assert "[pandas|spark]" in engine and engine.endswith("[default: pandas]")
    assert "[tests|demo|benchmark]" in help_lines("generate")["--preset"]
    nightly = help_lines("nightly")
    assert nightly["--model"].endswith("[required]") and nightly["--out"].endswith("[default: nightly_output]")


def test_train_grpo_help_lists_every_registered_estimator():
    # the estimator registry needs torch, which help does not import: the list is written out, and checked here
    from training.grpo.estimators import ESTIMATORS

    line = help_lines("train", "grpo")["--estimator"]
    assert sorted(name for name in ESTIMATORS if name in line) == sorted(ESTIMATORS)
    assert line.endswith("[default: graph_grpo]")


def test_every_command_names_the_config_its_body_loads():
    import inspect

    import typer.main

    from jobs.cli import ConfigCommand

    def commands(group):
        for command in group.commands.values():
            yield from commands(command) if hasattr(command, "commands") else [command]

    configured = [command for command in commands(typer.main.get_command(app)) if isinstance(command, ConfigCommand)]
    assert len(configured) == 19  # judges combine, model merge, rankers and judge-report joined
    for command in configured:
        assert command.config_fields(), command.name
        assert re.search(rf"_load\(\s*{command.config_class.split(':')[1]},", inspect.getsource(command.callback)), command.name


def test_version_is_the_installed_distribution_s():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"{project['name']} {project['version']}\n"


def test_shell_completion_is_on():
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    # typer takes `--show-completion SHELL` only with shell detection off; with it on, the option is a flag and the
    # shell comes from the parent process, which under make or CI is no shell at all
    script = subprocess.run([str(Path(sys.executable).with_name("relevance")), "--show-completion", "bash"], capture_output=True,
                            text=True, env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_RELEVANCE_COMPLETE=complete_bash" in script.stdout, script.stderr
    completed = runner.invoke(app, [], prog_name="relevance",
                              env={"_RELEVANCE_COMPLETE": "complete_bash", "COMP_WORDS": "relevance train g", "COMP_CWORD": "2"})
    assert completed.output.split() == ["grpo"]


def test_config_show_prints_the_resolved_config_and_runs_nothing(tmp_path, monkeypatch):
    import yaml

    from jobs.validate import ValidateConfig
    from schemas.config import load_config

    ran = []
    monkeypatch.setattr("jobs.validate.run", ran.append)
    monkeypatch.chdir(tmp_path)
    given = tmp_path / "validate.yaml"
    given.write_text("data: from_file\nout: checks\n")
    result = runner.invoke(app, ["config", "show", "validate", "--config", str(given), "--data", "world", "--set", "engine=spark"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    # defaults, then the file, then --set, then the options
    assert shown == {"data": "world", "out": "checks", "tables": [], "engine": "spark", "spark_master": None}
    assert ran == [] and sorted(path.name for path in tmp_path.iterdir()) == ["validate.yaml"]
    (tmp_path / "shown.yaml").write_text(result.stdout)
    assert load_config(ValidateConfig, tmp_path / "shown.yaml") == load_config(ValidateConfig, given, ["engine=spark"], {"data": "world"})


def test_config_show_json_of_a_sub_command_with_a_section_override():
    result = runner.invoke(app, ["config", "show", "--json", "prepare", "--date", "2024-03-13", "--data", "world",
                                 "--set", "synonyms.sofa=couch", "--set", "run_suite=false"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"date": "2024-03-13", "data": "world", "out": "", "synonyms": {"sofa": "couch"},
                                         "run_suite": False, "spark_master": None, "spark_conf": {}}
    nested = runner.invoke(app, ["config", "show", "--json", "model", "init", "--out", "m", "--set", "num_layers=2"])
    assert nested.exit_code == 0, nested.output
    assert json.loads(nested.stdout)["num_layers"] == 2 and json.loads(nested.stdout)["out"] == "m"


def test_config_show_checks_the_config_and_stages_nothing(tmp_path):
    wands = Path(__file__).parents[1] / "data" / "wands"
    out = tmp_path / "report"
    result = runner.invoke(app, ["config", "show", "evaluate", "--pred", "m=x", "--gold", str(wands), "--gold-format", "wands",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "gold_tables" in result.stdout and not out.exists(), "the gold the evaluation reads, not staged"
    wrong = runner.invoke(app, ["config", "show", "score", "--date", "2024-03-13"])
    assert wrong.exit_code == 2 and "missing required option --model" in wrong.stderr
    unknown = runner.invoke(app, ["config", "show", "scor"])
    assert unknown.exit_code == 2 and "no command 'scor'" in unknown.output


def fail_with(monkeypatch, error: Exception) -> Result:
    def run(config):
        raise error

    monkeypatch.setattr("jobs.validate.run", run)
    return runner.invoke(app, ["validate", "--data", "world"])


@pytest.mark.parametrize("error, exit_code", [
    (ValueError("x.csv row 5, field price: not a number"), 1),
    (FileNotFoundError("no input tables found under world"), 1),
    (OSError(28, "No space left on device"), 1),
    (KeyError("unknown table 'x'"), 3),
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"), 3),
    (AssertionError("judgments do not reconcile"), 3),
])
def test_exit_codes_tell_bad_data_from_an_internal_error(monkeypatch, error, exit_code):
    result = fail_with(monkeypatch, error)
    assert result.exit_code == exit_code, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"relevance validate: {'internal error' if exit_code == 3 else type(error).__name__}")
    assert type(error).__name__ in line and line.endswith("(relevance --debug shows the trace)")


def test_a_held_day_is_a_job_failure(monkeypatch):
    from jobs.lock import DateLockedError

    assert fail_with(monkeypatch, DateLockedError("ds=2024-03-13 is locked by pid 7")).exit_code == 1


def test_debug_prints_the_trace_and_keeps_the_exit_code(monkeypatch):
    def run(config):
        raise TypeError("a bug")

    monkeypatch.setattr("jobs.validate.run", run)
    result = runner.invoke(app, ["--debug", "validate", "--data", "world"])
    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.stderr and result.stderr.splitlines()[-1].startswith("relevance validate: internal error")


def test_evaluate_takes_the_baseline_and_the_lineage_as_flags():
    models = ["--pred", "rater=r.parquet", "--pred", "sft=s.parquet", "--pred", "grpo=g.parquet", "--gold", "gold.parquet"]
    result = runner.invoke(app, ["config", "show", "--json", "evaluate", *models, "--baseline", "sft", "--lineage", "rater,grpo"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["baseline"], shown["lineage"]) == ("sft", ["rater", "grpo"])
    wrong = runner.invoke(app, ["config", "show", "evaluate", *models, "--lineage", "sft,student"])
    assert wrong.exit_code == 2 and "student" in wrong.output
