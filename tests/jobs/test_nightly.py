"""`relevance nightly`: two nights on the tests-size world (prepare with Spark, score with the tiny policy,
validate, publish), re-running a night changes nothing, and a night whose table fails validation exits
non-zero and publishes nothing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.nightly import NightlyConfig, PrepareSettings, ScoreSettings, run
from schemas.storage import partitions, read_table, write_table
from schemas.tables import CANDIDATE_PAIRS, RELEVANCE, SEARCH_IMPRESSIONS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from jobs.world.run import GenerateConfig
    from jobs.world.run import run as generate

    out = tmp_path_factory.mktemp("nightly_world")
    generate(GenerateConfig(out=out, preset="tests", seed=5))
    return out


def test_two_nights_rerun_and_a_failed_validation(world, tiny_model, tmp_path, spark):
    first, second = (day.isoformat() for day in partitions(SEARCH_IMPRESSIONS, world)[-2:])
    settings = {"data": str(world), "out": str(tmp_path), "model": str(tiny_model), "reasoning": "none", "score": ScoreSettings(prompt_tokens=40),
                "prepare": PrepareSettings(run_suite=False)}  # the GE certification of the inputs is tested with prepare
    run(NightlyConfig(date=first, **settings))
    report = run(NightlyConfig(date=second, **settings))
    scored = report["steps"]["score"]["report"]
    candidates = read_table(CANDIDATE_PAIRS, tmp_path / "prepared", days=[partitions(CANDIDATE_PAIRS, tmp_path / "prepared")[-1]])
    assert scored["candidates"] == candidates.num_rows == scored["scored"] + scored["reused"]
    assert scored["reused"] > 0, "pairs seen the night before are not scored again"
    published = tmp_path / "published" / "relevance" / f"ds={second}"
    assert pq.read_table(published / "relevance.parquet").num_rows == candidates.num_rows
    assert json.loads((published / "manifest.json").read_text())["ds"] == second
    assert json.loads((published / "churn.json").read_text())["previous_ds"] == first
    night = tmp_path / "reports" / f"ds={second}"
    assert json.loads((night / "nightly.json").read_text())["date"] == second and (night / "index.html").is_file()
    assert not (tmp_path / "nightly").exists(), "the night's report is not under a second nightly/"

    before = pq.read_table(published / "relevance.parquet")
    again = run(NightlyConfig(date=second, **settings))
    assert again["steps"]["score"]["report"]["scored"] == 0
    assert pq.read_table(published / "relevance.parquet").equals(before)

    # a corrupted cache: tonight's stored scores no longer sum to one; the re-run reuses them, validation stops it
    stored = read_table(RELEVANCE, tmp_path / "scores", days=[before["ds"][0].as_py()])
    halved = [[(label, p / 2) for label, p in probs] for probs in stored["label_probs"].to_pylist()]
    probs_type = RELEVANCE.arrow_schema().field("label_probs").type
    write_table(RELEVANCE, stored.set_column(stored.schema.get_field_index("label_probs"), "label_probs", pa.array(halved, probs_type)),
                tmp_path / "scores")
    latest = (tmp_path / "published" / "relevance" / "_LATEST").read_text()
    result = CliRunner().invoke(app, ["nightly", "--date", second, "--data", str(world), "--out", str(tmp_path), "--model", str(tiny_model),
                                      "--set", "reasoning=none", "--set", "score.prompt_tokens=40",
                                      "--set", "prepare.run_suite=false"])
    assert result.exit_code == 1
    assert "validation failed, nothing published" in result.output and "label_probs" in result.output
    assert pq.read_table(published / "relevance.parquet").equals(before), "the published night is untouched"
    assert (tmp_path / "published" / "relevance" / "_LATEST").read_text() == latest


def test_a_truncated_model_or_a_missing_input_fails_the_night_before_prepare(world, tiny_model, tmp_path):
    import shutil

    from schemas.storage import partitions as days_of

    day = days_of(SEARCH_IMPRESSIONS, world)[-1].isoformat()
    model = shutil.copytree(tiny_model, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    night = ["nightly", "--date", day, "--data", str(world), "--out", str(tmp_path / "night")]
    result = CliRunner().invoke(app, [*night, "--model", str(model)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()], "one line"
    assert f"{weights}: unreadable weights" in result.output and "truncated" in result.output
    assert not (tmp_path / "night" / "prepared").exists(), "nothing prepared"

    (model / "tokenizer_config.json").unlink()
    result = CliRunner().invoke(app, [*night, "--model", str(model)])
    assert result.exit_code == 1 and "lacks tokenizer_config.json" in result.output

    result = CliRunner().invoke(app, [*night, "--model", str(tiny_model), "--date", "1999-01-01"])
    assert result.exit_code == 1
    assert f"input not found: {world / 'search_impressions' / 'ds=1999-01-01'}" in result.output
    assert not (tmp_path / "night" / "prepared").exists()


def test_a_night_whose_date_another_process_holds_fails_at_once_naming_it(world, tiny_model, tmp_path):
    import socket
    import subprocess
    import sys

    day = partitions(SEARCH_IMPRESSIONS, world)[-1]
    hold = ("import sys, datetime as dt; from jobs.lock import date_lock\n"
            f"with date_lock(sys.argv[1], dt.date.fromisoformat('{day}'), 'nightly'):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["nightly", "--date", day.isoformat(), "--data", str(world), "--out", str(tmp_path),
                                          "--model", str(tiny_model)])
    finally:
        holder.communicate("", timeout=30)
    assert result.exit_code == 1
    assert f"locked by pid {holder.pid} on {socket.gethostname()} (nightly since" in result.output
    assert not (tmp_path / "prepared").exists()


# A wrong key or value in any step's settings, the last step's included: exit 2 naming it, before any step.
WRONG_SETTINGS = {
    "a typo in score.*": (["--set", "score.shard_sise=500"], "score: unknown keys ['shard_sise']"),
    "a wrong prepare.* value": (["--set", "prepare.run_suite=maybe"], "prepare.run_suite: expected true or false, got 'maybe'"),
    "a wrong export.* value": (["--set", "export.max_prob_sum_error=2"], "max_prob_sum_error must be in (0, 1)"),
    "a reasoning mode the scorer lacks": (["--set", "reasoning=everything"], "reasoning must be one of ('none', 'sample', 'all')"),
}


@pytest.mark.parametrize("case", WRONG_SETTINGS)
def test_a_wrong_setting_of_any_step_fails_the_night_before_it_starts(tmp_path, monkeypatch, case):
    started = []
    monkeypatch.setattr("jobs.nightly.run", started.append)  # what the command calls once the config is built
    monkeypatch.chdir(tmp_path)
    options, message = WRONG_SETTINGS[case]
    result = CliRunner().invoke(app, ["nightly", "--date", "2024-03-13", "--model", "no_model_needed_to_fail_first",
                                      "--out", "night", *options])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert started == [], "no step ran"
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_a_night_on_spark_scores_and_publishes_on_spark_with_csv_opt_in(tiny_model, tmp_path):
    night = NightlyConfig(date="2024-03-02", out=str(tmp_path), model=str(tiny_model), engine="spark")
    assert (night.score_config().engine, night.export_config().engine, night.export_config().with_csv) == ("spark", "spark", False)
    assert NightlyConfig(date="2024-03-02", out=str(tmp_path), model=str(tiny_model)).export_config().with_csv
