"""Labelled pairs for the datasets job: checks, one judgment per pair, weak labels, joined text.

Each function is a pure `DataFrame -> DataFrame` transform; `jobs/datasets.py` documents the rules
(steps 2 to 5) and wires them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.quarantine import FIELD, REASON, Rule, first_failure
from schemas.config import ConfigError, help_field

GOLD_ANNOTATOR = "gold"
WEAK_ENGAGED = "weak:engaged"
WEAK_IGNORED = "weak:ignored"
SUPERSEDED = (
    "superseded by another judgment of the pair (gold > human > weak, then majority label, then smallest annotator)"
)
LABELLED_COLUMNS = ("query_id", "product_id", "label", "label_set", "annotator", "is_weak")
# Working columns (never written).
ORIGIN = "_origin"
RECORD = "_record"
SOURCE_FILE = "_source_file"
GOLD = "_gold_nodes"
N_JUDGMENTS = "_n_judgments"
N_LABELS = "_n_labels"


def product_facets(catalog):
    """catalog -> (product_id, facets): attributes plus `brand` when set and not already an attribute."""
    from pyspark.sql import functions as F

    add_brand = (
        F.col("brand").isNotNull()
        & (F.col("brand") != F.lit(""))
        & ~F.array_contains(F.map_keys(F.col("attributes")), F.lit("brand"))
    )
    facets = F.when(add_brand, F.map_concat(F.col("attributes"), F.create_map(F.lit("brand"), F.col("brand"))))
    return catalog.select(F.col("product_id"), facets.otherwise(F.col("attributes")).alias("facets"))


def check_pairs(pairs, product_ids, query_ids, labels: Sequence[str]):
    """Mark labelled pairs whose label, query or product is unknown: adds `_field` / `_reason` (null: fine).

    The first failing check names the reason: the label must be in `labels`, then the query_id in
    `query_ids`, then the product_id in `product_ids` (unique key columns of the accepted queries /
    catalog).
    """
    from pyspark.sql import functions as F

    products = product_ids.select(F.col("product_id"), F.lit(True).alias("_product_known"))
    queries = query_ids.select(F.col("query_id"), F.lit(True).alias("_query_known"))
    joined = pairs.join(products, on="product_id", how="left").join(queries, on="query_id", how="left")
    reason, field = first_failure([
        Rule(~F.col("label").isin(list(labels)), f"label not in the label set {list(labels)}", "label"),
        Rule(F.col("_query_known").isNull(), "query_id not in the queries table", "query_id"),
        Rule(F.col("_product_known").isNull(), "product_id not in the catalog", "product_id"),
    ])
    return joined.select(*pairs.columns, field, reason)


def resolve_duplicates(checked):
    """Among rows `check_pairs` accepted, keep one judgment per (query_id, product_id); mark the rest.

    The kept row is chosen as jobs/datasets.py step 3 says (priority, majority label, smallest
    annotator); the others get `_reason` = SUPERSEDED. Adds `_n_judgments` (accepted rows of the pair)
    and `_n_labels` (distinct labels among them).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    fine = F.col(REASON).isNull()
    pair = (F.col("query_id"), F.col("product_id"), fine.alias("_fine"))
    is_gold = F.col("annotator") == F.lit(GOLD_ANNOTATOR)
    priority = F.when(F.col("is_weak"), F.lit(2)).when(is_gold, F.lit(0)).otherwise(F.lit(1))
    whole = (Window.unboundedPreceding, Window.unboundedFollowing)
    votes = F.count(F.lit(1)).over(Window.partitionBy(*pair, priority, F.col("label")).rowsBetween(*whole))
    best_first = Window.partitionBy(*pair).orderBy(
        priority.asc(), votes.desc(), F.col("annotator").asc(), F.col("label").asc()
    )
    whole_pair = Window.partitionBy(*pair).rowsBetween(*whole)
    ranked = checked.select(
        "*",
        F.row_number().over(best_first).alias("_rank"),
        F.count(F.lit(1)).over(whole_pair).alias(N_JUDGMENTS),
        F.size(F.collect_set(F.col("label")).over(whole_pair)).alias(N_LABELS),
    )
    superseded = fine & (F.col("_rank") > 1)
    return ranked.select(
        *[name for name in checked.columns if name not in (FIELD, REASON)],
        F.when(superseded, F.lit("annotator")).otherwise(F.col(FIELD)).alias(FIELD),
        F.when(superseded, F.lit(SUPERSEDED)).otherwise(F.col(REASON)).alias(REASON),
        F.when(fine, F.col(N_JUDGMENTS)).alias(N_JUDGMENTS),
        F.when(fine, F.col(N_LABELS)).alias(N_LABELS),
    )



