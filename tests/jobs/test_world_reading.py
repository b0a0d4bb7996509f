"""Reading query texts back with the vocabulary: every written intent is among its text's readings."""

from __future__ import annotations

import pytest

from jobs.world.config import WorldConfig
from jobs.world.generate import generate_world
from jobs.world.reading import QueryReader
from jobs.world.vocabulary import load_vocabulary
from schemas.graph import parse_facets


@pytest.fixture(scope="module")
def reader():
    return QueryReader(load_vocabulary())


def test_every_query_without_a_typo_has_its_intent_among_the_readings(reader):
    world = generate_world(WorldConfig.tests(typo_rate=0.0))
    intents = {row["query_id"]: dict(row["nodes"])["qa"] for row in world.gold_nodes.to_pylist()}
    texts = dict(zip(world.queries["query_id"].to_pylist(), world.queries["query"].to_pylist()))
    single = 0
    for query_id, qa in intents.items():
        readings = reader.readings(texts[query_id])
        assert frozenset(parse_facets(qa).items()) in readings, (texts[query_id], qa, readings)
        single += len(readings) == 1
    assert single / len(intents) > 0.9  # most texts state their intent; the rest share a phrase between two readings


@pytest.mark.parametrize(("text", "expected"), [
    ("dresser", [{}]),
    ("wall art eclectic", [{"style": "bohemian"}]),
    ("bookshelf natural wood", [{"color": "natural"}, {"color": "natural", "material": "wood"}]),
    ("matte solid wood coffee table by harbor pine",
     [{"finish": "matte", "material": "wood", "brand": "Harbor Pine"},
      {"finish": "matte", "material": "wood", "pattern": "solid", "brand": "Harbor Pine"}]),
    ("wall art ecelctic", []),  # a typo: no segmentation spells it
])
def test_readings_of_known_texts(reader, text, expected):
    assert reader.readings(text) == {frozenset(facets.items()) for facets in expected}


def test_surfaces_name_the_form_written_and_its_canonical_value(reader):
    assert reader.surfaces("eclectic wall art by harbor pine") == {("eclectic", "style", "bohemian"), ("harbor pine", "brand", "Harbor Pine")}
