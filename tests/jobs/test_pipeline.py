"""End to end on the tests-size world: generate -> validate (pandas and Spark agree) -> demo."""

import json
import re
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.demo import nightly_policy
from schemas.tables import INPUT_TABLES

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    result = runner.invoke(app, ["generate", "--preset", "tests", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def _counts(folder):
    return {name: (t["rows_in"], t["accepted"], t["quarantined"]) for name, t in
            json.loads((folder / "validation.json").read_text())["tables"].items()}


def test_every_input_table_passes_its_suite_on_pandas_and_on_spark(world, spark, tmp_path):
    manifest = json.loads((world / "world.json").read_text())
    for engine in ("pandas", "spark"):
        result = runner.invoke(app, ["validate", "--data", str(world), "--engine", engine, "--out", str(tmp_path / engine)])
        assert result.exit_code == 0, result.output
        counts = _counts(tmp_path / engine)
        assert sorted(counts) == sorted(INPUT_TABLES)
        for name, (rows_in, accepted, quarantined) in counts.items():
            assert (rows_in, accepted, quarantined) == (manifest["rows"][name], manifest["rows"][name], 0), name
        summary = json.loads((tmp_path / engine / "validation.json").read_text())["tables"]
        assert all(t["expectations_met"] == t["expectations"] > 0 for t in summary.values())
        page = (tmp_path / engine / "validation.html").read_text()
        assert page.count("<code>expect_") == sum(t["expectations"] for t in summary.values()), engine
        assert f"{manifest['rows']['queries']} in = {manifest['rows']['queries']} accepted" in page, engine


def test_demo_runs_every_stage_and_says_where_outputs_are(tmp_path):
    # label_first keeps the 4-step policy's scoring to one forward pass per pair; an untrained policy in the
    # default product_first order writes 96 tokens for every pair (the label-last path: tests/jobs/scoring)
    result = runner.invoke(app, ["demo", "--preset", "tests", "--out", str(tmp_path), "--set", "engine=pandas", "--set", "order=label_first", "--set", "sft_steps=4", "--set", "grpo_steps=2", "--set", "distill_steps=2", "--set", "eval_pairs=60", "--set", "grpo_prompts=2", "--set", "val_items=8"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    for stage in summary:
        for path in stage["outputs"].values():
            assert (tmp_path / path).exists(), (stage["stage"], path)
    assert "demo finished" in result.output
    index = (tmp_path / "index.html").read_text()
    linked = [tmp_path / unquote(href) for href in re.findall(r"href='([^']+)'", index)]
    assert all(path.is_file() for path in linked), [str(path) for path in linked if not path.is_file()]
    assert {"report.html", "validation.html", "churn.html", "summary.json"} <= {path.name for path in linked}
    churn = [path for path in linked if path.name == "churn.html"][-1].read_text()  # the second night's: the first has no model
    assert f"{nightly_policy(tmp_path)}, model_version " in churn, "the nightly rows are named after the policy, not its folder"