def weak_pairs(stats, candidate_pairs):
    """Daily (normalised query, product) engagement -> summed per (query_id, product_id).

    A normalised query's query_id is the smallest `candidate_pairs.query_id` over the days read; rows
    without a candidate_pairs row keep a null query_id (quarantined later) and stay apart per query.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ids = candidate_pairs.select("query", "product_id", "ds", "query_id")
    per_query = Window.partitionBy("query").rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    joined = stats.join(ids, on=["query", "product_id", "ds"], how="left").withColumn(
        "query_id", F.min(F.col("query_id")).over(per_query)
    )
    unmapped = F.when(F.col("query_id").isNull(), F.col("query"))
    examinations = F.sum(F.col("expected_examinations"))
    clicks = F.sum(F.col("clicks"))
    return joined.groupBy(F.col("query_id"), F.col("product_id"), unmapped.alias("_unmapped")).agg(
        F.min(F.col("query")).alias("query"),
        F.sum(F.col("impressions")).alias("impressions"),
        clicks.alias("clicks"),
        F.sum(F.col("orders")).alias("orders"),
        examinations.alias("examinations"),
        F.when(examinations > 0, clicks / examinations).alias("ctr"),
    ).drop("_unmapped")


@dataclass(frozen=True)
class WeakRule:
    """Thresholds of the engagement rule (jobs/datasets.py, step 4)."""

    min_examinations: float = help_field("Expected examinations (position-debiased impressions) a pair needs.", 20.0)
    top_ctr: float = help_field("Debiased CTR at or above which a pair gets the top label.", 0.3)
    top_orders: int = help_field("Orders at or above which a pair gets the top label (0: orders are not used).", 1)

    def __post_init__(self) -> None:
        if not self.min_examinations > 0:
            raise ConfigError(f"weak_rule.min_examinations: must be > 0, got {self.min_examinations}")
        if not self.top_ctr > 0:
            raise ConfigError(f"weak_rule.top_ctr: must be > 0 (a CTR), got {self.top_ctr}")
        if self.top_orders < 0:
            raise ConfigError(
                f"weak_rule.top_orders: must be >= 0 (0 turns the order clause off), got {self.top_orders}"
            )


def weak_labels(pairs, judged_keys, rule: WeakRule, top_label: str, bottom_label: str):
    """`weak_pairs` rows -> the same rows with `label` / `annotator` (null: no rule fired) and `judged`.

    `judged_keys`: (query_id, product_id) pairs that have a judgment of the label set; the caller
    keeps rows with a label and `judged = false`.
    """
    from pyspark.sql import functions as F

    enough = F.col("examinations") >= F.lit(rule.min_examinations)
    engaged = F.col("ctr") >= F.lit(rule.top_ctr)
    if rule.top_orders > 0:
        engaged = engaged | (F.col("orders") >= F.lit(rule.top_orders))
    engaged = enough & engaged
    ignored = enough & (F.col("clicks") == 0)
    judged = judged_keys.select("query_id", "product_id").distinct().withColumn("judged", F.lit(True))
    return (
        pairs.join(judged, on=["query_id", "product_id"], how="left")
        .withColumn("judged", F.coalesce(F.col("judged"), F.lit(False)))
        .withColumn("label", F.when(engaged, F.lit(top_label)).when(ignored, F.lit(bottom_label)))
        .withColumn("annotator", F.when(engaged, F.lit(WEAK_ENGAGED)).when(ignored, F.lit(WEAK_IGNORED)))
    )


def join_examples(pairs, gold_nodes, catalog, queries):
    """Checked, deduplicated labelled pairs -> every TRAINING_EXAMPLES column but split/target/cot_order.

    `pairs`: query_id, product_id, label, label_set, annotator, is_weak (+ working columns, kept).
    Every pair's product and query exist (`check_pairs`); keys of catalog, queries and gold_nodes are
    unique (their row rules), so no join multiplies rows. The gold nodes are carried as `_gold_nodes`
    (weak rows: none); `render_targets` turns them into `nodes` and `target`.
    """
    from pyspark.sql import functions as F

    products = catalog.select("product_id", "title", "product_type", "description").join(
        product_facets(catalog), on="product_id", how="inner"
    )
    texts = queries.select("query_id", "query", "segment")
    gold = gold_nodes.select("query_id", "product_id", F.col("nodes").alias(GOLD))
    return (
        pairs.join(texts, on="query_id", how="inner")
        .join(products, on="product_id", how="inner")
        .join(gold, on=["query_id", "product_id"], how="left")
        .withColumn(GOLD, F.when(~F.col("is_weak"), F.col(GOLD)))
        .withColumnRenamed("annotator", "label_source")
    )
