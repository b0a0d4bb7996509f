"""Rewards of parsed rollouts (GRAPH_GRPO.md, "Rewards" and lesson 1 "Strict format reward").

Inputs are B rollouts: the strict parse of each generation (`training.cot.parse_cot(..., mode="strict")`),
whether it ended with EOS, the gold node values of its prompt (a dict that may lack nodes: on WANDS
only qs, ps, pa, ms and y are known) and its group (prompt) id. Outputs are tensors over the graph's
nodes in `ReasoningGraph.node_names` order.

- Format: a rollout is *formatted* when the strict parse is well formed and it ended with EOS.
  Every reward of an unformatted rollout is 0: R = 0, and each reasoning node has local signal 0.
- Outcome R[i]: 1 if the parsed label equals the gold label, else 0; with `ordinal`, partial credit
  1 - |rank(pred) - rank(gold)| / (L - 1) over the label set's order.
- Verifier r[i, v] in {0, 1} for each reasoning node v whose gold value is known: the parsed value
  equals the gold one (facets compared as key/value sets, `training.cot.node_correct`).
- Monte-Carlo value for a reasoning node without a verifier: the mean of R[j] over the other
  formatted rollouts j of the same group whose decision on v (its parsed value) equals i's;
  undefined (no local signal) when there is no such rollout.
- The label node never has a local signal: its credit is R itself.
- Class-balanced weights (`class_balanced_weights`): w[c] = n / (K n_c) from the training split's gold
  label counts n_c (K classes present), so the mean weight over training pairs is 1. The trainer scales
  each rollout's advantages by its prompt's w[gold]: the objective becomes the class-balanced expected
  reward (mean per-class recall under 0/1), which macro-F1 tracks and plain accuracy does not. A
  per-prompt factor cannot go into R itself: every rollout of a group shares its prompt's gold label,
  so the group normalisation would divide it out again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from schemas.graph import LabelSet, ReasoningGraph, format_facets, parse_facets
from training.cot import ParsedCoT, node_correct


@dataclass(frozen=True)
class NodeRewards:
    """Rewards of B rollouts over N nodes (graph node order).

    outcome: (B,) float R.
    verifier: (B, N) float in {0, 1}, 0 where `verified` is False.
    verified: (B, N) bool, a verifier exists (gold value known; never the label node).
    local: (B, N) float, the local signal r: the verifier where verified, else the Monte-Carlo value; 0
        where `has_local` is False.
    has_local: (B, N) bool, rho.
    formatted: (B,) bool, strict parse well formed and EOS emitted.
    """

    outcome: Tensor
    verifier: Tensor
    verified: Tensor
    local: Tensor
    has_local: Tensor
    formatted: Tensor


def outcome_rewards(predicted: Sequence[str | None], gold: Sequence[str], labels: LabelSet, ordinal: bool = False) -> Tensor:
    """(B,) outcome rewards: 1 for the gold label, else 0 (None: no label parsed -> 0).

    With `ordinal`, 1 - |rank(pred) - rank(gold)| / (L - 1), ranks in the label set's order (best first).
    """
    if len(predicted) != len(gold):
        raise ValueError(f"outcome_rewards: {len(predicted)} predictions but {len(gold)} gold labels")
    worst = max(len(labels.names) - 1, 1)
    values = []
    for prediction, target in zip(predicted, gold):
        if prediction is None or prediction not in labels.names:
            values.append(0.0)
        elif ordinal:
            values.append(1.0 - abs(labels.index(prediction) - labels.index(target)) / worst)
        else:
            values.append(float(prediction == target))
    return torch.tensor(values, dtype=torch.float32)


def class_balanced_weights(gold_labels: Sequence[str], labels: LabelSet) -> dict[str, float]:
    """label -> n / (K n_label) over the gold labels of the training split (K: labels that occur); mean 1 per pair."""
    counts = {name: 0 for name in labels.names}
    for label in gold_labels:
        if label not in counts:
            raise ValueError(f"class_balanced_weights: gold label {label!r} is not one of {list(labels.names)}")
        counts[label] += 1
    present = {name: n for name, n in counts.items() if n}
    if not present:
        raise ValueError("class_balanced_weights: no gold labels to count")
    total = sum(present.values())
    return {name: total / (len(present) * n) for name, n in present.items()}


def decision_ids(parsed: Sequence[ParsedCoT], graph: ReasoningGraph) -> Tensor:
    """(B, N) long: each node's parsed value as an id shared by equal values within the batch, -1 if missing.

    Facets values are compared as key/value sets (`color=a; size=b` equals `size=b; color=a`).
    """
    vocabulary: dict[tuple[str, str], int] = {}
    rows = []
    for parse in parsed:
        row = []
        for node in graph.node_names:
            value = parse.get(node)
            if value is None:
                row.append(-1)
                continue
            if graph.node(node).kind == "facets":
                facets = parse_facets(value)
                value = format_facets(facets) if facets is not None else value
            row.append(vocabulary.setdefault((node, value), len(vocabulary)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(len(parsed), len(graph.node_names))


def monte_carlo_values(decisions: Tensor, outcome: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Monte-Carlo value of each rollout's decision on each node, from the other rollouts of its group.

    decisions: (B, N) long decision ids, -1 for no decision (missing node, or a rollout excluded).
    outcome: (B,) float R. group: (B,) long prompt ids.
    Returns (values (B, N) float, defined (B, N) bool): values[i, v] = mean of R[j] over j != i with
    group[j] == group[i], decisions[j, v] == decisions[i, v] != -1; 0 and undefined when there is no such j.
    """
    batch = decisions.shape[0]
    peers = (group.unsqueeze(0) == group.unsqueeze(1)) & ~torch.eye(batch, dtype=torch.bool, device=group.device)
    same = peers.unsqueeze(2) & (decisions.unsqueeze(0) == decisions.unsqueeze(1)) & (decisions >= 0).unsqueeze(1)
    counts = same.sum(0).to(outcome.dtype)  # [j, i, v] summed over j
    totals = (same.to(outcome.dtype) * outcome.view(batch, 1, 1)).sum(0)
    defined = counts > 0
    return torch.where(defined, totals / counts.clamp_min(1), 0.0), defined


