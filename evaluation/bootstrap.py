"""One bootstrap engine: resample queries (never pairs), vectorised over replicates.

Pairs of one query share the query's difficulty, so they are not independent draws; resampling
pairs would understate the uncertainty. A replicate draws `n_queries` query ids with replacement;
its draw counts form one row of a `(B, n_queries)` weight matrix, and every metric is computed from
per-query sufficient statistics weighted by that row (a confusion matrix per query -> one matrix
product per chunk of replicates, no Python loop over pairs or replicates).

A statistic is a function `weights (B, n_queries) -> {name: (B, ...) array}`; the point estimate is
the same function at weights of one. Intervals are percentile intervals of the replicates
(replicates where a metric is undefined, e.g. AUC when a resample holds one class, are left out of
that metric's interval and counted). A paired comparison is one statistic returning B's metric
minus A's from the same weights, so both models see the same resampled queries. The weights depend
only on (`n_queries`, `n_replicates`, `seed`): the same seed gives the same replicates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 64  # replicates per weight matrix; bounds memory at CHUNK x n_queries (x distinct scores for AUCs)

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval (arrays for per-class metrics)."""

    estimate: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    level: float
    n_replicates: int
    n_undefined: int | np.ndarray


def resample_weights(n_queries: int, n_replicates: int, seed: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Chunks of `(b, n_queries)` draw counts: row r counts how often each query was drawn."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_replicates, chunk):
        size = min(chunk, n_replicates - start)
        drawn = rng.integers(0, n_queries, size=(size, n_queries))
        flat = (np.arange(size)[:, None] * n_queries + drawn).ravel()
        yield np.bincount(flat, minlength=size * n_queries).reshape(size, n_queries).astype(float)


def bootstrap(
    statistic: Statistic, n_queries: int, n_replicates: int, seed: int, level: float = 0.95
) -> dict[str, Interval]:
    """Point estimates and query-bootstrap percentile intervals of every metric `statistic` returns."""
    if n_queries < 1 or n_replicates < 1:
        raise ValueError(f"bootstrap needs queries and replicates, got {n_queries} and {n_replicates}")
    point = {name: value[0] for name, value in statistic(np.ones((1, n_queries))).items()}
    replicates: dict[str, list[np.ndarray]] = {name: [] for name in point}
    for weights in resample_weights(n_queries, n_replicates, seed):
        for name, value in statistic(weights).items():
            replicates[name].append(value)
    tail = (1.0 - level) / 2.0
    intervals = {}
    for name, estimate in point.items():
        values = np.concatenate(replicates[name])
        undefined = np.isnan(values).sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
            low, high = np.nanquantile(values, [tail, 1.0 - tail], axis=0)
        scalar = np.ndim(estimate) == 0
        intervals[name] = Interval(
            estimate=float(estimate) if scalar else np.asarray(estimate),
            low=float(low) if scalar else low,
            high=float(high) if scalar else high,
            level=level,
            n_replicates=n_replicates,
            n_undefined=int(undefined) if scalar else undefined,
        )
    return intervals
