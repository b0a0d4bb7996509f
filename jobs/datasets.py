"""`relevance datasets`: judged pairs -> train / validation / test TRAINING_EXAMPLES with CoT targets.

Steps (each a pure `DataFrame -> DataFrame` transform below; `run` only reads, wires and writes):

1. Inputs, read with their declared schemas: `catalog`, `queries`, `judgments` and (when present)
   `gold_nodes` under `data`. Each goes through its table's row rules and key check
   (`jobs.validate.split_spark`): bad rows and every repeat of a key after the first go to quarantine,
   so the joins below can never multiply rows.
2. Judgments of the configured `label_set` only (rows of another label set are counted, not used).
   `check_pairs` quarantines, first failing reason wins: a label outside the label set, a query_id
   not in `queries`, a product_id not in `catalog`.
3. Duplicate judgments of a pair (`resolve_duplicates`): one row per (query_id, product_id) is kept,
   chosen by (a) priority: annotator `gold` > any other non-weak annotator > weak; (b) within the
   best priority present, the majority label; (c) ties: the smallest annotator id. The other rows go
   to quarantine ("superseded ..."), nothing vanishes; the counts of pairs with several judgments,
   superseded rows and pairs whose judgments disagree are reported.
4. Weak labels (optional, `weak_from`): engagement from `query_product_stats` (written by `relevance
   prepare`, keyed by the normalised query) over all its days or `weak_start..weak_end`. A normalised
   query gets the query_id prepare chose for it (`candidate_pairs.query_id`, the smallest over the days
   read), then counts are summed per (query_id, product_id) and the debiased CTR pooled:
   CTR = clicks / expected examinations. `weak_labels` applies the rule, only to pairs with no row
   in the judgments table for the label set (even a quarantined one: someone judged the pair):
       examinations >= min_examinations and (CTR >= top_ctr or orders >= top_orders > 0) -> the top
           label of the set (`label_source = 'weak:engaged'`)
       else examinations >= min_examinations and clicks == 0 -> the lowest label ('weak:ignored')
       else no label.
   Expected examinations, not impressions, measure "enough": ten impressions at a position nobody
   looks at say nothing about relevance. Weak rows have `is_weak = true` and null nodes / target,
   pass the same checks as judgments (quarantined when their query or product is unknown) and are
   counted on their own lines. Weak rows from the judgments table itself (`is_weak = true`) are weak
   rows too. Known limit: only the query_id prepare chose is known here, so a pair judged under
   another query_id with the same normalised text still gets a weak row (under the chosen id).
5. `join_examples`: text from `catalog` and `queries` (the query as typed, its segment), gold nodes by
   (query_id, product_id) for non-weak rows. `facets` = the product's attributes plus `brand` when
   the brand is set (non-empty) and not already an attribute: what gold `pa` describes, the
   definition of training/prompt.py `product_facets`.
6. `assign_splits`, per query, stratified by segment (a null segment is its own stratum). Within a
   stratum, queries are ordered by h(q) = sha256 hex of `salt + ":" + query_id` (ties by query_id),
   and the first round(n * train) go to train, up to round(n * (train + validation)) to validation,
   the rest to test; round is half-up on shares rounded to millionths, in integer arithmetic, so
   every engine computes the same cuts. Each stratum's shares are exact up to rounding (|count -
   n * share| <= 1/2 for train and for train + validation) and a query is in exactly one split.
   Why rank cuts and not a hash threshold (`h(q) < 0.8 -> train`): a threshold never moves a query
   when others arrive, but stratifies only in expectation; small strata (the head is a few dozen
   queries carrying half the traffic) would often get no validation or test query at all, and an
   evaluation without head queries misreports what customers see. The price is bounded: the order of
   queries inside a stratum never changes, so when one query joins a stratum, at most one existing
   query crosses each of the two cuts, into the adjacent split; other strata do not move at all.
   A dataset rebuilt after m new queries joined a stratum moves at most 2m of its old queries.
   With `weak_train_only` (default) the queries split are those with at least one non-weak row; a
   query with only weak rows goes to train, and weak rows of a query that lands in validation or
   test are held out (counted, not written): evaluation stays on judged labels only. Without it,
   every query is split alike, weak rows included.
7. `render_targets`: `target = training.cot.render_cot(nodes, graph, cot_order)` (a vectorised pandas
   UDF, the only Python per row). The target's `y` is the gold nodes' own `y`, so the CoT is
   self-consistent (ms/ma imply y); `label` stays the judged label. Judged labels can differ from gold
   y (annotator noise on the synthetic world): their number is reported. `nodes` is kept to the
   graph's nodes; gold nodes that cannot render (a node missing, a value invalid for its node, a `y`
   outside the label set) are quarantined as `gold_nodes` rows, and the example is kept with null
   nodes and target.

Execution: the inputs are split once and persisted; the checked labelled rows and the rendered
examples are materialised (`materialise`: a checkpoint, reliable when the session has a checkpoint
folder, else local), so the counts, the quarantine and the write re-plan only what follows them
instead of the whole lineage. The only Python per row is the rendering UDF (vectorised, per batch).

Outputs: `<out>/training_examples` (TRAINING_EXAMPLES, unpartitioned, written into a hidden sibling
folder and renamed into place, so a failed run leaves the previous table whole), and under
`<out>/_datasets/`: the quarantine table and `datasets.json` (written last) with counts per split x
segment x label, the judgments' reconciliation (rows in = written + quarantined + other label sets +
weak rows held out), the duplicate and weak-label counts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from schemas.config import ConfigError, config_date, config_to_dict, help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import table_path
from schemas.tables import (
    CANDIDATE_PAIRS,
    CATALOG,
    GOLD_NODES,
    JUDGMENTS,
    QUARANTINE,
    QUERIES,
    QUERY_PRODUCT_STATS,
    TRAINING_EXAMPLES,
)
from training.cot import parse_cot, render_cot

SPLITS = ("train", "validation", "test")
SHARE_UNIT = 1_000_000  # split shares are rounded to millionths and cut in integer arithmetic
GOLD_ANNOTATOR = "gold"
WEAK_ENGAGED = "weak:engaged"
WEAK_IGNORED = "weak:ignored"
SUPERSEDED = (
    "superseded by another judgment of the pair (gold > human > weak, then majority label, then smallest annotator)"
)
NULL_SEGMENT = "null"  # the JSON key of the null-segment stratum
LABELLED_COLUMNS = ("query_id", "product_id", "label", "label_set", "annotator", "is_weak")
# Working columns (never written).
ORIGIN = "_origin"
RECORD = "_record"
SOURCE_FILE = "_source_file"
GOLD = "_gold_nodes"
PROBLEM = "_nodes_problem"
HELD_OUT = "_held_out"
N_JUDGMENTS = "_n_judgments"
N_LABELS = "_n_labels"


# --- pure transforms ------------------------------------------------------------------------------


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
    checks = [
        ("label", ~F.col("label").isin(list(labels)), f"label not in the label set {list(labels)}"),
        ("query_id", F.col("_query_known").isNull(), "query_id not in the queries table"),
        ("product_id", F.col("_product_known").isNull(), "product_id not in the catalog"),
    ]
    reason = F.lit(None).cast("string")
    field = F.lit(None).cast("string")
    for name, failed, message in reversed(checks):
        reason = F.when(failed, F.lit(message)).otherwise(reason)
        field = F.when(failed, F.lit(name)).otherwise(field)
    return joined.select(*pairs.columns, field.alias("_field"), reason.alias("_reason"))


def resolve_duplicates(checked):
    """Among rows `check_pairs` accepted, keep one judgment per (query_id, product_id); mark the rest.

    The kept row is chosen as the module docstring says (priority, majority label, smallest
    annotator); the others get `_reason` = SUPERSEDED. Adds `_n_judgments` (accepted rows of the pair)
    and `_n_labels` (distinct labels among them).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    fine = F.col("_reason").isNull()
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
        *[name for name in checked.columns if name not in ("_field", "_reason")],
        F.when(superseded, F.lit("annotator")).otherwise(F.col("_field")).alias("_field"),
        F.when(superseded, F.lit(SUPERSEDED)).otherwise(F.col("_reason")).alias("_reason"),
        F.when(fine, F.col(N_JUDGMENTS)).alias(N_JUDGMENTS),
        F.when(fine, F.col(N_LABELS)).alias(N_LABELS),
    )


