"""The synthetic world: determinism, schemas, gold nodes against a slow reference, logs, experiment.

Expected values come from outside the generator: the raw vocabulary YAML (read here with yaml),
hashlib for the experiment's hashing, the label set's own rule, scipy for the SRM check.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from scipy import stats

from jobs.world.config import WorldConfig
from jobs.world.generate import TABLES, generate_world, write_world
from jobs.world.run import GenerateConfig, run
from jobs.world.vocabulary import BUNDLED_VOCABULARY, VocabularyError, load_vocabulary
from schemas.config import ConfigError, load_config
from schemas.graph import LabelSet, format_facets, parse_facets
from schemas.storage import read_table


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig.tests())


@pytest.fixture(scope="module")
def raw_vocabulary():
    return yaml.safe_load(BUNDLED_VOCABULARY.read_text())


def _nodes(world) -> list[dict[str, str]]:
    return [dict(row) for row in world.gold_nodes["nodes"].to_pylist()]


def test_the_same_seed_gives_identical_tables_and_files(world, tmp_path):
    again = generate_world(WorldConfig.tests())
    for name, table in world.tables().items():
        assert table.equals(again.tables()[name], check_metadata=True), name
    assert world.manifest == again.manifest
    first, second = write_world(world, tmp_path / "a").parent, write_world(again, tmp_path / "b").parent
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for path in files:
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    other = generate_world(WorldConfig.tests(seed=1))
    assert not other.catalog.equals(world.catalog)


def test_every_table_conforms_to_its_declaration(world):
    for name, declaration in TABLES.items():
        table = world.tables()[name]
        assert table.schema.equals(declaration.arrow_schema(), check_metadata=True), name
        assert table.num_rows > 0, name
        for column in declaration.columns:
            values = table[column.name]
            if not column.nullable:
                assert values.null_count == 0, (name, column.name)
            if column.allowed is not None:
                assert pc.all(pc.is_in(values.drop_null(), pa.array(column.allowed))).as_py(), (name, column.name)
            if column.min_value is not None:
                assert pc.min(values).as_py() >= column.min_value, (name, column.name)
        if declaration.key:
            keys = table.group_by(list(declaration.key)).aggregate([])
            assert keys.num_rows == table.num_rows, f"{name}: key {declaration.key} is not unique"


def test_gold_label_is_the_label_set_rule_on_gold_ms_and_ma(world):
    for label_set_name, generated in (("wands", world), ("esci", generate_world(WorldConfig.tests(label_set="esci")))):
        label_set = LabelSet.load(label_set_name)
        nodes = _nodes(generated)
        assert [n["y"] for n in nodes] == [label_set.label_from_nodes({"ms": n["ms"], "ma": n["ma"]}) for n in nodes]
        counts = collections.Counter(n["y"] for n in nodes)
        assert set(counts) == set(label_set.names), f"{label_set_name}: labels {counts}"
        minimum = 0.10 if label_set_name == "wands" else 0.03
        assert min(counts.values()) / len(nodes) > minimum, counts


def test_gold_nodes_agree_with_a_slow_reference_from_catalog_and_vocabulary(world, raw_vocabulary):
    """ps, pa, qs from the catalog/queries tables; ms, ma recomputed row by row from the raw YAML."""
    related = collections.defaultdict(set)
    for department in raw_vocabulary["departments"].values():
        for name, body in department["types"].items():
            for other in body.get("related", []):
                related[name].add(other)
                related[other].add(name)
    catalog = {row["product_id"]: row for row in world.catalog.to_pylist()}
    queries = {row["query_id"]: row for row in world.queries.to_pylist()}
    rows = world.gold_nodes.to_pylist()
    sample = random.Random(0).sample(rows, 600)
    found = total = 0
    for row in sample:
        nodes, product, query = dict(row["nodes"]), catalog[row["product_id"]], queries[row["query_id"]]
        facets = dict(product["attributes"]) | ({"brand": product["brand"]} if product["brand"] else {})
        assert nodes["ps"] == product["product_type"]
        assert nodes["pa"] == format_facets(facets)
        assert nodes["qs"] == query["query_class"]
        if nodes["qs"] == nodes["ps"]:
            ms = "match"
        elif nodes["ps"] in related[nodes["qs"]]:
            ms = "related"
        else:
            ms = "mismatch"
        assert nodes["ms"] == ms, row
        wanted = parse_facets(nodes["qa"])
        satisfied = sum(facets.get(key) == value for key, value in wanted.items())
        ma = "none" if not wanted else "match" if satisfied == len(wanted) else "partial" if satisfied else "mismatch"
        assert nodes["ma"] == ma, row
        # every constraint is written in the query text, as its value, a synonym or the brand (typos aside)
        for key, value in wanted.items():
            forms = [value] if key == "brand" else [value, *raw_vocabulary["attributes"][key][value]]
            found += any(str(form).lower() in query["query"] for form in forms)
            total += 1
    assert total > 200 and found / total > 0.95


def test_attribute_checks_are_each_constraint_looked_up_in_the_product_facets(world):
    """relevance8's `ac` (the default graph): one `key=wanted/offered:yes|no` per constraint of qa, yes when pa holds that value;
    relevance7 has none and the same other nodes."""
    plain_world = generate_world(WorldConfig.tests(graph="relevance7"))
    assert world.gold_nodes.select(["query_id", "product_id"]).equals(plain_world.gold_nodes.select(["query_id", "product_id"]))
    verdicts = collections.Counter()
    for row, plain in zip(_nodes(world), _nodes(plain_world)):
        assert {key: value for key, value in row.items() if key != "ac"} == plain and "ac" not in plain
        wanted, offered = parse_facets(row["qa"]), parse_facets(row["pa"])
        expected = {key: f"{value}/{offered.get(key, '-')}:{'yes' if offered.get(key) == value else 'no'}" for key, value in wanted.items()}
        assert parse_facets(row["ac"]) == expected, row
        yes = sum(check.endswith(":yes") for check in expected.values())
        assert row["ma"] == ("none" if not expected else "match" if yes == len(expected) else "partial" if yes else "mismatch")
        verdicts.update(check.rsplit(":", 1)[1] for check in expected.values())
    assert min(verdicts["yes"], verdicts["no"]) > 0.2 * sum(verdicts.values()), verdicts


def test_the_rater_flips_to_adjacent_labels_at_the_configured_rate(world):
    label_set = LabelSet.load("wands")
    gold = [label_set.index(n["y"]) for n in _nodes(world)]
    rated = [label_set.index(label) for label in world.judgments["label"].to_pylist()]
    assert world.judgments["query_id"].equals(world.gold_nodes["query_id"])
    assert world.judgments["product_id"].equals(world.gold_nodes["product_id"])
    steps = np.abs(np.array(rated) - np.array(gold))
    assert steps.max() == 1
    noise = WorldConfig.tests().annotator_noise
    assert abs(steps.mean() - noise) < 4 * np.sqrt(noise * (1 - noise) / len(steps))
    assert set(world.judgments["annotator"].to_pylist()) == {"synthetic_rater"}


def test_extra_raters_judge_a_sample_and_leave_the_rest_of_the_world_unchanged(world):
    several = generate_world(WorldConfig.tests(extra_raters=2, extra_rater_share=0.25))
    first = several.judgments.slice(0, world.judgments.num_rows)
    assert first.equals(world.judgments)  # the first rater's labels and every other table are as without them
    assert several.search_impressions.equals(world.search_impressions) and several.gold_nodes.equals(world.gold_nodes)
    extra = several.judgments.slice(world.judgments.num_rows)
    counts = collections.Counter(extra["annotator"].to_pylist())
    assert set(counts) == {"synthetic_rater_2", "synthetic_rater_3"} and counts["synthetic_rater_2"] == counts["synthetic_rater_3"]
    n_pairs = world.judgments.num_rows
    assert abs(counts["synthetic_rater_2"] / n_pairs - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n_pairs)
    label_set = LabelSet.load("wands")
    keys = zip(several.gold_nodes["query_id"].to_pylist(), several.gold_nodes["product_id"].to_pylist())
    gold = {key: label_set.index(nodes["y"]) for key, nodes in zip(keys, _nodes(several))}
    steps = np.array([abs(label_set.index(row["label"]) - gold[row["query_id"], row["product_id"]]) for row in extra.to_pylist()])
    noise = WorldConfig.tests().annotator_noise
    assert steps.max() == 1 and abs(steps.mean() - noise) < 4 * np.sqrt(noise * (1 - noise) / len(steps))
    keys = collections.Counter(zip(extra["query_id"].to_pylist(), extra["product_id"].to_pylist(), extra["annotator"].to_pylist()))
    assert max(keys.values()) == 1  # the table's key (query_id, product_id, annotator) stays unique


def test_click_through_falls_with_position(world):
    impressions = world.search_impressions
    ctr = impressions.group_by("position").aggregate([("clicked", "mean")]).sort_by("position")["clicked_mean"]
    ctr = np.array(ctr.to_pylist())
    assert len(ctr) == WorldConfig.tests().results_per_request
    assert np.all(np.diff(ctr[:6]) < 0), ctr
    assert ctr[0] > 4 * ctr[-1], ctr


def test_events_sum_the_impressions_of_each_request(world):
    per_request = world.search_impressions.group_by("request_id").aggregate(
        [("position", "count"), ("clicked", "sum"), ("added_to_cart", "sum"), ("ordered", "sum")]
    ).sort_by("request_id")
    events = world.experiment_events.sort_by("request_id")
    assert per_request["request_id"].equals(events["request_id"])
    assert per_request["position_count"].to_pylist() == events["impressions"].to_pylist()
    assert per_request["clicked_sum"].to_pylist() == events["clicks"].to_pylist()
    assert per_request["added_to_cart_sum"].to_pylist() == events["add_to_carts"].to_pylist()
    assert per_request["ordered_sum"].to_pylist() == events["orders"].to_pylist()
    impressions = world.search_impressions
    gmv = pc.multiply(impressions["price"], pc.cast(impressions["quantity"], pa.float64()))
    assert pc.sum(gmv).as_py() == pytest.approx(pc.sum(events["gmv"]).as_py())
    assert pc.all(pc.equal(pc.cast(impressions["ts"], pa.date32()), impressions["ds"])).as_py()


def test_query_traffic_follows_the_zipf_frequencies(world):
    frequency = np.array(world.queries["frequency"].to_pylist())
    assert frequency.sum() == pytest.approx(1.0)
    assert np.all(np.diff(frequency) <= 0)
    ranks = np.arange(1, len(frequency) + 1)
    exponent = WorldConfig.tests().zipf_exponent
    assert frequency == pytest.approx(ranks**-exponent / (ranks**-exponent).sum())
    head, torso = WorldConfig.tests().segment_thresholds
    starts = np.cumsum(frequency) - frequency
    expected = np.where(starts < head, "head", np.where(starts < torso, "torso", "tail"))
    assert world.queries["segment"].to_pylist() == expected.tolist()
    requests = world.experiment_events["query_id"].to_pylist()
    share = requests.count(world.queries["query_id"][0].as_py()) / len(requests)
    assert share == pytest.approx(frequency[0], abs=4 * np.sqrt(frequency[0] * (1 - frequency[0]) / len(requests)))


def _ctr_z(world, period: str) -> float:
    """Treatment minus control CTR over its delta-method standard error (per-user clicks/impressions)."""
    start = pa.scalar(dt.date.fromisoformat(world.manifest["experiment"]["start_date"]))
    events = world.experiment_events
    in_period = pc.greater_equal(events["ds"], start) if period == "experiment" else pc.less(events["ds"], start)
    events = events.filter(in_period)
    users = events.group_by("user_id").aggregate([("clicks", "sum"), ("impressions", "sum")])
    users = users.join(world.experiment_assignment.select(["user_id", "variant"]), "user_id", join_type="inner")
    arms = {}
    for variant in ("control", "treatment"):
        arm = users.filter(pc.equal(users["variant"], variant))
        clicks, shown = (np.array(arm[c].to_pylist(), dtype=float) for c in ("clicks_sum", "impressions_sum"))
        ratio = clicks.sum() / shown.sum()
        linear = (clicks - ratio * shown) / shown.mean()
        arms[variant] = (ratio, linear.var(ddof=1) / len(linear))
    return (arms["treatment"][0] - arms["control"][0]) / np.sqrt(arms["treatment"][1] + arms["control"][1])


def test_the_better_ranker_raises_ctr_only_in_the_experiment_period():
    ab = generate_world(WorldConfig.tests(n_impressions=150_000))
    assert _ctr_z(ab, "experiment") > 3
    assert abs(_ctr_z(ab, "pre")) < 3
    aa = generate_world(WorldConfig.tests(n_impressions=150_000, experiment={"aa": True}))
    assert abs(_ctr_z(aa, "experiment")) < 3


def test_assignment_is_the_documented_hash_and_srm_drops_treatment_users(world):
    config = WorldConfig.tests()
    experiment_id = config.experiment.experiment_id

    def unit(key: str) -> float:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64

    assignment = world.experiment_assignment.to_pylist()
    for row in assignment:
        expected = "treatment" if unit(f"{experiment_id}:{row['user_id']}") < 0.5 else "control"
        assert row["variant"] == expected
    srm = generate_world(WorldConfig.tests(experiment={"srm": True}))
    lost = {row["user_id"] for row in assignment
            if row["variant"] == "treatment" and unit(f"{experiment_id}:srm:{row['user_id']}") < 0.1}
    assert 0 < len(lost)
    assert set(srm.experiment_assignment["user_id"].to_pylist()) == {row["user_id"] for row in assignment} - lost
    # a bigger loss is a sample-ratio mismatch a chi-square test flags; without srm it is not flagged
    for srm_on, share, flagged in ((False, 0.1, False), (True, 0.3, True)):
        generated = world if not srm_on else generate_world(
            WorldConfig.tests(experiment={"srm": True, "srm_drop_share": share}))
        counts = collections.Counter(generated.experiment_assignment["variant"].to_pylist())
        observed = [counts["control"], counts["treatment"]]
        p_value = stats.chisquare(observed).pvalue
        assert (p_value < 0.001) == flagged, (observed, p_value)


def test_first_exposure_and_user_type_follow_the_events(world):
    start = world.manifest["experiment"]["start_date"]
    events = world.experiment_events.to_pylist()
    first_seen, before = {}, set()
    for row in events:
        if row["ds"].isoformat() >= start:
            first_seen[row["user_id"]] = min(first_seen.get(row["user_id"], row["ts"]), row["ts"])
        else:
            before.add(row["user_id"])
    assignment = world.experiment_assignment.to_pylist()
    assert {row["user_id"] for row in assignment} == set(first_seen)
    for row in assignment:
        assert row["first_exposure_ts"] == first_seen[row["user_id"]]
        assert row["user_type"] == ("returning" if row["user_id"] in before else "new")
    assert {row["user_type"] for row in assignment} == {"new", "returning"}


def test_run_writes_tables_and_a_manifest_with_their_counts(tmp_path):
    config = load_config(GenerateConfig, None, [f"out={tmp_path / 'world'}", "preset=tests", "seed=3",
                                                "world.n_impressions=20000", "world.experiment.aa=true"])
    assert config.world_config().experiment.aa and config.world_config().seed == 3
    manifest_path = run(config)
    manifest = json.loads(manifest_path.read_text())
    root = manifest_path.parent
    for name, declaration in TABLES.items():
        assert read_table(declaration, root).num_rows == manifest["rows"][name], name
    assert manifest["rows"]["search_impressions"] == 20_000
    assert manifest["seed"] == 3 and manifest["label_set"] == "wands" and manifest["graph"] == "relevance8"
    experiment = manifest["experiment"]
    assert experiment["variants"] == ["control", "treatment"] and experiment["aa"] is True
    assert (experiment["pre_period"]["start"], experiment["pre_period"]["end"], experiment["start_date"]) == (
        "2024-03-01", "2024-03-07", "2024-03-08")
    days = read_table(TABLES["search_impressions"], root, columns=["ds"])["ds"]
    assert pc.min(days).as_py().isoformat() == "2024-03-01" and pc.max(days).as_py().isoformat() == "2024-03-14"
    # a smaller world written over it leaves no partition of the first behind
    run(load_config(GenerateConfig, None, [f"out={root}", "preset=tests", "world.n_days=10",
                                           "world.n_impressions=5000"]))
    assert len(list((root / "search_impressions").glob("ds=*"))) == 10


TINY_VOCABULARY = """
name: tiny_pets
attributes:
  color: {black: [dark], white: [snow]}
  size: {small: [mini], large: [big]}
