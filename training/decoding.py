"""Decoding of left-padded batches, greedy or sampled, in one loop over the model's KV cache (`_decode_batch`).

- Greedy (`sampling=None`): validation, scoring and teacher targets; the argmax token at each step (the
  folder's generation_config is not applied), the ids transformers' greedy `generate` chooses.
- Sampled: GRPO rollouts. `torch.manual_seed(seed)` seeds the global generator the draws come from; top-p
  is the only filter; each drawn token's log-probability is under the sampling distribution
  `log_softmax(logits / T)` (top-p restricts which tokens can be drawn, it does not renormalise the logprob,
  so a trainer recomputes the same quantity).
- A row that reaches EOS leaves the batch and the cache (`DynamicCache.batch_select_indices`), so a batch
  costs the sum of its responses' lengths rather than its longest times its size (transformers' `generate`
  computes finished rows to the end). Under FSDP (`synced`) a forward pass needs every process, so each
  keeps stepping (on its last rows, their tokens dropped) until all processes have finished.

- Checked (with `chooser`, `training.cot.CheckedVerdicts`): greedy takes the chooser's token (the argmax except
  where it would write a wrong verdict of an attribute check); sampling draws from the tokens the chooser does not
  refuse, and records each drawn token's log-probability under the unrestricted distribution, as with top-p, and
  whether the chooser refused any token at its step (`Generations.ruled`: there the rules, not the policy, chose).

Each response keeps its ids up to and including the first EOS (nothing after it); its text is
decoded without the EOS. With `watch_ids`, each response also keeps, per generated token, the logits of
those ids at that step (the distribution the token was chosen from): scoring reads its label step there
instead of running the prompt and CoT through the model again.
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


class TokenChooser(Protocol):
    """Each row's next token, from its response so far and the step's (rows, vocabulary) logits: greedy decoding's choice,
    or the tokens sampled decoding must not draw."""

    def choose(self, responses: Sequence[Sequence[int]], logits): ...

    def refuse(self, responses: Sequence[Sequence[int]], logits) -> list[list[int]]: ...


@dataclass(frozen=True)
class Generations:
    """One response per prompt, in prompt order.

    `response_ids[i]`: generated ids up to and including the first EOS; `ended[i]`: whether EOS
    came; `texts[i]`: the response decoded without EOS; `logprobs[i]`: per response id, its
    log-probability under the sampling distribution (None for greedy decoding); `watched[i][k]`: the
    logits of the watched ids at the step that chose `response_ids[i][k]` (None without `watch_ids`); `ruled[i][k]`:
    whether a chooser refused a token at that step (sampled decoding with a chooser only, else None).
    """

    response_ids: tuple[tuple[int, ...], ...]
    ended: tuple[bool, ...]
    texts: tuple[str, ...]
    logprobs: tuple[tuple[float, ...], ...] | None
    watched: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    ruled: tuple[tuple[bool, ...], ...] | None = None


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
             sampling: SamplingParams | None = None, seed: int | None = None, synced: bool = False, progress: str | None = None,
             watch_ids: Sequence[int] = (), chooser: TokenChooser | None = None) -> Generations:
    """One response per prompt id list, `batch_size` left-padded prompts at a time: greedy when
    `sampling` is None, else drawn with its temperature and top-p after `torch.manual_seed(seed)`;
    `watch_ids`: token ids whose logits are kept at every step (`Generations.watched`); `chooser`: picks greedy
    decoding's tokens instead of the argmax, or the tokens sampled decoding must not draw.

    `synced`: the model is FSDP-sharded over processes that all call this with as many prompts; each keeps
    stepping until every one has finished, as a forward pass needs them all.
    `progress`: the name of the work, shown as progress over the prompts (None: silent)."""
    import torch

    if sampling is not None and seed is None:
        raise ValueError("generate: sampled decoding needs a seed")
    if sampling is not None:
        torch.manual_seed(seed)  # the draws come from the global generator
    was_training = model.training
    model.eval()
    response_ids, ended, texts, logprobs, watched, ruled = [], [], [], [], [], []
    bar = logs.progress(desc=progress, total=len(prompts), unit="prompt")
    for start in range(0, len(prompts), batch_size):
        input_ids, attention = left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id)
        input_ids, attention = input_ids.to(model.device), attention.to(model.device)
        with torch.no_grad():
            generated, drawn, seen, refusing = _decode_batch(model, input_ids, attention, max_new_tokens, tokenizer.eos_token_id, sampling,
                                                             synced, watch_ids, chooser)
        for row, ids in enumerate(generated):  # a row's ids stop at its EOS (`_decode_batch`)
            eos = bool(ids) and ids[-1] == tokenizer.eos_token_id
            response_ids.append(tuple(ids))
            ended.append(eos)
            texts.append(tokenizer.decode(ids[:-1] if eos else ids, skip_special_tokens=False))
            if drawn is not None:
                logprobs.append(tuple(drawn[row]))
            if seen is not None:
                watched.append(tuple(seen[row]))
            if refusing is not None:
                ruled.append(tuple(refusing[row]))
        bar.update(len(generated))
    bar.close()
    model.train(was_training)
    return Generations(response_ids=tuple(response_ids), ended=tuple(ended), texts=tuple(texts),
                       logprobs=tuple(logprobs) if sampling is not None else None, watched=tuple(watched) if watch_ids else None,
                       ruled=tuple(ruled) if sampling is not None and chooser is not None else None)


def _decode_batch(model, input_ids, attention, max_new_tokens: int, eos_id: int, sampling: SamplingParams | None,
                  synced: bool = False, watch_ids: Sequence[int] = (), chooser: TokenChooser | None = None
                  ) -> tuple[list[list[int]], list[list[float]] | None, list[list[tuple[float, ...]]] | None, list[list[bool]] | None]:
    """(ids, logprobs of the drawn ids or None when greedy, per step the logits of `watch_ids` or None without them, per
    drawn id whether the chooser refused a token at its step or None unless sampling with a chooser) of
    each left-padded row, up to its EOS or `max_new_tokens`; a row that ends leaves the batch, except the last ones
    while other processes go on (`synced`)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    next_position = positions[:, -1:] + 1
    rows = list(range(len(input_ids)))  # the batch rows in the cache, in cache order
    generated: list[list[int]] = [[] for _ in rows]
    drawn: list[list[float]] = [[] for _ in rows]
    seen: list[list[tuple[float, ...]]] = [[] for _ in rows]
    refusing: list[list[bool]] = [[] for _ in rows]
    watch = torch.tensor(list(watch_ids), dtype=torch.long, device=input_ids.device)
    ended = False  # every row of this process has ended (rows stay in the cache only while other processes go on)
    for step in range(max_new_tokens):
        responses = [generated[row] for row in rows] if chooser is not None else []
        if sampling is None:
            tokens = chooser.choose(responses, logits[:, -1]) if chooser is not None else logits[:, -1].argmax(-1)
        else:
            refused = chooser.refuse(responses, logits[:, -1]) if chooser is not None else None
            tokens, logprobs = _draw(logits[:, -1].float(), sampling, refused)
        if not ended:
            for row, token in zip(rows, tokens.tolist()):
                generated[row].append(token)
            if sampling is not None:
                for row, logprob in zip(rows, logprobs.tolist()):
                    drawn[row].append(logprob)
                if refused is not None:
                    for row, tokens_refused in zip(rows, refused):
                        refusing[row].append(bool(tokens_refused))
            if watch_ids:
                for row, values in zip(rows, logits[:, -1, watch].float().tolist()):
                    seen[row].append(tuple(values))
        going = (tokens != eos_id) & (not ended)
        ended = not bool(going.any())
        if step == max_new_tokens - 1 or not _anyone_going(not ended, synced, logits.device):
            break
        if not ended and not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows = [rows[i] for i in keep.tolist()]
            tokens, attention, next_position = tokens[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position, past_key_values=cache,
                       use_cache=True).logits
        next_position = next_position + 1
    return (generated, (drawn if sampling is not None else None), (seen if watch_ids else None),
            (refusing if sampling is not None and chooser is not None else None))


def _anyone_going(going: bool, synced: bool, device) -> bool:
    """Whether this process (or, `synced`, any process of the group) still has a row generating."""
    if not synced:
        return going
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(going)], device=device)
    dist.all_reduce(flag)
    return bool(flag.item())


def _draw(logits, sampling: SamplingParams, refused: Sequence[Sequence[int]] | None = None):
    """(drawn token ids, their log_softmax(logits / T)) from the (rows, vocabulary) logits of one step: sampled from
    the smallest set of tokens whose probability reaches top_p (at least the likeliest one), less each row's `refused`
    tokens (the log-probability stays the unrestricted one)."""
    import torch

    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    probabilities = logprobs.exp()
    if refused and any(refused):
        for row, tokens in enumerate(refused):
            probabilities[row, list(tokens)] = 0.0
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)  # top-p then reads the mass left
    if sampling.top_p < 1.0:
        ordered, order = probabilities.sort(dim=-1, descending=True)
        outside = ordered.cumsum(dim=-1) - ordered >= sampling.top_p  # the mass before a token already reaches top_p
        probabilities = probabilities.scatter(-1, order, ordered.masked_fill(outside, 0.0))
    tokens = torch.multinomial(probabilities, 1).squeeze(1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
