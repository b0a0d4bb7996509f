"""Surface text: filling templates with surface forms (titles, descriptions, queries).

Randomness here is per row and small (which template, which synonym), so it runs through a
`random.Random` seeded from the stage's numpy generator: deterministic and far cheaper per call
than numpy for scalar draws.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from jobs.world.vocabulary import ATTRIBUTES_SLOT, BRAND_SLOT, Template

_SPACES = re.compile(r"\s+")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)")
_SPACE_BEFORE = re.compile(r"\s+([,.:)|])")
_REPEATED_SEPARATORS = re.compile(r"([,.:|-])(\s*[,.:|-])+")
_EDGE = " ,.:|-"


def tidy(text: str) -> str:
    """Collapse spaces and the separators left behind by empty slots."""
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _REPEATED_SEPARATORS.sub(r"\1", text)
    return text.strip(_EDGE)


def surface(rng: random.Random, canonical: str, synonyms: Sequence[str], synonym_rate: float) -> str:
    """The canonical form, or with probability `synonym_rate` one of its synonyms."""
    if synonyms and rng.random() < synonym_rate:
        return synonyms[rng.randrange(len(synonyms))]
    return canonical


def usable_templates(templates: Sequence[Template], available: frozenset[str], attribute_names: frozenset[str],
                     has_brand: bool, exact: bool) -> list[Template]:
    """Templates whose slots can all be filled from `available` attributes (and a brand if `has_brand`).

    `exact` (queries): the template must also name the brand exactly when there is one, and express
    every available attribute (by name or through {attributes}), so the text states the whole intent.
    """
    result = []
    for template in templates:
        names_brand = BRAND_SLOT in template.slots
        if (names_brand and not has_brand) or (exact and names_brand != has_brand):
            continue
        named = template.named_attributes(attribute_names)
        if not named <= available:
            continue
        if exact and ATTRIBUTES_SLOT not in template.slots and named != available:
            continue
        result.append(template)
    return result


def fill(template: Template, slots: dict[str, str], values: dict[str, str], order: Sequence[str],
         joiner: str) -> str:
    """Fill a template: `slots` (type, brand, noise, details), named attribute slots from `values`,
    and {attributes} with the values the template does not name, in `order`, joined by `joiner`."""
    rest = [values[name] for name in order if name not in template.slots]
    filled = {**slots, ATTRIBUTES_SLOT: joiner.join(rest), **values}
    values_of_slots = {name: filled.get(name, "") for name in template.slots}
    text = template.text.format(**values_of_slots)
    return tidy(text) if not all(values_of_slots.values()) else text


def typo(rng: random.Random, text: str) -> str:
    """Swap two adjacent letters inside one word of at least four letters (text unchanged if none)."""
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not candidates:
        return text
    i = candidates[rng.randrange(len(candidates))]
    word = words[i]
    j = rng.randrange(len(word) - 1)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)
