"""Relevance rows from a policy: the label distribution equals whole-completion likelihoods."""

from __future__ import annotations

import datetime as dt
import math

import pytest
import torch

from schemas.graph import LabelSet, ReasoningGraph
from schemas.tables import RELEVANCE
from training.cot import parse_cot
from training.model import load_model
from training.predict import candidate_completions, label_prefix, relevance_rows, score_labels

GRAPH = ReasoningGraph.load("relevance7")
LABELS = LabelSet.load("wands")
REASONING = "qs: sofa\nqa: color=gray\nps: sofa\npa: color=blue\nms: match\nma: mismatch"


def test_label_prefix_by_order_and_for_malformed_generations():
    assert label_prefix("anything at all", GRAPH, "label_first") == "y: "
    assert label_prefix(REASONING + "\ny: Partial", GRAPH, "reasoning_first") == REASONING + "\ny: "
    assert label_prefix(REASONING, GRAPH, "reasoning_first") == REASONING + "\ny: "  # never wrote its label
    assert label_prefix("", GRAPH, "reasoning_first") == "y: "
    assert candidate_completions("y: ", GRAPH, "label_first", LABELS) == ["y: Exact\n", "y: Partial\n", "y: Irrelevant\n"]
    assert candidate_completions("p\ny: ", GRAPH, "reasoning_first", LABELS)[2] == "p\ny: Irrelevant"


def _completion_logprob(model, tokenizer, prompt: list[int], completion: list[int]) -> float:
    """log P(completion | prompt), one sequence at a time, every completion token counted."""
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return sum(float(logprobs[len(prompt) + i - 1, token]) for i, token in enumerate(completion))


@pytest.mark.parametrize("order", ["label_first", "reasoning_first"])
def test_label_probabilities_equal_normalised_completion_likelihoods(tiny_model, order):
    model, tokenizer = load_model(tiny_model)
    model.eval()
    prompts = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12]]
    prefixes = ["y: ", REASONING + "\ny: "] if order == "reasoning_first" else ["y: ", "y: "]
    probabilities = score_labels(model, tokenizer, prompts, prefixes, GRAPH, order, LABELS, batch_size=4)
    eos = [tokenizer.eos_token_id] if order == "reasoning_first" else []
    for prompt, prefix, got in zip(prompts, prefixes, probabilities):
        scores = [
            _completion_logprob(model, tokenizer, prompt, tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
            for text in candidate_completions(prefix, GRAPH, order, LABELS)
        ]
        total = math.log(sum(math.exp(s - max(scores)) for s in scores)) + max(scores)
        assert got == pytest.approx([math.exp(s - total) for s in scores], abs=1e-5)


@pytest.mark.parametrize("reasoning", ["none", "all"])
def test_rows_follow_the_relevance_schema(tiny_model, reasoning):
    model, tokenizer = load_model(tiny_model)
    pairs = [{"query": "gray sofa", "query_id": "q1", "product_id": "p1"}, {"query": "sofa", "query_id": "q2", "product_id": "p2"}]
    rows = relevance_rows(
        model, tokenizer, pairs, [[1, 5, 6], [1, 7]], GRAPH, LABELS, "label_first", reasoning=reasoning,
        model_name="tiny", model_version="v1", ds=dt.date(2024, 1, 2), max_new_tokens=12,
    )
    assert rows.schema == RELEVANCE.arrow_schema()
    for row in rows.to_pylist():
        probabilities = dict(row["label_probs"])
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert row["label"] == max(probabilities, key=probabilities.get)
        assert row["expected_gain"] == pytest.approx(sum(LABELS.gains[k] * p for k, p in probabilities.items()))
        if reasoning == "none":  # label-first fast path: nothing generated
            assert row["reasoning"] is None and row["node_decisions"] == []
        else:
            lenient = parse_cot(row["reasoning"], GRAPH, "label_first", LABELS.names, "lenient")
            assert dict(row["node_decisions"]) == {k: v for k, v in lenient.values.items() if k != GRAPH.label_node}
