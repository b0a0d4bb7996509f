"""CoT rendering, strict and lenient parsing, and the token -> node span map.

Expected texts and spans are written out by hand; the property tests draw random node values.
"""

from __future__ import annotations

import re
import string
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from schemas.graph import LabelSet, ReasoningGraph, attribute_checks, format_facets
from training.cot import (
    SEPARATOR,
    STRIP_CLASS,
    VALUE_MAX_CHARS,
    checked_rules,
    cot_regex,
    may_break_a_rule,
    node_spans,
    parse_cot,
    render_cot,
    token_nodes,
    verdicts_follow_values,
)

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


# ---------------------------------------------------------------- cot_regex


def gold_cots(world, order: str) -> list[str]:
    from training.examples import load_pairs

    pairs = load_pairs(world, "wands", "train") + load_pairs(world, "wands", "validation")
    assert len(pairs) == 48
    return [render_cot(pair["gold"], GRAPH, order) for pair in pairs]


NOT_COTS = [
    LABEL_FIRST.replace("ms: match", "ms: maybe"),  # not a choice value
    LABEL_FIRST.replace("y: Exact", "y: Great"),  # not a label
    LABEL_FIRST.replace("\nma: match", ""),  # a missing line
    LABEL_FIRST + "\nqs: lamp",  # a line after the last node
    LABEL_FIRST + " ",  # trailing text
    LABEL_FIRST + "\n",
    render_cot(VALUES, GRAPH, "reasoning_first"),  # the other order
    LABEL_FIRST.replace("qs: sofa", "qs:  sofa"),  # a space at the edge of a value
    LABEL_FIRST.replace("qs: sofa", "qs: sofa\u00a0"),
    LABEL_FIRST.replace("qs: sofa", "qs: " + "s" * (VALUE_MAX_CHARS + 1)),  # over the length bound
    LABEL_FIRST.replace("qa: color=gray", "qa: gray"),  # facets without '='
    LABEL_FIRST.replace("qa: color=gray", "qa: color=gray;material=wool"),  # not as format_facets writes it
    LABEL_FIRST.replace("qa: color=gray", "qa: color=gray; "),
]


def test_strip_class_is_the_whitespace_str_strip_removes():
    every_character = "".join(map(chr, range(sys.maxunicode + 1)))
    assert re.findall(f"[{STRIP_CLASS}]", every_character) == [char for char in every_character if char.isspace()]


@pytest.mark.parametrize("order", ["label_first", "reasoning_first"])
def test_cot_regex_matches_the_gold_cots_of_the_tiny_world(tiny_world, order):
    regex = cot_regex(GRAPH, LABELS, order)
    for text in gold_cots(tiny_world, order):
        assert re.fullmatch(regex, text), text


@pytest.mark.parametrize("text", NOT_COTS)
def test_cot_regex_refuses_other_texts(text):
    assert re.fullmatch(cot_regex(GRAPH, LABELS, "label_first"), text) is None


def test_xgrammar_reads_cot_regex_as_python_re_does(tiny_world):
    """vLLM's structured outputs (xgrammar backend) accept the gold CoTs and refuse the other texts."""
    xgr = pytest.importorskip("xgrammar")
    regex = cot_regex(GRAPH, LABELS, "label_first")
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_regex(regex)

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return matcher.accept_string(text) and matcher.is_terminated()

    assert all(accepts(text) for text in gold_cots(tiny_world, "label_first"))
    assert not any(accepts(text) for text in NOT_COTS)


LINE = st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=VALUE_MAX_CHARS).filter(lambda text: text == text.strip())


def text_node_values():
    """Node values whose text nodes are any single line without edge whitespace (any Unicode inside)."""
    return node_values().flatmap(lambda values: st.fixed_dictionaries(
        {**{name: st.just(value) for name, value in values.items()}, **{node.name: LINE for node in GRAPH.nodes if node.kind == "text"}}
    ))


@given(text_node_values(), st.sampled_from(["label_first", "reasoning_first"]))
@settings(max_examples=100, deadline=None)
def test_cot_regex_matches_every_rendered_cot(values, order):
    assert re.fullmatch(cot_regex(GRAPH, LABELS, order), render_cot(values, GRAPH, order))


FACETS_NODES = [node.name for node in GRAPH.nodes if node.kind == "facets"]


