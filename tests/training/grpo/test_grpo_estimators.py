"""The estimator registry and each estimator on one hand-worked group (GRAPH_GRPO.md, "Estimators").

The group: 4 rollouts of one prompt on relevance7, every reasoning node verified (synthetic world).
0: all right (R = 1); 1: evidence right, label wrong (R = 0); 2: ms wrong, label wrong (R = 0);
3: pa wrong, label right (R = 1). Each rollout's tokens: one per node in graph order, a separator
(node -1), then a padding token (mask False).
"""

from __future__ import annotations

import re

import pytest
import torch

from schemas.graph import LabelSet, ReasoningGraph
from training.cot import node_spans, parse_cot, render_cot, token_nodes
from training.grpo.batch import token_node_index
from training.grpo.credit import CreditGraph
from training.grpo.estimators import ESTIMATORS, AdvantageBatch, AdvantageParams, get_estimator
from training.grpo.rewards import NodeRewards, score_rollouts

GRAPH = ReasoningGraph.load("relevance7")
NODES = GRAPH.node_names  # qs qa ps pa ms ma y
COL = {name: k for k, name in enumerate(NODES)}
ROOT3 = 3**0.5 / 2  # GRPO advantage of R = (1, 0, 0, 1): (R - 1/2) / sqrt(1/3)


def hand_batch(phi: torch.Tensor | None = None) -> AdvantageBatch:
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    verifier = torch.ones(4, 7, dtype=torch.float64)
    verifier[2, COL["ms"]] = 0.0
    verifier[3, COL["pa"]] = 0.0
    verifier[:, COL["y"]] = 0.0
    verified = torch.ones(4, 7, dtype=torch.bool)
    verified[:, COL["y"]] = False
    rewards = NodeRewards(outcome, verifier, verified, verifier.clone(), verified.clone(), torch.ones(4, dtype=torch.bool))
    token_nodes_ = torch.tensor([list(range(7)) + [-1, -1]] * 4)
    mask = torch.tensor([[True] * 8 + [False]] * 4)
    return AdvantageBatch(rewards, token_nodes_, mask, torch.zeros(4, dtype=torch.long), CreditGraph.from_graph(GRAPH), phi)


def rows(tokens: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in tokens.tolist()]


