"""Counterfactual twins: worked by hand, refused where the rules do not hold, drawn by the SFT loop."""

from __future__ import annotations

import pytest

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph, attribute_match
from training.counterfactual import TwinMaker, replace_word
from training.sft import SFTConfig, masked_micro_batches

GRAPH = ReasoningGraph.load("relevance7")
WANDS = LabelSet.load("wands")


def pair(query_attributes: str, attributes: dict[str, str], *, title: str, ms: str = "match", product_type: str = "sofa",
         description: str | None = None) -> dict:
    from schemas.graph import format_facets, parse_facets

    ma = attribute_match(parse_facets(query_attributes), attributes)
    return {"query_id": "q", "product_id": "p", "query": "q", "title": title, "product_type": product_type, "attributes": attributes,
            "description": description,
            "gold": {"qs": "sofa", "qa": query_attributes, "ps": product_type, "pa": format_facets(attributes), "ms": ms, "ma": ma,
                     "y": WANDS.label_from_nodes({"ms": ms, "ma": ma})}}


GRAY_SOFA = pair("color=gray", {"color": "gray", "material": "wool", "brand": "Acme"}, title="Gray wool sofa by Acme",
                 description="A gray sofa; grayish is not gray.")
BLUE_SOFA = pair("color=blue", {"color": "blue", "material": "wool"}, title="Blue sofa")
RED_LAMP = pair("none", {"color": "red"}, title="Red lamp", product_type="lamp")


def maker(pairs, seed=0) -> TwinMaker:
    return TwinMaker.from_pairs(pairs, WANDS, GRAPH, seed)


def test_a_satisfied_constraint_gets_another_value_of_its_type_and_the_text_follows():
    twin = maker([GRAY_SOFA, BLUE_SOFA, RED_LAMP]).twin(GRAY_SOFA, 0)
    # red is only seen on a lamp: the one other sofa color is blue
    assert twin["attributes"] == {"color": "blue", "material": "wool", "brand": "Acme"}
    assert twin["title"] == "blue wool sofa by Acme" and twin["description"] == "A blue sofa; grayish is not blue."
    assert twin["gold"] == {**GRAY_SOFA["gold"], "pa": "brand=Acme; color=blue; material=wool", "ma": "mismatch", "y": "Partial"}
    assert GRAY_SOFA["attributes"]["color"] == "gray"  # the pair itself is untouched


def test_an_unsatisfied_constraint_gets_the_wanted_value():
    wants_blue = pair("color=blue", {"color": "gray", "material": "wool"}, title="Gray wool sofa")
    twin = maker([wants_blue, BLUE_SOFA]).twin(wants_blue, 0)
    assert twin["title"] == "blue wool sofa" and (twin["gold"]["ma"], twin["gold"]["y"]) == ("match", "Exact")


def test_two_satisfied_constraints_give_partial_or_mismatch_twins():
    wants_two = pair("color=gray; material=wool", {"color": "gray", "material": "wool"}, title="t")
    other = pair("color=blue; material=linen", {"color": "blue", "material": "linen"}, title="t")
    twins = [maker([wants_two, other], seed).twin(wants_two, 0) for seed in range(30)]
    assert {(str(t["attributes"]), t["gold"]["ma"]) for t in twins} == {
        ("{'color': 'blue', 'material': 'wool'}", "partial"), ("{'color': 'gray', 'material': 'linen'}", "partial"),
        ("{'color': 'blue', 'material': 'linen'}", "mismatch")}
    assert {t["gold"]["y"] for t in twins} == {"Partial"}  # ms match, some or no constraint held


def test_twins_are_a_function_of_seed_and_index():
    wants_two = pair("color=gray; material=wool", {"color": "gray", "material": "wool"}, title="t")
    other = pair("color=blue; material=linen", {"color": "blue", "material": "linen"}, title="t")
    twin_maker = maker([wants_two, other])
    assert twin_maker.twin(wants_two, 3) == twin_maker.twin(wants_two, 3)
    assert len({str(maker([wants_two, other], seed).twin(wants_two, 3)["attributes"]) for seed in range(30)}) == 3


def test_no_twin_without_a_constrained_key_on_the_product_or_when_the_gold_breaks_the_rules():
    twin_maker = maker([GRAY_SOFA, BLUE_SOFA, RED_LAMP])
    assert twin_maker.twin(RED_LAMP, 0) is None  # the query constrains nothing
    assert twin_maker.twin(pair("size=large", {"color": "gray"}, title="t"), 0) is None  # the product lacks the key
    assert twin_maker.twin({**GRAY_SOFA, "gold": {**GRAY_SOFA["gold"], "ma": "partial"}}, 0) is None  # a teacher's ma, not the rule's
    assert twin_maker.twin({**GRAY_SOFA, "gold": {**GRAY_SOFA["gold"], "y": "Irrelevant"}}, 0) is None
    assert twin_maker.twin({**GRAY_SOFA, "gold": {**GRAY_SOFA["gold"], "pa": "color=gray"}}, 0) is None  # pa is not the facets


def test_whole_words_only_whatever_the_case():
    assert replace_word("Queen-size bed, QUEEN", "queen", "king") == "king-size bed, king"
    assert replace_word("bred redwood", "red", "blue") == "bred redwood"
    assert replace_word(None, "red", "blue") is None
    assert replace_word("a \\1 b", "a", "c\\1") == "c\\1 \\1 b"


def test_config_refuses_a_share_or_a_graph_it_cannot_serve():
    with pytest.raises(ConfigError, match="counterfactual_share: must be a share"):
        SFTConfig(counterfactual_share=1.5)
    with pytest.raises(ConfigError, match="qa and pa feed"):
        SFTConfig(graph="relevance8", order="reasoning_first", counterfactual_share=0.5)
    SFTConfig(graph="relevance8", order="reasoning_first")  # without twins the graph trains as before


def test_the_loop_draws_twins_at_the_share_and_leaves_the_masks_as_they_were():
    def drawn(share: float):
        calls = []

        def example_at(index: int, twin: bool):
            calls.append(twin)
            from training.examples import Example

            return Example("q", "p", (1,), (5, 6, 7), ("qs", "ms", "y"), {})

        config = SFTConfig(batch_size=64, counterfactual_share=share, p_mask=0.5)
        batches = masked_micro_batches(7, config, example_at, 1000, ["qs", "ms"], None, {})
        return calls, [labels for batch in batches for _, labels, _ in batch]

    calls, masked = drawn(0.0)
    assert calls == [False] * 64
    calls_half, masked_half = drawn(0.5)
    assert masked_half == masked  # the twin draws come after the masks
    assert 16 < sum(calls_half) < 48
    assert all(drawn(1.0)[0])
