"""Where a table lives on disk, and reading/writing it with its declared schema (pyarrow only).

Layout under a data root: `<root>/<table>/part-*.parquet`, or for a table partitioned by `ds`,
`<root>/<table>/ds=YYYY-MM-DD/part-*.parquet` (hive style, the partition column only in the path),
which Spark, DuckDB and pyarrow all read. A partition is written into a hidden temporary folder and
renamed into place, so a reader never sees half of it and rewriting a day replaces exactly that day.

The reader contract, for every engine (pyarrow here, Spark in `jobs.validate.read_with_provenance`):
each file's own schema (its parquet footer) is compared with the declaration by `check_file_schema`
before any row is read, and a file whose columns differ is refused. A reader given a schema fills an
absent column with nulls, so without this check a catalog without `brand` would read as a catalog
whose brands are all unknown.
"""

from __future__ import annotations

import datetime as dt
import os
import re
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


class SchemaMismatchError(ValueError):
    """A file's columns are not its table's: a whole-file problem, refused before any row is read."""


def _comparable(data_type: pa.DataType) -> pa.DataType:
    """`data_type` without what does not change the values read: large/dictionary encodings, the names
    and nullability of nested fields, the name of a timestamp's time zone (an instant is an instant)."""
    if pa.types.is_dictionary(data_type):
        return _comparable(data_type.value_type)
    if pa.types.is_large_string(data_type):
        return pa.string()
    if pa.types.is_large_list(data_type) or pa.types.is_list(data_type):
        return pa.list_(_comparable(data_type.value_type))
    if pa.types.is_map(data_type):
        return pa.map_(_comparable(data_type.key_type), _comparable(data_type.item_type))
    if pa.types.is_timestamp(data_type) and data_type.tz is not None:
        return pa.timestamp(data_type.unit, tz="UTC")
    return data_type


def check_file_schema(table: Table, file_schema: pa.Schema, source: str) -> None:
    """Refuse (SchemaMismatchError, one line naming `source`) a file whose columns are not `table`'s.

    Strict: a missing column, an unexpected one (a renamed column is both) and a column of another
    type are all refused; nothing is filled with nulls, dropped or cast. Nullability is not compared
    (a null where the table forbids one is a row problem, quarantined by validation), a partition
    column may be in the file or only in its path, and a column the table declares optional may be
    left out.
    """
    declared = table.arrow_schema()
    wrong_types = [
        f"{field.name}: {field.type} (expected {declared.field(field.name).type})"
        for field in file_schema
        if field.name in declared.names and _comparable(field.type) != _comparable(declared.field(field.name).type)
    ]
    _refuse_mismatch(table, file_schema.names, source, optional=table.partition_by + table.optional, wrong_types=wrong_types)


def check_column_names(table: Table, names: list[str], source: str) -> None:
    """Refuse (SchemaMismatchError naming `source`) columns that are not exactly `table`'s (less any optional
    ones), in any order."""
    _refuse_mismatch(table, names, source, optional=table.optional)


def _refuse_mismatch(
    table: Table, names: list[str], source: str, optional: tuple[str, ...] = (), wrong_types: list[str] | None = None
) -> None:
    missing = [name for name in table.names if name not in names and name not in optional]
    unexpected = [name for name in names if name not in table.names]
    problems = [
        f"{what} {found}"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("wrong types", wrong_types))
        if found
    ]
    if problems:
        expected = ", ".join(f"{field.name} {field.type}" for field in table.arrow_schema())
        raise SchemaMismatchError(
            f"{source}: columns do not match table {table.name!r}: {', '.join(problems)}; expected schema: {expected}"
        )


def table_path(root: str | Path, table: Table) -> Path:
    return Path(root) / table.name


def _write_naming(final: Path, write: Callable[[Path], None], staging: Path) -> None:
    """`write(staging)`, its OSError made to name `final` when it names no file: pyarrow's write errors
    say only "Error writing bytes to file ... No space left on device"."""
    try:
        write(staging)
    except OSError as error:
        if error.filename or str(final.parent) in str(error):
            raise
        message = f"writing {final}: {error.strerror or error}"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error


def sibling_copy(kind: str, name: str, tag: str) -> str:
    """The hidden name of a `staging` or `retired` copy of `name` beside it, `tag` 8 hex digits of its run;
    `clear_stale_staging` and the Hadoop writer (`jobs.hadoop_fs`) use the same names."""
    return f".{kind}-{name}-{tag}"


def new_tag() -> str:
    return uuid.uuid4().hex[:8]


def replace_folder(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)` on a hidden sibling folder of `final`, then swap it in; returns `final`.

    Renames are atomic on one filesystem, so a reader sees the old folder or the new one, never
    part of either (for the instant between the two renames of a replacement, no folder). If `write`
    or the swap fails, `final` is left as it was and the staging folder is removed. The hidden
    `.staging-` / `.retired-` names start with a dot, which every reader here ignores.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = new_tag()
    staging = final.parent / sibling_copy("staging", final.name, tag)
    staging.mkdir()
    try:
        _write_naming(final, write, staging)
        if final.exists():
            retired = final.parent / sibling_copy("retired", final.name, tag)
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


def clear_stale_staging(final: str | Path) -> list[str]:
    """Clean up what `replace_folder` and `replace_file` runs of `final` that were killed left beside it; a line per
    copy.

    Only for `final`'s sole writer (one holding its lock), so that no such copy is a live run's. A
    `.staging-` copy is removed; a `.retired-` copy is renamed back when `final` is missing (its run
    died between the two renames: the retired copy is the last complete one) and removed otherwise.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    left_by_a_run = re.compile("|".join(re.escape(sibling_copy(kind, final.name, "TAG")).replace("TAG", "[0-9a-f]{8}")
                                        for kind in ("staging", "retired")))
    lines = []
    for copy in sorted(path for path in final.parent.iterdir() if left_by_a_run.fullmatch(path.name)):
        if copy.name.startswith(".retired-") and not final.exists():
            copy.rename(final)
            lines.append(f"{final}: restored from {copy.name}, left by a run killed while swapping it in")
        else:
            if copy.is_dir():
                shutil.rmtree(copy)
            else:
                copy.unlink()
            lines.append(f"{final}: removed {copy.name}, left by a run that was killed")
    return lines


def replace_file(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)` on a hidden sibling file of `final`, then rename it over `final`; returns `final`.

    A reader sees the old file or the new one, never part of either; if `write` fails, `final` is
    left as it was and the staging file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / sibling_copy("staging", final.name, new_tag())
    try:
        _write_naming(final, write, staging)
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


def dataset(table: Table, root: str | Path, days: list[dt.date] | None = None) -> ds.Dataset:
    """A pyarrow dataset over the table's files with the declared schema (never inferred).

    The own schema of every file a read will touch (those of `days` when given) is checked first
    (`check_file_schema`): a mismatch raises SchemaMismatchError.
    """
    data = _declared_dataset(table, root)
    for fragment in data.get_fragments(filter=_day_filter(days)):
        check_file_schema(table, fragment.physical_schema, fragment.path)
    return data


def _day_filter(days: list[dt.date] | None) -> ds.Expression | None:
    return None if days is None else pc.field("ds").isin(pa.array(days, pa.date32()))


def _declared_dataset(table: Table, root: str | Path) -> ds.Dataset:
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
    """Read a table (optionally some `ds` days and columns) with its declared schema; see `dataset`."""
    return dataset(table, root, days).to_table(columns=columns, filter=_day_filter(days))