@given(node_values(), st.integers(min_value=0), st.text(max_size=2), st.integers(min_value=0, max_value=2))
@settings(max_examples=300, deadline=None)
def test_what_cot_regex_matches_parses_strictly(values, position, insert, delete):
    """Edits of a rendered CoT: whatever the regex still matches is well formed, unless a facets value repeats a key."""
    text = render_cot(values, GRAPH, "reasoning_first")
    cut = position % (len(text) + 1)
    edited = text[:cut] + insert + text[cut + delete:]
    if re.fullmatch(cot_regex(GRAPH, LABELS, "reasoning_first"), edited):
        parsed = parse_cot(edited, GRAPH, "reasoning_first", LABELS, "strict")
        facets = [line.partition(SEPARATOR)[2] for line in edited.split("\n") if line.split(SEPARATOR)[0] in FACETS_NODES]
        keys = [[entry.partition("=")[0] for entry in value.split("; ")] for value in facets]
        assert parsed.well_formed or any(len(set(names)) < len(names) for names in keys), (edited, parsed.problems)


CHECKS_TAG = "ac: "


def test_verdicts_follow_values_by_hand():
    assert verdicts_follow_values("ac: color=red/red:y", CHECKS_TAG) and verdicts_follow_values("ac: color=red/blue:", CHECKS_TAG)
    assert not verdicts_follow_values("ac: color=red/blue:y", CHECKS_TAG)
    assert not verdicts_follow_values("ac: color=red/blue:no; size=king/king:n", CHECKS_TAG)  # the last check's verdict begun wrong
    assert not verdicts_follow_values("ac: color=red/red:ye; size", CHECKS_TAG)  # a verdict cut short by the next check
    assert not verdicts_follow_values("ac: color=red/red:\nma: match", CHECKS_TAG)  # or by the end of the line
    assert verdicts_follow_values("ac: time=10:30/10:30:yes", CHECKS_TAG)  # a colon inside a value is not a verdict
    assert verdicts_follow_values("ac: none\nma: none", CHECKS_TAG) and verdicts_follow_values("qa: color=red/blue:yes", CHECKS_TAG)


FACETS = st.dictionaries(st.sampled_from(["color", "size", "style"]), st.sampled_from(["red", "king", "a/b"]), max_size=3)


@given(FACETS, FACETS)
def test_every_prefix_of_true_checks_follows_and_a_flipped_verdict_does_not(wanted, offered):
    line = f"{CHECKS_TAG}{attribute_checks(wanted, offered)}\nma: match"
    assert all(verdicts_follow_values(line[:end], CHECKS_TAG) for end in range(len(line) + 1))
    for verdict, flipped in ((":yes", ":no"), (":no", ":yes")):
        at = line.find(verdict)
        if at >= 0:
            assert not verdicts_follow_values(line[:at] + flipped + line[at + len(verdict) :], CHECKS_TAG)


@given(FACETS, FACETS, st.integers(0, 120), st.text(alphabet="abyz -=/;:\nesno", max_size=4))
def test_a_piece_that_cannot_change_a_verdict_never_makes_an_accepted_line_refused(wanted, offered, cut, piece):
    # what lets checked decoding take most tokens without decoding the response
    line = f"{CHECKS_TAG}{attribute_checks(wanted, offered)}\nma: match"[:cut]
    assume(not may_break_a_rule(piece))
    assert verdicts_follow_values(line + piece, CHECKS_TAG)


SUBJECTS = st.sampled_from(["bed", "sofa", "bed frame"])


@given(SUBJECTS, SUBJECTS, st.sampled_from(["match", "related", "mismatch"]), st.integers(0, 12),
       st.text(alphabet="abcdehilmrstx \n:", max_size=5))
def test_a_piece_that_cannot_change_a_decision_never_makes_an_accepted_line_refused(query_subject, product_subject, value, cut, piece):
    rules = checked_rules(ReasoningGraph.load("relevance8"))
    above = f"ps: {product_subject}\npa: none\nqs: {query_subject}\nqa: none\n"
    line = f"ms: {value}\nac: none"[:cut]
    assume(rules.follows(above + line, len(above)) and not may_break_a_rule(piece, rules.words))
    assert rules.follows(above + line + piece, len(above))
    if (value == "match") != (query_subject == product_subject):  # the value the subjects refuse, once written whole
        assert not rules.follows(f"{above}ms: {value}\n", len(above))
