"""`relevance datasets`: hand-worked edge cases, properties on the tests world, an independent split reference."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from jobs.datasets import DatasetsConfig, EmptyDatasetError, run
from jobs.hadoop_fs import replace_folder
from jobs.spark import spark_schema
from jobs.training_data.labels import SUPERSEDED, WeakRule
from jobs.training_data.splits import SplitFractions, assign_splits, with_splits
from jobs.world.config import WorldConfig
from jobs.world.generate import generate_world, write_world
from schemas.config import ConfigError, load_config
from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import SchemaMismatchError, read_table, table_path, write_table
from schemas.tables import (
    CANDIDATE_PAIRS,
    CATALOG,
    GOLD_NODES,
    JUDGMENTS,
    QUARANTINE,
    QUERIES,
    QUERY_PRODUCT_STATS,
    TRAINING_EXAMPLES,
)
from training.cot import parse_cot

WANDS = LabelSet.load("wands").names
GRAPH = ReasoningGraph.load("relevance7")


def reference_facets(product: dict) -> dict[str, str]:
    """The documented facets: attributes, plus `brand` when it is set and not already an attribute."""
    facets = dict(product["attributes"])
    if product["brand"] and "brand" not in facets:
        facets["brand"] = product["brand"]
    return facets


# --- the independent split reference: sha256 order per stratum, exact rational cuts ----------------


def reference_splits(segments: dict[str, str | None], fractions: SplitFractions, salt: str) -> dict[str, str]:
    """query_id -> split, from the documented rule, in plain Python (hashlib, Fraction)."""
    strata: dict[str | None, list[str]] = defaultdict(list)
    for query_id, segment in segments.items():
        strata[segment].append(query_id)
    train, validation = Fraction(str(fractions.train)), Fraction(str(fractions.validation))
    splits = {}
    for members in strata.values():
        members.sort(key=lambda q: (hashlib.sha256(f"{salt}:{q}".encode()).hexdigest(), q))
        n = len(members)
        n_train = math.floor(n * train + Fraction(1, 2))
        n_train_validation = math.floor(n * (train + validation) + Fraction(1, 2))
        for rank, query_id in enumerate(members, start=1):
            splits[query_id] = "train" if rank <= n_train else "validation" if rank <= n_train_validation else "test"
    return splits


# --- hand-made inputs --------------------------------------------------------------------------------


def _product(pid: str, product_type: str, brand: str | None, attributes: dict[str, str], price: float = 10.0) -> dict:
    return dict(product_id=pid, title=f"title {pid}", description=f"about {pid}", product_type=product_type,
                category_path=None, brand=brand, attributes=list(attributes.items()), price=price, source="own")


PRODUCTS = [
    _product("p1", "sofa", "Acme", {"color": "gray"}),  # brand joins the facets
    _product("p2", "table", None, {"material": "oak"}),
    _product("p3", "sofa", "Zed", {"brand": "Other", "size": "large"}),  # brand already an attribute: kept as is
    _product("p4", "lamp", "", {}),  # empty brand: not a facet
    _product("p5", "bed", "Nova", {}),
    _product("p6", "bed", None, {}, price=-1.0),  # fails the catalog's row rules
]
FACETS = {"p1": {"color": "gray", "brand": "Acme"}, "p2": {"material": "oak"},
          "p3": {"brand": "Other", "size": "large"},
          "p4": {}, "p5": {"brand": "Nova"}}
QUERY_ROWS = [("q1", "gray sofa", "head"), ("q2", "oak table", "head"), ("q3", "lamp", None), ("q4", "rug", "tail"),
              ("q5", "bed", "tail")]


def _judgment(query_id, product_id, annotator, label, label_set="wands", is_weak=False) -> dict:
    return dict(query_id=query_id, product_id=product_id, label=label, label_set=label_set, annotator=annotator,
                is_weak=is_weak)


JUDGMENT_ROWS = [
    _judgment("q1", "p1", "gold", "Exact"),  # gold beats the human below
    _judgment("q1", "p1", "rater_a", "Partial"),
    _judgment("q1", "p2", "rater_a", "Partial"),
    _judgment("q1", "p2", "rater_b", "Irrelevant"),  # majority Irrelevant; rater_b < rater_c
    _judgment("q1", "p2", "rater_c", "Irrelevant"),
    _judgment("q1", "p3", "rater_b", "Exact"),
    _judgment("q1", "p3", "rater_a", "Partial"),  # a 1-1 tie: the smallest annotator wins
    _judgment("q2", "p1", "rater_a", "Great"),  # label not in the set
    _judgment("q2", "p9", "rater_a", "Exact"),  # unknown product
    _judgment("q9", "p1", "rater_a", "Exact"),  # unknown query
    _judgment("q2", "p2", "rater_e", "E", label_set="esci"),  # another label set: counted, not used
    _judgment("q2", "p2", "rater_a", "Exact"),  # gold y says Partial: a mismatch
    _judgment("q3", "p1", "rater_a", "Irrelevant"),  # null segment; its gold nodes lack `ma`
    _judgment("q3", "p2", "rater_a", None),  # null label: the table's row rules
    _judgment("q4", "p4", "weak:old", "Exact", is_weak=True),  # a weak row of the judgments table
    _judgment("q5", "p5", "rater_a", "Partial"),
    _judgment("q5", "p5", "rater_a", "Exact"),  # repeats the key (query, product, annotator)
    _judgment("q2", "p9", "rater_b", "Great"),  # label and product both bad: the label is named
    _judgment("q5", "p6", "rater_a", "Exact"),  # its product was quarantined from the catalog
]


def _nodes(qs, qa, ps, pa_, ms, ma, y, **extra) -> dict[str, str]:
    return {"qs": qs, "qa": qa, "ps": ps, "pa": pa_, "ms": ms, "ma": ma, "y": y, **extra}


GOLD = {
    ("q1", "p1"): _nodes("sofa", "color=gray", "sofa", "brand=Acme; color=gray", "match", "match", "Exact"),
    ("q2", "p2"): _nodes("table", "material=oak", "table", "material=oak", "match", "match", "Partial"),
    ("q3", "p1"): {"qs": "lamp", "qa": "none", "ps": "sofa", "pa": "brand=Acme; color=gray", "ms": "mismatch",
                   "y": "Irrelevant"},
    ("q4", "p4"): _nodes("rug", "none", "lamp", "none", "mismatch", "none", "Irrelevant"),  # weak row: not used
    ("q5", "p5"): _nodes("bed", "none", "bed", "brand=Nova", "match", "none", "Partial", zz="extra"),  # zz dropped
}
TARGET_Q1_P1 = "y: Exact\nms: match\nma: match\nqs: sofa\nqa: color=gray\nps: sofa\npa: brand=Acme; color=gray"
TARGET_Q2_P2 = "y: Partial\nms: match\nma: match\nqs: table\nqa: material=oak\nps: table\npa: material=oak"
TARGET_Q5_P5 = "y: Partial\nms: match\nma: none\nqs: bed\nqa: none\nps: bed\npa: brand=Nova"

DAY_1, DAY_2, BEFORE = dt.date(2024, 5, 1), dt.date(2024, 5, 2), dt.date(2024, 4, 30)


def _stat(query, product_id, examinations, clicks, orders=0, day=DAY_1) -> dict:
    return dict(query=query, product_id=product_id, impressions=int(examinations * 2), clicks=clicks,
                add_to_carts=orders,
                orders=orders, gmv=10.0 * orders, expected_examinations=float(examinations),
                debiased_ctr=clicks / examinations, product_content_hash="h", ds=day)


STATS = [
    _stat("gray sofa", "p5", 20, 8),  # CTR 0.4 -> Exact (weak:engaged), but q1 is in validation: held out
    _stat("gray sofa", "p1", 30, 0),  # judged: skipped
    _stat("gray sofa", "p4", 18, 2), _stat("gray sofa", "p4", 7, 5, day=DAY_2),  # pooled CTR 7/25 < 0.3: no label
    _stat("lamp", "p4", 30, 0),  # no clicks -> Irrelevant (weak:ignored)
    _stat("lamp", "p2", 30, 0),  # judged (its judgment has a null label, still a judgment): skipped
    _stat("lamp", "p3", 5, 0),  # too few examinations: no label
    _stat("lamp", "p9", 40, 1, orders=2),  # engaged, unknown product: quarantined
    _stat("rug", "p2", 50, 2, orders=1),  # CTR 0.04 but an order -> Exact (weak:engaged)
    _stat("rug", "p1", 50, 3),  # CTR 0.06, no order: no label
    _stat("chair", "p1", 40, 0),  # ignored, but no candidate_pairs row maps "chair" to a query_id: quarantined
    _stat("rug", "p3", 100, 0, day=BEFORE),  # before weak_start: never read
]
QUERY_IDS = {"gray sofa": "q1", "lamp": "q3", "rug": "q4"}
# With the tests world's queries, this salt puts q1 in validation (so its weak row is held out).
SALT = "edge-14"


def _write_edge_inputs(world: Path, weak_root: Path) -> None:
    """The hand-made rows, as one more file in each world table (ids never clash with the world's)."""
    queries = [
        dict(query_id=q, query=text, query_class=None, segment=segment, frequency=None, locale=None, source="own")
        for q, text, segment in QUERY_ROWS
    ]
    gold = [dict(query_id=q, product_id=p, nodes=list(nodes.items())) for (q, p), nodes in GOLD.items()]
    # Judgments use a schema without the declared NOT NULLs: a null label is one of the cases.
    nullable = pa.schema([field.with_nullable(True) for field in JUDGMENTS.arrow_schema()])
    for table, rows, schema in ((CATALOG, PRODUCTS, CATALOG.arrow_schema()), (QUERIES, queries, QUERIES.arrow_schema()),
                                (GOLD_NODES, gold, GOLD_NODES.arrow_schema()), (JUDGMENTS, JUDGMENT_ROWS, nullable)):
        folder = table_path(world, table)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-edge.parquet")
    write_table(QUERY_PRODUCT_STATS, pa.Table.from_pylist(STATS, schema=QUERY_PRODUCT_STATS.arrow_schema()), weak_root)
    candidates = [dict(query=row["query"], query_id=QUERY_IDS[row["query"]], product_id=row["product_id"],
                       product_content_hash="h", impressions=row["impressions"], ds=row["ds"])
                  for row in STATS if row["query"] in QUERY_IDS]
    write_table(CANDIDATE_PAIRS, pa.Table.from_pylist(candidates, schema=CANDIDATE_PAIRS.arrow_schema()), weak_root)


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory) -> dict:
    """One run (Spark is slow to start a job) over the tests world plus the hand-made rows and weak labels."""
    root = tmp_path_factory.mktemp("datasets")
    world, weak_root, out = root / "world", root / "prepared", root / "out"
    write_world(generate_world(WorldConfig.tests(graph=GRAPH.name)), world)  # the hand-made gold nodes are relevance7's
    world_tables = {t.name: read_table(t, world).to_pylist() for t in (CATALOG, QUERIES, JUDGMENTS, GOLD_NODES)}
    _write_edge_inputs(world, weak_root)
    config = DatasetsConfig(data=str(world), out=str(out), salt=SALT, weak_from=str(weak_root),
                            weak_start=DAY_1.isoformat(), spark_master="local[2]", graph=GRAPH.name)
    summary = run(config)
    segments = {r["query_id"]: r["segment"] for r in world_tables["queries"]}
    segments.update({q: segment for q, _, segment in QUERY_ROWS if q != "q4"})  # q4 has weak rows only
    return {"world": world, "out": out, "summary": summary, "tables": world_tables, "segments": segments,
            "splits": reference_splits(segments, SplitFractions(), SALT)}


