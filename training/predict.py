"""Relevance rows from a causal-LM policy: label probabilities, expected gain, node decisions, reasoning.

The label distribution is read at the label step, not sampled: the model's next-token distribution
where it writes the label (after `y: `), restricted to the token each label starts with and
normalised over the label set. The step is found on the canonical tokenization of the candidate
completions (prefix, label, then the newline or EOS that follows it in training targets): the
longest token prefix they share is the context, and each label's first token after it is what that
label is scored by. Because the terminator is included, a label that is a prefix of another is
still told apart (EOS against the longer label's next token). Labels that share that first token
cannot be told apart by one step, and are refused with an error naming them. Every backend (this
transformers path, the vLLM scorer with `allowed_token_ids`) computes exactly this distribution.
Where the greedy generation itself wrote that context, the distribution is read from the decoding
step that chose the label (`training.decoding.generate` keeps the label tokens' logits of every
step); the other pairs get one more forward pass over their context.

- `label_first` with no reasoning wanted: only the label step is run, nothing is generated (the
  fast path: one forward pass per pair).
- otherwise the CoT is generated greedily (for `label_first` only for the pairs whose reasoning is
  wanted), its nodes parsed (strict first, lenient for what strict misses), and the label step sits
  where the generated reasoning ends: after the reasoning lines in `reasoning_first`, right after the
  prompt in `label_first`.
- `checked_verdicts`: the greedy CoT is generated with checked decoding (`training.cot.CheckedVerdicts`: each
  attribute check's yes/no is the comparison of the two values written before it, and the subject match says match
  exactly when the two subjects written are the same); the label step is where it always is, after the decisions the
  policy was given.
- Reasoning modes: `none` keeps no text, `all` keeps every pair's, `sample` keeps a deterministic
  share of pairs (by a hash of query and product id, so a re-run picks the same ones).

A zero-shot judge (`schemas.judge_prompt.ZeroShot`: any instruct model, no training) is scored the
same way: its prompt is the judge prompt through the model's chat template, the label tag is the
prompt's `answer_prefix` (its answer ends with the label, so EOS is the terminator), and in
`reasoning_first` (any order that does not start with the label) the greedy reasoning is generated
first and the label step sits after it. Its reasoning is free text; the node decisions are what the
lenient parser finds in it (the prompt asks for the graph's nodes as `tag: value` lines).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas import logs
from schemas.graph import LabelSet, ReasoningGraph
from schemas.judge_prompt import ZeroShot
from schemas.tables import RELEVANCE
from training.cot import COT_TOKEN_BUDGET, SEPARATOR, parse_cot

log = logging.getLogger(__name__)
REASONING_MODES = ("none", "sample", "all")


@dataclass(frozen=True)
class AnswerFormat:
    """Where a completion writes its label: on a line of its own after `tag`; after the reasoning
    (`reasoning_first`) or before anything else; as the completion's end (`label_last`: EOS follows
    it) or followed by a newline and more lines."""

    tag: str
    reasoning_first: bool
    label_last: bool


def answer_format(graph: ReasoningGraph, order: str, zero_shot: ZeroShot | None = None) -> AnswerFormat:
    """A policy's answer format in `order` (the label node's `y: ` line), or the zero-shot judge's (its answer prefix)."""
    if zero_shot is not None:
        return AnswerFormat(tag=zero_shot.prompt.answer_prefix, reasoning_first=zero_shot.reasoning_first, label_last=True)
    return AnswerFormat(tag=f"{graph.label_node}{SEPARATOR}", reasoning_first=not graph.label_comes_first(order),
                        label_last=graph.order(order)[-1] == graph.label_node)


def label_prefix(generated: str, answer: AnswerFormat) -> str:
    """The completion text before the label's value, given what the model generated.

    Reasoning first: the generated text up to its own label line (or all of it, when it never
    wrote one), blank lines dropped, followed by the label tag. Label first: just the tag.
    """
    if not answer.reasoning_first:
        return answer.tag
    mark = answer.tag.strip()
    reasoning = []
    for line in generated.split("\n"):
        if line.strip().startswith(mark):
            break
        reasoning.append(line)
    body = "\n".join(line for line in reasoning if line.strip())
    return f"{body}\n{answer.tag}" if body else answer.tag


def candidate_completions(prefix: str, answer: AnswerFormat, labels: LabelSet) -> list[str]:
    """One completion text per label: the prefix, the label, and the newline when more lines follow."""
    return [prefix + name + ("" if answer.label_last else "\n") for name in labels.names]


