"""The synthetic world's vocabulary: departments, product types, brands, attributes, templates.

A vocabulary is a YAML file (the bundled one is `jobs/world/vocabulary.yaml`; its header documents
every key). `load_vocabulary` reads and checks it and returns a `Vocabulary` whose index arrays the
generator works with: types, attributes and brands become integer codes, the related-type relation
becomes a symmetric boolean matrix. Every problem is reported as a `VocabularyError` naming the file
and the key (`vocabulary.yaml: departments.living_room.types.sofa: missing required key 'price'`).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from schemas.graph import FACETS_NONE

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is 10x faster when present
BUNDLED_VOCABULARY = Path(__file__).with_name("vocabulary.yaml")
DEFAULT = "default"

# Template slots besides the attribute names.
TYPE_SLOT, BRAND_SLOT, NOISE_SLOT, ATTRIBUTES_SLOT, DETAILS_SLOT = "type", "brand", "noise", "attributes", "details"
_PRODUCT_SLOTS = {TYPE_SLOT, BRAND_SLOT, NOISE_SLOT, ATTRIBUTES_SLOT, DETAILS_SLOT}
_QUERY_SLOTS = {TYPE_SLOT, BRAND_SLOT, ATTRIBUTES_SLOT}


class VocabularyError(ValueError):
    """The vocabulary file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Attribute:
    """A typed facet: canonical values, each with its other surface forms."""

    name: str
    values: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ProductType:
    name: str
    department: str
    synonyms: tuple[str, ...]
    misspellings: tuple[str, ...]
    related: tuple[str, ...]
    price_range: tuple[float, float]
    weight: float
    # attribute name -> canonical values this type takes
    attributes: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Template:
    """A format string and the slots it names."""

    text: str
    slots: frozenset[str]

    def named_attributes(self, attribute_names: frozenset[str]) -> frozenset[str]:
        return self.slots & attribute_names


@dataclass(frozen=True)
class Vocabulary:
    name: str
    path: Path
    sha256: str
    departments: tuple[str, ...]
    brands: tuple[str, ...]
    brand_department: tuple[int, ...]  # department code of each brand
    types: tuple[ProductType, ...]
    attributes: tuple[Attribute, ...]  # sorted by name: the order of the attribute matrix columns
    title_templates: tuple[Template, ...]
    description_templates: tuple[Template, ...]
    query_templates: tuple[Template, ...]
    noise_words: tuple[str, ...]
    query_noise_words: tuple[str, ...]

    @property
    def type_names(self) -> list[str]:
        return [t.name for t in self.types]

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @cached_property
    def attribute_set(self) -> frozenset[str]:
        return frozenset(self.attribute_names)

    @cached_property
    def type_department(self) -> np.ndarray:
        """(n_types,) department code of each type."""
        return np.array([self.departments.index(t.department) for t in self.types], dtype=np.int32)

    @cached_property
    def related(self) -> np.ndarray:
        """(n_types, n_types) bool, symmetric, False on the diagonal: sibling or accessory types."""
        index = {name: i for i, name in enumerate(self.type_names)}
        matrix = np.zeros((len(self.types), len(self.types)), dtype=bool)
        for i, product_type in enumerate(self.types):
            for other in product_type.related:
                matrix[i, index[other]] = matrix[index[other], i] = True
        return matrix

    @cached_property
    def allowed_values(self) -> list[list[np.ndarray]]:
        """[type][attribute] -> int16 codes of the values that type takes (empty: type lacks it)."""
        result = []
        for product_type in self.types:
            row = []
            for attribute in self.attributes:
                values = product_type.attributes.get(attribute.name, ())
                row.append(np.array([attribute.values.index(v) for v in values], dtype=np.int16))
            result.append(row)
        return result

    @cached_property
    def brand_ranges(self) -> np.ndarray:
        """(n_departments, 2): [first, end) brand codes of each department (brands are grouped)."""
        codes = np.asarray(self.brand_department)
        return np.array([[np.searchsorted(codes, d), np.searchsorted(codes, d, side="right")]
                         for d in range(len(self.departments))])


def resolve_vocabulary(name_or_path: str | Path) -> Path:
    """`default` -> the bundled file; anything else must be an existing YAML file."""
    if str(name_or_path) == DEFAULT:
        return BUNDLED_VOCABULARY
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        raise VocabularyError(f"vocabulary {str(name_or_path)!r}: use {DEFAULT!r} or a path to a .yaml file")
    if not path.is_file():
        raise VocabularyError(f"vocabulary file {path} does not exist")
    return path


