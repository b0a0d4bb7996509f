"""An experiment (metrics + settings) and its analysis, for notebooks and for `relevance abtest`.

`Experiment(...).analyze(events, assignment)` reads the inputs through DuckDB (`abtest.aggregate`),
then compares every treatment variant with the control on each metric (`compare`, a function of
sufficient statistics only), corrects p-values across metrics x variants, checks the sample ratio
overall and per segment, tests guardrails for non-inferiority and adds the always-valid (mSPRT)
view, segments and the day-since-exposure view.

Families for multiple comparisons: the two-sided tests of all primary and secondary metrics x
treatment variants form one family; the non-inferiority tests of the guardrails another. Segment
and day-since-exposure rows are descriptive and are not corrected.

The verdict (`decide`, one per treatment variant, from the all-users rows only):
- inconclusive when the sample ratio alarms: no number can be trusted until the assignment is fixed;
- no ship when something is harmed: a primary or secondary metric significantly worse (in its good
  direction) after the correction, or a guardrail failing non-inferiority (its interval wholly beyond
  the margin);
- ship when a primary metric is significantly better after the correction, nothing is harmed and
  every guardrail is shown within its margin (non-inferiority passed after the correction): a
  guardrail that is merely not shown harmful has not been shown safe either;
- inconclusive otherwise, saying what is missing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from abtest import stats
from abtest.aggregate import (
    ALL,
    COV_DEN,
    COV_NUM,
    DAY,
    DEN,
    NUM,
    QUERY_SEGMENT,
    USER_TYPE,
    Exclusion,
    InputError,
    Prepared,
    SliceKey,
    Source,
    column,
    prepare,
)
from abtest.metrics import DEFAULT_METRICS, Metric, check_unique_names
from schemas.config import ConfigError

CORRECTION_LABELS = {"holm": "Holm", "bh": "Benjamini-Hochberg", "bonferroni": "Bonferroni", "none": "no correction"}
CUPED_OFF_NO_PRE_PERIOD = "CUPED off: no pre-period data"
SHIP, NO_SHIP, INCONCLUSIVE = "ship", "no ship", "inconclusive"


@dataclass(frozen=True)
class MetricResult:
    """One metric, one treatment variant against the control, in one slice of users.

    Means are the (CUPED-adjusted, when `cuped`) metric values; `effect` = treatment - control with
    its Welch CI; `rel_*` the relative lift with its log-scale CI; `variance_reduction` the share
    of the effect's variance removed by CUPED; `pvalue_adjusted`/`significant` after the
    correction (None outside the corrected families); `mde*` the effect detectable with `power` at
    the current sample; `seq_*` the always-valid mSPRT p-value and confidence sequence;
    `ni_*` the guardrail's non-inferiority test. `note` says why a metric has no estimate (all
    numbers NaN) or, beside an estimate, that CUPED was turned off for lack of pre-period data.
    `higher_is_better` is the metric's good direction (what a harm is).
    """

    metric: str
    tier: str
    variant: str
    control_variant: str
    slice_kind: str
    slice_value: str
    n_control: int
    n_treatment: int
    control: float
    treatment: float
    effect: float
    effect_ci_low: float
    effect_ci_high: float
    se: float
    statistic: float
    df: float
    pvalue: float
    rel_effect: float
    rel_ci_low: float
    rel_ci_high: float
    rel_method: str
    cuped: bool
    theta: float
    variance_reduction: float
    mde: float
    mde_relative: float
    seq_pvalue: float
    seq_ci_low: float
    seq_ci_high: float
    pvalue_adjusted: float | None = None
    significant: bool | None = None
    ni_margin: float | None = None
    ni_pvalue: float | None = None
    ni_pvalue_adjusted: float | None = None
    ni_verdict: str | None = None
    note: str = ""
    higher_is_better: bool = True

    @property
    def harmed(self) -> bool:
        """Significantly worse after the correction, or for a guardrail beyond its margin."""
        if self.tier == "guardrail":
            return self.ni_verdict == "fail"
        worse = self.effect < 0 if self.higher_is_better else self.effect > 0
        return bool(self.significant) and worse

    @property
    def won(self) -> bool:
        """A primary metric significantly better after the correction."""
        better = self.effect > 0 if self.higher_is_better else self.effect < 0
        return self.tier == "primary" and bool(self.significant) and better


@dataclass(frozen=True)
class Decision:
    """The verdict for one treatment variant against the control (the rule: module docstring):
    `verdict` SHIP, NO_SHIP or INCONCLUSIVE, `reasons` in words, and the names of the metrics
    harmed (significantly worse, or a guardrail beyond its margin) and won (primary, significantly
    better)."""

    variant: str
    verdict: str
    reasons: tuple[str, ...]
    harmed: tuple[str, ...]
    won: tuple[str, ...]


def decide(rows: Sequence[MetricResult], variant: str, srm_alarm: bool, correction: str) -> Decision:
    """The verdict for `variant` from the all-users rows of the main table (see the module docstring)."""
    mine = [r for r in rows if r.variant == variant]
    harmed = tuple(r.metric for r in mine if r.harmed)
    won = tuple(r.metric for r in mine if r.won)
    label = CORRECTION_LABELS.get(correction, correction)
    if srm_alarm:
        reason = "the split of users does not match the plan (SRM alarm): no result can be trusted until the assignment is fixed"
        return Decision(variant, INCONCLUSIVE, (reason,), harmed, won)
    if harmed:
        reasons = tuple(
            f"guardrail {r.metric} beyond its -{r.ni_margin:.1%} margin" if r.tier == "guardrail"
            else f"{r.metric} significantly worse after {label}"
            for r in mine if r.harmed
        )
        return Decision(variant, NO_SHIP, reasons, harmed, won)
    unproven = [
        f"guardrail {r.metric}: {r.note}" if math.isnan(r.effect)
        else f"guardrail {r.metric} not shown within its -{r.ni_margin:.1%} margin"
        for r in mine if r.tier == "guardrail" and r.ni_verdict != "pass"
    ]
    if won and not unproven:
        reason = f"{', '.join(won)} significantly better after {label}; no metric harmed; every guardrail within its margin"
        return Decision(variant, SHIP, (reason,), harmed, won)
    wins = f"{', '.join(won)} significantly better after {label}" if won else f"no primary metric significantly better after {label}"
    return Decision(variant, INCONCLUSIVE, (wins, *unproven), harmed, won)


@dataclass(frozen=True)
class SegmentSrm:
    """The SRM test within one segment of users (`kind` user_type or query_segment)."""

    kind: str
    value: str
    result: stats.SrmResult


@dataclass(frozen=True)
class ExperimentResult:
    """Everything the analysis found; `to_pandas()` for a table, `to_dict()` for JSON."""

    experiment_id: str
    control: str
    variants: tuple[str, ...]
    alpha: float
    correction: str
    metrics: tuple[MetricResult, ...]
    srm: stats.SrmResult
    srm_segments: tuple[SegmentSrm, ...]
    segments: tuple[MetricResult, ...]
    days: tuple[MetricResult, ...]
    exclusions: tuple[Exclusion, ...]
    reconciliation: Mapping[str, int]
    caps: Mapping[str, float]
    first_day: dt.date | None
    last_day: dt.date | None
    quarantine: pa.Table = field(repr=False, compare=False)

    def to_pandas(self, view: str = "metrics") -> pd.DataFrame:
        """One row per result: `view` is "metrics" (the main table), "segments" or "days"."""
        rows = {"metrics": self.metrics, "segments": self.segments, "days": self.days}
        if view not in rows:
            raise ValueError(f"view must be one of {sorted(rows)}, got {view!r}")
        names = [f.name for f in dataclasses.fields(MetricResult)]
        return pd.DataFrame([dataclasses.asdict(r) for r in rows[view]], columns=names)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities become None) with the verdicts (`decisions`);
        quarantined rows are left out."""
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "quarantine"}
        return {**fields, "decisions": _plain(self.decisions())}

    def sentences(self) -> list[str]:
        """Plain-language lines, one per metric and variant, in tier order."""
        return [sentence(r, self.correction, len(self.variants) > 2) for r in self.metrics]

    def decisions(self) -> list[Decision]:
        """The verdict for each treatment variant (the rule: module docstring)."""
        return [decide(self.metrics, v, self.srm.alarm, self.correction) for v in self.variants if v != self.control]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:+.1f}%"


