"""Split a table into accepted rows and quarantined rows, on pandas or Spark, then certify with GE.

The row rules come from the table's declaration (`schemas.table.Column`); every rejected row keeps
its file, row number, offending field, a reason and the whole record as JSON, so nothing is lost and
`rows_in == accepted + quarantined` always holds. After the split, the great-expectations suite of
the table runs on the accepted rows: a failure there means the split and the suite disagree, which
is a bug, and is raised. On Spark the suite is decided by aggregates over the rows already cached for
the split (`jobs.certify`), and great-expectations itself reports any failure.

Duplicate keys are quarantined too (every occurrence after the first in file order), not dropped.

Both engines give the same split of the same file:
- The file's own schema must be the table's (`schemas.storage.check_file_schema`, strict: missing,
  renamed, extra columns and other types are refused with SchemaMismatchError before any row is
  read). So a price written as the string "12.5" where a double is declared refuses the file in both
  engines: neither parses numbers out of strings.
- A string value that is not valid UTF-8 quarantines its row (reason "invalid UTF-8", checked before
  the column's other rules); the quarantine record shows it with the invalid bytes replaced by U+FFFD.
  Pandas holds such a value as `bytes` (`arrow_to_pandas`), Spark tests it with `is_valid_utf8`.
  Only top-level string columns are checked (not the strings inside maps and lists).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs import hadoop_fs
from jobs.pages import page, suite_heading, suite_table
from jobs.quarantine import FIELD, REASON, Rule, first_failure, quarantine_frame, quarantine_table, record_json
from jobs.spark import session_conf, spark_schema
from schemas.config import ConfigError, help_field
from schemas.expectations import SuiteResult, validate_with_gx
from schemas.logs import progress
from schemas.storage import (
    check_column_names,
    check_file_schema,
    read_table,
    table_path,
    write_table,
)
from schemas.table import Column, Table
from schemas.tables import INPUT_TABLES, QUARANTINE, table

log = logging.getLogger(__name__)

INVALID_UTF8 = "invalid UTF-8"
VALIDATION_PAGE = "validation.html"

# Columns a Spark reader attaches so quarantined rows can name their file and row.
SOURCE_FILE_COL = "_source_file"
ROW_INDEX_COL = "_row_index"


@dataclass(frozen=True)
class ValidationCounts:
    table: str
    rows_in: int
    accepted: int
    quarantined: int

    def __post_init__(self) -> None:
        if self.rows_in != self.accepted + self.quarantined:
            raise AssertionError(f"{self.table}: {self.rows_in} in != {self.accepted} + {self.quarantined}")

    def line(self) -> str:
        return f"{self.table}: {self.rows_in} in = {self.accepted} accepted + {self.quarantined} quarantined"


@dataclass(frozen=True)
class Validated:
    """Accepted rows (same engine as the input), quarantine rows (QUARANTINE schema), counts, GE result."""

    accepted: Any
    quarantine: Any
    counts: ValidationCounts
    suite: SuiteResult | None
    cached: Any = None  # what was persisted to produce the split (Spark); `release()` frees it

    def release(self) -> None:
        if self.cached is not None:
            self.cached.unpersist()


def _rule_messages(column: Column) -> list[tuple[str, str]]:
    """(rule kind, human reason) pairs in the order they are checked."""
    rules = []
    if column.type == "string":
        rules.append(("utf8", INVALID_UTF8))
    if not column.nullable:
        rules.append(("not_null", "null in a non-nullable column"))
    if column.allowed is not None:
        rules.append(("allowed", f"value not in {list(column.allowed)}"))
    if column.min_value is not None:
        rules.append(("min", f"value below the minimum {column.min_value:g}"))
    if column.max_value is not None:
        rules.append(("max", f"value above the maximum {column.max_value:g}"))
    if column.pattern is not None:
        rules.append(("pattern", f"value does not match /{column.pattern}/"))
    return rules


def check_columns(table: Table, columns: list[str], source: str) -> None:
    """Raise SchemaMismatchError naming the source and the missing or unexpected columns."""
    check_column_names(table, [c for c in columns if c not in (SOURCE_FILE_COL, ROW_INDEX_COL)], source)


# --- pandas ---------------------------------------------------------------------------------------


def arrow_to_pandas(data: pa.Table) -> pd.DataFrame:
    """`data` as pandas (maps as dicts); a string that is not valid UTF-8 becomes `bytes`, which the
    "utf8" rule quarantines (pyarrow cannot convert it to `str`)."""
    undecodable = {}
    for index, field in enumerate(data.schema):
        if pa.types.is_string(field.type) and not _valid_utf8(data.column(index)):
            undecodable[field.name] = data.column(index).cast(pa.binary()).to_pylist()
            data = data.set_column(index, field, pa.nulls(data.num_rows, pa.string()))
    frame = data.to_pandas(maps_as_pydicts="strict")
    for name, raw in undecodable.items():
        frame[name] = pd.Series([_decoded(value) for value in raw], index=frame.index, dtype=object)
    return frame


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _decoded(value: bytes | None) -> str | bytes | None:
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _undecodable(values: pd.Series) -> np.ndarray:
    if pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        return np.zeros(len(values), dtype=bool)
    return values.map(lambda value: isinstance(value, bytes)).to_numpy(dtype=bool)


def _printable(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _pandas_violation(column: Column, kind: str, values: pd.Series) -> np.ndarray:
    present = values.notna().to_numpy()
    if kind == "not_null":
        return ~present
    if kind == "allowed":
        return present & ~values.isin(list(column.allowed)).to_numpy()
    if kind == "pattern":
        matched = values.astype("string").str.fullmatch(column.pattern).fillna(False).to_numpy(dtype=bool)
        return present & ~matched
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    if kind == "min":
        return present & (numeric < column.min_value)
    return present & (numeric > column.max_value)


def split_pandas(table: Table, frame: pd.DataFrame, source_file: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted rows, quarantine rows) of a pandas frame; row numbers are 1-based positions."""
    check_columns(table, list(frame.columns), source_file or table.name)
    frame = frame.reset_index(drop=True)
    reason = np.full(len(frame), None, dtype=object)
    field = np.full(len(frame), None, dtype=object)
    for column in table.columns:
        values = frame[column.name]
        undecodable = _undecodable(values) if column.type == "string" else None
        if undecodable is not None and undecodable.any():
            values = values.mask(undecodable)  # the rules after "utf8" see text only
        for kind, message in _rule_messages(column):
            violated = undecodable if kind == "utf8" else _pandas_violation(column, kind, values)
            bad = violated & (reason == None)  # noqa: E711
            reason[bad] = message
            field[bad] = column.name
    if table.key:
        clean = reason == None  # noqa: E711
        duplicate = np.zeros(len(frame), dtype=bool)
        duplicate[clean] = frame.loc[clean, list(table.key)].duplicated(keep="first").to_numpy()
        reason[duplicate] = duplicate_reason(table)
        field[duplicate] = ",".join(table.key)
    rejected = reason != None  # noqa: E711
    records = [
        {name: _printable(value) for name, value in record.items()}
        for record in frame.loc[rejected, table.names].to_dict(orient="records")
    ]
    quarantine = quarantine_table(
        table.name,
        records,
        field[rejected],
        reason[rejected],
        dt.datetime.now(dt.UTC),
        source_file=source_file,
        row_number=np.flatnonzero(rejected) + 1,
    ).to_pandas()
    accepted = frame.loc[~rejected, table.names].reset_index(drop=True)
    return accepted, quarantine


