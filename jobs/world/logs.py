"""Search logs and the A/B experiment in them, simulated with vectorised numpy.

Users: activity ~ LogNormal(0, user_activity_sigma); a `new_user_share` of users arrive on a random
later day (activity scaled by the days they are present); click and purchase propensities ~
LogNormal with mean 1. These per-user traits persist across days, so a user's pre-period behaviour
predicts their experiment-period behaviour (what CUPED exploits).

Requests: n_impressions // results_per_request of them; the user is drawn by activity, the day
uniformly within the user's presence, the hour from a diurnal profile, the query by Zipf traffic.
Requests are ordered by time and numbered in that order.

Experiment: users are hashed (sha256 of "experiment_id:user_id", first 8 bytes / 2**64) into
treatment when the hash is below treatment_share. The first pre_period_days are the pre-period (both
arms see the control ranker). With `srm`, a second hash picks srm_drop_share of the treatment users
whose experiment-period requests are lost from the logs (so they never show up as exposed).

Ranking: each request scores its query's candidate pool as true gain + Normal(0, noise) (noise =
treatment_noise for treatment users in the experiment period unless `aa`, else control_noise) and
shows the top results_per_request.

Engagement per shown product at position k:
  P(click)        = min(1, k ** -position_bias * (floor + (ceiling - floor) * gain) * click_propensity)
  P(cart | click) = min(1, cart_rate * gain * purchase_propensity)
  P(order | cart) = order_rate;  quantity = 1 + Poisson(extra_quantity_mean);  GMV = price * quantity.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.world.catalog import Catalog
from jobs.world.columns import id_width, ids, take
from jobs.world.config import VARIANTS, WorldConfig
from jobs.world.queries import SEGMENTS, Queries
from schemas.tables import EXPERIMENT_ASSIGNMENT, EXPERIMENT_EVENTS, SEARCH_IMPRESSIONS

EPOCH = dt.date(1970, 1, 1)
MICROS_PER_DAY = 86_400 * 1_000_000
CHUNK_REQUESTS = 50_000  # requests ranked at once (bounds memory; fixed so results do not depend on it)
# Share of searches by hour of day (UTC), low at night and peaking in the evening.
DIURNAL = np.array([0.35, 0.2, 0.12, 0.08, 0.07, 0.1, 0.2, 0.4, 0.6, 0.75, 0.85, 0.9,
                    0.95, 0.9, 0.88, 0.9, 0.95, 1.0, 1.1, 1.25, 1.35, 1.3, 1.0, 0.65])


@dataclass(frozen=True)
class Logs:
    search_impressions: pa.Table
    experiment_events: pa.Table
    experiment_assignment: pa.Table


@dataclass(frozen=True)
class Users:
    activity: np.ndarray  # (n,) relative search rate
    arrival_day: np.ndarray  # (n,) first day present
    click_propensity: np.ndarray  # (n,) mean 1
    purchase_propensity: np.ndarray  # (n,) mean 1


def hash_unit(keys: list[str]) -> np.ndarray:
    """A stable uniform [0, 1) number per key: sha256, first 8 bytes big-endian / 2**64."""
    return np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") for k in keys],
                    dtype=np.float64) / 2.0**64


def make_users(n_users: int, n_days: int, rng: np.random.Generator, *, activity_sigma: float,
               propensity_sigma: float, new_user_share: float) -> Users:
    activity = rng.lognormal(0.0, activity_sigma, n_users)
    late = rng.random(n_users) < new_user_share
    arrival = np.where(late, rng.integers(1, max(n_days, 2), n_users), 0) if n_days > 1 else np.zeros(n_users, np.int64)
    mean_one = -0.5 * propensity_sigma**2
    return Users(
        activity=activity * (n_days - arrival) / n_days,
        arrival_day=arrival,
        click_propensity=rng.lognormal(mean_one, propensity_sigma, n_users),
        purchase_propensity=rng.lognormal(mean_one, propensity_sigma, n_users),
    )


def rank(pool_gain: np.ndarray, noise: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k) pool columns of the top-k by gain + Normal(0, noise[i]), best first.

    pool_gain: (n, C) true gain of each request's candidates; noise: (n,) ranker noise std.
    """
    scores = pool_gain + noise[:, None] * rng.standard_normal(pool_gain.shape)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def engage(gain: np.ndarray, click_propensity: np.ndarray, purchase_propensity: np.ndarray, rng: np.random.Generator,
           *, position_bias: float, floor: float, ceiling: float, cart_rate: float, order_rate: float,
           extra_quantity_mean: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clicks, carts, orders (bool) and quantities (int) for shown products.

    gain: (n, k) true gain by position; click_propensity, purchase_propensity: (n,) of each request's user.
    """
    examine = np.arange(1, gain.shape[1] + 1, dtype=np.float64) ** -position_bias
    p_click = np.minimum(1.0, examine * (floor + (ceiling - floor) * gain) * click_propensity[:, None])
    clicked = rng.random(gain.shape) < p_click
    p_cart = np.minimum(1.0, cart_rate * gain * purchase_propensity[:, None])
    carted = clicked & (rng.random(gain.shape) < p_cart)
    ordered = carted & (rng.random(gain.shape) < order_rate)
    quantity = np.where(ordered, 1 + rng.poisson(extra_quantity_mean, gain.shape), 0).astype(np.int32)
    return clicked, carted, ordered, quantity


def simulate_logs(config: WorldConfig, catalog: Catalog, queries: Queries, pools: np.ndarray, pool_gain: np.ndarray,
                  rng: np.random.Generator) -> Logs:
    """SEARCH_IMPRESSIONS, EXPERIMENT_EVENTS and EXPERIMENT_ASSIGNMENT for the world's users."""
    experiment = config.experiment
    n_days, k = config.n_days, config.results_per_request
    users = make_users(config.n_users, n_days, rng, activity_sigma=config.user_activity_sigma,
                       propensity_sigma=config.user_propensity_sigma, new_user_share=config.new_user_share)
    n = config.n_requests
    user = rng.choice(config.n_users, size=n, p=users.activity / users.activity.sum())
    present_days = n_days - users.arrival_day[user]
    day = users.arrival_day[user] + np.minimum((rng.random(n) * present_days).astype(np.int64), present_days - 1)
    hour = rng.choice(24, size=n, p=DIURNAL / DIURNAL.sum())
    micros = ((hour + rng.random(n)) * 3_600_000_000).astype(np.int64)
    query = rng.choice(len(queries), size=n, p=queries.frequency)
    first_day = (config.first_day - EPOCH).days
    ts = (first_day + day) * MICROS_PER_DAY + micros
    order = np.argsort(ts, kind="stable")
    user, day, ts, query = user[order], day[order], ts[order], query[order]

    user_ids = ids("u", np.arange(config.n_users), id_width(config.n_users, 7))
    keys = user_ids.to_pylist()
    treated = hash_unit([f"{experiment.experiment_id}:{key}" for key in keys]) < experiment.treatment_share
    lost = np.zeros(config.n_users, dtype=bool)
    if experiment.srm:
        srm_hash = hash_unit([f"{experiment.experiment_id}:srm:{key}" for key in keys])
        lost = treated & (srm_hash < experiment.srm_drop_share)
    in_experiment = day >= experiment.pre_period_days
    kept = ~(in_experiment & lost[user])
    user, day, ts, query, in_experiment = user[kept], day[kept], ts[kept], query[kept], in_experiment[kept]
    better = in_experiment & treated[user] & (not experiment.aa)
    noise = np.where(better, experiment.treatment_noise, experiment.control_noise)

    shown_parts, outcome_parts = [], []
    for start in range(0, len(user), CHUNK_REQUESTS):
        part = slice(start, start + CHUNK_REQUESTS)
        gain = pool_gain[query[part]]
        columns = rank(gain, noise[part], k, rng)
        shown_gain = np.take_along_axis(gain, columns, axis=1)
        shown_parts.append(pools[query[part][:, None], columns])
        outcome_parts.append(engage(
            shown_gain, users.click_propensity[user[part]], users.purchase_propensity[user[part]], rng,
            position_bias=config.position_bias, floor=config.attractiveness_floor,
            ceiling=config.attractiveness_ceiling, cart_rate=config.cart_rate, order_rate=config.order_rate,
            extra_quantity_mean=config.extra_quantity_mean,
        ))
    shown = np.concatenate(shown_parts)
    clicked, carted, ordered, quantity = (np.concatenate([o[i] for o in outcome_parts]) for i in range(4))
    price = catalog.price[shown]

    n_kept = len(user)
    request_ids = ids("r", np.arange(n_kept), id_width(n_kept, 9))
    timestamps = pa.array(ts, pa.timestamp("us", tz="UTC"))
    days = pa.array((first_day + day).astype(np.int32), pa.date32())
    row = np.repeat(np.arange(n_kept), k)
    rows = pa.array(row)
    impressions = pa.table(
        {
            "request_id": request_ids.take(rows),
            "user_id": user_ids.take(pa.array(user[row])),
            "query_id": queries.query_ids.take(pa.array(query[row])),
            "query": queries.texts.take(pa.array(query[row])),
            "product_id": catalog.product_ids.take(pa.array(shown.ravel())),
            "position": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n_kept)),
            "clicked": pa.array(clicked.ravel()),
            "added_to_cart": pa.array(carted.ravel()),
            "ordered": pa.array(ordered.ravel()),
            "quantity": pa.array(quantity.ravel()),
            "price": pa.array(price.ravel()),
            "ts": timestamps.take(rows),
            "ds": days.take(rows),
        }
    )
    events = pa.table(
        {
            "request_id": request_ids,
            "user_id": user_ids.take(pa.array(user)),
            "query_id": queries.query_ids.take(pa.array(query)),
            "query_segment": take(SEGMENTS, queries.segment_code[query]),
            "impressions": pa.array(np.full(n_kept, k, dtype=np.int32)),
            "clicks": pa.array(clicked.sum(axis=1, dtype=np.int32)),
            "add_to_carts": pa.array(carted.sum(axis=1, dtype=np.int32)),
            "orders": pa.array(ordered.sum(axis=1, dtype=np.int32)),
            "gmv": pa.array((price * quantity).sum(axis=1)),
            "ts": timestamps,
            "ds": days,
        }
    )
    exposed, first = np.unique(user[in_experiment], return_index=True)
    returning = np.isin(exposed, np.unique(user[~in_experiment]))
    assignment = pa.table(
        {
            "experiment_id": pa.array([experiment.experiment_id] * len(exposed), pa.string()),
            "user_id": user_ids.take(pa.array(exposed)),
            "variant": take(VARIANTS, treated[exposed].astype(np.int64)),
            "first_exposure_ts": timestamps.filter(pa.array(in_experiment)).take(pa.array(first)),
            "user_type": take(("new", "returning"), returning.astype(np.int64)),
        }
    )
    return Logs(SEARCH_IMPRESSIONS.conform(impressions), EXPERIMENT_EVENTS.conform(events),
                EXPERIMENT_ASSIGNMENT.conform(assignment))
