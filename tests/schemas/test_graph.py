from dataclasses import replace

import networkx as nx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.graph import LabelSet, ReasoningGraph, attribute_checks, attribute_match, check_verdict, format_facets, parse_facets


def test_the_design_graph():
    graph = ReasoningGraph.load("relevance7")
    assert graph.node_names == ["qs", "qa", "ps", "pa", "ms", "ma", "y"]
    digraph = graph.digraph()
    assert isinstance(digraph, nx.DiGraph)
    assert set(digraph.edges) == {("qs", "ms"), ("ps", "ms"), ("qa", "ma"), ("pa", "ma"), ("ms", "y"), ("ma", "y")}
    assert graph.order("label_first") == ("y", "ms", "ma", "qs", "qa", "ps", "pa")
    assert graph.order("reasoning_first") == ("qs", "qa", "ps", "pa", "ms", "ma", "y")
    assert graph.order("product_first") == ("ps", "pa", "qs", "qa", "ms", "ma", "y")
    assert [graph.label_comes_first(order) for order in ("label_first", "reasoning_first", "product_first")] == [True, False, False]
    assert graph.credit_order[0] == "y"
    position = {node: i for i, node in enumerate(graph.credit_order)}
    assert all(position[target] < position[source] for source, target in digraph.edges)


def test_the_default_graph_is_the_design_graph_with_the_checks_written_out():
    graph, design = ReasoningGraph.load(), ReasoningGraph.load("relevance7")
    assert graph.name == "relevance8" and graph.node_names == ["qs", "qa", "ps", "pa", "ac", "ms", "ma", "y"]
    assert set(graph.edges) == (set(design.edges) - {("qa", "ma"), ("pa", "ma")}) | {("qa", "ac"), ("pa", "ac"), ("ac", "ma")}
    assert graph.order("product_first") == ("ps", "pa", "qs", "qa", "ms", "ac", "ma", "y")
    assert graph.node("ma").values == ("match", "partial", "mismatch", "none")
    assert graph.decision_nodes == ["ms", "ma"]


# A user's own graph: a brand node pair instead of the attribute pair.
BRAND_GRAPH = """
name: with_brand
label_node: y
nodes:
  - {name: qs, kind: text}
  - {name: ps, kind: text}
  - {name: qb, kind: text}
  - {name: pb, kind: text}
  - {name: ms, kind: choice, values: [match, mismatch]}
  - {name: mb, kind: choice, values: [match, mismatch, none]}
  - {name: y, kind: label}
edges: [[qs, ms], [ps, ms], [qb, mb], [pb, mb], [ms, y], [mb, y]]
orders:
  reasoning_first: [qs, ps, qb, pb, ms, mb, y]
"""


def test_user_declared_graph_loads_from_a_file(tmp_path):
    path = tmp_path / "brand.yaml"
    path.write_text(BRAND_GRAPH)
    graph = ReasoningGraph.load(path)
    assert graph.decision_nodes == ["ms", "mb"]
    assert graph.digraph().number_of_edges() == 6


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("[ms, y], [mb, y]", "[ms, y], [mb, y], [y, qs]"), "cycle|no outgoing"),
        (lambda t: t.replace("[pb, mb]", "[zz, mb]"), "unknown node 'zz'"),
        (lambda t: t.replace("kind: choice, values: [match, mismatch]}", "kind: choice}"), "needs a `values` list"),
        (lambda t: t.replace("reasoning_first: [qs, ps,", "reasoning_first: [ps,"), "must list every node once"),
    ],
)
def test_bad_graph_files_say_what_is_wrong(tmp_path, edit, message):
    path = tmp_path / "g.yaml"
    path.write_text(edit(BRAND_GRAPH))
    with pytest.raises(ValueError, match=message):
        ReasoningGraph.load(path)


def test_unknown_graph_name_lists_the_bundled_ones():
    with pytest.raises(ValueError, match=r"relevance7"):
        ReasoningGraph.load("nope")


@pytest.mark.parametrize(
    "ms, ma, wands, esci",
    [
        ("match", "match", "Exact", "E"),
        ("match", "none", "Exact", "E"),
        ("match", "partial", "Partial", "S"),
        ("match", "mismatch", "Partial", "S"),
        ("related", "match", "Partial", "C"),
        ("related", "mismatch", "Irrelevant", "I"),
        ("mismatch", "match", "Irrelevant", "I"),
    ],
)
def test_label_rule(ms, ma, wands, esci):
    assert LabelSet.load("wands").label_from_nodes({"ms": ms, "ma": ma}) == wands
    assert LabelSet.load("esci").label_from_nodes({"ms": ms, "ma": ma}) == esci


def test_a_label_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nlabels:\n  - {name: E, gain: 1.0, description: exact, the product fits}\n")
    with pytest.raises(ValueError, match=r"label 'E' has unknown keys \['the product fits'\].*quote a description"):
        LabelSet.load(path)
    assert LabelSet.load("esci").labels[0].description == "exact: the product is relevant and satisfies every constraint"


