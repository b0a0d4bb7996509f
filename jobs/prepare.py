"""`relevance prepare --date D`: one day of search logs -> per (query, product) engagement + the pairs to score.

Steps (each a pure `DataFrame -> DataFrame` transform below; `run` only reads, wires and writes):

1. Read the `catalog` and the day's `search_impressions` partition with their declared schemas. The
   catalog is split and certified with its great-expectations suite (`jobs.validate.validate_spark`).
   The impressions: the table's column rules mark each row (`mark_rule_breaks`), the duplicate
   search marks every repeat of a key after the first (`mark_duplicates`), then `check_impressions`
   marks what only this job can see: a
   product missing from the catalog, an engagement event without the step before it (a cart without
   a click, an order without a cart, a quantity that disagrees with `ordered`) and a `ts` after its
   partition day. One aggregate over the marked rows gives the counts by reason, the late rows and
   the measures that certify the rows the table's rules accept with its suite (`jobs.certify`). The
   marked rows are not cached: each pass (duplicate search, that aggregate, the key check, the
   position cells, the quarantine) re-reads only the parquet columns it needs, and on 1M impressions
   building Spark's compressed in-memory cache of every column took 8.5 CPU seconds where a pass over
   the file took 1.3 to 3.3. On a day the counts say quarantines nothing, the position cells read the
   rows as they are (no rule, catalog join or duplicate mark is evaluated again to keep them all) and
   the quarantine has no pass at all.
   Late data (a `ts` before the partition day) is kept and counted in the day it arrived, so
   re-running a day never touches another. Counts reconcile: rows in = accepted + quarantined.
2. `normalise_queries`: NFKC unicode form (ICU4J's, in the JVM: its Unicode version is Spark's, which may be
   newer than Python's `unicodedata` that `normalise_text` uses for the synonyms), lower case, whitespace runs -> one space, trimmed, then
   whole-token synonyms (`PrepareConfig.synonyms`, e.g. couch -> sofa). Computed on the distinct raw
   query strings of the position cells, which `merge_cells` then sums per normalised query.
3. `position_cells` (per raw query, merged after step 2) then `examination_rates`: the probability
   that a result at position p is looked at, relative to position 1, estimated from the same day's logs by chaining adjacent positions over the
   (query, product) pairs shown at both (a matched-pair ratio, so relevance does not masquerade as
   position bias). Under the examination hypothesis P(click | q, d, p) = e_p * a_qd, each pair's
   CTR at p and p-1 estimates e_p * a_qd and e_{p-1} * a_qd, so with weights w_qd that do not depend
   on clicks

       r_p = sum_qd w_qd * ctr_qd(p) / sum_qd w_qd * ctr_qd(p-1),  w_qd = n_qd(p) n_qd(p-1) / (n_qd(p) + n_qd(p-1))

   estimates e_p / e_{p-1} (w is the inverse variance weight of a difference of two CTRs, up to a
   constant). e_1 = 1 and e_p = r_2 * ... * r_p. A position with no such pair, or a sum of zero on
   either side, has r_p = 1 (it inherits the rate above it).
4. `pair_aggregates`: per (normalised query, product): impressions, clicks, add-to-carts, orders,
   GMV (price x quantity of ordered impressions), expected examinations (the sum of e_position over
   the pair's impressions) and the debiased CTR = clicks / expected examinations (clicks over expected
   clicks with a position-1 CTR: the CTR the pair would have at position 1).
5. `content_hashes`: sha256 (hex) of the product's text, the fields joined by U+001F:
   title, description, product_type, brand, attributes; a null field is the empty string; the
   attributes are `key=value` entries sorted by key and joined by `;`. The DuckDB reference in
   tests/jobs/prepare_reference.py computes the same definition, and so does
   `jobs.scoring.pairs_file.product_content_hash` in Python for the pairs files `score` reads.
   `with_content_hashes` joins them to the pair aggregates once, before those are persisted, for both
   output tables (every kept product is in the accepted catalog, so the join keeps every pair).

Outputs (partitioned by `ds`; Spark's dynamic partition overwrite replaces exactly the day written,
and an empty day removes that day's partition): `query_product_stats`, `candidate_pairs`, and under
`<out>/_prepare/ds=D/` the day's quarantine rows and `prepare.json` with the counts and the rates.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass

from jobs import hadoop_fs
from jobs.hadoop_fs import table_uri
from jobs.quarantine import FIELD, REASON, Rule, first_failure
from schemas.config import ConfigError, config_date, help_field
from schemas.tables import CANDIDATE_PAIRS, CATALOG, QUARANTINE, QUERY_PRODUCT_STATS, SEARCH_IMPRESSIONS

log = logging.getLogger(__name__)

HASH_SEPARATOR = "\u001f"
RAW_QUERY = "raw_query"
EXAMINATION_RATE = "examination_rate"


def nfkc(text: str | None) -> str | None:
    """The unicode compatibility form (full-width letters, ligatures, odd spaces become plain ones)."""
    return None if text is None else unicodedata.normalize("NFKC", text)


def normalise_text(text: str) -> str:
    """The query normalisation on one Python string (what `normalise_queries` does, minus synonyms)."""
    return " ".join(nfkc(text).lower().split())


# --- pure transforms ------------------------------------------------------------------------------


def content_hashes(catalog):
    """catalog -> (product_id, product_content_hash)."""
    from pyspark.sql import functions as F

    attributes = F.array_join(
        F.transform(
            F.array_sort(F.map_entries(F.col("attributes"))),
            lambda entry: F.concat(entry["key"], F.lit("="), F.coalesce(entry["value"], F.lit(""))),
        ),
        ";",
    )
    text = F.concat_ws(
        HASH_SEPARATOR,
        F.coalesce(F.col("title"), F.lit("")),
        F.coalesce(F.col("description"), F.lit("")),
        F.coalesce(F.col("product_type"), F.lit("")),
        F.coalesce(F.col("brand"), F.lit("")),
        F.coalesce(attributes, F.lit("")),
    )
    return catalog.select(F.col("product_id"), F.sha2(text, 256).alias("product_content_hash"))


def check_impressions(marked, products, day: dt.date):
    """`marked` (impressions with the table's `_reason` / `_field`, see `jobs.validate.mark_rows`) plus
    the job-level checks on the rows those left unmarked: the first failing check names the row's reason,
    in the order listed in the module docstring.

    `products` has a unique `product_id` column (the accepted catalog).
    """
    from pyspark.sql import functions as F

    known = products.select(F.col("product_id"), F.lit(True).alias("_known"))
    joined = marked.join(F.broadcast(known), on="product_id", how="left")
    rules = [
        Rule(F.col("_known").isNull(), "product_id not in the catalog", "product_id"),
        Rule(F.col("added_to_cart") & ~F.col("clicked"), "added to cart without a click", "added_to_cart"),
        Rule(F.col("ordered") & ~F.col("added_to_cart"), "ordered without an add-to-cart", "ordered"),
        Rule(F.col("ordered") != (F.col("quantity") > 0), "quantity must be > 0 exactly when ordered", "quantity"),
        Rule(F.to_date(F.col("ts")) > F.lit(day), f"ts after the partition day {day.isoformat()}", "ts"),
    ]
    others = [name for name in marked.columns if name not in (REASON, FIELD)]
    return joined.select(*others, *first_failure(rules, after_marked=True))


def normalise_queries(raw_queries, synonyms: dict[str, str]):
    """(raw_query) distinct strings -> (raw_query, query) normalised; see the module docstring."""
    from pyspark.sql import functions as F

    raw = F.col(RAW_QUERY)
    # NFKC in the JVM: ICU4J ships with Spark (its collations), and its static `compose(text, compat=true)` is the
    # NFKC form; a Python UDF would start a Python worker for it.
    nfkc_in_jvm = F.when(raw.isNotNull(), F.reflect(F.lit("com.ibm.icu.text.Normalizer"), F.lit("compose"), raw, F.lit(True)))
    spaced = F.trim(F.regexp_replace(F.lower(nfkc_in_jvm), r"\s+", " "))
    tokens = F.split(spaced, " ")
    if synonyms:
        lookup = F.create_map(*[F.lit(text) for pair in sorted(synonyms.items()) for text in pair])
        tokens = F.transform(tokens, lambda token: F.coalesce(lookup[token], token))
    return raw_queries.select(F.col(RAW_QUERY), F.array_join(tokens, " ").alias("query"))


def position_cells(impressions):
    """Impressions -> one row per (query, query_id, product_id, position) with every sum the outputs need.

    Both the examination rates and the pair aggregates are computed from these cells, so the day's
    impressions are shuffled once. Only counts and sums: a string `min` would turn this hash
    aggregate over every impression into a sort; `merge_cells` takes the min `query_id` of far fewer rows.
    """
    from pyspark.sql import functions as F

    return impressions.groupBy("query", "query_id", "product_id", "position").agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.col("clicked").cast("long")).alias("c"),
        F.sum(F.col("added_to_cart").cast("long")).alias("carts"),
        F.sum(F.col("ordered").cast("long")).alias("orders"),
        F.sum(F.when(F.col("ordered"), F.col("price") * F.col("quantity")).otherwise(F.lit(0.0))).alias("gmv"),
    )


def merge_cells(cells):
    """`position_cells` rows -> one row per (query, product_id, position), its least `query_id` and the sums.

    The cells are built on the raw query strings and merged after normalisation, so the
    normalisation is joined to the cells, not to every impression.
    """
    from pyspark.sql import functions as F

    return cells.groupBy("query", "product_id", "position").agg(
        F.min(F.col("query_id")).alias("query_id"),
        *(F.sum(F.col(name)).alias(name) for name in ("n", "c", "carts", "orders", "gmv")),
    )


def examination_rates(cells):
    """`position_cells` -> (position, examination_rate), e_1 = 1."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    above = cells.select(
        F.col("query"), F.col("product_id"), (F.col("position") + 1).alias("position"),
        F.col("n").alias("n_above"), F.col("c").alias("c_above"),
    )
    weight = F.col("n") * F.col("n_above") / (F.col("n") + F.col("n_above"))
    ratios = (
        cells.join(above, on=["query", "product_id", "position"], how="inner")
        .groupBy("position")
        .agg(
            F.sum(weight * F.col("c") / F.col("n")).alias("num"),
            F.sum(weight * F.col("c_above") / F.col("n_above")).alias("den"),
        )
    )
    defined = (F.col("num") > 0) & (F.col("den") > 0)
    positions = cells.select("position").distinct()
    steps = positions.join(ratios, on="position", how="left").select(
        F.col("position"),
        F.when(defined & (F.col("position") > 1), F.log(F.col("num") / F.col("den"))).otherwise(F.lit(0.0)).alias("log_r"),
    )
    down_to_here = Window.orderBy("position").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    return steps.select(F.col("position"), F.exp(F.sum(F.col("log_r")).over(down_to_here)).alias(EXAMINATION_RATE))