def validate_pandas(
    table: Table, frame: pd.DataFrame, source_file: str | None = None, run_suite: bool = True
) -> Validated:
    """Split then certify the accepted rows with the table's GE suite (pandas engine)."""
    accepted, quarantine = split_pandas(table, frame, source_file)
    counts = ValidationCounts(table.name, len(frame), len(accepted), len(quarantine))
    suite = validate_with_gx(table, accepted, "pandas") if run_suite else None
    if suite is not None and not suite.success:
        raise AssertionError(f"accepted rows fail the suite (split and suite disagree):\n{suite.summary()}")
    return Validated(accepted, quarantine, counts, suite)


# --- Spark ----------------------------------------------------------------------------------------


def _spark_violation(column: Column, kind: str):
    from pyspark.sql import functions as F

    value = F.col(column.name)
    if kind == "utf8":
        return value.isNotNull() & ~F.is_valid_utf8(value)
    if kind == "not_null":
        return value.isNull()
    if kind == "allowed":
        return value.isNotNull() & ~value.isin(list(column.allowed))
    if kind == "pattern":
        return value.isNotNull() & ~value.rlike(f"^(?:{column.pattern})$")
    if kind == "min":
        return value.isNotNull() & (value < F.lit(column.min_value))
    return value.isNotNull() & (value > F.lit(column.max_value))


# Above this many repeated key hashes the duplicate marks are joined back with a shuffle, not a broadcast.
BROADCAST_REPEATED_KEYS = 1_000_000
KEY_HASH = "_key_hash"