def quarantine_rows(rejected, quarantined_at: dt.datetime):
    """Rows with `_origin` (source table), `_source_file`, `_field`, `_reason`, `_record` (row JSON) -> QUARANTINE."""
    from pyspark.sql import functions as F

    return rejected.select(
        F.col(ORIGIN).alias("source_table"),
        F.col(SOURCE_FILE).alias("source_file"),
        F.lit(None).cast("bigint").alias("row_number"),
        F.col("_field").alias("field"),
        F.col("_reason").alias("reason"),
        F.col(RECORD).alias("record"),
        F.lit(quarantined_at).cast("timestamp").alias("quarantined_at"),
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
    """Thresholds of the engagement rule (module docstring, step 4)."""

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
    """(query_id, segment) unique per query_id -> (query_id, segment, split), module docstring step 6."""
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


def _render_batch(nodes: pd.Series, graph: ReasoningGraph, order: str, labels: Sequence[str]) -> pd.DataFrame:
    """One Arrow batch of gold-node maps (dicts or None) -> (target, problem)."""
    targets, problems = [], []
    for values in nodes:
        target = problem = None
        if values is not None:
            try:
                text = render_cot(values, graph, order)
            except ValueError as error:
                problem = str(error)
            else:
                parsed = parse_cot(text, graph, order, labels)
                if parsed.well_formed:
                    target = text
                else:
                    problem = "; ".join(parsed.problems)
        targets.append(target)
        problems.append(problem)
    return pd.DataFrame({"target": targets, "problem": problems})


def render_targets(examples, graph: ReasoningGraph, order: str, labels: Sequence[str]):
    """`_gold_nodes` -> `nodes` (the graph's nodes), `target` (render_cot) and `_nodes_problem`.

    Gold nodes that do not render, or whose text does not parse back strictly (a value invalid for
    its node, a label outside `labels`), give null `nodes` / `target` and the reason in
    `_nodes_problem`.
    """
    from pyspark.sql import functions as F

    def render(nodes: pd.Series) -> pd.DataFrame:
        return _render_batch(nodes, graph, order, list(labels))

    rendered = F.pandas_udf(render, "struct<target:string,problem:string>")(F.col(GOLD))
    names = F.array(*[F.lit(name) for name in graph.node_names])
    kept_nodes = F.map_filter(F.col(GOLD), lambda key, _: F.array_contains(names, key))
    return (
        examples.withColumn("_rendered", rendered)
        .withColumn(PROBLEM, F.col("_rendered.problem"))
        .withColumn("target", F.col("_rendered.target"))
        .withColumn("nodes", F.when(F.col(PROBLEM).isNull(), kept_nodes))
        .drop("_rendered")
    )


# --- the job --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetsConfig:
    data: str = help_field("Data root with catalog, queries, judgments and (optionally) gold_nodes.")
    out: str = help_field("Data root for training_examples and _datasets/; default: the data root.", "")
    label_set: str = help_field("Label set of the judgments to use (wands, esci or a YAML path).", "wands")
    graph: str = help_field("Reasoning graph (name or YAML path) of the CoT targets.", "relevance7")
    cot_order: str = help_field("CoT order of the targets: label_first or reasoning_first.", "label_first")
    fractions: SplitFractions = help_field("Shares of each segment's queries per split.", SplitFractions())
    salt: str = help_field(
        "Salt of the per-query split hash; change it to draw other splits.", "relevance-datasets-v1"
    )
    weak_from: str = help_field(
        "Data root of `relevance prepare` output (query_product_stats, candidate_pairs); empty: no weak labels.", ""
    )
    weak_start: str = help_field("First day (YYYY-MM-DD) of engagement to read; empty: from the first partition.", "")
    weak_end: str = help_field("Last day (YYYY-MM-DD) of engagement to read; empty: to the last partition.", "")
    weak_rule: WeakRule = help_field("Thresholds of the weak-label rule.", WeakRule())
    weak_train_only: bool = help_field("Keep weak labels out of validation and test (held out and counted).", True)
    spark_master: str | None = help_field("Spark master; default local[*] or spark-submit's.", None)
    spark_conf: dict[str, str] = help_field("Extra Spark conf for this job (key: value).", {})

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: give the data root holding catalog, queries and judgments")
        try:
            label_set = LabelSet.load(self.label_set)
            graph = ReasoningGraph.load(self.graph)
            graph.order(self.cot_order)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"label_set/graph/cot_order: {error}") from None
        for column, value in (("label_set", label_set.name), ("cot_order", self.cot_order)):
            allowed = TRAINING_EXAMPLES.column(column).allowed
            if value not in allowed:
                raise ConfigError(f"{column}: training_examples accepts {list(allowed)}, got {value!r}")
        if not self.salt:
            raise ConfigError("salt: must not be empty (any fixed string, e.g. relevance-datasets-v1)")
        for name in ("weak_start", "weak_end"):
            value = getattr(self, name)
            if value:
                if not self.weak_from:
                    raise ConfigError(f"{name}: only meaningful with weak_from (the prepare output root)")
                config_date(value, name)
        if self.weak_start and self.weak_end and self.weak_start > self.weak_end:
            raise ConfigError(f"weak_start {self.weak_start} is after weak_end {self.weak_end}")