def _example(split, query_id, product_id, label, label_source, is_weak=False, nodes=None, target=None) -> dict:
    query = {q: (text, segment) for q, text, segment in QUERY_ROWS}[query_id]
    product_type = {p["product_id"]: p["product_type"] for p in PRODUCTS}[product_id]
    return dict(split=split, query_id=query_id, query=query[0], segment=query[1], product_id=product_id,
                title=f"title {product_id}", product_type=product_type, description=f"about {product_id}",
                facets=FACETS[product_id], label_set="wands", label=label, is_weak=is_weak, label_source=label_source,
                nodes=nodes, target=target, cot_order="label_first")


EXPECTED_EXAMPLES = [
    _example("validation", "q1", "p1", "Exact", "gold", nodes=GOLD[("q1", "p1")], target=TARGET_Q1_P1),
    _example("validation", "q1", "p2", "Irrelevant", "rater_b"),
    _example("validation", "q1", "p3", "Partial", "rater_a"),
    _example("train", "q2", "p2", "Exact", "rater_a", nodes=GOLD[("q2", "p2")], target=TARGET_Q2_P2),
    _example("train", "q3", "p1", "Irrelevant", "rater_a"),  # invalid gold nodes: kept without a target
    _example("train", "q3", "p4", "Irrelevant", "weak:ignored", is_weak=True),
    _example("train", "q4", "p2", "Exact", "weak:engaged", is_weak=True),
    _example("train", "q4", "p4", "Exact", "weak:old", is_weak=True),  # weak-only query: train
    _example("train", "q5", "p5", "Partial", "rater_a",
             nodes={k: v for k, v in GOLD[("q5", "p5")].items() if k != "zz"}, target=TARGET_Q5_P5),
]
EXPECTED_QUARANTINE = {
    ("catalog", "value below the minimum 0"): 1,
    ("judgments", SUPERSEDED): 4,
    ("judgments", f"label not in the label set {WANDS}"): 2,
    ("judgments", "product_id not in the catalog"): 2,
    ("judgments", "query_id not in the queries table"): 1,
    ("judgments", "null in a non-nullable column"): 1,
    ("judgments", "duplicate key ['query_id', 'product_id', 'annotator']"): 1,
    ("gold_nodes", "render_cot: no value for node 'ma' (graph 'relevance7'); got ['ms', 'pa', 'ps', 'qa', 'qs', 'y']"):
        1,
    ("query_product_stats", "query_id not in the queries table"): 1,
    ("query_product_stats", "product_id not in the catalog"): 1,
}
EDGE_QUERIES = {q for q, _, _ in QUERY_ROWS}


