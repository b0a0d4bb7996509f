"""Credit propagation and group normalisation (GRAPH_GRPO.md, "Credit propagation").

The four properties of the spec are tested here: (1) no local signal -> credit = R and graph credit
= GRPO bit for bit; (2) right evidence under a wrong label; (3) wrong evidence under a wrong label,
scaled by phi; (4) the loop-over-nodes reference equals the vectorised credit (values and gradients
in phi) over seeds, group sizes and two graphs. Expected credits are worked out by hand as fractions.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.graph import ReasoningGraph
from training.grpo.credit import CreditGraph, group_normalize, node_advantages_to_tokens, node_credit, node_credit_reference
from training.grpo.estimators import AdvantageBatch, AdvantageParams, get_estimator
from training.grpo.rewards import NodeRewards

RELEVANCE7 = ReasoningGraph.load("relevance7")
FACET_CHAIN = ReasoningGraph.load(Path(__file__).parent / "facet_chain.yaml")
GRAPHS = {"relevance7": RELEVANCE7, "facet_chain": FACET_CHAIN}
NODES = RELEVANCE7.node_names  # qs qa ps pa ms ma y
COL = {name: k for k, name in enumerate(NODES)}


def random_inputs(graph: ReasoningGraph, groups: int, size: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    batch, nodes, edges = groups * size, len(graph.node_names), len(graph.edges)
    local = torch.rand(batch, nodes, generator=generator, dtype=dtype)
    has_local = torch.rand(batch, nodes, generator=generator) < 0.6
    outcome = (torch.rand(batch, generator=generator) < 0.5).to(dtype)
    phi = torch.rand(edges, generator=generator, dtype=dtype)
    phi = torch.where(torch.rand(edges, generator=generator) < 0.2, 0.0, phi)  # some phi = 0: the fallback
    group = torch.arange(groups).repeat_interleave(size)
    return local, has_local, outcome, phi, group


def test_credit_graph_levels_by_hand():
    graph = CreditGraph.from_graph(FACET_CHAIN)
    names = graph.nodes
    assert names[graph.label] == "y"
    assert sorted(names[k] for k in graph.sinks.tolist()) == ["nt", "y"]
    assert [sorted(names[k] for k in level.tolist()) for level in graph.levels] == [
        ["ma", "ms"], ["mb", "pa", "ps", "qa", "qs"], ["pb", "qb"],
    ]
    assert [(names[a], names[b]) for a, b in zip(graph.source.tolist(), graph.target.tolist())] == list(FACET_CHAIN.edges)
    assert len(CreditGraph.from_graph(RELEVANCE7).levels) == 2


def test_credit_by_hand_on_relevance7():
    # One rollout, phi = 0.5 on every edge, R = 1, local signals: qs 0 (verifier), ms 1, others none.
    graph = CreditGraph.from_graph(RELEVANCE7)
    local = torch.zeros(1, 7, dtype=torch.float64)
    local[0, COL["ms"]] = 1.0
    has_local = torch.zeros(1, 7, dtype=torch.bool)
    has_local[0, [COL["qs"], COL["ms"]]] = True
    credit = node_credit(local, has_local, torch.ones(1, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64), graph)
    half = Fraction(1, 2)
    ms = (1 + half * 1) / (1 + half)  # 1
    ma = (half * 1) / half  # no signal: the successor's credit
    qs = (0 + half * ms) / (1 + half)  # 1/3
    expected = {"qs": qs, "qa": ma, "ps": ms, "pa": ma, "ms": ms, "ma": ma, "y": 1}
    assert credit[0].tolist() == pytest.approx([float(expected[n]) for n in NODES], abs=1e-12)


@pytest.mark.parametrize("graph_name", sorted(GRAPHS))
@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_property4_reference_equals_vectorised(graph_name, size, seed):
    graph = GRAPHS[graph_name]
    local, has_local, outcome, phi, _ = random_inputs(graph, groups=3, size=size, seed=seed)
    phi = phi.requires_grad_(True)
    fast = node_credit(local, has_local, outcome, phi, CreditGraph.from_graph(graph))
    slow = node_credit_reference(local, has_local, outcome, phi, graph)
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=fast.dtype)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), phi)
    (grad_slow,) = torch.autograd.grad((slow * weights).sum(), phi)
    assert torch.allclose(grad_fast, grad_slow, rtol=1e-10, atol=1e-12)
    assert grad_fast.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    graph_name=st.sampled_from(sorted(GRAPHS)),
    groups=st.integers(1, 4),
    size=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_property4_hypothesis_float32(graph_name, groups, size, seed):
    graph = GRAPHS[graph_name]
    local, has_local, outcome, phi, _ = random_inputs(graph, groups, size, seed, dtype=torch.float32)
    fast = node_credit(local, has_local, outcome, phi, CreditGraph.from_graph(graph))
    slow = node_credit_reference(local, has_local, outcome, phi, graph)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    # The credit is a convex combination of local signals and R: it stays inside their range.
    assert fast.min() >= min(0.0, float(outcome.min())) - 1e-6 and fast.max() <= 1.0 + 1e-6


def _batch(rewards: NodeRewards, graph: ReasoningGraph, group: torch.Tensor, phi: torch.Tensor | None, tokens_per_node: int = 2):
    """Every rollout's tokens: `tokens_per_node` tokens per node in graph order, then one separator-like token (-1)."""
    nodes = len(graph.node_names)
    row = torch.arange(nodes).repeat_interleave(tokens_per_node)
    row = torch.cat([row, torch.tensor([-1])])
    token_nodes = row.expand(group.shape[0], -1).clone()
    return AdvantageBatch(rewards, token_nodes, torch.ones_like(token_nodes, dtype=torch.bool), group, CreditGraph.from_graph(graph), phi)