def _hadoop_fs(spark, path: str):
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    return hadoop_path, hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def path_exists(spark, path: str) -> bool:
    hadoop_path, fs = _hadoop_fs(spark, path)
    return bool(fs.exists(hadoop_path))


def replace_folder(spark, final: str, write: Callable[[str], None]) -> None:
    """Call `write(staging)` on a hidden sibling of `final`, then swap it in (Hadoop FS renames).

    If `write` fails, `final` is untouched and the staging folder removed.
    """
    target, fs = _hadoop_fs(spark, final)
    jvm = spark.sparkContext._jvm
    parent, name, tag = target.getParent(), target.getName(), uuid.uuid4().hex[:8]
    staging = jvm.org.apache.hadoop.fs.Path(parent, f".staging-{name}-{tag}")
    fs.mkdirs(parent)
    try:
        write(staging.toString())
        if fs.exists(target):
            retired = jvm.org.apache.hadoop.fs.Path(parent, f".retired-{name}-{tag}")
            if not fs.rename(target, retired):
                raise OSError(f"could not move {final} aside to {retired.toString()}")
            if not fs.rename(staging, target):
                fs.rename(retired, target)
                raise OSError(f"could not rename {staging.toString()} to {final}")
            fs.delete(retired, True)
        elif not fs.rename(staging, target):
            raise OSError(f"could not rename {staging.toString()} to {final}")
    finally:
        if fs.exists(staging):
            fs.delete(staging, True)


