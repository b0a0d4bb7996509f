"""Reading, checking and joining inputs: bad input gives clear errors; nothing is dropped silently."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from eval_world import WANDS, make_predictions

from evaluation.evaluate import evaluate_model
from evaluation.inputs import (
    EvaluationInputError,
    build_context,
    gold_from_judgments,
    join,
    majority_labels,
    predictions_from_judgments,
    predictions_from_table,
    read_input,
    rows_on_pairs,
)
from schemas import storage
from schemas.graph import LabelSet, ReasoningGraph
from schemas.tables import JUDGMENTS, RELEVANCE

GRAPH = ReasoningGraph.load("relevance7")


def set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))


def judgment_rows(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"query_id": q, "product_id": p, "label": label, "label_set": "wands", "annotator": a, "is_weak": a.startswith("weak")}
         for q, p, label, a in rows],
        schema=JUDGMENTS.arrow_schema(),
    )


def test_majority_vote_with_ties_to_the_lower_gain_label():
    frame = judgment_rows([
        ("q", "a", "Exact", "h1"), ("q", "a", "Exact", "h2"), ("q", "a", "Partial", "h3"),  # Exact 2:1
        ("q", "b", "Exact", "h1"), ("q", "b", "Irrelevant", "h2"),  # tie -> Irrelevant (gain 0)
        ("q", "c", "Partial", "h1"),
    ]).to_pandas()
    result = majority_labels(frame, WANDS).set_index("product_id")
    assert result["label"].to_dict() == {"a": "Exact", "b": "Irrelevant", "c": "Partial"}
    assert result["n_judgments"].to_dict() == {"a": 3, "b": 2, "c": 1}
    assert result["tied"].to_dict() == {"a": False, "b": True, "c": False}


def test_gold_choice_of_annotators_and_weak_labels():
    judgments = judgment_rows([("q", "a", "Exact", "gold"), ("q", "a", "Irrelevant", "h1"), ("q", "b", "Partial", "weak:click")])
    assert len(gold_from_judgments(judgments, WANDS).pairs) == 1  # weak left out by default
    assert len(gold_from_judgments(judgments, WANDS, include_weak=True).pairs) == 2
    gold = gold_from_judgments(judgments, WANDS, annotators=("gold",))
    assert gold.pairs["label"].tolist() == [0] and gold.annotators == ("gold",)
    with pytest.raises(EvaluationInputError, match=r"no judgments left.*\('h1', False\): 1"):
        gold_from_judgments(judgments, WANDS, annotators=("nobody",))


def test_unknown_labels_are_listed_with_counts(world):
    judgments = set_column(world.judgments, "label", ["Great"] * 3 + ["Meh"] + world.judgments["label"].to_pylist()[4:])
    with pytest.raises(EvaluationInputError, match=r"gold labels not in label set 'wands'.*'Great': 3, 'Meh': 1"):
        gold_from_judgments(judgments, WANDS, source="judgments.parquet")
    predictions = make_predictions(world.gold, seed=0, accuracy=0.7)
    bad = set_column(predictions, "label", ["E"] * 2 + predictions["label"].to_pylist()[2:])
    with pytest.raises(EvaluationInputError, match=r"preds.parquet: predicted labels not in .*'E': 2"):
        predictions_from_table("m", bad, WANDS, "preds.parquet")
    probs = predictions["label_probs"].to_pylist()
    probs[0] = [("Exact", 0.5), ("Relevant", 0.5)]
    with pytest.raises(EvaluationInputError, match=r"label_probs keys not in .*'Relevant': 1"):
        predictions_from_table("m", set_column(predictions, "label_probs", probs), WANDS, "preds")


def test_duplicate_pairs_and_judgments_name_examples(world):
    predictions = make_predictions(world.gold, seed=0, accuracy=0.7)
    doubled = pa.concat_tables([predictions, predictions.slice(0, 2)])
    with pytest.raises(EvaluationInputError, match=r"2 \('query_id', 'product_id'\) keys occur more than once, e\.g\. \('q0', 'p0_0'\)"):
        predictions_from_table("m", doubled, WANDS, "preds")
    with pytest.raises(EvaluationInputError, match=r"'annotator'\) keys occur more than once"):
        gold_from_judgments(pa.concat_tables([world.judgments, world.judgments.slice(5, 1)]), WANDS)


def test_other_bad_predictions(world):
    predictions = make_predictions(world.gold, seed=0, accuracy=0.7)
    with pytest.raises(EvaluationInputError, match="label_set must be 'esci'"):
        predictions_from_table("m", predictions, LabelSet.load("esci"), "preds")
    probs = predictions["label_probs"].to_pylist()
    probs[3] = [("Exact", 0.5), ("Partial", 0.2)]
    probs[5] = [("Exact", 1.5), ("Partial", -0.5)]
    with pytest.raises(EvaluationInputError, match=r"2 rows are not probabilities.*rows \[4, 6\] \('q0', 'p0_3'\)"):
        predictions_from_table("m", set_column(predictions, "label_probs", probs), WANDS, "preds")
    no_query = set_column(predictions, "query_id", [None] + predictions["query_id"].to_pylist()[1:])
    with pytest.raises(EvaluationInputError, match=r"1 rows have no query_id \(rows \[1\]\)"):
        predictions_from_table("m", no_query, WANDS, "preds")


def test_read_input_layouts_and_errors(world, tmp_path):
    predictions = make_predictions(world.gold, seed=0, accuracy=0.7)
    root = tmp_path / "data"
    storage.write_table(RELEVANCE, predictions, root)
    columns = ["query_id", "product_id", "label"]
    for path in (root, root / "relevance"):  # a data root and the table's folder
        assert read_input(RELEVANCE, path, columns).num_rows == predictions.num_rows
    single = tmp_path / "one.parquet"
    pq.write_table(predictions.drop_columns(["ds"]), single)
    assert read_input(RELEVANCE, single, columns).num_rows == predictions.num_rows
    with pytest.raises(EvaluationInputError, match=r"not a 'relevance' table"):
        read_input(RELEVANCE, tmp_path / "nowhere", columns)
    pq.write_table(predictions.drop_columns(["label_probs"]), tmp_path / "lacking.parquet")
    with pytest.raises(EvaluationInputError, match=r"lacking.parquet: missing columns \['label_probs'\]"):
        read_input(RELEVANCE, tmp_path / "lacking.parquet", ["label", "label_probs"])
    nulls = pa.table({"query_id": ["q0", "q0"], "product_id": ["p0_0", "p0_1"], "label": [None, "Exact"]})
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    with pytest.raises(EvaluationInputError, match=r"column 'label' of 'relevance' has 1 null values"):
        read_input(RELEVANCE, tmp_path / "nulls.parquet", columns)


def test_join_counts_uncovered_and_unmatched_and_compares_nodes(world):
    gold = gold_from_judgments(world.judgments, WANDS)
    predictions = make_predictions(world.gold, seed=3, accuracy=0.7, drop=4, extra=2)
    context = build_context(GRAPH, world.gold_nodes, world.queries, world.catalog)
    pairs, n_without_gold = join(gold, predictions_from_table("m", predictions, WANDS, "preds"), context, GRAPH)
    assert n_without_gold == 2
    assert len(pairs.gold) == len(world.gold) and int((~pairs.covered).sum()) == 4
    assert (pairs.label[~pairs.covered] == -1).all() and np.isnan(pairs.probs[~pairs.covered]).all()
    assert context.node_names == ("qa", "ms")  # graph order; the label node y is left out
    table = predictions.to_pandas().set_index(["query_id", "product_id"])
    for i in np.flatnonzero(pairs.covered)[:40]:
        row = table.loc[(pairs.query_id[i], pairs.product_id[i])]
        decided = dict(row["node_decisions"])
        assert WANDS.names[pairs.label[i]] == row["label"]
        assert pairs.node_correct[i, 1] == float(decided["ms"] == {"Exact": "match", "Partial": "related", "Irrelevant": "mismatch"}[world.gold[(pairs.query_id[i], pairs.product_id[i])]])
        # 'size=L;color=Red' matches gold 'color=red; size=l' after facet normalisation
        assert pairs.node_correct[i, 0] == float("qa" in decided)
        assert pairs.node_missing[i, 0] == ("qa" not in decided)
    assert set(pairs.query_segment) == {"head", "torso", "tail"} and set(pairs.product_type) == {"sofa", "lamp"}


def test_predictions_from_judgments_are_one_hot(world):
    humans = judgment_rows([("q0", "p0_0", "Partial", "h1"), ("q0", "p0_0", "Partial", "h2"), ("q0", "p0_1", "Exact", "h1")])
    table = predictions_from_judgments(humans, WANDS, model_name="humans", queries=world.queries)
    assert table.schema == RELEVANCE.arrow_schema()
    rows = {row["product_id"]: row for row in table.to_pylist()}
    assert rows["p0_0"]["label"] == "Partial" and rows["p0_0"]["query"] == "query 0"
    assert dict(rows["p0_0"]["label_probs"]) == {"Exact": 0.0, "Partial": 1.0, "Irrelevant": 0.0}
    assert rows["p0_0"]["expected_gain"] == 0.5 and rows["p0_1"]["expected_gain"] == 1.0
    assert pc.all(pc.equal(table["model_name"], "humans")).as_py()
    assert predictions_from_table("humans", table, WANDS, "humans").probs.sum() == 2.0


def test_predictions_matching_no_gold_pair_are_an_error(world):
    gold = gold_from_judgments(world.judgments, WANDS, source="judgments.parquet")
    predictions = make_predictions(world.gold, seed=0, accuracy=0.7)
    shifted = set_column(predictions, "query_id", [f"Q-{q}" for q in predictions["query_id"].to_pylist()])
    context = build_context(GRAPH)
    with pytest.raises(EvaluationInputError, match=r"none of the 240 predictions of 'm' matches a gold .* like \('Q-q0', 'p0_0'\)"):
        join(gold, predictions_from_table("m", shifted, WANDS, "preds"), context, GRAPH)


def test_a_segment_without_covered_pairs_gives_undefined_metrics_not_a_crash(world):
    gold = gold_from_judgments(world.judgments, WANDS)
    only_head = make_predictions({k: v for k, v in world.gold.items() if int(k[0][1:]) % 3 == 0}, seed=0, accuracy=0.7)
    context = build_context(GRAPH, queries=world.queries)
    pairs, _ = join(gold, predictions_from_table("m", only_head, WANDS, "preds"), context, GRAPH)
    model = evaluate_model("m", pairs, 0, WANDS, k=10, n_bootstrap=50, seed=0, level=0.95)
    tail = {name: s for kind, name, s in model.segments}["tail"]
    assert tail.n_covered == 0 and tail.metrics["coverage"].estimate == 0.0
    assert np.isnan(tail.metrics["accuracy"].estimate) and np.isnan(tail.metrics["roc_auc"].estimate)


def test_rows_on_pairs_keeps_exactly_the_labelled_pairs_in_table_order():
    judgments = judgment_rows([("q1", "p1", "Exact", "h1"), ("q1", "p2", "Partial", "h1"), ("q2", "p1", "Irrelevant", "h1"),
                               ("q1", "p1", "Partial", "h2")])
    labelled = pa.table({"query_id": ["q1", "q2", "q9"], "product_id": ["p1", "p2", "p1"]})  # (q2, p2) and (q9, p1): no judgment

    kept = rows_on_pairs(judgments, labelled)

    assert kept.schema == judgments.schema
    assert list(zip(kept["query_id"].to_pylist(), kept["product_id"].to_pylist(), kept["annotator"].to_pylist())) == [
        ("q1", "p1", "h1"), ("q1", "p1", "h2")]
    assert rows_on_pairs(judgments, labelled.slice(0, 0)).num_rows == 0
