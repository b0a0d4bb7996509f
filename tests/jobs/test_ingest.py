"""The WANDS and ESCI readers on small files in the real formats and on the real WANDS query.csv.

Expected values are worked by hand from the fixture files (tests/data/wands/, and the ESCI rows
written below), or come from an independent reader (pandas) for the real query.csv.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.delimited import UNBALANCED_QUOTE
from jobs.ingest.common import IngestError, parse_count, parse_id
from jobs.ingest.esci import read_esci
from jobs.ingest.run import IngestConfig, format_counts, run
from jobs.ingest.wands import gold_nodes_for_pair, parse_features, read_wands
from schemas.config import ConfigError, load_config
from schemas.graph import ReasoningGraph, format_facets, parse_facets
from schemas.storage import read_table
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUARANTINE, QUERIES

WANDS_FIXTURE = Path(__file__).parents[1] / "data" / "wands"
WANDS_REAL = Path("/work/shared/data/wands")
NOW = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
T = "\t"


def _tsv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join(T.join(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _quarantined(result) -> list[tuple]:
    return [
        (row["source_table"], Path(row["source_file"]).name, row["row_number"], row["field"])
        for row in result.quarantine.to_pylist()
    ]


# ---------------------------------------------------------------- WANDS: field parsers


def test_parse_features_normalises_spacing_and_counts_what_it_drops():
    features, dropped = parse_features("color : Blue|material:Oak|:x|| size :|madeinusa|time:1:30|color:Red|d:1; 2")
    assert features == {"color": "Blue", "material": "Oak", "time": "1:30", "d": "1, 2"}
    assert dropped == {
        "feature_empty_key": 1,
        "feature_empty_value": 1,
        "feature_without_colon": 1,
        "feature_duplicate_key": 1,
        "feature_separator_replaced": 1,
    }
    assert parse_features("") == ({}, {})


def test_ids_and_counts_parse_strictly():
    assert [parse_id(text) for text in ("0", " 007 ", "12", "", "x7", "-1", "1.0", "٣")] == [
        "0", "7", "12", None, None, None, None, None,
    ]
    assert [parse_count(text) for text in ("15.0", "4", " 3.5 ", "")] == [15.0, 4.0, 3.5, None]
    for bad in ("many", "-1.0", "nan", "inf", "1_0"):
        with pytest.raises(ValueError, match="not a non-negative number"):
            parse_count(bad)


def test_gold_node_rule_for_one_pair():
    classes = ("Teen Lounge Furniture", "Accent Chairs")
    assert gold_nodes_for_pair("Accent Chairs", classes, "color=Navy") == {
        "qs": "Accent Chairs", "ps": "Accent Chairs", "pa": "color=Navy", "ms": "match",
    }
    assert gold_nodes_for_pair("Sofas", classes, "none") == {
        "qs": "Sofas", "ps": "Teen Lounge Furniture", "pa": "none", "ms": "mismatch",
    }
    assert gold_nodes_for_pair(None, classes, None) == {"ps": "Teen Lounge Furniture"}
    assert gold_nodes_for_pair("Sofas", (), "none") == {"qs": "Sofas", "pa": "none"}
    assert gold_nodes_for_pair(None, None, None) == {}
    vocabulary = ReasoningGraph.load("relevance7").node("ms").values
    assert {"match", "mismatch"} <= set(vocabulary)


# ---------------------------------------------------------------- WANDS: the fixture folder


def test_wands_fixture_tables_hold_every_quirk():
    result = read_wands(WANDS_FIXTURE, now=NOW)
    assert {name: (c.read, c.accepted, c.quarantined) for name, c in result.counts.items()} == {
        "queries": (6, 6, 0), "catalog": (5, 5, 0), "judgments": (10, 10, 0),
    }
    assert result.quarantine.num_rows == 0
    assert result.queries.schema == QUERIES.arrow_schema()
    assert result.catalog.schema == CATALOG.arrow_schema()
    assert result.judgments.schema == JUDGMENTS.arrow_schema()
    assert result.gold_nodes.schema == GOLD_NODES.arrow_schema()

    queries = {row["query_id"]: row for row in result.queries.to_pylist()}
    assert list(queries) == ["0", "1", "3", "6", "8", "11"]  # ids with gaps, as strings
    assert queries["6"]["query"] == 'writing desk 48"'  # "writing desk 48""" in the file
    assert queries["8"]["query_class"] is None
    assert {row["source"] for row in queries.values()} == {"wands"}

    products = {row["product_id"]: row for row in result.catalog.to_pylist()}
    assert list(products) == ["0", "1", "2", "5", "9"]
    bed, beanbag, desk, massage, mystery = (products[i] for i in ("0", "1", "2", "5", "9"))
    assert dict(bed["attributes"]) == {
        "overallwidth-sidetoside": "64.7", "dsprimaryproductstyle": "modern", "color": "brown",
        "material": "solid wood", "product_class": "Beds",
    }
    assert bed["category_path"] == "Furniture/Bedroom Furniture/Beds & Headboards/Beds"
    assert beanbag["product_type"] == "Teen Lounge Furniture"
    assert dict(beanbag["attributes"]) == {
        "fillmaterial": "polystyrene beads", "color": "Navy", "assembly time": "0:15",
        "product_class": "Teen Lounge Furniture|Accent Chairs",
    }
    assert desk["title"] == '48" writing desk, white'
    assert desk["description"] is None
    assert dict(desk["attributes"]) == {
        "color": "white", "overallwidth-sidetoside": "48", "dimensions": "48 x 24, 30 h", "product_class": "Desks",
    }
    assert massage["description"] == 'a "quiet" motor.\tfolds flat\nfor storage'  # quoted tab and newline
    assert dict(massage["attributes"]) == {"massagetype": "shiatsu", "heated": "yes", "product_class": "Massage Chairs"}
    assert (mystery["product_type"], mystery["category_path"], mystery["attributes"]) == ("unknown", None, [])
    for product in products.values():
        assert parse_facets(format_facets(dict(product["attributes"]))) == dict(product["attributes"])

    assert result.stats == {
        "feature_duplicate_key": 1,  # product 1: color:Red after color : Navy
        "feature_empty_key": 2,  # product 0 ":oak", product 2 ":"
        "feature_empty_value": 1,  # product 5 "warranty:"
        "feature_separator_replaced": 1,  # product 2 "48 x 24; 30 h"
        "feature_without_colon": 1,  # product 2 "madeinusa"
        "gold_ms_mismatch_but_relevant_label": 1,  # (1, 0): coffee table query, bed, Exact
        "judgments_unknown_product": 1,  # (3, 77)
        "judgments_unknown_query": 1,  # (99, 0)
        "products_without_class": 1,
        "products_without_description": 1,
        "queries_without_class": 1,
    }


