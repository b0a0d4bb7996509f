"""Value swaps: what a swap rewrites, which pairs it leaves alone, and how SFT draws them."""

from __future__ import annotations

import random

import pytest

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph, attribute_checks, attribute_match, format_facets, resolve_yaml
from training.examples import encode_example, load_pairs
from training.model import load_model
from training.sft import SFTConfig, training_examples
from training.value_swaps import ValueSwaps

GRAPH, LABELS = ReasoningGraph.load("relevance8"), LabelSet.load("wands")


def _pair(query: str, subject: str, wanted: dict, product_type: str, offered: dict) -> dict:
    gold = {"qs": subject, "qa": format_facets(wanted), "ps": product_type, "pa": format_facets(offered),
            "ac": attribute_checks(wanted, offered), "ms": "match" if subject == product_type else "mismatch",
            "ma": attribute_match(wanted, offered)}
    gold["y"] = LABELS.label_from_nodes(gold)
    return {"query_id": "q", "product_id": "p", "query": query, "gold": gold}


NORDHOLM = _pair("nordholm metal coffee table", "coffee table", {"brand": "Nordholm", "material": "metal"},
                 "coffee table", {"brand": "Nordholm", "material": "metal"})
VELORA = _pair("sofa", "sofa", {}, "sofa", {"brand": "Velora", "material": "leather"})


def test_a_named_value_is_swapped_in_the_query_and_every_node_that_follows_from_it():
    swaps = ValueSwaps([NORDHOLM, VELORA], GRAPH, LABELS)
    assert swaps.values == {"brand": ("Nordholm", "Velora"), "material": ("leather", "metal")}
    assert swaps.swappable(NORDHOLM) == (("brand", 0, 8), ("material", 9, 14))
    swapped = swaps.swapped(NORDHOLM, swaps.swappable(NORDHOLM), which=0.0, to=0.0)
    # the query's lower case kept; the product's facets, subjects and subject match untouched
    assert swapped["query"] == "velora metal coffee table"
    assert swapped["gold"] == {**NORDHOLM["gold"], "qa": "brand=Velora; material=metal",
                               "ac": "brand=Velora/Nordholm:no; material=metal/metal:yes", "ma": "partial", "y": "Partial"}
    assert NORDHOLM["query"] == "nordholm metal coffee table"  # the pair itself is not changed
    material = swaps.swapped(NORDHOLM, swaps.swappable(NORDHOLM), which=0.9, to=0.0)
    assert material["query"] == "nordholm leather coffee table" and material["gold"]["ma"] == "partial"


def test_pairs_whose_gold_breaks_the_rules_and_values_not_named_once_are_left_alone():
    swaps = ValueSwaps([NORDHOLM, VELORA], GRAPH, LABELS)
    wrong_label = {**NORDHOLM, "gold": {**NORDHOLM["gold"], "y": "Irrelevant"}}
    assert swaps.swappable(wrong_label) == ()  # a rater's label, not the graph's rule: never rewritten
    assert swaps.swappable(VELORA) == ()  # no constraint
    synonym = _pair("wooden table", "table", {"material": "wood"}, "table", {"material": "wood"})
    assert swaps.swappable(synonym) == ()  # the query does not write the value
    twice = _pair("metal lamp with metal shade", "lamp", {"material": "metal"}, "lamp", {"material": "metal"})
    assert swaps.swappable(twice) == ()
    in_subject = _pair("white board", "white board", {"color": "white"}, "white board", {"color": "white"})
    assert swaps.swappable(in_subject) == ()  # the value's words are the subject's
    part_of_a_word = _pair("metallic lamp", "lamp", {"material": "metal"}, "lamp", {"material": "metal"})
    assert swaps.swappable(part_of_a_word) == ()
    # the only other value of the key is named by the query already: no swap
    both = _pair("metal lamp leather", "lamp", {"material": "metal"}, "lamp", {"material": "metal"})
    assert swaps.swapped(both, swaps.swappable(both), which=0.0, to=0.0) is None


def test_draws_depend_on_the_generator_seed_and_position_alone():
    swaps = ValueSwaps([NORDHOLM, VELORA], GRAPH, LABELS)
    assert swaps.draw([0, 1, 0], 0.0, random.Random(1)) == [None, None, None]
    always = swaps.draw([0, 1, 0], 1.0, random.Random(1))
    assert always[1] is None and always[0]["query"] != NORDHOLM["query"] and always[2]["query"] != NORDHOLM["query"]
    assert swaps.draw([0, 1, 0], 1.0, random.Random(1)) == always
    # three draws per index whatever the pair: the draws of index 0 at position 2 do not depend on what sits at position 1
    assert swaps.draw([0, 0, 0], 1.0, random.Random(1))[2] == always[2]


def test_a_graph_without_checks_recomputes_the_attribute_match_and_one_without_it_cannot_swap(tmp_path):
    relevance7 = ReasoningGraph.load("relevance7")
    pair = {**NORDHOLM, "gold": {node: value for node, value in NORDHOLM["gold"].items() if node != "ac"}}
    swaps = ValueSwaps([pair, VELORA], relevance7, LABELS)
    swapped = swaps.swapped(pair, swaps.swappable(pair), which=0.0, to=0.0)
    assert swapped["gold"] == {**pair["gold"], "qa": "brand=Velora; material=metal", "ma": "partial", "y": "Partial"}
    # an attribute match that reads only the query's facets: nothing computes it from a swapped value
    text = resolve_yaml("relevance7", "graphs", "graph").read_text().replace("  - [pa, ma]\n", "")
    (tmp_path / "no_match_rule.yaml").write_text(text.replace("name: relevance7", "name: no_match_rule"))
    with pytest.raises(ConfigError, match=r"value_swaps: graph 'no_match_rule': value swaps need .*; set value_swaps=0"):
        SFTConfig(graph=str(tmp_path / "no_match_rule.yaml"), order="label_first")
    SFTConfig(graph=str(tmp_path / "no_match_rule.yaml"), order="label_first", value_swaps=0.0)
    with pytest.raises(ConfigError, match="value_swaps"):
        SFTConfig(value_swaps=1.5)


def test_sft_draws_the_same_swaps_for_every_split_of_a_micro_batch(tiny_world, tiny_model):
    _, tokenizer = load_model(tiny_model)
    train = load_pairs(tiny_world, "wands", "train")
    config = SFTConfig(data=tiny_world, model=tiny_model, value_swaps=1.0, query_typos=0.0)  # the swaps alone
    examples_of = training_examples(config, train, tokenizer, GRAPH, LABELS)
    indices = list(range(len(train)))
    whole = examples_of(7, indices, slice(None))
    assert examples_of(7, indices, slice(0, 10)) + examples_of(7, indices, slice(10, None)) == whole
    plain = [encode_example(pair, tokenizer, GRAPH, config.order, config.prompt_tokens) for pair in train]
    swapped = [example for example, unswapped in zip(whole, plain) if example != unswapped]
    named = [pair for pair in train if ValueSwaps(train, GRAPH, LABELS).swappable(pair)]
    assert named and len(swapped) == len(named)  # at share 1, every pair that names a value, and only those
    unswapped = training_examples(SFTConfig(data=tiny_world, model=tiny_model, value_swaps=0.0, query_typos=0.0), train, tokenizer, GRAPH,
                                  LABELS)
    assert unswapped(7, indices, slice(None)) == plain
