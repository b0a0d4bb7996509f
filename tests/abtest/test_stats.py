"""The statistics functions against scipy, statsmodels and hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.power import NormalIndPower

from abtest import stats
from abtest.stats import MetricColumns, suff_stats_from_arrays


def _arrays(seed: int, n: int = 500, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 1.5, n), rng.gamma(2.0, 1.5, n + 37) + shift


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_equals_scipy(seed):
    a, b = _arrays(seed, shift=0.2)
    ref = scipy.stats.ttest_ind(b, a, equal_var=False)
    got = stats.welch(a.mean(), a.var(ddof=1), len(a), b.mean(), b.var(ddof=1), len(b), 0.05)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert got.pvalue == pytest.approx(ref.pvalue, rel=1e-10)
    low, high = ref.confidence_interval(0.95)
    assert (got.ci_low, got.ci_high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_tiny_pvalues_stay_positive():
    """t = 30 on 1000 df: 1 - cdf rounds to 0; the survival function does not."""
    got = stats.welch(0.0, 1.0, 501, 30 * math.sqrt(2 / 501), 1.0, 501, 0.05)
    assert 1 - scipy.stats.t.cdf(30, got.df) == 0
    assert got.pvalue > 0
    assert got.pvalue == pytest.approx(2 * scipy.stats.t.sf(30, got.df), rel=1e-12)


def test_suff_stats_covariance_and_pooling_match_numpy():
    a, b = _arrays(3)
    sa = suff_stats_from_arrays({"x": a[:400], "y": a[100:500]})
    sb = suff_stats_from_arrays({"x": b[:400], "y": b[100:500]})
    assert sa.cov("x", "y") == pytest.approx(np.cov(a[:400], a[100:500])[0, 1], rel=1e-10)
    pooled = sa + sb
    assert pooled.cov("x", "x") == pytest.approx(np.var(np.r_[a[:400], b[:400]], ddof=1), rel=1e-10)


def test_ratio_variance_is_the_variance_of_linearised_values():
    rng = np.random.default_rng(4)
    x = rng.poisson(20, 800).astype(float)
    y = rng.binomial(x.astype(int), 0.1).astype(float)
    s = suff_stats_from_arrays({"y": y, "x": x})
    r = y.sum() / x.sum()
    linear = r + (y - r * x) / x.mean()
    assert stats.ratio_cov(s, "y", "x", "y", "x") == pytest.approx(linear.var(ddof=1), rel=1e-10)


def test_cuped_theta_recovers_known_slope():
    rng = np.random.default_rng(5)
    x = rng.normal(10, 3, 20_000)
    y = 2.0 * x + rng.normal(0, 1, 20_000)
    pooled = suff_stats_from_arrays({"y": y, "x": x})
    theta = stats.cuped_theta(pooled, MetricColumns("y", None, "x", None))
    assert theta == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)


def test_relative_lift_log_scale_hand_worked():
    # control mean 10, var 4, n 100; treatment 11, var 9, n 100.
    got = stats.relative_lift(10.0, 4.0, 100, 11.0, 9.0, 100, 0.05)
    se = math.sqrt(4 / 100 / 100 + 9 / 121 / 100)
    vc, vt = 4 / 100 / 100, 9 / 121 / 100
    df = (vc + vt) ** 2 / (vc**2 / 99 + vt**2 / 99)
    q = scipy.stats.t.ppf(0.975, df)
    assert got.method == "log"
    assert got.ci_low == pytest.approx(1.1 * math.exp(-q * se) - 1, rel=1e-12)
    assert got.ci_high == pytest.approx(1.1 * math.exp(q * se) - 1, rel=1e-12)


def test_relative_lift_with_zero_or_negative_control():
    assert stats.relative_lift(0.0, 1.0, 50, 1.0, 1.0, 50, 0.05).method == "undefined"
    neg = stats.relative_lift(-2.0, 1.0, 100, -1.0, 1.0, 100, 0.05)
    assert neg.method == "delta" and neg.lift == pytest.approx(-0.5)
    se = math.sqrt(1 / 100 / 4 + 1 * 1 / 100 / 16)
    assert neg.ci_high - neg.lift == pytest.approx(scipy.stats.norm.ppf(0.975) * se, rel=1e-12)


@pytest.mark.parametrize("observed, share", [
    ({"a": 5050, "b": 4950}, None),
    ({"a": 5200, "b": 4800}, None),
    ({"control": 3000, "x": 3100, "y": 3900}, {"control": 0.3, "x": 0.3, "y": 0.4}),
])
def test_srm_equals_scipy_chisquare(observed, share):
    got = stats.srm(observed, share)
    counts = np.array(list(observed.values()))
    expected = None if share is None else counts.sum() * np.array([share[k] for k in observed])
    ref = scipy.stats.chisquare(counts, expected)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert got.pvalue == pytest.approx(ref.pvalue, rel=1e-10)
    assert got.alarm == (ref.pvalue < 0.001)


def test_srm_alarm_on_a_real_mismatch():
    assert stats.srm({"a": 5200, "b": 4800}).alarm
    assert not stats.srm({"a": 5050, "b": 4950}).alarm


def test_holm_and_bh_hand_worked():
    p = [0.01, 0.04, 0.03, 0.005]
    reject, holm = stats.adjust_pvalues(p, "holm", 0.05)
    assert holm == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert list(reject) == [True, False, False, True]
    _, bh = stats.adjust_pvalues(p, "bh", 0.05)
    assert bh == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_unknown_correction_lists_known_ones():
    with pytest.raises(ValueError, match="holm"):
        stats.adjust_pvalues([0.1], "sidak-ish", 0.05)


def test_mde_and_sample_size_equal_statsmodels_normal_power():
    """Our MDE ignores the far tail (the usual z_{1-a/2} + z_power rule): statsmodels' one-sided
    power at alpha / 2 is exactly that rule."""
    var, n = 4.0, 5000
    power = NormalIndPower()
    mde = stats.mde(var, n, var, n, 10.0, 0.05, 0.8)
    achieved = power.power(mde.effect / math.sqrt(var), nobs1=n, alpha=0.025, ratio=1.0, alternative="larger")
    assert achieved == pytest.approx(0.8, rel=1e-10)
    assert mde.relative == pytest.approx(mde.effect / 10.0)
    total = stats.sample_size(var, 10.0, 0.02, 0.05, 0.8)  # effect 0.2, standardised 0.1
    assert power.power(0.1, nobs1=total / 2, alpha=0.025, alternative="larger") >= 0.8
    assert power.power(0.1, nobs1=total / 2 - 1, alpha=0.025, alternative="larger") < 0.8


def test_non_inferiority_hand_worked():
    welch = stats.welch(10.0, 4.0, 400, 9.9, 4.0, 400, 0.05)  # effect -0.1, se sqrt(0.02)
    got = stats.non_inferiority(welch, 10.0, 0.05, True, 0.05)  # threshold -0.5
    assert got.threshold == pytest.approx(-0.5)
    assert got.pvalue == pytest.approx(scipy.stats.t.sf(0.4 / math.sqrt(0.02), welch.df), rel=1e-12)
    assert got.verdict == "pass"
    worse = stats.non_inferiority(stats.welch(10.0, 4.0, 400, 9.0, 4.0, 400, 0.05), 10.0, 0.05, True, 0.05)
    assert worse.verdict == "fail"
    lower_is_better = stats.non_inferiority(welch, 10.0, 0.05, False, 0.05)  # a drop is good here
    assert lower_is_better.verdict == "pass" and lower_is_better.threshold == pytest.approx(0.5)


def test_msprt_hand_worked():
    got = stats.msprt(effect=0.3, se=0.1, tau=0.2, alpha=0.05)
    v, t2 = 0.01, 0.04
    lam = math.sqrt(v / (v + t2)) * math.exp(t2 * 0.09 / (2 * v * (v + t2)))
    assert got.pvalue == pytest.approx(1 / lam, rel=1e-12)
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(20) + math.log((v + t2) / v)))
    assert (got.ci_low, got.ci_high) == (pytest.approx(0.3 - half), pytest.approx(0.3 + half))
    assert got.ci_high - got.ci_low > 2 * 1.96 * 0.1  # wider than the fixed-horizon CI


def test_msprt_stays_valid_under_peeking_where_fixed_horizon_does_not():
    """2,000 A/A experiments looked at 20 times: stopping at the first p < alpha."""
    rng = np.random.default_rng(11)
    looks, sims, alpha = 20, 2000, 0.05
    increments = rng.normal(0, 1, (sims, looks))
    cum = increments.cumsum(axis=1)
    n = np.arange(1, looks + 1)
    effect, se = cum / n, 1 / np.sqrt(n)
    fixed_p = 2 * scipy.stats.norm.sf(np.abs(effect / se))
    seq_p = np.array([[stats.msprt(e, s, 0.5, alpha).pvalue for e, s in zip(row, se)] for row in effect])
    fixed_fpr = (fixed_p < alpha).any(axis=1).mean()
    seq_fpr = (seq_p < alpha).any(axis=1).mean()
    assert fixed_fpr > 0.15  # peeking breaks the fixed-horizon test
    assert seq_fpr <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / sims)


def test_covariate_observed_needs_pre_period_data_in_each_variant():
    rng = np.random.default_rng(5)
    y, x = rng.poisson(3, 50).astype(float), rng.poisson(9, 50).astype(float)
    ratio = MetricColumns("y", "x", "cy", "cx")
    mean = MetricColumns("y", None, "cy", None)

    def sample(cy, cx):
        return suff_stats_from_arrays({"y": y, "x": x, "cy": cy, "cx": cx})

    observed, empty = sample(y + 1, x + 1), sample(np.zeros(50), np.zeros(50))
    assert stats.covariate_observed(observed, observed, ratio) and stats.covariate_observed(observed, empty, mean)
    assert not stats.covariate_observed(observed, empty, ratio)  # undefined in the treatment: 0 / 0
    assert not stats.covariate_observed(empty, empty, mean)  # all zeros: nothing to adjust with
    assert not stats.covariate_observed(observed, observed, MetricColumns("y", "x"))
