"""The one place a SparkSession is built.

Master and Spark conf come from the caller (a job config) and from the environment, so the same job
runs in `local[*]`, in tests with `local[2]`, and under `spark-submit` on a cluster (where
`spark-submit` has already chosen the master and this builder adds nothing that overrides it).

Environment: `RELEVANCE_SPARK_MASTER` (default `local[*]` outside spark-submit) and
`RELEVANCE_SPARK_CONF` (comma-separated `key=value` pairs) extend what the config gives.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.table import Table

LOG4J2_FILE = Path(__file__).parent / "conf" / "log4j2.properties"

# Settings every job relies on, local or cluster: UTC days, parquet that pyarrow and DuckDB read with
# the declared types, and overwrites that replace only the partitions written.
JOB_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}

# Local-mode settings that make a laptop or CI run start fast and print little; on a cluster the
# cluster's spark-defaults decide these.
LOCAL_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "4",
    # The JVM's full tiered JIT: C1 alone (-XX:TieredStopAtLevel=1, which this used to set for fast starts) made a
    # 10M-impression prepare take 104 s where C1 + C2 take 69-71 s (benchmarks/prepare.py). A night's generated code
    # fills the default 48 MB code cache and the JVM then stops compiling ("CodeCache is full"), so it gets more room.
    # C2 waits for 10x its default calls and loop turns (C1's unchanged): in a short job most code is not run often
    # enough to repay it, while the per-row loops still reach it early. A 3M-impression prepare: C2 19-21 -> 12 CPU s
    # (the tasks: 21-23 CPU s, unchanged); at 30x C2 took 8 s but the tasks 1-2 s more.
    "spark.driver.extraJavaOptions": (
        f"-Dlog4j2.configurationFile=file:{LOG4J2_FILE} -XX:ReservedCodeCacheSize=256m -XX:+UseSerialGC "
        "-XX:Tier4InvocationThreshold=50000 -XX:Tier4CompileThreshold=150000 -XX:Tier4BackEdgeThreshold=400000"
    ),
}


def _conf_from_env() -> dict[str, str]:
    raw = os.environ.get("RELEVANCE_SPARK_CONF", "")
    pairs = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"RELEVANCE_SPARK_CONF item {item!r} must look like key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def under_spark_submit() -> bool:
    return "SPARK_SUBMIT_OPTS" in os.environ or os.environ.get("SPARK_ENV_LOADED") == "1"


def get_spark(app_name: str = "relevance", master: str | None = None, conf: dict[str, str] | None = None):
    """Build (or reuse) the SparkSession.

    `master=None` keeps spark-submit's choice on a cluster and means `local[*]` otherwise.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    master = master or os.environ.get("RELEVANCE_SPARK_MASTER")
    if master is None and not under_spark_submit():
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        for key, value in LOCAL_CONF.items():
            builder = builder.config(key, value)
    for key, value in {**JOB_CONF, **(conf or {}), **_conf_from_env()}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def stop_spark(spark) -> None:
    """Stop the session and shut the py4j gateway down (spark.stop() alone leaves the JVM running)."""
    from jobs.hadoop_fs import close_gateway

    spark.stop()
    close_gateway()


def spark_schema(table: Table, without: Iterable[str] = ()):
    """The Spark `StructType` of a declared table (its `spark_ddl` types), built without a JVM."""
    from pyspark.sql import types as T

    scalars = {
        "STRING": T.StringType(), "INT": T.IntegerType(), "BIGINT": T.LongType(),
        "DOUBLE": T.DoubleType(), "BOOLEAN": T.BooleanType(), "DATE": T.DateType(),
        "TIMESTAMP": T.TimestampType(),
    }

    def spark_type(ddl: str):
        if ddl.startswith("ARRAY<"):
            return T.ArrayType(spark_type(ddl[6:-1]))
        if ddl.startswith("MAP<STRING, "):
            return T.MapType(T.StringType(), spark_type(ddl[len("MAP<STRING, ") : -1]))
        return scalars[ddl]

    skip = set(without)
    return T.StructType(
        [
            T.StructField(column.name, spark_type(column.spark_ddl_type), nullable=column.nullable)
            for column in table.columns
            if column.name not in skip
        ]
    )


def empty_frame(spark, table: Table):
    """An empty DataFrame of `table`'s schema. Built from an RDD of no partitions, so no task runs for it:
    `createDataFrame([])` starts a Python worker (a second on a fresh session) to serialise nothing."""
    return spark.createDataFrame(spark.sparkContext.emptyRDD(), spark_schema(table))


@contextmanager
def session_conf(spark, settings: dict[str, str]) -> Iterator[None]:
    """Runtime SQL settings for the plans made inside (an action's, and a persisted frame's, which is planned at
    `persist`), restored after."""
    before = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
