"""Relevance rows from a policy: the label distribution is the label step's softmax over the labels' tokens."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import torch

from schemas.graph import LabelSet, ReasoningGraph
from schemas.tables import RELEVANCE
from training.cot import parse_cot
from training.decoding import generate
from training.model import load_model
from training.predict import (
    LabelStep,
    answer_format,
    candidate_completions,
    decoded_label_probabilities,
    label_prefix,
    label_step_probabilities,
    label_steps,
    reasoning_wanted,
    relevance_rows,
)

GRAPH = ReasoningGraph.load("relevance7")
LABELS = LabelSet.load("wands")
REASONING = "qs: sofa\nqa: color=gray\nps: sofa\npa: color=blue\nms: match\nma: mismatch"
LABEL_FIRST, REASONING_FIRST = answer_format(GRAPH, "label_first"), answer_format(GRAPH, "reasoning_first")


def test_label_prefix_by_order_and_for_malformed_generations():
    assert label_prefix("anything at all", LABEL_FIRST) == "y: "
    assert label_prefix(REASONING + "\ny: Partial", REASONING_FIRST) == REASONING + "\ny: "
    assert label_prefix(REASONING, REASONING_FIRST) == REASONING + "\ny: "  # never wrote its label
    assert label_prefix("", REASONING_FIRST) == "y: "
    assert candidate_completions("y: ", LABEL_FIRST, LABELS) == ["y: Exact\n", "y: Partial\n", "y: Irrelevant\n"]
    assert candidate_completions("p\ny: ", REASONING_FIRST, LABELS)[2] == "p\ny: Irrelevant"


def test_a_zero_shot_judges_label_follows_its_answer_prefix_and_ends_its_answer():
    from schemas.judge_prompt import JudgePrompt, ZeroShot

    judge = answer_format(GRAPH, "reasoning_first", ZeroShot(JudgePrompt.load("zero_shot"), LABELS, GRAPH, "reasoning_first"))
    assert label_prefix("qs: sofa\n\nThe sofa fits.\n  Label: Exact\nmore", judge) == "qs: sofa\nThe sofa fits.\nLabel: "
    assert candidate_completions("Label: ", judge, LABELS) == ["Label: Exact", "Label: Partial", "Label: Irrelevant"]  # EOS follows
    direct = answer_format(GRAPH, "label_first", ZeroShot(JudgePrompt.load("zero_shot"), LABELS, GRAPH, "label_first"))
    assert label_prefix("anything", direct) == "Label: " and direct.label_last


@pytest.mark.parametrize("order", ["label_first", "reasoning_first"])
def test_label_probabilities_are_the_label_step_softmax_over_label_tokens(tiny_model, order):
    model, tokenizer = load_model(tiny_model)
    model.eval()
    prompts = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [1, 13]]  # unequal lengths: the batch is padded
    prefixes = ["y: ", REASONING + "\ny: ", "y: "] if order == "reasoning_first" else ["y: "] * 3
    steps = label_steps(tokenizer, prompts, prefixes, answer_format(GRAPH, order), LABELS)
    probabilities = label_step_probabilities(model, steps, batch_size=4)
    eos = [tokenizer.eos_token_id] if order == "reasoning_first" else []
    for prompt, prefix, step, got in zip(prompts, prefixes, steps, probabilities):
        completions = [tokenizer(text, add_special_tokens=False)["input_ids"] + eos
                       for text in candidate_completions(prefix, answer_format(GRAPH, order), LABELS)]
        shared = len(step.context) - len(prompt)
        assert all(c[:shared] == completions[0][:shared] for c in completions)
        assert step.label_tokens == tuple(c[shared] for c in completions)
        with torch.inference_mode():  # one unpadded pass per pair
            logits = model(input_ids=torch.tensor([list(step.context)])).logits[0, -1]
        assert got == pytest.approx(torch.softmax(logits[list(step.label_tokens)], -1).tolist(), abs=1e-5)


def test_the_label_step_read_from_decoding_is_the_forward_pass_over_its_context(tiny_model):
    model, tokenizer = load_model(tiny_model)
    prompts = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [1, 13]]
    watch = (30, 31, 32, 40)
    generated = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, watch_ids=watch)
    for prompt, response, watched in zip(prompts, generated.response_ids, generated.watched):
        assert len(watched) == len(response) and all(len(step) == len(watch) for step in watched)
        for written in range(len(response)):  # a label step after each prefix the model wrote itself
            step = LabelStep(context=tuple(prompt) + response[:written], label_tokens=(32, 30, 40))
            expected = label_step_probabilities(model, [step], batch_size=1)[0]
            assert decoded_label_probabilities(step, len(prompt), response, watched, watch) == pytest.approx(expected, abs=1e-5)
        other = (response[0] + 1,)  # a context the model did not write: the caller runs the forward pass instead
        assert decoded_label_probabilities(LabelStep(tuple(prompt) + other, (30, 31, 32)), len(prompt), response, watched, watch) is None
        unwatched = LabelStep(tuple(prompt), (30, 33, 32))
        assert decoded_label_probabilities(unwatched, len(prompt), response, watched, watch) is None


def test_labels_sharing_their_first_token_are_refused(tiny_model):
    _, tokenizer = load_model(tiny_model)
    exact = LABELS.labels[0]
    clashing = dataclasses.replace(LABELS, name="clash", labels=(exact, dataclasses.replace(exact, name="Exactly"), LABELS.labels[2]),
                                   relevant=(), rule=())
    with pytest.raises(ValueError, match=r"\['Exact', 'Exactly'\] start with the same token"):
        label_steps(tokenizer, [[1, 2]], ["y: "], LABEL_FIRST, clashing)
    # a label that is a prefix of another is told apart by the terminator that follows it
    prefixed = dataclasses.replace(clashing, labels=(exact, dataclasses.replace(exact, name="Exactly")))
    step = label_steps(tokenizer, [[1, 2]], ["y: "], LABEL_FIRST, prefixed)[0]
    assert len(set(step.label_tokens)) == 2


def test_reasoning_sample_is_a_stable_share_of_pairs():
    pairs = [{"query": f"q{i}", "product_id": f"p{i}"} for i in range(2000)]
    drawn = reasoning_wanted(pairs, "sample", 0.1)
    assert 150 < sum(drawn) < 250
    assert drawn == reasoning_wanted(list(reversed(pairs)), "sample", 0.1)[::-1]  # by key, not position
    assert reasoning_wanted(pairs, "all", 0.0) == [True] * 2000 and not any(reasoning_wanted(pairs, "none", 1.0))
    with pytest.raises(ValueError, match="reasoning must be one of"):
        reasoning_wanted(pairs, "some", 0.1)


@pytest.mark.parametrize("reasoning", ["none", "sample", "all"])
def test_rows_follow_the_relevance_schema(tiny_model, reasoning):
    model, tokenizer = load_model(tiny_model)
    pairs = [{"query": "gray sofa", "query_id": "q1", "product_id": "p1"}, {"query": "sofa", "query_id": "q2", "product_id": "p2"}]
    rows = relevance_rows(
        model, tokenizer, pairs, [[1, 5, 6], [1, 7]], GRAPH, LABELS, "label_first", reasoning=reasoning,
        model_name="tiny", model_version="v1", ds=dt.date(2024, 1, 2), max_new_tokens=12, reasoning_sample=0.5,
    )
    assert rows.schema == RELEVANCE.arrow_schema()
    kept = reasoning_wanted(pairs, reasoning, 0.5)
    for row, keep in zip(rows.to_pylist(), kept):
        probabilities = dict(row["label_probs"])
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert row["label"] == max(probabilities, key=probabilities.get)
        assert row["expected_gain"] == pytest.approx(sum(LABELS.gains[k] * p for k, p in probabilities.items()))
        if not keep:  # label-first fast path: nothing generated
            assert row["reasoning"] is None and row["node_decisions"] == []
        else:
            lenient = parse_cot(row["reasoning"], GRAPH, "label_first", LABELS.names, "lenient")
            assert dict(row["node_decisions"]) == {k: v for k, v in lenient.values.items() if k != GRAPH.label_node}
