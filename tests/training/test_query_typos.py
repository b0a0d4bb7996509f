"""Query typos: each edit, the words they leave alone, and how SFT draws them beside value swaps."""

from __future__ import annotations

import random

import pytest

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph
from training.examples import encode_example, load_pairs
from training.model import load_model
from training.query_typos import SHORTEST_WORD, draw_typos, with_typo
from training.sft import SFTConfig, training_examples

GRAPH, LABELS = ReasoningGraph.load("relevance8"), LabelSet.load("wands")


def test_each_edit_changes_one_letter_of_one_long_word():
    # the long words of "red oak coffee table" are coffee (0) and table (1)
    assert with_typo("red oak coffee table", which=0.0, where=0.0, edit="swap", letter=0.0) == "red oak ocffee table"
    assert with_typo("red oak coffee table", which=0.9, where=0.9, edit="swap", letter=0.0) == "red oak coffee tabel"
    assert with_typo("red oak coffee table", which=0.9, where=0.0, edit="drop", letter=0.0) == "red oak coffee able"
    assert with_typo("red oak coffee table", which=0.9, where=0.99, edit="double", letter=0.0) == "red oak coffee tablee"
    # the replacement is one of the 25 other letters: a for t at letter 0, z at the top
    assert with_typo("red oak coffee table", which=0.9, where=0.0, edit="replace", letter=0.0) == "red oak coffee aable"
    assert with_typo("red oak coffee table", which=0.9, where=0.0, edit="replace", letter=0.999) == "red oak coffee zable"
    assert with_typo("red oak coffee table", which=0.9, where=0.2, edit="replace", letter=0.0) == "red oak coffee tbble"


def test_no_typo_where_no_word_qualifies_or_the_edit_changes_nothing():
    assert with_typo("red rug 8x10", which=0.5, where=0.5, edit="drop", letter=0.0) is None  # short words, digits
    assert with_typo("100%cotton", which=0.5, where=0.5, edit="drop", letter=0.0) is None  # not letters alone
    assert with_typo("coffee", which=0.0, where=0.4, edit="swap", letter=0.0) is None  # swaps f with f
    with pytest.raises(ValueError, match="edit"):
        with_typo("coffee table", which=0.0, where=0.0, edit="insert", letter=0.0)


def test_draws_keep_the_pair_and_depend_on_the_generator_seed_and_position_alone():
    pairs = [{"query": "oak coffee table", "gold": {"qs": "coffee table"}}, {"query": "rug", "gold": {"qs": "area rug"}}]
    assert draw_typos(pairs, 0.0, random.Random(3)) == [None, None]
    always = draw_typos(pairs, 1.0, random.Random(3))
    assert always[1] is None  # nothing to misspell
    assert always[0]["query"] != pairs[0]["query"] and always[0]["gold"] == pairs[0]["gold"]
    assert draw_typos(pairs, 1.0, random.Random(3)) == always
    # five draws per pair whatever it is: the draw at position 1 does not depend on what sits at position 0
    second = draw_typos([pairs[0], pairs[0]], 1.0, random.Random(3))[1]
    assert draw_typos([pairs[1], pairs[0]], 1.0, random.Random(3))[1] == second


def test_sft_draws_typos_on_top_of_the_swaps_the_same_for_every_split_of_a_micro_batch(tiny_world, tiny_model):
    _, tokenizer = load_model(tiny_model)
    train = load_pairs(tiny_world, "wands", "train")
    indices = list(range(len(train)))
    swapped = training_examples(SFTConfig(data=tiny_world, model=tiny_model, value_swaps=1.0, query_typos=0.0), train, tokenizer, GRAPH, LABELS)
    both = training_examples(SFTConfig(data=tiny_world, model=tiny_model, value_swaps=1.0, query_typos=1.0), train, tokenizer, GRAPH, LABELS)
    whole = both(7, indices, slice(None))
    assert both(7, indices, slice(0, 10)) + both(7, indices, slice(10, None)) == whole
    # over the swaps: the prompts change, the targets stay those of the swapped pair
    before = swapped(7, indices, slice(None))
    assert any(typed.prompt_ids != example.prompt_ids for typed, example in zip(whole, before))
    assert all(typed.target_ids == example.target_ids for typed, example in zip(whole, before))
    # alone, at share 1: every query with a long word gets a typo but where the edit leaves it as it was (a swap of two
    # equal letters), and no other query; the targets are the pair's own
    typos_alone = training_examples(SFTConfig(data=tiny_world, model=tiny_model, value_swaps=0.0, query_typos=1.0), train, tokenizer, GRAPH, LABELS)
    plain = [encode_example(pair, tokenizer, GRAPH, SFTConfig().order, SFTConfig().prompt_tokens) for pair in train]
    typed = typos_alone(7, indices, slice(None))
    misspellable = {index for index, pair in enumerate(train) if any(len(word) >= SHORTEST_WORD and word.isalpha() for word in pair["query"].split(" "))}
    changed = {index for index, (example, unchanged) in enumerate(zip(typed, plain)) if example.prompt_ids != unchanged.prompt_ids}
    assert changed <= misspellable and len(changed) >= 0.9 * len(misspellable) > 0
    assert all(example.target_ids == unchanged.target_ids for example, unchanged in zip(typed, plain))
    with pytest.raises(ConfigError, match="query_typos"):
        SFTConfig(query_typos=-0.1)