@dataclass(frozen=True)
class LabelStep:
    """Where a pair's label is decided: the token ids before it and, per label (label-set order), its token there."""

    context: tuple[int, ...]
    label_tokens: tuple[int, ...]


def label_steps(tokenizer, prompts: Sequence[Sequence[int]], prefixes: Sequence[str], answer: AnswerFormat,
                labels: LabelSet) -> list[LabelStep]:
    """The label step of each prompt given its completion prefix (see the module doc)."""
    terminator = [tokenizer.eos_token_id] if answer.label_last else []
    by_prefix: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # label_first: one prefix for every pair
    steps = []
    for prompt, prefix in zip(prompts, prefixes):
        if prefix not in by_prefix:
            by_prefix[prefix] = _label_tokens(tokenizer, prefix, terminator, answer, labels)
        shared, firsts = by_prefix[prefix]
        steps.append(LabelStep(context=tuple(prompt) + shared, label_tokens=firsts))
    return steps


def _label_tokens(tokenizer, prefix: str, terminator: list[int], answer: AnswerFormat,
                  labels: LabelSet) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the candidates' shared completion tokens, each label's first token after them) for one prefix."""
    completions = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) + terminator
                   for text in candidate_completions(prefix, answer, labels)]
    shared = 0
    while all(len(c) > shared for c in completions) and len({c[shared] for c in completions}) == 1:
        shared += 1
    firsts = tuple(c[shared] if len(c) > shared else None for c in completions)
    if None in firsts or len(set(firsts)) < len(firsts):
        clashing = [name for name, token in zip(labels.names, firsts) if token is None or firsts.count(token) > 1]
        raise ValueError(
            f"label set {labels.name!r}: labels {clashing} start with the same token after {prefix[-20:]!r}, so the "
            "label step cannot tell them apart; rename them or use a tokenizer that splits them differently"
        )
    return tuple(completions[0][:shared]), firsts


def label_step_probabilities(model, steps: Sequence[LabelStep], batch_size: int, progress: str | None = None) -> list[list[float]]:
    """Per step, the softmax of the model's next-token logits over its label tokens (label-set order); `progress` names
    the work, shown as progress over the steps (None: silent)."""
    import torch

    from training.decoding import left_padded

    order = sorted(range(len(steps)), key=lambda i: -len(steps[i].context))
    result: list[list[float]] = [[] for _ in steps]
    model.eval()
    bar = logs.progress(desc=progress, total=len(order), unit="pair")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, attention = left_padded([steps[index].context for index in chunk], 0)
        # positions count real tokens only, as in an unpadded pass (and in vLLM); only the last position's logits are needed
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                           position_ids=positions.to(model.device), logits_to_keep=1).logits[:, -1]
        for row, index in enumerate(chunk):
            chosen = logits[row, list(steps[index].label_tokens)].float()
            result[index] = torch.softmax(chosen, dim=-1).tolist()
        bar.update(len(chunk))
    bar.close()
    return result


def likely_label_tokens(tokenizer, answer: AnswerFormat, labels: LabelSet) -> tuple[int, ...]:
    """The label tokens of the label step after the bare tag and after a reasoning line: the ids whose logits decoding keeps."""
    terminator = [tokenizer.eos_token_id] if answer.label_last else []
    found: set[int] = set()
    for prefix in (answer.tag, f"reasoning\n{answer.tag}"):
        try:
            found.update(_label_tokens(tokenizer, prefix, terminator, answer, labels)[1])
        except ValueError:  # labels that clash after this made-up prefix: only the pairs' own prefixes can refuse them
            continue
    return tuple(sorted(found))


def decoded_label_probabilities(step: LabelStep, prompt_length: int, response: Sequence[int], watched: Sequence[Sequence[float]],
                                watch: Sequence[int]) -> list[float] | None:
    """The label step's distribution read from greedy decoding, or None where decoding did not write the step's
    context (its tokens differ from the canonical ones) or a label token was not watched."""
    import torch

    written = step.context[prompt_length:]
    if len(written) >= len(watched) or tuple(response[: len(written)]) != written or not set(step.label_tokens) <= set(watch):
        return None
    logits = torch.tensor([watched[len(written)][watch.index(token)] for token in step.label_tokens])
    return torch.softmax(logits.float(), dim=-1).tolist()


def node_decisions(text: str, graph: ReasoningGraph, order: str, labels: LabelSet) -> list[tuple[str, str]]:
    """The reasoning nodes' values in a generation, strict parse first and lenient for what it misses, sorted."""
    strict = parse_cot(text, graph, order, labels.names, "strict")
    lenient = parse_cot(text, graph, order, labels.names, "lenient")
    decided = {node: strict.get(node) or lenient.get(node) for node in graph.node_names if node != graph.label_node}
    return sorted((node, value) for node, value in decided.items() if value is not None)


