"""A seeded, vectorised generator of experiment logs (`experiment_assignment`, `experiment_events`).

For tests, benchmarks, A/A checks and power planning. Users differ a lot from each other (so the
pre-period predicts the experiment period and CUPED has something to remove): a log-normal search
rate, a beta click propensity, a beta order propensity and a log-normal order value (heavy-tailed
GMV). About `new_user_share` of the users have no pre-period activity. A user is exposed (and
assigned) on their first request in the experiment period; users without one are not in the
experiment. Treatment effects are multipliers per variant on `requests`, `ctr`, `cvr` and `aov`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import storage
from schemas.tables import EXPERIMENT_ASSIGNMENT, EXPERIMENT_EVENTS

SEGMENTS = ("head", "torso", "tail")
SEGMENT_SHARE = (0.5, 0.3, 0.2)
SEGMENT_CTR = (1.2, 1.0, 0.7)
EFFECT_KEYS = ("requests", "ctr", "cvr", "aov")


@dataclass(frozen=True)
class SimulationSpec:
    """Size and shape of a simulated experiment (see the module docstring)."""

    n_users: int = 20_000
    pre_days: int = 14
    exp_days: int = 14
    start: dt.date = dt.date(2024, 3, 1)
    variants: tuple[str, ...] = ("control", "treatment")
    split: tuple[float, ...] | None = None
    effects: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    requests_per_user_day: float = 0.4
    new_user_share: float = 0.3
    n_queries: int = 5_000
    experiment_id: str = "exp_sim"
    seed: int = 0

    def __post_init__(self) -> None:
        for variant, effect in self.effects.items():
            if variant not in self.variants or set(effect) - set(EFFECT_KEYS):
                raise ValueError(f"effects[{variant!r}] = {dict(effect)}: variant must be one of {self.variants}, keys in {EFFECT_KEYS}")


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(numbers).cast(pa.string()), "")


def simulate(spec: SimulationSpec) -> tuple[pa.Table, pa.Table]:
    """(events, assignment) as Arrow tables with the declared schemas."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n_users
    split = np.asarray(spec.split or [1.0] * len(spec.variants), dtype=float)
    variant = rng.choice(len(spec.variants), size=n, p=split / split.sum())

    def effect(key: str) -> np.ndarray:
        table = np.array([spec.effects.get(v, {}).get(key, 1.0) for v in spec.variants])
        return table[variant]

    rate = spec.requests_per_user_day * rng.lognormal(-0.5, 1.0, n)
    ctr = rng.beta(2.0, 18.0, n)
    cvr = rng.beta(1.0, 12.0, n)
    aov = rng.lognormal(3.5, 0.8, n)
    is_new = rng.random(n) < spec.new_user_share

    pre_count = np.where(is_new, 0, rng.poisson(rate * spec.pre_days))
    exp_count = rng.poisson(rate * spec.exp_days * effect("requests"))
    user = np.concatenate([np.repeat(np.arange(n), pre_count), np.repeat(np.arange(n), exp_count)])
    is_exp = np.concatenate([np.zeros(pre_count.sum(), bool), np.ones(exp_count.sum(), bool)])
    m = len(user)
    exp_day = rng.integers(0, spec.exp_days, m)
    pre_day = rng.integers(-spec.pre_days, 0, m) if spec.pre_days else np.zeros(m, int)  # unused without a pre-period
    day = np.where(is_exp, exp_day, pre_day)
    seconds = rng.integers(0, 86_400, m)
    segment = rng.choice(3, size=m, p=SEGMENT_SHARE)

    def lifted(key: str) -> np.ndarray:  # effects act in the experiment period only
        return np.where(is_exp, effect(key)[user], 1.0)

    impressions = np.where(rng.random(m) < 0.03, 0, 10 + rng.poisson(10, m))
    p_click = np.minimum(ctr[user] * np.asarray(SEGMENT_CTR)[segment] * lifted("ctr"), 1.0)
    clicks = rng.binomial(impressions, p_click)
    add_to_carts = rng.binomial(clicks, 0.3)
    orders = rng.binomial(clicks, np.minimum(cvr[user] * lifted("cvr"), 1.0))
    gmv = orders * rng.lognormal(np.log(aov[user] * lifted("aov")), 0.5)

    start = np.datetime64(spec.start, "us")
    ts = start + (day.astype("int64") * 86_400 + seconds) * np.timedelta64(1_000_000, "us")
    events = pa.table({
        "request_id": _ids("r", np.arange(m)),
        "user_id": _ids("u", user),
        "query_id": _ids("q", rng.zipf(1.3, m) % spec.n_queries),
        "query_segment": pa.array(np.asarray(SEGMENTS)[segment]),
        "impressions": impressions.astype("int32"),
        "clicks": clicks.astype("int32"),
        "add_to_carts": add_to_carts.astype("int32"),
        "orders": orders.astype("int32"),
        "gmv": gmv,
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "ds": pa.array(start.astype("datetime64[D]") + day, pa.date32()),
    })

    first_ts = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, user[is_exp], ts[is_exp].astype("int64"))
    exposed = np.flatnonzero(exp_count > 0)
    assignment = pa.table({
        "experiment_id": pa.array([spec.experiment_id] * len(exposed)),
        "user_id": _ids("u", exposed),
        "variant": pa.array(np.asarray(spec.variants)[variant[exposed]]),
        "first_exposure_ts": pa.array(first_ts[exposed].astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "user_type": pa.array(np.where(pre_count[exposed] > 0, "returning", "new")),
    })
    return EXPERIMENT_EVENTS.conform(events), EXPERIMENT_ASSIGNMENT.conform(assignment)


def write(events: pa.Table, assignment: pa.Table, root: str | Path) -> Path:
    """Write both tables under a data root in the standard layout (events partitioned by ds)."""
    storage.write_table(EXPERIMENT_EVENTS, events, root)
    storage.write_table(EXPERIMENT_ASSIGNMENT, assignment, root)
    return Path(root)
