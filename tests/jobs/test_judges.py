"""The ranker ladder, the experiment series and `relevance rankers` / `relevance judge-report` end to end on a tiny world."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from evaluation.inputs import predictions_from_judgments
from evaluation.rankers import LabelSource, evaluate_rankers, labels_from_gold_nodes, lists_from_ranked
from jobs.cli import app
from jobs.world.config import WorldConfig
from jobs.world.generate import generate_experiment_series, generate_world
from jobs.world.ladder import LadderConfig, make_ladder, subject_gains
from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import read_table, write_table
from schemas.tables import GOLD_NODES, JUDGMENTS, RANKED_LISTS, RELEVANCE

runner = CliRunner()
TINY = {"n_impressions": 20_000, "n_users": 1_000}


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig.tests(**TINY))


@pytest.fixture(scope="module")
def gold(world):
    return labels_from_gold_nodes(world.gold_nodes, LabelSet.load("wands"), ReasoningGraph.load("relevance7"))


def test_the_ladder_order_is_recovered_exactly_under_gold(world, gold):
    config = LadderConfig(n_queries=150, seed=1)
    subject = subject_gains(world.gold_nodes, LabelSet.load("wands"))
    ranked = make_ladder(gold.pairs[["query_id", "product_id", "gain"]].merge(subject, on=["query_id", "product_id"]), config).to_pandas()
    assert ranked["query_id"].nunique() == 150
    assert (ranked.groupby(["ranker", "query_id"]).size() == config.k).all()
    assert config.rankers == [*config.graded, "subject_0", "subject_0.3"]
    result = evaluate_rankers(lists_from_ranked(ranked), gold, k=config.k, n_bootstrap=20, rankers=config.rankers)
    ndcg = result.estimates("ndcg")
    assert sorted(config.graded, key=lambda rung: -ndcg[rung]) == config.graded
    assert ndcg["noise_0"] == pytest.approx(1.0)  # noise 0 is the gold order itself
    assert ndcg["subject_0"] < 1.0  # ignoring attributes costs under gold ...
    subject_labels = LabelSource("subject", subject.rename(columns={"subject_gain": "gain"}).assign(label="", relevant=0.0))
    assert evaluate_rankers(lists_from_ranked(ranked), subject_labels, k=config.k, n_bootstrap=20).estimates()["subject_0"] == 1.0  # ... not under its own
    assert min(scores.coverage for scores in result.rankers) == 1.0  # the ladder ranks judged products only


def test_experiment_series_shares_the_world_and_varies_the_treatment(world):
    series = generate_experiment_series(WorldConfig.tests(**TINY), (0.8, 0.1))
    assert [manifest["experiment"]["experiment_id"] for manifest, _ in series] == ["ranker_v2_t0.8", "ranker_v2_t0.1"]
    assert [manifest["config"]["experiment"]["treatment_noise"] for manifest, _ in series] == [0.8, 0.1]
    assert all(manifest["rows"]["catalog"] == world.catalog.num_rows for manifest, _ in series)
    (_, first), (_, second) = series
    assert first["search_impressions"].num_rows == world.search_impressions.num_rows
    assert not first["experiment_events"].equals(second["experiment_events"])  # independent samples
    assert set(pc.unique(first["experiment_assignment"]["experiment_id"]).to_pylist()) == {"ranker_v2_t0.8"}


def test_rankers_and_judge_report_end_to_end(tmp_path):
    world = tmp_path / "world"
    generated = runner.invoke(app, ["generate", "--out", str(world), "--preset", "tests", "--set", "world.n_impressions=20000",
                                    "--set", "world.n_users=1000", "--set", "experiment_series=[0.9,0.1]"])
    assert generated.exit_code == 0, generated.output
    judged = runner.invoke(app, ["rankers", "--logs", str(world), "--labels", "gold", "--label-path", str(world), "--out",
                                 str(tmp_path / "rankers"), "--set", "n_bootstrap=50"])
    assert judged.exit_code == 0, judged.output
    rankers = json.loads((tmp_path / "rankers" / "rankers.json").read_text())
    assert [r["ranker"] for r in rankers["rankers"]] == ["control", "treatment"]
    assert all(0 < r["coverage"] < 1 and r["judged"] < r["shown"] for r in rankers["rankers"])  # logs show unjudged products
    assert rankers["logged_requests"]["requests judged"] < rankers["logged_requests"]["requests"]

    # a relevance table of the human labels on half the queries: kappa 1 with human, coverage partial on the logs
    judgments = read_table(JUDGMENTS, world)
    queries = sorted(set(judgments["query_id"].to_pylist()))[::2]
    half = judgments.filter(pc.is_in(judgments["query_id"], pa.array(queries)))
    rater_table = predictions_from_judgments(half, LabelSet.load("wands"), model_name="rater_table")
    write_table(RELEVANCE, rater_table, tmp_path / "table")
    elsewhere = rater_table.set_column(1, "query_id", pc.binary_join_element_wise("elsewhere-", rater_table["query_id"], ""))
    write_table(RELEVANCE, elsewhere, tmp_path / "elsewhere")  # labels no query of the world: judged nowhere, said so
    report = runner.invoke(app, ["judge-report", "--world", str(world), "--source", f"rater_table={tmp_path / 'table'}",
                                 "--source", f"elsewhere={tmp_path / 'elsewhere'}",
                                 "--out", str(tmp_path / "judge"), "--set", "n_bootstrap=30", "--set", "ladder.n_queries=60"])
    assert report.exit_code == 0, report.output
    result = json.loads((tmp_path / "judge" / "judge_report.json").read_text())
    agreement = result["agreement"]
    assert agreement["rater_table"]["vs_human"]["kappa"] == pytest.approx(1.0)
    assert agreement["rater_table"]["vs_gold"]["kappa"] == pytest.approx(agreement["human"]["vs_gold"]["kappa"], abs=0.05)
    assert result["ladder"]["sources"]["human"]["neighbours_told_apart"] <= len(result["ladder"]["rankers"]) - 1
    assert not result["ladder"]["common_queries"] and "no query has every metric" in result["ladder"]["sources"]["elsewhere"]["note"]
    assert result["offline_online"]["across"]["elsewhere"]["ctr"]["experiments"] == 0
    assert result["ladder"]["queries"] == 60 and set(result["ladder"]["sources"]) == {"human", "gold", "rater_table", "elsewhere"}
    assert result["ladder"]["gold_recovers_construction_order"] and result["ladder"]["sources"]["gold"]["tau"] == pytest.approx(1.0)
    experiments = result["offline_online"]["experiments"]
    assert [e["experiment_id"] for e in experiments] == ["ranker_v2", "ranker_v2_t0.1", "ranker_v2_t0.9"]
    worse = experiments[2]["offline_ndcg_difference"]["gold"]
    assert worse["high"] < 0  # a noisier treatment ranker is worse offline
    assert np.isfinite(experiments[0]["online"]["ctr"]["effect"])
    assert (tmp_path / "judge" / "judge_report.html").read_text().count("data:image/png;base64") == 2
    ladder = runner.invoke(app, ["rankers", "--lists", str(tmp_path / "judge"), "--labels", "judgments", "--label-path", str(world),
                                 "--out", str(tmp_path / "ladder"), "--set", "n_bootstrap=20"])
    assert ladder.exit_code == 0, ladder.output
    assert len(json.loads((tmp_path / "ladder" / "rankers.json").read_text())["rankers"]) == 10


def test_rankers_refuses_a_list_with_a_repeated_rank(tmp_path):
    rows = pa.table({"query_id": ["q1", "q1"], "ranker": ["A", "A"], "rank": pa.array([1, 1], pa.int32()), "product_id": ["a", "b"]})
    write_table(RANKED_LISTS, rows, tmp_path)
    write_table(GOLD_NODES, pa.table({"query_id": ["q1"], "product_id": ["a"], "nodes": pa.array([[("y", "Exact")]], pa.map_(pa.string(), pa.string()))}),
                tmp_path)
    result = runner.invoke(app, ["rankers", "--lists", str(tmp_path), "--labels", "gold", "--label-path", str(tmp_path), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "rows [1, 2]" in result.output and "each rank of a list holds one product" in result.output