def test_hand_made_edge_cases(spark, built):
    summary, world_judgments = built["summary"], built["tables"]["judgments"]
    # The split rows here are the independent reference's (the salt was picked for q1 in validation).
    assert {q: built["splits"][q] for q in ("q1", "q2", "q3", "q5")} == {
        "q1": "validation", "q2": "train", "q3": "train", "q5": "train"
    }
    path = str(table_path(built["out"], TRAINING_EXAMPLES))
    examples = spark.read.schema(spark_schema(TRAINING_EXAMPLES)).parquet(path)
    expected = spark.createDataFrame(EXPECTED_EXAMPLES, spark_schema(TRAINING_EXAMPLES))
    assertDataFrameEqual(examples.where(F.col("query_id").isin(*EDGE_QUERIES)), expected, checkRowOrder=False)

    quarantine = read_table(QUARANTINE, built["out"] / "_datasets").to_pylist()
    assert Counter((r["source_table"], r["reason"]) for r in quarantine) == EXPECTED_QUARANTINE  # the world is clean
    (great,) = [r for r in quarantine if r["reason"].startswith("label not in") and "rater_a" in r["record"]]
    assert json.loads(great["record"]) == _judgment("q2", "p1", "rater_a", "Great")
    assert (great["field"], great["source_file"]) == ("label", str(table_path(built["world"], JUDGMENTS)))

    n = len(world_judgments)  # every world judgment is written (checked in the world test)
    assert summary["judgments"] == {
        "rows_in": n + 19, "written": n + 7, "quarantined": 11, "other_label_sets": 1, "weak_held_out": 0,
        "duplicates": {"pairs_judged_several_times": 3, "rows_superseded": 4, "pairs_with_disagreeing_judgments": 3},
    }
    assert summary["weak"] == {
        "pairs": 10, "judged_pairs_skipped": 2, "no_rule_fired": 3, "labelled": {"weak:engaged": 3, "weak:ignored": 2},
        "written": 2, "held_out": 1, "quarantined": 2,
    }
    assert summary["weak_examples"] == {
        "train": {"null": {"weak:ignored": {"Irrelevant": 1}},
                  "tail": {"weak:engaged": {"Exact": 1}, "weak:old": {"Exact": 1}}}
    }
    assert summary["weak_only_queries"] == {"tail": {"train": 1}}
    assert summary["queries"]["null"] == {"train": 1}
    world_targets = {"with_target": n, "judged_without_gold_nodes": 0, "gold_nodes_invalid": 0}
    edge_targets = {k: v - world_targets[k] for k, v in summary["targets"].items() if k in world_targets}
    assert edge_targets == {"with_target": 3, "judged_without_gold_nodes": 2, "gold_nodes_invalid": 1}
    assert json.loads((built["out"] / "_datasets" / "datasets.json").read_text())["judgments"] == summary["judgments"]
    assert [p.name for p in built["out"].iterdir() if p.name.startswith(".")] == []  # no staging folder left behind


