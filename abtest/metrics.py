"""Metric definitions: what to measure per user, how to compare, how much it matters.

A metric is a `Mean` of a per-user value or a `RatioOfMeans` of two per-user values (the
randomisation unit is the user; a ratio whose unit is the request, like CTR, goes through the delta
method). A per-user value is an aggregate of the user's rows of `experiment_events`:

- `"clicks"` or `"sum(clicks)"`: the sum of a numeric column (impressions, clicks, add_to_carts,
  orders, gmv);
- `"requests"` or `"count()"`: the number of requests;
- `"count_positive(clicks)"`: the number of requests with clicks > 0;
- `"any_positive(orders)"`: 1 if the user has a request with orders > 0, else 0.

`filter` restricts the events a metric sees (`{"query_segment": ["head"]}`), in the experiment
period and in the pre-period alike. `covariate` names the pre-period values used for CUPED
(events with ds < experiment start); `covariate=True` means "the same values, pre-period".

Built-in metrics (`DEFAULT_METRICS`):
- CTR = clicks / impressions, CVR = orders / clicks (ratios of means, delta method);
- UCVR = share of users with an order (buying users / users);
- orders per user, GMV per user (means);
- query good rate = requests with at least one click / requests (a ratio of means: the share of
  a user's searches that found something worth clicking, pooled over users).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from schemas.config import ConfigError
from schemas.sql import literal
from schemas.tables import EXPERIMENT_EVENTS

TIERS: tuple[str, ...] = ("primary", "secondary", "guardrail")
NUMERIC_COLUMNS: tuple[str, ...] = ("impressions", "clicks", "add_to_carts", "orders", "gmv")
FILTER_COLUMNS: tuple[str, ...] = ("query_segment",)
AGGREGATES: tuple[str, ...] = ("sum", "count", "count_positive", "any_positive")
_CALL = re.compile(r"^\s*(\w+)\s*\(\s*(\w*)\s*\)\s*$")


@dataclass(frozen=True)
class UserValue:
    """A per-user aggregate of events: `kind` in AGGREGATES, `column` (None for `count`)."""

    kind: str
    column: str | None

    @classmethod
    def parse(cls, text: str) -> UserValue:
        text = text.strip()
        if text in ("requests", "count()"):
            return cls("count", None)
        if text in NUMERIC_COLUMNS:
            return cls("sum", text)
        match = _CALL.match(text)
        if match and match.group(1) in AGGREGATES and match.group(1) != "count" and match.group(2) in NUMERIC_COLUMNS:
            return cls(match.group(1), match.group(2))
        raise ConfigError(
            f"per-user value {text!r} is not understood; use a column {list(NUMERIC_COLUMNS)}, 'requests', "
            f"or one of sum(col), count(), count_positive(col), any_positive(col)"
        )

    def sql(self, condition: str) -> str:
        """The DuckDB aggregate over one user's events where `condition` holds (0 when none do)."""
        if self.kind == "count":
            return f"sum(CAST({condition} AS INTEGER))"
        if self.kind == "sum":
            return f"sum(CASE WHEN {condition} THEN {self.column} ELSE 0 END)"
        if self.kind == "count_positive":
            return f"sum(CAST({condition} AND {self.column} > 0 AS INTEGER))"
        return f"max(CAST({condition} AND {self.column} > 0 AS INTEGER))"

    def __str__(self) -> str:
        return "count()" if self.kind == "count" else f"{self.kind}({self.column})"


def _check_filter(filter: Mapping[str, Any] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not filter:
        return ()
    items = []
    for column, values in sorted(filter.items()):
        if column not in FILTER_COLUMNS:
            raise ConfigError(f"filter on {column!r} is not supported; filter on {list(FILTER_COLUMNS)}")
        values = (values,) if isinstance(values, str) else tuple(values)
        allowed = EXPERIMENT_EVENTS.column(column).allowed
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise ConfigError(f"filter {column}: values {bad or values} not allowed; allowed: {allowed}")
        items.append((column, tuple(str(v) for v in values)))
    return tuple(items)


@dataclass(frozen=True)
class _MetricBase:
    name: str
    tier: str
    filter: tuple[tuple[str, tuple[str, ...]], ...]
    higher_is_better: bool
    margin: float | None

    def _validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ConfigError(f"metric name {self.name!r} must be an identifier (letters, digits, _)")
        if self.tier not in TIERS:
            raise ConfigError(f"metric {self.name}: tier {self.tier!r} must be one of {list(TIERS)}")
        if self.tier == "guardrail" and (self.margin is None or not 0 < self.margin < 1):
            raise ConfigError(
                f"metric {self.name}: a guardrail needs a non-inferiority margin in (0, 1), e.g. margin: 0.02"
            )

    def filter_sql(self) -> str:
        """SQL condition on events for this metric's filter ('TRUE' without one)."""
        parts = [
            f"{column} IN ({', '.join(literal(v) for v in values)})" for column, values in self.filter
        ]
        return " AND ".join(parts) if parts else "TRUE"


@dataclass(frozen=True, init=False)
class Mean(_MetricBase):
    """The mean over users of a per-user value (e.g. orders per user)."""

    value: UserValue
    covariate: UserValue | None

    def __init__(
        self,
        value: str,
        covariate: str | bool | None = None,
        *,
        name: str | None = None,
        tier: str = "secondary",
        filter: Mapping[str, Any] | None = None,
        higher_is_better: bool = True,
        margin: float | None = None,
    ) -> None:
        parsed = UserValue.parse(value)
        cov = parsed if covariate is True else UserValue.parse(covariate) if isinstance(covariate, str) else None
        object.__setattr__(self, "value", parsed)
        object.__setattr__(self, "covariate", cov)
        object.__setattr__(self, "name", name or _default_name(str(parsed)))
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "filter", _check_filter(filter))
        object.__setattr__(self, "higher_is_better", higher_is_better)
        object.__setattr__(self, "margin", margin)
        self._validate()

    @property
    def numerator(self) -> UserValue:
        return self.value

    @property
    def denominator(self) -> None:
        return None

    @property
    def covariate_parts(self) -> tuple[UserValue, None] | None:
        return None if self.covariate is None else (self.covariate, None)