def _maybe_broadcast(frame, rows: int):
    from pyspark.sql import functions as F

    return F.broadcast(frame) if rows <= BROADCAST_REPEATED_KEYS else frame


def mark_duplicates(table: Table, checked):
    """(`checked` with every clean row after the first (in file order) of its key marked as a duplicate, the number of
    key hashes the rows hold more than once). None repeated proves the rows' keys distinct, hence those of any subset
    of them: a suite over such rows needs no aggregate of its own to certify the key (`jobs.certify`).

    Two steps, so the shuffle of every row carries a 64-bit hash of its key and nothing else: an
    aggregate over every row's key hash (it reads the key columns only: the rows' rule marks are not
    needed to find the hashes seen more than once, a superset of the clean rows' repeats) finds the
    hashes seen more than once (on a clean day none, and the frame comes back unchanged, with no
    join); only the clean rows with such a hash are then grouped by their true key (a hash collision
    is no duplicate) for each repeated key's first row, which is joined back. A window over the key
    would sort every row instead.
    """
    from pyspark.sql import functions as F

    clean = F.col(REASON).isNull()
    key_hash = F.xxhash64(*table.key).alias(KEY_HASH)
    # nearly every hash is distinct, so an aggregate before the shuffle would only build a map as large as its input
    # (the setting holds while the persisted plan is made, at persist)
    with session_conf(checked.sparkSession, {"spark.sql.execution.bypassPartialAggregation": "true"}):
        repeated_hashes = checked.groupBy(key_hash).count().where(F.col("count") > 1).select(KEY_HASH).persist()
        hashes = repeated_hashes.count()
    if not hashes:
        repeated_hashes.unpersist()
        return checked, 0
    order = (
        F.struct(F.col(SOURCE_FILE_COL), F.col(ROW_INDEX_COL))
        if _has_provenance(checked)
        else F.struct(F.monotonically_increasing_id().alias("_id"))
    )
    checked = checked.withColumn("_order", order)
    repeated = (
        checked.where(clean)
        .withColumn(KEY_HASH, F.xxhash64(*table.key))
        .join(_maybe_broadcast(repeated_hashes, hashes), on=KEY_HASH, how="left_semi")
        .groupBy(*table.key)
        .agg(F.count(F.lit(1)).alias("_copies"), F.min("_order").alias("_first"))
        .where(F.col("_copies") > 1)
        .drop("_copies")
    )
    marked = checked.join(_maybe_broadcast(repeated, hashes), on=list(table.key), how="left")
    is_duplicate = clean & F.col("_first").isNotNull() & (F.col("_order") != F.col("_first"))
    return (
        marked.withColumn(FIELD, F.when(is_duplicate, F.lit(",".join(table.key))).otherwise(F.col(FIELD)))
        .withColumn(REASON, F.when(is_duplicate, F.lit(duplicate_reason(table))).otherwise(F.col(REASON)))
        .drop("_order", "_first")
    ), hashes


def duplicate_reason(table: Table) -> str:
    return f"duplicate key {list(table.key)}"


def table_reasons(table: Table) -> list[str]:
    """Every reason the table's own rules give a row (its column rules, then a repeated key)."""
    reasons = [message for column in table.columns for _, message in _rule_messages(column)]
    return list(dict.fromkeys(reasons + ([duplicate_reason(table)] if table.key else [])))


def mark_rule_breaks(table: Table, frame):
    """`frame` plus `_reason` / `_field` of the first column rule a row breaks (null when none): one narrow select."""
    check_columns(table, frame.columns, table.name)
    # The declared order, as in the pandas split: the first broken rule names the row's reason.
    rules = [
        Rule(_spark_violation(column, kind), message, column.name)
        for column in table.columns
        for kind, message in _rule_messages(column)
    ]
    return frame.select("*", *first_failure(rules))


def mark_rows(table: Table, frame):
    """`frame` plus `_reason` / `_field`: null on rows that pass every rule, else the first broken one."""
    checked = mark_rule_breaks(table, frame)
    return mark_duplicates(table, checked)[0] if table.key else checked


def _has_provenance(frame) -> bool:
    return SOURCE_FILE_COL in frame.columns and ROW_INDEX_COL in frame.columns


def split_marked(table: Table, checked, quarantined_at: dt.datetime | None = None):
    """(accepted, quarantine) of a `mark_rows` frame.

    If the frame carries `_source_file` / `_row_index` (see `read_with_provenance`), quarantine rows
    name the file and the 1-based row; otherwise those fields are null.
    """
    from pyspark.sql import functions as F

    has_provenance = _has_provenance(checked)
    accepted = checked.where(F.col(REASON).isNull()).select(*table.names)
    quarantine = quarantine_frame(
        checked,
        table.name,
        quarantined_at or dt.datetime.now(dt.UTC),
        record_json(*(_printable_column(column) for column in table.columns)),
        source_file=F.col(SOURCE_FILE_COL) if has_provenance else None,
        row_number=(F.col(ROW_INDEX_COL) + 1) if has_provenance else None,
    )
    return accepted, quarantine