def test_wands_gold_nodes_worked_by_hand():
    result = read_wands(WANDS_FIXTURE, now=NOW)
    bed = ("color=brown; dsprimaryproductstyle=modern; material=solid wood; overallwidth-sidetoside=64.7; "
           "product_class=Beds")
    beanbag = ("assembly time=0:15; color=Navy; fillmaterial=polystyrene beads; "
               "product_class=Teen Lounge Furniture|Accent Chairs")
    expected = {
        ("0", "5"): {"qs": "Massage Chairs", "ps": "Massage Chairs",
                     "pa": "heated=yes; massagetype=shiatsu; product_class=Massage Chairs", "ms": "match"},
        ("0", "1"): {"qs": "Massage Chairs", "ps": "Teen Lounge Furniture", "pa": beanbag, "ms": "mismatch"},
        ("3", "1"): {"qs": "Accent Chairs", "ps": "Accent Chairs", "pa": beanbag, "ms": "match"},
        ("6", "2"): {"qs": "Desks", "ps": "Desks", "ms": "match",
                     "pa": "color=white; dimensions=48 x 24, 30 h; overallwidth-sidetoside=48; product_class=Desks"},
        ("8", "0"): {"ps": "Beds", "pa": bed},  # the query has no class
        ("11", "0"): {"qs": "Beds", "ps": "Beds", "pa": bed, "ms": "match"},
        ("11", "9"): {"qs": "Beds", "pa": "none"},  # the product has no class and no features
        ("1", "0"): {"qs": "Coffee & Cocktail Tables", "ps": "Beds", "pa": bed, "ms": "mismatch"},
        ("99", "0"): {"ps": "Beds", "pa": bed},  # query 99 is not in query.csv
        ("3", "77"): {"qs": "Accent Chairs"},  # product 77 is not in product.csv
    }
    got = {(row["query_id"], row["product_id"]): dict(row["nodes"]) for row in result.gold_nodes.to_pylist()}
    assert got == expected


