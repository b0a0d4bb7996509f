"""A ladder of rankers of graded quality: what a label source must order right to be trusted for offline evaluation.

Each rung ranks every sampled query's judged products by gold gain + sigma * z, z standard normal drawn afresh for
each rung, and keeps the first k; ties (equal scores) fall to a further draw. A rung with a smaller sigma keeps the
gold order better in expectation, so the construction order is the order of sigma (smallest first); with independent
draws, neighbouring rungs differ by little on a finite sample, as real rankers near the top do. Ranking the judged
products keeps human and gold labels complete on the ladder's lists; a relevance table's coverage of them is
whatever it scored. Gold gains take few values (WANDS: 0, 0.5, 1), so noise levels below about 0.15 reorder only
products of equal gain and are not told apart by gold: keep the levels apart by more.

Rungs with a blind spot (`subject_noise_levels`): they rank by the subject gain, the gain of the label the pair
would have if the query constrained nothing (the label set's rule with ma = none: the product's type alone decides),
plus noise. Gold places them by how much attributes matter on the sample; a judge that under-checks attributes
rewards them, so these rungs are where a label source with a systematic bias orders the ladder differently from
gold (label noise that does not depend on the ranker averages out over queries; bias does not).

The query sample is fixed by `seed`: `n_queries` of the queries given (all when 0 or when fewer are given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import ConfigError, help_field
from schemas.graph import LabelSet
from schemas.tables import RANKED_LISTS


@dataclass(frozen=True)
class LadderConfig:
    noise_levels: tuple[float, ...] = help_field(
        "Std of the Gaussian noise each rung adds to the gold gain (one rung per level; smaller is better).",
        (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.3),
    )
    subject_noise_levels: tuple[float, ...] = help_field(
        "Noise of rungs that rank by the product type alone (attributes ignored: the subject gain); empty: none.", (0.0, 0.3))
    n_queries: int = help_field("Queries in the ladder's fixed sample (0: every query given).", 0)
    k: int = help_field("Products each rung lists per query.", 10)
    seed: int = help_field("Seed of the query sample and of the shared noise.", 0)

    def __post_init__(self) -> None:
        levels = tuple(float(level) for level in self.noise_levels)
        subject = tuple(float(level) for level in self.subject_noise_levels)
        object.__setattr__(self, "noise_levels", levels)
        object.__setattr__(self, "subject_noise_levels", subject)
        if len(levels) < 2 or min(levels) < 0 or len(set(levels)) != len(levels):
            raise ConfigError(f"ladder.noise_levels: give at least two distinct levels >= 0, got {list(levels)}")
        if (subject and min(subject) < 0) or len(set(subject)) != len(subject):
            raise ConfigError(f"ladder.subject_noise_levels: give distinct levels >= 0, got {list(subject)}")
        if self.n_queries < 0 or self.k < 1:
            raise ConfigError(f"ladder: n_queries must be >= 0 and k >= 1, got {self.n_queries} and {self.k}")

    @property
    def graded(self) -> list[str]:
        """The rungs of graded quality, best first (their construction order)."""
        return [ranker_name(level) for level in sorted(self.noise_levels)]

    @property
    def rankers(self) -> list[str]:
        """Every rung: the graded ones best first, then the subject-only ones."""
        return self.graded + [ranker_name(level, SUBJECT) for level in sorted(self.subject_noise_levels)]


GAIN, SUBJECT = "noise", "subject"


def ranker_name(noise: float, kind: str = GAIN) -> str:
    return f"{kind}_{noise:g}"


def subject_gains(gold_nodes: pa.Table, label_set: LabelSet) -> pd.DataFrame:
    """query_id, product_id, subject_gain: the gain of the label set's rule on the pair's gold `ms` with ma = none."""
    gains = {ms: label_set.gains[label_set.label_from_nodes({"ms": ms, "ma": "none"})] for ms in ("match", "related", "mismatch")}
    ms = pc.map_lookup(gold_nodes["nodes"], "ms", "first").to_pylist()
    return pd.DataFrame({"query_id": gold_nodes["query_id"].to_numpy(zero_copy_only=False),
                         "product_id": gold_nodes["product_id"].to_numpy(zero_copy_only=False),
                         "subject_gain": [gains[value] for value in ms]})


def make_ladder(gold: pd.DataFrame, config: LadderConfig) -> pa.Table:
    """RANKED_LISTS of every rung. `gold`: query_id, product_id, gain (the judged pairs with their gold gain) and,
    with subject-only rungs, subject_gain (`subject_gains`)."""
    queries = np.sort(gold["query_id"].unique())
    rng = np.random.default_rng(config.seed)
    if 0 < config.n_queries < len(queries):
        queries = np.sort(rng.choice(queries, size=config.n_queries, replace=False))
    pairs = gold[gold["query_id"].isin(queries)].sort_values(["query_id", "product_id"], kind="mergesort").reset_index(drop=True)
    parts = []
    rungs = [(level, GAIN, "gain") for level in sorted(config.noise_levels)]
    rungs += [(level, SUBJECT, "subject_gain") for level in sorted(config.subject_noise_levels)]
    for level, kind, gain in rungs:
        noise, tiebreak = rng.standard_normal((2, len(pairs)))
        scored = pairs.assign(score=pairs[gain].to_numpy() + level * noise, tiebreak=tiebreak)
        scored = scored.sort_values(["query_id", "score", "tiebreak"], ascending=[True, False, False], kind="mergesort")
        scored["rank"] = scored.groupby("query_id", sort=False).cumcount() + 1
        top = scored[scored["rank"] <= config.k]
        parts.append(pd.DataFrame({"query_id": top["query_id"].to_numpy(), "ranker": ranker_name(level, kind),
                                   "rank": top["rank"].to_numpy().astype(np.int32), "product_id": top["product_id"].to_numpy()}))
    return RANKED_LISTS.from_pandas(pd.concat(parts, ignore_index=True))