def format_p(x: float | None) -> str:
    """A p-value for people: 3 significant digits, scientific below 1e-4."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}" if x >= 1e-4 else f"{x:.1e}"


def sentence(r: MetricResult, correction: str, name_variant: bool = False) -> str:
    """E.g. 'ctr +1.3% [+0.4%, +2.2%], p=0.004, significant after Holm' (and the note, if any, in
    brackets: 'ctr ..., significant after Holm (CUPED off: no pre-period data)')."""
    if math.isnan(r.effect):
        return f"{r.metric}: {r.note}"
    head = f"{r.metric}{f' ({r.variant})' if name_variant else ''} {_pct(r.rel_effect)} [{_pct(r.rel_ci_low)}, {_pct(r.rel_ci_high)}], p={format_p(r.pvalue)}"
    note = f" ({r.note})" if r.note else ""
    if r.ni_verdict is not None:
        words = {"pass": "within", "fail": "beyond", "inconclusive": "not shown within"}[r.ni_verdict]
        return f"{head}; guardrail {r.ni_verdict}: {words} the -{r.ni_margin:.1%} non-inferiority margin{note}"
    label = CORRECTION_LABELS.get(correction, correction)
    if r.significant:
        return f"{head}, significant after {label}{note}"
    return f"{head}, not significant after {label}{note}"


def metric_columns(metric: Metric, cuped: bool = True) -> stats.MetricColumns:
    """Where a metric's parts live in `SuffStats` (see `abtest.aggregate.column`)."""
    has_cov = cuped and metric.covariate_parts is not None
    return stats.MetricColumns(
        numerator=column(metric.name, NUM),
        denominator=column(metric.name, DEN) if metric.denominator is not None else None,
        covariate_numerator=column(metric.name, COV_NUM) if has_cov else None,
        covariate_denominator=column(metric.name, COV_DEN) if has_cov and metric.denominator is not None else None,
    )


