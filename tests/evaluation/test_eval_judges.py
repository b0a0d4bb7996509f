"""`relevance judges combine`: hand-worked combinations, refused mismatches, the combined table read back with its
schema, and each judge's agreement against sklearn and statsmodels on the written labels."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from eval_world import WANDS, make_predictions
from sklearn import metrics as skm
from statsmodels.stats.inter_rater import fleiss_kappa
from typer.testing import CliRunner

from evaluation.inputs import EvaluationInputError
from evaluation.judges import CombineConfig, align, combine, run, top_label
from jobs.cli import app
from schemas import storage
from schemas.config import ConfigError, load_config
from schemas.tables import JUDGMENTS, RELEVANCE

GAINS = np.array([1.0, 0.5, 0.0])  # Exact, Partial, Irrelevant


def test_ties_go_to_the_lower_gain():
    scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.7, 0.2]])
    np.testing.assert_array_equal(top_label(scores, GAINS), [1, 2, 2, 1])
    # averaged probabilities that tie up to float rounding are still a tie
    np.testing.assert_array_equal(top_label(np.array([[0.1 + 0.2, 0.3, 0.4 - 0.4]]), GAINS), [1])


def test_mean_and_majority_by_hand():
    # two pairs, three judges: labels (E, P, P) and (E, P, I); probabilities of the first pair
    # (0.9, 0.1, 0), (0.3, 0.6, 0.1), (0.4, 0.5, 0.1) -> mean (1.6/3, 1.2/3, 0.2/3): Exact, though two judges say Partial
    labels = np.array([[0, 0], [1, 1], [1, 2]])
    probs = np.array([
        [[0.9, 0.1, 0.0], [0.8, 0.1, 0.1]],
        [[0.3, 0.6, 0.1], [0.2, 0.7, 0.1]],
        [[0.4, 0.5, 0.1], [0.1, 0.2, 0.7]],
    ])
    label, combined = combine(labels, probs, GAINS, "mean")
    np.testing.assert_allclose(combined[0], [1.6 / 3, 1.2 / 3, 0.2 / 3])
    np.testing.assert_array_equal(label, [0, 0])  # second pair: mean (1.1, 1.0, 0.9)/3 -> Exact
    label, combined = combine(labels, probs, GAINS, "majority")
    np.testing.assert_allclose(combined, [[1 / 3, 2 / 3, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_array_equal(label, [1, 2])  # a three-way tie goes to Irrelevant, the lowest gain


def judges(world, drop: int = 0) -> dict[str, pa.Table]:
    return {
        "a": make_predictions(world.gold, seed=21, accuracy=0.8, name="a"),
        "b": make_predictions(world.gold, seed=22, accuracy=0.7, name="b", drop=drop),
        "c": make_predictions(world.gold, seed=23, accuracy=0.5, name="c"),
    }


def test_mismatched_pairs_are_refused_or_counted(world):
    tables = judges(world, drop=3)
    sources = {name: f"{name}.parquet" for name in tables}
    with pytest.raises(EvaluationInputError, match=r"b.parquet: judge 'b' lacks 3 of the 240 pairs .*pairs=common"):
        align(tables, WANDS, sources, "same")
    judged = align(tables, WANDS, sources, "common")
    assert judged.left_out == {"a": 3, "b": 0, "c": 3} and len(judged.keys) == 237


def test_pairs_judged_on_different_product_text_are_refused(world):
    tables = judges(world)
    hashes = pa.array([f"h{i}" for i in range(tables["a"].num_rows)], pa.string())
    changed = pc.if_else(pa.array(np.arange(len(hashes)) == 4), pa.scalar("other"), hashes)
    column = tables["a"].schema.get_field_index("product_content_hash")
    tables["a"] = tables["a"].set_column(column, "product_content_hash", hashes)
    tables["b"] = tables["b"].set_column(column, "product_content_hash", changed)  # c has no hashes: not a conflict
    with pytest.raises(EvaluationInputError, match="1 pairs were judged on different product text"):
        align(tables, WANDS, {name: name for name in tables}, "same")


@pytest.mark.parametrize("method", ["mean", "majority"])
def test_combine_writes_a_relevance_table_and_agreement_from_independent_sources(world, tmp_path, method):
    tables = judges(world)
    for name, table in tables.items():
        storage.write_table(RELEVANCE, table, tmp_path / name)
    storage.write_table(JUDGMENTS, world.judgments, tmp_path / "gold")
    config = load_config(CombineConfig, overrides=[
        *(f"tables.{name}={tmp_path / name}" for name in tables), f"method={method}", f"gold={tmp_path / 'gold'}",
        "n_bootstrap=50", f"out={tmp_path / 'out'}",
    ])
    result = run(config)

    combined = storage.read_table(RELEVANCE, tmp_path / "out").to_pandas().sort_values(["query_id", "product_id"])
    assert len(combined) == 240 and set(combined["model_version"]) == {f"{method}:a+b+c"}
    frames = {name: table.to_pandas().sort_values(["query_id", "product_id"]) for name, table in tables.items()}
    names = list(WANDS.names)
    if method == "majority":  # by hand: the label two or three judges share, else Irrelevant (a tie of three)
        expected = []
        for row in zip(*(frame["label"] for frame in frames.values())):
            top = max(row, key=lambda label: (row.count(label), -WANDS.gains[label]))
            expected.append(top if row.count(top) > 1 else "Irrelevant")
        assert combined["label"].tolist() == expected
    else:  # the mean probability's argmax
        mean = sum(np.array([[dict(probs)[label] for label in names] for probs in frame["label_probs"]]) for frame in frames.values()) / 3
        assert combined["label"].tolist() == [names[i] for i in mean.argmax(axis=1)]
    gains = np.array([WANDS.gains[label] for label in names])
    probs = np.array([[dict(row)[label] for label in names] for row in combined["label_probs"]])
    np.testing.assert_allclose(combined["expected_gain"], probs @ gains)

    agreement = result.agreement
    for j, frame in enumerate(frames.values()):
        assert agreement["combination_kappa"].estimate[j] == pytest.approx(skm.cohen_kappa_score(combined["label"], frame["label"]))
        gold = [world.gold[key] for key in zip(frame["query_id"], frame["product_id"])]
        assert agreement["gold_kappa_quadratic"].estimate[j] == pytest.approx(
            skm.cohen_kappa_score(gold, frame["label"], labels=names, weights="quadratic"))
    gold = [world.gold[key] for key in zip(combined["query_id"], combined["product_id"])]
    assert agreement["gold_kappa"].estimate[3] == pytest.approx(skm.cohen_kappa_score(gold, combined["label"]))
    votes = np.stack([sum((frame["label"] == label).to_numpy(dtype=int) for frame in frames.values()) for label in names], axis=1)
    assert agreement["judges_kappa"].estimate == pytest.approx(fleiss_kappa(votes, method="fleiss"))
    if method == "majority":  # leave-one-out of judge c: a and b's majority, their disagreements to the lower gain
        a, b = frames["a"]["label"].to_numpy(), frames["b"]["label"].to_numpy()
        lower = np.where(gains[[names.index(x) for x in a]] <= gains[[names.index(x) for x in b]], a, b)
        assert agreement["others_kappa"].estimate[2] == pytest.approx(skm.cohen_kappa_score(lower, frames["c"]["label"]))
    assert agreement["others_kappa"].estimate[2] < agreement["others_kappa"].estimate[0]  # c, the worst, stands out

    document = json.loads((tmp_path / "out" / "judges.json").read_text())
    assert document["judges"] == ["a", "b", "c"] and document["n_gold_pairs"] == 240
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "κ vs the others" in page and "judges (the combination)" in page


def test_cli_combines_and_keeps_the_error_contract(world, tmp_path):
    tables = judges(world, drop=2)
    for name, table in tables.items():
        storage.write_table(RELEVANCE, table, tmp_path / name)
    runner = CliRunner()
    base = ["judges", "combine", "--table", f"a={tmp_path / 'a'}", "--table", f"b={tmp_path / 'b'}", "--set", "n_bootstrap=20"]
    mismatch = runner.invoke(app, [*base, "--out", str(tmp_path / "out")])
    assert mismatch.exit_code == 1 and "judge 'b' lacks 2" in mismatch.output
    done = runner.invoke(app, [*base, "--pairs", "common", "--method", "majority", "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert storage.read_table(RELEVANCE, tmp_path / "out").num_rows == 238
    one = runner.invoke(app, ["judges", "combine", "--table", f"a={tmp_path / 'a'}", "--out", str(tmp_path / "x")])
    assert one.exit_code == 2 and "two or more judges" in one.output


@pytest.mark.parametrize(("overrides", "message"), [
    (["tables.a=x"], "two or more judges"),
    (["tables.a=x", "tables.b=y", "method=median"], "method"),
    (["tables.a=x", "tables.b=y", "gold=g", "gold_nodes=n"], "one source of gold labels"),
])
def test_config_errors_say_how_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CombineConfig, overrides=overrides)


def test_pairwise_kappa_of_each_two_judges(world, tmp_path):
    tables = judges(world)
    for name, table in tables.items():
        storage.write_table(RELEVANCE, table, tmp_path / name)
    result = run(load_config(CombineConfig, overrides=[*(f"tables.{name}={tmp_path / name}" for name in tables), "n_bootstrap=20",
                                                       f"out={tmp_path / 'out'}"]))
    frames = [table.to_pandas().sort_values(["query_id", "product_id"])["label"] for table in tables.values()]
    pairwise = result.agreement["pairwise_kappa"].estimate
    assert pairwise.shape == (3, 3) and pairwise[0, 2] == pytest.approx(skm.cohen_kappa_score(frames[0], frames[2]))
    np.testing.assert_allclose(pairwise, pairwise.T)
    assert "Each two judges: Cohen's κ" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
