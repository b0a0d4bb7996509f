"""Reading a query text back with the vocabulary that wrote it: which constraint sets it can mean.

A query is written from an intent by a template (`jobs.world.queries`): the type's surface form, each
constrained value's surface form, the brand, the template's own words and sometimes a noise word or a
typo. Reading inverts that: every segmentation of the text into those phrases, one value per key. A
text with one reading states its intent; `natural wood` (color, or color and material) has two; a typo
leaves none. The quality diagnosis uses it to say how much of the query's constraints the text alone
can give.
"""

from __future__ import annotations

import functools
import re

from jobs.world.catalog import BRAND_FACET
from jobs.world.vocabulary import Vocabulary

Facet = tuple[str, str]  # (key, canonical value)


class QueryReader:
    """The ways the world's vocabulary can read a query text, and the value surface forms written in it."""

    def __init__(self, vocabulary: Vocabulary):
        self.phrases: dict[tuple[str, ...], list[Facet | None]] = {}  # words -> facets (None: not a facet)
        for attribute in vocabulary.attributes:
            for value, synonyms in zip(attribute.values, attribute.synonyms):
                for form in (value, *synonyms):
                    self._add(form, (attribute.name, value))
        for brand in vocabulary.brands:
            self._add(brand, (BRAND_FACET, brand))
        fillers = [form for product_type in vocabulary.types for form in (product_type.name, *product_type.synonyms, *product_type.misspellings)]
        fillers += [word for template in vocabulary.query_templates for word in re.sub(r"\{[^}]*\}", " ", template.text).split()]
        for filler in (*fillers, *vocabulary.query_noise_words):
            self._add(filler, None)
        self.longest = max(map(len, self.phrases))

    def _add(self, text: str, facet: Facet | None) -> None:
        self.phrases.setdefault(tuple(text.lower().split()), []).append(facet)

    def readings(self, query: str) -> set[frozenset[Facet]]:
        """Every constraint set whose surface forms, with fillers, spell the whole text (one value per key)."""
        words = query.split()

        @functools.cache
        def read_from(start: int) -> frozenset[frozenset[Facet]]:
            if start == len(words):
                return frozenset({frozenset()})
            found = set()
            for length in range(1, min(self.longest, len(words) - start) + 1):
                for facet in self.phrases.get(tuple(words[start:start + length]), ()):
                    for rest in read_from(start + length):
                        if facet is None:
                            found.add(rest)
                        elif all(key != facet[0] for key, _ in rest):
                            found.add(rest | {facet})
            return frozenset(found)

        return set(read_from(0))

    def surfaces(self, query: str) -> set[tuple[str, str, str]]:
        """(surface form, key, value) of every facet phrase anywhere in the text."""
        words = query.split()
        return {(" ".join(words[start:start + length]), *facet)
                for start in range(len(words)) for length in range(1, self.longest + 1)
                for facet in self.phrases.get(tuple(words[start:start + length]), ()) if facet is not None}
