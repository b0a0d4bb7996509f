"""`run(config)` end to end: tables on disk -> report.md, self-contained report.html, metrics.json."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_world import WANDS, make_predictions
from sklearn import metrics as skm

from evaluation.command import EvaluateConfig, run
from evaluation.inputs import judgments_from_gold_nodes, predictions_from_judgments
from schemas import storage
from schemas.config import ConfigError, load_config
from schemas.graph import ReasoningGraph
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES, RELEVANCE


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for table, data in ((JUDGMENTS, world.judgments), (GOLD_NODES, world.gold_nodes), (QUERIES, world.queries),
                        (CATALOG, world.catalog)):
        storage.write_table(table, data, root)
    models = {"a": make_predictions(world.gold, seed=1, accuracy=0.6, name="a", drop=6, extra=2),
              "b": make_predictions(world.gold, seed=2, accuracy=0.8, name="b")}
    for name, table in models.items():
        storage.write_table(RELEVANCE, table, root / name)
    return root, models


def test_run_writes_reports_with_numbers_from_an_independent_computation(written, world, tmp_path):
    root, models = written
    out = tmp_path / "report"
    config = load_config(EvaluateConfig, overrides=[
        f"predictions.a={root / 'a'}", f"predictions.b={root / 'b' / 'relevance'}", f"gold={root}",
        f"gold_nodes={root}", f"queries={root}", f"catalog={root}", "n_bootstrap=200", f"out={out}",
    ])
    result = run(config)

    html = (out / "report.html").read_text()
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", html)) == 6  # confusion x2, class F1, reliability, agreement, forest
    assert "plots/" not in html  # self-contained
    markdown = (out / "report.md").read_text()
    for stem in re.findall(r"\]\((plots/[^)]+\.png)\)", markdown):
        assert (out / stem).read_bytes().startswith(b"\x89PNG")
    assert result.comparisons[0].verdict in markdown and result.comparisons[0].verdict.startswith("b - a macro-F1 = ")

    metrics = json.loads((out / "metrics.json").read_text())
    a = metrics["models"][0]
    gold = pd.DataFrame([(q, p, label) for (q, p), label in world.gold.items()], columns=["query_id", "product_id", "gold"])
    joined = gold.merge(models["a"].select(["query_id", "product_id", "label"]).to_pandas(), how="inner")
    assert a["n_gold_pairs"] == len(gold) and a["n_covered"] == len(gold) - 6
    assert a["n_predictions_without_gold"] == 2
    assert a["metrics"]["accuracy"]["estimate"] == pytest.approx(skm.accuracy_score(joined["gold"], joined["label"]))
    assert a["metrics"]["macro_f1"]["estimate"] == pytest.approx(
        skm.f1_score(joined["gold"], joined["label"], average="macro")
    )
    assert a["metrics"]["coverage_adjusted_accuracy"]["estimate"] == pytest.approx(
        (joined["gold"] == joined["label"]).sum() / len(gold)
    )
    for name, weights in (("kappa", None), ("kappa_linear", "linear"), ("kappa_quadratic", "quadratic")):
        expected = skm.cohen_kappa_score(joined["gold"], joined["label"], labels=list(WANDS.names), weights=weights)
        assert a["metrics"][name]["estimate"] == pytest.approx(expected)
    low, high = a["metrics"]["accuracy"]["low"], a["metrics"]["accuracy"]["high"]
    assert low < a["metrics"]["accuracy"]["estimate"] < high
    assert a["node_names"] == ["qa", "ms"]
    segments = {(kind, name) for kind, name, _ in a["segments"]}
    assert segments == {("query segment", s) for s in ("head", "torso", "tail")} | {("product type", t) for t in ("sofa", "lamp")}
    assert metrics["comparisons"][0]["mcnemar"]["only_a"] + metrics["comparisons"][0]["mcnemar"]["only_b"] > 0


def test_judgments_as_a_model_and_a_single_parquet_file(world, tmp_path):
    # the demo's first evaluation: noisy human ratings (as one-hot predictions) against gold
    rng = np.random.default_rng(0)
    flipped = [label if rng.random() < 0.8 else "Irrelevant" for label in world.judgments["label"].to_pylist()]
    humans = world.judgments.set_column(2, "label", pa.array(flipped))
    table = predictions_from_judgments(humans, WANDS, model_name="humans", queries=world.queries)
    pq.write_table(table, tmp_path / "humans.parquet")
    pq.write_table(world.judgments, tmp_path / "judgments.parquet")
    result = run(EvaluateConfig(predictions={"humans": str(tmp_path / "humans.parquet")},
                                gold=str(tmp_path / "judgments.parquet"), n_bootstrap=100, out=str(tmp_path / "out")))
    model = result.models[0]
    agree = np.mean(np.array(flipped) == np.array(world.judgments["label"].to_pylist()))
    assert model.metrics["accuracy"].estimate == pytest.approx(agree)
    # one-hot probabilities: confidence is always 1, so ECE = 1 - accuracy
    assert model.metrics["ece"].estimate == pytest.approx(1 - agree)
    assert not result.comparisons and model.segments == ()
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"gold": "g"}, "predictions: give at least one model"),
        ({"predictions": {"a": "p"}}, "gold: give the JUDGMENTS table"),
        ({"predictions": {"a": "p"}, "gold_source": "nodes"}, "gold_nodes: gold_source=nodes reads"),
        ({"predictions": {"a": "p"}, "gold": "g", "k": 0}, "k: NDCG@k needs k >= 1"),
        ({"predictions": {"a": "p"}, "gold": "g", "level": 95}, "level: a confidence level"),
        ({"predictions": {"a": "p"}, "gold": "g", "label_set": "trec"}, "label_set: unknown label set 'trec'"),
    ],
)
def test_config_errors_say_how_to_fix(values, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**values)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown keys \['bootstrap'\]"):
        load_config(EvaluateConfig, overrides=["predictions.a=x", "gold=y", "bootstrap=10"])


def test_gold_from_nodes_rates_the_noisy_rater_against_noise_free_gold(written, world, tmp_path):
    # the synthetic world's situation: noisy judgments, noise-free gold in gold_nodes
    root, _ = written
    rng = np.random.default_rng(1)
    noisy = [label if rng.random() < 0.7 else "Partial" for label in world.judgments["label"].to_pylist()]
    rater = predictions_from_judgments(world.judgments.set_column(2, "label", pa.array(noisy)), WANDS, "rater")
    storage.write_table(RELEVANCE, rater, tmp_path / "rater")
    out = tmp_path / "out"
    config = load_config(EvaluateConfig, overrides=[
        f"predictions.rater={tmp_path / 'rater'}", "gold_source=nodes", f"gold_nodes={root}", "n_bootstrap=50", f"out={out}",
    ])
    result = run(config)
    expected = np.mean(np.array(noisy) == np.array(world.judgments["label"].to_pylist()))
    assert result.models[0].metrics["accuracy"].estimate == pytest.approx(expected)
    assert result.gold.annotators == ("gold_nodes",)


def test_gold_labels_from_nodes_use_the_rule_without_y():
    nodes = pa.Table.from_pylist([
        {"query_id": "q", "product_id": "a", "nodes": [("ms", "match"), ("ma", "none")]},
        {"query_id": "q", "product_id": "b", "nodes": [("ms", "related"), ("ma", "mismatch")]},
        {"query_id": "q", "product_id": "c", "nodes": [("ms", "match"), ("ma", "none"), ("y", "Partial")]},
    ], schema=GOLD_NODES.arrow_schema())
    table = judgments_from_gold_nodes(nodes, WANDS, ReasoningGraph.load("relevance7"))
    assert table["label"].to_pylist() == ["Exact", "Irrelevant", "Partial"]  # y wins where present
