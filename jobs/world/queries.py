"""Queries: intents drawn from the catalog, written as search strings, with Zipf traffic.

An intent is a product type, 0-3 attribute constraints and sometimes a brand. Each is taken from a
random catalog product (its type, a random subset of its attributes, its brand), so every intent has
at least one product that satisfies it. The surface text writes the type as its canonical name, a
synonym or a listed misspelling, each value as canonical or synonym, fills a query template that
expresses every constraint, and sometimes adds a noise word or a typo. Texts are unique; duplicates
are drawn again.

Traffic: queries are ranked by popularity (fewer constraints and plainer wording -> more popular, with
random spread) and
get Zipf shares `rank ** -s / sum`. Segments by cumulative traffic: head are the most frequent queries
whose traffic starts before the first threshold, torso before the second, tail the rest.
Row i of every array is query `q{i}`; queries are stored in popularity order.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.world.catalog import SOURCE, Catalog
from jobs.world.columns import id_width, ids, take
from jobs.world.text import fill, surface, typo, usable_templates
from jobs.world.vocabulary import BRAND_SLOT, TYPE_SLOT, Vocabulary
from schemas.tables import QUERIES

SEGMENTS = ("head", "torso", "tail")
LOCALE = "us"


@dataclass(frozen=True)
class Queries:
    type_code: np.ndarray  # (n,) int32
    constraints: np.ndarray  # (n, n_attributes) int16 required value codes, -1 = unconstrained
    brand_code: np.ndarray  # (n,) int32 required brand, -1 = none
    frequency: np.ndarray  # (n,) float64 traffic shares, sum 1, non-increasing
    segment_code: np.ndarray  # (n,) int8 index into SEGMENTS
    query_ids: pa.Array
    texts: pa.Array
    table: pa.Table  # conformed to QUERIES

    def __len__(self) -> int:
        return len(self.type_code)


def zipf_shares(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def segments(frequency: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """Segment code per query (frequency sorted descending) by where its traffic starts."""
    starts = np.cumsum(frequency) - frequency
    return np.searchsorted(np.asarray(thresholds), starts, side="right").astype(np.int8)


def make_queries(
    vocabulary: Vocabulary,
    catalog: Catalog,
    n_queries: int,
    rng: np.random.Generator,
    *,
    constraint_probs: tuple[float, ...],
    brand_query_rate: float,
    synonym_rate: float,
    misspelling_rate: float,
    typo_rate: float,
    query_noise_rate: float,
    zipf_exponent: float,
    segment_thresholds: tuple[float, float],
) -> Queries:
    py = random.Random(int(rng.integers(2**63)))
    n_attributes = len(vocabulary.attributes)
    names = vocabulary.attribute_set
    cumulative = np.cumsum(constraint_probs).tolist()
    seen: set[str] = set()
    type_codes, brand_codes, texts, constraint_rows, unusual_scores = [], [], [], [], []
    attempts, budget = 0, 50 * n_queries + 1_000
    while len(texts) < n_queries:
        attempts += 1
        if attempts > budget:
            raise ValueError(
                f"could draw only {len(texts)} distinct queries of n_queries={n_queries} from this catalog and "
                "vocabulary; lower n_queries or give the vocabulary more types, values and synonyms"
            )
        p = py.randrange(len(catalog))
        row = catalog.attributes[p]
        present = [a for a in range(n_attributes) if row[a] >= 0]
        wanted = min(bisect.bisect_right(cumulative, py.random()), len(cumulative) - 1)
        chosen = sorted(py.sample(present, min(wanted, len(present))))
        brand = int(catalog.brand_code[p]) if catalog.brand_code[p] >= 0 and py.random() < brand_query_rate else -1
        constraint_values = {a: int(row[a]) for a in chosen}
        text, unusual = _write(vocabulary, py, int(catalog.type_code[p]), constraint_values, brand, names,
                      synonym_rate=synonym_rate, misspelling_rate=misspelling_rate, typo_rate=typo_rate,
                      query_noise_rate=query_noise_rate)
        if text in seen:
            continue
        seen.add(text)
        constraints = np.full(n_attributes, -1, dtype=np.int16)
        constraints[chosen] = row[chosen]
        type_codes.append(int(catalog.type_code[p]))
        brand_codes.append(brand)
        texts.append(text)
        unusual_scores.append(unusual)
        constraint_rows.append(constraints)

    type_code = np.array(type_codes, dtype=np.int32)
    brand_code = np.array(brand_codes, dtype=np.int32)
    constraints = np.stack(constraint_rows)
    n_constraints = (constraints >= 0).sum(axis=1) + (brand_code >= 0)
    popularity = np.argsort(n_constraints + np.array(unusual_scores) + 2.0 * rng.random(n_queries), kind="stable")
    type_code, brand_code, constraints = type_code[popularity], brand_code[popularity], constraints[popularity]
    texts_array = take(texts, popularity)
    frequency = zipf_shares(n_queries, zipf_exponent)
    segment_code = segments(frequency, segment_thresholds)
    query_ids = ids("q", np.arange(n_queries), id_width(n_queries, 6))
    table = pa.table(
        {
            "query_id": query_ids,
            "query": texts_array,
            "query_class": take(vocabulary.type_names, type_code),
            "segment": take(SEGMENTS, segment_code),
            "frequency": pa.array(frequency, pa.float64()),
            "locale": pa.array([LOCALE] * n_queries, pa.string()),
            "source": pa.array([SOURCE] * n_queries, pa.string()),
        }
    )
    return Queries(type_code, constraints, brand_code, frequency, segment_code, query_ids, texts_array,
                   QUERIES.conform(table))


def _write(vocabulary: Vocabulary, rng: random.Random, type_code: int, constraints: dict[int, int], brand: int,
           names: frozenset[str], *, synonym_rate: float, misspelling_rate: float, typo_rate: float,
           query_noise_rate: float) -> tuple[str, float]:
    """The search string of one intent, and how unusual its wording is (lowers its popularity)."""
    product_type = vocabulary.types[type_code]
    unusual = 0.0
    if product_type.misspellings and rng.random() < misspelling_rate:
        type_text = product_type.misspellings[rng.randrange(len(product_type.misspellings))]
        unusual += 1.0
    else:
        type_text = surface(rng, product_type.name, product_type.synonyms, synonym_rate)
        unusual += 0.5 * (type_text != product_type.name)
    attributes = vocabulary.attributes
    values = {
        attributes[a].name: surface(rng, attributes[a].values[v], attributes[a].synonyms[v], synonym_rate)
        for a, v in constraints.items()
    }
    options = usable_templates(vocabulary.query_templates, frozenset(values), names, brand >= 0, exact=True)
    order = list(values)
    rng.shuffle(order)
    slots = {TYPE_SLOT: type_text, BRAND_SLOT: vocabulary.brands[brand] if brand >= 0 else ""}
    text = fill(options[rng.randrange(len(options))], slots, values, order, " ").lower()
    if vocabulary.query_noise_words and rng.random() < query_noise_rate:
        noise = vocabulary.query_noise_words[rng.randrange(len(vocabulary.query_noise_words))]
        text = f"{noise} {text}" if rng.random() < 0.5 else f"{text} {noise}"
        unusual += 1.0
    if rng.random() < typo_rate:
        text = typo(rng, text)
        unusual += 1.0
    return text, unusual
