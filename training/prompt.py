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
restates the type and facets), the attributes and the type. The query is never cut; a query alone
over the budget gives a prompt with only the query (over budget, `truncated` says so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from schemas.graph import format_facets

FIELDS = ("query", "title", "type", "attributes", "description")
CUT_ORDER = ("description", "title", "attributes", "type")


@dataclass(frozen=True)
class Prompt:
    text: str
    n_tokens: int
    truncated: tuple[str, ...]  # fields that were shortened or dropped


def product_facets(product: Mapping) -> dict[str, str]:
    """A catalog row's facets as the prompt shows them: its attributes plus `brand` (gold `pa` has both)."""
    facets = dict(product["attributes"])
    if product["brand"] and "brand" not in facets:
        facets["brand"] = product["brand"]
    return facets


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
    fields = {
        "query": " ".join(query.split()),
        "title": " ".join(title.split()),
        "type": product_type.strip(),
        "attributes": format_facets(dict(attributes)),
        "description": " ".join((description or "").split()),
    }
    truncated: list[str] = []
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
    return Prompt(text=text, n_tokens=n_tokens, truncated=tuple(truncated))


def prompt_offsets(tokenizer) -> Callable[[str], list[tuple[int, int]]]:
    """Token character offsets of a text under a fast Hugging Face tokenizer (no special tokens)."""

    def offsets(text: str) -> list[tuple[int, int]]:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(pair) for pair in encoded["offset_mapping"]]

    return offsets
