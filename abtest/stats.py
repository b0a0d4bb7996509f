"""The statistics of an A/B analysis: pure functions of sufficient statistics, typed results.

Nothing here sees a row of data. A variant (or a segment of one) is summarised by `SuffStats`:
the number of users `n`, the sum of each per-user column and the sum of each product of two
columns. Those are additive (pooling two samples is adding them), so DuckDB computes them once and
everything below is arithmetic on scalars.

Choices, each the conventional one in the anchors (tea-tasting, Deng et al. 2013 and 2018, Kohavi
et al. 2020):
- Welch's unequal-variance t-test; p-values from the t survival function (`2 * sf(|t|)`), never
  `1 - cdf`, so that very small p-values stay positive.
- A ratio of means sum(y)/sum(x) over users is linearised by the delta method:
  `r + (y_u - r * x_u) / mean(x)`, whose variance is `ratio_var` below.
- CUPED: `theta = cov(metric, covariate) / var(covariate)` on the pooled sample (both variants
  together), the covariate centred on its pooled mean; the variance reduction is reported. Without
  pre-period data for the covariate (`covariate_observed`) the plain estimate is used.
- The relative lift CI is computed on the log scale (Welch on log ratio with the delta method,
  both variants' variance included); when a mean is zero or negative it falls back to the delta
  method for the ratio itself, and to "undefined" when the control mean is zero.
- SRM: Pearson chi-square against the planned split; alarm at p < 0.001.
- Multiple comparisons: statsmodels `multipletests` (Holm, Benjamini-Hochberg, ...) by name.
- Power / MDE with the normal approximation on the (CUPED-adjusted) variance.
- Always-valid inference: the mixture SPRT of Johari et al. (2017, 2022) with a normal mixing
  distribution of scale `tau`: an always-valid p-value and a confidence sequence for the effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
from statsmodels.stats.multitest import multipletests

SRM_ALARM_P = 0.001


@dataclass(frozen=True)
class SuffStats:
    """Sufficient statistics of one sample of users.

    `n`: users; `sums[c]`: sum over users of column c; `cross[(a, b)]` (a <= b): sum over users of
    a * b. Columns absent from a user (no activity) count as 0, so a user adds to `n` only.
    """

    n: int
    sums: Mapping[str, float]
    cross: Mapping[tuple[str, str], float]

    def mean(self, col: str) -> float:
        return self.sums[col] / self.n

    def cov(self, a: str, b: str) -> float:
        """Sample covariance (ddof = 1) of two columns; `cov(a, a)` is the variance."""
        key = (a, b) if a <= b else (b, a)
        return (self.cross[key] - self.sums[a] * self.sums[b] / self.n) / (self.n - 1)

    def __add__(self, other: SuffStats) -> SuffStats:
        """The statistics of both samples together (pooling is adding)."""
        return SuffStats(
            n=self.n + other.n,
            sums={c: self.sums[c] + other.sums[c] for c in self.sums},
            cross={k: self.cross[k] + other.cross[k] for k in self.cross},
        )


def suff_stats_from_arrays(columns: Mapping[str, np.ndarray]) -> SuffStats:
    """`SuffStats` of per-user arrays (for simulations and tests; the pipeline uses DuckDB)."""
    names = sorted(columns)
    values = {c: np.asarray(columns[c], dtype=float) for c in names}
    n = len(values[names[0]])
    return SuffStats(
        n=n,
        sums={c: float(values[c].sum()) for c in names},
        cross={(a, b): float(values[a] @ values[b]) for i, a in enumerate(names) for b in names[i:]},
    )


# --- metric value and variance (delta method, CUPED) -------------------------------------------


@dataclass(frozen=True)
class MetricColumns:
    """Which columns of `SuffStats` make a metric: numerator / denominator (None: a plain mean)
    and the covariate's numerator / denominator (None: no CUPED)."""

    numerator: str
    denominator: str | None = None
    covariate_numerator: str | None = None
    covariate_denominator: str | None = None

    @property
    def has_covariate(self) -> bool:
        return self.covariate_numerator is not None


def _mean(s: SuffStats, col: str | None) -> float:
    return 1.0 if col is None else s.mean(col)


def _cov(s: SuffStats, a: str | None, b: str | None) -> float:
    return 0.0 if a is None or b is None else s.cov(a, b)


def ratio_value(s: SuffStats, num: str, den: str | None) -> float:
    """sum(num) / sum(den), or the mean of `num` when `den` is None."""
    return _mean(s, num) / _mean(s, den)


