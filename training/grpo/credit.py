"""Credit propagation over the reasoning graph and group normalisation (GRAPH_GRPO.md, "Credit propagation").

Shapes: B rollouts (G per prompt, `group` says which prompt), N nodes in `ReasoningGraph.node_names`
order, E edges in `ReasoningGraph.edges` order (`phi[e]` is the coefficient of `graph.edges[e]`),
T tokens. Everything here is a pure function of tensors and scalars.

The credit of rollout i, in reverse topological order starting at the label node y:

    c[i, y] = R[i]
    c[i, v] = (rho[i, v] * r[i, v] + sum_{u in succ(v)} phi[v->u] * c[i, u]) / (rho[i, v] + sum_u phi[v->u])

`rho` is 1 where node v has a local signal `r` (a verifier, or the group's Monte-Carlo value), else 0.
Where the denominator is 0 (a node without a local signal whose out-edges all have phi = 0, as in the
`process` estimator, or a node without successors other than y) the formula is undefined and the
node's credit falls back to the outcome R[i] (the credit y would pass on).

`node_credit_reference` is the loop over nodes exactly as written above; `node_credit` is the
vectorised one (one tensor step per topological depth level); tests assert they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from schemas.graph import ReasoningGraph

SCALES = ("node", "group")


@dataclass(frozen=True)
class CreditGraph:
    """A `ReasoningGraph` as index tensors for the vectorised credit.

    `source`, `target`: (E,) node indices of each edge (phi order = `graph.edges` order).
    `levels`: node indices grouped by depth (longest path to a node without successors), depth 1
    first; every successor of a level-k node lies at a depth < k. Depth 0 (nodes without successors,
    among them the label node) is `sinks`.
    """

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    label: int
    source: Tensor
    target: Tensor
    sinks: Tensor
    levels: tuple[Tensor, ...]

    @classmethod
    def from_graph(cls, graph: ReasoningGraph, device: torch.device | str = "cpu") -> CreditGraph:
        names = graph.node_names
        index = {name: i for i, name in enumerate(names)}
        digraph = graph.digraph()
        depth: dict[str, int] = {}
        for node in graph.credit_order:  # label first: every successor comes before its predecessors
            successors = list(digraph.successors(node))
            depth[node] = 1 + max(depth[u] for u in successors) if successors else 0
        by_depth: dict[int, list[int]] = {}
        for node in names:
            by_depth.setdefault(depth[node], []).append(index[node])

        def as_index(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            nodes=tuple(names),
            edges=tuple(graph.edges),
            label=index[graph.label_node],
            source=as_index([index[a] for a, _ in graph.edges]),
            target=as_index([index[b] for _, b in graph.edges]),
            sinks=as_index(by_depth[0]),
            levels=tuple(as_index(by_depth[d]) for d in range(1, max(by_depth) + 1)),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def edge_names(self) -> list[str]:
        """`"qs->ms"` for every edge, in phi order (metric names)."""
        return [f"{a}->{b}" for a, b in self.edges]


def node_credit_reference(
    local: Tensor, has_local: Tensor, outcome: Tensor, phi: Tensor, graph: ReasoningGraph
) -> Tensor:
    """Credit c (B, N), looping over the nodes of `graph` in reverse topological order.

    local: (B, N) float, the local signal r (ignored where `has_local` is False).
    has_local: (B, N) bool, rho.
    outcome: (B,) float, R.
    phi: (E,) float, edge coefficients in `graph.edges` order; gradients flow to it.
    """
    digraph = graph.digraph()
    names = graph.node_names
    column = {name: i for i, name in enumerate(names)}
    edge = {pair: e for e, pair in enumerate(graph.edges)}
    credit: dict[str, Tensor] = {}
    for node in graph.credit_order:
        if node == graph.label_node:
            credit[node] = outcome
            continue
        rho = has_local[:, column[node]].to(outcome.dtype)
        numerator = rho * torch.where(has_local[:, column[node]], local[:, column[node]], 0.0)
        denominator = rho
        for successor in digraph.successors(node):
            weight = phi[edge[(node, successor)]]
            numerator = numerator + weight * credit[successor]
            denominator = denominator + weight
        defined = denominator > 0
        credit[node] = torch.where(defined, numerator / torch.where(defined, denominator, 1.0), outcome)
    return torch.stack([credit[name] for name in names], dim=1)


def edge_matrix(phi: Tensor, graph: CreditGraph) -> Tensor:
    """(N, N) weights W with W[v, u] = phi[v->u] and 0 where there is no edge; differentiable in phi."""
    weights = torch.zeros(graph.num_nodes, graph.num_nodes, dtype=phi.dtype, device=phi.device)
    return weights.index_put((graph.source, graph.target), phi)


def node_credit(local: Tensor, has_local: Tensor, outcome: Tensor, phi: Tensor, graph: CreditGraph) -> Tensor:
    """Credit c (B, N), vectorised: one step per depth level of the graph (same inputs as the reference).

    With no local signal anywhere and R in {0, 1}, c[:, v] == R bit for bit (numerator and
    denominator are the same reduction over the same weights), so graph credit then equals GRPO
    exactly (property 1 of the spec).
    """
    if phi.shape != (graph.num_edges,):
        raise ValueError(f"node_credit: phi has shape {tuple(phi.shape)}; expected ({graph.num_edges},) for edges {graph.edge_names()}")
    weights = edge_matrix(phi.to(outcome.dtype), graph)
    rho = has_local.to(outcome.dtype)
    own = rho * torch.where(has_local, local, 0.0)
    fallback = outcome.unsqueeze(1)

    def combine(nodes: Tensor, credit: Tensor) -> Tensor:
        level_weights = weights[nodes].unsqueeze(0)  # (1, L, N): the level's out-edges
        numerator = own[:, nodes] + (credit.unsqueeze(1) * level_weights).sum(-1)
        denominator = rho[:, nodes] + (torch.ones_like(credit).unsqueeze(1) * level_weights).sum(-1)
        defined = denominator > 0
        return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), fallback)

    credit = torch.zeros_like(own)
    credit = credit.index_copy(1, graph.sinks, combine(graph.sinks, credit))
    credit = credit.index_copy(1, graph.sinks.new_tensor([graph.label]), fallback)
    for nodes in graph.levels:
        credit = credit.index_copy(1, nodes, combine(nodes, credit))
    return credit


def group_normalize(
    values: Tensor, group: Tensor, eps: float, max_advantage: float, scale: str = "node", std_floor: float = 0.0
) -> Tensor:
    """Advantages (B, K) from values (B, K), normalised per column over the rollouts of each group.

    A[i, k] = (x[i, k] - mean_j x[j, k]) / s, the mean over the rollouts j of i's group, then clipped
    to [-max_advantage, max_advantage]; 0 where a column is constant within the group (std 0, and
    every group of one rollout). s is the unbiased (n - 1) standard deviation, as in DeepSeekMath /
    verl GRPO:
    - `scale="node"`: s = std_j x[j, k] + eps, per column (the spec's per-node formula).
    - `scale="group"`: s = max(pooled std, std_floor), one std per group over all K columns of the
      deviations from the column means (GRAPH_GRPO.md, lesson 2).

    group: (B,) long prompt ids (any values; rollouts with equal ids form a group).
    Differentiable in `values` (the controller needs dA/dphi); no NaN gradients at constant groups.
    """
    if scale not in SCALES:
        raise ValueError(f"group_normalize: unknown scale {scale!r}; use one of {list(SCALES)}")
    if values.dim() != 2 or group.shape != values.shape[:1]:
        raise ValueError(f"group_normalize: values (B, K) and group (B,) expected, got {tuple(values.shape)} and {tuple(group.shape)}")
    _, member = torch.unique(group, return_inverse=True)
    n_groups, width = int(member.max()) + 1, values.shape[1]
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, member, torch.ones_like(values[:, 0]))
    mean = torch.zeros(n_groups, width, dtype=values.dtype, device=values.device).index_add(0, member, values) / counts.unsqueeze(1)
    deviation = values - mean[member]
    squares = torch.zeros_like(mean).index_add(0, member, deviation.square())
    dof = (counts - 1).clamp_min(1).unsqueeze(1)
    if scale == "node":
        variance = squares / dof
    else:
        variance = (squares.sum(1, keepdim=True) / (dof * width)).expand(n_groups, width)
    positive = variance > 0
    std = torch.where(positive, torch.where(positive, variance, 1.0).sqrt(), 0.0)
    denominator = std + eps if scale == "node" else std.clamp_min(std_floor)
    denominator = torch.where(denominator > 0, denominator, 1.0)  # only where the column is constant anyway
    high = torch.full_like(mean, -torch.inf).scatter_reduce(0, member.unsqueeze(1).expand_as(values), values.detach(), "amax")
    low = torch.full_like(mean, torch.inf).scatter_reduce(0, member.unsqueeze(1).expand_as(values), values.detach(), "amin")
    constant = (high == low)[member]
    advantages = (deviation / denominator[member]).clamp(-max_advantage, max_advantage)
    return torch.where(constant, 0.0, advantages)


def node_advantages_to_tokens(node_advantages: Tensor, token_nodes: Tensor, response_mask: Tensor, label: int) -> Tensor:
    """Token advantages (B, T): every token of node v's span gets A[i, v].

    token_nodes: (B, T) long node index of each token, -1 for tokens outside every span (newline
    separators, EOS, text after the last node line); those get the label node's advantage A[i, y].
    response_mask: (B, T) bool, True on generated tokens; advantages are 0 elsewhere (prompt, padding).
    """
    index = torch.where(token_nodes >= 0, token_nodes, label)
    return torch.where(response_mask, node_advantages.gather(1, index), 0.0)