def materialise(frame):
    """Compute `frame` once and cut its lineage (every later action re-plans only what follows).

    A reliable checkpoint when the session has a checkpoint folder (`spark.checkpoint.dir`; set
    `spark.cleaner.referenceTracking.cleanCheckpoints` to remove the files), else a local one
    (executor storage: fast, lost with its executor).
    """
    if frame.sparkSession.sparkContext.getCheckpointDir() is not None:
        return frame.checkpoint(eager=True)
    return frame.localCheckpoint(eager=True)


def _read(spark, table, root: str):
    from jobs.validate import read_with_provenance

    return read_with_provenance(spark, table, str(table_path(root, table)))


def _segment_key(segment: str | None) -> str:
    return NULL_SEGMENT if segment is None else segment


def _nested(counter: Counter) -> dict:
    """{(a, b, c): n} -> {a: {b: {c: n}}}, keys sorted."""
    result: dict = {}
    for keys, count in sorted(counter.items()):
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = count
    return result


def run(config: DatasetsConfig) -> dict:
    """Build the datasets; returns (and writes as datasets.json) the counts and output paths."""
    from pyspark.sql import functions as F

    from jobs.spark import get_spark
    from jobs.validate import split_spark

    started = time.perf_counter()
    out = config.out or config.data
    label_set = LabelSet.load(config.label_set)
    graph = ReasoningGraph.load(config.graph)
    spark = get_spark("relevance-datasets", master=config.spark_master, conf=config.spark_conf)
    now = dt.datetime.now(dt.UTC)
    judgments_path = str(table_path(config.data, JUDGMENTS))

    # 1. inputs: row rules and unique keys; each input is used several times, so it is split once.
    required = [(config.data, table) for table in (CATALOG, QUERIES, JUDGMENTS)]
    required += [(config.weak_from, table) for table in (QUERY_PRODUCT_STATS, CANDIDATE_PAIRS) if config.weak_from]
    missing = [path for path in (str(table_path(root, table)) for root, table in required)
               if not path_exists(spark, path)]
    if missing:
        raise FileNotFoundError(f"relevance datasets: input tables not found: {missing}")
    has_gold = path_exists(spark, str(table_path(config.data, GOLD_NODES)))
    raw_judgments = _read(spark, JUDGMENTS, config.data)
    validated = {
        table.name: split_spark(table, raw_judgments if table is JUDGMENTS else _read(spark, table, config.data), now)
        for table in (CATALOG, QUERIES, JUDGMENTS) + ((GOLD_NODES,) if has_gold else ())
    }
    validated = {name: (accepted.persist(), quarantine.persist()) for name, (accepted, quarantine) in validated.items()}
    persisted = [frame for pair in validated.values() for frame in pair]
    catalog, queries = validated[CATALOG.name][0], validated[QUERIES.name][0]
    gold_nodes = validated[GOLD_NODES.name][0] if has_gold else spark.createDataFrame([], GOLD_NODES.spark_schema())
    quarantines = [quarantine for _, quarantine in validated.values()]

    # 2-4. labelled rows: judgments of the label set, then weak labels; checks, then one row per pair.
    in_set = F.col("label_set") == F.lit(label_set.name)
    judgments = validated[JUDGMENTS.name][0]
    labelled_rows = judgments.where(in_set).select(
        *LABELLED_COLUMNS,
        F.lit(JUDGMENTS.name).alias(ORIGIN),
        F.lit(judgments_path).alias(SOURCE_FILE),
        F.to_json(F.struct(*JUDGMENTS.names), {"ignoreNullFields": "false"}).alias(RECORD),
    )
    weak_counts = None
    if config.weak_from:
        stats_path = str(table_path(config.weak_from, QUERY_PRODUCT_STATS))
        stats = _read(spark, QUERY_PRODUCT_STATS, config.weak_from)
        candidates = _read(spark, CANDIDATE_PAIRS, config.weak_from)
        if config.weak_start:
            start = F.col("ds") >= F.lit(dt.date.fromisoformat(config.weak_start))
            stats, candidates = stats.where(start), candidates.where(start)
        if config.weak_end:
            end = F.col("ds") <= F.lit(dt.date.fromisoformat(config.weak_end))
            stats, candidates = stats.where(end), candidates.where(end)
        judged_keys = raw_judgments.where(in_set).select("query_id", "product_id")
        weak = weak_labels(weak_pairs(stats, candidates), judged_keys, config.weak_rule,
                           label_set.names[0], label_set.names[-1]).persist()
        persisted.append(weak)
        weak_counts = {(row["annotator"], row["judged"]): row["count"]
                       for row in weak.groupBy("annotator", "judged").count().collect()}
        weak_record = F.struct("query_id", "product_id", "query", "label", "annotator", "impressions", "clicks",
                               "orders", "examinations", "ctr")
        labelled_rows = labelled_rows.unionByName(
            weak.where(F.col("label").isNotNull() & ~F.col("judged")).select(
                "query_id", "product_id", "label", F.lit(label_set.name).alias("label_set"), "annotator",
                F.lit(True).alias("is_weak"), F.lit(QUERY_PRODUCT_STATS.name).alias(ORIGIN),
                F.lit(stats_path).alias(SOURCE_FILE),
                F.to_json(weak_record, {"ignoreNullFields": "false"}).alias(RECORD),
            )
        )
    checked = check_pairs(labelled_rows, catalog.select("product_id"), queries.select("query_id"), label_set.names)
    annotated = materialise(resolve_duplicates(checked))
    quarantines.append(quarantine_rows(annotated.where(F.col("_reason").isNotNull()), now))
    pairs = annotated.where(F.col("_reason").isNull()).drop("_field", "_reason")

    # 5-7. text, splits, targets.
    examples = join_examples(pairs, gold_nodes, catalog, queries)
    examples = with_splits(examples, config.fractions, config.salt, config.weak_train_only)
    examples = materialise(
        render_targets(examples, graph, config.cot_order, label_set.names)
        .withColumn("cot_order", F.lit(config.cot_order))
    )
    y_differs = F.coalesce(F.col(PROBLEM).isNull() & (F.col(GOLD)[graph.label_node] != F.col("label")), F.lit(False))
    tally = examples.groupBy(
        "split", "segment", "label", "is_weak", F.when(F.col("is_weak"), F.col("label_source")).alias("weak_source"),
        HELD_OUT, ORIGIN,
        F.col("target").isNotNull().alias("has_target"), F.col(GOLD).isNotNull().alias("has_gold"),
        y_differs.alias("y_differs"),
        (F.col(N_JUDGMENTS) > 1).alias("several"),
        (F.col(N_LABELS) > 1).alias("disagree"),
    ).count().collect()
    query_counts = examples.where(~F.col(HELD_OUT)).groupBy("split", "segment").agg(
        F.countDistinct(F.col("query_id")).alias("queries"),
        F.countDistinct(F.when(~F.col("is_weak"), F.col("query_id"))).alias("judged_queries"),
    ).collect()
    bad_nodes = examples.where(F.col(PROBLEM).isNotNull()).select(
        F.lit(GOLD_NODES.name).alias(ORIGIN),
        F.lit(str(table_path(config.data, GOLD_NODES))).alias(SOURCE_FILE),
        F.lit("nodes").alias("_field"),
        F.col(PROBLEM).alias("_reason"),
        F.to_json(F.struct(F.col("query_id"), F.col("product_id"), F.col(GOLD).alias("nodes"))).alias(RECORD),
    )
    quarantines.append(quarantine_rows(bad_nodes, now))
    quarantine = quarantines[0]
    for other in quarantines[1:]:
        quarantine = quarantine.unionByName(other)
    quarantine = quarantine.persist()
    persisted.append(quarantine)
    by_reason = Counter(
        {(row["source_table"], row["reason"]): row["count"]
         for row in quarantine.groupBy("source_table", "reason").count().collect()}
    )
    judgments_in = raw_judgments.count()
    other_label_sets = judgments.where(~in_set).count()
    counts = summarise(tally, query_counts, by_reason, judgments_in, other_label_sets, weak_counts)  # reconciles

    # Write: quarantine, then the table (atomic swap), then datasets.json (the run's last word).
    report_dir = f"{out}/_datasets"
    quarantine_path = str(table_path(report_dir, QUARANTINE))
    quarantine.coalesce(1).write.mode("overwrite").parquet(quarantine_path)
    written = examples.where(~F.col(HELD_OUT)).select(*TRAINING_EXAMPLES.names)
    examples_path = str(table_path(out, TRAINING_EXAMPLES))
    replace_folder(
        spark, examples_path,
        lambda staging: written.sortWithinPartitions("split", "query_id", "product_id").write.parquet(staging),
    )
    for frame in persisted:
        frame.unpersist()

    summary = {
        "config": config_to_dict(config),
        **counts,
        "outputs": {TRAINING_EXAMPLES.name: examples_path, "quarantine": quarantine_path},
        "seconds": round(time.perf_counter() - started, 2),
    }
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / "datasets.json").write_text(json.dumps(summary, indent=2))
    for line in summary_lines(summary):
        print(line)
    print(f"written to {examples_path}")
    return summary


