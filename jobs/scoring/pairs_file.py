"""`relevance score --pairs FILE`: a CSV or parquet file of (query, product_id) pairs -> the pairs to score.

What a file may hold is declared in `schemas.tables`: `PAIRS_FILE` (query, product_id and an optional
query_id; the product text comes from the catalog) or, when its columns name any of the catalog's
text columns, `PAIRS_FILE_WITH_TEXT` (title and product_type too, description, brand and attributes
optional: each row carries its product's text and the catalog is not read). A file whose columns are
neither is refused in one line naming the file and the columns, before any row is read: a parquet
file by its own schema, types included (`schemas.storage.check_file_schema`), a CSV file (comma-
separated, a header line, UTF-8, read by `jobs.delimited`) by its header.

Each data row is then checked in this order, and the first check it fails sends it to the quarantine
with the file, its 1-based data row, the field and the reason:

1. CSV only: the wrong number of fields, or an unbalanced quote (the whole row);
2. an empty (null or blank) value where the table declares none: query, product_id, and with text
   title and product_type;
3. CSV only: `attributes` that is not a JSON object of text values;
4. a (query, product_id) pair an earlier row holds (the first row is scored);
5. with the catalog: a product_id the catalog lacks.

Nothing is cut for length: the prompt clips every field to its budget (`training.prompt`), so a long
text costs what a full one does. A row's product text (its catalog row, or the row's own) becomes the
scorer's input as the night's catalog join makes it (the facets are the attributes plus the brand:
`training.prompt.product_facets`), with `product_content_hash`, the hash `relevance prepare` gives a
night's candidates: a pair is reused under the same model version exactly when its text is unchanged.
The query is scored as written (the night's queries are normalised from the logs; a file's are the
team's own), and an absent or empty query_id is derived from it (`derived_query_id`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.delimited import DelimitedRow, delimited_rows
from jobs.quarantine import quarantine_table
from schemas.storage import check_column_names, check_file_schema, read_table, table_path
from schemas.table import Table
from schemas.tables import CATALOG, PAIRS_FILE, PAIRS_FILE_WITH_TEXT, PAIRS_TO_SCORE
from training.prompt import product_facets

SUFFIXES = (".csv", ".parquet")
# The columns whose presence says a file carries its products' text.
TEXT_COLUMNS = tuple(name for name in PAIRS_FILE_WITH_TEXT.names if name not in PAIRS_FILE.names)
# The text fields `relevance prepare` hashes, in its order, the attributes after them (jobs/prepare.py, step 5).
HASHED_FIELDS = ("title", "description", "product_type", "brand")
HASH_SEPARATOR = "\u001f"


class ScoringInput(NamedTuple):
    """What a score run read (a pairs file, or a night's candidates): the pairs to score and the quarantine rows
    of the rest, `read` rows in all."""

    read: int
    pairs: pa.Table  # PAIRS_TO_SCORE, sorted by (query, product_id)
    quarantine: pa.Table  # QUARANTINE


class FileRow(NamedTuple):
    """One data row: its values by column (every column of its table; None when the row cannot be split into
    them) and the first problem found in it, if any."""

    number: int
    values: dict[str, Any] | None
    record: dict[str, Any] | list[str]  # the row as read, for the quarantine
    problem: tuple[str | None, str] | None = None  # (field, reason)


def is_pairs_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def derived_query_id(query: str) -> str:
    """A query's id when the file gives none: the same text always gets the same id."""
    return "q-" + hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]


def product_content_hash(product: Mapping[str, Any]) -> str:
    """sha256 (hex) of a product's text as `relevance prepare` defines it: title, description, product_type,
    brand and the attributes (`key=value` sorted by key, joined by `;`) joined by U+001F, a null as empty."""
    attributes = ";".join(f"{key}={value or ''}" for key, value in sorted(product["attributes"].items()))
    text = HASH_SEPARATOR.join([*(product[name] or "" for name in HASHED_FIELDS), attributes])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_table(columns: list[str]) -> Table:
    """The declared table a file with `columns` is checked against."""
    return PAIRS_FILE_WITH_TEXT if any(name in TEXT_COLUMNS for name in columns) else PAIRS_FILE


# --- reading ---------------------------------------------------------------------------------------


def parse_attributes(text: str) -> dict[str, str]:
    """A CSV cell's facets: a JSON object of text values (`{"color": "gray"}`)."""
    try:
        facets = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"attributes is not JSON ({error.msg} at character {error.pos}); write a JSON object such as "
                         '{"color": "gray"}') from None
    if not isinstance(facets, dict) or not all(isinstance(value, str) for value in facets.values()):
        raise ValueError('attributes is not a JSON object of text values; write one such as {"color": "gray", "size": "2"}')
    return facets


def csv_rows(path: Path) -> tuple[Table, list[FileRow]]:
    """(the file's declared table, its rows); an empty cell is null."""
    with delimited_rows(path, (), desc=f"read {path.name}", delimiter=",") as (header, rows):
        table = file_table(header)
        check_column_names(table, header, str(path))
        return table, [csv_row(row, table.names) for row in rows]


