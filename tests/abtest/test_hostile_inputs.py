"""Hostile and careless inputs: file names that are SQL, quotes in folders, values outside the schema,
and an experiment with no pre-period. Nothing runs that should not; no metric is lost."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tea_tasting as tt
from abtest_testdata import START, per_user
from typer.testing import CliRunner

from abtest import DEFAULT_METRICS, Experiment
from abtest.aggregate import InputError
from abtest.analysis import CUPED_OFF_NO_PRE_PERIOD
from abtest.simulate import SimulationSpec, simulate, write
from jobs.cli import app

HOSTILE_NAME = "e' AS z; COPY (SELECT 42) TO 'pwned.csv'; --.duckdb"
HOSTILE_PARQUET = "x.parquet', hive_partitioning = false); COPY (SELECT 42) TO 'pwned.csv'; --.parquet"
TOL = dict(rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def small():
    return simulate(SimulationSpec(n_users=1500, pre_days=5, exp_days=5, start=START, seed=3))


@pytest.fixture(scope="module")
def no_pre_period():
    """An experiment that starts on the first logged day: every event is in the experiment period."""
    return simulate(SimulationSpec(n_users=3000, pre_days=0, exp_days=6, start=START, seed=11,
                                   effects={"treatment": {"ctr": 1.05}}))


@pytest.mark.parametrize("name", [HOSTILE_NAME, HOSTILE_PARQUET])
def test_sql_in_a_file_name_is_not_run_by_the_reader(small, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    pq.write_table(small[0], tmp_path / "x.parquet")  # what the parquet name's first statement reads
    hostile = tmp_path / name
    hostile.write_bytes(b"neither a database nor parquet")
    with pytest.raises(InputError, match="pwned.csv"):
        Experiment(experiment_start=START).analyze(hostile, small[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "x.parquet"])


def test_sql_in_a_file_name_is_not_run_by_the_cli(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write(*small, tmp_path / "data")
    (tmp_path / HOSTILE_NAME).write_bytes(b"not a database")
    result = CliRunner().invoke(app, ["abtest", "--events", HOSTILE_NAME, "--assignment", str(root),
                                      "--experiment-start", START.isoformat(), "--out", str(tmp_path / "report")])
    assert result.exit_code != 0
    assert not (tmp_path / "pwned.csv").exists() and not (tmp_path / "e").exists()


def test_a_quote_in_the_data_root_reads_parquet_and_duckdb(small, tmp_path):
    events, assignment = small
    root = write(events, assignment, tmp_path / "o'brien")
    from_folder = Experiment(experiment_start=START).analyze(root, root / "experiment_assignment")
    from_arrow = Experiment(experiment_start=START).analyze(events, assignment)
    assert [r.pvalue for r in from_folder.metrics] == pytest.approx([r.pvalue for r in from_arrow.metrics], rel=1e-12)
    single = root / "it's events.parquet"
    pq.write_table(events, single)
    database = root / "o'brien's logs.duckdb"
    with duckdb.connect(str(database)) as con:
        con.register("assignment_rows", assignment)
        con.execute("CREATE TABLE experiment_assignment AS SELECT * FROM assignment_rows")
    from_files = Experiment(experiment_start=START).analyze(single, database)
    assert [r.pvalue for r in from_files.metrics] == pytest.approx([r.pvalue for r in from_arrow.metrics], rel=1e-12)


def test_query_segment_outside_the_allowed_values_is_quarantined(small):
    events, assignment = small
    segments = events["query_segment"].to_pylist()
    segments[3] = "body"
    segments[8] = "head'); DROP TABLE ev; --"
    bad = events.set_column(events.schema.get_field_index("query_segment"), "query_segment", pa.array(segments))
    result = Experiment(experiment_start=START).analyze(bad, assignment)
    reason = "query_segment not one of ['head', 'torso', 'tail']"
    excluded = next(e for e in result.exclusions if e.reason == reason)
    assert excluded.rows == 2 and excluded.table == "experiment_events"
    quarantined = result.quarantine.filter(pc.equal(result.quarantine["reason"], reason))
    assert quarantined["field"].to_pylist() == ["query_segment", "query_segment"]
    records = [json.loads(r) for r in quarantined["record"].to_pylist()]
    assert sorted(r["request_id"] for r in records) == sorted(events["request_id"].take([3, 8]).to_pylist())
    rec = result.reconciliation
    assert rec["events_in"] == events.num_rows and rec["events_quarantined"] == 2
    assert rec["events_in"] == (rec["events_experiment_used"] + rec["events_pre_period_used"]
                                + rec["events_pre_period_outside_experiment"] + rec["events_quarantined"])


def test_no_pre_period_falls_back_to_the_plain_estimate(no_pre_period):
    events, assignment = no_pre_period
    assert pc.min(events["ds"]).as_py() == START
    ours = Experiment(experiment_start=START).analyze(events, assignment)
    users = per_user(events, assignment)
    theirs = tt.Experiment({
        "ctr": tt.RatioOfMeans("clicks", "impressions"),
        "query_good_rate": tt.RatioOfMeans("good", "requests"),
        "cvr": tt.RatioOfMeans("orders", "clicks"),
        "orders_per_user": tt.Mean("orders"),
    }, variant="variant").analyze(users, control="control")
    by_name = {r.metric: r for r in ours.metrics}
    assert set(by_name) == {m.name for m in DEFAULT_METRICS}
    for name in ("ctr", "query_good_rate", "cvr", "orders_per_user"):
        mine, ref = by_name[name], theirs[name]
        assert not mine.cuped and mine.note == CUPED_OFF_NO_PRE_PERIOD
        assert mine.effect == pytest.approx(ref.effect_size, **TOL)
        assert mine.rel_effect == pytest.approx(ref.rel_effect_size, **TOL)
        assert mine.rel_ci_low == pytest.approx(ref.rel_effect_size_ci_lower, **TOL)
        assert mine.pvalue == pytest.approx(ref.pvalue, **TOL)
    assert all(CUPED_OFF_NO_PRE_PERIOD in line for line in ours.sentences())
    assert all("no data" not in line for line in ours.sentences())


def test_a_variant_without_pre_period_data_turns_cuped_off_only_there(small):
    """Pre-period impressions only in the control: CUPED cannot centre the treatment, so it is off."""
    events, assignment = small
    treated = set(pc.filter(assignment["user_id"], pc.equal(assignment["variant"], "treatment")).to_pylist())
    pre_of_treated = pc.and_(pc.less(events["ds"], pa.scalar(START, pa.date32())),
                             pc.is_in(events["user_id"], pa.array(sorted(treated))))
    events = events.filter(pc.invert(pre_of_treated))
    ctr = next(r for r in Experiment(experiment_start=START).analyze(events, assignment).metrics if r.metric == "ctr")
    assert not ctr.cuped and ctr.note == CUPED_OFF_NO_PRE_PERIOD and ctr.pvalue == ctr.pvalue