def pair_aggregates(cells, rates):
    """(`position_cells`, rates) -> one row per (query, product_id) with every count the outputs use."""
    from pyspark.sql import functions as F

    examined = cells.join(F.broadcast(rates), on="position", how="inner")
    clicks = F.sum(F.col("c"))
    expected = F.sum(F.col("n") * F.col(EXAMINATION_RATE))
    return examined.groupBy("query", "product_id").agg(
        F.min(F.col("query_id")).alias("query_id"),
        F.sum(F.col("n")).alias("impressions"),
        clicks.alias("clicks"),
        F.sum(F.col("carts")).alias("add_to_carts"),
        F.sum(F.col("orders")).alias("orders"),
        F.sum(F.col("gmv")).alias("gmv"),
        expected.alias("expected_examinations"),
        F.when(expected > 0, clicks / expected).alias("debiased_ctr"),
    )


def with_content_hashes(aggregates, hashes):
    """Pair aggregates + content hashes -> the pair aggregates with `product_content_hash`, what both outputs read."""
    return aggregates.join(hashes, on="product_id", how="inner")


def day_table(hashed, table, day: dt.date):
    """`with_content_hashes` rows -> `table` (QUERY_PRODUCT_STATS or CANDIDATE_PAIRS, both columns of those rows) for `day`."""
    from pyspark.sql import functions as F

    return hashed.withColumn("ds", F.lit(day)).select(*table.names)


