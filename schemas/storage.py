"""Where a table lives on disk, and reading/writing it with its declared schema (pyarrow only).

Layout under a data root: `<root>/<table>/part-*.parquet`, or for a table partitioned by `ds`,
`<root>/<table>/ds=YYYY-MM-DD/part-*.parquet` (hive style, the partition column only in the path),
which Spark, DuckDB and pyarrow all read. A partition is written into a hidden temporary folder and
renamed into place, so a reader never sees half of it and rewriting a day replaces exactly that day.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas.table import Table

PART_FILE = "part-00000.parquet"


def table_path(root: str | Path, table: Table) -> Path:
    return Path(root) / table.name


def replace_folder(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)` on a hidden sibling folder of `final`, then swap it in; returns `final`.

    Renames are atomic on one filesystem, so a reader sees the old folder or the new one, never
    part of either (for the instant between the two renames of a replacement, no folder). If `write`
    or the swap fails, `final` is left as it was and the staging folder is removed. The hidden
    `.staging-` / `.retired-` names start with a dot, which every reader here ignores.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = final.parent / f".staging-{final.name}-{tag}"
    staging.mkdir()
    try:
        write(staging)
        if final.exists():
            retired = final.parent / f".retired-{final.name}-{tag}"
            final.rename(retired)
            try:
                staging.rename(final)
            except OSError:
                retired.rename(final)
                raise
            shutil.rmtree(retired)
        else:
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final


def replace_file(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)` on a hidden sibling file of `final`, then rename it over `final`; returns `final`.

    A reader sees the old file or the new one, never part of either; if `write` fails, `final` is
    left as it was and the staging file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(staging)
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)
    return final


def write_table(table: Table, data: pa.Table, root: str | Path, row_group_size: int = 1 << 20) -> Path:
    """Write `data` (conformed to `table`) under `root`; each `ds` present replaces that partition only.

    An unpartitioned table is replaced whole. Returns the table's folder.
    """
    data = table.conform(data)
    folder = table_path(root, table)
    if not table.partition_by:
        replace_folder(folder, lambda tmp: pq.write_table(data, tmp / PART_FILE, row_group_size=row_group_size))
        return folder
    if table.partition_by != ("ds",):
        raise NotImplementedError(f"{table.name}: only `ds` partitioning is supported")
    file_schema = table.arrow_schema(without=("ds",))
    for day in pc.unique(data["ds"]).to_pylist():
        part = data.filter(pc.equal(data["ds"], pa.scalar(day, pa.date32())))
        part = part.drop_columns(["ds"]).cast(file_schema)
        replace_folder(
            folder / f"ds={day.isoformat()}",
            lambda tmp, part=part: pq.write_table(part, tmp / PART_FILE, row_group_size=row_group_size),
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def partitions(table: Table, root: str | Path) -> list[dt.date]:
    """The `ds` partitions present, sorted."""
    folder = table_path(root, table)
    if not folder.is_dir():
        return []
    return sorted(dt.date.fromisoformat(p.name[3:]) for p in folder.glob("ds=*") if p.is_dir())


def dataset(table: Table, root: str | Path) -> ds.Dataset:
    """A pyarrow dataset over the table's files with the declared schema (never inferred)."""
    folder = table_path(root, table)
    if not folder.is_dir():
        raise FileNotFoundError(f"table {table.name!r} not found: {folder} does not exist")
    if table.partition_by:
        return ds.dataset(
            folder,
            schema=table.arrow_schema(),
            format="parquet",
            partitioning=ds.partitioning(pa.schema([pa.field("ds", pa.date32())]), flavor="hive"),
            exclude_invalid_files=False,
            ignore_prefixes=[".", "_"],
        )
    return ds.dataset(folder, schema=table.arrow_schema(), format="parquet", ignore_prefixes=[".", "_"])


def read_table(
    table: Table, root: str | Path, days: list[dt.date] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Read a table (optionally some `ds` days and columns) with its declared schema."""
    data = dataset(table, root)
    expression = None
    if days is not None:
        expression = pc.field("ds").isin(pa.array(days, pa.date32()))
    return data.to_table(columns=columns, filter=expression)
