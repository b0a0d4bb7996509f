"""Relevance rows from a causal-LM policy: label probabilities, expected gain, node decisions, reasoning.

The label distribution is read, not sampled: at the label line (`y: `) every label of the label set
is scored by teacher forcing (the sum of its tokens' log-probabilities, its line terminator
included, so no label can win by being a prefix of another), and the scores are normalised over the
label set. Candidates are tokenized as whole completions, exactly as training tokenizes targets,
and only the tokens after their longest common token prefix are scored, so a BPE merge across the
`y: ` boundary cannot bias one label.

- `label_first`: the label line comes first, so with `reasoning="none"` one teacher-forced pass per
  label gives the distribution and nothing is generated (the fast path).
- otherwise the CoT is generated greedily, its nodes parsed (strict first, lenient for what strict
  misses), and the label is scored where the generated reasoning ends: after the reasoning lines in
  `reasoning_first`, right after the prompt in `label_first`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from schemas.graph import LabelSet, ReasoningGraph
from schemas.tables import RELEVANCE
from training.cot import SEPARATOR, parse_cot

REASONING_MODES = ("none", "all")


def label_prefix(generated: str, graph: ReasoningGraph, order: str) -> str:
    """The completion text before the label's value, given what the model generated.

    `reasoning_first`: the generated text up to its own label line (or all of it, when it never
    wrote one) followed by the label tag. `label_first`: just the tag.
    """
    tag = f"{graph.label_node}{SEPARATOR}"
    if graph.order(order)[0] == graph.label_node:
        return tag
    lines = generated.split("\n")
    reasoning = []
    for line in lines:
        if line.startswith(tag):
            break
        reasoning.append(line)
    body = "\n".join(line for line in reasoning if line.strip())
    return f"{body}\n{tag}" if body else tag


def candidate_completions(prefix: str, graph: ReasoningGraph, order: str, labels: LabelSet) -> list[str]:
    """One completion text per label: the prefix, the label, and the newline when more lines follow."""
    last = graph.order(order)[-1] == graph.label_node
    return [prefix + name + ("" if last else "\n") for name in labels.names]


def score_labels(model, tokenizer, prompts: Sequence[Sequence[int]], prefixes: Sequence[str], graph, order, labels: LabelSet,
                 batch_size: int) -> list[list[float]]:
    """Per prompt, the probability of each label (label-set order) given the completion prefix."""
    import torch

    last = graph.order(order)[-1] == graph.label_node
    sequences, spans = [], []  # spans[k] = (first scored position, end) in sequence k
    for prompt, prefix in zip(prompts, prefixes):
        completions = [
            list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([tokenizer.eos_token_id] if last else [])
            for text in candidate_completions(prefix, graph, order, labels)
        ]
        shared = 0
        while all(len(c) > shared for c in completions) and len({c[shared] for c in completions}) == 1:
            shared += 1
        for completion in completions:
            sequences.append(list(prompt) + completion)
            spans.append((len(prompt) + shared, len(prompt) + len(completion)))
    scores = []
    model.eval()
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, sequence in enumerate(chunk):
            ids[i, : len(sequence)] = torch.tensor(sequence)
            attention[i, : len(sequence)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, sequence in enumerate(chunk):
            first, end = spans[start + i]
            positions = torch.arange(first, end)
            targets = torch.tensor(sequence[first:end])
            scores.append(float(logprobs[i, positions - 1, targets].sum()))
    per_prompt = torch.tensor(scores).view(len(prompts), len(labels.names))
    return torch.softmax(per_prompt, dim=-1).tolist()


def relevance_rows(
    model, tokenizer, pairs: Sequence[dict], prompts: Sequence[Sequence[int]], graph: ReasoningGraph, labels: LabelSet,
    order: str, *, reasoning: str, model_name: str, model_version: str, ds: dt.date, batch_size: int = 64,
    max_new_tokens: int = 96,
) -> pa.Table:
    """RELEVANCE rows for `pairs` (dicts with query, query_id, product_id) whose prompt ids are `prompts`."""
    from training.sft import generate

    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")
    fast = reasoning == "none" and graph.order(order)[0] == graph.label_node
    generations = [("", False)] * len(prompts) if fast else generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    prefixes = [label_prefix(text, graph, order) for text, _ in generations]
    probabilities = score_labels(model, tokenizer, prompts, prefixes, graph, order, labels, batch_size)
    decisions = []
    for text, _ in generations:
        strict = parse_cot(text, graph, order, labels.names, "strict")
        lenient = parse_cot(text, graph, order, labels.names, "lenient")
        decided = {node: strict.get(node) or lenient.get(node) for node in graph.node_names if node != graph.label_node}
        decisions.append(sorted((node, value) for node, value in decided.items() if value is not None))
    return relevance_table(pairs, probabilities, decisions, [None if reasoning == "none" else text for text, _ in generations], labels,
                           model_name=model_name, model_version=model_version, ds=ds)


def relevance_table(
    pairs: Sequence[dict], probabilities: Sequence[Sequence[float]], decisions: Sequence[list[tuple[str, str]]],
    reasoning: Sequence[str | None], labels: LabelSet, *, model_name: str, model_version: str, ds: dt.date,
) -> pa.Table:
    """RELEVANCE rows of scored pairs: label = argmax of the label probabilities (label set order),
    expected gain under the label set's gains, node decisions as sorted (node, value) pairs, scored now."""
    scored_at = dt.datetime.now(dt.timezone.utc)
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


def score_split(
    model_dir: str | Path, data: str | Path, split: str, *, label_set: str, graph: str, order: str, prompt_tokens: int,
    reasoning: str, model_name: str, max_pairs: int = 0, batch_size: int = 64,
) -> pa.Table:
    """RELEVANCE rows for one split of `training_examples` under `data`, scored by the model in `model_dir`.

    `max_pairs` keeps whole queries (in key order) up to that many pairs; 0 keeps every pair.
    """
    from training.model import load_model
    from training.prompt import build_prompt, prompt_offsets
    from training.sft import load_pairs, prompt_ids

    model, tokenizer = load_model(model_dir)
    pairs = load_pairs(Path(data), label_set, split)
    if max_pairs and len(pairs) > max_pairs:
        last_query = pairs[max_pairs - 1]["query_id"]
        pairs = [pair for pair in pairs if pair["query_id"] <= last_query]
    offsets = prompt_offsets(tokenizer)
    prompts = [
        prompt_ids(tokenizer, build_prompt(pair["query"], pair["title"], pair["product_type"], pair["attributes"],
                                           pair["description"], offsets, prompt_tokens).text)
        for pair in pairs
    ]
    version = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:12]
    return relevance_rows(
        model, tokenizer, pairs, prompts, ReasoningGraph.load(graph), LabelSet.load(label_set), order,
        reasoning=reasoning, model_name=model_name, model_version=version, ds=dt.date.today(), batch_size=batch_size,
    )
