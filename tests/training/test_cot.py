"""CoT rendering, strict and lenient parsing, and the token -> node span map.

Expected texts and spans are written out by hand; the property tests draw random node values.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.graph import LabelSet, ReasoningGraph, format_facets
from training.cot import node_spans, parse_cot, render_cot, token_nodes

GRAPH = ReasoningGraph.load("relevance7")
LABELS = LabelSet.load("wands").names
VALUES = {
    "qs": "sofa", "qa": "color=gray", "ps": "sofa", "pa": "color=gray; material=wool",
    "ms": "match", "ma": "match", "y": "Exact",
}
LABEL_FIRST = "y: Exact\nms: match\nma: match\nqs: sofa\nqa: color=gray\nps: sofa\npa: color=gray; material=wool"


def test_render_label_first_by_hand():
    assert render_cot(VALUES, GRAPH, "label_first") == LABEL_FIRST


def test_render_reasoning_first_by_hand():
    assert render_cot(VALUES, GRAPH, "reasoning_first") == (
        "qs: sofa\nqa: color=gray\nps: sofa\npa: color=gray; material=wool\nms: match\nma: match\ny: Exact"
    )


def test_render_rejects_missing_or_multiline_values():
    with pytest.raises(ValueError, match="no value for node 'y'"):
        render_cot({k: v for k, v in VALUES.items() if k != "y"}, GRAPH, "label_first")
    with pytest.raises(ValueError, match="one non-empty line"):
        render_cot({**VALUES, "qs": "so\nfa"}, GRAPH, "label_first")


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_parse_round_trip(mode):
    parsed = parse_cot(LABEL_FIRST, GRAPH, "label_first", LABELS, mode)
    assert parsed.values == VALUES and parsed.missing == () and parsed.well_formed


def test_strict_stops_at_first_deviation_and_names_missing_nodes():
    text = "y: Exact\nms: match\nqs: sofa\nma: match"
    strict = parse_cot(text, GRAPH, "label_first", LABELS, "strict")
    assert strict.values == {"y": "Exact", "ms": "match"}
    assert strict.missing == ("ma", "qs", "qa", "ps", "pa")
    assert not strict.well_formed and "line 3" in strict.problems[0]
    lenient = parse_cot(text, GRAPH, "label_first", LABELS, "lenient")
    assert lenient.values == {"y": "Exact", "ms": "match", "qs": "sofa", "ma": "match"}
    assert lenient.missing == ("qa", "ps", "pa") and not lenient.well_formed


def test_junk_after_the_last_line_is_not_well_formed_but_keeps_values():
    text = LABEL_FIRST + "\npa: color=red\nqs: lamp"
    strict = parse_cot(text, GRAPH, "label_first", LABELS, "strict")
    assert strict.values == VALUES and not strict.well_formed
    lenient = parse_cot(text, GRAPH, "label_first", LABELS, "lenient")
    assert lenient.values["pa"] == "color=gray; material=wool"  # first occurrence wins
    assert not lenient.well_formed


def test_invalid_values_are_missing():
    text = LABEL_FIRST.replace("ms: match", "ms: maybe").replace("y: Exact", "y: Great")
    strict = parse_cot(text, GRAPH, "label_first", LABELS, "strict")
    assert strict.values == {} and strict.missing[0] == "y"
    lenient = parse_cot(text, GRAPH, "label_first", LABELS, "lenient")
    assert "y" in lenient.missing and "ms" in lenient.missing and lenient.values["qs"] == "sofa"
    bad_facets = parse_cot(LABEL_FIRST.replace("qa: color=gray", "qa: gray"), GRAPH, "label_first", LABELS)
    assert bad_facets.missing == ("qa", "ps", "pa")
    assert parse_cot(LABEL_FIRST, GRAPH, "label_first", None).values["y"] == "Exact"


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown mode"):
        parse_cot("", GRAPH, "label_first", LABELS, "loose")


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parsing_is_total(text):
    for mode in ("strict", "lenient"):
        parsed = parse_cot(text, GRAPH, "reasoning_first", LABELS, mode)
        assert set(parsed.values) | set(parsed.missing) == set(GRAPH.node_names)


WORD = st.text(alphabet=string.ascii_lowercase + "0123456789-&'", min_size=1, max_size=8)
PHRASE = st.lists(WORD, min_size=1, max_size=3).map(" ".join)
FACETS = st.dictionaries(WORD, PHRASE, max_size=4).map(format_facets)


def node_values():
    strategies = {}
    for node in GRAPH.nodes:
        if node.kind == "choice":
            strategies[node.name] = st.sampled_from(node.values)
        elif node.kind == "facets":
            strategies[node.name] = FACETS
        elif node.kind == "label":
            strategies[node.name] = st.sampled_from(LABELS)
        else:
            strategies[node.name] = PHRASE
    return st.fixed_dictionaries(strategies)


@given(node_values(), st.sampled_from(["label_first", "reasoning_first"]))
@settings(max_examples=150, deadline=None)
def test_round_trip_on_random_values(values, order):
    text = render_cot(values, GRAPH, order)
    for mode in ("strict", "lenient"):
        parsed = parse_cot(text, GRAPH, order, LABELS, mode)
        assert parsed.values == values and parsed.missing == () and parsed.well_formed


def test_spans_and_token_map_by_hand():
    text = "y: Exact\nms: match"
    assert node_spans(text, GRAPH) == {"y": (0, 8), "ms": (9, 18)}
    offsets = [(0, 1), (1, 2), (2, 8), (8, 9), (9, 11), (11, 12), (12, 18), (0, 0)]
    assert token_nodes(offsets, node_spans(text, GRAPH)) == ["y", "y", "y", None, "ms", "ms", "ms", None]
    # a token merged across the newline goes to the first line it overlaps
    assert token_nodes([(6, 11)], node_spans(text, GRAPH)) == ["y"]
    # only the first line of a node has a span
    assert node_spans("y: Exact\ny: Partial", GRAPH) == {"y": (0, 8)}


@pytest.fixture(scope="module")
def tokenizer():
    from training.model import train_tokenizer

    texts = ["gray wool sofa", "coffee table", "color=gray; material=wool", "y: Exact Partial Irrelevant"]
    texts += [f"{node.name}: " + " ".join(node.values) for node in GRAPH.nodes]
    return train_tokenizer(iter(texts * 3), 320)


@given(node_values(), st.sampled_from(["label_first", "reasoning_first"]))
@settings(max_examples=60, deadline=None)
def test_every_token_of_a_line_maps_to_its_node(tokenizer, values, order):
    text = render_cot(values, GRAPH, order)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    nodes = token_nodes(encoded["offset_mapping"], node_spans(text, GRAPH))
    lines = dict(zip(GRAPH.order(order), text.split("\n")))
    for node, line in lines.items():
        covered = "".join(text[s:e] for (s, e), owner in zip(encoded["offset_mapping"], nodes) if owner == node)
        assert covered == line
    unowned = "".join(text[s:e] for (s, e), owner in zip(encoded["offset_mapping"], nodes) if owner is None)
    assert unowned == "\n" * (len(lines) - 1)