def test_wands_reads_what_is_there_and_names_a_missing_file(tmp_path):
    shutil.copy(WANDS_FIXTURE / "query.csv", tmp_path / "query.csv")
    result = read_wands(tmp_path)
    assert result.queries.num_rows == 6
    assert (result.catalog, result.judgments, result.gold_nodes) == (None, None, None)
    assert list(result.counts) == ["queries"]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "label.csv")):
        read_wands(tmp_path, files=["label"])
    with pytest.raises(FileNotFoundError, match="holds none of"):
        read_wands(_empty_dir(tmp_path))
    # labels without queries or products: gold nodes cannot be known, judgments still are
    shutil.copy(WANDS_FIXTURE / "label.csv", tmp_path / "label.csv")
    only_labels = read_wands(tmp_path, files=["label"])
    assert only_labels.judgments.num_rows == 10 and only_labels.gold_nodes.num_rows == 0
    assert only_labels.stats == {"judgments_without_gold_nodes": 10}


def _empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------- WANDS: the real query.csv


@pytest.mark.skipif(not (WANDS_REAL / "query.csv").is_file(), reason="the WANDS development split is not here")
def test_real_wands_query_csv_matches_an_independent_reader():
    result = read_wands(WANDS_REAL)
    assert list(result.counts) == ["queries"]  # product.csv and label.csv are not in the split
    counts = result.counts["queries"]
    assert (counts.read, counts.accepted, counts.quarantined) == (384, 384, 0)
    queries = result.queries
    assert queries.schema.field("query_id").type == pa.string()
    assert queries["query_class"].null_count == 5

    expected = pd.read_csv(WANDS_REAL / "query.csv", sep="\t", dtype=str, keep_default_na=False)
    assert queries["query_id"].to_pylist() == expected["query_id"].tolist()
    assert queries["query"].to_pylist() == expected["query"].tolist()
    assert queries["query_class"].to_pylist() == [c or None for c in expected["query_class"]]
    by_id = dict(zip(queries["query_id"].to_pylist(), queries["query"].to_pylist()))
    assert by_id["208"] == 'fawkes 36" blue vanity'
    assert by_id["285"] == '48" sliding single track , barn door for laundry'
    assert by_id["391"] == 'writing desk 48"'
    assert sum('"' in query for query in by_id.values()) == 3


# ---------------------------------------------------------------- WANDS: bad input


def _bad_labels(tmp_path: Path) -> Path:
    return _tsv(
        tmp_path / "label.csv",
        [
            ["id", "query_id", "product_id", "label"],
            ["0", "0", "5", "Exact"],  # row 1: good
            ["1", "0", "1"],  # row 2: three fields
            ["x7", "3", "1", "Exact"],  # row 3: non-numeric id
            ["8", "6", "2", "Exactly"],  # row 4: unknown label
            ["9", "6", "", "Partial"],  # row 5: empty product_id
            ["0", "6", "9", "Partial"],  # row 6: id 0 again
            ["10", "0", "5", "Irrelevant"],  # row 7: pair (0, 5) again
            ["12", "11", "0", "Partial"],  # row 8: good
        ],
    )


