"""Our pipeline against tea-tasting and hand-written statsmodels code on the same seeded data.

tea-tasting gets a per-user table built with pandas (not our DuckDB code), so the whole path
events -> per-user values -> sufficient statistics -> tests is checked.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import tea_tasting as tt
from abtest_testdata import START
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW, ttest_ind

from abtest import Experiment, Mean, RatioOfMeans

TOL = dict(rel=1e-9, abs=1e-12)

OURS = (
    Mean("orders", name="orders"),
    RatioOfMeans("clicks", "impressions", name="ctr"),
    Mean("orders", covariate=True, name="orders_cuped"),
    RatioOfMeans("clicks", "impressions", covariate=True, name="ctr_cuped"),
    RatioOfMeans("count_positive(clicks)", "requests", covariate=True, name="good_rate_cuped"),
)
THEIRS = {
    "orders": tt.Mean("orders"),
    "ctr": tt.RatioOfMeans("clicks", "impressions"),
    "orders_cuped": tt.Mean("orders", "pre_orders"),
    "ctr_cuped": tt.RatioOfMeans("clicks", "impressions", "pre_clicks", "pre_impressions"),
    "good_rate_cuped": tt.RatioOfMeans("good", "requests", "pre_good", "pre_requests"),
}


@pytest.fixture(scope="module")
def ours(world):
    events, assignment = world
    return Experiment(experiment_start=START, metrics=OURS).analyze(events, assignment)


@pytest.fixture(scope="module")
def theirs(users):
    return tt.Experiment(THEIRS, variant="variant").analyze(users, control="control")


@pytest.mark.parametrize("name", list(THEIRS))
def test_effects_cis_and_pvalues_equal_tea_tasting(ours, theirs, name):
    mine = next(r for r in ours.metrics if r.metric == name)
    ref = theirs[name]
    assert mine.control == pytest.approx(ref.control, **TOL)
    assert mine.treatment == pytest.approx(ref.treatment, **TOL)
    assert mine.effect == pytest.approx(ref.effect_size, **TOL)
    assert mine.effect_ci_low == pytest.approx(ref.effect_size_ci_lower, **TOL)
    assert mine.effect_ci_high == pytest.approx(ref.effect_size_ci_upper, **TOL)
    assert mine.rel_effect == pytest.approx(ref.rel_effect_size, **TOL)
    assert mine.rel_ci_low == pytest.approx(ref.rel_effect_size_ci_lower, **TOL)
    assert mine.rel_ci_high == pytest.approx(ref.rel_effect_size_ci_upper, **TOL)
    assert mine.pvalue == pytest.approx(ref.pvalue, **TOL)
    assert mine.statistic == pytest.approx(ref.statistic, **TOL)


def _linearised(users, num, den, groups):
    """Per-user delta-method values r + (y - r x) / mean(x), r and mean(x) of each group."""
    out = np.empty(len(users))
    for g in groups:
        mask = (users["variant"] == g).to_numpy()
        y = users.loc[mask, num].to_numpy()
        x = np.ones(mask.sum()) if den is None else users.loc[mask, den].to_numpy()
        r = y.mean() / x.mean()
        out[mask] = r + (y - r * x) / x.mean()
    return out


@pytest.mark.parametrize("name, num, den, cov_num, cov_den", [
    ("orders", "orders", None, None, None),
    ("ctr", "clicks", "impressions", None, None),
    ("orders_cuped", "orders", None, "pre_orders", None),
    ("ctr_cuped", "clicks", "impressions", "pre_clicks", "pre_impressions"),
])
def test_equal_hand_written_statsmodels(ours, users, name, num, den, cov_num, cov_den):
    """Welch (statsmodels.weightstats) on linearised, CUPED-adjusted per-user values."""
    value = _linearised(users, num, den, ("control", "treatment"))
    if cov_num is not None:
        everyone = users.assign(variant="all")
        lin_y = _linearised(everyone, num, den, ("all",))
        lin_x_pooled = _linearised(everyone, cov_num, cov_den, ("all",))
        theta = np.cov(lin_y, lin_x_pooled)[0, 1] / np.var(lin_x_pooled, ddof=1)
        x = everyone[cov_num].to_numpy()
        center = x.mean() / (1.0 if cov_den is None else everyone[cov_den].to_numpy().mean())
        value = value - theta * (_linearised(users, cov_num, cov_den, ("control", "treatment")) - center)
    control = value[(users["variant"] == "control").to_numpy()]
    treatment = value[(users["variant"] == "treatment").to_numpy()]
    t, p, df = ttest_ind(treatment, control, usevar="unequal")
    low, high = CompareMeans(DescrStatsW(treatment), DescrStatsW(control)).tconfint_diff(usevar="unequal")
    mine = next(r for r in ours.metrics if r.metric == name)
    assert mine.effect == pytest.approx(treatment.mean() - control.mean(), **TOL)
    assert mine.statistic == pytest.approx(t, **TOL)
    assert mine.df == pytest.approx(df, **TOL)
    assert mine.pvalue == pytest.approx(p, **TOL)
    assert mine.effect_ci_low == pytest.approx(low, **TOL)
    assert mine.effect_ci_high == pytest.approx(high, **TOL)


def test_cuped_reduces_variance_on_heterogeneous_users(ours):
    by_name = {r.metric: r for r in ours.metrics}
    assert by_name["orders"].variance_reduction == 0
    assert by_name["orders_cuped"].variance_reduction > 0.1
    assert by_name["ctr_cuped"].se < by_name["ctr"].se


def test_same_result_from_pandas_and_duckdb_relation_inputs(world, ours):
    events, assignment = world
    con = duckdb.connect()
    relation = con.from_arrow(events)
    other = Experiment(experiment_start=START, metrics=OURS).analyze(relation, assignment.to_pandas())
    for a, b in zip(ours.metrics, other.metrics):
        assert a.pvalue == pytest.approx(b.pvalue, rel=1e-12)
        assert a.effect == pytest.approx(b.effect, rel=1e-12)
