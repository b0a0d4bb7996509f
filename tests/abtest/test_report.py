"""`run(config)`: report.md, self-contained report.html, result.json; SRM verdict first."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from abtest_testdata import START

from abtest.run import AbtestConfig, config_from_manifest, run
from abtest.simulate import SimulationSpec, simulate, write
from schemas.config import ConfigError, load_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("abtest_data")
    events, assignment = simulate(SimulationSpec(n_users=3000, pre_days=5, exp_days=5, start=START, seed=9,
                                                 split=(0.6, 0.4)))
    bad = events.slice(0, 2).set_column(0, "request_id", pa.array(["neg1", "neg2"]))
    bad = bad.set_column(bad.schema.get_field_index("orders"), "orders", pa.array([-1, -2], pa.int32()))
    write(pa.concat_tables([events, bad], promote_options="permissive"), assignment, root)
    return root


def test_run_writes_reports_with_srm_first(data_root, tmp_path):
    config = AbtestConfig(events=data_root, assignment=data_root, experiment_start=START.isoformat(), out=tmp_path)
    result = run(config)
    assert result.srm.alarm  # the logs were generated with a 60/40 split, the plan says 50/50
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.index("SRM ALARM") < markdown.index("## Metrics")
    html = (tmp_path / "report.html").read_text()
    assert html.index("SRM ALARM") < html.index("forest")
    assert "data:image/png;base64," in html and "src=\"http" not in html and "<script" not in html
    payload = json.loads((tmp_path / "result.json").read_text())
    assert [m["metric"] for m in payload["metrics"]][:2] == ["ctr", "query_good_rate"]
    assert payload["srm"]["alarm"] is True
    # the verdict comes before everything: the alarm makes it inconclusive
    assert html.index("<h2>Verdict</h2>") < html.index("<h2>Sample ratio (SRM)</h2>")
    (decision,) = payload["decisions"]
    assert (decision["variant"], decision["verdict"]) == ("treatment", "inconclusive") and "SRM alarm" in decision["reasons"][0]
    assert payload["provenance"]["version"] and "<footer>Made by relevance-labeling " in html
    assert "orders below 0" in markdown
    assert pq.read_table(tmp_path / "quarantine.parquet").num_rows == 2


def test_planned_split_clears_the_alarm(data_root, tmp_path):
    config = AbtestConfig(events=data_root, assignment=data_root, experiment_start=START.isoformat(),
                          out=tmp_path, expected_split={"control": 0.6, "treatment": 0.4}, winsorize=None)
    result = run(config)
    assert not result.srm.alarm
    assert "Sample ratio OK" in (tmp_path / "report.md").read_text()


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "abtest.yaml"
    path.write_text("events: data\nassignment: data\nexperiment_start: 2024-03-01\ncorrection: bh\n")
    config = load_config(AbtestConfig, path, ["alpha=0.01"])
    assert config.correction == "bh" and config.alpha == 0.01
    with pytest.raises(ConfigError, match="correction 'fdr'"):
        load_config(AbtestConfig, path, ["correction=fdr"])
    with pytest.raises(ConfigError, match="experiment_start"):
        load_config(AbtestConfig, path, ["experiment_start=soon"])


def test_config_from_world_manifest(data_root, tmp_path):
    manifest = data_root / "world.json"
    manifest.write_text(json.dumps({"experiment": {
        "experiment_id": "exp_sim", "variants": ["control", "treatment"], "control": "control",
        "start_date": START.isoformat(), "treatment_share": 0.4}}))
    config = config_from_manifest(manifest, tmp_path, winsorize=None)
    assert config.expected_split == {"control": 0.6, "treatment": 0.4}
    assert config.events == data_root and config.winsorize is None
    assert not run(config).srm.alarm