def with_normalised_query(frame, normalised):
    """Attach the normalised `query` (replacing the raw one) by a join on the raw string."""
    from pyspark.sql import functions as F

    return frame.withColumnRenamed("query", RAW_QUERY).join(F.broadcast(normalised), on=RAW_QUERY, how="inner")


# --- the job --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareConfig:
    date: str = help_field("The day (YYYY-MM-DD) of search_impressions to prepare.")
    data: str = help_field("Data root holding `search_impressions` (partitioned by ds) and `catalog`.")
    out: str = help_field("Data root for the outputs; default: the data root.", "")
    synonyms: dict[str, str] = help_field("Whole-token query synonyms applied after normalisation (couch: sofa).", {})
    run_suite: bool = help_field("Certify accepted rows with the great-expectations suites (slower).", True)
    spark_master: str | None = help_field("Spark master; default local[*] or spark-submit's.", None)
    spark_conf: dict[str, str] = help_field("Extra Spark conf for this job (key: value).", {})

    def __post_init__(self) -> None:
        config_date(self.date)
        for key, value in self.synonyms.items():
            if key != normalise_text(key) or " " in key:
                raise ConfigError(f"synonyms: key {key!r} must be one normalised token, e.g. {normalise_text(key)!r}")
            if value != normalise_text(value):
                raise ConfigError(f"synonyms: value {value!r} must be normalised, e.g. {normalise_text(value)!r}")

    @property
    def day(self) -> dt.date:
        return config_date(self.date)


