"""`relevance export --date D`: validate one night's relevance table, publish it atomically, report churn.

The steps live in `jobs/publishing/`: `validation` (step 2), `churn` (step 3), `publish` (step 4);
`run` reads, wires them and prints.

1. Read `relevance/ds=D` under the data root with the declared schema, rows sorted by the key, so
   the same input publishes the same parquet and CSV bytes.
2. Validate with great-expectations before anything is written. One suite: the RELEVANCE suite
   compiled from the declaration (`schemas.expectations`: columns, nullability, allowed values,
   bounds, key uniqueness), a non-empty partition, and expectations on columns derived per row in
   DuckDB (`DERIVED_CHECKS`): label_probs sum to 1 within `max_prob_sum_error` and are
   probabilities; label_probs holds exactly the labels of the row's label set, each once (a repeated
   map key counts as wrong); `label` is a label of `label_set` and has the largest probability (ties
   allowed: the scorer breaks them in label-set order); expected_gain = sum of probability x gain
   (within `RECOMPUTE_TOLERANCE`: both come from the same floats); one model_version per
   model_name (two versions of one model in a night mean a half-finished rollout). Labels and gains
   come from each row's `label_set` column, which the scorer wrote with the label set it used, so
   a night holding two models on different label sets validates; `label_set` in the config pins the
   one every row must use. A failure raises `ExportValidationError` naming the partition, each failed
   expectation with its field and a few offending rows; nothing is written then.
3. Churn against the previous night: the newest partition published under the same `out` with
   ds < D (none: the report says it is the first night). Pairs are matched on (model_name, query,
   product_id): a night may hold several models (a policy and its student) and each is compared
   with itself. For each model: label transitions (previous -> current), the share of pairs whose
   label changed by previous label and by query segment (QUERIES.segment joined on query_id,
   'unknown' where the query or its segment is not known), pairs added and removed, mean and p95
   (linear interpolation) of |delta expected_gain|, and whether the model version changed. Joins
   and aggregates run in DuckDB; Python only sees the aggregates.
4. Publish `<out>/relevance/ds=D/` through `schemas.storage.replace_folder`: every file is written
   into a hidden staging folder that is then renamed into place, so a reader sees the previous
   export of D or the new one, never part of one (while a re-export swaps folders, for the instant
   between two renames, no folder), and re-exporting D replaces it whole. After the
   rename, `<out>/relevance/_LATEST` is rewritten (`schemas.storage.replace_file`) with the newest published
   ds, so a backfill of an older day never moves it backwards. Before step 1, hidden copies of the
   day's folder left by a killed export are cleaned up (`schemas.storage.clear_stale_staging`,
   under the day's lock; a copy retired mid-swap is restored when the day's folder is missing).

Files of a published partition:
- `relevance.parquet`: the RELEVANCE schema, `ds` included (a reader of one file has it); engine=spark: a folder
  of part files (`pyarrow.parquet.read_table` and Spark read it as one table).
- `relevance.duckdb`: a DuckDB database with one table `relevance` holding the same rows (engine=spark: a view
  `relevance` over the published parquet folder).
- `relevance.csv` (opt-in with engine=spark: `csv=true`): UTF-8, header row, comma separated, RFC 4180 quoting (cells may hold newlines);
  an empty cell is null, `""` the empty string; `label_probs` and `node_decisions` are JSON objects;
  `scored_at` is ISO 8601 UTC (`2024-05-02T03:04:05.123456Z`); `ds` is YYYY-MM-DD.
- `validation.html`: every expectation of the suite, what it expected and checks, met or not, the
  observed value and the unexpected rows.
- `churn.json`, `churn.md`, `churn.html` and `churn.png` (row-normalised transition heatmaps, counts
  written in the cells; absent on a first night); each model named by model_name and model_version.
- `manifest.json`, written last: schema name and version, ds, rows per data file (read back from
  each written file), sha256 and size of every file but itself, models with versions, label sets,
  rows and label counts, the validation summary, the churn headline and `exported_at`.

The published root is not a `schemas.storage` data root (each day holds several formats): read a day
with `pyarrow.parquet.read_table(".../ds=D/relevance.parquet")` or all days with DuckDB's
`read_parquet('<out>/relevance/ds=*/relevance.parquet')`. The newest day is
`jobs.publishing.publish.read_published(<out>/relevance)`: the day `_LATEST` names, or the newest
complete one when that folder is missing (mid re-export).

Scale: with `engine=local` the night is one Arrow table in this process and the suite runs on its pandas
frame (a 200k-row night exports in about 5 s on 2 cores, churn included); derived columns, churn joins
and file writes run in DuckDB. Nights of millions of rows take `engine=spark` (the nightly job's engine):
the partition is read by Spark with the declared schema (each file's own schema checked first), the
declared suite (columns, nullability, allowed values, bounds, key uniqueness, a non-empty table) runs as
great-expectations on the Spark frame, the derived checks as one aggregate pass of Spark expressions
(`validation.validate_relevance_spark`: GE would scan the frame once per expectation), the churn joins
as Spark SQL against the previous published night (`churn.churn_report_spark`), and the executors write
`relevance.parquet` as a folder of part files (each listed in the manifest). `relevance.duckdb` is then a
database whose view `relevance` reads that parquet at its published path (no second copy), and the CSV
is opt-in (`csv=true`, written by DuckDB from the parquet). The driver sees label sets, counts and the
churn aggregates, never the rows.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from jobs.lock import date_lock
from jobs.publishing.churn import churn_lines, churn_report, churn_report_spark, query_segments
from jobs.publishing.publish import (
    LATEST_FILE,
    PARQUET_FILE,
    label_counts,
    models_summary,
    publish_partition,
    published_days,
    read_published,
    write_data_files,
    write_data_files_spark,
    write_latest,
)
from jobs.publishing.validation import (
    ExportValidationError,
    label_sets_of,
    validate_relevance,
    validate_relevance_spark,
    validation_page,
    validation_summary,
)
from schemas.config import ConfigError, config_date, help_field
from schemas.graph import LabelSet
from schemas.storage import clear_stale_staging, dataset, partitions, read_table
from schemas.tables import QUERIES, RELEVANCE

log = logging.getLogger(__name__)

ENGINES = ("local", "spark")

# The command's public names (the CLI and the nightly job import them from here).
__all__ = ["ExportConfig", "ExportValidationError", "run"]


@dataclass(frozen=True)
class ExportConfig:
    relevance: str = help_field("Data root holding the relevance table (partitioned by ds), as `relevance score` writes.")
    date: str = help_field("The ds partition (YYYY-MM-DD) to validate and publish.")
    out: str = help_field("Publish root: the day goes to <out>/relevance/ds=D/, the newest day into relevance/_LATEST.")
    queries: str | None = help_field(
        "Data root with the queries table, for churn by query segment; none: no segment breakdown.", None
    )
    label_set: str | None = help_field(
        "Label set (name or .yaml) every row must use; default: each row's own label_set column.", None
    )
    max_prob_sum_error: float = help_field("Largest accepted |sum of label_probs - 1| per row.", 1e-4)
    engine: str = help_field("local (the night as one Arrow table, DuckDB and pandas) or spark (validated, compared and written by Spark).",
                             "local", choices=ENGINES)
    csv: bool | None = help_field("Publish relevance.csv too; default: yes with engine=local, no with engine=spark (large nights).", None)
    spark_master: str | None = help_field("Spark master with engine=spark; default local[*] or spark-submit's.", None)

    def __post_init__(self) -> None:
        config_date(self.date)
        if not self.relevance or not self.out:
            raise ConfigError("relevance (the data root to read) and out (the publish root) are both required")
        # <out>/relevance/ds=D is where the input partition lives when both roots are one folder.
        if Path(self.out).resolve() == Path(self.relevance).resolve():
            raise ConfigError(
                f"out must differ from the relevance data root ({self.out}): publishing would replace the input"
            )
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0 < self.max_prob_sum_error < 1:
            raise ConfigError(f"max_prob_sum_error must be in (0, 1), e.g. 1e-4; got {self.max_prob_sum_error}")
        if self.label_set is not None:
            try:
                LabelSet.load(self.label_set)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"label_set: {error}") from None

    @property
    def day(self) -> dt.date:
        return config_date(self.date)

    @property
    def with_csv(self) -> bool:
        return self.engine == "local" if self.csv is None else self.csv


def _read_partition(root: str, day: dt.date) -> tuple[pa.Table, Path]:
    """The day's RELEVANCE rows sorted by the key (same input, same published bytes), and their folder."""
    available = partitions(RELEVANCE, root)
    source = Path(root) / RELEVANCE.name / f"ds={day.isoformat()}"
    if day not in available:
        recent = [d.isoformat() for d in available[-5:]]
        raise FileNotFoundError(f"no relevance partition {source} (latest partitions there: {recent or 'none'})")
    data = RELEVANCE.conform(read_table(RELEVANCE, root, days=[day]))
    return data.sort_by([(name, "ascending") for name in RELEVANCE.key]), source


