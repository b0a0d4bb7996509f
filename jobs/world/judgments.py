"""Candidate pools, gold reasoning-node values, gold labels and the synthetic rater's judgments.

Gold nodes of a (query, product) pair, in the graph's text format:
  qs = the query's canonical type;   qa = format_facets(query constraints + {"brand": b} if it names one)
  ps = the product's type;           pa = format_facets(product attributes + {"brand": b} if it has one)
  ms = match     if the product's type is the query's type,
       related   if it is a related type (sibling or accessory; the vocabulary relation, made symmetric),
       mismatch  otherwise
  ac = none      if the query constrains nothing, else one entry per constraint, `key=wanted/offered:yes|no`:
       the query's value, the product's value of that key (`-` when it has none), and yes when they are the
       same (only for graphs with the `ac` node: relevance8)
  ma = none      if the query constrains nothing (no attribute, no brand),
       match     if the product satisfies every constraint (same canonical value, same brand),
       partial   if it satisfies some,
       mismatch  if it satisfies none (a product lacking the attribute does not satisfy it)
  y  = label_set.label_from_nodes({"ms": ms, "ma": ma}), the label set's rule. For WANDS:
       Exact if ms=match and ma in (match, none); Partial if ms=match and ma in (partial, mismatch),
       or ms=related and ma != mismatch; Irrelevant otherwise.

The rule is vectorised through a lookup table over the 12 finite (ms, ma) combinations, built by
calling the label set's own rule once per combination.

The true gain (what rankers estimate and users respond to, independent of the label set):
  match: 0.4 + 0.6 f,  related: 0.1 + 0.15 f,  mismatch: 0,  with f = satisfied / constrained (1 if none).

Candidate pool of a query (`candidates_per_query` products): `pool_exact_share` drawn from same-type
products that satisfy every constraint, `pool_same_type_share` from the other same-type products,
`pool_related_share` from related types and the rest from the whole catalog; a group too small hands
its shortfall to the next. Judged pairs are the first `judgments_per_query` of the shuffled pool.

The synthetic rater (`annotator="synthetic_rater"`) gives the gold label, except with probability
`annotator_noise` an adjacent label (one step up or down the label set's order; from an end label,
its only neighbour). The noise-free label stays recoverable from gold_nodes (`y`, or the rule on ms/ma).
With `extra_raters` > 0, that many further raters (`synthetic_rater_2`, `synthetic_rater_3`, ...) with the
same noise each judge the same random `extra_rater_share` of the judged pairs, drawn after the first rater's
labels (so a world without them is unchanged): the pairs judged several times give the judges' own
agreement, the ceiling `relevance evaluate` prints beside a model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.world.catalog import BRAND_FACET, Catalog, facets_text
from jobs.world.columns import string_map, take
from jobs.world.queries import Queries
from jobs.world.vocabulary import Vocabulary
from schemas.graph import LabelSet, ReasoningGraph, attribute_checks
from schemas.tables import GOLD_NODES, JUDGMENTS

MS_VALUES = ("match", "related", "mismatch")
MA_VALUES = ("match", "partial", "mismatch", "none")
MS_MATCH, MS_RELATED, MS_MISMATCH = range(3)
MA_MATCH, MA_PARTIAL, MA_MISMATCH, MA_NONE = range(4)
EVIDENCE_NODES = ("qs", "qa", "ps", "pa", "ms", "ma")
CHECKS_NODE = "ac"  # optional: per-constraint attribute checks (relevance8)
RATER = "synthetic_rater"


@dataclass(frozen=True)
class PairNodes:
    """Decision-node codes and true gain of a batch of (query, product) pairs; all arrays share a shape."""

    ms: np.ndarray  # int8 index into MS_VALUES
    ma: np.ndarray  # int8 index into MA_VALUES
    gain: np.ndarray  # float64 in [0, 1]


def pair_nodes(queries: Queries, catalog: Catalog, related: np.ndarray, q: np.ndarray, p: np.ndarray) -> PairNodes:
    """ms, ma and true gain for pairs (q[i], p[i]); `q` and `p` are code arrays of any equal shape."""
    query_type, product_type = queries.type_code[q], catalog.type_code[p]
    is_related = related[query_type, product_type]
    ms = np.where(query_type == product_type, MS_MATCH, np.where(is_related, MS_RELATED, MS_MISMATCH))
    wanted = queries.constraints[q]
    constrained = wanted >= 0
    satisfied = constrained & (wanted == catalog.attributes[p])
    wanted_brand = queries.brand_code[q]
    n_constraints = constrained.sum(axis=-1) + (wanted_brand >= 0)
    n_satisfied = satisfied.sum(axis=-1) + ((wanted_brand >= 0) & (wanted_brand == catalog.brand_code[p]))
    ma = np.select(
        [n_constraints == 0, n_satisfied == n_constraints, n_satisfied > 0],
        [MA_NONE, MA_MATCH, MA_PARTIAL],
        MA_MISMATCH,
    )
    fraction = np.where(n_constraints > 0, n_satisfied / np.maximum(n_constraints, 1), 1.0)
    gain = np.select([ms == MS_MATCH, ms == MS_RELATED], [0.4 + 0.6 * fraction, 0.1 + 0.15 * fraction], 0.0)
    return PairNodes(ms.astype(np.int8), ma.astype(np.int8), gain)


def checks_text(vocabulary: Vocabulary, queries: Queries, catalog: Catalog, q: np.ndarray, p: np.ndarray) -> list[str]:
    """Gold `ac` of pairs (q[i], p[i]): `schemas.graph.attribute_checks` of the query's constraints (its brand included)
    against the product's facets; a value names one code per attribute, so equal names are the codes `pair_nodes` counts."""
    def named(codes: list[int], brand: int) -> dict[str, str]:
        facets = {attribute.name: attribute.values[code] for attribute, code in zip(vocabulary.attributes, codes) if code >= 0}
        return {**facets, BRAND_FACET: vocabulary.brands[brand]} if brand >= 0 else facets

    return [attribute_checks(named(wanted, brand), named(offered, product_brand))
            for wanted, offered, brand, product_brand in zip(queries.constraints[q].tolist(), catalog.attributes[p].tolist(),
                                                              queries.brand_code[q].tolist(), catalog.brand_code[p].tolist())]