def test_bad_label_rows_are_quarantined_with_row_and_field_and_counts_reconcile(tmp_path):
    _bad_labels(tmp_path)
    result = read_wands(tmp_path, now=NOW)
    counts = result.counts["judgments"]
    assert (counts.read, counts.accepted, counts.quarantined) == (8, 2, 6)
    assert counts.reconciles and counts.read == result.judgments.num_rows + result.quarantine.num_rows
    assert _quarantined(result) == [
        ("judgments", "label.csv", 2, None),
        ("judgments", "label.csv", 3, "id"),
        ("judgments", "label.csv", 4, "label"),
        ("judgments", "label.csv", 5, "product_id"),
        ("judgments", "label.csv", 6, "id"),
        ("judgments", "label.csv", 7, "query_id,product_id"),
    ]
    rows = result.quarantine.to_pylist()
    assert rows[0]["reason"] == "expected 4 tab-separated fields, got 3"
    assert json.loads(rows[0]["record"]) == ["1", "0", "1"]
    assert json.loads(rows[2]["record"]) == {"id": "8", "query_id": "6", "product_id": "2", "label": "Exactly"}
    assert "first seen at row 1" in rows[4]["reason"] and "first seen at row 1" in rows[5]["reason"]
    assert {row["quarantined_at"] for row in rows} == {NOW}
    assert result.quarantine.schema == QUARANTINE.arrow_schema()
    assert result.judgments["query_id"].to_pylist() == ["0", "11"]


def test_bad_product_rows_are_quarantined(tmp_path):
    header = (WANDS_FIXTURE / "product.csv").read_text(encoding="utf-8").splitlines()[0].split(T)
    _tsv(
        tmp_path / "product.csv",
        [
            header,
            ["1", "sofa", "Sofas", "Furniture / Sofas", "", "color:red", "many", "4.0", "2.0"],
            ["2", "", "Sofas", "", "", "", "1.0", "4.0", "1.0"],
            ["3", "sofa", "Sofas", "", "", "", "1.0", "4.0", "1.0"],
            ["3", "other sofa", "Sofas", "", "", "", "1.0", "4.0", "1.0"],
            ["4", "sofa", "Sofas", "", "", "", "1.0", "-4.0", "1.0"],
        ],
    )
    result = read_wands(tmp_path)
    assert _quarantined(result) == [
        ("catalog", "product.csv", 1, "rating_count"),
        ("catalog", "product.csv", 2, "product_name"),
        ("catalog", "product.csv", 4, "product_id"),
        ("catalog", "product.csv", 5, "average_rating"),
    ]
    assert result.catalog["product_id"].to_pylist() == ["3"]
    assert result.counts["catalog"].reconciles


def test_strict_mode_names_file_row_and_field(tmp_path):
    path = _bad_labels(tmp_path)
    with pytest.raises(IngestError) as error:
        read_wands(tmp_path, strict=True)
    assert str(error.value) == f"{path}: row 2, the whole row: expected 4 tab-separated fields, got 3"
    _tsv(path, [["id", "query_id", "product_id", "label"], ["0", "0", "5", "Exact"], ["x7", "3", "1", "Exact"]])
    with pytest.raises(IngestError, match=r"label\.csv: row 2, field 'id': id 'x7' is not a non-negative integer"):
        read_wands(tmp_path, strict=True)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = _tsv(tmp_path / "product.csv", [["product_id", "product_name", "product_class", "category_hierarchy"]])
    with pytest.raises(ValueError, match=r"product\.csv: missing required columns 'category hierarchy', "):
        read_wands(tmp_path)
    _tsv(path, [["query_id", "query"], ["0", "sofa"]])
    path.rename(tmp_path / "query.csv")
    with pytest.raises(ValueError, match=r"query\.csv: missing required column 'query_class'"):
        read_wands(tmp_path)


# ---------------------------------------------------------------- ESCI


EXAMPLE_ROWS = [
    # example_id, query, query_id, product_id, product_locale, esci_label, small, large, split
    (0, "revent 80 cfm", 0, "B000MOO21W", "us", "I", 0, 1, "train"),
    (1, "revent 80 cfm", 0, "B07X3Y6B1V", "us", "E", 0, 1, "train"),
    (2, "!qscreen fence", 1, "B000MOO21W", "es", "S", 1, 1, "test"),
    (6, "ドア ストッパー", 5, "B01N0GN4EC", "jp", "C", 1, 1, "train"),
    (9, "revent 80 cfm", 0, "B0XXXXXXXX", "us", "E", 0, 1, "train"),
]
PRODUCT_ROWS = [
    # product_id, title, description, bullet_point, brand, color, locale
    ("B000MOO21W", "Panasonic FV-20VQ3", "<p>quiet fan</p>", "80 CFM\nquiet", "Panasonic", "White", "us"),
    ("B07X3Y6B1V", 'Fan 12" "Whisper"', None, "fits 4\" ducts", "", None, "us"),
    ("B000MOO21W", "Valla de privacidad", "", "  ", "ColourTree", "Verde", "es"),
    ("B01N0GN4EC", "ドアストッパー", None, None, None, " 黒 ", "jp"),
]


