"""`relevance datasets`: judged pairs -> train / validation / test TRAINING_EXAMPLES with CoT targets.

Steps (each a pure `DataFrame -> DataFrame` transform in `jobs/training_data/`: `labels` for steps
2-5, `splits` for 6, `targets` for 7; `run` only reads, wires and writes):

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
folder and renamed into place, so a failed run leaves the previous table whole; a run that would
write no example at all fails with EmptyDatasetError naming the top quarantine reasons, and writes
nothing: an empty table never replaces a good one), and under
`<out>/_datasets/`: the quarantine table and `datasets.json` (written last) with counts per split x
segment x label, the judgments' reconciliation (rows in = written + quarantined + other label sets +
weak rows held out), the duplicate and weak-label counts.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import reduce

from jobs import hadoop_fs
from jobs.hadoop_fs import table_uri
from jobs.quarantine import FIELD, REASON, quarantine_frame, record_json
from jobs.spark import empty_frame
from jobs.training_data.labels import (
    GOLD,
    LABELLED_COLUMNS,
    N_JUDGMENTS,
    N_LABELS,
    ORIGIN,
    RECORD,
    SOURCE_FILE,
    WeakRule,
    check_pairs,
    join_examples,
    resolve_duplicates,
    weak_labels,
    weak_pairs,
)
from jobs.training_data.report import summarise, summary_lines
from jobs.training_data.splits import HELD_OUT, SplitFractions, with_splits
from jobs.training_data.targets import PROBLEM, render_targets
from schemas.config import ConfigError, config_date, config_to_dict, help_field
from schemas.graph import DEFAULT_GRAPH, LabelSet, ReasoningGraph
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

log = logging.getLogger(__name__)


class EmptyDatasetError(ValueError):
    """The run would write no example: bad input data, not a dataset to publish."""


@dataclass(frozen=True)
class DatasetsConfig:
    data: str = help_field("Data root with catalog, queries, judgments and (optionally) gold_nodes.")
    out: str = help_field("Data root for training_examples and _datasets/; default: the data root.", "")
    label_set: str = help_field("Label set of the judgments to use (wands, esci or a YAML path).", "wands")
    graph: str = help_field("Reasoning graph (name or YAML path) of the CoT targets.", DEFAULT_GRAPH)
    cot_order: str = help_field("CoT order of the targets: one of the graph's orders (relevance7 and relevance8: label_first, reasoning_first, product_first).", "label_first")
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

    return read_with_provenance(spark, table, table_uri(root, table))


def _in_label_set(name: str):
    from pyspark.sql import functions as F

    return F.col("label_set") == F.lit(name)


def _require_inputs(spark, config: DatasetsConfig) -> None:
    required = [(config.data, table) for table in (CATALOG, QUERIES, JUDGMENTS)]
    required += [(config.weak_from, table) for table in (QUERY_PRODUCT_STATS, CANDIDATE_PAIRS) if config.weak_from]
    missing = [uri for uri in (table_uri(root, table) for root, table in required) if not hadoop_fs.exists(spark, uri)]
    if missing:
        raise FileNotFoundError(f"relevance datasets: input tables not found: {missing}")


def _split_inputs(spark, data: str, now: dt.datetime):
    """(raw judgments, {table name: (accepted, quarantine)}) of the inputs, split by their row rules and keys.

    Each input is used several times, so it is split once and both sides persisted.
    """
    from jobs.validate import split_spark

    has_gold = hadoop_fs.exists(spark, table_uri(data, GOLD_NODES))
    raw_judgments = _read(spark, JUDGMENTS, data)
    validated = {
        table.name: split_spark(table, raw_judgments if table is JUDGMENTS else _read(spark, table, data), now)
        for table in (CATALOG, QUERIES, JUDGMENTS) + ((GOLD_NODES,) if has_gold else ())
    }
    return raw_judgments, {name: (accepted.persist(), quarantine.persist()) for name, (accepted, quarantine) in validated.items()}


def _judged_rows(judgments, label_set: str, source_file: str):
    """Judgments of the label set as labelled rows, with their origin and record for the quarantine."""
    from pyspark.sql import functions as F

    return judgments.where(_in_label_set(label_set)).select(
        *LABELLED_COLUMNS,
        F.lit(JUDGMENTS.name).alias(ORIGIN),
        F.lit(source_file).alias(SOURCE_FILE),
        record_json(*JUDGMENTS.names).alias(RECORD),
    )


def _weak_rows(spark, config: DatasetsConfig, raw_judgments, label_set: LabelSet):
    """(every weak pair with its rule's label, persisted; the labelled rows of the unjudged ones)."""
    from pyspark.sql import functions as F

    stats = _read(spark, QUERY_PRODUCT_STATS, config.weak_from)
    candidates = _read(spark, CANDIDATE_PAIRS, config.weak_from)
    if config.weak_start:
        start = F.col("ds") >= F.lit(dt.date.fromisoformat(config.weak_start))
        stats, candidates = stats.where(start), candidates.where(start)
    if config.weak_end:
        end = F.col("ds") <= F.lit(dt.date.fromisoformat(config.weak_end))
        stats, candidates = stats.where(end), candidates.where(end)
    judged_keys = raw_judgments.where(_in_label_set(label_set.name)).select("query_id", "product_id")
    weak = weak_labels(weak_pairs(stats, candidates), judged_keys, config.weak_rule,
                       label_set.names[0], label_set.names[-1]).persist()
    record = record_json("query_id", "product_id", "query", "label", "annotator", "impressions", "clicks",
                         "orders", "examinations", "ctr")
    rows = weak.where(F.col("label").isNotNull() & ~F.col("judged")).select(
        "query_id", "product_id", "label", F.lit(label_set.name).alias("label_set"), "annotator",
        F.lit(True).alias("is_weak"), F.lit(QUERY_PRODUCT_STATS.name).alias(ORIGIN),
        F.lit(table_uri(config.weak_from, QUERY_PRODUCT_STATS)).alias(SOURCE_FILE),
        record.alias(RECORD),
    )
    return weak, rows


def _examples(pairs, validated: dict, config: DatasetsConfig, graph: ReasoningGraph, labels: list[str]):
    """Checked pairs -> materialised examples with text, gold nodes, split and CoT target (steps 5-7)."""
    from pyspark.sql import functions as F

    catalog, queries = validated[CATALOG.name][0], validated[QUERIES.name][0]
    if GOLD_NODES.name in validated:
        gold_nodes = validated[GOLD_NODES.name][0]
    else:
        gold_nodes = empty_frame(pairs.sparkSession, GOLD_NODES)
    examples = join_examples(pairs, gold_nodes, catalog, queries)
    examples = with_splits(examples, config.fractions, config.salt, config.weak_train_only)
    return materialise(
        render_targets(examples, graph, config.cot_order, labels).withColumn("cot_order", F.lit(config.cot_order))
    )


def _tallies(examples, label_node: str):
    """(example counts grouped by everything datasets.json reports, distinct queries per split x segment)."""
    from pyspark.sql import functions as F

    y_differs = F.coalesce(F.col(PROBLEM).isNull() & (F.col(GOLD)[label_node] != F.col("label")), F.lit(False))
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
    return tally, query_counts


def _gold_nodes_quarantine(examples, source_file: str, now: dt.datetime):
    """QUARANTINE rows of the gold nodes that did not render (their examples are kept without a target)."""
    from pyspark.sql import functions as F

    flagged = examples.select(
        "query_id", "product_id", GOLD, F.lit("nodes").alias(FIELD), F.col(PROBLEM).alias(REASON)
    )
    record = record_json(F.col("query_id"), F.col("product_id"), F.col(GOLD).alias("nodes"))
    return quarantine_frame(flagged, GOLD_NODES.name, now, record, source_file=source_file)


def _union_quarantine(quarantines: list):
    """(every quarantine row of the run, persisted; their counts by (source table, reason))."""
    quarantine = reduce(lambda union, other: union.unionByName(other), quarantines).persist()
    by_reason = Counter(
        {(row["source_table"], row["reason"]): row["count"]
         for row in quarantine.groupBy("source_table", "reason").count().collect()}
    )
    return quarantine, by_reason


def _write(spark, examples, quarantine, out: str) -> dict[str, str]:
    """The quarantine, then the examples table (atomic swap); returns where each went."""
    from pyspark.sql import functions as F

    quarantine_path = table_uri(hadoop_fs.join(out, "_datasets"), QUARANTINE)
    quarantine.coalesce(1).write.mode("overwrite").parquet(quarantine_path)
    written = examples.where(~F.col(HELD_OUT)).select(*TRAINING_EXAMPLES.names)
    examples_path = table_uri(out, TRAINING_EXAMPLES)
    hadoop_fs.replace_folder(
        spark, examples_path,
        lambda staging: written.sortWithinPartitions("split", "query_id", "product_id").write.parquet(staging),
    )
    return {TRAINING_EXAMPLES.name: examples_path, "quarantine": quarantine_path}


def run(config: DatasetsConfig) -> dict:
    """Build the datasets; returns (and writes as datasets.json) the counts and output paths."""
    from pyspark.sql import functions as F

    from jobs.spark import get_spark

    started = time.perf_counter()
    out = config.out or config.data
    label_set = LabelSet.load(config.label_set)
    graph = ReasoningGraph.load(config.graph)
    spark = get_spark("relevance-datasets", master=config.spark_master, conf=config.spark_conf)
    now = dt.datetime.now(dt.UTC)

    # 1. inputs: row rules and unique keys.
    _require_inputs(spark, config)
    raw_judgments, validated = _split_inputs(spark, config.data, now)
    log.info("datasets: inputs read and split by their row rules (%.0f s)", time.perf_counter() - started)
    persisted = [frame for pair in validated.values() for frame in pair]
    quarantines = [quarantine for _, quarantine in validated.values()]

    # 2-4. labelled rows: judgments of the label set, then weak labels; checks, then one row per pair.
    judgments = validated[JUDGMENTS.name][0]
    labelled_rows = _judged_rows(judgments, label_set.name, table_uri(config.data, JUDGMENTS))
    weak_counts = None
    if config.weak_from:
        weak, weak_rows = _weak_rows(spark, config, raw_judgments, label_set)
        persisted.append(weak)
        weak_counts = {(row["annotator"], row["judged"]): row["count"]
                       for row in weak.groupBy("annotator", "judged").count().collect()}
        labelled_rows = labelled_rows.unionByName(weak_rows)
    catalog, queries = validated[CATALOG.name][0], validated[QUERIES.name][0]
    checked = check_pairs(labelled_rows, catalog.select("product_id"), queries.select("query_id"), label_set.names)
    annotated = materialise(resolve_duplicates(checked))
    quarantines.append(quarantine_frame(annotated, F.col(ORIGIN), now, F.col(RECORD), source_file=F.col(SOURCE_FILE)))
    pairs = annotated.where(F.col(REASON).isNull()).drop(FIELD, REASON)

    # 5-7. text, splits, targets; then the counts, which must reconcile.
    examples = _examples(pairs, validated, config, graph, label_set.names)
    tally, query_counts = _tallies(examples, graph.label_node)
    quarantines.append(_gold_nodes_quarantine(examples, table_uri(config.data, GOLD_NODES), now))
    quarantine, by_reason = _union_quarantine(quarantines)
    persisted.append(quarantine)
    judgments_in = raw_judgments.count()
    other_label_sets = judgments.where(~_in_label_set(label_set.name)).count()
    counts = summarise(tally, query_counts, by_reason, judgments_in, other_label_sets, weak_counts)  # reconciles
    log.info("datasets: %d examples with CoT targets, counts reconciled (%.0f s)", counts["written"], time.perf_counter() - started)
    if counts["written"] == 0:
        for frame in persisted:
            frame.unpersist()
        reasons = "; ".join(f"{source}: {reason} ({n} rows)" for (source, reason), n in by_reason.most_common(3))
        raise EmptyDatasetError(
            f"relevance datasets: no example to write from {judgments_in} judgments ({other_label_sets} of other "
            f"label sets; quarantined: {reasons or 'none'}); {table_uri(out, TRAINING_EXAMPLES)} is left as it was"
        )

    # Write: quarantine, then the table (atomic swap), then datasets.json (the run's last word).
    outputs = _write(spark, examples, quarantine, out)
    for frame in persisted:
        frame.unpersist()
    summary = {
        "config": config_to_dict(config),
        **counts,
        "outputs": outputs,
        "seconds": round(time.perf_counter() - started, 2),
    }
    hadoop_fs.write_report(spark, hadoop_fs.join(out, "_datasets", "datasets.json"), json.dumps(summary, indent=2))
    for line in summary_lines(summary):
        log.info(line)
    log.info("written to %s", outputs[TRAINING_EXAMPLES.name])
    return summary
