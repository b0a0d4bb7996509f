"""Counterfactual twins of SFT pairs: the same query and product with the value of a constrained facet changed.

Why: a small policy learns to extract the query's constraints and the product's facets long before it
learns to compare them, and its `ma` falls back on "the product has that kind of facet, so match"
(`benchmarks/results/quality.md` §3). A natural pair rarely has a neighbour that differs only in the one
value the decision turns on; a twin is that neighbour, so the key-only shortcut that fits the pair
misfits its twin.

A twin exists for a pair whose gold follows the relevance7 rules (pa is the product's facets, ma =
`attribute_match(qa, pa)`, the label is the label set's rule on ms and ma) and whose product has at
least one constrained key. Each such key is flipped with probability 1/2 (at least one is): a satisfied
constraint gets another value of that key seen on training products of the same type, an unsatisfied one
the wanted value. Whole-word occurrences of the old value in the title and the description follow; pa, ma and the
label are recomputed; the query, qs, ps, qa and ms stay. Keys the product lacks are never added (a lamp
gets no mattress size). The twin of pair i is a function of (seed, i).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph, attribute_match, format_facets, parse_facets

MA_VALUES = {"match", "partial", "mismatch", "none"}


def check_graph_has_twins(graph: ReasoningGraph) -> None:
    """Twins rewrite pa, ma and the label by relevance7's rules: the graph must have those nodes, and nothing but ma may read qa or pa."""
    names = set(graph.node_names)
    if not {"qa", "pa", "ms", "ma"} <= names or graph.node("qa").kind != "facets" or graph.node("pa").kind != "facets" \
            or set(graph.node("ma").values) != MA_VALUES:
        raise ConfigError(f"counterfactual_share: graph {graph.name!r} needs facets nodes qa and pa and a choice node ma with values "
                          f"{sorted(MA_VALUES)}")
    readers = {target for source, target in graph.edges if source in ("qa", "pa")}
    if readers != {"ma"}:
        raise ConfigError(f"counterfactual_share: in graph {graph.name!r} qa and pa feed {sorted(readers)}; twins recompute only ma")


def replace_word(text: str | None, old: str, new: str) -> str | None:
    """`text` with whole-word, case-insensitive occurrences of `old` replaced by `new`."""
    if not text:
        return text
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new.replace("\\", r"\\"), text, flags=re.IGNORECASE)


@dataclass(frozen=True)
class TwinMaker:
    """Builds the twin of a training pair (the pair dicts of `training.examples.load_pairs`)."""

    values: dict[tuple[str, str], tuple[str, ...]]  # (product type, facet key) -> the values training products of that type have, sorted
    labels: LabelSet
    label_node: str
    seed: int

    @classmethod
    def from_pairs(cls, pairs: Sequence[dict], labels: LabelSet, graph: ReasoningGraph, seed: int) -> TwinMaker:
        check_graph_has_twins(graph)
        seen: dict[tuple[str, str], set[str]] = {}
        for pair in pairs:
            for key, value in pair["attributes"].items():
                seen.setdefault((pair["product_type"], key), set()).add(value)
        return cls({key: tuple(sorted(values)) for key, values in seen.items()}, labels, graph.label_node, seed)

    def follows_rules(self, pair: dict, wanted: dict[str, str] | None, offered: dict[str, str] | None) -> bool:
        gold = pair["gold"]
        if wanted is None or offered is None or offered != dict(pair["attributes"]) or gold["ma"] != attribute_match(wanted, offered):
            return False
        try:
            return gold[self.label_node] == self.labels.label_from_nodes({"ms": gold["ms"], "ma": gold["ma"]})
        except ValueError:
            return False

    def twin(self, pair: dict, index: int) -> dict | None:
        """The twin of training pair number `index`, or None when it has none."""
        gold = pair["gold"]
        wanted, offered = parse_facets(gold["qa"]), parse_facets(gold["pa"])
        if not self.follows_rules(pair, wanted, offered):
            return None
        keys = sorted(key for key in wanted if key in offered)
        if not keys:
            return None
        rng = np.random.default_rng([self.seed, index])
        flips = [key for key in keys if rng.random() < 0.5] or [keys[int(rng.integers(len(keys)))]]
        attributes, title, description = dict(offered), pair["title"], pair["description"]
        for key in flips:
            if offered[key] == wanted[key]:
                others = [value for value in self.values.get((pair["product_type"], key), ()) if value != wanted[key]]
                if not others:
                    continue
                new = others[int(rng.integers(len(others)))]
            else:
                new = wanted[key]
            title, description = replace_word(title, offered[key], new), replace_word(description, offered[key], new)
            attributes[key] = new
        if attributes == offered:
            return None
        ma = attribute_match(wanted, attributes)
        label = self.labels.label_from_nodes({"ms": gold["ms"], "ma": ma})
        return {**pair, "title": title, "description": description, "attributes": attributes,
                "gold": {**gold, "pa": format_facets(attributes), "ma": ma, self.label_node: label}}