def _churn(config: ExportConfig, published_root: Path, data: pa.Table, label_sets: dict[str, LabelSet]) -> dict:
    """The churn report against the newest night published before this one."""
    day = config.day
    earlier = [d for d in published_days(published_root) if d < day]
    previous_ds = earlier[-1] if earlier else None
    previous = read_published(published_root, previous_ds) if previous_ds else None
    segments = None
    if config.queries:
        segments = query_segments(read_table(QUERIES, config.queries, columns=["query_id", "segment"]), config.queries)
    return churn_report(data, previous, previous_ds, day, segments, label_sets)


def _publish_locally(config: ExportConfig, published_root: Path):
    """(published folder, manifest, suite, churn report) of the night as one Arrow table."""
    day = config.day
    data, source = _read_partition(config.relevance, day)
    label_sets = label_sets_of(data, config.label_set)
    required_label_set = next(iter(label_sets)) if config.label_set is not None else None
    suite = validate_relevance(data, label_sets, config.max_prob_sum_error, f"ds={day.isoformat()} ({source})", required_label_set)
    churn = _churn(config, published_root, data, label_sets)
    final, manifest = publish_partition(
        published_root, day, lambda folder, _: write_data_files(data, folder, csv=config.with_csv), len(data),
        models_summary(label_counts(data), label_sets), str(source), validation_summary(suite, config.max_prob_sum_error),
        validation_page(suite, day.isoformat(), config.max_prob_sum_error), churn)
    return final, manifest, suite, churn