departments:
  dogs:
    brands: [Woofco, Barkley]
    types:
      dog bed: {synonyms: [dog cushion], related: [dog bowl], price: [20, 90], attributes: {color: all, size: all}}
      dog bowl: {price: [5, 30], attributes: {color: all}}
  cats:
    brands: [Purrfect]
    types:
      cat tree: {misspellings: [cat tre], price: [40, 200], attributes: {color: [white], size: all}}
title_templates: ["{brand} {type} {attributes}", "{type} {attributes}"]
description_templates: ["{details}."]
query_templates: ["{attributes} {type}", "{brand} {attributes} {type}"]
noise_words: [sale]
"""


def test_another_vocabulary_generates_without_code_changes(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_VOCABULARY)
    tiny = generate_world(WorldConfig.tests(
        vocabulary=str(path), n_products=120, n_queries=15, candidates_per_query=12, judgments_per_query=6,
        n_users=100, n_impressions=3000))
    assert set(tiny.catalog["product_type"].to_pylist()) == {"dog bed", "dog bowl", "cat tree"}
    assert set(tiny.catalog["brand"].drop_null().to_pylist()) <= {"Woofco", "Barkley", "Purrfect"}
    assert set(tiny.catalog["category_path"].to_pylist()) == {"dogs/dog bed", "dogs/dog bowl", "cats/cat tree"}
    assert tiny.manifest["vocabulary"]["name"] == "tiny_pets"
    nodes = _nodes(tiny)
    assert {n["ms"] for n in nodes} <= {"match", "related", "mismatch"} and "match" in {n["ms"] for n in nodes}


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda text: text.replace(", price: [20, 90]", ""), "types.dog bed: missing required key 'price'"),
        (lambda text: text.replace("noise_words: [sale]", ""), "missing required key 'noise_words'"),
        (lambda text: text.replace("{color: all, size: all}", "{colour: all}"), "types.dog bed.attributes.colour"),
        (lambda text: text.replace("related: [dog bowl]", "related: [cat bowl]"), "types.dog bed.related"),
        (lambda text: text.replace("[dark]", "[mini]"), "'mini' is already used by color=black"),
    ],
)
def test_a_bad_vocabulary_names_the_file_and_the_key(tmp_path, edit, key):
    path = tmp_path / "broken.yaml"
    path.write_text(edit(TINY_VOCABULARY))
    with pytest.raises(VocabularyError, match=re.escape(str(path))) as error:
        load_vocabulary(path)
    assert key in str(error.value)


def test_configs_reject_bad_values_by_name():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        WorldConfig.preset("huge")
    with pytest.raises(ConfigError, match="results_per_request"):
        WorldConfig.tests(results_per_request=50)
    with pytest.raises(ConfigError, match="experiment.treatment_share"):
        WorldConfig.tests(experiment={"treatment_share": 1.5})
    with pytest.raises(ConfigError, match=r"unknown keys \['n_product'\]"):
        WorldConfig.tests(n_product=5)
    with pytest.raises(ConfigError, match="vocabulary file .* does not exist"):
        WorldConfig.tests(vocabulary="missing.yaml")
    with pytest.raises(ConfigError, match="world.seed"):
        GenerateConfig(preset="tests", world={"seed": 1})
    assert WorldConfig.tests(start_date=dt.date(2024, 5, 1)).start_date == "2024-05-01"


def test_the_bundled_vocabulary_is_rich(raw_vocabulary):
    vocabulary = load_vocabulary()
    assert len(vocabulary.departments) >= 6 and len(vocabulary.types) >= 40
    assert len(vocabulary.attributes) >= 6 and len(vocabulary.brands) >= 25
    assert vocabulary.related.sum() > 0 and (vocabulary.related == vocabulary.related.T).all()
    assert len(raw_vocabulary["departments"]) == len(vocabulary.departments)