def compare(
    control: stats.SuffStats,
    treatment: stats.SuffStats,
    metric: Metric,
    *,
    variant: str,
    control_variant: str,
    alpha: float,
    power: float,
    sequential_tau: float,
    slice_kind: str = ALL,
    slice_value: str = ALL,
    cuped: bool = True,
) -> MetricResult:
    """One metric, treatment vs control, from sufficient statistics only; without pre-period data
    for its covariate the metric is estimated without CUPED and says so in `note`."""
    cols = metric_columns(metric, cuped)
    note = ""
    if cols.has_covariate and not stats.covariate_observed(control, treatment, cols):
        cols, note = metric_columns(metric, cuped=False), CUPED_OFF_NO_PRE_PERIOD
    base = dict(metric=metric.name, tier=metric.tier, variant=variant, control_variant=control_variant,
                slice_kind=slice_kind, slice_value=slice_value, n_control=control.n, n_treatment=treatment.n,
                higher_is_better=metric.higher_is_better)
    try:
        est_c, est_t, theta = stats.estimate_pair(control, treatment, cols)
    except ZeroDivisionError:
        return _empty(base, cols.has_covariate, "no data: a denominator sums to zero in a variant")
    if not all(math.isfinite(v) for v in (est_c.value, est_t.value, est_c.var, est_t.var)):
        return _empty(base, cols.has_covariate, "no data: the metric is undefined in a variant")
    welch = stats.welch(est_c.value, est_c.var, est_c.n, est_t.value, est_t.var, est_t.n, alpha)
    lift = stats.relative_lift(est_c.value, est_c.var, est_c.n, est_t.value, est_t.var, est_t.n, alpha)
    unadjusted = est_c.var_unadjusted / est_c.n + est_t.var_unadjusted / est_t.n
    reduction = 1 - welch.se**2 / unadjusted if unadjusted > 0 else 0.0
    detectable = stats.mde(est_c.var, est_c.n, est_t.var, est_t.n, est_c.value, alpha, power)
    tau = sequential_tau * abs(est_c.value) if est_c.value else welch.se
    seq = stats.msprt(welch.effect, welch.se, tau, alpha)
    ni: dict[str, Any] = {}
    if metric.tier == "guardrail":
        test = stats.non_inferiority(welch, est_c.value, metric.margin, metric.higher_is_better, alpha)
        ni = dict(ni_margin=metric.margin, ni_pvalue=test.pvalue, ni_verdict=test.verdict)
    return MetricResult(
        **base, control=est_c.value, treatment=est_t.value, effect=welch.effect,
        effect_ci_low=welch.ci_low, effect_ci_high=welch.ci_high, se=welch.se, statistic=welch.statistic,
        df=welch.df, pvalue=welch.pvalue, rel_effect=lift.lift, rel_ci_low=lift.ci_low, rel_ci_high=lift.ci_high,
        rel_method=lift.method, cuped=cols.has_covariate, theta=theta, variance_reduction=reduction,
        mde=detectable.effect, mde_relative=detectable.relative, seq_pvalue=seq.pvalue,
        seq_ci_low=seq.ci_low, seq_ci_high=seq.ci_high, note=note, **ni,
    )


