"""Read WANDS (Wayfair ANnotation DataSet, Chen et al., ECIR 2022) into CATALOG, QUERIES, JUDGMENTS
and GOLD_NODES.

Files (tab-separated, one header line, CSV quoting with doubled quotes; read with the csv module,
never split by hand): `query.csv` (query_id, query, query_class), `product.csv` (product_id,
product_name, product_class, `category hierarchy`, product_description, product_features,
rating_count, average_rating, review_count) and `label.csv` (id, query_id, product_id, label).
Any of them may be absent; `read_wands` reads what is there, or exactly the files asked for.

Mapping and the choices made:
- ids are validated as non-negative integers and stored as their canonical strings ("007" -> "7").
- query text is kept byte for byte (three upstream queries hold a `"`, a few have double spaces);
  an empty `query_class` becomes null.
- `product_class` may join several classes with `|`: the first is CATALOG.product_type, and the
  whole list (stripped, de-duplicated, `|`-joined) is the attribute `product_class`. A product with
  no class gets product_type "unknown" (counted in `stats["products_without_class"]`).
- `product_features` (`|`-separated `key:value` or `key : value`) become the attributes: split at
  the first `:`, key and value stripped; pairs with an empty key, an empty value or no `:` are
  dropped and counted; a repeated key keeps its first value (counted). `;` and `=` are the facet
  text's separators (`schemas.graph.format_facets`), so inside keys they become `-` and inside
  values `;` becomes `,` (counted), which makes `parse_facets(format_facets(attributes))` exact.
- `category hierarchy` (`A / B / C`) becomes `A/B/C`; a missing description is null.
- rating_count, average_rating, review_count (floats upstream) are checked to be non-negative
  numbers or empty, but CATALOG has no column for them, so they are not kept.
- JUDGMENTS: label in the `wands` label set, label_set = annotator = "wands", is_weak False; `id`
  must be a unique integer and (query_id, product_id) unique.

GOLD_NODES, one row per accepted judgment with at least one known node (reasoning graph
`relevance7`): `qs` = the query's query_class (when the query is in query.csv with a class);
`ps` = the product's class: the query_class when it is one of the product's classes, else the first
class; `pa` = `format_facets(attributes)`, the facets exactly as CATALOG holds them (including
`product_class`), for every product in product.csv; `ms` = "match" when the query_class is one of
the product's classes, else "mismatch", only when both are known. `qa`, `ma` and `related` are
never filled: WANDS has no query facets and no class taxonomy to derive them from.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs.delimited import delimited_rows
from jobs.ingest.common import (
    UNKNOWN_PRODUCT_TYPE,
    IngestResult,
    Quarantine,
    TableCounts,
    blank_to_none,
    parse_count,
    parse_id,
    select_files,
)
from schemas.graph import LabelSet, format_facets
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES

SOURCE = "wands"
FILES = {"query": "query.csv", "product": "product.csv", "label": "label.csv"}
QUERY_COLUMNS = ("query_id", "query", "query_class")
PRODUCT_COLUMNS = (
    "product_id",
    "product_name",
    "product_class",
    "category hierarchy",
    "product_description",
    "product_features",
    "rating_count",
    "average_rating",
    "review_count",
)
LABEL_COLUMNS = ("id", "query_id", "product_id", "label")
CLASS_SEPARATOR = "|"
FEATURE_SEPARATOR = "|"
CLASS_ATTRIBUTE = "product_class"
SUBJECT_MATCH, SUBJECT_MISMATCH = "match", "mismatch"


class _Reject(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------- pure parsing of one field


def parse_product_classes(text: str) -> tuple[str, ...]:
    """`"Teen Lounge Furniture|Accent Chairs"` -> both classes, stripped, empty and repeated ones dropped."""
    classes: list[str] = []
    for part in text.split(CLASS_SEPARATOR):
        name = part.strip()
        if name and name not in classes:
            classes.append(name)
    return tuple(classes)


def parse_category_path(text: str) -> str | None:
    """`"Furniture / Living Room Furniture / Sofas"` -> `"Furniture/Living Room Furniture/Sofas"`."""
    parts = [part.strip() for part in text.split("/")]
    parts = [part for part in parts if part]
    return "/".join(parts) if parts else None


def parse_features(text: str) -> tuple[dict[str, str], Counter[str]]:
    """`"color : Blue|material:Oak|:x"` -> ({"color": "Blue", "material": "Oak"}, counts of what was dropped).

    Count keys: `feature_empty_key`, `feature_empty_value`, `feature_without_colon`,
    `feature_duplicate_key`, `feature_separator_replaced`. Empty pieces (`a:1||b:2`) are skipped.
    """
    features: dict[str, str] = {}
    dropped: Counter[str] = Counter()
    for piece in text.split(FEATURE_SEPARATOR):
        if not piece.strip():
            continue
        key, colon, value = piece.partition(":")
        key, value = key.strip(), value.strip()
        if not colon:
            dropped["feature_without_colon"] += 1
            continue
        if not key:
            dropped["feature_empty_key"] += 1
            continue
        if not value:
            dropped["feature_empty_value"] += 1
            continue
        clean_key = key.replace(";", "-").replace("=", "-")
        clean_value = value.replace(";", ",")
        if (clean_key, clean_value) != (key, value):
            dropped["feature_separator_replaced"] += 1
        if clean_key in features:
            dropped["feature_duplicate_key"] += 1
            continue
        features[clean_key] = clean_value
    return features, dropped


def gold_nodes_for_pair(
    query_class: str | None, product_classes: tuple[str, ...] | None, product_facets: str | None
) -> dict[str, str]:
    """The known reasoning-graph nodes of one (query, product) pair, in graph order.

    `query_class`: None when the query or its class is unknown. `product_classes` and
    `product_facets` (the product's `format_facets(attributes)`): None when the product is unknown
    (`()` is a known product without a class).
    """
    nodes: dict[str, str] = {}
    if query_class is not None:
        nodes["qs"] = query_class
    if product_classes:
        nodes["ps"] = query_class if query_class in product_classes else product_classes[0]
    if product_facets is not None:
        nodes["pa"] = product_facets
    if query_class is not None and product_classes:
        nodes["ms"] = SUBJECT_MATCH if query_class in product_classes else SUBJECT_MISMATCH
    return nodes


# ---------------------------------------------------------------- row parsers (values -> record)


def _required_id(values: dict[str, str], column: str) -> str:
    parsed = parse_id(values[column])
    if parsed is None:
        what = "empty" if not values[column].strip() else f"{values[column]!r} is not a non-negative integer"
        raise _Reject(column, f"{column} {what}")
    return parsed


def _required_text(values: dict[str, str], column: str) -> str:
    if not values[column].strip():
        raise _Reject(column, f"{column} is empty")
    return values[column]


def _query_record(values: dict[str, str]) -> dict[str, Any]:
    return {
        "query_id": _required_id(values, "query_id"),
        "query": _required_text(values, "query"),
        "query_class": blank_to_none(values["query_class"].strip()),
        "segment": None,
        "frequency": None,
        "locale": None,
        "source": SOURCE,
    }


def _product_record(values: dict[str, str]) -> dict[str, Any]:
    product_id = _required_id(values, "product_id")
    title = _required_text(values, "product_name")
    for column in ("rating_count", "average_rating", "review_count"):
        try:
            parse_count(values[column])
        except ValueError as error:
            raise _Reject(column, f"{column}: {error}") from None
    classes = parse_product_classes(values["product_class"])
    attributes, dropped = parse_features(values["product_features"])
    if classes:
        if CLASS_ATTRIBUTE in attributes:
            dropped["feature_key_is_product_class"] += 1
        attributes[CLASS_ATTRIBUTE] = CLASS_SEPARATOR.join(classes)
    return {
        "product_id": product_id,
        "title": title,
        "description": blank_to_none(values["product_description"]),
        "product_type": classes[0] if classes else UNKNOWN_PRODUCT_TYPE,
        "category_path": parse_category_path(values["category hierarchy"]),
        "brand": None,
        "attributes": attributes,
        "price": None,
        "source": SOURCE,
        "_classes": classes,
        "_dropped": dropped,
    }


def _label_record(values: dict[str, str], labels: Sequence[str]) -> dict[str, Any]:
    judgment_id = _required_id(values, "id")
    query_id = _required_id(values, "query_id")
    product_id = _required_id(values, "product_id")
    label = values["label"].strip()
    if label not in labels:
        raise _Reject("label", f"label {values['label']!r} is not one of {list(labels)}")
    return {
        "id": judgment_id,
        "query_id": query_id,
        "product_id": product_id,
        "label": label,
        "label_set": SOURCE,
        "annotator": SOURCE,
        "is_weak": False,
    }


# ---------------------------------------------------------------- reading one file


def _read_file(
    path: Path,
    table: str,
    columns: Sequence[str],
    parse: Callable[[dict[str, str]], dict[str, Any]],
    keys: Sequence[tuple[str, ...]],
    quarantine: Quarantine,
) -> tuple[list[dict[str, Any]], TableCounts]:
    """Parse every data row; bad rows (wrong field count, `_Reject`, a repeated key) go to quarantine.

    `keys`: column tuples that must each be unique over accepted rows (the first row wins).
    """
    accepted: list[dict[str, Any]] = []
    seen: list[dict[tuple[str, ...], int]] = [{} for _ in keys]
    read = rejected = 0
    with delimited_rows(path, columns, desc=f"read {path.name}") as (_, rows):
        for row in rows:
            read += 1
            if row.values is None:
                quarantine.add(table, path, row.number, None, row.reason(), row.fields)
                rejected += 1
                continue
            try:
                record = parse(row.values)
                for key, first_rows in zip(keys, seen):
                    value = tuple(record[column] for column in key)
                    if value in first_rows:
                        shown = value[0] if len(value) == 1 else value
                        raise _Reject(
                            ",".join(key),
                            f"duplicate {', '.join(key)} {shown!r}: first seen at row {first_rows[value]}",
                        )
            except _Reject as problem:
                quarantine.add(table, path, row.number, problem.field, problem.reason, row.values)
                rejected += 1
                continue
            for key, first_rows in zip(keys, seen):
                first_rows[tuple(record[column] for column in key)] = row.number
            accepted.append(record)
    counts = TableCounts(table, str(path), read=read, accepted=len(accepted), quarantined=rejected)
    return accepted, counts


def _to_arrow(records: list[dict[str, Any]], schema: pa.Schema, maps: Sequence[str] = ()) -> pa.Table:
    columns = {
        name: [list(r[name].items()) if name in maps else r[name] for r in records] for name in schema.names
    }
    return pa.table(columns, schema=schema)


def read_wands(
    folder: str | Path,
    files: Sequence[str] | None = None,
    strict: bool = False,
    now: dt.datetime | None = None,
) -> IngestResult:
    """Read a WANDS folder. `files`: some of "query", "product", "label" (each must exist), or None
    for whichever of the three exist. `strict`: raise `IngestError` on the first bad row.
    `now`: the quarantine timestamp (default: the current time).
    """
    paths = select_files(Path(folder), FILES, files)
    quarantine = Quarantine(strict, now)
    stats: Counter[str] = Counter()
    counts: dict[str, TableCounts] = {}
    queries = catalog = judgments = gold = None
    query_class: dict[str, str | None] | None = None
    products: dict[str, dict[str, Any]] | None = None

    if "query" in paths:
        records, counts["queries"] = _read_file(
            paths["query"], QUERIES.name, QUERY_COLUMNS, _query_record, [("query_id",)], quarantine
        )
        queries = _to_arrow(records, QUERIES.arrow_schema())
        query_class = {r["query_id"]: r["query_class"] for r in records}
        stats["queries_without_class"] = sum(1 for r in records if r["query_class"] is None)

    if "product" in paths:
        records, counts["catalog"] = _read_file(
            paths["product"],
            CATALOG.name,
            PRODUCT_COLUMNS,
            _product_record,
            [("product_id",)],
            quarantine,
        )
        for record in records:
            stats.update(record["_dropped"])
        stats["products_without_class"] = sum(1 for r in records if not r["_classes"])
        stats["products_without_description"] = sum(1 for r in records if r["description"] is None)
        catalog = _to_arrow(records, CATALOG.arrow_schema(), maps=("attributes",))
        products = {r["product_id"]: r for r in records}

    if "label" in paths:
        label_set = LabelSet.load(SOURCE)
        records, counts["judgments"] = _read_file(
            paths["label"],
            JUDGMENTS.name,
            LABEL_COLUMNS,
            lambda values: _label_record(values, label_set.names),
            [("id",), ("query_id", "product_id")],
            quarantine,
        )
        judgments = _to_arrow(records, JUDGMENTS.arrow_schema())
        gold, gold_stats = _gold_nodes(records, query_class, products, label_set.relevant)
        stats.update(gold_stats)

    return IngestResult(
        catalog=catalog,
        queries=queries,
        judgments=judgments,
        gold_nodes=gold,
        quarantine=quarantine.to_table(),
        counts=counts,
        stats=dict(sorted(stats.items())),
    )


def _gold_nodes(
    judgments: list[dict[str, Any]],
    query_class: dict[str, str | None] | None,
    products: dict[str, dict[str, Any]] | None,
    relevant: Sequence[str],
) -> tuple[pa.Table, Counter[str]]:
    """GOLD_NODES for the accepted judgments, plus diagnostics (unknown queries/products, ms vs label)."""
    stats: Counter[str] = Counter()
    rows = []
    facets = {pid: format_facets(p["attributes"]) for pid, p in (products or {}).items()}
    for judgment in judgments:
        query_id, product_id = judgment["query_id"], judgment["product_id"]
        known_class = None
        if query_class is not None:
            if query_id not in query_class:
                stats["judgments_unknown_query"] += 1
            known_class = query_class.get(query_id)
        product = None
        if products is not None:
            product = products.get(product_id)
            if product is None:
                stats["judgments_unknown_product"] += 1
        nodes = gold_nodes_for_pair(
            known_class,
            product["_classes"] if product else None,
            facets[product_id] if product else None,
        )
        if not nodes:
            stats["judgments_without_gold_nodes"] += 1
            continue
        if "ms" in nodes:
            is_relevant = judgment["label"] in relevant
            if nodes["ms"] == SUBJECT_MISMATCH and is_relevant:
                stats["gold_ms_mismatch_but_relevant_label"] += 1
            if nodes["ms"] == SUBJECT_MATCH and not is_relevant:
                stats["gold_ms_match_but_irrelevant_label"] += 1
        rows.append({"query_id": query_id, "product_id": product_id, "nodes": nodes})
    return _to_arrow(rows, GOLD_NODES.arrow_schema(), maps=("nodes",)), stats