def _write_esci(folder: Path, examples=EXAMPLE_ROWS, products=PRODUCT_ROWS, example_types=None) -> Path:
    folder.mkdir(exist_ok=True)
    names = ["example_id", "query", "query_id", "product_id", "product_locale", "esci_label",
             "small_version", "large_version", "split"]
    types = example_types or [pa.int64(), pa.string(), pa.int64(), pa.string(), pa.string(), pa.string(),
                              pa.int64(), pa.int64(), pa.string()]
    columns = list(zip(*examples)) if examples else [[] for _ in names]
    pq.write_table(
        pa.table([pa.array(list(c), t) for c, t in zip(columns, types)], names=names),
        folder / "shopping_queries_dataset_examples.parquet",
    )
    product_names = ["product_id", "product_title", "product_description", "product_bullet_point",
                     "product_brand", "product_color", "product_locale"]
    product_columns = list(zip(*products))
    pq.write_table(
        pa.table([pa.array(list(c), pa.string()) for c in product_columns], names=product_names),
        folder / "shopping_queries_dataset_products.parquet",
    )
    return folder


def test_esci_fixture_maps_to_our_tables(tmp_path):
    result = read_esci(_write_esci(tmp_path / "esci"), now=NOW)
    assert {name: (c.read, c.accepted, c.quarantined, c.filtered) for name, c in result.counts.items()} == {
        "catalog": (4, 4, 0, 0), "judgments": (5, 5, 0, 0),
    }
    assert result.gold_nodes is None and result.quarantine.num_rows == 0
    assert result.catalog.schema == CATALOG.arrow_schema()
    assert [(r["product_id"], r["title"], r["description"], r["brand"], r["attributes"], r["product_type"])
            for r in result.catalog.to_pylist()] == [
        ("us:B000MOO21W", "Panasonic FV-20VQ3", "<p>quiet fan</p>", "Panasonic", [("color", "White")], "unknown"),
        ("us:B07X3Y6B1V", 'Fan 12" "Whisper"', 'fits 4" ducts', None, [], "unknown"),
        ("es:B000MOO21W", "Valla de privacidad", None, "ColourTree", [("color", "Verde")], "unknown"),
        ("jp:B01N0GN4EC", "ドアストッパー", None, None, [("color", "黒")], "unknown"),
    ]
    assert set(result.catalog["source"].to_pylist()) == {"esci"}
    assert result.queries.to_pylist() == [
        {"query_id": "0", "query": "revent 80 cfm", "query_class": None, "segment": None, "frequency": None,
         "locale": "us", "source": "esci"},
        {"query_id": "1", "query": "!qscreen fence", "query_class": None, "segment": None, "frequency": None,
         "locale": "es", "source": "esci"},
        {"query_id": "5", "query": "ドア ストッパー", "query_class": None, "segment": None, "frequency": None,
         "locale": "jp", "source": "esci"},
    ]
    assert result.judgments.schema == JUDGMENTS.arrow_schema()
    assert [(r["query_id"], r["product_id"], r["label"]) for r in result.judgments.to_pylist()] == [
        ("0", "us:B000MOO21W", "I"), ("0", "us:B07X3Y6B1V", "E"), ("1", "es:B000MOO21W", "S"),
        ("5", "jp:B01N0GN4EC", "C"), ("0", "us:B0XXXXXXXX", "E"),
    ]
    assert {(r["label_set"], r["annotator"], r["is_weak"]) for r in result.judgments.to_pylist()} == {
        ("esci", "esci", False)
    }
    assert result.stats == {
        "judgments_unknown_product": 1,  # us:B0XXXXXXXX
        "products_bullets_as_description": 1,  # us:B07X3Y6B1V
        "products_without_description": 2,  # es (blank bullets) and jp
    }


