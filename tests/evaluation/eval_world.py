"""A small seeded world for evaluation tests (a helper module, not conftest.py: test folders have no
__init__.py, so module names must be unique across tests/): judgments, gold nodes, queries,
catalog, predictions."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from schemas.graph import LabelSet
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES, RELEVANCE

WANDS = LabelSet.load("wands")
MS_OF_LABEL = {"Exact": "match", "Partial": "related", "Irrelevant": "mismatch"}
SCORED_AT = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)


@dataclass(frozen=True)
class World:
    judgments: pa.Table
    gold_nodes: pa.Table
    queries: pa.Table
    catalog: pa.Table
    gold: dict[tuple[str, str], str]


def make_world(seed: int = 0, n_queries: int = 30, per_query: int = 8) -> World:
    rng = np.random.default_rng(seed)
    labels = WANDS.names
    rows, node_rows, gold = [], [], {}
    for q in range(n_queries):
        for p in range(per_query):
            label = labels[rng.choice(3, p=[0.3, 0.3, 0.4])]
            key = (f"q{q}", f"p{q}_{p}")
            gold[key] = label
            rows.append({"query_id": key[0], "product_id": key[1], "label": label, "label_set": "wands",
                         "annotator": "gold", "is_weak": False})
            node_rows.append({"query_id": key[0], "product_id": key[1],
                              "nodes": [("ms", MS_OF_LABEL[label]), ("qa", "color=red; size=l"), ("y", label)]})
    queries = {"query_id": [f"q{q}" for q in range(n_queries)], "query": [f"query {q}" for q in range(n_queries)],
               "query_class": [None] * n_queries, "segment": [("head", "torso", "tail")[q % 3] for q in range(n_queries)],
               "frequency": [1.0] * n_queries, "locale": [None] * n_queries, "source": ["synthetic"] * n_queries}
    products = [key[1] for key in gold]
    catalog = {"product_id": products, "title": products, "description": [None] * len(products),
               "product_type": [("sofa", "lamp")[i % 2] for i in range(len(products))],
               "category_path": [None] * len(products), "brand": [None] * len(products),
               "attributes": [[] for _ in products], "price": [1.0] * len(products),
               "source": ["synthetic"] * len(products)}
    return World(
        judgments=pa.Table.from_pylist(rows, schema=JUDGMENTS.arrow_schema()),
        gold_nodes=pa.Table.from_pylist(node_rows, schema=GOLD_NODES.arrow_schema()),
        queries=pa.Table.from_pydict(queries, schema=QUERIES.arrow_schema()),
        catalog=pa.Table.from_pydict(catalog, schema=CATALOG.arrow_schema()),
        gold=gold,
    )


def make_predictions(
    gold: dict[tuple[str, str], str], seed: int, accuracy: float, name: str = "model",
    drop: int = 0, extra: int = 0,
) -> pa.Table:
    """A RELEVANCE table: the gold label kept with probability `accuracy`, else a random other label;
    probabilities put 0.5-0.9 on the predicted label. `drop` gold pairs get no prediction, `extra`
    predictions have no gold pair."""
    rng = np.random.default_rng(seed)
    labels = WANDS.names
    keys = list(gold)[drop:] + [(f"extra{i}", f"x{i}") for i in range(extra)]
    rows = []
    for query_id, product_id in keys:
        true = gold.get((query_id, product_id), "Irrelevant")
        label = true if rng.random() < accuracy else rng.choice([other for other in labels if other != true])
        top = rng.uniform(0.5, 0.9)
        rest = rng.dirichlet([1.0, 1.0]) * (1 - top)
        probs = dict(zip([other for other in labels if other != label], rest)) | {label: top}
        rows.append({
            "query": query_id, "query_id": query_id, "product_id": product_id, "label": label, "label_set": "wands",
            "label_probs": list(probs.items()),
            "expected_gain": sum(p * WANDS.gains[name] for name, p in probs.items()),
            "node_decisions": [("ms", MS_OF_LABEL[label])] + ([("qa", "size=L;color=Red")] if rng.random() < 0.5 else []),
            "reasoning": None, "product_content_hash": None, "model_name": name, "model_version": "1",
            "scored_at": SCORED_AT, "ds": SCORED_AT.date(),
        })
    return pa.Table.from_pylist(rows, schema=RELEVANCE.arrow_schema())