def test_registry_names_and_unknown_name():
    assert sorted(ESTIMATORS) == ["graph_fixed", "graph_grpo", "grpo", "process", "sam", "shaped"]
    assert [name for name, e in ESTIMATORS.items() if e.learns_phi] == ["graph_grpo"]
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; known: \['graph_fixed', 'graph_grpo', 'grpo'"):
        get_estimator("ppo")


def test_grpo_outcome_advantage_on_every_token():
    tokens, metrics = get_estimator("grpo")(hand_batch(), AdvantageParams(eps=0.0))
    assert rows(tokens) == [[round(s * ROOT3, 6)] * 8 + [0.0] for s in (1, -1, -1, 1)]
    assert metrics["adv/qs/tokens"] == 4 and metrics["adv/<none>/tokens"] == 4
    assert metrics["adv/qs/abs_mean"] == pytest.approx(ROOT3, rel=1e-5)
    assert metrics["adv/token_mean"] == pytest.approx(0.0, abs=1e-7)


def test_sam_masks_spans_whose_verifier_disagrees_with_the_sign():
    tokens, metrics = get_estimator("sam")(hand_batch(), AdvantageParams(eps=0.0))
    a = ROOT3
    assert rows(tokens) == rows(torch.tensor([
        [a] * 8 + [0.0],  # positive and every verifier right: nothing masked
        [0.0] * 6 + [-a, -a, 0.0],  # negative: every right evidence span masked, y and separator kept
        [0.0] * 4 + [-a, 0.0, -a, -a, 0.0],  # negative: only the wrong ms keeps its advantage
        [a, a, a, 0.0, a, a, a, a, 0.0],  # positive: the wrong pa is masked
    ]))
    assert metrics["sam/masked_token_share"] == pytest.approx(12 / 32)


def test_shaped_grpo_on_outcome_plus_lambda_mean_verifier():
    # R + 0.5 * mean verifier over the 6 reasoning nodes: 1 + 1/2, 0 + 1/2, 0 + 5/12, 1 + 5/12.
    shaped_reward = torch.tensor([1.5, 0.5, 5 / 12, 1 + 5 / 12], dtype=torch.float64)
    expected = (shaped_reward - shaped_reward.mean()) / shaped_reward.std()
    tokens, metrics = get_estimator("shaped")(hand_batch(), AdvantageParams(eps=0.0, shaped_lambda=0.5))
    assert rows(tokens) == rows(torch.cat([expected.unsqueeze(1).expand(4, 8), torch.zeros(4, 1, dtype=torch.float64)], 1))
    assert metrics["shaped/reward_mean"] == pytest.approx(float(shaped_reward.mean()))


def test_process_each_node_its_own_verifier_no_propagation():
    tokens, metrics = get_estimator("process")(hand_batch(), AdvantageParams(eps=0.0))
    # ms column (1, 1, 0, 1) and pa column (1, 1, 1, 0): z-scores 0.5 / -1.5; qs, qa, ps, ma constant: 0;
    # y (and the separator) the outcome's GRPO advantage.
    a = ROOT3
    assert rows(tokens) == rows(torch.tensor([
        [0, 0, 0, 0.5, 0.5, 0, a, a, 0],
        [0, 0, 0, 0.5, 0.5, 0, -a, -a, 0],
        [0, 0, 0, 0.5, -1.5, 0, -a, -a, 0],
        [0, 0, 0, -1.5, 0.5, 0, a, a, 0],
    ]))
    assert metrics["adv/ms/abs_mean"] == pytest.approx(0.75)
    assert metrics["credit/ms"] == pytest.approx(0.75)


def test_graph_estimators_need_phi_and_are_differentiable_in_it():
    with pytest.raises(ValueError, match=r"'graph_fixed' needs edge coefficients: set AdvantageBatch.phi \(6 values"):
        get_estimator("graph_fixed")(hand_batch(), AdvantageParams())
    phi = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)
    tokens, metrics = get_estimator("graph_grpo")(hand_batch(phi), AdvantageParams())
    fixed, _ = get_estimator("graph_fixed")(hand_batch(phi.detach()), AdvantageParams())
    assert torch.equal(tokens.detach(), fixed)
    assert metrics["phi/qs->ms"] == 0.5 and set(metrics) >= {f"credit/{n}" for n in NODES}
    (grad,) = torch.autograd.grad((tokens * torch.arange(36, dtype=torch.float64).view(4, 9)).sum(), phi)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_graph_credit_spreads_node_advantages_onto_spans():
    # ms column: c = 2/3 r + 1/3 R with phi = 1/2: (1, 2/3, 0, 1). Its normalised value is the ms token's.
    phi = torch.full((6,), 0.5, dtype=torch.float64)
    tokens, _ = get_estimator("graph_fixed")(hand_batch(phi), AdvantageParams(eps=0.0))
    ms = torch.tensor([1.0, 2 / 3, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(tokens[:, COL["ms"]], (ms - ms.mean()) / ms.std())
    assert torch.equal(tokens[:, 7], tokens[:, COL["y"]])  # the separator gets y's advantage
    assert tokens[:, 8].tolist() == [0.0] * 4  # padding


def test_token_node_index_from_the_cot_token_map():
    values = {"qs": "sofa", "qa": "none", "ps": "sofa", "pa": "color=gray", "ms": "match", "ma": "none", "y": "Exact"}
    text = render_cot(values, GRAPH, "label_first")
    offsets = [(m.start(), m.end()) for m in re.finditer(r"\S+|\n", text)] + [(0, 0)]  # words, newlines, EOS
    names = token_nodes(offsets, node_spans(text, GRAPH))
    index, mask = token_node_index([names, names[:3]], NODES, width=len(names) + 1)
    assert index[0].tolist() == [COL["y"], COL["y"], -1, COL["ms"], COL["ms"], -1, COL["ma"], COL["ma"], -1, COL["qs"], COL["qs"], -1,
                                 COL["qa"], COL["qa"], -1, COL["ps"], COL["ps"], -1, COL["pa"], COL["pa"], -1, -1]
    assert mask[0].tolist() == [True] * len(names) + [False]
    assert mask[1].sum() == 3 and index[1, 3:].tolist() == [-1] * (len(names) - 2)
    with pytest.raises(ValueError, match=r"names nodes \['brand'\]"):
        token_node_index([["brand"]], NODES, width=2)


def test_batch_shapes_are_checked():
    batch = hand_batch()
    with pytest.raises(ValueError, match=r"token_nodes \(4, 9\) and response_mask \(4, 8\)"):
        AdvantageBatch(batch.rewards, batch.token_nodes, batch.response_mask[:, :8], batch.group, batch.graph)
    with pytest.raises(ValueError, match="scale: 'rollout'"):
        AdvantageParams(scale="rollout")


def test_end_to_end_texts_to_token_advantages():
    # Parsed texts -> rewards -> token map -> graph_grpo. Rollout 1 writes the wrong ms and label; rollout 3 has no EOS.
    labels = LabelSet.load("wands")
    gold = {"qs": "sofa", "qa": "none", "ps": "sofa", "pa": "color=gray", "ms": "match", "ma": "none", "y": "Exact"}
    texts = [render_cot({**gold, **change}, GRAPH, "label_first") for change in ({}, {"ms": "mismatch", "y": "Irrelevant"}, {}, {})]
    parsed = [parse_cot(text, GRAPH, "label_first", labels.names) for text in texts]
    rewards = score_rollouts(parsed, [True, True, True, False], [gold] * 4, torch.zeros(4, dtype=torch.long), GRAPH, labels)
    maps = []
    for text in texts:
        offsets = [(m.start(), m.end()) for m in re.finditer(r"\S+|\n", text)] + [(0, 0)]
        maps.append(token_nodes(offsets, node_spans(text, GRAPH)))
    index, mask = token_node_index(maps, NODES, width=max(len(m) for m in maps))
    batch = AdvantageBatch(rewards, index, mask, torch.zeros(4, dtype=torch.long), CreditGraph.from_graph(GRAPH), torch.full((6,), 0.5))
    tokens, _ = get_estimator("graph_grpo")(batch, AdvantageParams())
    ms_tokens = index == COL["ms"]
    assert (tokens[1][ms_tokens[1]] < 0).all() and (tokens[0][ms_tokens[0]] > 0).all()
    assert (tokens[3][mask[3]] < 0).all()  # no EOS: every reward 0, every token negative
    assert torch.equal(tokens[:, -1], tokens[:, 0])  # EOS (no node) gets the label's advantage; y is first