def test_esci_locale_filter_counts_filtered_rows(tmp_path):
    result = read_esci(_write_esci(tmp_path / "esci"), locale="us")
    assert {name: (c.read, c.accepted, c.quarantined, c.filtered) for name, c in result.counts.items()} == {
        "catalog": (4, 2, 0, 2), "judgments": (5, 3, 0, 2),
    }
    assert all(c.reconciles for c in result.counts.values())
    assert result.queries["query_id"].to_pylist() == ["0"]
    assert result.catalog["product_id"].to_pylist() == ["us:B000MOO21W", "us:B07X3Y6B1V"]
    with pytest.raises(ValueError, match="not an ESCI locale"):
        read_esci(tmp_path / "esci", locale="en")


def test_esci_bad_rows_are_quarantined_and_counts_reconcile(tmp_path):
    examples = EXAMPLE_ROWS + [
        (10, "revent 80 cfm", 0, "B07X3Y6B1V", "us", "X", 0, 1, "train"),  # row 6: unknown label
        (11, None, 7, "B07X3Y6B1V", "us", "E", 0, 1, "train"),  # row 7: no query
        (1, "revent 80 cfm", 0, "B0ZZZZZZZZ", "us", "E", 0, 1, "train"),  # row 8: example_id 1 again
        (12, "revent 80 cfm", 0, "B07X3Y6B1V", "us", "S", 0, 1, "train"),  # row 9: pair (0, us:B07X3Y6B1V) again
        (13, "revent 80cfm", 0, "B0YYYYYYYY", "us", "E", 0, 1, "train"),  # row 10: query 0 with other text
        (14, "revent 80 cfm", 0, "B0YYYYYYYY", "es", "E", 0, 1, "train"),  # row 11: query 0 in another locale
        (15, "fence", 8, " ", "es", "E", 0, 1, "train"),  # row 12: blank product_id
        (16, "fence", 8, "B0Q", None, "E", 0, 1, "train"),  # row 13: no locale
    ]
    products = PRODUCT_ROWS + [
        ("B000MOO21W", "duplicate", None, None, None, None, "us"),  # row 5: (us, B000MOO21W) again
        ("B0EMPTYTTL", "   ", None, None, None, None, "us"),  # row 6: blank title
    ]
    result = read_esci(_write_esci(tmp_path / "esci", examples, products), now=NOW)
    assert _quarantined(result) == [
        ("catalog", "shopping_queries_dataset_products.parquet", 5, "product_id"),
        ("catalog", "shopping_queries_dataset_products.parquet", 6, "product_title"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 6, "esci_label"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 7, "query"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 8, "example_id"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 9, "query_id,product_id"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 10, "query"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 11, "product_locale"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 12, "product_id"),
        ("judgments", "shopping_queries_dataset_examples.parquet", 13, "product_locale"),
    ]
    rows = result.quarantine.to_pylist()
    assert rows[0]["reason"] == "duplicate product_id 'us:B000MOO21W': first seen at row 1"
    assert rows[2]["reason"] == "esci_label 'X' is not one of ['E', 'S', 'C', 'I']"
    assert rows[4]["reason"] == "duplicate example_id '1': first seen at row 2"
    assert rows[6]["reason"] == "query_id '0' has query 'revent 80 cfm' at row 1, here 'revent 80cfm'"
    assert json.loads(rows[3]["record"])["query"] is None and json.loads(rows[3]["record"])["query_id"] == "7"
    for name, (read, accepted, quarantined) in {"catalog": (6, 4, 2), "judgments": (13, 5, 8)}.items():
        counts = result.counts[name]
        assert (counts.read, counts.accepted, counts.quarantined, counts.filtered) == (read, accepted, quarantined, 0)
        assert counts.reconciles
    accepted = result.catalog.num_rows + result.judgments.num_rows
    assert accepted + result.quarantine.num_rows == len(products) + len(examples)
    with pytest.raises(IngestError, match=r"products\.parquet: row 5, field 'product_id': duplicate product_id"):
        read_esci(tmp_path / "esci", strict=True)


