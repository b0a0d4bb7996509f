"""The one prompt: what the model sees about a (query, product) pair, for training, rollouts and scoring.

    query: <query>
    title: <title>
    type: <product type>
    attributes: <key=value; ...>
    description: <description>

The attributes are the product's facets as the graph's `pa` node reads them: its attributes plus its
brand (`product_facets`).

The prompt is held to a token budget. When it is over, fields are shortened from the least useful
up: the description first (cut at a token boundary, then dropped), then the title (free text that
restates the type and facets), the attributes and the type. The query is never cut (but by the clip
below); a query alone over the budget gives a prompt with only the query (over budget, `truncated` says so).

Before any tokenizing, each field is clipped to `max_tokens * MAX_CHARS_PER_TOKEN` characters, so one
huge field (a 10 MB title) costs what a full-budget one does. A prompt keeps at most `max_tokens`
tokens of a field, so the clip could only remove kept text if those tokens averaged over
MAX_CHARS_PER_TOKEN characters; text averages about 4, and the longest tokens of common BPE
vocabularies are a few dozen characters of repeated punctuation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.graph import format_facets

FIELDS = ("query", "title", "type", "attributes", "description")
CUT_ORDER = ("description", "title", "attributes", "type")
MAX_CHARS_PER_TOKEN = 64  # well above any real text's characters per token (the tiny model's longest token: 13)


@dataclass(frozen=True)
class Prompt:
    text: str
    n_tokens: int
    truncated: tuple[str, ...]  # fields that were shortened or dropped
    fields: Mapping[str, str]  # each field's text as `text` shows it (a zero-shot prompt places them in its own words)


def product_facets(product: Mapping) -> dict[str, str]:
    """A catalog row's facets as the prompt shows them: its attributes plus `brand` (gold `pa` has both)."""
    facets = dict(product["attributes"])
    if product["brand"] and "brand" not in facets:
        facets["brand"] = product["brand"]
    return facets


def normalized_prefix(text: str, max_chars: int) -> str:
    """`" ".join(text.split())[:max_chars]`, reading `text` only as far as that needs."""
    words: list[str] = []
    length = -1
    for word in re.finditer(r"\S+", text):  # \S is str.split's notion of whitespace
        words.append(word.group())
        length += 1 + len(words[-1])
        if length >= max_chars:
            break
    return " ".join(words)[:max_chars]


def render_fields(fields: Mapping[str, str]) -> str:
    """The prompt lines `name: value` of the non-empty fields, in FIELDS order."""
    return "\n".join(f"{name}: {fields[name]}" for name in FIELDS if fields.get(name))


def build_prompt(
    query: str,
    title: str,
    product_type: str,
    attributes: Mapping[str, str],
    description: str | None,
    offsets: Callable[[str], list[tuple[int, int]]],
    max_tokens: int,
) -> Prompt:
    """The prompt text within `max_tokens` tokens as counted by `offsets` (text -> token char offsets).

    `offsets` is `prompt_offsets(tokenizer)` in practice; a pure callable keeps this testable.
    """
    clip = max_tokens * MAX_CHARS_PER_TOKEN
    # Read one character past the clip: a field that reaches it was longer and counts as truncated.
    fields = {
        "query": normalized_prefix(query, clip + 1),
        "title": normalized_prefix(title, clip + 1),
        "type": product_type.strip()[: clip + 1],
        "attributes": format_facets(dict(attributes))[: clip + 1],
        "description": normalized_prefix(description or "", clip + 1),
    }
    truncated = [name for name in FIELDS if len(fields[name]) > clip]
    fields.update({name: fields[name][:clip].rstrip() for name in truncated})
    text = render_fields(fields)
    n_tokens = len(offsets(text))
    for name in CUT_ORDER:
        while n_tokens > max_tokens and fields[name]:
            if name not in truncated:
                truncated.append(name)
            value_offsets = offsets(fields[name])
            keep = len(value_offsets) - (n_tokens - max_tokens)
            fields[name] = fields[name][: value_offsets[keep][0]].rstrip() if keep > 0 else ""
            text = render_fields(fields)
            n_tokens = len(offsets(text))
        if n_tokens <= max_tokens:
            break
    return Prompt(text=text, n_tokens=n_tokens, truncated=tuple(truncated), fields=fields)


def prompt_offsets(tokenizer) -> Callable[[str], list[tuple[int, int]]]:
    """Token character offsets of a text under a fast Hugging Face tokenizer (no special tokens), read from its
    `tokenizers` backend directly: the offsets transformers would return, without its per-call overhead."""
    backend = tokenizer.backend_tokenizer

    def offsets(text: str) -> list[tuple[int, int]]:
        return backend.encode(text, add_special_tokens=False).offsets

    return offsets


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of `messages` under the tokenizer's chat template, ending where the assistant's answer starts."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # where save_pretrained puts it, beside tokenizer_config.json


def folder_chat_template(folder: str | Path) -> str | None:
    """The chat template a model folder's tokenizer loads with, read from its files (no tokenizer loaded), or None."""
    folder = Path(folder)
    for name in CHAT_TEMPLATE_FILES:
        if (folder / name).is_file():
            return (folder / name).read_text()
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return json.dumps(template) if isinstance(template, list) else template  # a list: named templates


def chat_template(folder: str | Path, template_file: str | None) -> str:
    """The chat template a zero-shot prompt is rendered with: the file given, else the model folder's own.

    A folder without one is refused: a base model's or a bare tokenizer's text would reach the model
    with no turn markers, which an instruct model was never trained to read."""
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} does not exist")
        return path.read_text()
    template = folder_chat_template(folder)
    if not template:
        raise ValueError(f"model folder {folder} has no chat template (no {' or '.join(CHAT_TEMPLATE_FILES)}, no chat_template in "
                         "tokenizer_config.json), so a zero-shot prompt cannot be put to it as the model expects; give its "
                         "template (a Jinja file) with chat_template=FILE, or use an instruct model's folder")
    return template
