"""A ladder of rankers of graded quality: what a label source must order right to be trusted for offline evaluation.

Each rung ranks every sampled query's judged products by gold gain + sigma * z, z standard normal drawn afresh for
each rung, and keeps the first k; ties (equal scores) fall to a further draw. A rung with a smaller sigma keeps the
gold order better in expectation, so the construction order is the order of sigma (smallest first); with independent
draws, neighbouring rungs differ by little on a finite sample, as real rankers near the top do. Ranking the judged
products keeps human and gold labels complete on the ladder's lists; a relevance table's coverage of them is
whatever it scored. Gold gains take few values (WANDS: 0, 0.5, 1), so noise levels below about 0.15 reorder only
products of equal gain and are not told apart by gold: keep the levels apart by more.

The query sample is fixed by `seed`: `n_queries` of the queries given (all when 0 or when fewer are given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from schemas.config import ConfigError, help_field
from schemas.tables import RANKED_LISTS


@dataclass(frozen=True)
class LadderConfig:
    noise_levels: tuple[float, ...] = help_field(
        "Std of the Gaussian noise each rung adds to the gold gain (one rung per level; smaller is better).",
        (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.3),
    )
    n_queries: int = help_field("Queries in the ladder's fixed sample (0: every query given).", 0)
    k: int = help_field("Products each rung lists per query.", 10)
    seed: int = help_field("Seed of the query sample and of the shared noise.", 0)

    def __post_init__(self) -> None:
        levels = tuple(float(level) for level in self.noise_levels)
        object.__setattr__(self, "noise_levels", levels)
        if len(levels) < 2 or min(levels) < 0 or len(set(levels)) != len(levels):
            raise ConfigError(f"ladder.noise_levels: give at least two distinct levels >= 0, got {list(levels)}")
        if self.n_queries < 0 or self.k < 1:
            raise ConfigError(f"ladder: n_queries must be >= 0 and k >= 1, got {self.n_queries} and {self.k}")

    @property
    def rankers(self) -> list[str]:
        """Rung names, best first."""
        return [ranker_name(level) for level in sorted(self.noise_levels)]


def ranker_name(noise: float) -> str:
    return f"noise_{noise:g}"


def make_ladder(gold: pd.DataFrame, config: LadderConfig) -> pa.Table:
    """RANKED_LISTS of every rung. `gold`: query_id, product_id, gain (the judged pairs with their gold gain)."""
    queries = np.sort(gold["query_id"].unique())
    rng = np.random.default_rng(config.seed)
    if 0 < config.n_queries < len(queries):
        queries = np.sort(rng.choice(queries, size=config.n_queries, replace=False))
    pairs = gold[gold["query_id"].isin(queries)].sort_values(["query_id", "product_id"], kind="mergesort").reset_index(drop=True)
    parts = []
    for level in sorted(config.noise_levels):
        noise, tiebreak = rng.standard_normal((2, len(pairs)))
        scored = pairs.assign(score=pairs["gain"].to_numpy() + level * noise, tiebreak=tiebreak)
        scored = scored.sort_values(["query_id", "score", "tiebreak"], ascending=[True, False, False], kind="mergesort")
        scored["rank"] = scored.groupby("query_id", sort=False).cumcount() + 1
        top = scored[scored["rank"] <= config.k]
        parts.append(pd.DataFrame({"query_id": top["query_id"].to_numpy(), "ranker": ranker_name(level),
                                   "rank": top["rank"].to_numpy().astype(np.int32), "product_id": top["product_id"].to_numpy()}))
    return RANKED_LISTS.from_pandas(pd.concat(parts, ignore_index=True))
