"""The catalog: products with a type, a brand, typed attributes, a price, a title and a description.

Codes, not strings, are what later stages use: `type_code` (n,), `brand_code` (n,) with -1 for an
unbranded product, and `attributes` (n, n_attributes) int16 value codes with -1 where the product
lacks the attribute (the type does not take it, or its data is missing). Types are drawn by their
vocabulary weight, brands uniformly from the type's department, each attribute the type takes from
its allowed values with P(i-th listed value) proportional to i ** -value_skew (values listed first
are the common ones; 0 = uniform), prices log-uniformly in the type's range (ending in .99). Titles
and descriptions fill a template usable with what the product has, writing values as canonical
forms or synonyms.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.world.columns import id_width, ids, sparse_map, take
from jobs.world.text import fill, surface, usable_templates
from jobs.world.vocabulary import BRAND_SLOT, DETAILS_SLOT, NOISE_SLOT, TYPE_SLOT, Vocabulary
from schemas.graph import format_facets
from schemas.tables import CATALOG

SOURCE = "synthetic"
BRAND_FACET = "brand"  # product and query facets carry the brand under this key


@dataclass(frozen=True)
class Catalog:
    type_code: np.ndarray  # (n,) int32
    brand_code: np.ndarray  # (n,) int32, -1 = no brand
    attributes: np.ndarray  # (n, n_attributes) int16 value codes, -1 = absent
    price: np.ndarray  # (n,) float64
    product_ids: pa.Array  # (n,) string
    table: pa.Table  # conformed to CATALOG

    def __len__(self) -> int:
        return len(self.type_code)


def facets_text(vocabulary: Vocabulary, value_codes: np.ndarray, brand_code: np.ndarray) -> list[str]:
    """`format_facets` per row: canonical attribute values (codes >= 0) plus the brand when there is one.

    Products' rows give the gold `pa` (their attributes); queries' rows give `qa` (their constraints).
    """
    texts = []
    for row, brand in zip(value_codes.tolist(), brand_code.tolist()):
        facets = {attribute.name: attribute.values[code] for attribute, code in zip(vocabulary.attributes, row) if code >= 0}
        if brand >= 0:
            facets[BRAND_FACET] = vocabulary.brands[brand]
        texts.append(format_facets(facets))
    return texts


def make_catalog(
    vocabulary: Vocabulary,
    n_products: int,
    rng: np.random.Generator,
    *,
    synonym_rate: float,
    value_skew: float,
    attribute_missing_rate: float,
    unbranded_rate: float,
    description_missing_rate: float,
) -> Catalog:
    n_types, n_attributes = len(vocabulary.types), len(vocabulary.attributes)
    weights = np.array([t.weight for t in vocabulary.types])
    type_code = rng.choice(n_types, size=n_products, p=weights / weights.sum()).astype(np.int32)

    first, end = vocabulary.brand_ranges[vocabulary.type_department[type_code]].T
    brand_code = (first + np.floor(rng.random(n_products) * (end - first))).astype(np.int32)
    brand_code[rng.random(n_products) < unbranded_rate] = -1

    draws = rng.random((n_products, n_attributes))
    missing = rng.random((n_products, n_attributes)) < attribute_missing_rate
    attributes = np.full((n_products, n_attributes), -1, dtype=np.int16)
    for t in range(n_types):
        rows = np.flatnonzero(type_code == t)
        for a, allowed in enumerate(vocabulary.allowed_values[t]):
            if len(allowed):
                cumulative = np.cumsum(np.arange(1, len(allowed) + 1, dtype=np.float64) ** -value_skew)
                picked = np.searchsorted(cumulative / cumulative[-1], draws[rows, a], side="right")
                attributes[rows, a] = allowed[np.minimum(picked, len(allowed) - 1)]
    attributes[missing] = -1

    low, high = np.array([t.price_range for t in vocabulary.types]).T
    raw_price = np.exp(np.log(low[type_code]) + rng.random(n_products) * np.log(high[type_code] / low[type_code]))
    price = np.floor(raw_price) + 0.99

    titles, descriptions = _texts(
        vocabulary, type_code, brand_code, attributes, random.Random(int(rng.integers(2**63))),
        synonym_rate=synonym_rate, description_missing_rate=description_missing_rate,
    )
    product_ids = ids("p", np.arange(n_products), id_width(n_products, 7))
    type_names = vocabulary.type_names
    table = pa.table(
        {
            "product_id": product_ids,
            "title": pa.array(titles, pa.string()),
            "description": pa.array(descriptions, pa.string()),
            "product_type": take(type_names, type_code),
            "category_path": take([f"{t.department}/{t.name}" for t in vocabulary.types], type_code),
            "brand": pc.if_else(pa.array(brand_code >= 0), take(vocabulary.brands, np.maximum(brand_code, 0)),
                                pa.scalar(None, pa.string())),
            "attributes": sparse_map(attributes, vocabulary.attribute_names, [a.values for a in vocabulary.attributes]),
            "price": pa.array(price, pa.float64()),
            "source": pa.array([SOURCE] * n_products, pa.string()),
        }
    )
    return Catalog(type_code, brand_code, attributes, price, product_ids, CATALOG.conform(table))


def _texts(vocabulary: Vocabulary, type_code: np.ndarray, brand_code: np.ndarray, attributes: np.ndarray,
           rng: random.Random, *, synonym_rate: float, description_missing_rate: float) -> tuple[list, list]:
    names = vocabulary.attribute_set
    usable: dict[tuple[frozenset[str], bool], tuple[list, list]] = {}
    titles, descriptions = [], []
    for t, b, row in zip(type_code.tolist(), brand_code.tolist(), attributes.tolist()):
        product_type = vocabulary.types[t]
        present = [(a, code) for a, code in zip(vocabulary.attributes, row) if code >= 0]
        available = frozenset(a.name for a, _ in present)
        key = (available, b >= 0)
        if key not in usable:
            usable[key] = (
                usable_templates(vocabulary.title_templates, available, names, b >= 0, exact=False),
                usable_templates(vocabulary.description_templates, available, names, b >= 0, exact=False),
            )
        title_options, description_options = usable[key]
        values = {a.name: surface(rng, a.values[code], a.synonyms[code], synonym_rate) for a, code in present}
        order = [a.name for a, _ in present]
        rng.shuffle(order)
        slots = {
            TYPE_SLOT: surface(rng, product_type.name, product_type.synonyms, synonym_rate),
            BRAND_SLOT: vocabulary.brands[b] if b >= 0 else "",
            NOISE_SLOT: vocabulary.noise_words[rng.randrange(len(vocabulary.noise_words))],
            DETAILS_SLOT: ", ".join(f"{a.name}: {a.values[code]}" for a, code in present),
        }
        title = fill(title_options[rng.randrange(len(title_options))], slots, values, order, ", ")
        titles.append(title[:1].upper() + title[1:])
        if rng.random() < description_missing_rate:
            descriptions.append(None)
        else:
            description = fill(description_options[rng.randrange(len(description_options))], slots, values, order, ", ")
            descriptions.append(description[:1].upper() + description[1:] + ("" if description.endswith(".") else "."))
    return titles, descriptions
