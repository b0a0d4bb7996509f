"""Example encoding and the one token-to-node map: against a slow per-token reference on any ids
(sampled ones included), and against the offset map of a re-tokenised text on the gold CoTs, where
both apply (SFT's node masks depend on it)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.graph import ReasoningGraph
from training.cot import SEPARATOR, node_spans, render_cot, token_nodes
from training.examples import encode_example, load_pairs, streamed_prefix_lengths, token_node_map, whole_queries

GRAPH = ReasoningGraph.load("relevance7")
ORDERS = ("label_first", "reasoning_first")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def slow_token_nodes(tokenizer, ids: list[int], graph: ReasoningGraph) -> list[str | None]:
    """Token by token: the characters a token adds to the decoded text, and the first node line (by tag) they overlap."""
    text_ids = [token for token in ids if token != tokenizer.eos_token_id]
    text = tokenizer.decode(text_ids, skip_special_tokens=False)
    lines, start, seen = [], 0, set()
    for line in text.split("\n"):
        tag = line.partition(SEPARATOR)[0] if SEPARATOR in line else None
        if tag in graph.node_names and tag not in seen:
            seen.add(tag)
            lines.append((tag, start, start + len(line)))
        start += len(line) + 1
    result, kept = [], 0
    for token in ids:
        if token == tokenizer.eos_token_id:
            result.append(None)
            continue
        begin = len(tokenizer.decode(text_ids[:kept], skip_special_tokens=False))
        end = len(tokenizer.decode(text_ids[: kept + 1], skip_special_tokens=False))
        kept += 1
        owners = [tag for tag, first, last in lines if end > begin and begin < last and end > first]
        result.append(owners[0] if owners else None)
    return result


@pytest.mark.parametrize("order", ORDERS)
def test_map_equals_the_offset_map_on_every_gold_cot(tiny_world, tokenizer, order):
    pairs = load_pairs(tiny_world, "wands", "train") + load_pairs(tiny_world, "wands", "validation")
    for pair in pairs:
        cot = render_cot(pair["gold"], GRAPH, order)
        encoded = tokenizer(cot, add_special_tokens=False, return_offsets_mapping=True)
        expected = token_nodes(encoded["offset_mapping"], node_spans(cot, GRAPH))
        assert token_node_map(tokenizer, encoded["input_ids"], GRAPH) == expected


@pytest.mark.parametrize("order", ORDERS)
def test_map_equals_the_slow_reference_on_gold_cots_with_eos(tiny_world, tokenizer, order):
    for pair in load_pairs(tiny_world, "wands", "validation"):
        ids = tokenizer(render_cot(pair["gold"], GRAPH, order), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert token_node_map(tokenizer, ids, GRAPH) == slow_token_nodes(tokenizer, ids, GRAPH)


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_map_equals_the_slow_reference_on_sampled_ids(tokenizer, data):
    """Any ids a policy can draw: junk, byte pieces of a character, special tokens, a cut-off CoT, EOS at the end."""
    line_ids = tokenizer("y: Exact\nms: match\nqs: gray sofa\nqs: lamp", add_special_tokens=False)["input_ids"]
    prefix = data.draw(st.integers(0, len(line_ids)))
    tail = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=12))
    ids = line_ids[:prefix] + [token for token in tail if token != tokenizer.eos_token_id]
    if data.draw(st.booleans()):
        ids.append(tokenizer.eos_token_id)
    assert token_node_map(tokenizer, ids, GRAPH) == slow_token_nodes(tokenizer, ids, GRAPH)


def test_streamed_lengths_are_the_prefix_decodes_and_give_way_inside_a_character(tiny_world, tokenizer):
    """The fast path of the map: on gold CoTs it is taken and equals decoding every prefix; a token that ends
    inside a character (the prefix's decode shows a replacement character) hands the CoT to the prefix decodes."""
    for pair in load_pairs(tiny_world, "wands", "validation")[:50]:
        ids = tokenizer(render_cot(pair["gold"], GRAPH, "reasoning_first"), add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        assert streamed_prefix_lengths(tokenizer, ids, text) == [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
    split = tokenizer("qs: café", add_special_tokens=False)["input_ids"]
    assert len(tokenizer.decode(split[:-1])) == len(tokenizer.decode(split))  # the last token completes the é
    assert streamed_prefix_lengths(tokenizer, split, tokenizer.decode(split)) is None


def test_encoded_targets_end_in_eos_with_no_node(tiny_world, tokenizer):
    pair = load_pairs(tiny_world, "wands", "train")[0]
    example = encode_example(pair, tokenizer, GRAPH, "label_first", 48)
    assert example.target_ids[-1] == tokenizer.eos_token_id and example.target_nodes[-1] is None
    assert len(example.target_nodes) == len(example.target_ids) and example.target_nodes[0] == GRAPH.label_node
    assert example.prompt_ids[-1] != tokenizer.eos_token_id and example.gold == pair["gold"]


def test_a_sample_of_whole_queries_spans_the_split_not_its_key_order_head():
    # queries numbered by popularity, as the world numbers them: a key-order prefix would be the head only
    pairs = [{"query_id": f"q{query:04d}", "product_id": f"p{product}"} for query in range(200) for product in range(query % 7 + 1)]
    sample = whole_queries(pairs, 300)
    kept = {pair["query_id"] for pair in sample}
    assert sample == [pair for pair in pairs if pair["query_id"] in kept]  # whole queries, in the split's order
    assert 300 <= len(sample) < 300 + 7  # stops at the first query that reaches the count
    assert min(kept) < "q0050" and max(kept) >= "q0150"  # from both ends of the key range
    assert whole_queries(list(reversed(pairs)), 300) == list(reversed(sample))  # the choice depends on ids, not on order
    assert whole_queries(pairs, 0) == pairs and whole_queries(pairs, len(pairs)) == pairs
