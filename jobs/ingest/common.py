"""What the WANDS and ESCI readers share: the result type, counts and the quarantine (their TSV
files are read by `jobs.delimited`).

A reader never drops a row silently: every data row of a file it reads is accepted, quarantined
(with file, 1-based data row, field, reason and the row as JSON) or, for a requested locale filter,
filtered out, and `TableCounts.reconciles` checks that those add up. With `strict=True` the first
bad row raises an `IngestError` naming the file, the row and the field instead.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from jobs.quarantine import quarantine_table

# CATALOG.product_type is required; a product whose source gives no class (every ESCI product,
# a WANDS product with an empty product_class) gets this value and no `ps` gold node.
UNKNOWN_PRODUCT_TYPE = "unknown"


class IngestError(ValueError):
    """A bad row under `strict=True`; the message names the file, the 1-based data row and the field."""


@dataclass(frozen=True)
class TableCounts:
    """Rows of one source file and where each went: `read = accepted + quarantined + filtered`."""

    table: str
    source_file: str
    read: int
    accepted: int
    quarantined: int
    filtered: int = 0

    @property
    def reconciles(self) -> bool:
        return self.read == self.accepted + self.quarantined + self.filtered


@dataclass(frozen=True)
class IngestResult:
    """The tables one dataset folder produced; a table is None when its source file was not read.

    `counts` is keyed by table name (only tables read from a file); `stats` counts what parsing
    normalised or dropped inside accepted rows (e.g. feature pairs with an empty key) and
    diagnostics such as judgments whose query is not in the query file.
    """

    catalog: pa.Table | None
    queries: pa.Table | None
    judgments: pa.Table | None
    gold_nodes: pa.Table | None
    quarantine: pa.Table
    counts: dict[str, TableCounts]
    stats: dict[str, int] = field(default_factory=dict)

    def tables(self) -> dict[str, pa.Table]:
        """The tables that were produced, by table name (quarantine excluded)."""
        produced = {
            "catalog": self.catalog,
            "queries": self.queries,
            "judgments": self.judgments,
            "gold_nodes": self.gold_nodes,
        }
        return {name: data for name, data in produced.items() if data is not None}


class _Rejected(NamedTuple):
    source_table: str
    source_file: str
    row_number: int
    field: str | None
    reason: str
    record: dict[str, Any] | list[Any]


class Quarantine:
    """Collects rejected rows for the QUARANTINE table; under `strict` the first one raises instead."""

    def __init__(self, strict: bool, now: dt.datetime | None = None) -> None:
        self.strict = strict
        self.now = now or dt.datetime.now(dt.UTC)
        self._rows: list[_Rejected] = []

    def add(
        self,
        source_table: str,
        source_file: Path | str,
        row_number: int,
        field_name: str | None,
        reason: str,
        record: dict[str, Any] | list[Any],
    ) -> None:
        if self.strict:
            where = f"field {field_name!r}" if field_name else "the whole row"
            raise IngestError(f"{source_file}: row {row_number}, {where}: {reason}")
        self._rows.append(_Rejected(source_table, str(source_file), row_number, field_name, reason, record))

    def to_table(self) -> pa.Table:
        rows = self._rows
        return quarantine_table(
            [r.source_table for r in rows],
            [r.record for r in rows],
            [r.field for r in rows],
            [r.reason for r in rows],
            self.now,
            source_file=[r.source_file for r in rows],
            row_number=[r.row_number for r in rows],
        )


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    return path


def select_files(folder: Path, names: dict[str, str], files: Sequence[str] | None) -> dict[str, Path]:
    """Which of a dataset's files to read: the requested ones (each must exist) or all that exist.

    `names` maps a short name ("query") to the file name ("query.csv").
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    if files is None:
        chosen = {short: folder / name for short, name in names.items() if (folder / name).is_file()}
        if not chosen:
            raise FileNotFoundError(f"{folder} holds none of the dataset's files {sorted(names.values())}")
        return chosen
    unknown = [short for short in files if short not in names]
    if unknown:
        raise ValueError(f"unknown file names {unknown}; use some of {sorted(names)}")
    return {short: require_file(folder / names[short]) for short in files}


def parse_id(text: str) -> str | None:
    """A non-negative integer id as its canonical string (`" 007"` -> `"7"`); None if it is not one."""
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        return None
    return str(int(text))


def parse_count(text: str) -> float | None:
    """A non-negative finite number written as an int or a float (`"15.0"`); empty -> None.

    Raises ValueError when the text is not such a number.
    """
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text) if "_" not in text else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a non-negative number")
    return value


def blank_to_none(text: str | None) -> str | None:
    if text is None:
        return None
    return text if text.strip() else None