def _rewards(local: torch.Tensor, has_local: torch.Tensor, outcome: torch.Tensor) -> NodeRewards:
    verified = has_local.clone()
    return NodeRewards(outcome, torch.where(verified, local, 0.0), verified, local, has_local, torch.ones_like(outcome, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(
    graph_name=st.sampled_from(sorted(GRAPHS)),
    outcomes=st.lists(st.lists(st.booleans(), min_size=1, max_size=8), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from(["node", "group"]),
)
def test_property1_no_local_signal_is_grpo_exactly(graph_name, outcomes, seed, scale):
    graph = GRAPHS[graph_name]
    outcome = torch.tensor([float(r) for group in outcomes for r in group])
    group = torch.tensor([g for g, rows in enumerate(outcomes) for _ in rows])
    nodes, edges = len(graph.node_names), len(graph.edges)
    phi = torch.rand(edges, generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01
    has_local = torch.zeros(len(outcome), nodes, dtype=torch.bool)
    local = torch.rand(len(outcome), nodes, generator=torch.Generator().manual_seed(seed + 1))  # ignored: no signal
    credit = node_credit(local, has_local, outcome, phi, CreditGraph.from_graph(graph))
    assert torch.equal(credit, outcome.unsqueeze(1).expand_as(credit))
    batch = _batch(_rewards(local, has_local, outcome), graph, group, phi)
    params = AdvantageParams(scale=scale)
    graph_tokens, _ = get_estimator("graph_grpo")(batch, params)
    grpo_tokens, _ = get_estimator("grpo")(batch, params)
    if scale == "node":
        assert torch.equal(graph_tokens, grpo_tokens)
    else:  # the pooled std sums N equal columns: equal up to rounding
        assert torch.allclose(graph_tokens, grpo_tokens, rtol=1e-6, atol=1e-6)


def _verified_group(rows: list[dict[str, int]], outcome: list[int]):
    """Rewards of a group where every reasoning node has a verifier (the synthetic world)."""
    local = torch.tensor([[float(row.get(n, 1)) for n in NODES] for row in rows], dtype=torch.float64)
    has_local = torch.ones(len(rows), 7, dtype=torch.bool)
    has_local[:, COL["y"]] = False
    local[:, COL["y"]] = 0.0
    return _rewards(local, has_local, torch.tensor(outcome, dtype=torch.float64))


def test_property2_right_evidence_wrong_label_in_a_mixed_group():
    # Rollout 0: every evidence node right, label wrong. 1: all right. 2: qs and ms wrong, label wrong.
    # 3: qa, pa, ma wrong, label wrong. phi = 1/2: a verified node's credit is 2/3 r + 1/3 c_succ.
    rewards = _verified_group([{}, {}, {"qs": 0, "ms": 0}, {"qa": 0, "pa": 0, "ma": 0}], [0, 1, 0, 0])
    third = Fraction(1, 3)
    c = {"y": [0, 1, 0, 0], "ms": [2 * third * r + third * y for r, y in zip([1, 1, 0, 1], [0, 1, 0, 0])]}
    c["ma"] = [2 * third * r + third * y for r, y in zip([1, 1, 1, 0], [0, 1, 0, 0])]
    for node, succ, r in (("qs", "ms", [1, 1, 0, 1]), ("ps", "ms", [1, 1, 1, 1]), ("qa", "ma", [1, 1, 1, 0]), ("pa", "ma", [1, 1, 1, 0])):
        c[node] = [2 * third * own + third * s for own, s in zip(r, c[succ])]
    deviation0 = {node: float(values[0] - sum(values, Fraction(0)) / 4) for node, values in c.items()}
    assert deviation0 == pytest.approx({"y": -1 / 4, "ms": 1 / 12, "ma": 1 / 12, "qs": 7 / 36, "ps": 1 / 36, "qa": 7 / 36, "pa": 7 / 36})
    group = torch.zeros(4, dtype=torch.long)
    phi = torch.full((6,), 0.5, dtype=torch.float64)
    graph = CreditGraph.from_graph(RELEVANCE7)
    credit = node_credit(rewards.local, rewards.has_local, rewards.outcome, phi, graph)
    expected = torch.tensor([[float(c[n][i]) for n in NODES] for i in range(4)], dtype=torch.float64)
    assert torch.allclose(credit, expected, rtol=0, atol=1e-12)
    for scale in ("node", "group"):
        tokens, _ = get_estimator("graph_fixed")(_batch(rewards, RELEVANCE7, group, phi), AdvantageParams(scale=scale))
        first = tokens[0]
        assert (first[12:14] < 0).all() and first[14] < 0  # y's span and the separator
        assert (first[:12] > 0).all()  # every evidence, ms and ma token of rollout 0 is positive


def test_property2_only_the_label_varies_group_scale_attenuates_node_scale_does_not():
    # Rollout 0 differs from the other three only in its label. Credit deviations of rollout 0 from
    # the group mean: y -3/4; ms, ma -1/4 (= phi/(1+phi) of y's); evidence -1/12 (= 1/3 of ms's).
    rewards = _verified_group([{}, {}, {}, {}], [0, 1, 1, 1])
    group = torch.zeros(4, dtype=torch.long)
    batch = _batch(rewards, RELEVANCE7, group, torch.full((6,), 0.5, dtype=torch.float64))
    per_node = {"y": -0.75, "ms": -0.25, "ma": -0.25, "qs": -1 / 12, "qa": -1 / 12, "ps": -1 / 12, "pa": -1 / 12}
    # Each column's deviations are (-d, d/3, d/3, d/3): sum of squares 4 d^2 / 3.
    pooled_std = (sum(4 * d * d / 3 for d in per_node.values()) / (7 * 3)) ** 0.5
    tokens, _ = get_estimator("graph_fixed")(batch, AdvantageParams(scale="group"))
    node_values = {n: float(tokens[0, 2 * COL[n]]) for n in NODES}
    assert node_values == pytest.approx({n: d / pooled_std for n, d in per_node.items()})
    assert node_values["y"] < node_values["ms"] < node_values["qs"] < 0
    # Per-node std (GRAPH_GRPO.md lesson 2): every column's z-score is -d / (2d/3) = -1.5, evidence included
    # (eps = 1e-6 against an evidence std of 1/18 moves it by 2e-5).
    tokens, _ = get_estimator("graph_fixed")(batch, AdvantageParams(scale="node"))
    assert tokens[0, :14].tolist() == pytest.approx([-1.5] * 14, rel=1e-4)


@pytest.mark.parametrize("phi_value", [0.1, 0.5, 0.9])
def test_property3_wrong_evidence_under_wrong_label_scaled_by_phi(phi_value):
    # Both rollouts have qs wrong (same verifier 0): only the edge qs->ms tells them apart.
    # Rollout 0: ms wrong, label wrong. Rollout 1: ms right, label right.
    # c_ms = (r_ms + phi c_y) / (1 + phi): 0 and 1; c_qs = phi c_ms / (1 + phi): 0 and phi / (1 + phi).
    rewards = _verified_group([{"qs": 0, "ms": 0}, {"qs": 0}], [0, 1])
    phi = torch.full((6,), phi_value, dtype=torch.float64)
    credit = node_credit(rewards.local, rewards.has_local, rewards.outcome, phi, CreditGraph.from_graph(RELEVANCE7))
    assert float(credit[0, COL["qs"]] - credit[1, COL["qs"]]) == pytest.approx(-phi_value / (1 + phi_value))
    group = torch.zeros(2, dtype=torch.long)
    tokens, _ = get_estimator("graph_fixed")(_batch(rewards, RELEVANCE7, group, phi), AdvantageParams(scale="group"))
    qs0 = tokens[0, 2 * COL["qs"]]
    assert qs0 < 0
    # Pooled std over the 7 columns, unbiased with n = 2: sum of squares of (+-d/2) is d^2 / 2 per column.
    deviations = credit[0] - credit.mean(0)
    pooled_std = float((2 * deviations.square()).sum() / 7) ** 0.5
    assert float(qs0) == pytest.approx(float(deviations[COL["qs"]]) / pooled_std)


def test_property3_no_propagation_at_phi_zero():
    rewards = _verified_group([{"qs": 0, "ms": 0}, {"qs": 0}], [0, 1])
    group = torch.zeros(2, dtype=torch.long)
    tokens, _ = get_estimator("process")(_batch(rewards, RELEVANCE7, group, None), AdvantageParams())
    assert tokens[:, 2 * COL["qs"]].tolist() == [0.0, 0.0]  # same verifier, no edge: nothing to tell apart


def test_property3_magnitude_grows_with_phi():
    rewards = _verified_group([{"qs": 0, "ms": 0}, {"qs": 0}], [0, 1])
    group = torch.zeros(2, dtype=torch.long)
    values = []
    for phi_value in (0.05, 0.3, 0.6, 0.95):
        batch = _batch(rewards, RELEVANCE7, group, torch.full((6,), phi_value, dtype=torch.float64))
        values.append(float(get_estimator("graph_fixed")(batch, AdvantageParams(scale="group"))[0][0, 2 * COL["qs"]]))
    assert values == sorted(values, reverse=True) and values[-1] < values[0] < 0


def test_group_normalize_against_torch_std_per_group():
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(12, 3, generator=generator, dtype=torch.float64)
    values[8:, 1] = 0.25  # a constant column in the last group
    group = torch.tensor([5, 5, 5, 5, 2, 2, 2, 2, 9, 9, 9, 9])
    result = group_normalize(values, group, eps=1e-6, max_advantage=100.0)
    for g in (5, 2, 9):
        rows = group == g
        block = values[rows]
        expected = (block - block.mean(0)) / (block.std(0) + 1e-6)  # torch.std: unbiased, like verl's GRPO
        expected[:, block.std(0) == 0] = 0.0
        assert torch.allclose(result[rows], expected)
    assert result[8:, 1].tolist() == [0.0] * 4


def test_group_normalize_hand_numbers_clip_and_singletons():
    # R = (1, 0, 0, 0): mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2 -> (1.5, -0.5, -0.5, -0.5).
    outcome = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0]])
    group = torch.tensor([0, 0, 0, 0, 1])
    result = group_normalize(outcome, group, eps=0.0, max_advantage=1.2)
    assert result[:, 0].tolist() == pytest.approx([1.2, -0.5, -0.5, -0.5, 0.0])
    # Pooled scale with a floor: columns (1, 0) and (0.1, 0.1): std = sqrt(0.5 / 2) = 0.5, floor 0.9 wins.
    values = torch.tensor([[1.0, 0.1], [0.0, 0.1]])
    pooled = group_normalize(values, torch.zeros(2, dtype=torch.long), eps=0.0, max_advantage=10.0, scale="group", std_floor=0.9)
    assert pooled.flatten().tolist() == pytest.approx([0.5 / 0.9, 0.0, -0.5 / 0.9, 0.0])
    with pytest.raises(ValueError, match="unknown scale 'rollout'"):
        group_normalize(values, torch.zeros(2, dtype=torch.long), 1e-6, 5.0, scale="rollout")


def test_normalisation_gradients_are_finite_on_constant_groups():
    values = torch.tensor([[1.0, 0.5], [1.0, 0.2], [0.3, 0.3]], requires_grad=True)
    result = group_normalize(values, torch.tensor([0, 0, 1]), eps=1e-6, max_advantage=5.0, scale="group", std_floor=0.0)
    (grad,) = torch.autograd.grad((result * torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).sum(), values)
    assert torch.isfinite(grad).all()


def test_tokens_of_no_node_get_the_label_advantage_and_padding_zero():
    node_adv = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]])
    token_nodes = torch.tensor([[0, -1, 1, 2], [2, 2, -1, -1]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    tokens = node_advantages_to_tokens(node_adv, token_nodes, mask, label=2)
    assert tokens.flatten().tolist() == pytest.approx([0.1, 0.3, 0.2, 0.3, 3.0, 3.0, 3.0, 0.0])


def test_phi_of_the_wrong_length_is_an_error():
    graph = CreditGraph.from_graph(RELEVANCE7)
    with pytest.raises(ValueError, match=r"expected \(6,\) for edges \['qs->ms'"):
        node_credit(torch.zeros(1, 7), torch.zeros(1, 7, dtype=torch.bool), torch.zeros(1), torch.zeros(5), graph)