class _Reader:
    """Typed access to the raw YAML with errors that name the file and the dotted key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> VocabularyError:
        return VocabularyError(f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}")

    def get(self, mapping: Any, key: str, where: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if not isinstance(mapping, dict):
            raise self.fail(where, f"expected a mapping, got {type(mapping).__name__}")
        if key not in mapping:
            if default is not ...:
                return default
            raise self.fail(where, f"missing required key {key!r}")
        value = mapping[key]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"{where}.{key}" if where else key, f"expected {names}, got {value!r}")
        return value

    def words(self, values: Any, where: str, allow_empty: bool = True) -> tuple[str, ...]:
        if values is None:
            values = []
        if not isinstance(values, list):
            raise self.fail(where, f"expected a list of strings, got {values!r}")
        words = tuple(str(v).strip() for v in values)
        if any(not w for w in words):
            raise self.fail(where, "contains an empty string")
        if not allow_empty and not words:
            raise self.fail(where, "must not be empty")
        if len(set(words)) != len(words):
            raise self.fail(where, f"lists a value twice: {list(words)}")
        return words

    def templates(self, raw: dict, key: str, allowed_slots: set[str], require_type: bool) -> tuple[Template, ...]:
        items = self.words(self.get(raw, key, "", list), key, allow_empty=False)
        result = []
        for i, text in enumerate(items):
            try:
                slots = frozenset(f for _, f, _, _ in string.Formatter().parse(text) if f is not None)
            except ValueError as error:
                raise self.fail(f"{key}[{i}]", f"{text!r} is not a valid template: {error}") from None
            unknown = sorted(slots - allowed_slots)
            if unknown:
                known = sorted(allowed_slots)
                raise self.fail(f"{key}[{i}]", f"{text!r} names unknown slots {unknown}; known: {known}")
            if require_type and TYPE_SLOT not in slots:
                raise self.fail(f"{key}[{i}]", f"{text!r} must contain {{type}}")
            result.append(Template(text, slots))
        return tuple(result)


def load_vocabulary(name_or_path: str | Path = DEFAULT) -> Vocabulary:
    """Read, check and index a vocabulary file (`default`: the bundled one)."""
    path = resolve_vocabulary(name_or_path)
    text = path.read_text()
    reader = _Reader(path)
    try:
        raw = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as error:
        raise reader.fail("", f"not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise reader.fail("", "the top level must be a mapping")
    name = str(reader.get(raw, "name", "", str))
    attributes = _read_attributes(reader, raw)
    departments, brands, brand_department, types = _read_departments(reader, raw, attributes)
    attribute_names = {a.name for a in attributes}
    clash = sorted(attribute_names & (_PRODUCT_SLOTS | _QUERY_SLOTS))
    if clash:
        raise reader.fail("attributes", f"attribute names {clash} are reserved template slots")
    title_templates = reader.templates(raw, "title_templates", _PRODUCT_SLOTS | attribute_names, True)
    description_templates = reader.templates(raw, "description_templates", _PRODUCT_SLOTS | attribute_names, False)
    query_templates = reader.templates(raw, "query_templates", _QUERY_SLOTS | attribute_names, True)
    _require_fallbacks(reader, title_templates, description_templates, query_templates, attribute_names)
    noise_words = reader.words(reader.get(raw, "noise_words", "", list), "noise_words", allow_empty=False)
    query_noise_words = reader.words(raw.get("query_noise_words", []), "query_noise_words")
    return Vocabulary(
        name=name,
        path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        departments=departments,
        brands=brands,
        brand_department=brand_department,
        types=types,
        attributes=attributes,
        title_templates=title_templates,
        description_templates=description_templates,
        query_templates=query_templates,
        noise_words=noise_words,
        query_noise_words=query_noise_words,
    )


def _read_attributes(reader: _Reader, raw: dict) -> tuple[Attribute, ...]:
    attributes_raw = reader.get(raw, "attributes", "", dict)
    if not attributes_raw:
        raise reader.fail("attributes", "must declare at least one attribute")
    attributes = []
    owner: dict[str, str] = {}  # surface form -> "attribute=value"; surfaces are unique across attributes
    for attribute_name in sorted(attributes_raw, key=str):
        where = f"attributes.{attribute_name}"
        values_raw = reader.get(attributes_raw, attribute_name, "attributes", dict)
        if not values_raw:
            raise reader.fail(where, "must declare at least one value")
        values, synonyms = [], []
        for value in values_raw:
            value_name = str(value).strip()
            _check_facet_text(reader, f"{where}.{value_name}", value_name)
            surfaces = reader.words(values_raw[value], f"{where}.{value_name}")
            for surface in (value_name, *surfaces):
                key = surface.lower()
                if key in owner:
                    raise reader.fail(
                        f"{where}.{value_name}", f"surface form {surface!r} is already used by {owner[key]}"
                    )
                owner[key] = f"{attribute_name}={value_name}"
            values.append(value_name)
            synonyms.append(surfaces)
        attributes.append(Attribute(str(attribute_name), tuple(values), tuple(synonyms)))
    return tuple(attributes)


def _check_facet_text(reader: _Reader, where: str, text: str) -> None:
    """Canonical values and brands are written into `key=value; ...` facet text."""
    if ";" in text or "=" in text or text == FACETS_NONE:
        raise reader.fail(where, f"{text!r} cannot be a facet value (no ';' or '=', and not {FACETS_NONE!r})")


def _read_departments(reader: _Reader, raw: dict, attributes: tuple[Attribute, ...]):
    by_name = {a.name: a for a in attributes}
    departments_raw = reader.get(raw, "departments", "", dict)
    if not departments_raw:
        raise reader.fail("departments", "must declare at least one department")
    departments, brands, brand_department, types = [], [], [], []
    type_owner: dict[str, str] = {}  # surface form -> type
    brand_seen: set[str] = set()
    for d, department in enumerate(departments_raw):
        where = f"departments.{department}"
        body = reader.get(departments_raw, department, "departments", dict)
        for brand in reader.words(reader.get(body, "brands", where, list), f"{where}.brands", allow_empty=False):
            if brand.lower() in brand_seen:
                raise reader.fail(f"{where}.brands", f"brand {brand!r} is declared twice")
            _check_facet_text(reader, f"{where}.brands", brand)
            brand_seen.add(brand.lower())
            brands.append(brand)
            brand_department.append(d)
        types_raw = reader.get(body, "types", where, dict)
        if not types_raw:
            raise reader.fail(f"{where}.types", "must declare at least one product type")
        for type_name in types_raw:
            types.append(_read_type(reader, str(department), str(type_name), types_raw[type_name],
                                    f"{where}.types.{type_name}", by_name, type_owner))
        departments.append(str(department))
    known = {t.name for t in types}
    for product_type in types:
        where = f"departments.{product_type.department}.types.{product_type.name}.related"
        unknown = [r for r in product_type.related if r not in known]
        if unknown:
            raise reader.fail(where, f"unknown types {unknown}")
        if product_type.name in product_type.related:
            raise reader.fail(where, "a type cannot be related to itself")
    return tuple(departments), tuple(brands), tuple(brand_department), tuple(types)


def _read_type(reader: _Reader, department: str, name: str, body: Any, where: str,
               attributes: dict[str, Attribute], type_owner: dict[str, str]) -> ProductType:
    if not isinstance(body, dict):
        raise reader.fail(where, f"expected a mapping, got {body!r}")
    synonyms = reader.words(body.get("synonyms"), f"{where}.synonyms")
    misspellings = reader.words(body.get("misspellings"), f"{where}.misspellings")
    for surface in (name, *synonyms, *misspellings):
        key = surface.lower()
        if key in type_owner:
            raise reader.fail(where, f"surface form {surface!r} is already used by type {type_owner[key]!r}")
        type_owner[key] = name
    price = reader.get(body, "price", where, list)
    if len(price) != 2 or not all(isinstance(p, (int, float)) for p in price) or not 0 < price[0] < price[1]:
        raise reader.fail(f"{where}.price", f"expected [low, high] with 0 < low < high, got {price!r}")
    weight = reader.get(body, "weight", where, (int, float), default=1.0)
    if not weight > 0:
        raise reader.fail(f"{where}.weight", f"must be positive, got {weight!r}")
    attributes_raw = reader.get(body, "attributes", where, dict)
    type_attributes: dict[str, tuple[str, ...]] = {}
    for attribute_name, values in attributes_raw.items():
        key = f"{where}.attributes.{attribute_name}"
        if attribute_name not in attributes:
            raise reader.fail(key, f"unknown attribute; declared attributes are {sorted(attributes)}")
        declared = attributes[attribute_name].values
        if values == "all":
            type_attributes[attribute_name] = declared
            continue
        values = tuple(str(v) for v in reader.words(values, key, allow_empty=False))
        unknown = [v for v in values if v not in declared]
        if unknown:
            raise reader.fail(key, f"unknown values {unknown}; {attribute_name} has {list(declared)}")
        type_attributes[attribute_name] = values
    return ProductType(
        name=name,
        department=department,
        synonyms=synonyms,
        misspellings=misspellings,
        related=reader.words(body.get("related"), f"{where}.related"),
        price_range=(float(price[0]), float(price[1])),
        weight=float(weight),
        attributes=type_attributes,
    )


def _require_fallbacks(reader: _Reader, titles, descriptions, queries, attribute_names: set[str]) -> None:
    """Each list needs a template usable with no brand and no particular attribute."""
    generic = {TYPE_SLOT, NOISE_SLOT, ATTRIBUTES_SLOT, DETAILS_SLOT}
    for key, templates in (("title_templates", titles), ("description_templates", descriptions)):
        if not any(t.slots <= generic for t in templates):
            raise reader.fail(key, "needs a template naming only {type}, {attributes}, {details} or {noise}")
    if not any(t.slots <= {TYPE_SLOT, ATTRIBUTES_SLOT} for t in queries):
        raise reader.fail("query_templates", "needs a template naming only {type} and {attributes}")
    if not any(BRAND_SLOT in t.slots and t.slots <= {TYPE_SLOT, ATTRIBUTES_SLOT, BRAND_SLOT} for t in queries):
        raise reader.fail("query_templates", "needs a template naming only {brand}, {type} and {attributes}")
