"""The synthetic world's config (`WorldConfig`) and its size presets.

Presets are registered by name (`tests`, `demo`, `benchmark`): each is a set of overrides of the
defaults (the defaults are the demo world). `WorldConfig.preset(name, **overrides)` builds one;
overrides may be nested for the experiment block (`experiment={"aa": True}`). Values arriving from
YAML or the command line are normalised (lists -> tuples, a YAML date -> ISO text, ints -> floats
where a float is declared) and then validated with messages that say how to fix them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from dataclasses import dataclass
from typing import Any

from jobs.world.vocabulary import DEFAULT, VocabularyError, resolve_vocabulary
from schemas.config import ConfigError, help_field
from schemas.graph import DEFAULT_GRAPH

LABEL_SETS = ("wands", "esci")
VARIANTS = ("control", "treatment")


def _normalise(config: Any) -> None:
    """Coerce YAML-shaped values to the declared field types, in place (frozen-safe)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, annotation = getattr(config, field.name), hints[field.name]
        if typing.get_origin(annotation) is tuple and isinstance(value, list):
            value = tuple(value)
        if typing.get_origin(annotation) is tuple and isinstance(value, tuple):
            item = typing.get_args(annotation)[0]
            if item is float:
                value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, dt.date):
            value = value.isoformat()
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            value = _with_overrides(annotation(), value, field.name)
        object.__setattr__(config, field.name, value)
    for field in dataclasses.fields(config):
        value, annotation = getattr(config, field.name), hints[field.name]
        expected = typing.get_origin(annotation) or annotation
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{field.name}: expected {getattr(expected, '__name__', expected)}, got {value!r}")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def _rate(value: float, name: str) -> None:
    _check(0.0 <= value <= 1.0, name, f"must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The A/B test logged in the world: a better ranker (treatment) against the current one."""

    experiment_id: str = help_field("Experiment id; users are hashed on experiment_id:user_id.", "ranker_v2")
    pre_period_days: int = help_field(
        "First log days before the experiment starts (both arms see the control ranker; CUPED covariates).", 14
    )
    treatment_share: float = help_field("Share of users hashed into treatment.", 0.5)
    control_noise: float = help_field("Std of the Gaussian noise the control ranker adds to the true gain.", 0.5)
    treatment_noise: float = help_field(
        "Std of the treatment ranker's noise (smaller: it ranks by true relevance better).", 0.2
    )
    aa: bool = help_field("A/A test: treatment uses the control ranker, so there is no effect.", False)
    srm: bool = help_field(
        "Inject a sample-ratio mismatch: the experiment-period logs of some treatment users are lost.", False
    )
    srm_drop_share: float = help_field("With srm: share of treatment users whose experiment logs are lost.", 0.1)

    def __post_init__(self) -> None:
        _normalise(self)
        _check(bool(self.experiment_id.strip()), "experiment.experiment_id", "must not be empty")
        _check(self.pre_period_days >= 1, "experiment.pre_period_days", "must be >= 1 (CUPED needs a pre-period)")
        _check(0.0 < self.treatment_share < 1.0, "experiment.treatment_share",
               f"must be in (0, 1), got {self.treatment_share}")
        _check(self.control_noise >= 0, "experiment.control_noise", "must be >= 0")
        _check(self.treatment_noise >= 0, "experiment.treatment_noise", "must be >= 0")
        _check(0.0 < self.srm_drop_share < 1.0, "experiment.srm_drop_share",
               f"must be in (0, 1), got {self.srm_drop_share}")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes a synthetic world; the same config and seed give identical tables."""

    seed: int = help_field("Random seed: the same seed gives byte-identical tables.", 0)
    vocabulary: str = help_field(
        "'default' (the bundled jobs/world/vocabulary.yaml) or a path to a vocabulary YAML file.", DEFAULT
    )
    label_set: str = help_field("Label set of the judgments and gold labels: wands or esci.", "wands")
    graph: str = help_field("Reasoning graph whose nodes get gold values (name or YAML path).", DEFAULT_GRAPH)
    # sizes
    n_products: int = help_field("Products in the catalog.", 20_000)
    n_queries: int = help_field("Distinct queries.", 2_000)
    n_users: int = help_field("Users in the search logs.", 20_000)
    n_impressions: int = help_field(
        "Target number of logged impressions (requests x results_per_request, before any SRM loss).", 500_000
    )
    results_per_request: int = help_field("Products shown per search request (page size).", 10)
    candidates_per_query: int = help_field("Size of each query's candidate pool (what rankers order).", 40)
    judgments_per_query: int = help_field("Pairs judged per query (a random subset of its pool).", 20)
    # candidate pool mix (random products fill the rest)
    pool_exact_share: float = help_field("Pool share drawn from same-type products that satisfy every constraint.", 0.4)
    pool_same_type_share: float = help_field("Pool share drawn from the other same-type products.", 0.25)
    pool_related_share: float = help_field("Pool share drawn from related (sibling/accessory) types.", 0.2)
    # queries
    constraint_probs: tuple[float, ...] = help_field(
        "P(a query constrains 0, 1, 2, ... attributes); sums to 1.", (0.25, 0.35, 0.28, 0.12)
    )
    brand_query_rate: float = help_field("Share of queries that name a brand.", 0.15)
    synonym_rate: float = help_field("P(a type or value is written as a synonym) in titles and queries.", 0.3)
    misspelling_rate: float = help_field("P(a query writes its type with a listed misspelling).", 0.08)
    typo_rate: float = help_field("P(a query gets a random typo: two letters swapped).", 0.03)
    query_noise_rate: float = help_field("P(a query carries a noise word such as 'cheap').", 0.08)
    zipf_exponent: float = help_field("Zipf exponent of query frequency by popularity rank.", 1.05)
    segment_thresholds: tuple[float, float] = help_field(
        "Cumulative traffic shares ending the head and the torso segments (the rest is tail).", (0.5, 0.85)
    )
    # catalog
    attribute_value_skew: float = help_field(
        "P(the i-th listed value of an attribute) is proportional to i ** -skew (0: uniform).", 1.0
    )
    attribute_missing_rate: float = help_field("P(a product's attribute is missing from its data).", 0.05)
    unbranded_rate: float = help_field("Share of products without a brand.", 0.03)
    description_missing_rate: float = help_field("Share of products without a description.", 0.05)
    # users and logs
    start_date: str = help_field("First log day (YYYY-MM-DD).", "2024-03-01")
    n_days: int = help_field("Log days in all (pre-period + experiment period).", 28)
    user_activity_sigma: float = help_field("Lognormal sigma of user activity (heavy tail of searches per user).", 1.2)
    user_propensity_sigma: float = help_field(
        "Lognormal sigma of per-user click and purchase propensities (what CUPED exploits).", 0.5
    )
    new_user_share: float = help_field("Share of users who first arrive during the log window.", 0.25)
    position_bias: float = help_field("Examination probability at position k is 1 / k**position_bias.", 0.9)
    attractiveness_floor: float = help_field("P(click | examined) for an irrelevant product.", 0.03)
    attractiveness_ceiling: float = help_field("P(click | examined) for a perfect product.", 0.6)
    cart_rate: float = help_field("P(add to cart | click) for a perfect product (scaled by true gain).", 0.3)
    order_rate: float = help_field("P(order | add to cart).", 0.55)
    extra_quantity_mean: float = help_field("Units ordered are 1 + Poisson(extra_quantity_mean).", 0.3)
    # labels
    annotator_noise: float = help_field("P(the synthetic rater's label moves to an adjacent label).", 0.1)
    extra_raters: int = help_field(
        "Further synthetic raters (same noise) who also judge a sample of the judged pairs; pairs judged several "
        "times give the judges' own agreement, the ceiling `relevance evaluate` prints. 0: one judgment per pair.", 0
    )
    extra_rater_share: float = help_field("With extra_raters: share of the judged pairs they also judge.", 0.2)
    experiment: ExperimentConfig = help_field("The A/B experiment in the logs.", ExperimentConfig())

    def __post_init__(self) -> None:
        _normalise(self)
        try:
            resolve_vocabulary(self.vocabulary)
        except VocabularyError as error:
            raise ConfigError(f"vocabulary: {error}") from None
        _check(self.label_set in LABEL_SETS, "label_set", f"{self.label_set!r} is not one of {list(LABEL_SETS)}")
        _check(self.extra_raters >= 0, "extra_raters", f"must be >= 0, got {self.extra_raters}")
        for name in ("n_products", "n_queries", "n_users", "n_impressions", "results_per_request",
                     "candidates_per_query", "judgments_per_query", "n_days"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.candidates_per_query <= self.n_products, "candidates_per_query",
               f"{self.candidates_per_query} exceeds n_products={self.n_products}")
        _check(self.results_per_request <= self.candidates_per_query, "results_per_request",
               f"{self.results_per_request} exceeds candidates_per_query={self.candidates_per_query}")
        _check(self.judgments_per_query <= self.candidates_per_query, "judgments_per_query",
               f"{self.judgments_per_query} exceeds candidates_per_query={self.candidates_per_query}")
        _check(self.n_impressions >= self.results_per_request, "n_impressions",
               f"must be at least one request ({self.results_per_request} impressions)")
        shares = (self.pool_exact_share, self.pool_same_type_share, self.pool_related_share)
        for name, value in zip(("pool_exact_share", "pool_same_type_share", "pool_related_share"), shares):
            _rate(value, name)
        _check(sum(shares) <= 1.0 + 1e-9, "pool_*_share", f"pool shares sum to {sum(shares):.3f} > 1")
        _check(len(self.constraint_probs) >= 1 and min(self.constraint_probs) >= 0
               and abs(sum(self.constraint_probs) - 1) < 1e-6, "constraint_probs",
               f"must be non-negative and sum to 1, got {list(self.constraint_probs)}")
        for name in ("brand_query_rate", "synonym_rate", "misspelling_rate", "typo_rate", "query_noise_rate",
                     "attribute_missing_rate", "unbranded_rate", "description_missing_rate", "new_user_share",
                     "attractiveness_floor", "attractiveness_ceiling", "cart_rate", "order_rate", "annotator_noise",
                     "extra_rater_share"):
            _rate(getattr(self, name), name)
        _check(self.attractiveness_floor <= self.attractiveness_ceiling, "attractiveness_floor",
               "must not exceed attractiveness_ceiling")
        _check(self.zipf_exponent > 0, "zipf_exponent", f"must be > 0, got {self.zipf_exponent}")
        head, torso = self.segment_thresholds if len(self.segment_thresholds) == 2 else (-1, -1)
        _check(0 < head < torso < 1, "segment_thresholds",
               f"must be two shares 0 < head < torso < 1, got {self.segment_thresholds}")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ConfigError(f"start_date: {self.start_date!r} is not a date in YYYY-MM-DD form") from None
        _check(self.n_days > self.experiment.pre_period_days, "n_days",
               f"{self.n_days} leaves no experiment period after "
               f"experiment.pre_period_days={self.experiment.pre_period_days}")
        for name in ("user_activity_sigma", "user_propensity_sigma", "position_bias", "extra_quantity_mean",
                     "attribute_value_skew"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")

    @property
    def first_day(self) -> dt.date:
        return dt.date.fromisoformat(self.start_date)

    @property
    def n_requests(self) -> int:
        return self.n_impressions // self.results_per_request

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WorldConfig:
        """A named preset with `overrides` applied (nested dicts for the experiment block)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return _with_overrides(cls(), {**PRESETS[name], **overrides}, "world", merge=PRESETS[name])

    @classmethod
    def tests(cls, **overrides: Any) -> WorldConfig:
        """2,000 products and 60k impressions: generates in well under a second."""
        return cls.preset("tests", **overrides)

    @classmethod
    def demo(cls, **overrides: Any) -> WorldConfig:
        """About 20k products and 500k impressions: the world `relevance demo` runs on."""
        return cls.preset("demo", **overrides)

    @classmethod
    def benchmark(cls, **overrides: Any) -> WorldConfig:
        """50k products, 2M impressions: what benchmarks/generate_world.py times."""
        return cls.preset("benchmark", **overrides)


def _with_overrides(base: Any, overrides: dict[str, Any], where: str, merge: dict[str, Any] | None = None) -> Any:
    """`base` with `overrides` replaced; a dict for a dataclass field overrides inside it (after `merge`)."""
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(names)}")
    values = {}
    for key, value in overrides.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            nested = {**(merge or {}).get(key, {}), **value}
            value = _with_overrides(current, nested, f"{where}.{key}")
        values[key] = value
    return dataclasses.replace(base, **values)


# Presets: overrides of the defaults (the defaults are the demo world).
PRESETS: dict[str, dict[str, Any]] = {
    "tests": {
        "n_products": 2_000,
        "n_queries": 200,
        "n_users": 2_000,
        "n_impressions": 60_000,
        "candidates_per_query": 24,
        "judgments_per_query": 16,
        "n_days": 14,
        "experiment": {"pre_period_days": 7},
    },
    "demo": {},
    "benchmark": {
        "n_products": 50_000,
        "n_queries": 5_000,
        "n_users": 100_000,
        "n_impressions": 2_000_000,
    },
}