def summarise(tally, query_counts, by_reason: Counter, judgments_in: int, other_label_sets: int,
              weak_counts: dict | None) -> dict:
    """The counts of datasets.json from the tally rows; raises when the judgments do not reconcile."""
    examples, weak_examples, queries, weak_only_queries = Counter(), Counter(), Counter(), Counter()
    totals = Counter()
    for row in tally:
        n, segment = row["count"], _segment_key(row["segment"])
        from_judgments = row[ORIGIN] == JUDGMENTS.name
        if row[HELD_OUT]:
            totals["weak_held_out_" + ("judgments" if from_judgments else "stats")] += n
            continue
        if row["is_weak"]:
            weak_examples[(row["split"], segment, row["weak_source"], row["label"])] += n
        else:
            examples[(row["split"], segment, row["label"])] += n
        totals["written"] += n
        totals["written_from_judgments"] += n * from_judgments
        totals["written_from_stats"] += n * (not from_judgments)
        totals["with_target"] += n * row["has_target"]
        totals["judged_without_gold_nodes"] += n * (not row["is_weak"] and not row["has_gold"])
        totals["gold_nodes_invalid"] += n * (row["has_gold"] and not row["has_target"])
        totals["label_differs_from_gold_y"] += n * row["y_differs"]
        totals["pairs_judged_several_times"] += n * row["several"]
        totals["pairs_with_disagreeing_judgments"] += n * row["disagree"]
    for row in query_counts:
        segment = _segment_key(row["segment"])
        queries[(segment, row["split"])] += row["judged_queries"]
        if row["queries"] > row["judged_queries"]:
            weak_only_queries[(segment, row["split"])] += row["queries"] - row["judged_queries"]
    quarantined = Counter()
    for (source, _), count in by_reason.items():
        quarantined[source] += count
    superseded = by_reason[(JUDGMENTS.name, SUPERSEDED)]
    judgments = {
        "rows_in": judgments_in,
        "written": totals["written_from_judgments"],
        "quarantined": quarantined[JUDGMENTS.name],
        "other_label_sets": other_label_sets,
        "weak_held_out": totals["weak_held_out_judgments"],
        "duplicates": {
            "pairs_judged_several_times": totals["pairs_judged_several_times"],
            "rows_superseded": superseded,
            "pairs_with_disagreeing_judgments": totals["pairs_with_disagreeing_judgments"],
        },
    }
    if judgments_in != sum(judgments[key] for key in ("written", "quarantined", "other_label_sets", "weak_held_out")):
        raise AssertionError(f"judgments do not reconcile: {judgments}")
    weak = None
    if weak_counts is not None:
        labelled = {rule: sum(n for (a, judged), n in weak_counts.items() if a == rule and not judged)
                    for rule in (WEAK_ENGAGED, WEAK_IGNORED)}
        weak = {
            "pairs": sum(weak_counts.values()),
            "judged_pairs_skipped": sum(n for (_, judged), n in weak_counts.items() if judged),
            "no_rule_fired": sum(n for (a, judged), n in weak_counts.items() if a is None and not judged),
            "labelled": labelled,
            "written": totals["written_from_stats"],
            "held_out": totals["weak_held_out_stats"],
            "quarantined": quarantined[QUERY_PRODUCT_STATS.name],
        }
        if sum(labelled.values()) != weak["written"] + weak["held_out"] + weak["quarantined"]:
            raise AssertionError(f"weak labels do not reconcile: {weak}")
    return {
        "examples": _nested(examples),
        "weak_examples": _nested(weak_examples),
        "queries": _nested(queries),
        "weak_only_queries": _nested(weak_only_queries),
        "judgments": judgments,
        "weak": weak,
        "targets": {
            "with_target": totals["with_target"],
            "judged_without_gold_nodes": totals["judged_without_gold_nodes"],
            "gold_nodes_invalid": totals["gold_nodes_invalid"],
            "label_differs_from_gold_y": totals["label_differs_from_gold_y"],
        },
        "written": totals["written"],
        "quarantined": {
            source: {reason: n for (s, reason), n in sorted(by_reason.items()) if s == source}
            for source in sorted(quarantined)
        },
    }


def summary_lines(summary: dict) -> list[str]:
    """A few lines for the console."""
    j = summary["judgments"]
    lines = [
        (
            f"judgments: {j['rows_in']} in = {j['written']} written + {j['quarantined']} quarantined + "
            f"{j['other_label_sets']} of other label sets + {j['weak_held_out']} weak held out; "
            f"{j['duplicates']['rows_superseded']} duplicates superseded"
        ),
    ]
    for segment, splits in summary["queries"].items():
        lines.append(f"queries {segment}: " + ", ".join(f"{split} {n}" for split, n in splits.items()))
    t = summary["targets"]
    lines.append(f"targets: {t['with_target']} rendered, {t['gold_nodes_invalid']} invalid gold nodes, "
                 f"{t['label_differs_from_gold_y']} judged labels differ from gold y")
    if summary["weak"] is not None:
        w = summary["weak"]
        lines.append(f"weak: {sum(w['labelled'].values())} labelled = {w['written']} written + "
                     f"{w['held_out']} held out "
                     f"+ {w['quarantined']} quarantined ({w['judged_pairs_skipped']} judged pairs skipped)")
    return lines
