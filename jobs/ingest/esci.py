"""Read the Amazon Shopping Queries dataset (ESCI, Reddy et al., 2022) into CATALOG, QUERIES and
JUDGMENTS.

Files (parquet): `shopping_queries_dataset_examples.parquet` (example_id, query, query_id,
product_id, product_locale, esci_label, small_version, large_version, split) and
`shopping_queries_dataset_products.parquet` (product_id, product_title, product_description,
product_bullet_point, product_brand, product_color, product_locale). Either may be absent;
`read_esci` reads what is there, or exactly the files asked for. Only the columns used are read
and required; id columns may be integer or string typed, text columns must be strings (anything
else is an error naming the file and the column: the reader never guesses).

Mapping and the choices made:
- An ASIN is unique only within a locale (upstream joins examples to products on
  (product_locale, product_id)), so our product_id is `"<locale>:<ASIN>"`, e.g. `"us:B07X1Z"`.
- CATALOG: title = product_title; description = product_description, or product_bullet_point when
  the description is empty (counted); brand = product_brand; attributes = {"color": product_color}
  when there is a colour; product_type "unknown" (ESCI has no product class); category_path and
  price null.
- QUERIES: one row per query_id from the accepted examples (query text kept as is, locale from
  product_locale, query_class null). An example whose query_id already has another query text or
  locale is quarantined.
- JUDGMENTS: esci_label (E/S/C/I) with label_set = annotator = "esci", is_weak False; example_id
  and (query_id, product_id) must be unique. small_version, large_version and split are not kept.
- No GOLD_NODES: ESCI has no node-level annotations.
- `locale`: keep only rows of that product_locale; the others count as `filtered`.

Validation is vectorised (pyarrow/numpy) because the examples file has 2.6M rows: each check marks
rows, a row is quarantined for the first check it fails, and uniqueness is judged among the rows
that passed the earlier checks (the first occurrence wins). Quarantine `row_number` is the 1-based
row in the parquet file.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.delimited import missing_columns_error
from jobs.ingest.common import (
    UNKNOWN_PRODUCT_TYPE,
    IngestResult,
    Quarantine,
    TableCounts,
    select_files,
)
from schemas.graph import LabelSet
from schemas.tables import CATALOG, JUDGMENTS, QUERIES

SOURCE = "esci"
FILES = {
    "examples": "shopping_queries_dataset_examples.parquet",
    "products": "shopping_queries_dataset_products.parquet",
}
LOCALES = ("us", "es", "jp")
ID, TEXT = "id", "text"
EXAMPLE_COLUMNS = {
    "example_id": ID,
    "query": TEXT,
    "query_id": ID,
    "product_id": TEXT,
    "product_locale": TEXT,
    "esci_label": TEXT,
}
PRODUCT_COLUMNS = {
    "product_id": TEXT,
    "product_title": TEXT,
    "product_description": TEXT,
    "product_bullet_point": TEXT,
    "product_brand": TEXT,
    "product_color": TEXT,
    "product_locale": TEXT,
}
PRODUCT_KEY_SEPARATOR = ":"
COLOR_ATTRIBUTE = "color"


def product_key(locale: str, asin: str) -> str:
    """Our product_id for an ESCI product: `"us:B07X1Z"`."""
    return f"{locale}{PRODUCT_KEY_SEPARATOR}{asin}"


# ---------------------------------------------------------------- reading with declared column kinds


def _is_text_type(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)


def read_parquet_as_text(path: Path, columns: dict[str, str]) -> pa.Table:
    """The named columns of a parquet file, each as `string` after checking its declared kind.

    `columns`: name -> "id" (integer or string typed) or "text" (string typed). Raises a
    ValueError naming the file (and the column) when it is not readable parquet, or a column is missing or
    of another type.
    """
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable parquet file (truncated or not parquet: {error})") from None
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise missing_columns_error(path, missing, schema.names)
    for name, kind in columns.items():
        arrow_type = schema.field(name).type
        fits = _is_text_type(arrow_type) or (kind == ID and pa.types.is_integer(arrow_type))
        if not fits:
            expected = "an integer or string column" if kind == ID else "a string column"
            raise ValueError(f"{path}: column {name!r} has type {arrow_type}; expected {expected}")
    try:
        data = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: its data cannot be read (a truncated or corrupt parquet file: {error})") from None
    return pa.table({name: pc.cast(data[name], pa.string()) for name in columns})


# ---------------------------------------------------------------- vectorised row checks


def _numpy(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _blank(column: pa.ChunkedArray) -> np.ndarray:
    """True where the value is null or only whitespace."""
    return _numpy(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True))


def _canonical_ids(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """(canonical id strings, True where the value is not a non-negative integer)."""
    trimmed = pc.utf8_trim_whitespace(column)
    bad = ~_numpy(pc.fill_null(pc.match_substring_regex(trimmed, r"^[0-9]+$"), False))
    return pc.replace_substring_regex(trimmed, r"^0+([0-9])", r"\1"), bad


def _first_rows(keys: pa.Table, alive: np.ndarray) -> np.ndarray:
    """For each alive row, the index of the first alive row with the same key; -1 for other rows."""
    rows = np.flatnonzero(alive)
    first = np.full(len(alive), -1, dtype=np.int64)
    if len(rows) == 0:
        return first
    names = keys.column_names
    sub = keys.take(pa.array(rows)).append_column("__row", pa.array(rows, pa.int64()))
    firsts = sub.group_by(names, use_threads=False).aggregate([("__row", "min")])
    joined = sub.join(firsts, keys=names, join_type="inner", use_threads=False)
    first[joined["__row"].to_numpy()] = joined["__row_min"].to_numpy()
    return first


class _Rejections:
    """Rows rejected so far, each with the field and reason of the first check it failed."""

    def __init__(self, alive: np.ndarray) -> None:
        self.alive = alive.copy()
        self.problems: dict[int, tuple[str | None, str]] = {}

    def reject(self, bad: np.ndarray, field: str | None, reason: Callable[[int], str]) -> None:
        newly = bad & self.alive
        for row in np.flatnonzero(newly):
            self.problems[int(row)] = (field, reason(int(row)))
        self.alive &= ~newly

    def send(self, quarantine: Quarantine, table: str, path: Path, raw: pa.Table) -> None:
        rows = sorted(self.problems)
        records = raw.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
        for row, record in zip(rows, records):
            field, reason = self.problems[row]
            quarantine.add(table, path, row + 1, field, reason, record)


def _locale_filter(raw: pa.Table, locale: str | None) -> np.ndarray:
    """True for rows another locale than the requested one (null locales are left to the checks)."""
    if locale is None:
        return np.zeros(raw.num_rows, dtype=bool)
    trimmed = pc.utf8_trim_whitespace(raw["product_locale"])
    return _numpy(pc.fill_null(pc.not_equal(trimmed, locale), False))


def _reject_blank(rejections: _Rejections, raw: pa.Table, names: Sequence[str]) -> None:
    for name in names:
        rejections.reject(_blank(raw[name]), name, lambda row, name=name: f"{name} is empty")


# ---------------------------------------------------------------- products


def _read_products(
    path: Path, locale: str | None, quarantine: Quarantine
) -> tuple[pa.Table, TableCounts, Counter[str]]:
    raw = read_parquet_as_text(path, PRODUCT_COLUMNS)
    filtered = _locale_filter(raw, locale)
    rejections = _Rejections(~filtered)
    _reject_blank(rejections, raw, ("product_id", "product_locale", "product_title"))
    asin = pc.utf8_trim_whitespace(raw["product_id"])
    product_locale = pc.utf8_trim_whitespace(raw["product_locale"])
    product_id = pc.binary_join_element_wise(product_locale, asin, PRODUCT_KEY_SEPARATOR)
    first = _first_rows(pa.table({"product_id": product_id}), rejections.alive)
    duplicate = rejections.alive & (first != np.arange(raw.num_rows))
    rejections.reject(
        duplicate,
        "product_id",
        lambda row: f"duplicate product_id {product_id[row].as_py()!r}: first seen at row {first[row] + 1}",
    )
    rejections.send(quarantine, CATALOG.name, path, raw)

    keep = pa.array(rejections.alive)
    kept = raw.filter(keep)
    description_blank = _blank(kept["product_description"])
    bullets_blank = _blank(kept["product_bullet_point"])
    description = pc.if_else(pa.array(description_blank), kept["product_bullet_point"], kept["product_description"])
    no_text = pa.array(description_blank & bullets_blank)
    description = pc.if_else(no_text, pa.nulls(kept.num_rows, pa.string()), description)
    brand_blank = _blank(kept["product_brand"])
    has_color = ~_blank(kept["product_color"])
    offsets = np.concatenate([[0], np.cumsum(has_color)]).astype(np.int32)
    attributes = pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array([COLOR_ATTRIBUTE] * int(has_color.sum()), pa.string()),
        pc.utf8_trim_whitespace(kept["product_color"]).filter(pa.array(has_color)).combine_chunks(),
    )
    n = kept.num_rows
    catalog = pa.table(
        {
            "product_id": product_id.filter(keep),
            "title": kept["product_title"],
            "description": description,
            "product_type": pa.array([UNKNOWN_PRODUCT_TYPE] * n, pa.string()),
            "category_path": pa.nulls(n, pa.string()),
            "brand": pc.if_else(pa.array(brand_blank), pa.nulls(n, pa.string()), kept["product_brand"]),
            "attributes": attributes,
            "price": pa.nulls(n, pa.float64()),
            "source": pa.array([SOURCE] * n, pa.string()),
        }
    )
    stats = Counter(
        {
            "products_bullets_as_description": int((description_blank & ~bullets_blank).sum()),
            "products_without_description": int((description_blank & bullets_blank).sum()),
        }
    )
    counts = TableCounts(
        CATALOG.name, str(path), read=raw.num_rows, accepted=n,
        quarantined=len(rejections.problems), filtered=int(filtered.sum()),
    )
    return CATALOG.conform(catalog), counts, stats


# ---------------------------------------------------------------- examples


def _read_examples(
    path: Path, locale: str | None, quarantine: Quarantine
) -> tuple[pa.Table, pa.Table, TableCounts]:
    raw = read_parquet_as_text(path, EXAMPLE_COLUMNS)
    n = raw.num_rows
    filtered = _locale_filter(raw, locale)
    rejections = _Rejections(~filtered)
    example_id, bad_example_id = _canonical_ids(raw["example_id"])
    query_id, bad_query_id = _canonical_ids(raw["query_id"])
    for name, bad in (("example_id", bad_example_id), ("query_id", bad_query_id)):
        rejections.reject(
            bad, name, lambda row, name=name: f"{name} {raw[name][row].as_py()!r} is not a non-negative integer"
        )
    _reject_blank(rejections, raw, ("query", "product_id", "product_locale"))
    labels = LabelSet.load(SOURCE).names
    label = pc.utf8_trim_whitespace(raw["esci_label"])
    unknown_label = ~_numpy(pc.fill_null(pc.is_in(label, pa.array(labels)), False))
    rejections.reject(
        unknown_label, "esci_label", lambda row: f"esci_label {raw['esci_label'][row].as_py()!r} is not one of {labels}"
    )
    product_locale = pc.utf8_trim_whitespace(raw["product_locale"])
    asin = pc.utf8_trim_whitespace(raw["product_id"])
    product_id = pc.binary_join_element_wise(product_locale, asin, PRODUCT_KEY_SEPARATOR)
    rows = np.arange(n)

    first = _first_rows(pa.table({"example_id": example_id}), rejections.alive)
    rejections.reject(
        rejections.alive & (first != rows), "example_id",
        lambda row: f"duplicate example_id {example_id[row].as_py()!r}: first seen at row {first[row] + 1}",
    )
    pair_first = _first_rows(pa.table({"query_id": query_id, "product_id": product_id}), rejections.alive)
    rejections.reject(
        rejections.alive & (pair_first != rows), "query_id,product_id",
        lambda row: f"duplicate query_id, product_id ({query_id[row].as_py()!r}, {product_id[row].as_py()!r}): "
        f"first seen at row {pair_first[row] + 1}",
    )
    query_first = _first_rows(pa.table({"query_id": query_id}), rejections.alive)
    for name, values in (("query", raw["query"]), ("product_locale", product_locale)):
        firsts = np.where(query_first >= 0, query_first, rows)
        differs = _numpy(pc.fill_null(pc.not_equal(values, values.take(pa.array(firsts))), False))
        rejections.reject(
            rejections.alive & differs, name,
            lambda row, name=name, values=values, firsts=firsts: (
                f"query_id {query_id[row].as_py()!r} has {name} {values[int(firsts[row])].as_py()!r} "
                f"at row {firsts[row] + 1}, here {values[row].as_py()!r}"
            ),
        )
    rejections.send(quarantine, JUDGMENTS.name, path, raw)

    keep = pa.array(rejections.alive)
    accepted = int(rejections.alive.sum())
    judgments = pa.table(
        {
            "query_id": query_id.filter(keep),
            "product_id": product_id.filter(keep),
            "label": label.filter(keep),
            "label_set": pa.array([SOURCE] * accepted, pa.string()),
            "annotator": pa.array([SOURCE] * accepted, pa.string()),
            "is_weak": pa.array([False] * accepted, pa.bool_()),
        }
    )
    query_rows = pa.array(np.unique(query_first[rejections.alive]), pa.int64())
    m = len(query_rows)
    queries = pa.table(
        {
            "query_id": query_id.take(query_rows),
            "query": raw["query"].take(query_rows),
            "query_class": pa.nulls(m, pa.string()),
            "segment": pa.nulls(m, pa.string()),
            "frequency": pa.nulls(m, pa.float64()),
            "locale": product_locale.take(query_rows),
            "source": pa.array([SOURCE] * m, pa.string()),
        }
    )
    counts = TableCounts(
        JUDGMENTS.name, str(path), read=n, accepted=accepted,
        quarantined=len(rejections.problems), filtered=int(filtered.sum()),
    )
    return JUDGMENTS.conform(judgments), QUERIES.conform(queries), counts


def read_esci(
    folder: str | Path,
    files: Sequence[str] | None = None,
    locale: str | None = None,
    strict: bool = False,
    now: dt.datetime | None = None,
) -> IngestResult:
    """Read an ESCI folder. `files`: some of "examples", "products" (each must exist), or None for
    whichever exist. `locale`: one of us/es/jp to keep only that marketplace. `strict`: raise
    `IngestError` on the first bad row. `now`: the quarantine timestamp (default: now).
    """
    if locale is not None and locale not in LOCALES:
        raise ValueError(f"locale {locale!r} is not an ESCI locale; use one of {list(LOCALES)} or none")
    paths = select_files(Path(folder), FILES, files)
    quarantine = Quarantine(strict, now)
    counts: dict[str, TableCounts] = {}
    stats: Counter[str] = Counter()
    catalog = queries = judgments = None
    if "products" in paths:
        catalog, counts["catalog"], product_stats = _read_products(paths["products"], locale, quarantine)
        stats.update(product_stats)
    if "examples" in paths:
        judgments, queries, counts["judgments"] = _read_examples(paths["examples"], locale, quarantine)
        if catalog is not None:
            known = pc.is_in(judgments["product_id"], catalog["product_id"])
            stats["judgments_unknown_product"] = int((~_numpy(known)).sum())
    return IngestResult(
        catalog=catalog,
        queries=queries,
        judgments=judgments,
        gold_nodes=None,
        quarantine=quarantine.to_table(),
        counts=counts,
        stats=dict(sorted(stats.items())),
    )
