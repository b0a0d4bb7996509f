"""The one reader of delimited text files with a header: WANDS' tab-separated files (`jobs.ingest`) and
the comma-separated pairs files of `relevance score --pairs FILE.csv` (`jobs.scoring.pairs_file`).

The csv module reads them (CSV quoting with doubled quotes, never split by hand), one record at a
time, so a bad row costs that row: a row with the wrong field count or an unbalanced quote comes
back with `values` None and the reason, for the caller to quarantine with its row number.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schemas.logs import progress

# csv's default cap is 128 KiB per field; product descriptions can be longer.
FIELD_SIZE_LIMIT = 1 << 30
DELIMITER_NAMES = {"\t": "tab", ",": "comma"}


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
class DelimitedRow:
    """One data row: `values` maps header -> text, or is None when the field count is wrong."""

    number: int
    values: dict[str, str] | None
    fields: list[str]
    width: int
    delimiter: str
    problem: str | None = None  # why the row cannot be read, when it is not its field count

    def reason(self) -> str:
        """Why `values` is None."""
        return self.problem or f"expected {self.width} {DELIMITER_NAMES[self.delimiter]}-separated fields, got {len(self.fields)}"


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
def delimited_rows(path: Path, required: Sequence[str], desc: str, delimiter: str = "\t") -> Iterator[tuple[list[str], Iterator[DelimitedRow]]]:
    """Open a delimited file with a header (CSV quoting, doubled quotes) and check its columns.

    Yields (the header, an iterator of `DelimitedRow`s with 1-based data row numbers, header excluded).
    A quoted field may hold delimiters and newlines; but a record whose every line after the first is a
    whole row on its own (the header's field count) is an unbalanced quote that swallowed those rows:
    its first line becomes one bad row (`UNBALANCED_QUOTE`) and every following line is read as a row
    of its own, so one stray quote costs one row. Raises a ValueError naming the file when it is not
    UTF-8, is empty, names a column twice or lacks a `required` column, or when the quoting is broken
    beyond recovery.
    """
    with path.open("rb") as handle, _csv_field_size_limit(FIELD_SIZE_LIMIT):
        lines = _ConsumedLines(handle, path)
        reader = csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True)
        header = next(reader, None)
        lines.take()
        if header is None:
            raise ValueError(f"{path}: the file is empty; expected a header line" + (f" with columns {list(required)}" if required else ""))
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise ValueError(f"{path}: the header names columns {duplicated} more than once")
        missing = [name for name in required if name not in header]
        if missing:
            raise missing_columns_error(path, missing, header)

        def row(number: int, fields: list[str]) -> DelimitedRow:
            return DelimitedRow(number, dict(zip(header, fields)) if len(fields) == len(header) else None, fields, len(header), delimiter)

        def rows() -> Iterator[DelimitedRow]:
            number = 0
            try:
                for fields in progress(reader, desc=desc, unit="row"):
                    consumed = lines.take()
                    swallowed = [next(csv.reader([line], delimiter=delimiter, quotechar='"', doublequote=True), []) for line in consumed[1:]]
                    if swallowed and all(len(line_fields) == len(header) for line_fields in swallowed):
                        number += 1
                        yield DelimitedRow(number, None, [consumed[0].rstrip("\r\n")], len(header), delimiter, UNBALANCED_QUOTE)
                        for line_fields in swallowed:
                            number += 1
                            yield row(number, line_fields)
                        continue
                    number += 1
                    yield row(number, fields)
            except csv.Error as error:
                raise ValueError(f"{path}: line {reader.line_num} (data row {number + 1}): {error}") from None

        yield header, rows()
