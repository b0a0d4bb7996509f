"""Train / validation / test per query, stratified by segment (`jobs/datasets.py`, step 6).

Pure `DataFrame -> DataFrame` transforms; the module docstring of `jobs/datasets.py` states the rule
and why rank cuts, not a hash threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.config import ConfigError, help_field

SPLITS = ("train", "validation", "test")
SHARE_UNIT = 1_000_000  # split shares are rounded to millionths and cut in integer arithmetic
HELD_OUT = "_held_out"  # working column: a weak row kept out of validation / test (never written)


@dataclass(frozen=True)
class SplitFractions:
    """Shares of each stratum's queries per split; they sum to 1."""

    train: float = help_field("Share of each segment's queries in train.", 0.8)
    validation: float = help_field("Share of each segment's queries in validation.", 0.1)
    test: float = help_field("Share of each segment's queries in test.", 0.1)

    def __post_init__(self) -> None:
        for name in SPLITS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"fractions.{name}: must be a share in [0, 1], got {getattr(self, name)}")
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(
                f"fractions: train + validation + test must be 1, "
                f"got {self.train} + {self.validation} + {self.test} = {total}"
            )

    @property
    def cuts(self) -> tuple[int, int]:
        """Cumulative shares (train, train + validation) in millionths."""
        return round(self.train * SHARE_UNIT), round((self.train + self.validation) * SHARE_UNIT)


def split_hash(salt: str):
    """The Spark expression of h(query_id): sha256 hex of `salt:query_id` (lexicographic = numeric order)."""
    from pyspark.sql import functions as F

    return F.sha2(F.concat(F.lit(f"{salt}:"), F.col("query_id")), 256)


def assign_splits(query_segments, fractions: SplitFractions, salt: str):
    """(query_id, segment) unique per query_id -> (query_id, segment, split), jobs/datasets.py step 6."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    stratum = Window.partitionBy("segment")
    whole_stratum = stratum.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    ranked = query_segments.select(
        "*",
        F.row_number().over(stratum.orderBy(split_hash(salt), F.col("query_id"))).alias("_rank"),
        F.count(F.lit(1)).over(whole_stratum).alias("_n"),
    )
    train_cut, validation_cut = fractions.cuts
    half = SHARE_UNIT // 2
    n_train = F.expr(f"(_n * {train_cut} + {half}) div {SHARE_UNIT}")
    n_train_validation = F.expr(f"(_n * {validation_cut} + {half}) div {SHARE_UNIT}")
    split = (
        F.when(F.col("_rank") <= n_train, F.lit("train"))
        .when(F.col("_rank") <= n_train_validation, F.lit("validation"))
        .otherwise(F.lit("test"))
    )
    return ranked.select(F.col("query_id"), F.col("segment"), split.alias("split"))


def with_splits(examples, fractions: SplitFractions, salt: str, weak_train_only: bool):
    """Examples -> examples with `split` and `_held_out` (weak rows kept out of validation/test)."""
    from pyspark.sql import functions as F

    units = examples if not weak_train_only else examples.where(~F.col("is_weak"))
    assignment = assign_splits(units.select("query_id", "segment").distinct(), fractions, salt).drop("segment")
    joined = examples.join(assignment, on="query_id", how="left").withColumn(
        "split", F.coalesce(F.col("split"), F.lit("train"))
    )
    held_out = F.lit(weak_train_only) & F.col("is_weak") & (F.col("split") != F.lit("train"))
    return joined.withColumn(HELD_OUT, held_out)