def write_day(spark, frame, table, root: str, day: dt.date, rows: int) -> str:
    """Replace `day`'s partition of `table` under `root` with `frame` (exactly the day; none if empty)."""
    path = table_uri(root, table)
    if rows:
        frame.write.mode("overwrite").option("partitionOverwriteMode", "dynamic").partitionBy("ds").parquet(path)
    else:
        hadoop_fs.delete(spark, hadoop_fs.join(path, f"ds={day.isoformat()}"))
    return path


class _Laps:
    """Seconds spent in each named phase since the previous one ended."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self.seconds[phase] = time.perf_counter() - self.started - sum(self.seconds.values())
        log.info("prepare: %s done in %.1f s", phase, self.seconds[phase])


def _checked_day(spark, data: str, day: dt.date, run_suite: bool):
    """(catalog `Validated`, the day's kept impressions, their quarantine rows, counts, late rows kept, counts by reason).

    The catalog is split and certified on its own (`validate_spark`). The day's impressions get the
    table's marks, then the job's (broadcast joins with the repeated keys and the catalog), so one
    aggregate gives every count by reason, the late rows and the suite's measures, and both sides of
    the split are filters of the same marked rows; when that aggregate finds no marked row, every row
    read is kept (the marks only add columns and one row per row: each join's right side is unique).
    """
    from pyspark.sql import functions as F

    from jobs.certify import SparkSuite
    from jobs.spark import empty_frame
    from jobs.validate import (
        ValidationCounts,
        mark_duplicates,
        mark_rule_breaks,
        read_with_provenance,
        split_marked,
        table_reasons,
        validate_spark,
    )

    catalog = validate_spark(CATALOG, read_with_provenance(spark, CATALOG, table_uri(data, CATALOG)), run_suite)
    raw = read_with_provenance(spark, SEARCH_IMPRESSIONS, table_uri(data, SEARCH_IMPRESSIONS), days=[day])
    table_marked, repeated_hashes = mark_duplicates(SEARCH_IMPRESSIONS, mark_rule_breaks(SEARCH_IMPRESSIONS, raw))
    checked = check_impressions(table_marked, catalog.accepted, day)
    table_accepted = F.col(REASON).isNull() | ~F.col(REASON).isin(table_reasons(SEARCH_IMPRESSIONS))
    # no key hash repeated in the day proves the keys of the rows the table's rules accept distinct
    unique_key = SEARCH_IMPRESSIONS.key if repeated_hashes == 0 else None
    suite = SparkSuite(SEARCH_IMPRESSIONS, table_accepted, unique_key=unique_key) if run_suite else None
    is_late = F.col(REASON).isNull() & (F.to_date(F.col("ts")) < F.lit(day))
    tallies = checked.groupBy(REASON).agg(
        F.count(F.lit(1)).alias("_rows"), F.count(F.when(is_late, F.lit(1))).alias("_late"),
        *(suite.aggregates() if suite else []),
    ).collect()
    totals = Counter()
    for row in tallies:
        totals.update({name: value for name, value in row.asDict().items() if name != REASON})
    by_reason = {row[REASON]: row["_rows"] for row in tallies if row[REASON] is not None}
    counts = ValidationCounts(SEARCH_IMPRESSIONS.name, totals["_rows"], totals["_rows"] - sum(by_reason.values()),
                              sum(by_reason.values()))
    result = suite.result(totals, table_marked) if suite else None
    if result is not None and not result.success:
        raise AssertionError(f"accepted rows fail the suite (split and suite disagree):\n{result.summary()}")
    if counts.quarantined:
        kept, quarantine = split_marked(SEARCH_IMPRESSIONS, checked)
    else:  # the counts already say so: no pass marks the day again to keep every row, or to find no rows
        kept, quarantine = raw.select(*SEARCH_IMPRESSIONS.names), empty_frame(spark, QUARANTINE)
    return catalog, kept, quarantine, counts, totals["_late"], by_reason


def _pair_cells(kept, synonyms: dict[str, str], hashes):
    """Persisted (position cells, examination rates, pair aggregates with content hashes) of the kept impressions."""
    from pyspark.sql import functions as F

    raw_cells = persisted_now(position_cells(kept))
    raw_queries = raw_cells.select(F.col("query").alias(RAW_QUERY)).distinct()
    cells = persisted_now(merge_cells(with_normalised_query(raw_cells, normalise_queries(raw_queries, synonyms))))
    rates = examination_rates(cells).persist()
    return [raw_cells, cells, rates, with_content_hashes(pair_aggregates(cells, rates), hashes).persist()]


def persisted_now(frame):
    """`frame` persisted and computed now. A persisted frame that several branches of the next query read is
    otherwise computed by each of them at once (adaptive execution submits the branches' stages together,
    before any has filled the cache): three times over for the cells the examination rates read. A persist,
    not `jobs.datasets.materialise`'s checkpoint: `run` releases these frames when the day is written."""
    frame = frame.persist()
    frame.count()
    return frame


def run(config: PrepareConfig) -> dict:
    """Prepare one day; returns (and writes as prepare.json) the counts, rates and output paths."""
    from jobs.spark import get_spark
    from schemas.expectations import import_in_background

    laps = _Laps(time.perf_counter())
    day = config.day
    out = config.out or config.data
    if config.run_suite:
        import_in_background()
    spark = get_spark("relevance-prepare", master=config.spark_master, conf=config.spark_conf)
    catalog, kept, quarantine, counts, late, by_reason = _checked_day(spark, config.data, day, config.run_suite)
    laps.lap("read_and_validate")
    persisted = _pair_cells(kept, config.synonyms, content_hashes(catalog.accepted))
    rates, aggregates = persisted[-2:]
    rate_rows = sorted((r["position"], r[EXAMINATION_RATE]) for r in rates.collect())
    pairs = aggregates.count()
    laps.lap("normalise_rates_aggregates")
    paths = {
        table.name: write_day(spark, day_table(aggregates, table, day), table, out, day, pairs)
        for table in (QUERY_PRODUCT_STATS, CANDIDATE_PAIRS)
    }
    report_dir = hadoop_fs.join(out, "_prepare", f"ds={day.isoformat()}")
    quarantine.coalesce(1).write.mode("overwrite").parquet(table_uri(report_dir, QUARANTINE))
    laps.lap("write")
    summary = {
        "date": day.isoformat(),
        "catalog": catalog.counts.line(),
        "search_impressions": {
            "rows_in": counts.rows_in, "accepted": counts.accepted, "quarantined": counts.quarantined,
            "late_rows_kept": late, "quarantined_by_reason": dict(sorted(by_reason.items())),
        },
        "pairs": pairs,
        "examination_rates": {str(position): rate for position, rate in rate_rows},
        "outputs": {**paths, "quarantine": table_uri(report_dir, QUARANTINE)},
        "seconds": round(time.perf_counter() - laps.started, 2),
        "seconds_by_phase": {phase: round(seconds, 2) for phase, seconds in laps.seconds.items()},
    }
    hadoop_fs.write_report(spark, hadoop_fs.join(report_dir, "prepare.json"), json.dumps(summary, indent=2))
    for frame in persisted:
        frame.unpersist()
    catalog.release()
    log.info(catalog.counts.line())
    log.info("%s (%d late rows kept)", counts.line(), late)
    log.info("%d (query, product) pairs for %s; written to %s", pairs, day, out)
    return summary