def _publish_on_spark(config: ExportConfig, published_root: Path):
    """(published folder, manifest, suite, churn report): the night read, validated, compared with the previous one
    and written by Spark; the driver gets aggregates (label sets, counts, the churn tables)."""
    from pyspark.sql import functions as F

    from jobs.spark import get_spark, spark_schema
    from schemas.expectations import import_in_background

    day = config.day
    import_in_background()
    spark = get_spark("relevance-export", master=config.spark_master)
    source = Path(config.relevance) / RELEVANCE.name / f"ds={day.isoformat()}"
    if day not in partitions(RELEVANCE, config.relevance):
        _read_partition(config.relevance, day)  # raises naming the partitions there are
    dataset(RELEVANCE, config.relevance, days=[day])  # each file's own schema checked: given a schema, Spark fills gaps with nulls
    frame = (spark.read.schema(spark_schema(RELEVANCE)).option("basePath", str(source.parent)).parquet(str(source))
             .select(*RELEVANCE.names).cache())
    named = [row["label_set"] for row in frame.select("label_set").distinct().collect()]
    label_sets = label_sets_of(pa.table({"label_set": pa.array(named, pa.string())}), config.label_set)
    required_label_set = next(iter(label_sets)) if config.label_set is not None else None
    suite = validate_relevance_spark(frame, label_sets, config.max_prob_sum_error, f"ds={day.isoformat()} ({source})", required_label_set)

    earlier = [d for d in published_days(published_root) if d < day]
    previous = None
    if earlier:
        previous = spark.read.schema(spark_schema(RELEVANCE)).parquet(str(published_root / f"ds={earlier[-1].isoformat()}" / PARQUET_FILE))
    segments = None
    if config.queries:
        queries = query_segments(read_table(QUERIES, config.queries, columns=["query_id", "segment"]), config.queries)
        segments = spark.createDataFrame(queries, schema="query_id STRING, segment STRING")
    churn = churn_report_spark(frame, previous, earlier[-1] if earlier else None, day, segments, label_sets)
    counts = [row.asDict() for row in frame.groupBy("model_name", "model_version", "label_set", "label")
              .agg(F.count(F.lit(1)).alias("label_count")).collect()]
    total = sum(row["label_count"] for row in counts)
    ordered = frame.sortWithinPartitions(*RELEVANCE.key)
    final, manifest = publish_partition(
        published_root, day, lambda folder, final: write_data_files_spark(ordered, folder, final, total, config.with_csv), total,
        models_summary(counts, label_sets), str(source), validation_summary(suite, config.max_prob_sum_error),
        validation_page(suite, day.isoformat(), config.max_prob_sum_error), churn)
    frame.unpersist()
    return final, manifest, suite, churn


def run(config: ExportConfig) -> dict:
    """Validate the day's relevance partition, publish it with its churn report; returns the manifest. Holds
    the lock of `out` and the day (`jobs.lock`): a second export of that day fails at once."""
    with date_lock(config.out, config.day, "export"):
        return validate_and_publish(config)


def validate_and_publish(config: ExportConfig) -> dict:
    day = config.day
    published_root = Path(config.out) / RELEVANCE.name
    # The day's lock is held, so hidden copies of its folder are a killed export's, not a live one's.
    for line in clear_stale_staging(published_root / f"ds={day.isoformat()}"):
        log.warning(line)
    if config.engine == "spark":
        final, manifest, suite, churn = _publish_on_spark(config, published_root)
    else:
        final, manifest, suite, churn = _publish_locally(config, published_root)
    latest = write_latest(published_root)
    log.info("relevance ds=%s: %d rows passed %d expectations; published to %s", day, manifest["rows"], len(suite.outcomes), final)
    for line in churn_lines(churn):
        log.info(line)
    log.info("%s -> %s", published_root / LATEST_FILE, latest)
    return manifest