def verifier_rewards(parsed: Sequence[ParsedCoT], golds: Sequence[Mapping[str, str]], graph: ReasoningGraph) -> tuple[Tensor, Tensor]:
    """(verifier (B, N) float, verified (B, N) bool) for the reasoning nodes whose gold value is known."""
    names = graph.node_names
    verified = [[node != graph.label_node and node in gold for node in names] for gold in golds]
    verifier = [
        [float(known and node_correct(graph.node(node).kind, parse.get(node), gold[node])) for node, known in zip(names, flags)]
        for parse, gold, flags in zip(parsed, golds, verified)
    ]
    shape = (len(parsed), len(names))
    return torch.tensor(verifier, dtype=torch.float32).reshape(shape), torch.tensor(verified, dtype=torch.bool).reshape(shape)


def score_rollouts(
    parsed: Sequence[ParsedCoT],
    ended: Sequence[bool],
    golds: Sequence[Mapping[str, str]],
    group: Tensor,
    graph: ReasoningGraph,
    labels: LabelSet,
    ordinal: bool = False,
) -> NodeRewards:
    """All rewards of B rollouts (see the module docstring for the rules).

    parsed: strict parses; ended: EOS emitted; golds: gold node values of each rollout's prompt (must
    hold the label node); group: (B,) long prompt ids.
    """
    if not len(parsed) == len(ended) == len(golds) == group.shape[0]:
        raise ValueError(f"score_rollouts: {len(parsed)} parses, {len(ended)} EOS flags, {len(golds)} golds, {group.shape[0]} group ids")
    missing_label = [i for i, gold in enumerate(golds) if graph.label_node not in gold]
    if missing_label:
        raise ValueError(f"score_rollouts: gold values of rollouts {missing_label[:5]} lack the label node {graph.label_node!r}")
    formatted = torch.tensor([parse.well_formed and end for parse, end in zip(parsed, ended)], dtype=torch.bool)
    outcome = outcome_rewards([p.get(graph.label_node) for p in parsed], [g[graph.label_node] for g in golds], labels, ordinal)
    outcome = torch.where(formatted, outcome, 0.0)
    verifier, verified = verifier_rewards(parsed, golds, graph)
    decisions = torch.where(formatted.unsqueeze(1), decision_ids(parsed, graph), -1)
    mc_values, mc_defined = monte_carlo_values(decisions, outcome, group)
    reasoning = torch.tensor([node != graph.label_node for node in graph.node_names], dtype=torch.bool)
    verifier = torch.where(formatted.unsqueeze(1), verifier, 0.0)
    local = torch.where(verified, verifier, mc_values)
    has_local = (verified | mc_defined | ~formatted.unsqueeze(1)) & reasoning
    local = torch.where(has_local & formatted.unsqueeze(1), local, 0.0)
    return NodeRewards(outcome=outcome, verifier=verifier, verified=verified, local=local, has_local=has_local, formatted=formatted)


def reward_metrics(rewards: NodeRewards, graph: ReasoningGraph) -> dict[str, float]:
    """Batch means: outcome, format rate, and per node the verifier accuracy and local-signal coverage."""
    verified = rewards.verified.to(rewards.verifier.dtype)
    accuracy = (rewards.verifier * verified).sum(0) / verified.sum(0).clamp_min(1)
    coverage = rewards.has_local.to(rewards.verifier.dtype).mean(0)
    stats = torch.cat([torch.stack([rewards.outcome.mean(), rewards.formatted.float().mean()]), accuracy, coverage]).tolist()
    n = len(graph.node_names)
    metrics = {"reward/outcome": stats[0], "reward/format": stats[1]}
    for k, node in enumerate(graph.node_names):
        if node != graph.label_node:
            metrics[f"reward/verifier/{node}"] = stats[2 + k]
            metrics[f"reward/has_local/{node}"] = stats[2 + n + k]
    return metrics
