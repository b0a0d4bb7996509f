"""What the WANDS and ESCI readers share: the result type, counts, the quarantine and a TSV reader.

A reader never drops a row silently: every data row of a file it reads is accepted, quarantined
(with file, 1-based data row, field, reason and the row as JSON) or, for a requested locale filter,
filtered out, and `TableCounts.reconciles` checks that those add up. With `strict=True` the first
bad row raises an `IngestError` naming the file, the row and the field instead.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
from tqdm import tqdm

from jobs.quarantine import quarantine_table

# CATALOG.product_type is required; a product whose source gives no class (every ESCI product,
# a WANDS product with an empty product_class) gets this value and no `ps` gold node.
UNKNOWN_PRODUCT_TYPE = "unknown"
# csv's default cap is 128 KiB per field; product descriptions can be longer.
_FIELD_SIZE_LIMIT = 1 << 30


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


def missing_columns_error(path: Path, missing: Sequence[str], have: Sequence[str]) -> ValueError:
    plural = "s" if len(missing) > 1 else ""
    listed = ", ".join(repr(name) for name in missing)
    return ValueError(f"{path}: missing required column{plural} {listed} (the header has {list(have)})")


@contextmanager
def _csv_field_size_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


@dataclass(frozen=True)
class TsvRow:
    """One data row: `values` maps header -> text, or is None when the field count is wrong."""

    number: int
    values: dict[str, str] | None
    fields: list[str]
    width: int
    problem: str | None = None  # why the row cannot be read, when it is not its field count

    def reason(self) -> str:
        """Why `values` is None."""
        return self.problem or f"expected {self.width} tab-separated fields, got {len(self.fields)}"


class _ConsumedLines:
    """The file's lines, decoded one by one as `csv.reader` pulls them (so a non-UTF-8 byte is reported
    with its line number), remembering those of the record being read."""

    def __init__(self, handle, path: Path) -> None:
        self.handle = handle
        self.path = path
        self.number = 0
        self.lines: list[str] = []

    def __iter__(self) -> _ConsumedLines:
        return self

    def __next__(self) -> str:
        raw = next(self.handle)
        self.number += 1
        try:
            line = raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: line {self.number} is not UTF-8 text ({error.reason} at byte {error.start} of the line); "
                             "re-encode the file as UTF-8") from None
        self.lines.append(line)
        return line

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


UNBALANCED_QUOTE = "unbalanced quote: this row's quoted field ran into the rows after it, which are read on their own"


@contextmanager
def tsv_rows(path: Path, required: Sequence[str], desc: str) -> Iterator[Iterator[TsvRow]]:
    """Open a tab-separated file with a header (CSV quoting, doubled quotes) and check its columns.

    Yields an iterator of `TsvRow`s (1-based data row numbers, header excluded). A quoted field may
    hold tabs and newlines; but a record whose every line after the first is a whole row on its own
    (the header's field count) is an unbalanced quote that swallowed those rows: its first line becomes one bad row
    (`UNBALANCED_QUOTE`) and every following line is read as a row of its own, so one stray quote
    costs one row. Raises a ValueError naming the file when it is not UTF-8, a required column is
    missing, or the quoting is broken beyond recovery.
    """
    with path.open("rb") as handle, _csv_field_size_limit(_FIELD_SIZE_LIMIT):
        lines = _ConsumedLines(handle, path)
        reader = csv.reader(lines, delimiter="\t", quotechar='"', doublequote=True)
        header = next(reader, None)
        lines.take()
        if header is None:
            raise ValueError(f"{path}: the file is empty; expected a header with columns {list(required)}")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise ValueError(f"{path}: the header names columns {duplicated} more than once")
        missing = [name for name in required if name not in header]
        if missing:
            raise missing_columns_error(path, missing, header)

        def row(number: int, fields: list[str]) -> TsvRow:
            return TsvRow(number, dict(zip(header, fields)) if len(fields) == len(header) else None, fields, len(header))

        def rows() -> Iterator[TsvRow]:
            number = 0
            try:
                for fields in tqdm(reader, desc=desc, unit=" rows", disable=None, leave=False):
                    consumed = lines.take()
                    swallowed = [next(csv.reader([line], delimiter="\t", quotechar='"', doublequote=True), []) for line in consumed[1:]]
                    if swallowed and all(len(line_fields) == len(header) for line_fields in swallowed):
                        number += 1
                        yield TsvRow(number, None, [consumed[0].rstrip("\r\n")], len(header), UNBALANCED_QUOTE)
                        for line_fields in swallowed:
                            number += 1
                            yield row(number, line_fields)
                        continue
                    number += 1
                    yield row(number, fields)
            except csv.Error as error:
                raise ValueError(f"{path}: line {reader.line_num} (data row {number + 1}): {error}") from None

        yield rows()


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
