"""Bad input: clear errors, or flagged exclusions with counts that reconcile; never silent drops."""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from abtest_testdata import START

from abtest import Experiment, Mean, RatioOfMeans
from abtest.aggregate import InputError
from abtest.simulate import SimulationSpec, simulate

METRICS = (RatioOfMeans("clicks", "impressions", covariate=True, name="ctr"), Mean("orders", name="orders"))


@pytest.fixture(scope="module")
def small():
    return simulate(SimulationSpec(n_users=1500, pre_days=5, exp_days=5, start=START, seed=3))


def analyze(events, assignment, **kwargs):
    return Experiment(experiment_start=START, metrics=METRICS, **kwargs).analyze(events, assignment)


def _exclusion(result, reason):
    return next(e for e in result.exclusions if e.reason == reason)


def _set(table: pa.Table, name: str, rows: list[int], value) -> pa.Table:
    values = table[name].to_pylist()
    for i in rows:
        values[i] = value
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def test_clean_data_reconciles_with_no_exclusions(small):
    events, assignment = small
    result = analyze(events, assignment)
    rec = result.reconciliation
    assert result.exclusions == ()
    assert rec["events_in"] == events.num_rows
    assert rec["assignment_users_used"] == assignment.num_rows
    assert sum(r.n_control + r.n_treatment for r in result.metrics[:1]) == assignment.num_rows


def test_events_without_assignment_are_flagged_and_counted(small):
    events, assignment = small
    strangers = events.slice(0, 40).set_column(1, "user_id", pa.array([f"stranger{i % 4}" for i in range(40)]))
    strangers = strangers.set_column(0, "request_id", pa.array([f"x{i}" for i in range(40)]))
    exp_rows = int(pc.sum(pc.greater_equal(strangers["ds"], pa.scalar(START, pa.date32()))).as_py())
    result = analyze(pa.concat_tables([events, strangers], promote_options="permissive"), assignment)
    if exp_rows:
        excluded = _exclusion(result, "event of a user without assignment")
        assert excluded.rows == exp_rows and excluded.table == "experiment_events"
    rec = result.reconciliation
    assert rec["events_in"] == events.num_rows + 40
    assert rec["events_quarantined"] == exp_rows
    assert result.quarantine.num_rows == exp_rows
    assert rec["events_in"] == (rec["events_experiment_used"] + rec["events_pre_period_used"]
                                + rec["events_pre_period_outside_experiment"] + rec["events_quarantined"])


def test_user_in_two_variants_is_excluded_with_all_rows(small):
    events, assignment = small
    twin = assignment.slice(0, 1)
    other = "treatment" if twin["variant"][0].as_py() == "control" else "control"
    twin = twin.set_column(2, "variant", pa.array([other]))
    user = twin["user_id"][0].as_py()
    result = analyze(events, pa.concat_tables([assignment, twin], promote_options="permissive"))
    conflict = [e for e in result.exclusions if e.reason == "user assigned to more than one variant"]
    by_table = {e.table: e for e in conflict}
    assert by_table["experiment_assignment"].rows == 2 and by_table["experiment_assignment"].users == 1
    user_events = int(pc.sum(pc.equal(events["user_id"], user)).as_py())
    assert by_table["experiment_events"].rows == user_events
    assert result.reconciliation["assignment_users_used"] == assignment.num_rows - 1


def test_negative_counts_are_quarantined_with_reason(small):
    events, assignment = small
    bad = _set(events, "clicks", [5, 6, 7], -1)
    result = analyze(bad, assignment)
    excluded = _exclusion(result, "clicks below 0")
    assert excluded.rows == 3
    reasons = result.quarantine["reason"].to_pylist()
    assert reasons.count("clicks below 0") == 3
    assert '"clicks":-1' in result.quarantine["record"][0].as_py()


def test_repeated_request_ids_are_quarantined(small):
    events, assignment = small
    result = analyze(pa.concat_tables([events, events.slice(10, 5)], promote_options="permissive"), assignment)
    assert _exclusion(result, "repeated request_id").rows == 5


def test_missing_control_or_planned_variant_is_an_error(small):
    events, assignment = small
    with pytest.raises(InputError, match="control variant 'ctrl' has no users.*control"):
        analyze(events, assignment, control="ctrl")
    with pytest.raises(InputError, match=r"\['b'\] are planned"):
        analyze(events, assignment, expected_split={"control": 0.4, "treatment": 0.4, "b": 0.2})


def test_single_user_variant_is_an_error(small):
    events, assignment = small
    lonely = assignment.slice(0, 1).set_column(2, "variant", pa.array(["lonely"]))
    rest = assignment.slice(1)
    with pytest.raises(InputError, match="variant 'lonely' has 1 user"):
        analyze(events, pa.concat_tables([rest, lonely], promote_options="permissive"))


def test_two_experiments_need_an_experiment_id(small):
    events, assignment = small
    other = assignment.set_column(0, "experiment_id", pa.array(["other"] * assignment.num_rows))
    both = pa.concat_tables([assignment, other], promote_options="permissive")
    with pytest.raises(InputError, match=r"\['exp_sim', 'other'\]"):
        analyze(events, both)
    assert analyze(events, both, experiment_id="exp_sim").experiment_id == "exp_sim"


def test_missing_column_names_the_file(small, tmp_path):
    events, assignment = small
    path = tmp_path / "events.parquet"
    pq.write_table(events.drop_columns(["gmv"]), path)
    with pytest.raises(InputError, match=r"events.parquet.*\['gmv'\]"):
        analyze(path, assignment)


def test_duckdb_database_input(small, tmp_path):
    events, assignment = small
    path = tmp_path / "logs.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE experiment_events AS SELECT * FROM events")
    con.execute("CREATE TABLE experiment_assignment AS SELECT * FROM assignment")
    con.close()
    from_db = analyze(path, path)
    from_arrow = analyze(events, assignment)
    assert [r.pvalue for r in from_db.metrics] == pytest.approx([r.pvalue for r in from_arrow.metrics], rel=1e-12)


def test_early_events_before_first_exposure_are_flagged(small):
    events, assignment = small
    first = assignment.slice(0, 1)
    user, ts = first["user_id"][0].as_py(), first["first_exposure_ts"][0].as_py()
    early = events.slice(0, 1)
    early = early.set_column(0, "request_id", pa.array(["early"]))
    early = early.set_column(1, "user_id", pa.array([user]))
    early = early.set_column(early.schema.get_field_index("ts"), "ts", pa.array([ts - dt.timedelta(seconds=1)], early.schema.field("ts").type))
    early = early.set_column(early.schema.get_field_index("ds"), "ds", pa.array([max(START, (ts - dt.timedelta(seconds=1)).date())], pa.date32()))
    result = analyze(pa.concat_tables([events, early], promote_options="permissive"), assignment)
    assert _exclusion(result, "event before the user's first exposure").rows == 1