def ratio_cov(s: SuffStats, a_num: str, a_den: str | None, b_num: str, b_den: str | None) -> float:
    """Per-user covariance of the linearised ratios a_num/a_den and b_num/b_den (delta method).

    The linearised value of user u for sum(y)/sum(x) is r + (y_u - r * x_u) / mean(x); with
    `a == b` this is the per-user variance of the ratio (divide by n for the estimate's variance).
    """
    ra, rb = ratio_value(s, a_num, a_den), ratio_value(s, b_num, b_den)
    return (
        _cov(s, a_num, b_num)
        - _cov(s, a_num, b_den) * rb
        - _cov(s, a_den, b_num) * ra
        + _cov(s, a_den, b_den) * ra * rb
    ) / (_mean(s, a_den) * _mean(s, b_den))


def cuped_theta(pooled: SuffStats, cols: MetricColumns) -> float:
    """CUPED coefficient cov(metric, covariate) / var(covariate) on the pooled sample (0 if var is 0)."""
    var_x = ratio_cov(pooled, cols.covariate_numerator, cols.covariate_denominator,
                      cols.covariate_numerator, cols.covariate_denominator)
    if var_x == 0:
        return 0.0
    return ratio_cov(pooled, cols.numerator, cols.denominator,
                     cols.covariate_numerator, cols.covariate_denominator) / var_x


@dataclass(frozen=True)
class Estimate:
    """A variant's metric: its value, per-user variance (of the linearised, CUPED-adjusted value)
    and the per-user variance without CUPED (equal to `var` when no covariate is used)."""

    value: float
    var: float
    var_unadjusted: float
    n: int


def estimate(s: SuffStats, cols: MetricColumns, theta: float, covariate_center: float) -> Estimate:
    """The metric of one variant; with a covariate, `value - theta * (covariate - center)`."""
    value = ratio_value(s, cols.numerator, cols.denominator)
    var = ratio_cov(s, cols.numerator, cols.denominator, cols.numerator, cols.denominator)
    if not cols.has_covariate:
        return Estimate(value=value, var=var, var_unadjusted=var, n=s.n)
    cn, cd = cols.covariate_numerator, cols.covariate_denominator
    covariate = ratio_value(s, cn, cd)
    var_x = ratio_cov(s, cn, cd, cn, cd)
    cov_yx = ratio_cov(s, cols.numerator, cols.denominator, cn, cd)
    return Estimate(
        value=value - theta * (covariate - covariate_center),
        var=var + theta * theta * var_x - 2 * theta * cov_yx,
        var_unadjusted=var,
        n=s.n,
    )


def covariate_observed(control: SuffStats, treatment: SuffStats, cols: MetricColumns) -> bool:
    """Whether the CUPED covariate has pre-period data to use: a ratio covariate needs a non-zero
    denominator in each variant (else it is undefined there); any covariate needs a non-zero value
    somewhere (all zeros, as with no pre-period at all, carry nothing to adjust with)."""
    if not cols.has_covariate:
        return False
    cn, cd = cols.covariate_numerator, cols.covariate_denominator
    if cd is not None:
        return control.sums[cd] != 0 and treatment.sums[cd] != 0
    return control.cross[(cn, cn)] + treatment.cross[(cn, cn)] != 0


def estimate_pair(control: SuffStats, treatment: SuffStats, cols: MetricColumns) -> tuple[Estimate, Estimate, float]:
    """Both variants' estimates with CUPED fitted on the pooled sample; returns (c, t, theta)."""
    if not cols.has_covariate:
        return estimate(control, cols, 0.0, 0.0), estimate(treatment, cols, 0.0, 0.0), 0.0
    pooled = control + treatment
    theta = cuped_theta(pooled, cols)
    center = ratio_value(pooled, cols.covariate_numerator, cols.covariate_denominator)
    return estimate(control, cols, theta, center), estimate(treatment, cols, theta, center), theta


# --- tests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WelchResult:
    """Welch's t-test of treatment - control: effect, its standard error, the t statistic, the
    Welch-Satterthwaite degrees of freedom, the two-sided p-value and the (1 - alpha) CI."""

    effect: float
    se: float
    statistic: float
    df: float
    pvalue: float
    ci_low: float
    ci_high: float


def _welch_se_df(var_c: float, n_c: int, var_t: float, n_t: int) -> tuple[float, float]:
    vc, vt = var_c / n_c, var_t / n_t
    se = math.sqrt(vc + vt)
    denominator = vc * vc / (n_c - 1) + vt * vt / (n_t - 1)
    df = (vc + vt) ** 2 / denominator if denominator > 0 else float(n_c + n_t - 2)
    return se, df


