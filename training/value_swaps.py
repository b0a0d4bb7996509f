"""Value swaps for SFT: a training pair whose query names one of its constraint values, with that value replaced by
another value of the same key, in the query and in every node that follows from it.

Why: a query writes a value as people type it (` nordholm`, after a space, in lower case) and the CoT writes it as the
catalog does (`brand=Nordholm`): another token. Each value read from the query is then a mapping learned from the
training queries that name it, and a value few queries name is read as one the policy knows for that product type (the
recipe's seed 0 writes Velora for `nordholm`, a brand named in 2 of the demo's 1600 training queries:
benchmarks/results/quality.md, session 29). Swaps show every value the training pairs carry inside queries, uniformly
over the values of a key, so that reading a value off the query is what pays.

What a swap changes: the query's text (the new value in the query's case), the query facets, the checks, the attribute
match and the label, the last three computed again by the graph's rules (`attribute_checks`, `attribute_match`, the
label set's rule) against the product's facets. The graph names the nodes (`swap_nodes`): the checks node's two parents
are the query's and the product's facets (in edge order), its child is the attribute match; a graph without checks
(relevance7) has an attribute match whose two parents are the facets. A pair is swapped only where those rules
give its own gold back unswapped (a dataset whose gold does not follow them is never rewritten), a value only where it
occurs once in the query as a whole word (case aside), outside the subjects' words, and the new value is one that
does not occur in the query.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence

from schemas.graph import LabelSet, ReasoningGraph, attribute_checks, attribute_match, format_facets, parse_facets


@functools.cache
def _whole_word(text: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)


def _spans(text: str, query: str) -> list[tuple[int, int]]:
    return [match.span() for match in _whole_word(text).finditer(query)]


def swap_nodes(graph: ReasoningGraph) -> tuple[str, str, str | None, str]:
    """(query facets, product facets, checks node or None, attribute match) of `graph`: the checks node's two parents
    (in edge order) and its child (relevance8), or, without a checks node, the choice node whose two parents are facets
    nodes (relevance7's `ma`). ValueError when the graph has neither."""
    digraph, checks = graph.digraph(), graph.checks_node  # a node's predecessors come in edge order
    if checks is not None:
        matches = list(digraph.successors(checks))
        wanted_offered = list(digraph.predecessors(checks))
    else:
        matches = [name for name in graph.node_names if graph.node(name).kind == "choice"
                   and [graph.node(parent).kind for parent in digraph.predecessors(name)] == ["facets", "facets"]]
        wanted_offered = list(digraph.predecessors(matches[0])) if len(matches) == 1 else []
    if len(wanted_offered) != 2 or len(matches) != 1:
        raise ValueError(f"graph {graph.name!r}: value swaps need the attribute match computed from the query's and the product's "
                         "facets, through a checks node whose two parents they are (relevance8) or directly (relevance7)")
    return wanted_offered[0], wanted_offered[1], checks, matches[0]


class ValueSwaps:
    """The swappable values of a training split and the draws that swap them (see the module doc)."""

    def __init__(self, pairs: Sequence[dict], graph: ReasoningGraph, label_set: LabelSet):
        self.wanted, self.offered, self.checks, self.match = swap_nodes(graph)
        self.subjects = tuple(name for name in graph.node_names if graph.node(name).kind == "text")
        self.graph, self.label_set, self.pairs = graph, label_set, pairs
        self._swappable: dict[int, tuple[tuple[str, int, int], ...]] = {}
        values: dict[str, set[str]] = {}
        for pair in pairs:
            for node in (self.wanted, self.offered):
                for key, value in (parse_facets(pair["gold"].get(node, "")) or {}).items():
                    values.setdefault(key, set()).add(value)
        self.values = {key: tuple(sorted(found)) for key, found in values.items()}

    def derived(self, gold: dict[str, str], wanted: dict[str, str]) -> dict[str, str]:
        """`gold` with the query facets `wanted` and the checks, attribute match and label that follow from them."""
        offered = parse_facets(gold[self.offered]) or {}
        nodes = {**gold, self.wanted: format_facets(wanted), self.match: attribute_match(wanted, offered)}
        if self.checks is not None:
            nodes[self.checks] = attribute_checks(wanted, offered)
        nodes[self.graph.label_node] = self.label_set.label_from_nodes(nodes)
        return nodes

    def swappable(self, pair: dict) -> tuple[tuple[str, int, int], ...]:
        """(key, start, end) of each constraint value the query names once, outside the subjects' words; none where the
        pair's gold does not follow the graph's rules."""
        gold, query = pair["gold"], pair["query"]
        wanted = parse_facets(gold.get(self.wanted, ""))
        if not wanted or parse_facets(gold.get(self.offered, "")) is None:
            return ()
        try:
            if self.derived(gold, wanted) != gold:
                return ()
        except ValueError:  # no rule of the label set covers the pair's decisions
            return ()
        subject_spans = [span for node in self.subjects if gold.get(node) for span in _spans(gold[node], query)]
        found = []
        for key, value in sorted(wanted.items()):
            spans = _spans(value, query)
            if len(spans) == 1 and not any(start < spans[0][1] and spans[0][0] < end for start, end in subject_spans):
                found.append((key, *spans[0]))
        return tuple(found)

    def swapped(self, pair: dict, swappable: Sequence[tuple[str, int, int]], which: float, to: float) -> dict | None:
        """The pair with the value at `swappable[int(which * n)]` replaced by the `int(to * m)`-th of the m values of its key
        the query does not name; None when its key has no such value."""
        key, start, end = swappable[int(which * len(swappable))]
        query, gold = pair["query"], pair["gold"]
        wanted = parse_facets(gold[self.wanted])
        choices = [value for value in self.values[key] if value != wanted[key] and not _spans(value, query)]
        if not choices:
            return None
        new = choices[int(to * len(choices))]
        written = new if query[start:end] == wanted[key] else new.lower()
        return {**pair, "query": query[:start] + written + query[end:], "gold": self.derived(gold, {**wanted, key: new})}

    def draw(self, indices: Sequence[int], share: float, generator: random.Random) -> list[dict | None]:
        """For each index into the pairs (a micro-batch), the swapped pair, with probability `share` where the pair has a
        swappable value, or None (the pair as it is). Three draws per index whatever the outcome, so the draws are a
        function of the generator's seed and the position alone."""
        drawn: list[dict | None] = []
        for index in indices:
            chance, which, to = generator.random(), generator.random(), generator.random()
            if chance >= share:
                drawn.append(None)
                continue
            if index not in self._swappable:
                self._swappable[index] = self.swappable(self.pairs[index])
            found = self._swappable[index]
            drawn.append(self.swapped(self.pairs[index], found, which, to) if found else None)
        return drawn
