"""Training examples: judged pairs from `training_examples`, and their encoding into prompt and target ids.

A pair's prompt is the chat-templated `training.prompt.build_prompt` text (the brand joins the
attributes, as in gold `pa`); its target is the gold CoT (`training.cot.render_cot`, y from the
gold nodes so the CoT is self-consistent) followed by EOS. Each target token carries its node from
`token_node_map`, the one token-to-node map of the project: SFT's node masking and GRPO's per-node
advantages both read it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from schemas.graph import ReasoningGraph
from schemas.storage import read_table
from schemas.tables import TRAINING_EXAMPLES
from training.cot import node_spans, render_cot, token_nodes
from training.prompt import build_prompt, chat_ids, prompt_offsets

log = logging.getLogger(__name__)
IGNORE = -100  # the label of a token the loss skips


@dataclass(frozen=True)
class Example:
    """One tokenized pair: prompt ids (chat template applied) and target ids (CoT + EOS).

    `target_nodes[i]` is the node of target token i (None: separators and EOS), from `token_node_map`.
    """

    query_id: str
    product_id: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    target_nodes: tuple[str | None, ...]
    gold: dict[str, str]


def load_pairs(data: Path, label_set: str, split: str) -> list[dict]:
    """The `split` rows of `label_set` in `training_examples` (written by `relevance datasets`) that
    have gold node values, sorted by key. Rows without nodes (weak labels) have no CoT to imitate
    and are skipped, with a count in the log."""
    rows = read_table(TRAINING_EXAMPLES, data).to_pylist()
    chosen = [row for row in rows if row["split"] == split and row["label_set"] == label_set]
    if not chosen:
        raise ValueError(f"{data}: training_examples has no {split!r} rows with label_set={label_set!r} (run `relevance datasets`)")
    pairs = [
        {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "query": row["query"],
            "title": row["title"],
            "product_type": row["product_type"],
            "attributes": dict(row["facets"]),
            "description": row["description"],
            "gold": dict(row["nodes"]),
        }
        for row in sorted(chosen, key=lambda row: (row["query_id"], row["product_id"]))
        if row["nodes"] is not None
    ]
    if len(pairs) < len(chosen):
        log.warning("%s: %d of %d %s rows have no gold nodes (weak labels) and are skipped", data, len(chosen) - len(pairs), len(chosen), split)
    return pairs


def whole_queries(pairs: Sequence[dict], max_pairs: int) -> list[dict]:
    """The pairs of whole queries drawn in a fixed pseudo-random order (SHA-256 of the query id) until they hold at least
    `max_pairs` pairs (0: every pair), in their original order. Not the first queries in key order: the synthetic world
    numbers its queries by popularity, fewest constraints first, so a key-order prefix of the test split is its head
    queries only (the demo's first 2000 test pairs: `qa` 0.875 against 0.538 on the other half)."""
    if not max_pairs or len(pairs) <= max_pairs:
        return list(pairs)
    sizes = Counter(pair["query_id"] for pair in pairs)
    kept, count = set(), 0
    for query in sorted(sizes, key=lambda query: hashlib.sha256(query.encode()).hexdigest()):
        if count >= max_pairs:
            break
        kept.add(query)
        count += sizes[query]
    return [pair for pair in pairs if pair["query_id"] in kept]


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """The token ids of the chat-templated user turn `prompt_text`, ending where the assistant's answer starts."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt_text}])


def token_node_map(tokenizer, ids: Sequence[int], graph: ReasoningGraph) -> list[str | None]:
    """The node of each token of a CoT (strict spans: a node's first line); EOS and tokens of no node get None.

    Character offsets are the lengths of the decoded growing prefixes of `ids`, so they describe the tokens
    given (sampled ones included), not a re-tokenisation of the decoded text.
    """
    eos = tokenizer.eos_token_id  # a lookup through the tokenizer's __getattr__ each time it is read
    text_ids = [token for token in ids if token != eos]
    text = tokenizer.decode(text_ids, skip_special_tokens=False)
    ends = streamed_prefix_lengths(tokenizer, text_ids, text)
    if ends is None:
        ends = [len(prefix) for prefix in tokenizer.batch_decode([text_ids[: k + 1] for k in range(len(text_ids))], skip_special_tokens=False)]
    offsets = list(zip([0, *ends[:-1]], ends))
    text_nodes = iter(token_nodes(offsets, node_spans(text, graph)))
    return [None if token == eos else next(text_nodes) for token in ids]


def streamed_prefix_lengths(tokenizer, ids: Sequence[int], text: str) -> list[int] | None:
    """The decoded length after each token, from decoding the tokens one at a time (tokenizers' DecodeStream, several
    times faster than decoding every prefix). None when a token ends inside a character (the prefix's decode then
    holds a replacement character the stream does not write) or when the pieces do not add up to `text`, the whole
    decode (a tokenizer that cleans up spaces): there only the prefixes' own decodes give the lengths."""
    from tokenizers.decoders import DecodeStream

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    stream = DecodeStream(skip_special_tokens=False)
    pieces = [stream.step(backend, token) for token in ids]
    if None in pieces or "".join(pieces) != text:
        return None
    return list(accumulate(map(len, pieces)))


def encode_example(pair: dict, tokenizer, graph: ReasoningGraph, order: str, prompt_tokens: int) -> Example:
    """The pair's prompt ids and its gold CoT's ids plus EOS, each target token with its node."""
    prompt = build_prompt(
        pair["query"], pair["title"], pair["product_type"], pair["attributes"], pair["description"],
        prompt_offsets(tokenizer), prompt_tokens,
    )
    target_ids = tuple(tokenizer(render_cot(pair["gold"], graph, order), add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
    return Example(
        query_id=pair["query_id"],
        product_id=pair["product_id"],
        prompt_ids=tuple(prompt_ids(tokenizer, prompt.text)),
        target_ids=target_ids,
        target_nodes=tuple(token_node_map(tokenizer, target_ids, graph)),
        gold=pair["gold"],
    )