def _printable_column(column: Column):
    """The column for a quarantine record: a string with invalid UTF-8 bytes replaced by U+FFFD."""
    from pyspark.sql import functions as F

    if column.type == "string":
        return F.make_valid_utf8(F.col(column.name)).alias(column.name)
    return F.col(column.name)


def split_spark(table: Table, frame, quarantined_at: dt.datetime | None = None):
    """(accepted, quarantine) Spark DataFrames: `mark_rows` then `split_marked`."""
    return split_marked(table, mark_rows(table, frame), quarantined_at)


def validate_spark(table: Table, frame, run_suite: bool = True) -> Validated:
    """Split then certify the accepted rows with the table's GE suite (Spark engine).

    The input with its column-rule marks is cached as it is first read (by the duplicate search);
    the counts and the suite's measures (`jobs.certify.SparkSuite`) then come from one aggregate
    over it, and both sides of the split are filters of it.
    """
    from pyspark.sql import functions as F

    from jobs.certify import SparkSuite

    cached = mark_rule_breaks(table, frame).persist()
    checked, repeated_hashes = mark_duplicates(table, cached) if table.key else (cached, None)
    # no key hash repeated in the table proves the accepted rows' keys distinct
    suite = SparkSuite(table, F.col(REASON).isNull(), unique_key=table.key if repeated_hashes == 0 else None) if run_suite else None
    tally = checked.agg(
        F.count(F.lit(1)).alias("rows"), F.count(F.col(REASON)).alias("rejected"), *(suite.aggregates() if suite else [])
    ).first()
    accepted, quarantine = split_marked(table, checked)
    counts = ValidationCounts(table.name, tally["rows"], tally["rows"] - tally["rejected"], tally["rejected"])
    result = suite.result(tally.asDict(), checked) if suite else None
    if result is not None and not result.success:
        raise AssertionError(f"accepted rows fail the suite (split and suite disagree):\n{result.summary()}")
    return Validated(accepted, quarantine, counts, result, cached)


def read_with_provenance(spark, table: Table, path: str, days: list[dt.date] | None = None):
    """Read a parquet table (only its `days` partitions when given) with its declared schema plus the
    file and row index of every row.

    The own schema of each file read is checked first (`schemas.storage.check_file_schema`, as the
    pyarrow reader does): given a schema, Spark would fill an absent column with nulls.
    """
    from pyspark.sql import functions as F

    frame = spark.read.schema(spark_schema(table)).parquet(path)
    files = frame.inputFiles()
    if days is not None:
        frame = frame.where(F.col("ds").isin(list(days)))
        # Spark lists every partition's files; only those of the days read are checked (hive paths `ds=D`)
        folders = tuple(f"/ds={day.isoformat()}/" for day in days)
        files = [file for file in files if any(folder in file for folder in folders)]
    check_spark_files(spark, table, path, files)
    return frame.select(
        *table.names,
        F.col("_metadata.file_path").alias(SOURCE_FILE_COL),
        F.col("_metadata.row_index").alias(ROW_INDEX_COL),
    )


def check_spark_files(spark, table: Table, path: str, files: list[str]) -> None:
    """`check_file_schema` on the footer of each file, read with pyarrow's filesystem for its URI.

    Where pyarrow cannot open the filesystem (HDFS without libhdfs, a scheme it does not know),
    Spark's merged view of the footers stands in: it misses only a column absent from some files
    and present in others.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    for file in files:
        try:
            filesystem, inner = pafs.FileSystem.from_uri(file)
        except (pa.ArrowException, OSError):
            check_file_schema(table, _merged_footer_schema(spark, table, path), path)
            return
        check_file_schema(table, pq.read_schema(inner, filesystem=filesystem), file)


def _merged_footer_schema(spark, table: Table, path: str) -> pa.Schema:
    """The Arrow schema of Spark's merged footers under `path`, without the partition columns of the path."""
    from pyspark.sql.pandas.types import to_arrow_schema

    merged = to_arrow_schema(spark.read.option("mergeSchema", "true").parquet(path).schema)
    return pa.schema([field for field in merged if field.name not in table.partition_by])


# --- the `relevance validate` command -------------------------------------------------------------

ENGINES = ("pandas", "spark")