def _empty(base: dict[str, Any], cuped: bool, note: str) -> MetricResult:
    nan = math.nan
    return MetricResult(
        **base, control=nan, treatment=nan, effect=nan, effect_ci_low=nan, effect_ci_high=nan, se=nan,
        statistic=nan, df=nan, pvalue=nan, rel_effect=nan, rel_ci_low=nan, rel_ci_high=nan,
        rel_method="undefined", cuped=cuped, theta=nan, variance_reduction=nan, mde=nan, mde_relative=nan,
        seq_pvalue=nan, seq_ci_low=nan, seq_ci_high=nan, note=note,
    )


def apply_corrections(results: Sequence[MetricResult], method: str, alpha: float) -> tuple[MetricResult, ...]:
    """Adjust the family of two-sided tests (primary + secondary) and the family of guardrail
    non-inferiority tests, each with `method`; rows without data stay unadjusted."""
    out = list(results)
    effect_rows = [i for i, r in enumerate(out) if r.tier != "guardrail" and math.isfinite(r.pvalue)]
    reject, adjusted = stats.adjust_pvalues([out[i].pvalue for i in effect_rows], method, alpha)
    for i, rej, adj in zip(effect_rows, reject, adjusted):
        out[i] = dataclasses.replace(out[i], pvalue_adjusted=float(adj), significant=bool(rej))
    guard_rows = [i for i, r in enumerate(out) if r.ni_pvalue is not None]
    reject, adjusted = stats.adjust_pvalues([out[i].ni_pvalue for i in guard_rows], method, alpha)
    for i, rej, adj in zip(guard_rows, reject, adjusted):
        verdict = "pass" if rej else ("fail" if out[i].ni_verdict == "fail" else "inconclusive")
        out[i] = dataclasses.replace(out[i], ni_pvalue_adjusted=float(adj), ni_verdict=verdict)
    return tuple(out)


