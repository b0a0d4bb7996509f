"""The policy-gradient loss shared by every estimator (GRAPH_GRPO.md, "The policy-gradient step").

Pure functions of tensors and scalars; packing rollouts and the model's forward pass are in
`training.grpo.batch`.

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
- A mini-batch split over processes: each passes its rows' part of the whole mini-batch's aggregation
  weights and token shares (`weights`, `token_share`); its loss and metrics are then its part of the
  mini-batch's, and they sum over the processes to the values one process computes.
"""

from __future__ import annotations

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


def token_shares(mask: Tensor) -> Tensor:
    """(B, T) 1 / (tokens of the batch) on each token, 0 off the mask: token means are `(share * value).sum()`."""
    mask = mask.to(torch.float32)
    return mask / mask.sum().clamp_min(1)


def policy_loss(
    logprobs: Tensor,
    sampling_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: StepParams,
    ref_logprobs: Tensor | None = None,
    weights: Tensor | None = None,
    token_share: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, metrics) of one mini-batch.

    logprobs: (B, T) current policy, differentiable; sampling_logprobs: (B, T) of the policy that drew
    the tokens; advantages: (B, T) from an estimator; ref_logprobs: (B, T) reference (needed iff beta > 0).
    weights, token_share: (B, T) `aggregation_weights` and `token_shares` of the whole mini-batch cut to
    these rows, when they are one process's part of it (default: of these rows).
    Metrics (0-dim tensors, detached): pg_loss, kl (token mean), clip_fraction (tokens whose clipped
    term is the active one), ratio_mean.
    """
    if params.beta > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logprobs")
    weights = aggregation_weights(mask, params.aggregation) if weights is None else weights
    token_share = token_shares(mask) if token_share is None else token_share
    ratio = torch.exp(logprobs - sampling_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - params.eps_low, 1.0 + params.eps_high)
    per_token = torch.maximum(unclipped, clipped)
    pg_loss = (weights * per_token).sum()
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_fraction": (((clipped > unclipped) & mask) * token_share).sum(),
        "ratio_mean": (ratio.detach() * token_share).sum(),
    }
    loss = pg_loss
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        metrics["kl"] = (kl.detach() * token_share).sum()
        if params.beta > 0:
            loss = loss + params.beta * (weights * kl).sum()
    return loss, metrics


def surrogate_token_losses(logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, aggregation: str,
                           weights: Tensor | None = None) -> Tensor:
    """(B, T) l_t with `L_total = sum_t A_t * l_t` near the sampling policy: -ratio_t * w_t.

    Inside the clip range (always so at the first PPO epoch) the PPO-clip loss is exactly this sum, so
    its gradient is what the controller's look-ahead needs (GRAPH_GRPO.md, the controller). `weights`:
    the whole batch's aggregation weights cut to these rows, when they are one process's part of it."""
    return -torch.exp(logprobs - sampling_logprobs) * (aggregation_weights(mask, aggregation) if weights is None else weights)
