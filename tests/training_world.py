"""A hand-made world small enough for training and scoring tests: 8 products, 6 queries, 48 judged pairs,
and the models trained on it (session fixtures, registered in tests/conftest.py).

The same root holds `training_examples` as `relevance datasets` would write it: queries in
VALIDATION_QUERIES form the validation split, the rest train, plus one weak-labelled train row
without nodes (trainers must skip it).

Gold nodes follow the world's rules by hand: ms is match when the types agree, related inside a
room, mismatch otherwise; ma compares the query's facets with the product's; y is the WANDS rule
of `LabelSet.label_from_nodes`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from schemas.graph import LabelSet, ReasoningGraph, attribute_checks, attribute_match, format_facets
from schemas.storage import write_table
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES, TRAINING_EXAMPLES
from training.cot import render_cot

PRODUCTS = [
    ("p1", "Gray wool sofa by Acme", "sofa", {"color": "gray", "material": "wool"}, "living"),
    ("p2", "Blue leather sofa", "sofa", {"color": "blue", "material": "leather"}, "living"),
    ("p3", "Oak coffee table", "coffee table", {"material": "oak"}, "living"),
    ("p4", "White marble coffee table", "coffee table", {"color": "white", "material": "marble"}, "living"),
    ("p5", "Queen bed frame in pine", "bed frame", {"material": "pine", "size": "queen"}, "bedroom"),
    ("p6", "King bed frame, black metal", "bed frame", {"color": "black", "material": "metal", "size": "king"}, "bedroom"),
    ("p7", "Cotton sheet set, queen", "sheet set", {"material": "cotton", "size": "queen"}, "bedroom"),
    ("p8", "Steel table lamp", "table lamp", {"material": "steel"}, "living"),
]
QUERY_ROWS = [
    ("q1", "gray sofa", "sofa", {"color": "gray"}),
    ("q2", "sofa", "sofa", {}),
    ("q3", "oak coffee table", "coffee table", {"material": "oak"}),
    ("q4", "queen bed frame", "bed frame", {"size": "queen"}),
    ("q5", "sheet set", "sheet set", {}),
    ("q6", "black metal bed frame", "bed frame", {"color": "black", "material": "metal"}),
]
VALIDATION_QUERIES = ("q2", "q5")


def gold_nodes(query: tuple, product: tuple, rooms: dict[str, str]) -> dict[str, str]:
    _, _, qtype, qfacets = query
    pid, _, ptype, pfacets, room = product
    pfacets = {**pfacets, "brand": "Acme"} if pid == "p1" else pfacets
    if ptype == qtype:
        ms = "match"
    elif rooms[qtype] == room:
        ms = "related"
    else:
        ms = "mismatch"
    nodes = {"qs": qtype, "qa": format_facets(qfacets), "ps": ptype, "pa": format_facets(pfacets), "ac": attribute_checks(qfacets, pfacets),
             "ms": ms, "ma": attribute_match(qfacets, pfacets)}
    nodes["y"] = LabelSet.load("wands").label_from_nodes(nodes)
    return nodes


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_world")
    rooms = {ptype: room for _, _, ptype, _, room in PRODUCTS}
    catalog = [
        {"product_id": pid, "title": title, "description": f"A {ptype} for the {room}.", "product_type": ptype,
         "category_path": f"{room}/{ptype}", "brand": "Acme" if pid == "p1" else None, "attributes": list(facets.items()), "price": 10.0,
         "source": "synthetic"}
        for pid, title, ptype, facets, room in PRODUCTS
    ]
    queries = [
        {"query_id": qid, "query": text, "query_class": qtype, "segment": "head", "frequency": 0.1, "locale": "us",
         "source": "synthetic"}
        for qid, text, qtype, _ in QUERY_ROWS
    ]
    judgments, gold = [], []
    for query in QUERY_ROWS:
        for product in PRODUCTS:
            nodes = gold_nodes(query, product, rooms)
            judgments.append({"query_id": query[0], "product_id": product[0], "label": nodes["y"], "label_set": "wands",
                              "annotator": "gold", "is_weak": False})
            gold.append({"query_id": query[0], "product_id": product[0], "nodes": list(nodes.items())})
    graph = ReasoningGraph.load()
    examples = [
        {"split": "validation" if query[0] in VALIDATION_QUERIES else "train", "query_id": query[0], "query": query[1],
         "segment": "head", "product_id": product[0], "title": product[1], "product_type": product[2],
         "description": f"A {product[2]} for the {product[4]}.",
         "facets": list({**product[3], **({"brand": "Acme"} if product[0] == "p1" else {})}.items()),
         "label_set": "wands", "label": nodes["y"], "is_weak": False, "label_source": "gold", "nodes": list(nodes.items()),
         "target": render_cot(nodes, graph, "label_first"), "cot_order": "label_first"}
        for query in QUERY_ROWS for product in PRODUCTS for nodes in [gold_nodes(query, product, rooms)]
    ]
    weak = {**examples[0], "query_id": "q7", "query": "wool sofa", "label": "Exact", "is_weak": True,
            "label_source": "weak:engaged", "nodes": None, "target": None}
    for table, rows in ((CATALOG, catalog), (QUERIES, queries), (JUDGMENTS, judgments), (GOLD_NODES, gold),
                        (TRAINING_EXAMPLES, examples + [weak])):
        write_table(table, pa.Table.from_pylist(rows, schema=table.arrow_schema()), root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_world, tmp_path_factory) -> Path:
    from training.model import ModelInitConfig, init_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    return init_tiny_model(
        ModelInitConfig(world=tiny_world, out=out, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, intermediate_size=64, max_positions=256)
    )


@pytest.fixture(scope="session")
def sft_policy(tiny_world, tiny_model, tmp_path_factory) -> Path:
    """The tiny model after SFT on this world: its rollouts are mostly well formed and their rewards vary
    within a group, which the GRPO tests need."""
    from training.sft import SFTConfig, run

    out = tmp_path_factory.mktemp("sft_policy")
    # relevance7: the GRPO tests' budgets (max_new_tokens, steps) are sized for its shorter CoT; the demo test runs relevance8.
    # value_swaps=0 and query_typos=0 in these fixtures: they learn the tiny world's own six queries, which the tests that use them read
    run(SFTConfig(data=tiny_world, model=tiny_model, out=out, graph="relevance7", order="label_first", batch_size=8, max_steps=400, warmup_steps=10, lr=1e-2,
                  val_items=4, max_new_tokens=8, eval_batch_size=4, checkpoint_every=0, threads=1, value_swaps=0.0, query_typos=0.0))
    return out / "model"


@pytest.fixture(scope="session")
def vllm_policy(tiny_world, tmp_path_factory) -> Path:
    """A `relevance model init` policy of width 128, briefly SFT-trained (not the `tiny_model` fixture: its head
    size of 16 has no kernel in vLLM's CPU attention, which takes 32, 64, 80, ...)."""
    from training.model import ModelInitConfig, init_tiny_model
    from training.sft import SFTConfig, run

    # 2 layers x 128 (head size 32): the smallest shape vLLM's CPU attention runs; 400 steps, since at 250 an AVX-512 CPU's
    # numerics left it writing CoTs that ran past the token budget (session 24)
    base = init_tiny_model(ModelInitConfig(world=tiny_world, out=tmp_path_factory.mktemp("vllm_base"), num_layers=2, intermediate_size=256))
    out = tmp_path_factory.mktemp("vllm_sft")
    run(SFTConfig(data=tiny_world, model=base, out=out, graph="relevance7", order="label_first", batch_size=8, max_steps=400, warmup_steps=10, lr=1e-2, val_items=4,
                  max_new_tokens=8, eval_batch_size=4, checkpoint_every=0, threads=1, value_swaps=0.0, query_typos=0.0))
    return out / "model"


@pytest.fixture(scope="session")
def vllm_checks_policy(tiny_world, tmp_path_factory) -> Path:
    """As `vllm_policy`, trained on relevance8 in product_first order (the demo's format): its CoT writes the attribute
    checks whose verdicts checked decoding computes."""
    from training.model import ModelInitConfig, init_tiny_model
    from training.sft import SFTConfig, run

    base = init_tiny_model(ModelInitConfig(world=tiny_world, out=tmp_path_factory.mktemp("vllm_checks_base"), num_layers=2, intermediate_size=256))
    out = tmp_path_factory.mktemp("vllm_checks_sft")
    # 600 steps: at 400 a Zen 4 CPU's numerics left it writing 4 well-formed CoTs of 48 on unseen queries (session 31), 31 at 600
    run(SFTConfig(data=tiny_world, model=base, out=out, graph="relevance8", order="product_first", batch_size=8, max_steps=600, warmup_steps=10,
                  lr=1e-2, val_items=4, max_new_tokens=8, eval_batch_size=4, checkpoint_every=0, threads=1, value_swaps=0.0, query_typos=0.0))
    return out / "model"


def unruled_graph(folder: Path) -> Path:
    """relevance7 without its subject rule (`equal_parents`), as a YAML file in `folder`: a graph in whose CoT checked
    decoding has nothing to compute."""
    from schemas.graph import resolve_yaml

    rule = "    equal_parents: match"
    text = resolve_yaml("relevance7", "graphs", "graph").read_text()
    assert rule in text
    path = folder / "relevance7_unruled.yaml"
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith(rule)) + "\n")
    return path