def reasoning_wanted(pairs: Sequence[dict], mode: str, sample_rate: float) -> list[bool]:
    """Per pair, whether its reasoning text is kept: none, all, or a share `sample_rate` chosen by key hash."""
    if mode not in REASONING_MODES:
        raise ValueError(f"reasoning must be one of {REASONING_MODES}, got {mode!r}")
    if mode != "sample":
        return [mode == "all"] * len(pairs)
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"reasoning sample rate must be in [0, 1], got {sample_rate}")

    def drawn(pair: dict) -> bool:
        digest = hashlib.sha256(f"{pair['query']}\u001f{pair['product_id']}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < sample_rate

    return [drawn(pair) for pair in pairs]


def generation_needed(answer: AnswerFormat, wanted: Sequence[bool]) -> list[bool]:
    """Which pairs must be generated: all when the reasoning comes first (the label follows it), the wanted ones otherwise."""
    if not answer.reasoning_first:
        return list(wanted)
    return [True] * len(wanted)


def pair_prompts(tokenizer, pairs: Sequence[dict], prompt_tokens: int, zero_shot: ZeroShot | None = None) -> list[list[int]]:
    """The prompt token ids of each pair (query, title, product_type, attributes, description): the policy's
    prompt, or the zero-shot judge's messages through the tokenizer's chat template; the pair's fields are held
    to `prompt_tokens` either way."""
    from training.prompt import build_prompt, chat_ids, prompt_offsets

    offsets = prompt_offsets(tokenizer)
    prompts = []
    for pair in pairs:
        prompt = build_prompt(pair["query"], pair["title"], pair["product_type"], pair["attributes"], pair["description"], offsets,
                              prompt_tokens)
        messages = zero_shot.messages(prompt.fields) if zero_shot is not None else [{"role": "user", "content": prompt.text}]
        prompts.append(chat_ids(tokenizer, messages))
    return prompts


def relevance_rows(
    model, tokenizer, pairs: Sequence[dict], prompts: Sequence[Sequence[int]], graph: ReasoningGraph, labels: LabelSet,
    order: str, *, reasoning: str, model_name: str, model_version: str, ds: dt.date, batch_size: int = 64,
    max_new_tokens: int = COT_TOKEN_BUDGET, reasoning_sample: float = 0.0, zero_shot: ZeroShot | None = None, progress: str | None = None,
    checked_verdicts: bool = False,
) -> pa.Table:
    """RELEVANCE rows for `pairs` (dicts with query, query_id, product_id) whose prompt ids are `prompts`
    (`pair_prompts` with the same `zero_shot`: None for a trained policy); `progress` names the work, shown as
    progress of the generation and of the label step (None: silent); `checked_verdicts`: each attribute check's yes/no
    is the comparison of the values the policy wrote, and its subject match follows the subjects it wrote
    (`training.cot.CheckedVerdicts`), not its guess."""
    from training.cot import CheckedVerdicts, checked_rules
    from training.decoding import generate

    answer = answer_format(graph, order, zero_shot)
    wanted = reasoning_wanted(pairs, reasoning, reasoning_sample)
    to_generate = [i for i, needed in enumerate(generation_needed(answer, wanted)) if needed]
    texts = [""] * len(pairs)
    watch = likely_label_tokens(tokenizer, answer, labels)
    chooser = CheckedVerdicts(tokenizer, checked_rules(graph)) if checked_verdicts else None
    generated = generate(model, tokenizer, [prompts[i] for i in to_generate], max_new_tokens=max_new_tokens, batch_size=batch_size,
                         progress=progress and f"{progress}: generate", watch_ids=watch, chooser=chooser)
    if chooser is not None:
        log.info("checked verdicts: %d tokens replaced the policy's choice, %d steps found no right verdict among the %d likeliest tokens",
                 chooser.replaced, chooser.unresolved, chooser.candidates)
    cut_short = generated.ended.count(False)
    if cut_short:  # their label comes from a CoT without its end: a budget too small for the policy's CoT
        log.warning("%d of %d generations reached max_new_tokens=%d before their end", cut_short, len(to_generate), max_new_tokens)
    for i, text in zip(to_generate, generated.texts):
        texts[i] = text
    steps = label_steps(tokenizer, prompts, [label_prefix(text, answer) for text in texts], answer, labels)
    probabilities: list[list[float] | None] = [None] * len(pairs)
    for k, i in enumerate(to_generate):
        probabilities[i] = decoded_label_probabilities(steps[i], len(prompts[i]), generated.response_ids[k], generated.watched[k], watch)
    again = [i for i, found in enumerate(probabilities) if found is None]
    if again:  # the pairs decoding did not answer (or did not generate: label_first without reasoning)
        found = label_step_probabilities(model, [steps[i] for i in again], batch_size, progress and f"{progress}: label step")
        for i, distribution in zip(again, found):
            probabilities[i] = distribution
    decisions = [node_decisions(text, graph, order, labels) for text in texts]
    return relevance_table(pairs, probabilities, decisions, [text if keep else None for text, keep in zip(texts, wanted)], labels,
                           model_name=model_name, model_version=model_version, ds=ds)


def relevance_table(
    pairs: Sequence[dict], probabilities: Sequence[Sequence[float]], decisions: Sequence[list[tuple[str, str]]],
    reasoning: Sequence[str | None], labels: LabelSet, *, model_name: str, model_version: str, ds: dt.date,
) -> pa.Table:
    """RELEVANCE rows of scored pairs: label = argmax of the label probabilities (label set order),
    expected gain under the label set's gains, node decisions as sorted (node, value) pairs, scored now."""
    scored_at = dt.datetime.now(dt.UTC)
    gains = labels.gains
    n = len(pairs)
    data = {
        "query": [pair["query"] for pair in pairs],
        "query_id": [pair.get("query_id") for pair in pairs],
        "product_id": [pair["product_id"] for pair in pairs],
        "label": [labels.names[max(range(len(p)), key=p.__getitem__)] for p in probabilities],
        "label_set": [labels.name] * n,
        "label_probs": [list(zip(labels.names, p)) for p in probabilities],
        "expected_gain": [sum(gains[name] * q for name, q in zip(labels.names, p)) for p in probabilities],
        "node_decisions": list(decisions),
        "reasoning": list(reasoning),
        "product_content_hash": [pair.get("product_content_hash") for pair in pairs],
        "model_name": [model_name] * n,
        "model_version": [model_version] * n,
        "scored_at": [scored_at] * n,
        "ds": [ds] * n,
    }
    return pa.Table.from_pydict(data, schema=RELEVANCE.arrow_schema())


def decoding_version(weights_version: str, graph: ReasoningGraph, checked_verdicts: bool) -> str:
    """The version a policy's rows are labelled under by `relevance_rows`: its weights' hash, and under checked decoding the
    hash of the rules with it, so rows of one decoding never stand in for the other's (another label distribution)."""
    from training.cot import checked_rules

    if not checked_verdicts:
        return weights_version
    return f"{weights_version}-checked-{hashlib.sha256(checked_rules(graph).to_json().encode()).hexdigest()[:6]}"


def score_split(
    model_dir: str | Path, data: str | Path, split: str, *, reasoning: str, model_name: str, max_pairs: int = 0, batch_size: int = 64,
    checked_verdicts: bool = False,
) -> pa.Table:
    """RELEVANCE rows for one split of `training_examples` under `data`, scored by the policy in `model_dir` in its own format
    (`policy.json`: graph, label set, order, prompt budget).

    `max_pairs` keeps whole queries up to that many pairs, a fixed sample across the split (`training.examples.whole_queries`); 0
    keeps every pair. `checked_verdicts`: see `relevance_rows`; the rows' version is `decoding_version`'s.
    """
    from training.examples import load_pairs, whole_queries
    from training.model import load_model
    from training.model_files import model_version
    from training.policy_format import resolve_format

    policy = resolve_format(model_dir)
    model, tokenizer = load_model(model_dir)
    pairs = load_pairs(Path(data), policy.label_set, split)
    pairs = whole_queries(pairs, max_pairs)
    prompts = pair_prompts(tokenizer, pairs, policy.prompt_tokens)
    graph = ReasoningGraph.load(policy.graph)
    version = decoding_version(model_version(model_dir), graph, checked_verdicts)
    return relevance_rows(
        model, tokenizer, pairs, prompts, graph, LabelSet.load(policy.label_set), policy.order,
        reasoning=reasoning, model_name=model_name, model_version=version, ds=dt.date.today(), batch_size=batch_size,
        progress=f"{model_name}: label the {split} split", checked_verdicts=checked_verdicts,
    )
