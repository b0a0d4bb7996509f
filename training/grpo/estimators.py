"""Advantage estimators, registered by name (GRAPH_GRPO.md, "Estimators, registered by name").

Every estimator is a pure function `(AdvantageBatch, AdvantageParams) -> (advantages, metrics)`:
advantages is a (B, T) float tensor (0 outside `response_mask`), metrics a dict of floats with the
per-node advantage statistics (`adv/<node>/mean`, `adv/<node>/abs_mean` over the tokens of each node,
`adv/<none>/...` for tokens of no node). All of them share one group normalisation
(`credit.group_normalize`: per-group mean, unbiased std, eps, zero on constant groups, clip), so they
differ only in what is normalised and where it lands.

| name | advantage |
|---|---|
| `grpo` | group-normalised outcome R on every token |
| `sam` | `grpo`, set to 0 on the spans of nodes whose verifier disagrees with the advantage's sign |
| `process` | node credit with phi = 0: each node's own local signal, normalised per node, no propagation |
| `shaped` | `grpo` on R + lambda * mean verifier reward of the rollout's verified reasoning nodes |
| `graph_fixed` | node credit with the batch's phi (frozen), normalised per node, spread to the spans |
| `graph_grpo` | the same function; the trainer passes the controller's phi (`Estimator.learns_phi`) |

The trainer has one call site: `get_estimator(name)(batch, params)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from training.grpo.credit import SCALES, CreditGraph, group_normalize, node_advantages_to_tokens, node_credit
from training.grpo.rewards import NodeRewards


@dataclass(frozen=True)
class AdvantageBatch:
    """What every estimator sees.

    rewards: `NodeRewards` of the B rollouts (N nodes in `graph.nodes` order).
    token_nodes: (B, T) long node index of each response token, -1 for tokens of no node (they get the
        label node's advantage).
    response_mask: (B, T) bool, True on generated tokens (advantages are 0 elsewhere).
    group: (B,) long prompt ids.
    graph: the credit graph.
    phi: (E,) edge coefficients in `graph.edges` order (graph estimators only); may require grad, and
        the advantages are then differentiable in it (the controller's dA/dphi).
    """

    rewards: NodeRewards
    token_nodes: Tensor
    response_mask: Tensor
    group: Tensor
    graph: CreditGraph
    phi: Tensor | None = None

    def __post_init__(self) -> None:
        batch, nodes = self.rewards.local.shape
        if nodes != self.graph.num_nodes:
            raise ValueError(f"AdvantageBatch: rewards have {nodes} node columns; graph {list(self.graph.nodes)} has {self.graph.num_nodes}")
        if self.token_nodes.dim() != 2 or self.token_nodes.shape[0] != batch or self.response_mask.shape != self.token_nodes.shape:
            raise ValueError(
                f"AdvantageBatch: token_nodes {tuple(self.token_nodes.shape)} and response_mask {tuple(self.response_mask.shape)} "
                f"must both be ({batch}, T)"
            )
        if self.group.shape != (batch,):
            raise ValueError(f"AdvantageBatch: group has shape {tuple(self.group.shape)}, expected ({batch},)")


@dataclass(frozen=True)
class AdvantageParams:
    """Scalars of the estimators (the trainer's config fills them)."""

    eps: float = 1e-6
    max_advantage: float = 5.0
    scale: str = "node"
    std_floor: float = 0.1
    shaped_lambda: float = 0.5

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"AdvantageParams.scale: {self.scale!r}; use one of {list(SCALES)}")
        if self.eps < 0 or self.max_advantage <= 0 or self.std_floor < 0:
            raise ValueError(f"AdvantageParams: need eps >= 0, max_advantage > 0, std_floor >= 0; got {self}")


EstimatorFn = Callable[[AdvantageBatch, AdvantageParams], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: `fn` plus what the trainer needs to know about it."""

    name: str
    fn: EstimatorFn = field(repr=False)
    source: str
    needs_phi: bool = False
    learns_phi: bool = False

    def __call__(self, batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
        return self.fn(batch, params)


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, source: str, needs_phi: bool = False, learns_phi: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register `fn` under `name`; `needs_phi`: it reads `AdvantageBatch.phi`; `learns_phi`: the controller moves that phi."""
    def decorate(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        ESTIMATORS[name] = Estimator(name=name, fn=fn, source=source, needs_phi=needs_phi or learns_phi, learns_phi=learns_phi)
        return fn

    return decorate


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ESTIMATORS)}") from None


# ---------------------------------------------------------------- shared pieces


def outcome_token_advantages(outcome: Tensor, batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, Tensor]:
    """(per-rollout advantage (B,), token advantages (B, T)) of a scalar reward per rollout."""
    advantage = group_normalize(outcome.unsqueeze(1), batch.group, params.eps, params.max_advantage, params.scale, params.std_floor)[:, 0]
    return advantage, torch.where(batch.response_mask, advantage.unsqueeze(1), 0.0)


def credit_token_advantages(phi: Tensor, batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, Tensor, Tensor]:
    """(credit (B, N), node advantages (B, N), token advantages (B, T)) of the graph credit under phi."""
    rewards = batch.rewards
    credit = node_credit(rewards.local, rewards.has_local, rewards.outcome, phi, batch.graph)
    node_adv = group_normalize(credit, batch.group, params.eps, params.max_advantage, params.scale, params.std_floor)
    tokens = node_advantages_to_tokens(node_adv, batch.token_nodes, batch.response_mask, batch.graph.label)
    return credit, node_adv, tokens


def advantage_metrics(tokens: Tensor, batch: AdvantageBatch, extra: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Per-node token statistics of `tokens` (mean, mean |A|, token count) plus `extra` scalars, one sync."""
    nodes = batch.graph.nodes
    bins = torch.where(batch.token_nodes >= 0, batch.token_nodes, len(nodes))[batch.response_mask]
    values = tokens.detach()[batch.response_mask]
    width = len(nodes) + 1
    count = torch.zeros(width, dtype=values.dtype, device=values.device).index_add(0, bins, torch.ones_like(values))
    total = torch.zeros_like(count).index_add(0, bins, values)
    absolute = torch.zeros_like(count).index_add(0, bins, values.abs())
    names = list(extra or {})
    scalars = [values.mean() if values.numel() else values.new_zeros(()), *[(extra or {})[k].detach().float() for k in names]]
    flat = torch.cat([count, total / count.clamp_min(1), absolute / count.clamp_min(1), torch.stack(scalars).to(count.dtype)]).tolist()
    metrics: dict[str, float] = {}
    for k, node in enumerate([*nodes, "<none>"]):
        metrics[f"adv/{node}/tokens"] = flat[k]
        metrics[f"adv/{node}/mean"] = flat[width + k]
        metrics[f"adv/{node}/abs_mean"] = flat[2 * width + k]
    metrics["adv/token_mean"] = flat[3 * width]
    metrics.update(zip(names, flat[3 * width + 1 :]))
    return metrics


def _node_means(prefix: str, values: Tensor, nodes: Sequence[str]) -> dict[str, Tensor]:
    means = values.detach().mean(0)
    return {f"{prefix}/{node}": means[k] for k, node in enumerate(nodes)}


def _phi_metrics(phi: Tensor, graph: CreditGraph) -> dict[str, Tensor]:
    return {f"phi/{edge}": phi.detach()[e] for e, edge in enumerate(graph.edge_names())}


def _require_phi(batch: AdvantageBatch, name: str) -> Tensor:
    if batch.phi is None:
        raise ValueError(f"estimator {name!r} needs edge coefficients: set AdvantageBatch.phi ({batch.graph.num_edges} values, edges {batch.graph.edge_names()})")
    return batch.phi


# ---------------------------------------------------------------- the estimators


@register_estimator("grpo", source="DeepSeekMath GRPO (GRAPH_GRPO.md, Estimators: grpo)")
def grpo(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """Outcome advantage on every token: A[i, t] = group_normalize(R)[i] (GRAPH_GRPO.md, Estimators)."""
    _, tokens = outcome_token_advantages(batch.rewards.outcome, batch, params)
    return tokens, advantage_metrics(tokens, batch)


@register_estimator("sam", source="Xiaohongshu SAM, arXiv 2512.00968 (GRAPH_GRPO.md, Estimators: sam)")
def sam(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """Outcome advantage, 0 on the spans of nodes whose verifier disagrees with its sign (GRAPH_GRPO.md, Estimators).

    Disagreement on node v of rollout i: v has a verifier and A[i] > 0 while r[i, v] = 0, or A[i] < 0
    while r[i, v] = 1. Only verifiers count (not Monte-Carlo values); tokens of no node and the label
    node's tokens are never masked.
    """
    rewards = batch.rewards
    advantage, tokens = outcome_token_advantages(rewards.outcome, batch, params)
    sign = advantage.unsqueeze(1)
    disagree = rewards.verified & (((sign > 0) & (rewards.verifier < 0.5)) | ((sign < 0) & (rewards.verifier > 0.5)))
    index = torch.where(batch.token_nodes >= 0, batch.token_nodes, batch.graph.label)
    masked = disagree.gather(1, index) & batch.response_mask
    tokens = torch.where(masked, 0.0, tokens)
    share = masked.sum() / batch.response_mask.sum().clamp_min(1)
    return tokens, advantage_metrics(tokens, batch, {"sam/masked_token_share": share})


@register_estimator("process", source="process-reward GRPO (GRAPH_GRPO.md, Estimators: process)")
def process(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """Each node's own local signal, normalised per node, no propagation: the credit with phi = 0.

    With phi = 0 a node's credit is its local signal r (verifier or Monte-Carlo value) where it has one
    and R where it has none (`credit.node_credit` fallback); the label node's is R (GRAPH_GRPO.md, Estimators).
    """
    phi = torch.zeros(batch.graph.num_edges, dtype=batch.rewards.outcome.dtype, device=batch.rewards.outcome.device)
    credit, _, tokens = credit_token_advantages(phi, batch, params)
    return tokens, advantage_metrics(tokens, batch, _node_means("credit", credit, batch.graph.nodes))


@register_estimator("shaped", source="TaoSR-AGRL, arXiv 2510.08048 (GRAPH_GRPO.md, Estimators: shaped)")
def shaped(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """GRPO on R + lambda * (mean verifier reward over the rollout's verified reasoning nodes; 0 if none).

    Only verifiers count, so on outcome-only data this is `grpo` (GRAPH_GRPO.md, Estimators).
    """
    rewards = batch.rewards
    verified = rewards.verified.to(rewards.verifier.dtype)
    mean_verifier = (rewards.verifier * verified).sum(1) / verified.sum(1).clamp_min(1)
    reward = rewards.outcome + params.shaped_lambda * mean_verifier
    _, tokens = outcome_token_advantages(reward, batch, params)
    return tokens, advantage_metrics(tokens, batch, {"shaped/reward_mean": reward.mean()})


def graph_credit(batch: AdvantageBatch, params: AdvantageParams, name: str) -> tuple[Tensor, dict[str, float]]:
    """Node credit under `batch.phi`, normalised per node, spread onto each node's span (GRAPH_GRPO.md,
    "Credit propagation"); tokens of no node get the label node's advantage."""
    phi = _require_phi(batch, name)
    credit, _, tokens = credit_token_advantages(phi, batch, params)
    extra = {**_node_means("credit", credit, batch.graph.nodes), **_phi_metrics(phi, batch.graph)}
    return tokens, advantage_metrics(tokens, batch, extra)


@register_estimator("graph_fixed", source="Graph-GRPO ablation, phi frozen (GRAPH_GRPO.md, Estimators: graph_fixed)", needs_phi=True)
def graph_fixed(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """Graph credit with phi frozen at the batch's values (the trainer passes its fixed phi, default 0.5)."""
    return graph_credit(batch, params, "graph_fixed")


@register_estimator("graph_grpo", source="Graph-GRPO, arXiv 2605.31003 (GRAPH_GRPO.md, Estimators: graph_grpo)", learns_phi=True)
def graph_grpo(batch: AdvantageBatch, params: AdvantageParams) -> tuple[Tensor, dict[str, float]]:
    """Graph credit with the controller's phi (`training.grpo.controller.EdgeController.phi()`); the
    advantages are differentiable in phi when it requires grad, which the look-ahead gradient uses."""
    return graph_credit(batch, params, "graph_grpo")
