"""The policy-gradient step shared by every estimator (GRAPH_GRPO.md, "The policy-gradient step").

Shapes: B rollouts, T response tokens (right-padded), `mask` (B, T) bool True on generated tokens.
All losses reduce through `aggregation_weights`, so the per-token loss that enters the total is
`weights * l_t` and the controller can use the same weights (`L_total = sum_t A_t * l_t`).

- PPO-clip with separate `eps_low` / `eps_high` (DAPO's clip-higher): per token
  `max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))`, ratio = exp(logp - logp_sampling).
- KL to the reference with the k3 estimator `exp(ref - logp) - (ref - logp) - 1` (Schulman), weight
  `beta`, added per token before aggregation (as verl's `use_kl_loss`).
- Aggregation modes (verl `agg_loss`): `token_mean` (every token of the batch weighs the same),
  `seq_mean_token_mean` (mean over rollouts of each rollout's token mean), `seq_mean_token_sum_norm`
  (mean over rollouts of token sums divided by the longest response T; Dr. GRPO's length-unbiased form).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass(frozen=True)
class StepParams:
    """Scalars of the policy-gradient loss (the trainer's config fills them)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    aggregation: str = "token_mean"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"StepParams.aggregation: {self.aggregation!r}; use one of {list(AGGREGATIONS)}")
        if not 0.0 <= self.eps_low < 1.0 or self.eps_high < 0 or self.beta < 0:
            raise ValueError(f"StepParams: need eps_low in [0, 1), eps_high >= 0, beta >= 0; got {self}")


def aggregation_weights(mask: Tensor, mode: str) -> Tensor:
    """(B, T) weights w such that the aggregated loss is `(w * per_token_loss).sum()`; 0 off the mask."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation_weights: unknown mode {mode!r}; use one of {list(AGGREGATIONS)}")
    mask = mask.to(torch.float32)
    batch, width = mask.shape
    if mode == "token_mean":
        return mask / mask.sum().clamp_min(1)
    if mode == "seq_mean_token_mean":
        return mask / (mask.sum(1, keepdim=True).clamp_min(1) * batch)
    return mask / (batch * max(width, 1))


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """(B, T) k3 estimate of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - logp."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def policy_loss(
    logprobs: Tensor,
    sampling_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: StepParams,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, metrics) of one mini-batch.

    logprobs: (B, T) current policy, differentiable; sampling_logprobs: (B, T) of the policy that drew
    the tokens; advantages: (B, T) from an estimator; ref_logprobs: (B, T) reference (needed iff beta > 0).
    Metrics (0-dim tensors, detached): pg_loss, kl (token mean), clip_fraction (tokens whose clipped
    term is the active one), ratio_mean.
    """
    if params.beta > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logprobs")
    weights = aggregation_weights(mask, params.aggregation)
    ratio = torch.exp(logprobs - sampling_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - params.eps_low, 1.0 + params.eps_high)
    per_token = torch.maximum(unclipped, clipped)
    pg_loss = (weights * per_token).sum()
    tokens = mask.sum().clamp_min(1)
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_fraction": ((clipped > unclipped) & mask).sum() / tokens,
        "ratio_mean": (ratio.detach() * mask).sum() / tokens,
    }
    loss = pg_loss
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
        if params.beta > 0:
            loss = loss + params.beta * (weights * kl).sum()
    return loss, metrics


def surrogate_token_losses(logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """(B, T) l_t with `L_total = sum_t A_t * l_t` near the sampling policy: -ratio_t * w_t.

    Inside the clip range (always so at the first PPO epoch) the PPO-clip loss is exactly this sum, so
    its gradient is what the controller's look-ahead needs (GRAPH_GRPO.md, the controller)."""
    return -torch.exp(logprobs - sampling_logprobs) * aggregation_weights(mask, aggregation)


@dataclass(frozen=True)
class PackedBatch:
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

    def rows(self, index: Tensor) -> "PackedBatch":
        return PackedBatch(
            self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.response_ids[index],
            self.mask[index], self.sampling_logprobs[index], self.prompt_width,
        )


def pack_rollouts(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], sampling_logprobs: Sequence[Sequence[float]], pad_id: int
) -> PackedBatch:
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
    return PackedBatch(input_ids, attention, position_ids, response_ids, mask, old, prompt_width)


def response_logprobs(model, packed: PackedBatch, temperature: float, with_entropy: bool = False, params=None) -> tuple[Tensor, Tensor | None]:
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
