"""Rewards of parsed rollouts: strict format gate, outcome, verifiers, Monte-Carlo node values.

Generations are real CoT texts (`render_cot`) parsed strictly (`parse_cot`); expected rewards are
worked out by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

from schemas.graph import LabelSet, ReasoningGraph
from training.cot import parse_cot, render_cot
from training.grpo.rewards import (
    class_balanced_weights,
    decision_ids,
    monte_carlo_values,
    outcome_rewards,
    reward_metrics,
    score_rollouts,
)

GRAPH = ReasoningGraph.load("relevance7")
WANDS = LabelSet.load("wands")
NODES = GRAPH.node_names  # qs qa ps pa ms ma y
COL = {name: k for k, name in enumerate(NODES)}
GOLD = {"qs": "sofa", "qa": "color=gray", "ps": "sofa", "pa": "color=gray; material=wool", "ms": "match", "ma": "match", "y": "Exact"}


def parse(values: dict[str, str] | str):
    text = values if isinstance(values, str) else render_cot({**GOLD, **values}, GRAPH, "label_first")
    return parse_cot(text, GRAPH, "label_first", WANDS.names, "strict")


def test_synthetic_world_every_node_verified_and_the_format_gate():
    parsed = [
        parse({}),  # 0: gold CoT
        parse({"pa": "material=wool; color=gray", "y": "Partial"}),  # 1: same facets in another order, wrong label
        parse({"ms": "related"}),  # 2: wrong ms, right label
        parse({}),  # 3: gold CoT but no EOS
        parse("y: Exact\nms: match"),  # 4: lines missing
        parse({"ms": "maybe"}),  # 5: ms outside its vocabulary: the strict parse stops there
    ]
    ended = [True, True, True, False, True, True]
    rewards = score_rollouts(parsed, ended, [GOLD] * 6, torch.zeros(6, dtype=torch.long), GRAPH, WANDS)
    assert rewards.outcome.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert rewards.formatted.tolist() == [True, True, True, False, False, False]
    reasoning = [n != "y" for n in NODES]
    assert rewards.verified.tolist() == [reasoning] * 6
    assert rewards.has_local.tolist() == [reasoning] * 6
    ones = [1.0 if r else 0.0 for r in reasoning]
    assert rewards.local.tolist() == [ones, ones, [0.0 if n in ("ms", "y") else 1.0 for n in NODES]] + [[0.0] * 7] * 3
    assert torch.equal(rewards.local, rewards.verifier)
    metrics = reward_metrics(rewards, GRAPH)
    assert metrics["reward/outcome"] == pytest.approx(2 / 6)
    assert metrics["reward/format"] == pytest.approx(3 / 6)
    assert metrics["reward/verifier/ms"] == pytest.approx(2 / 6)
    assert "reward/verifier/y" not in metrics


def test_wands_like_gold_monte_carlo_values_for_unverified_nodes():
    # Gold without qa and ma (no verifier on WANDS): their local signal is the group's Monte-Carlo value.
    gold = {k: v for k, v in GOLD.items() if k not in ("qa", "ma")}
    rows = [
        ({"qa": "color=gray", "ma": "match"}, True),  # 0: R = 1
        ({"qa": "color=gray", "ma": "partial", "y": "Partial"}, True),  # 1: R = 0
        ({"qa": "none", "ma": "match"}, True),  # 2: R = 1
        ({"qa": "color=gray", "ma": "match"}, False),  # 3: no EOS: R = 0, not a peer
        ({"qa": "color=gray", "ma": "partial"}, True),  # 4: R = 1
        ({"qa": "color=gray", "ma": "match"}, True),  # 5 (group 1): R = 1
        ({"qa": "none", "ma": "match", "y": "Partial"}, True),  # 6 (group 1): R = 0
    ]
    parsed = [parse(values) for values, _ in rows]
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    rewards = score_rollouts(parsed, [e for _, e in rows], [gold] * 7, group, GRAPH, WANDS)
    assert rewards.outcome.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert not rewards.verified[:, [COL["qa"], COL["ma"], COL["y"]]].any()
    # qa "color=gray": 0 <- {1: 0, 4: 1} = 0.5; 1 <- {0, 4} = 1; 4 <- {0, 1} = 0.5; 2, 5, 6 have no peer.
    # ma: 0 <- {2} = 1; 1 <- {4} = 1; 2 <- {0} = 1; 4 <- {1} = 0; 5 <- {6} = 0; 6 <- {5} = 1.
    assert rewards.local[:, COL["qa"]].tolist() == [0.5, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0]
    assert rewards.has_local[:, COL["qa"]].tolist() == [True, True, False, True, True, False, False]
    assert rewards.local[:, COL["ma"]].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert rewards.has_local[:, COL["ma"]].all()
    assert rewards.local[:, COL["ms"]].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # verifier; 3 is gated


def test_monte_carlo_values_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    decisions = torch.randint(-1, 3, (12, 4), generator=generator)
    outcome = torch.rand(12, generator=generator)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    values, defined = monte_carlo_values(decisions, outcome, group)
    for i in range(12):
        for v in range(4):
            peers = [float(outcome[j]) for j in range(12) if j != i and group[j] == group[i] and decisions[i, v] >= 0 and decisions[j, v] == decisions[i, v]]
            assert bool(defined[i, v]) == bool(peers)
            assert float(values[i, v]) == pytest.approx(sum(peers) / len(peers) if peers else 0.0)


def test_decision_ids_compare_facets_as_sets():
    ids = decision_ids([parse({"pa": "color=gray; material=wool"}), parse({"pa": "material=wool; color=gray"}), parse("y: Exact")], GRAPH)
    assert ids[0, COL["pa"]] == ids[1, COL["pa"]] >= 0
    assert ids[2].tolist() == [-1, -1, -1, -1, -1, -1, ids[0, COL["y"]].item()]


def test_outcome_rewards_exact_and_ordinal():
    predicted = ["Exact", "Partial", "Irrelevant", None, "Maybe"]
    assert outcome_rewards(predicted, ["Exact"] * 5, WANDS).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert outcome_rewards(predicted, ["Exact"] * 5, WANDS, ordinal=True).tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_class_balanced_weights_by_hand():
    gold = ["Exact"] * 6 + ["Partial"] * 3 + ["Irrelevant"]
    weights = class_balanced_weights(gold, WANDS)
    # n / (K n_c) = 10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1): every class carries a third of the total weight
    assert weights == pytest.approx({"Exact": 10 / 18, "Partial": 10 / 9, "Irrelevant": 10 / 3})
    assert sum(weights[label] for label in gold) / len(gold) == pytest.approx(1.0)
    assert class_balanced_weights(["Exact", "Exact", "Partial"], WANDS) == pytest.approx({"Exact": 0.75, "Partial": 1.5})
    with pytest.raises(ValueError, match="'Maybe' is not one of"):
        class_balanced_weights(["Exact", "Maybe"], WANDS)


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="2 parses, 1 EOS flags"):
        score_rollouts([parse({}), parse({})], [True], [GOLD, GOLD], torch.zeros(2, dtype=torch.long), GRAPH, WANDS)
    with pytest.raises(ValueError, match="lack the label node 'y'"):
        score_rollouts([parse({})], [True], [{"qs": "sofa"}], torch.zeros(1, dtype=torch.long), GRAPH, WANDS)
