"""One declaration per table, from which Arrow and Spark types are both derived.

A `Table` lists `Column`s with a logical type (a small vocabulary shared by Arrow, Spark and
DuckDB), nullability and row rules (allowed values, bounds, a regex). The row rules are data: the
quarantine split and the great-expectations suites are both compiled from them, so the contract is
stated once.

The Spark `StructType` is built from `Table.spark_ddl` types by `jobs.spark.spark_schema`: pyspark
is imported only under `jobs/`, so importing `schemas` stays light for notebooks that never touch Spark.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# Logical type -> (Arrow type, Spark DDL type). Maps and lists use string keys and the scalar
# types below, which is all any table here needs.
_SCALARS: dict[str, tuple[pa.DataType, str]] = {
    "string": (pa.string(), "STRING"),
    "int32": (pa.int32(), "INT"),
    "int64": (pa.int64(), "BIGINT"),
    "float64": (pa.float64(), "DOUBLE"),
    "bool": (pa.bool_(), "BOOLEAN"),
    "date": (pa.date32(), "DATE"),
    "timestamp": (pa.timestamp("us", tz="UTC"), "TIMESTAMP"),
}


def _parse_type(logical: str) -> tuple[pa.DataType, str]:
    if logical in _SCALARS:
        return _SCALARS[logical]
    if logical.startswith("list<") and logical.endswith(">"):
        arrow_item, spark_item = _parse_type(logical[5:-1])
        return pa.list_(arrow_item), f"ARRAY<{spark_item}>"
    if logical.startswith("map<string,") and logical.endswith(">"):
        arrow_value, spark_value = _parse_type(logical[len("map<string,") : -1])
        return pa.map_(pa.string(), arrow_value), f"MAP<STRING, {spark_value}>"
    known = ", ".join(sorted(_SCALARS))
    raise ValueError(f"unknown logical type {logical!r}: use one of {known}, list<T> or map<string,T>")


@dataclass(frozen=True)
class Column:
    """A column of a table and the rules every row must satisfy.

    `allowed`: the value must be one of these (None: any). `min_value`/`max_value`: inclusive
    bounds for numbers. `pattern`: a full-match regex for strings.
    """

    name: str
    type: str
    nullable: bool = False
    doc: str = ""
    allowed: tuple[Any, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        _parse_type(self.type)

    @property
    def arrow_type(self) -> pa.DataType:
        return _parse_type(self.type)[0]

    @property
    def spark_ddl_type(self) -> str:
        return _parse_type(self.type)[1]

    @property
    def has_row_rules(self) -> bool:
        return (
            not self.nullable
            or self.allowed is not None
            or self.min_value is not None
            or self.max_value is not None
            or self.pattern is not None
        )


@dataclass(frozen=True)
class Table:
    """A table: its columns, its key (unique per row) and how it is partitioned on disk.

    `optional`: nullable columns a file may leave out (a file from outside, such as a pairs file to
    score); its reader reads them as null. Every other column must be in every file.
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    partition_by: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    doc: str = ""
    version: int = 1
    _index: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {column.name: column for column in self.columns}
        if len(index) != len(self.columns):
            raise ValueError(f"table {self.name!r} declares a column twice")
        missing = [name for name in (*self.key, *self.partition_by) if name not in index]
        if missing:
            raise ValueError(f"table {self.name!r}: key/partition columns {missing} are not declared")
        required = [name for name in self.optional if name not in index or not index[name].nullable]
        if required:
            raise ValueError(f"table {self.name!r}: optional columns {required} must be declared nullable")
        object.__setattr__(self, "_index", index)

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> Column:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"table {self.name!r} has no column {name!r}; it has {self.names}") from None

    def arrow_schema(self, without: Iterable[str] = ()) -> pa.Schema:
        skip = set(without)
        return pa.schema(
            [
                pa.field(column.name, column.arrow_type, nullable=column.nullable)
                for column in self.columns
                if column.name not in skip
            ],
            metadata={"table": self.name, "schema_version": str(self.version)},
        )

    def spark_ddl(self, without: Iterable[str] = ()) -> str:
        skip = set(without)
        return ", ".join(
            f"`{column.name}` {column.spark_ddl_type}{'' if column.nullable else ' NOT NULL'}"
            for column in self.columns
            if column.name not in skip
        )

    def empty_arrow(self) -> pa.Table:
        return self.arrow_schema().empty_table()

    def from_pandas(self, frame) -> pa.Table:
        """A pandas frame -> Arrow with this table's schema (dict columns become maps, never structs)."""
        return pa.Table.from_pandas(frame[self.names], schema=self.arrow_schema(), preserve_index=False)

    def conform(self, data: pa.Table) -> pa.Table:
        """Select exactly this table's columns, in order, cast to its types.

        Raises a ValueError naming the missing columns; extra columns are dropped.
        """
        missing = [name for name in self.names if name not in data.column_names]
        if missing:
            raise ValueError(f"{self.name}: missing columns {missing} (have {data.column_names})")
        return data.select(self.names).cast(self.arrow_schema())