def label_lookup(label_set: LabelSet) -> np.ndarray:
    """(3, 4) label codes: lookup[ms, ma] = index of label_set.label_from_nodes({ms, ma}); -1 if uncovered."""
    lookup = np.full((len(MS_VALUES), len(MA_VALUES)), -1, dtype=np.int8)
    for i, ms in enumerate(MS_VALUES):
        for j, ma in enumerate(MA_VALUES):
            try:
                lookup[i, j] = label_set.index(label_set.label_from_nodes({"ms": ms, "ma": ma}))
            except ValueError:
                pass
    return lookup


def check_graph(graph: ReasoningGraph) -> None:
    """The world knows gold values for qs, qa, ps, pa, ms, ma, the label and optionally ac; the graph must ask for those."""
    expected = {*EVIDENCE_NODES, graph.label_node}
    if not expected <= set(graph.node_names) <= expected | {CHECKS_NODE}:
        raise ValueError(f"graph {graph.name!r} has nodes {graph.node_names}; the synthetic world gives gold "
                         f"values for {sorted(expected)} and optionally {CHECKS_NODE!r}")
    for name, values in (("ms", MS_VALUES), ("ma", MA_VALUES)):
        if set(graph.node(name).values) != set(values):
            raise ValueError(f"graph {graph.name!r}: node {name} has values {list(graph.node(name).values)}; "
                             f"the synthetic world uses {list(values)}")


def candidate_pools(
    vocabulary: Vocabulary,
    catalog: Catalog,
    queries: Queries,
    size: int,
    rng: np.random.Generator,
    *,
    exact_share: float,
    same_type_share: float,
    related_share: float,
) -> np.ndarray:
    """(n_queries, size) int32 product codes; each row distinct products in random order."""
    n_types = len(vocabulary.types)
    by_type = np.argsort(catalog.type_code, kind="stable")
    bounds = np.searchsorted(catalog.type_code[by_type], np.arange(n_types + 1))
    of_type = [by_type[bounds[t] : bounds[t + 1]] for t in range(n_types)]
    attributes_of_type = [catalog.attributes[products] for products in of_type]
    of_related = [np.concatenate([of_type[u] for u in np.flatnonzero(vocabulary.related[t])] or [np.empty(0, np.int64)])
                  for t in range(n_types)]
    quotas = np.array([exact_share, same_type_share, related_share]) * size
    n_exact, n_same, n_related = np.round(quotas).astype(int)
    pools = np.empty((len(queries), size), dtype=np.int32)
    for q in range(len(queries)):
        t = queries.type_code[q]
        same = of_type[t]
        constrained = np.flatnonzero(queries.constraints[q] >= 0)
        exact = (attributes_of_type[t][:, constrained] == queries.constraints[q, constrained]).all(axis=1)
        if queries.brand_code[q] >= 0:
            exact &= catalog.brand_code[same] == queries.brand_code[q]
        chosen, wanted = [], 0
        for group, quota in ((same[exact], n_exact), (same[~exact], n_same), (of_related[t], n_related)):
            wanted += quota
            k = min(wanted, len(group))
            if k:
                chosen.append(rng.choice(group, size=k, replace=False))
            wanted -= k
        chosen = np.concatenate(chosen) if chosen else np.empty(0, np.int64)
        rest = size - len(chosen)
        if rest:
            draw = rng.choice(len(catalog), size=min(len(catalog), rest + len(chosen)), replace=False)
            fresh = ~(draw[:, None] == chosen[None, :]).any(axis=1)
            chosen = np.concatenate([chosen, draw[fresh][:rest]])
        pools[q] = rng.permutation(chosen)
    return pools