def welch(mean_c: float, var_c: float, n_c: int, mean_t: float, var_t: float, n_t: int, alpha: float) -> WelchResult:
    """Welch's two-sample t-test from means, per-user variances (ddof 1) and counts."""
    if n_c < 2 or n_t < 2:
        raise ValueError(f"Welch's test needs at least 2 users per variant, got {n_c} and {n_t}")
    effect = mean_t - mean_c
    se, df = _welch_se_df(var_c, n_c, var_t, n_t)
    if se == 0:
        stat = 0.0 if effect == 0 else math.copysign(math.inf, effect)
        pvalue = 1.0 if effect == 0 else 0.0
        return WelchResult(effect, 0.0, stat, df, pvalue, effect, effect)
    stat = effect / se
    half = float(scipy.stats.t.isf(alpha / 2, df)) * se
    return WelchResult(
        effect=effect, se=se, statistic=stat, df=df,
        pvalue=float(2 * scipy.stats.t.sf(abs(stat), df)),
        ci_low=effect - half, ci_high=effect + half,
    )


@dataclass(frozen=True)
class LiftResult:
    """Relative lift treatment / control - 1 with its (1 - alpha) CI.

    `method`: "log" (Welch on the log of the means ratio, delta method), "delta" (delta method on
    the ratio itself, used when a mean is <= 0), or "undefined" (the control mean is 0).
    """

    lift: float
    ci_low: float
    ci_high: float
    method: str


def relative_lift(mean_c: float, var_c: float, n_c: int, mean_t: float, var_t: float, n_t: int, alpha: float) -> LiftResult:
    """Relative lift with a CI that includes both variants' variance."""
    if mean_c == 0:
        return LiftResult(math.nan, math.nan, math.nan, "undefined")
    lift = mean_t / mean_c - 1
    if mean_c > 0 and mean_t > 0:
        se, df = _welch_se_df(var_c / mean_c**2, n_c, var_t / mean_t**2, n_t)
        factor = math.exp(float(scipy.stats.t.isf(alpha / 2, df)) * se)
        ratio = mean_t / mean_c
        return LiftResult(lift, ratio / factor - 1, ratio * factor - 1, "log")
    # var(T/C) ~ var_T / C^2 + T^2 var_C / C^4; the sign of C does not matter.
    se = math.sqrt(var_t / n_t / mean_c**2 + mean_t**2 * var_c / n_c / mean_c**4)
    half = float(scipy.stats.norm.isf(alpha / 2)) * se
    return LiftResult(lift, lift - half, lift + half, "delta")


@dataclass(frozen=True)
class NonInferiorityResult:
    """One-sided test that the treatment is not worse than control by more than `margin`
    (relative, e.g. 0.02 = 2% of the control mean), in the metric's good direction.

    `verdict`: "pass" (non-inferiority shown at alpha), "fail" (the CI lies wholly beyond the
    margin) or "inconclusive".
    """

    margin: float
    threshold: float
    statistic: float
    pvalue: float
    verdict: str


def non_inferiority(welch_result: WelchResult, mean_c: float, margin: float, higher_is_better: bool, alpha: float) -> NonInferiorityResult:
    """H0: effect <= -margin * |control| (higher is better; mirrored otherwise), Welch t, one-sided.

    The margin is scaled by the observed control mean, treated as fixed (the usual practice).
    """
    sign = 1.0 if higher_is_better else -1.0
    threshold = -sign * margin * abs(mean_c)
    se, df = welch_result.se, welch_result.df
    shifted = sign * (welch_result.effect - threshold)
    if se == 0:
        stat = math.copysign(math.inf, shifted) if shifted else 0.0
        pvalue = 0.0 if shifted > 0 else 1.0
    else:
        stat = shifted / se
        pvalue = float(scipy.stats.t.sf(stat, df))
    worst = welch_result.ci_high if higher_is_better else welch_result.ci_low
    if pvalue < alpha:
        verdict = "pass"
    elif sign * (worst - threshold) < 0:
        verdict = "fail"
    else:
        verdict = "inconclusive"
    return NonInferiorityResult(margin, threshold, stat, pvalue, verdict)


@dataclass(frozen=True)
class SrmResult:
    """Pearson chi-square sample-ratio-mismatch test; `alarm` when p < 0.001."""

    observed: Mapping[str, int]
    expected_share: Mapping[str, float]
    statistic: float
    df: int
    pvalue: float
    alarm: bool