def test_label_sets_have_gains_in_label_order():
    wands = LabelSet.load("wands")
    assert wands.names == ["Exact", "Partial", "Irrelevant"]
    assert wands.gains == {"Exact": 1.0, "Partial": 0.5, "Irrelevant": 0.0}
    esci = LabelSet.load("esci")
    assert esci.names == ["E", "S", "C", "I"] and esci.gains["C"] == 0.01
    assert esci.relevant == ("E", "S")
    with pytest.raises(ValueError, match="not a label of 'wands'"):
        wands.index("E")


def test_every_decision_combination_has_a_label():
    graph = ReasoningGraph.load()
    for name in ("wands", "esci"):
        labels = LabelSet.load(name)
        for ms in graph.node("ms").values:
            for ma in graph.node("ma").values:
                assert labels.label_from_nodes({"ms": ms, "ma": ma}) in labels.names


facet_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 -'", min_size=1, max_size=12).map(str.strip).filter(
    lambda s: bool(s) and s != "none"
)


@given(st.dictionaries(facet_text, facet_text, max_size=5))
def test_facets_round_trip(facets):
    assert parse_facets(format_facets(facets)) == facets


def test_facets_text_format():
    assert format_facets({}) == "none"
    assert format_facets({"material": "oak", "color": "red"}) == "color=red; material=oak"
    assert parse_facets("color=red; color=blue") is None
    assert parse_facets("color red") is None


def test_attribute_match_counts_the_wanted_values_the_product_has():
    offered = {"color": "gray", "material": "wool"}
    assert attribute_match({}, offered) == "none"
    assert attribute_match({"color": "gray", "material": "wool"}, offered) == "match"
    assert attribute_match({"color": "gray", "material": "linen"}, offered) == "partial"
    assert attribute_match({"color": "blue", "size": "large"}, offered) == "mismatch"  # a key the product lacks is not satisfied


VALUE = st.text(alphabet="ab/-", min_size=1, max_size=4).filter(lambda value: value != "-")  # `-` marks a missing value


@given(st.dictionaries(st.sampled_from("klm"), VALUE, max_size=3), st.dictionaries(st.sampled_from("klm"), VALUE, max_size=3))
def test_check_verdict_reads_back_the_verdict_attribute_checks_writes(wanted, offered):
    # values holding the slash that separates them included: `a/b` against `a/b` is `a/b/a/b`, a yes. A no is misread
    # only where the text is also one value on both sides of its middle slash (`/-/` against no value writes `/-//-`),
    # which `wanted/offered` cannot tell apart
    for check in (parse_facets(attribute_checks(wanted, offered)) or {}).values():
        values, _, verdict = check.rpartition(":")
        middle = len(values) // 2
        one_value_twice = values[middle : middle + 1] == "/" and values[:middle] == values[middle + 1 :]
        assert check_verdict(values) == verdict or (verdict == "no" and one_value_twice)


def test_check_verdict_by_hand_and_the_checks_node_is_declared():
    assert [check_verdict(text) for text in ("gray/gray", "gray/grey", "1/2/1/2", "1/2/1/3", "oak/-", "-/-", "/", "/-//-")] == \
        ["yes", "no", "yes", "no", "no", "no", "no", "yes"]  # the last written for `/-/` against no value: the one misreading
    assert ReasoningGraph.load("relevance8").checks_node == "ac" and ReasoningGraph.load("relevance7").checks_node is None
    graph = ReasoningGraph.load("relevance8")
    with pytest.raises(ValueError, match="checks_node 'ms' must name a facets node"):
        ReasoningGraph(graph.name, graph.nodes, graph.edges, graph.label_node, graph.orders, checks_node="ms")


def test_a_decision_ruled_by_equal_parents_is_declared_on_a_choice_node_with_parents():
    graph = ReasoningGraph.load("relevance8")
    assert [(node.name, node.equal_parents) for node in graph.nodes if node.equal_parents] == [("ms", "match")]
    for name, value in (("ms", "same"), ("ma", "match"), ("qs", "match")):  # not a value; a single parent; not a choice
        nodes = tuple(replace(node, equal_parents=value) if node.name == name else replace(node, equal_parents=None) for node in graph.nodes)
        with pytest.raises(ValueError, match=f"node '{name}': equal_parents '{value}' must be one of the values"):
            replace(graph, nodes=nodes)


def test_attribute_checks_write_the_products_value_beside_each_wanted_one():
    offered = {"color": "gray", "material": "wool"}
    assert attribute_checks({}, offered) == "none"
    assert attribute_checks({"material": "linen", "color": "gray", "size": "large"}, offered) == \
        "color=gray/gray:yes; material=linen/wool:no; size=large/-:no"
