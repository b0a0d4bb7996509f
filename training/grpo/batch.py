"""Rollouts as tensors for the policy's forward pass (GRAPH_GRPO.md, "The policy-gradient step").

`pack_rollouts` lays B (prompt, response, sampling logprobs) triples out as one left-padded-prompt
batch; `response_logprobs` runs the model over it (the only code here that touches a model);
`token_node_index` turns the per-token node names of `training.examples.token_node_map` into the
index and mask tensors the estimators read. The loss math that consumes these is `training.grpo.loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedRollouts:
    """Rollouts as tensors for one forward pass: prompts left-padded to width P, responses after them.

    input_ids, attention_mask, position_ids: (B, P + T); response_ids, mask, sampling_logprobs: (B, T).
    Response token t of row i sits at position P + t and is predicted by the logits at P + t - 1.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_ids: Tensor
    mask: Tensor
    sampling_logprobs: Tensor
    prompt_width: int

    def rows(self, index: Tensor) -> PackedRollouts:
        return PackedRollouts(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.response_ids[index],
            self.mask[index], self.sampling_logprobs[index], self.prompt_width,
        )

    def to(self, device) -> PackedRollouts:
        return PackedRollouts(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device), self.response_ids.to(device),
            self.mask.to(device), self.sampling_logprobs.to(device), self.prompt_width,
        )


def pack_rollouts(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], sampling_logprobs: Sequence[Sequence[float]], pad_id: int
) -> PackedRollouts:
    """Pack B (prompt ids, response ids, sampling logprobs) triples; position ids skip the left padding,
    as `generate` numbers them, so teacher-forced logprobs equal the sampled ones."""
    if not len(prompts) == len(responses) == len(sampling_logprobs):
        raise ValueError(f"pack_rollouts: {len(prompts)} prompts, {len(responses)} responses, {len(sampling_logprobs)} logprob rows")
    batch = len(prompts)
    prompt_width = max(len(p) for p in prompts)
    width = max(1, max(len(r) for r in responses))
    input_ids = torch.full((batch, prompt_width + width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, prompt_width + width), dtype=torch.long)
    response_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    old = torch.zeros((batch, width), dtype=torch.float32)
    for i, (prompt, response, lps) in enumerate(zip(prompts, responses, sampling_logprobs)):
        n = len(response)
        input_ids[i, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt, dtype=torch.long)
        attention[i, prompt_width - len(prompt) : prompt_width + n] = 1
        if n:
            input_ids[i, prompt_width : prompt_width + n] = torch.tensor(response, dtype=torch.long)
            response_ids[i, :n] = torch.tensor(response, dtype=torch.long)
            old[i, :n] = torch.tensor(lps, dtype=torch.float32)
        mask[i, :n] = True
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)
    return PackedRollouts(input_ids, attention, position_ids, response_ids, mask, old, prompt_width)


def response_logprobs(model, packed: PackedRollouts, temperature: float, with_entropy: bool = False,
                      params=None) -> tuple[Tensor, Tensor | None]:
    """((B, T) log_softmax(logits / T) of the response tokens, (B, T) entropy or None).

    `params`: optional {name: tensor} to run the model functionally with (the controller's perturbed
    weights); otherwise the module's own parameters.
    """
    inputs = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask, "position_ids": packed.position_ids}
    if params is None:
        logits = model(**inputs).logits
    else:
        logits = torch.func.functional_call(model, dict(params), args=(), kwargs=inputs).logits
    width = packed.response_ids.shape[1]
    start = packed.prompt_width - 1
    scaled = logits[:, start : start + width].float() / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    logprobs = logp_all.gather(2, packed.response_ids.unsqueeze(2)).squeeze(2)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logprobs, entropy


def token_node_index(rows: Sequence[Sequence[str | None]], nodes: Sequence[str], width: int) -> tuple[Tensor, Tensor]:
    """(token_nodes (B, width) long, response_mask (B, width) bool) from token -> node-name lists.

    Each row is one response's token -> node-name list (None: no node); rows are right-padded with -1
    and mask False. Unknown node names raise.
    """
    index = {name: k for k, name in enumerate(nodes)}
    token_nodes = torch.full((len(rows), width), -1, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"token_node_index: row {i} has {len(row)} tokens, more than width {width}")
        unknown = sorted({name for name in row if name is not None and name not in index})
        if unknown:
            raise ValueError(f"token_node_index: row {i} names nodes {unknown} that the graph {list(nodes)} lacks")
        token_nodes[i, : len(row)] = torch.tensor([-1 if name is None else index[name] for name in row], dtype=torch.long)
        mask[i, : len(row)] = True
    return token_nodes, mask