def test_tests_world_properties_and_independent_split(built):
    summary, tables = built["summary"], built["tables"]
    rows = read_table(TRAINING_EXAMPLES, built["out"]).to_pylist()  # pyarrow, declared schema: what the SFT reads
    judged = [r for r in rows if not r["is_weak"]]
    world_rows = [r for r in rows if r["query_id"] not in EDGE_QUERIES]
    queries = {r["query_id"]: r for r in tables["queries"]}
    products = {r["product_id"]: r for r in tables["catalog"]}
    gold = {(r["query_id"], r["product_id"]): dict(r["nodes"]) for r in tables["gold_nodes"]}

    # Every world judgment is written once, with its label.
    assert sorted((r["query_id"], r["product_id"], r["label"], r["label_source"]) for r in world_rows) == sorted(
        (r["query_id"], r["product_id"], r["label"], r["annotator"]) for r in tables["judgments"]
    )
    assert summary["written"] == len(rows)
    # No query in two splits; every split is the independent reference's.
    split_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        split_of[row["query_id"]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values())
    assert {r["query_id"]: r["split"] for r in judged} == built["splits"]
    # Per segment, train and train + validation are the configured shares up to rounding.
    for segment, counts in summary["queries"].items():
        n = sum(counts.values())
        assert n == sum(1 for q in built["splits"] if built["segments"][q] == (None if segment == "null" else segment))
        assert abs(counts.get("train", 0) - 0.8 * n) <= 0.5
        assert abs(counts.get("train", 0) + counts.get("validation", 0) - 0.9 * n) <= 0.5
    # 11 head queries: a hash threshold would leave test without head queries 31% of the time.
    assert summary["queries"]["head"]["test"] >= 1
    # Targets parse back (strict) to the row's nodes, which are the gold nodes.
    for row in world_rows:
        parsed = parse_cot(row["target"], GRAPH, "label_first", WANDS)
        assert parsed.well_formed and parsed.values == dict(row["nodes"]) == gold[(row["query_id"], row["product_id"])]
        assert dict(row["facets"]) == reference_facets(products[row["product_id"]])
        query = queries[row["query_id"]]
        assert (row["query"], row["segment"]) == (query["query"], query["segment"])
    noisy = sum(gold[(r["query_id"], r["product_id"])]["y"] != r["label"] for r in tables["judgments"])
    assert summary["targets"]["label_differs_from_gold_y"] == noisy + 1 > 1  # + (q2, p2)
    # datasets.json's split x segment x label counts are the table's.
    counted: dict[tuple, int] = defaultdict(int)
    for row in judged:
        counted[(row["split"], "null" if row["segment"] is None else row["segment"], row["label"])] += 1
    assert {(s, g, label): n for s, by_segment in summary["examples"].items() for g, by_label in by_segment.items()
            for label, n in by_label.items()} == dict(counted)