@dataclass(frozen=True, init=False)
class RatioOfMeans(_MetricBase):
    """sum over users of a numerator / sum of a denominator (e.g. CTR = clicks / impressions)."""

    numerator: UserValue
    denominator: UserValue
    covariate: tuple[UserValue, UserValue] | None

    def __init__(
        self,
        numerator: str,
        denominator: str,
        covariate: tuple[str, str] | list[str] | bool | None = None,
        *,
        name: str | None = None,
        tier: str = "secondary",
        filter: Mapping[str, Any] | None = None,
        higher_is_better: bool = True,
        margin: float | None = None,
    ) -> None:
        num, den = UserValue.parse(numerator), UserValue.parse(denominator)
        if covariate is True:
            cov = (num, den)
        elif covariate:
            if isinstance(covariate, str) or len(covariate) != 2:
                raise ConfigError(f"ratio covariate must be [numerator, denominator] or true, got {covariate!r}")
            cov = (UserValue.parse(covariate[0]), UserValue.parse(covariate[1]))
        else:
            cov = None
        object.__setattr__(self, "numerator", num)
        object.__setattr__(self, "denominator", den)
        object.__setattr__(self, "covariate", cov)
        object.__setattr__(self, "name", name or _default_name(f"{num}_per_{den}"))
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "filter", _check_filter(filter))
        object.__setattr__(self, "higher_is_better", higher_is_better)
        object.__setattr__(self, "margin", margin)
        self._validate()

    @property
    def covariate_parts(self) -> tuple[UserValue, UserValue] | None:
        return self.covariate


Metric = Mean | RatioOfMeans


def _default_name(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")


DEFAULT_METRICS: tuple[Metric, ...] = (
    RatioOfMeans("clicks", "impressions", covariate=True, name="ctr", tier="primary"),
    RatioOfMeans("count_positive(clicks)", "requests", covariate=True, name="query_good_rate", tier="primary"),
    RatioOfMeans("orders", "clicks", covariate=True, name="cvr", tier="secondary"),
    Mean("any_positive(orders)", covariate=True, name="ucvr", tier="secondary"),
    Mean("orders", covariate=True, name="orders_per_user", tier="secondary"),
    Mean("gmv", covariate=True, name="gmv_per_user", tier="guardrail", margin=0.02),
)

_YAML_KEYS = {"name", "type", "value", "numerator", "denominator", "covariate", "tier", "filter",
              "higher_is_better", "margin"}


def metric_from_dict(entry: Mapping[str, Any], where: str = "metric") -> Metric:
    """One metric from its YAML mapping (`type: mean` with `value`, or `type: ratio` with
    `numerator` and `denominator`)."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
    unknown = sorted(set(entry) - _YAML_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(_YAML_KEYS)}")
    kind = entry.get("type")
    common = {k: entry[k] for k in ("name", "tier", "filter", "higher_is_better", "margin") if k in entry}
    try:
        if kind == "mean":
            return Mean(entry["value"], entry.get("covariate"), **common)
        if kind == "ratio":
            cov = entry.get("covariate")
            return RatioOfMeans(entry["numerator"], entry["denominator"], tuple(cov) if isinstance(cov, list) else cov, **common)
    except KeyError as missing:
        raise ConfigError(f"{where}: missing key {missing} for type {kind!r}") from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    raise ConfigError(f"{where}: type must be 'mean' or 'ratio', got {kind!r}")


def load_metrics(path: str | Path) -> tuple[Metric, ...]:
    """Metrics from a YAML file: `metrics: [...]`, and `include_defaults: true` to keep the built-ins."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"metrics file {path} does not exist")
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict) or set(document) - {"metrics", "include_defaults"}:
        raise ConfigError(f"{path}: the top level must be a mapping with keys 'metrics' and optional 'include_defaults'")
    entries = document.get("metrics") or []
    metrics = tuple(metric_from_dict(e, f"{path}: metrics[{i}]") for i, e in enumerate(entries))
    if document.get("include_defaults", False):
        metrics = DEFAULT_METRICS + metrics
    check_unique_names(metrics)
    return metrics


def check_unique_names(metrics: tuple[Metric, ...]) -> None:
    names = [m.name for m in metrics]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"metric names must be unique; repeated: {duplicated}")
    if not metrics:
        raise ConfigError("an experiment needs at least one metric")