@dataclass(frozen=True)
class Experiment:
    """An A/B experiment's analysis plan.

    `metrics`: `Mean` / `RatioOfMeans` objects (default: the built-in six). `experiment_start`:
    the first day of the experiment; events before it are the pre-period (CUPED covariates).
    `control`: the control variant's name; every other variant is compared with it.
    `correction`: "holm", "bh", "bonferroni" or "none". `winsorize`: upper quantile at which
    per-user values are capped (None: no capping). `expected_split`: planned share per variant for
    the SRM test (None: equal). `sequential_tau`: mSPRT mixing scale relative to the control mean.
    """

    experiment_start: dt.date
    metrics: tuple[Metric, ...] = DEFAULT_METRICS
    control: str = "control"
    alpha: float = 0.05
    correction: str = "holm"
    power: float = 0.8
    winsorize: float | None = None
    expected_split: Mapping[str, float] | None = None
    sequential_tau: float = 0.05
    experiment_id: str | None = None
    segments: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.experiment_start, str):
            try:
                object.__setattr__(self, "experiment_start", dt.date.fromisoformat(self.experiment_start))
            except ValueError:
                raise ConfigError(f"experiment_start {self.experiment_start!r} must be a date YYYY-MM-DD") from None
        object.__setattr__(self, "metrics", tuple(self.metrics))
        check_unique_names(self.metrics)
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"alpha {self.alpha} must be in (0, 0.5), e.g. 0.05")
        if not 0 < self.power < 1:
            raise ConfigError(f"power {self.power} must be in (0, 1), e.g. 0.8")
        if self.correction not in stats.correction_names():
            raise ConfigError(f"correction {self.correction!r} unknown; use one of {stats.correction_names()}")
        if self.winsorize is not None and not 0.5 < self.winsorize < 1:
            raise ConfigError(f"winsorize {self.winsorize} must be a quantile in (0.5, 1), e.g. 0.999, or None")
        if self.sequential_tau <= 0:
            raise ConfigError(f"sequential_tau {self.sequential_tau} must be > 0, e.g. 0.05")

    def analyze(self, events: Source, assignment: Source, threads: int | None = None) -> ExperimentResult:
        """Analyse `events` and `assignment` (paths, Arrow/pandas tables or DuckDB relations)."""
        prepared = prepare(events, assignment, self.metrics, self.experiment_start,
                           self.experiment_id, self.winsorize, threads)
        return self.analyze_prepared(prepared)

    def analyze_prepared(self, prepared: Prepared) -> ExperimentResult:
        """The statistics on already aggregated inputs (sufficient statistics only)."""
        variants = prepared.variants
        if self.control not in variants:
            raise InputError(f"control variant {self.control!r} has no users; variants present: {list(variants)}")
        planned = list(self.expected_split or {})
        missing = [v for v in planned if v not in variants]
        if missing:
            raise InputError(f"variants {missing} are planned in expected_split but have no users; present: {list(variants)}")
        for v in variants:
            n = prepared.stats[SliceKey(ALL, ALL, v)].n
            if n < 2:
                raise InputError(f"variant {v!r} has {n} user(s) after exclusions; each variant needs at least 2")
        treatments = [v for v in variants if v != self.control]
        if not treatments:
            raise InputError(f"only the control variant {self.control!r} has users; nothing to compare")

        def rows(kind: str, value: str, cuped: bool = True) -> list[MetricResult]:
            control = prepared.stats.get(SliceKey(kind, value, self.control))
            out = []
            for metric in self.metrics:
                for v in treatments:
                    treatment = prepared.stats.get(SliceKey(kind, value, v))
                    if control is None or treatment is None or control.n < 2 or treatment.n < 2:
                        continue
                    out.append(compare(control, treatment, metric, variant=v, control_variant=self.control,
                                       alpha=self.alpha, power=self.power, sequential_tau=self.sequential_tau,
                                       slice_kind=kind, slice_value=value, cuped=cuped))
            return out

        order = {"primary": 0, "secondary": 1, "guardrail": 2}
        main = sorted(apply_corrections(rows(ALL, ALL), self.correction, self.alpha), key=lambda r: order[r.tier])
        slice_values = sorted({(k.kind, k.value) for k in prepared.stats})
        segments = [r for kind, value in slice_values if kind in (USER_TYPE, QUERY_SEGMENT) and self.segments
                    for r in rows(kind, value)]
        days = sorted((r for kind, value in slice_values if kind == DAY for r in rows(kind, value, cuped=False)),
                      key=lambda r: (r.metric, r.variant, int(r.slice_value)))
        expected = dict(self.expected_split) if self.expected_split else None
        overall = stats.srm({v: prepared.stats[SliceKey(ALL, ALL, v)].n for v in variants}, expected)
        srm_segments = []
        for kind, value in slice_values:
            if kind not in (USER_TYPE, QUERY_SEGMENT):
                continue
            keys = [SliceKey(kind, value, v) for v in variants]
            counts = {k.variant: (prepared.stats[k].n if kind == USER_TYPE else prepared.active_users[k])
                      if k in prepared.stats else 0 for k in keys}
            if sum(counts.values()) > 0:
                srm_segments.append(SegmentSrm(kind, value, stats.srm(counts, expected)))
        return ExperimentResult(
            experiment_id=prepared.experiment_id, control=self.control, variants=variants, alpha=self.alpha,
            correction=self.correction, metrics=main, srm=overall, srm_segments=tuple(srm_segments),
            segments=tuple(segments), days=tuple(days), exclusions=prepared.exclusions,
            reconciliation=prepared.reconciliation, caps=prepared.caps,
            first_day=prepared.first_day, last_day=prepared.last_day, quarantine=prepared.quarantine,
        )