def test_split_cuts_move_few_queries_when_queries_arrive(spark):
    """Adding m queries to a stratum moves at most one old query per cut per new query, to an adjacent split."""
    fractions = SplitFractions(train=0.6, validation=0.2, test=0.2)
    old = {f"q{i:03d}": ("tail" if i < 40 else "torso" if i < 55 else None) for i in range(60)}
    new = {**old, **{f"n{i}": "tail" for i in range(3)}}
    schema = "query_id string, segment string"
    before, after = (
        {r["query_id"]: r["split"]
         for r in assign_splits(spark.createDataFrame(list(s.items()), schema), fractions, "s").collect()}
        for s in (old, new)
    )
    assert before == reference_splits(old, fractions, "s") and after == reference_splits(new, fractions, "s")
    moved = {q: (before[q], after[q]) for q in old if before[q] != after[q]}
    assert all(old[q] == "tail" for q in moved)  # other strata never move
    assert len(moved) <= 2 * 3
    adjacent = {("train", "validation"), ("validation", "train"), ("validation", "test"), ("test", "validation")}
    assert all(pair in adjacent for pair in moved.values())


def test_weak_only_queries_go_to_train_unless_weak_rows_may_be_evaluated(spark):
    rows = [(f"j{i}", "tail", False) for i in range(8)]
    rows += [("w1", "tail", True), ("w2", "tail", True), ("j0", "tail", True)]  # two weak-only queries, a weak j0 row
    frame = spark.createDataFrame(rows, "query_id string, segment string, is_weak boolean")
    fractions = SplitFractions(train=0.5, validation=0.25, test=0.25)
    kept = with_splits(frame, fractions, "s", weak_train_only=True).collect()
    judged = reference_splits({f"j{i}": "tail" for i in range(8)}, fractions, "s")
    assert {(r["query_id"], r["is_weak"]): r["split"] for r in kept} == {
        **{(q, False): split for q, split in judged.items()}, ("w1", True): "train", ("w2", True): "train",
        ("j0", True): judged["j0"],
    }
    assert {r["query_id"] for r in kept if r["_held_out"]} == ({"j0"} if judged["j0"] != "train" else set())
    mixed = with_splits(frame, fractions, "s", weak_train_only=False).collect()
    every = reference_splits({q: "tail" for q, _, _ in rows}, fractions, "s")
    assert {r["query_id"]: r["split"] for r in mixed} == every and not any(r["_held_out"] for r in mixed)