def judged_pairs(pools: np.ndarray, judgments_per_query: int) -> tuple[np.ndarray, np.ndarray]:
    """(query codes, product codes) of the judged pairs: the first judgments_per_query of each pool,
    ordered by query then product."""
    products = np.sort(pools[:, :judgments_per_query], axis=1)
    queries = np.repeat(np.arange(len(pools)), judgments_per_query)
    return queries, products.ravel()


def rater_labels(gold: np.ndarray, n_labels: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gold label codes moved to an adjacent label with probability `noise`."""
    flip = rng.random(len(gold)) < noise
    step = np.where(rng.random(len(gold)) < 0.5, -1, 1)
    step = np.where(gold == 0, 1, np.where(gold == n_labels - 1, -1, step))
    return np.where(flip, gold + step, gold).astype(np.int8) if n_labels > 1 else gold


def gold_and_judgments(
    vocabulary: Vocabulary,
    catalog: Catalog,
    queries: Queries,
    graph: ReasoningGraph,
    label_set: LabelSet,
    q: np.ndarray,
    p: np.ndarray,
    annotator_noise: float,
    rng: np.random.Generator,
    extra_raters: int = 0,
    extra_rater_share: float = 0.0,
) -> tuple[pa.Table, pa.Table]:
    """GOLD_NODES and JUDGMENTS tables for the judged pairs (q[i], p[i])."""
    nodes = pair_nodes(queries, catalog, vocabulary.related, q, p)
    lookup = label_lookup(label_set)
    gold = lookup[nodes.ms, nodes.ma]
    if (gold < 0).any():
        ms, ma = nodes.ms[gold < 0][0], nodes.ma[gold < 0][0]
        raise ValueError(f"label set {label_set.name!r}: no rule clause covers ms={MS_VALUES[ms]}, ma={MA_VALUES[ma]}")
    products, position = np.unique(p, return_inverse=True)
    values = {
        "qs": take(vocabulary.type_names, queries.type_code[q]),
        "qa": take(facets_text(vocabulary, queries.constraints, queries.brand_code), q),
        "ps": take(vocabulary.type_names, catalog.type_code[p]),
        "pa": take(
            facets_text(vocabulary, catalog.attributes[products], catalog.brand_code[products]), position
        ),
        "ms": take(MS_VALUES, nodes.ms),
        "ma": take(MA_VALUES, nodes.ma),
        graph.label_node: take(label_set.names, gold),
    }
    if CHECKS_NODE in graph.node_names:
        values[CHECKS_NODE] = pa.array(checks_text(vocabulary, queries, catalog, q, p), pa.string())
    query_ids, product_ids = queries.query_ids.take(pa.array(q)), catalog.product_ids.take(pa.array(p))
    gold_nodes = pa.table(
        {
            "query_id": query_ids,
            "product_id": product_ids,
            "nodes": string_map([values[name] for name in graph.node_names], graph.node_names),
        }
    )
    rows = [np.arange(len(q))]
    labels = [rater_labels(gold, len(label_set.names), annotator_noise, rng)]
    annotators = [np.full(len(q), RATER, dtype=object)]
    if extra_raters:
        sample = np.flatnonzero(rng.random(len(q)) < extra_rater_share)
        for rater in range(2, extra_raters + 2):
            rows.append(sample)
            labels.append(rater_labels(gold[sample], len(label_set.names), annotator_noise, rng))
            annotators.append(np.full(len(sample), f"{RATER}_{rater}", dtype=object))
    row = pa.array(np.concatenate(rows))
    judgments = pa.table(
        {
            "query_id": query_ids.take(row),
            "product_id": product_ids.take(row),
            "label": take(label_set.names, np.concatenate(labels)),
            "label_set": pa.array([label_set.name] * len(row), pa.string()),
            "annotator": pa.array(np.concatenate(annotators), pa.string()),
            "is_weak": pa.array(np.zeros(len(row), dtype=bool)),
        }
    )
    return GOLD_NODES.conform(gold_nodes), JUDGMENTS.conform(judgments)