def csv_row(row: DelimitedRow, names: list[str]) -> FileRow:
    """A CSV row's values by column: an empty cell null, `attributes` parsed."""
    if row.values is None:
        return FileRow(row.number, None, row.fields, (None, row.reason()))
    values = {name: row.values.get(name) or None for name in names}
    if values.get("attributes") is None:
        return FileRow(row.number, values, row.values)
    try:
        values["attributes"] = parse_attributes(values["attributes"])
    except ValueError as error:
        return FileRow(row.number, values, row.values, ("attributes", str(error)))
    return FileRow(row.number, values, row.values)


def parquet_rows(path: Path) -> tuple[Table, list[FileRow]]:
    """(the file's declared table, its rows), the file's own schema checked first."""
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file (truncated or not parquet: {error})") from None
    table = file_table(file.schema_arrow.names)
    check_file_schema(table, file.schema_arrow, str(path))
    try:
        data = file.read()
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: its data cannot be read (a truncated or corrupt parquet file: {error})") from None
    names = table.names
    return table, [FileRow(number, {name: record.get(name) for name in names}, record)
                   for number, record in enumerate(data.to_pylist(), start=1)]


# --- checking --------------------------------------------------------------------------------------


def empty_field(values: Mapping[str, Any], table: Table) -> str | None:
    """The first column `table` declares non-null that is null or blank in `values`."""
    return next((column.name for column in table.columns if not column.nullable and not (values[column.name] or "").strip()), None)


def checked_rows(rows: list[FileRow], table: Table) -> list[FileRow]:
    """`rows`, each with the problem of the first of checks 1-4 (the module's list) it fails."""
    first_rows: dict[tuple[str, str], int] = {}
    checked = []
    for row in rows:
        if row.values is not None and (empty := empty_field(row.values, table)):
            row = row._replace(problem=(empty, f"{empty} is empty"))  # before an unreadable attributes cell
        if row.problem is None:
            key = (row.values["query"], row.values["product_id"])
            if key in first_rows:
                row = row._replace(problem=("query,product_id", f"duplicate pair (query, product_id): first seen at row {first_rows[key]}"))
            else:
                first_rows[key] = row.number
        checked.append(row)
    return checked


def product_text(product: Mapping[str, Any]) -> dict[str, Any]:
    """The PAIRS_TO_SCORE columns of a product's text (a catalog row, or a row of a file with text): title, type,
    the facets as the prompt shows them, description, and the content hash of it all."""
    product = {**product, "attributes": dict(product["attributes"] or ())}  # a map read from parquet is a list of pairs
    return {"product_content_hash": product_content_hash(product), "title": product["title"], "product_type": product["product_type"],
            "attributes": list(product_facets(product).items()), "description": product["description"]}


def catalog_texts(catalog_root: str | Path, product_ids: set[str]) -> dict[str, dict[str, Any]]:
    """`product_text` of each of `product_ids` the catalog holds, by product_id."""
    columns = ["product_id", *HASHED_FIELDS, "attributes"]
    catalog = read_table(CATALOG, catalog_root, columns=columns)
    wanted = catalog.filter(pc.is_in(catalog["product_id"], pa.array(sorted(product_ids), pa.string())))
    texts = {row["product_id"]: product_text(row) for row in wanted.to_pylist()}
    if len(texts) != wanted.num_rows:
        raise ValueError(f"{table_path(catalog_root, CATALOG)}: a product_id the pairs name is in the catalog more than once")
    return texts


def pair_to_score(values: Mapping[str, Any], text: Mapping[str, Any]) -> dict[str, Any]:
    """A PAIRS_TO_SCORE row: the pair, its query_id (derived when empty) and its product's `product_text`."""
    return {"query": values["query"], "query_id": values["query_id"] or derived_query_id(values["query"]), "product_id": values["product_id"],
            **text}


def read_pairs_file(path: str | Path, catalog_root: str | Path, quarantined_at: dt.datetime) -> ScoringInput:
    """The pairs of a CSV or parquet pairs file, with their product text (the catalog's under `catalog_root`
    unless the file carries it), and the quarantine rows of the rest; see the module doc."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist (or is not a file)")
    table, rows = csv_rows(path) if path.suffix.lower() == ".csv" else parquet_rows(path)
    rows = checked_rows(rows, table)
    kept = [row for row in rows if row.problem is None]
    with_text = table is PAIRS_FILE_WITH_TEXT
    texts = {} if with_text else catalog_texts(catalog_root, {row.values["product_id"] for row in kept})
    pairs, rejected = [], [row for row in rows if row.problem is not None]
    for row in kept:
        text = product_text(row.values) if with_text else texts.get(row.values["product_id"])
        if text is None:
            rejected.append(row._replace(problem=("product_id", f"product not in the catalog {table_path(catalog_root, CATALOG)}: "
                                                                "nothing to score")))
            continue
        pairs.append(pair_to_score(row.values, text))
    rejected.sort(key=lambda row: row.number)
    quarantine = quarantine_table(table.name, [row.record for row in rejected], [row.problem[0] for row in rejected],
                                  [row.problem[1] for row in rejected], quarantined_at, source_file=str(path),
                                  row_number=[row.number for row in rejected])
    scored = pa.Table.from_pylist(pairs, schema=PAIRS_TO_SCORE.arrow_schema()).sort_by([("query", "ascending"), ("product_id", "ascending")])
    return ScoringInput(len(rows), scored, quarantine)