def test_missing_inputs_are_named(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input tables not found: .*catalog.*queries.*judgments"):
        run(DatasetsConfig(data=str(tmp_path), spark_master="local[2]"))


def test_replace_folder_keeps_the_old_table_when_the_write_fails(spark, tmp_path):
    final = tmp_path / "table"
    final.mkdir()
    (final / "old.txt").write_text("old")

    def failing(staging: str) -> None:
        spark.range(3).write.parquet(staging)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        replace_folder(spark, str(final), failing)
    assert [p.name for p in tmp_path.iterdir()] == ["table"] and (final / "old.txt").read_text() == "old"
    replace_folder(spark, str(final), lambda staging: spark.range(3).write.parquet(staging))
    assert not (final / "old.txt").exists() and spark.read.parquet(str(final)).count() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["table"]


def test_config_rejects_bad_values_by_name(tmp_path):
    with pytest.raises(ConfigError, match="fractions: train \\+ validation \\+ test must be 1"):
        load_config(DatasetsConfig, overrides=["data=x", "fractions.train=0.7"])
    assert load_config(DatasetsConfig, overrides=["data=x", "fractions.train=0.7", "fractions.test=0.2"]).fractions == (
        SplitFractions(train=0.7, validation=0.1, test=0.2)
    )
    for overrides, message in (
        (["label_set=nope"], "unknown label set 'nope'"),
        (["cot_order=sideways"], "has no order 'sideways'"),
        (["weak_start=2024-05-01"], "weak_start: only meaningful with weak_from"),
        (["weak_from=p", "weak_end=May"], "weak_end: must look like YYYY-MM-DD"),
        (["weak_rule.min_examinations=0"], "weak_rule.min_examinations: must be > 0"),
        (["salt="], "salt: must not be empty"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(DatasetsConfig, overrides=["data=x", *overrides])
    assert WeakRule().top_orders == 1


def _small_inputs(root: Path, label_set: str = "wands") -> None:
    queries = [dict(query_id=q, query=text, query_class=None, segment=segment, frequency=None, locale=None, source="own")
               for q, text, segment in QUERY_ROWS]
    labels = {"wands": "Exact", "esci": "E"}
    judgments = [_judgment(q, p, "rater_a", labels[label_set], label_set=label_set)
                 for q, p in (("q1", "p1"), ("q2", "p2"), ("q5", "p5"))]
    for table, rows in ((CATALOG, PRODUCTS[:5]), (QUERIES, queries), (JUDGMENTS, judgments)):
        write_table(table, pa.Table.from_pylist(rows, schema=table.arrow_schema()), root)


def test_bad_inputs_never_replace_good_training_examples(spark, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _small_inputs(data)
    config = DatasetsConfig(data=str(data), out=str(out), spark_master="local[2]")
    assert run(config)["written"] == 3
    examples = table_path(out, TRAINING_EXAMPLES)
    good = {path.name: path.read_bytes() for path in examples.iterdir()}

    # a catalog without `title`: refused when read, before any work (it used to quarantine every judgment)
    catalog = table_path(data, CATALOG) / "part-00000.parquet"
    pq.write_table(pq.read_table(catalog).drop_columns(["title"]), catalog)
    with pytest.raises(SchemaMismatchError, match=rf"{catalog}: columns do not match table 'catalog': missing \['title'\]"):
        run(config)
    assert {path.name: path.read_bytes() for path in examples.iterdir()} == good

    # valid inputs that leave no example (every judgment of another label set): an error, not an empty table
    _small_inputs(data, label_set="esci")
    with pytest.raises(EmptyDatasetError, match=r"no example to write from 3 judgments \(3 of other label sets"):
        run(config)
    assert {path.name: path.read_bytes() for path in examples.iterdir()} == good
