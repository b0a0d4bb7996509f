"""The only code that touches Spark's JVM: Hadoop filesystem calls and closing the py4j gateway.

Spark jobs read and write data roots that may be local folders or `file://`, `hdfs://` and `s3a://`
URIs, so what they do to files besides Spark's own reads and writes (test that a table exists, drop
a partition, swap a folder in, write a JSON report) goes through the Hadoop FileSystem of the path,
configured like Spark's own.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.storage import new_tag, sibling_copy
from schemas.table import Table


def join(root: str, *parts: str) -> str:
    """`root/part/...` as a string: a URI keeps its `scheme://` (pathlib would fold it to `scheme:/`)."""
    return "/".join([str(root).rstrip("/"), *parts])


def table_uri(root: str, table: Table) -> str:
    """Where `table` lives under a data root (the `schemas.storage.table_path` layout, as a URI)."""
    return join(root, table.name)


def _path_and_fs(spark, uri: str):
    hadoop_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(uri)
    return hadoop_path, hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def exists(spark, uri: str) -> bool:
    hadoop_path, fs = _path_and_fs(spark, uri)
    return bool(fs.exists(hadoop_path))


def delete(spark, uri: str) -> None:
    """Remove the file or folder (recursively); nothing to do when it does not exist."""
    hadoop_path, fs = _path_and_fs(spark, uri)
    fs.delete(hadoop_path, True)


def write_report(spark, uri: str, text: str) -> None:
    """Write a small text file (a JSON report), replacing any file there; parent folders are created."""
    hadoop_path, fs = _path_and_fs(spark, uri)
    stream = fs.create(hadoop_path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def replace_folder(spark, final: str, write: Callable[[str], None]) -> None:
    """Call `write(staging)` on a hidden sibling of `final`, then swap it in (Hadoop FS renames).

    If `write` fails, `final` is untouched and the staging folder removed.
    """
    target, fs = _path_and_fs(spark, final)
    new_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path
    parent, name, tag = target.getParent(), target.getName(), new_tag()
    staging = new_path(parent, sibling_copy("staging", name, tag))
    fs.mkdirs(parent)
    try:
        write(staging.toString())
        if fs.exists(target):
            retired = new_path(parent, sibling_copy("retired", name, tag))
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


def close_gateway() -> None:
    """Shut the py4j gateway down after `spark.stop()` (which alone leaves the JVM running)."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is not None:
        gateway.shutdown()
        SparkContext._gateway = None
        SparkContext._jvm = None
