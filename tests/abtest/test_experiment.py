"""Segments, day-since-exposure, winsorisation, multi-arm corrections, metric YAML."""

from __future__ import annotations

import numpy as np
import pytest
from abtest_testdata import START

from abtest import Experiment, Mean, RatioOfMeans, load_metrics
from abtest.simulate import SimulationSpec, simulate
from schemas.config import ConfigError


@pytest.fixture(scope="module")
def three_arms():
    spec = SimulationSpec(n_users=6000, pre_days=5, exp_days=6, start=START, seed=5,
                          variants=("control", "a", "b"), effects={"a": {"ctr": 1.1}})
    return simulate(spec)


def test_query_segment_view_equals_the_filtered_metric(world):
    """The head-segment row of CTR (slices) equals a CTR metric filtered to head queries (atoms)."""
    events, assignment = world
    metrics = (RatioOfMeans("clicks", "impressions", covariate=True, name="ctr"),
               RatioOfMeans("clicks", "impressions", covariate=True, name="ctr_head", filter={"query_segment": "head"}))
    result = Experiment(experiment_start=START, metrics=metrics).analyze(events, assignment)
    segment = next(r for r in result.segments if r.metric == "ctr" and r.slice_value == "head")
    filtered = next(r for r in result.metrics if r.metric == "ctr_head")
    for field in ("control", "treatment", "effect", "pvalue", "rel_ci_low", "variance_reduction"):
        assert getattr(segment, field) == pytest.approx(getattr(filtered, field), rel=1e-9)


def test_user_type_segments_partition_the_users(world):
    events, assignment = world
    result = Experiment(experiment_start=START, metrics=(Mean("orders", name="orders"),)).analyze(events, assignment)
    by_type = [r for r in result.segments if r.slice_kind == "user_type"]
    assert sum(r.n_control + r.n_treatment for r in by_type) == assignment.num_rows
    new_srm = next(s for s in result.srm_segments if s.kind == "user_type" and s.value == "new")
    assert sum(new_srm.result.observed.values()) == sum(
        1 for t in assignment["user_type"].to_pylist() if t == "new")


def test_day_view_counts_users_observable_that_day(world):
    events, assignment = world
    result = Experiment(experiment_start=START, metrics=(Mean("orders", name="orders"),)).analyze(events, assignment)
    days = sorted((int(r.slice_value), r.n_control + r.n_treatment) for r in result.days)
    assert days[0] == (0, assignment.num_rows)
    exposure = assignment["first_exposure_ts"].to_numpy().astype("datetime64[D]")
    last = np.datetime64(result.last_day)
    for day, n in days:
        assert n == int((exposure + np.timedelta64(day, "D") <= last).sum())
    assert all(not r.cuped for r in result.days)


def test_winsorisation_caps_numerator_and_denominator_over_the_same_users(world, users):
    """Hand computation with numpy: one factor per user, min(1, cap_num/num, cap_den/den)."""
    events, assignment = world
    q = 0.99
    metric = RatioOfMeans("clicks", "impressions", name="ctr")
    result = Experiment(experiment_start=START, metrics=(metric,), winsorize=q).analyze(events, assignment)
    y, x = users["clicks"].to_numpy(), users["impressions"].to_numpy()
    cap_y, cap_x = np.quantile(y, q), np.quantile(x, q)
    with np.errstate(divide="ignore"):
        factor = np.minimum(1.0, np.minimum(np.where(y > 0, cap_y / y, np.inf), np.where(x > 0, cap_x / x, np.inf)))
    control = (users["variant"] == "control").to_numpy()
    expected = (y * factor)[control].sum() / (x * factor)[control].sum()
    row = result.metrics[0]
    assert row.control == pytest.approx(expected, rel=1e-12)
    assert result.caps["sum(clicks) [TRUE] (exp)"] == pytest.approx(cap_y)
    assert row.control != pytest.approx(y[control].sum() / x[control].sum(), rel=1e-6)


def test_multi_arm_holm_across_metrics_and_variants(three_arms):
    events, assignment = three_arms
    metrics = (RatioOfMeans("clicks", "impressions", name="ctr", tier="primary"), Mean("orders", name="orders"),
               Mean("gmv", name="gmv", tier="guardrail", margin=0.05))
    result = Experiment(experiment_start=START, metrics=metrics).analyze(events, assignment)
    tested = [r for r in result.metrics if r.tier != "guardrail"]
    assert {(r.metric, r.variant) for r in tested} == {(m, v) for m in ("ctr", "orders") for v in ("a", "b")}
    p = sorted(r.pvalue for r in tested)
    smallest = min(tested, key=lambda r: r.pvalue)
    assert smallest.pvalue_adjusted == pytest.approx(min(1.0, 4 * p[0]))
    guard = [r for r in result.metrics if r.tier == "guardrail"]
    assert all(r.pvalue_adjusted is None and r.ni_verdict in ("pass", "fail", "inconclusive") for r in guard)
    assert next(r for r in tested if r.metric == "ctr" and r.variant == "a").significant
    assert [r.tier for r in result.metrics] == sorted((r.tier for r in result.metrics), key=["primary", "secondary", "guardrail"].index)


def test_metrics_yaml(tmp_path):
    path = tmp_path / "metrics.yaml"
    path.write_text(
        "include_defaults: true\n"
        "metrics:\n"
        "  - {name: head_ctr, type: ratio, numerator: clicks, denominator: impressions,\n"
        "     covariate: [clicks, impressions], filter: {query_segment: [head]}, tier: secondary}\n"
        "  - {name: carts, type: mean, value: add_to_carts, covariate: true}\n"
    )
    metrics = load_metrics(path)
    assert [m.name for m in metrics][-2:] == ["head_ctr", "carts"] and len(metrics) == 8
    assert metrics[-2].filter == (("query_segment", ("head",)),)
    path.write_text("metrics:\n  - {name: x, type: mean, value: clicks, colour: red}\n")
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        load_metrics(path)
    path.write_text("metrics:\n  - {name: x, type: mean, value: sum(price)}\n")
    with pytest.raises(ConfigError, match="sum\\(price\\)"):
        load_metrics(path)
    with pytest.raises(ConfigError, match="non-inferiority margin"):
        Mean("gmv", tier="guardrail")