def srm(observed: Mapping[str, int], expected_share: Mapping[str, float] | None = None) -> SrmResult:
    """Chi-square goodness of fit of user counts per variant to the planned split (equal by default)."""
    names = list(observed)
    if expected_share is None:
        expected_share = {name: 1 / len(names) for name in names}
    missing = sorted(set(names) - set(expected_share))
    if missing:
        raise ValueError(f"SRM: no planned share for variants {missing}; planned: {dict(expected_share)}")
    total_share = sum(expected_share[name] for name in names)
    counts = np.array([observed[name] for name in names], dtype=float)
    expected = counts.sum() * np.array([expected_share[name] / total_share for name in names])
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(names) - 1
    pvalue = float(scipy.stats.chi2.sf(stat, df)) if df > 0 else 1.0
    return SrmResult(
        observed=dict(observed),
        expected_share={name: expected_share[name] / total_share for name in names},
        statistic=stat, df=df, pvalue=pvalue, alarm=pvalue < SRM_ALARM_P,
    )


# --- multiple comparisons -----------------------------------------------------------------------

CorrectionFn = Callable[[Sequence[float], float], tuple[np.ndarray, np.ndarray]]
_CORRECTIONS: dict[str, CorrectionFn] = {}


def register_correction(name: str) -> Callable[[CorrectionFn], CorrectionFn]:
    def add(fn: CorrectionFn) -> CorrectionFn:
        _CORRECTIONS[name] = fn
        return fn

    return add


def _statsmodels(method: str) -> CorrectionFn:
    def correct(pvalues: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
        reject, adjusted, _, _ = multipletests(np.asarray(pvalues, dtype=float), alpha=alpha, method=method)
        return reject, adjusted

    return correct


register_correction("holm")(_statsmodels("holm"))
register_correction("bh")(_statsmodels("fdr_bh"))
register_correction("bonferroni")(_statsmodels("bonferroni"))


@register_correction("none")
def _no_correction(pvalues: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pvalues, dtype=float)
    return p < alpha, p


def correction_names() -> list[str]:
    return sorted(_CORRECTIONS)


def adjust_pvalues(pvalues: Sequence[float], method: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(reject, adjusted p-values) for one family of tests, by correction name."""
    try:
        fn = _CORRECTIONS[method]
    except KeyError:
        raise ValueError(f"unknown correction {method!r}; known: {correction_names()}") from None
    if len(pvalues) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    return fn(pvalues, alpha)


# --- power --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MdeResult:
    """Minimum detectable effect (absolute and relative to the control mean) at `power`."""

    effect: float
    relative: float
    power: float


def mde(var_c: float, n_c: int, var_t: float, n_t: int, mean_c: float, alpha: float, power: float) -> MdeResult:
    """Two-sided MDE (normal approximation): (z_{1-alpha/2} + z_power) * se.

    CUPED-aware when given the CUPED-adjusted per-user variances.
    """
    se = math.sqrt(var_c / n_c + var_t / n_t)
    effect = (scipy.stats.norm.isf(alpha / 2) + scipy.stats.norm.ppf(power)) * se
    return MdeResult(float(effect), float(effect / abs(mean_c)) if mean_c else math.nan, power)


def sample_size(var: float, mean_c: float, relative_effect: float, alpha: float, power: float, share_treatment: float = 0.5) -> int:
    """Users needed in total to detect `relative_effect` (normal approximation, per-user variance `var`)."""
    z = scipy.stats.norm.isf(alpha / 2) + scipy.stats.norm.ppf(power)
    effect = relative_effect * abs(mean_c)
    return math.ceil(z * z * var / (effect * effect) / (share_treatment * (1 - share_treatment)))


# --- always-valid inference ---------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialResult:
    """mSPRT with normal mixture N(0, tau^2): an always-valid p-value (valid at any stopping time,
    however often one looks) and the matching (1 - alpha) confidence sequence for the effect."""

    pvalue: float
    ci_low: float
    ci_high: float
    tau: float


def msprt(effect: float, se: float, tau: float, alpha: float) -> SequentialResult:
    """Mixture SPRT for a difference in means with estimate variance V = se^2 (Johari et al.).

    Likelihood ratio Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * effect^2 / (2 V (V + tau^2)));
    p = min(1, 1 / Lambda). The confidence sequence is {d : Lambda(effect - d) < 1 / alpha}.
    Using the current look only gives a value at least the running minimum over looks, so it
    stays valid (conservative) when earlier looks are not recorded.
    """
    v, t2 = se * se, tau * tau
    if v == 0:
        return SequentialResult(0.0 if effect else 1.0, effect, effect, tau)
    log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * effect * effect / (2 * v * (v + t2))
    pvalue = math.exp(-log_lambda) if log_lambda > 0 else 1.0
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
    return SequentialResult(min(1.0, pvalue), effect - half, effect + half, tau)