@dataclass(frozen=True)
class ValidateConfig:
    data: str = help_field("Data root holding tables in the schemas/ layout (e.g. the output of generate).")
    out: str = help_field("Folder for the quarantine table, validation.json and validation.html; default: <data>/_validation.", "")
    tables: list[str] = help_field("Tables to validate; default: every input table present under data.", [])
    engine: str = help_field("pandas (one machine, small data) or spark (any size; local or cluster).", "pandas", choices=ENGINES)
    spark_master: str | None = help_field("Spark master for engine=spark; default local[*] or spark-submit's.", None)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        unknown = [name for name in self.tables if name not in INPUT_TABLES]
        if unknown:
            raise ConfigError(f"tables {unknown} are not input tables; choose from {list(INPUT_TABLES)}")


def run(config: ValidateConfig) -> list[ValidationCounts]:
    """Validate every chosen table under `config.data`; write quarantine rows and a JSON summary."""
    if config.engine == "spark":
        return _run_spark(config)
    return _run_pandas(config)


def _chosen_tables(config: ValidateConfig, is_present) -> list[str]:
    names = config.tables or [name for name in INPUT_TABLES if is_present(table(name))]
    if not names:
        raise FileNotFoundError(f"{config.data}: no input tables found (expected folders named {list(INPUT_TABLES)})")
    return names


def _run_pandas(config: ValidateConfig) -> list[ValidationCounts]:
    data_root = Path(config.data)
    out = Path(config.out) if config.out else data_root / "_validation"
    results = []
    for name in progress(_chosen_tables(config, lambda t: table_path(data_root, t).is_dir()), desc="validate (pandas)", unit="table"):
        declared = table(name)
        frame = arrow_to_pandas(read_table(declared, data_root))
        results.append(validate_pandas(declared, frame, source_file=str(table_path(data_root, declared))))
        log.info(results[-1].counts.line())
    write_table(QUARANTINE, pa.concat_tables([QUARANTINE.from_pandas(r.quarantine) for r in results]), out)
    (out / "validation.json").write_text(_summary_json(config.engine, results))
    (out / VALIDATION_PAGE).write_text(validation_page(config.engine, results))
    log.info("quarantine, validation.json and %s written to %s", VALIDATION_PAGE, out)
    return [r.counts for r in results]


def _run_spark(config: ValidateConfig) -> list[ValidationCounts]:
    from jobs.spark import get_spark
    from schemas.expectations import import_in_background

    import_in_background()
    spark = get_spark("relevance-validate", master=config.spark_master)
    out = config.out or hadoop_fs.join(config.data, "_validation")
    names = _chosen_tables(config, lambda t: hadoop_fs.exists(spark, hadoop_fs.table_uri(config.data, t)))
    results = []
    for name in progress(names, desc="validate (spark)", unit="table"):
        declared = table(name)
        frame = read_with_provenance(spark, declared, hadoop_fs.table_uri(config.data, declared))
        results.append(validate_spark(declared, frame))
        log.info(results[-1].counts.line())
    quarantine = reduce(lambda union, other: union.unionByName(other), [r.quarantine for r in results])
    quarantine.coalesce(1).write.mode("overwrite").parquet(hadoop_fs.table_uri(out, QUARANTINE))
    hadoop_fs.write_report(spark, hadoop_fs.join(out, "validation.json"), _summary_json(config.engine, results))
    hadoop_fs.write_report(spark, hadoop_fs.join(out, VALIDATION_PAGE), validation_page(config.engine, results))
    log.info("quarantine, validation.json and %s written to %s", VALIDATION_PAGE, out)
    return [r.counts for r in results]


def validation_page(engine: str, results: list[Validated]) -> str:
    """validation.html: per table, the split's counts and every expectation of its suite on the accepted rows."""
    body = [f"<p class='meta'>Engine: {html.escape(engine)}. Rows breaking a column rule are quarantined first; the suite then "
            "certifies the accepted rows.</p>"]
    for result in results:
        body += [suite_heading(result.suite), f"<p>{html.escape(result.counts.line())}</p>", suite_table(result.suite)]
    return page("Input validation", body)


def _summary_json(engine: str, results: list[Validated]) -> str:
    summary = {
        "engine": engine,
        "tables": {
            r.counts.table: {
                "rows_in": r.counts.rows_in,
                "accepted": r.counts.accepted,
                "quarantined": r.counts.quarantined,
                "expectations_met": sum(o.success for o in r.suite.outcomes),
                "expectations": len(r.suite.outcomes),
            }
            for r in results
        },
    }
    return json.dumps(summary, indent=2)