def test_esci_reads_what_is_there_and_rejects_wrong_columns(tmp_path):
    folder = _write_esci(tmp_path / "esci")
    (folder / "shopping_queries_dataset_products.parquet").unlink()
    result = read_esci(folder)
    assert result.catalog is None and result.judgments.num_rows == 5 and "judgments_unknown_product" not in result.stats
    with pytest.raises(FileNotFoundError, match="shopping_queries_dataset_products.parquet"):
        read_esci(folder, files=["products"])

    float_ids = [pa.int64(), pa.string(), pa.float64(), pa.string(), pa.string(), pa.string(),
                 pa.int64(), pa.int64(), pa.string()]
    _write_esci(folder, example_types=float_ids)
    with pytest.raises(ValueError, match=r"examples\.parquet: column 'query_id' has type double"):
        read_esci(folder)
    pq.write_table(pa.table({"product_id": ["B1"], "product_title": ["t"]}),
                   folder / "shopping_queries_dataset_products.parquet")
    with pytest.raises(ValueError, match=r"products\.parquet: missing required columns 'product_description'"):
        read_esci(folder, files=["products"])



def test_an_unbalanced_quote_costs_its_own_row_only(tmp_path):
    rows = [["id", "query_id", "product_id", "label"]] + [[str(i), "0", str(i), "Exact"] for i in range(40)]
    rows[5][3] = '"Exact'  # data row 5: a quote that never closes
    _tsv(tmp_path / "label.csv", rows)
    result = read_wands(tmp_path, files=["label"])
    assert result.judgments.num_rows == 39
    quarantined = result.quarantine.to_pylist()
    assert [(row["row_number"], row["reason"]) for row in quarantined] == [(5, UNBALANCED_QUOTE)]
    assert sorted(result.judgments.column("product_id").to_pylist(), key=int) == [str(i) for i in range(40) if i != 4]


def test_a_wands_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "query.csv").write_bytes("query_id\tquery\tquery_class\n0\tsofa\tSofas\n1\tb\xe9d\tBeds\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"query\.csv: line 3 is not UTF-8 text"):
        read_wands(tmp_path, files=["query"])


def test_a_truncated_esci_parquet_is_named(tmp_path):
    folder = _write_esci(tmp_path / "esci")
    products = folder / "shopping_queries_dataset_products.parquet"
    products.write_bytes(products.read_bytes()[: products.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"products\.parquet: not a readable parquet file"):
        read_esci(folder, files=["products"])


# ---------------------------------------------------------------- run(config)


def test_run_writes_the_tables_and_logs_counts(tmp_path, caplog):
    source = tmp_path / "wands"
    shutil.copytree(WANDS_FIXTURE, source)
    _bad_labels(source)
    config = load_config(IngestConfig, overrides=["format=wands", f"source={source}", f"out={tmp_path / 'data'}"])
    with caplog.at_level(logging.INFO, logger="jobs"):
        result = run(config)
    printed = caplog.text
    assert "judgments             8          2            6" in printed
    assert "gold_nodes" in printed and "(derived)" in printed
    for name, declared in {"catalog": CATALOG, "queries": QUERIES, "judgments": JUDGMENTS,
                           "gold_nodes": GOLD_NODES, "quarantine": QUARANTINE}.items():
        written = read_table(declared, tmp_path / "data")
        expected = result.quarantine if name == "quarantine" else result.tables()[name]
        assert written.equals(expected), name
    assert format_counts(result) in printed


def test_ingest_config_rejects_bad_values_with_a_fix(tmp_path):
    with pytest.raises(ConfigError, match="locale applies to format=esci only"):
        IngestConfig(format="wands", source=WANDS_FIXTURE, out=tmp_path, locale="us")
    with pytest.raises(ConfigError, match="not an ESCI locale"):
        IngestConfig(format="esci", source=WANDS_FIXTURE, out=tmp_path, locale="de")
    with pytest.raises(ConfigError, match="is not a folder"):
        IngestConfig(format="wands", source=tmp_path / "nope", out=tmp_path)
    with pytest.raises(ConfigError, match=r"\['examples'\] are not wands files"):
        IngestConfig(format="wands", source=WANDS_FIXTURE, out=tmp_path, files=("examples",))
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(IngestConfig, overrides=["format=csv", f"source={WANDS_FIXTURE}", f"out={tmp_path}"])
    config = load_config(IngestConfig, overrides=["format=esci", f"source={tmp_path}", f"out={tmp_path}",
                                                   "locale=us", "files=examples", "strict=true"])
    assert (config.locale, config.files, config.strict) == ("us", ("examples",), True)
