"""Decoding of left-padded batches, greedy or sampled.

- Greedy (`sampling=None`): validation, scoring and teacher targets. Our own loop over the model's KV cache
  (`_greedy_batch`): the argmax token at each step (the folder's generation_config is not applied) and, as rows
  reach EOS, they leave the batch and the cache (`DynamicCache.batch_select_indices`), so a batch costs the sum of
  its CoT lengths rather than its longest times its size (transformers' `generate` computes finished rows to the end).
  The tokens are those `generate` chooses greedily. Under FSDP (`synced`) every process must keep stepping, so
  there `generate` runs.
- Sampled: GRPO rollouts. `torch.manual_seed(seed)` seeds the global generator `generate` draws
  from, `top_k=0` leaves top-p as the only filter, and the raw logits are kept to give each drawn
  token's log-probability under the sampling distribution `log_softmax(logits / T)` (top-p restricts
  which tokens can be drawn, it does not renormalise the logprob, so a trainer recomputes the same
  quantity).

Each response keeps its ids up to and including the first EOS (nothing after it); its text is
decoded without the EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from schemas import logs


class SamplingParams(Protocol):
    """What sampled decoding reads from a sampling setting (GRPO's `Sampling` has these)."""

    temperature: float
    top_p: float


@dataclass(frozen=True)
class Generations:
    """One response per prompt, in prompt order.

    `response_ids[i]`: generated ids up to and including the first EOS; `ended[i]`: whether EOS
    came; `texts[i]`: the response decoded without EOS; `logprobs[i]`: per response id, its
    log-probability under the sampling distribution (None for greedy decoding).
    """

    response_ids: tuple[tuple[int, ...], ...]
    ended: tuple[bool, ...]
    texts: tuple[str, ...]
    logprobs: tuple[tuple[float, ...], ...] | None


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask) (B, longest) long tensors of prompts padded on the left, as generation wants."""
    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def split_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """(ids up to and including the first EOS, whether there was one)."""
    ids = list(ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
             sampling: SamplingParams | None = None, seed: int | None = None, synced: bool = False, progress: str | None = None) -> Generations:
    """One response per prompt id list, `batch_size` left-padded prompts at a time: greedy when
    `sampling` is None, else drawn with its temperature and top-p after `torch.manual_seed(seed)`.

    `synced`: the model is FSDP-sharded over processes that all call this with as many prompts; each keeps
    stepping until every one has finished (transformers' `synced_gpus`), as a forward pass needs them all.
    `progress`: the name of the work, shown as progress over the prompts (None: silent)."""
    import torch

    if sampling is not None and seed is None:
        raise ValueError("generate: sampled decoding needs a seed")
    options = {"do_sample": False}
    if sampling is not None:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0, "output_logits": True}
        torch.manual_seed(seed)  # generate draws from the global generator
    was_training = model.training
    model.eval()
    response_ids, ended, texts, logprobs = [], [], [], []
    bar = logs.progress(desc=progress, total=len(prompts), unit="prompt")
    for start in range(0, len(prompts), batch_size):
        input_ids, attention = left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id)
        input_ids, attention = input_ids.to(model.device), attention.to(model.device)
        drawn = None
        with torch.no_grad():
            if sampling is None and not synced:
                generated = _greedy_batch(model, input_ids, attention, max_new_tokens, tokenizer.eos_token_id)
            else:
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, synced_gpus=synced, **options,
                )
                sequences = output.sequences[:, input_ids.shape[1] :]
                generated = sequences.tolist()
                drawn = _drawn_logprobs(output.logits, sequences, sampling.temperature).tolist() if sampling is not None else None
        for row, ids in enumerate(generated):
            kept, eos = split_at_eos(ids, tokenizer.eos_token_id)
            response_ids.append(tuple(kept))
            ended.append(eos)
            texts.append(tokenizer.decode(kept[:-1] if eos else kept, skip_special_tokens=False))
            if drawn is not None:
                logprobs.append(tuple(drawn[row][: len(kept)]))
        bar.update(len(generated))
    bar.close()
    model.train(was_training)
    return Generations(response_ids=tuple(response_ids), ended=tuple(ended), texts=tuple(texts),
                       logprobs=tuple(logprobs) if sampling is not None else None)


def _greedy_batch(model, input_ids, attention, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy ids of each left-padded row, up to its EOS or `max_new_tokens`; a row that ends leaves the batch."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    next_position = positions[:, -1:] + 1
    rows = list(range(len(input_ids)))  # the batch rows still generating, in cache order
    generated: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            generated[row].append(token)
        going = tokens != eos_id
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows = [rows[i] for i in keep.tolist()]
            tokens, attention, next_position = tokens[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position, past_key_values=cache,
                       use_cache=True).logits
        next_position = next_position + 1
    return generated


def _drawn_logprobs(step_logits, generated, temperature: float):
    """(batch, steps) log_softmax(logits / T) of each generated id; `step_logits` holds one (batch, vocabulary) tensor per step."""
    import torch

    logits = torch.stack(step_logits, dim=1).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(2, generated.unsqueeze(2)).squeeze(2)
