"""Agreement metrics against statsmodels' inter-rater module and the `krippendorff` package (their
documented examples and seeded random tables), hand-worked cases, and the bootstrap statistic."""

from __future__ import annotations

import json

import krippendorff
import numpy as np
import pyarrow as pa
import pytest
from eval_world import WANDS, make_predictions
from statsmodels.stats.inter_rater import cohens_kappa, fleiss_kappa

from evaluation import agreement as A
from evaluation.bootstrap import resample_weights
from evaluation.evaluate import evaluate, model_statistic, query_stats
from evaluation.inputs import ScoredPairs
from evaluation.report import write_reports
from schemas.graph import ReasoningGraph
from schemas.tables import JUDGMENTS

SEEDS = [0, 1, 2, 3]
STATSMODELS_WEIGHTS = {"none": None, "linear": "linear", "quadratic": "quadratic"}

# Hand-worked 3-label table (rows rater A, columns rater B, labels in order E, P, I), n = 10:
#   [[3, 1, 0],      row sums 4, 3, 3; column sums 4, 3, 3
#    [1, 1, 1],
#    [0, 1, 2]]
# unweighted: p_o = 6/10, p_e = (16 + 9 + 9)/100 = 0.34, kappa = 0.26/0.66 = 13/33
# linear (w = |i-j|/2): observed sum(wT)/n = 4 x 0.5 / 10 = 0.2; expected sum(w r c')/n^2 = (4.2 x 0.5 + 2.4 x 1)/10
#   = 0.45 (cells one step apart 1.2 + 1.2 + 0.9 + 0.9 = 4.2, two steps 1.2 + 1.2 = 2.4); kappa = 1 - 0.2/0.45 = 5/9
# quadratic (w = ((i-j)/2)^2): observed 4 x 0.25 / 10 = 0.1; expected (4.2 x 0.25 + 2.4)/10 = 0.345; kappa = 49/69
# one-vs-rest E: both E 3, only A 1, only B 1, neither 5: p_o = 0.8, p_e = (16 + 36)/100 = 0.52, kappa = 0.28/0.48 = 7/12
# alpha: coincidences O = T + T' = [[6, 2, 0], [2, 2, 2], [0, 2, 4]], n = 20, marginals 8, 6, 6
#   nominal: sum(O D) = 8 (off the diagonal), sum(n_c n_k D) = 400 - 136 = 264; alpha = 1 - 19 x 8/264 = 14/33
#   ordinal: mid-ranks (cumsum - n_c/2) 4, 11, 17 -> D = 49 (E,P), 36 (P,I), 169 (E,I);
#   sum(O D) = 2 (2 x 49 + 2 x 36) = 340, sum(n_c n_k D) = 2 (8 x 6 x 49 + 6 x 6 x 36 + 8 x 6 x 169) = 23520;
#   alpha = 1 - 19 x 340/23520 = 853/1176
HAND_TABLE = np.array([[3, 1, 0], [1, 1, 1], [0, 1, 2]])


def test_hand_worked_table():
    scores = A.agreement_scores(HAND_TABLE)
    assert scores["kappa"] == pytest.approx(13 / 33)
    assert scores["kappa_linear"] == pytest.approx(5 / 9)
    assert scores["kappa_quadratic"] == pytest.approx(49 / 69)
    assert scores["class_kappa"][0] == pytest.approx(7 / 12)
    assert scores["alpha_nominal"] == pytest.approx(14 / 33)
    assert scores["alpha_ordinal"] == pytest.approx(853 / 1176)


def test_cohens_kappa_two_by_two_textbook_example():
    # the 50 grant proposals of Wikipedia's "Cohen's kappa": yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> 0.4
    table = np.array([[20, 5], [10, 15]])
    assert A.cohens_kappa(table) == pytest.approx(0.4)
    assert cohens_kappa(table, return_results=False) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_kappa_matches_statsmodels(seed, n_classes):
    table = np.random.default_rng(seed).integers(0, 30, (n_classes, n_classes))
    for kind, wt in STATSMODELS_WEIGHTS.items():
        assert A.cohens_kappa(table, kind) == pytest.approx(cohens_kappa(table, wt=wt, return_results=False))
    for label in range(n_classes):  # one-vs-rest: statsmodels on the 2x2 table of "label or not"
        mine = np.arange(n_classes) == label
        binary = np.array([[table[np.ix_(a, b)].sum() for b in (mine, ~mine)] for a in (mine, ~mine)])
        assert A.class_kappa(table)[label] == pytest.approx(cohens_kappa(binary, return_results=False))


def test_batched_kappa_equals_one_at_a_time():
    tables = np.random.default_rng(7).integers(0, 20, (5, 2, 3, 3))
    for kind in ("none", "linear", "quadratic"):
        batched = A.cohens_kappa(tables, kind)
        assert batched.shape == (5, 2)
        expected = [[cohens_kappa(t, wt=STATSMODELS_WEIGHTS[kind], return_results=False) for t in row] for row in tables]
        np.testing.assert_allclose(batched, expected)


def test_undefined_agreement_is_nan():
    constant = np.array([[5, 0, 0], [0, 0, 0], [0, 0, 0]])  # both raters always say the first label
    scores = A.agreement_scores(constant)
    assert np.isnan(scores["kappa"]) and np.isnan(scores["alpha_nominal"]) and np.isnan(scores["alpha_ordinal"])
    assert np.isnan(A.agreement_scores(np.zeros((3, 3)))["kappa_linear"])
    # a constant predictor against varied gold: chance-level, kappa 0 (not undefined)
    assert A.cohens_kappa(np.array([[4, 0, 0], [3, 0, 0], [3, 0, 0]])) == pytest.approx(0.0)


# krippendorff.alpha's documented examples: Krippendorff's own (3 coders, 15 units, missing values) and the
# 4-coder ordinal example with values 1..5
KRIPPENDORFF_NOMINAL = [
    [np.nan, np.nan, np.nan, np.nan, np.nan, 3, 4, 1, 2, 1, 1, 3, 3, np.nan, 3],
    [1, np.nan, 2, 1, 3, 3, 4, 3, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan],
    [np.nan, np.nan, 2, 1, 3, 4, 4, np.nan, 2, 1, 1, 3, 3, np.nan, 4],
]
KRIPPENDORFF_ORDINAL = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
]


def value_counts(reliability_data, values) -> np.ndarray:
    """(units, values) counts of coders per value from a (coders, units) matrix with NaN for missing."""
    data = np.asarray(reliability_data, float)
    return (data.T[..., None] == np.asarray(values, float)).sum(axis=1)


def test_alpha_documented_examples():
    nominal = A.coincidences(value_counts(KRIPPENDORFF_NOMINAL, [1, 2, 3, 4])).sum(axis=0)
    assert A.krippendorff_alpha(nominal, "nominal") == pytest.approx(0.691358, abs=1e-6)
    ordinal = A.coincidences(value_counts(KRIPPENDORFF_ORDINAL, [1, 2, 3, 4, 5])).sum(axis=0)
    assert A.krippendorff_alpha(ordinal, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert A.krippendorff_alpha(ordinal, "ordinal") == pytest.approx(
        krippendorff.alpha(KRIPPENDORFF_ORDINAL, level_of_measurement="ordinal")
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_matches_krippendorff_on_units_with_missing_judgments(seed):
    rng = np.random.default_rng(seed)
    votes = rng.multinomial(1, [0.4, 0.3, 0.2, 0.1], size=(60, 4)).sum(axis=1) * (rng.random((60, 1)) < 0.9)
    votes[:5] = np.eye(4, dtype=int)[rng.integers(0, 4, 5)]  # units judged once: not pairable, no effect
    coincidence = A.coincidences(votes).sum(axis=0)
    for level in ("nominal", "ordinal"):
        assert A.krippendorff_alpha(coincidence, level) == pytest.approx(
            krippendorff.alpha(value_counts=votes, level_of_measurement=level)
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_two_rater_alpha_matches_krippendorff(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, 80)
    b = np.where(rng.random(80) < 0.6, a, rng.integers(0, 3, 80))
    table = np.zeros((3, 3))
    np.add.at(table, (a, b), 1)
    scores = A.agreement_scores(table)
    for level in ("nominal", "ordinal"):
        assert scores[f"alpha_{level}"] == pytest.approx(
            krippendorff.alpha(np.stack([a, b]).astype(float), value_domain=[0, 1, 2], level_of_measurement=level)
        )


def test_judges_kappa_is_fleiss_kappa_with_equal_judgments_per_pair():
    # Wikipedia's "Fleiss' kappa" example: 10 subjects, 14 raters, 5 categories -> 0.210
    table = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])
    coincidence = A.coincidences(table).sum(axis=0)
    assert A.cohens_kappa(coincidence) == pytest.approx(fleiss_kappa(table, method="fleiss"))
    assert A.cohens_kappa(coincidence) == pytest.approx(0.210, abs=5e-4)


def test_ceiling_puts_the_model_on_the_judges_footing():
    # three pairs judged twice: (E, E), (P, I), (I, I); a model saying E, P, I
    votes = np.array([[2, 0, 0], [0, 1, 1], [0, 0, 2]])
    label = np.array([0, 1, 2])
    model = A.against_votes(votes, label)
    np.testing.assert_array_equal(model.sum(axis=0), [[2, 0, 0], [0, 1, 0], [0, 1, 2]])  # judgments (rows) x model
    scores = A.ceiling_scores(A.coincidences(votes).sum(axis=0), model.sum(axis=0))
    # judges: coincidences [[2,0,0],[0,0,1],[0,1,2]], n = 6, p_o = 4/6, pooled marginals 2, 1, 3: p_e = 14/36
    assert scores["humans_kappa"] == pytest.approx((4 / 6 - 14 / 36) / (1 - 14 / 36))
    # model vs one judge: symmetric table [[4,0,0],[0,2,1],[0,1,4]], n = 12, p_o = 10/12, marginals 4, 3, 5: p_e = 50/144
    assert scores["vs_humans_kappa"] == pytest.approx((10 / 12 - 50 / 144) / (1 - 50 / 144))
    assert scores["vs_humans_kappa_gap"] == pytest.approx(scores["vs_humans_kappa"] - scores["humans_kappa"])


def pairs_with_votes(seed: int, n_queries: int = 20, per_query: int = 5) -> ScoredPairs:
    rng = np.random.default_rng(seed)
    n = n_queries * per_query
    gold = rng.integers(0, 3, n)
    judgments = 1 + 2 * (rng.random(n) < 0.4)  # 40% of the pairs judged three times
    noisy = np.where(rng.random((n, 3)) < 0.8, gold[:, None], rng.integers(0, 3, (n, 3)))
    votes = np.stack([np.bincount(row[:m], minlength=3) for row, m in zip(noisy, judgments)])
    label = np.where(rng.random(n) < 0.7, gold, rng.integers(0, 3, n))
    covered = rng.random(n) < 0.9
    probs = np.full((n, 3), 1 / 3)
    return ScoredPairs(
        query_id=np.array([f"q{i // per_query}" for i in range(n)], dtype=object),
        product_id=np.array([f"p{i}" for i in range(n)], dtype=object),
        gold=gold, covered=covered, label=np.where(covered, label, -1), probs=probs,
        expected_gain=probs @ np.array([1.0, 0.5, 0.0]), node_names=(), node_correct=np.zeros((n, 0)),
        node_missing=np.zeros((n, 0), bool), query_segment=np.full(n, "head", dtype=object),
        product_type=np.full(n, "sofa", dtype=object), votes=votes,
    )


def test_replicate_agreement_equals_the_libraries_on_the_resampled_pairs():
    """Slow reference: repeat each query's pairs by its draw count and ask statsmodels and krippendorff."""
    pairs = pairs_with_votes(seed=3)
    stats = query_stats(pairs, np.array([True, True, False]), np.array([1.0, 0.5, 0.0]), k=3)
    weights = next(resample_weights(stats.n_queries, 3, seed=2))
    fast = model_statistic(stats, np.array([True, True, False]))(weights)
    query_index = np.array([int(q[1:]) for q in pairs.query_id])
    for b, row in enumerate(weights):
        repeat = row[query_index].astype(int) * pairs.covered
        gold, label = np.repeat(pairs.gold, repeat), np.repeat(pairs.label, repeat)
        table = np.zeros((3, 3))
        np.add.at(table, (gold, label), 1)
        assert fast["kappa_quadratic"][b] == pytest.approx(cohens_kappa(table, wt="quadratic", return_results=False))
        reliability = np.stack([gold, label]).astype(float)
        assert fast["alpha_ordinal"][b] == pytest.approx(krippendorff.alpha(reliability, value_domain=[0, 1, 2], level_of_measurement="ordinal"))
        votes = np.repeat(pairs.votes, repeat, axis=0)
        several = votes.sum(axis=1) >= 2
        assert fast["humans_alpha_nominal"][b] == pytest.approx(
            krippendorff.alpha(value_counts=votes[several], level_of_measurement="nominal")
        )
        m = votes[several].sum(axis=1)
        assert (m == 3).all()  # equal judgments per pair: the judges' kappa is Fleiss' kappa
        assert fast["humans_kappa"][b] == pytest.approx(fleiss_kappa(votes[several], method="fleiss"))


def test_report_prints_the_judges_ceiling_beside_the_models(world, tmp_path):
    # a second judge on the even queries' pairs, moving every fifth label one step down the order
    rows = world.judgments.to_pylist()
    names = list(WANDS.names)
    second = [dict(row, annotator="judge_2", label=names[min(names.index(row["label"]) + (i % 5 == 0), 2)])
              for i, row in enumerate(rows) if int(row["query_id"][1:]) % 2 == 0]
    judgments = pa.Table.from_pylist(rows + second, schema=JUDGMENTS.arrow_schema())
    predictions = {"model": make_predictions(world.gold, seed=1, accuracy=0.7)}
    result = evaluate(predictions, judgments, WANDS, ReasoningGraph.load("relevance7"), queries=world.queries, n_bootstrap=50)

    votes = np.array([[names.index(row["label"]), names.index(other["label"])] for row, other in zip(
        [row for row in rows if int(row["query_id"][1:]) % 2 == 0], second)])
    counts = np.stack([np.bincount(pair, minlength=3) for pair in votes])
    assert result.majority.n_several_judged == len(second) == result.models[0].n_several_judged
    assert result.humans["humans_kappa"].estimate == pytest.approx(fleiss_kappa(counts, method="fleiss"))
    assert result.humans["humans_alpha_ordinal"].estimate == pytest.approx(
        krippendorff.alpha(votes.T.astype(float), value_domain=[0, 1, 2], level_of_measurement="ordinal"))
    assert result.majority.metrics["kappa"].estimate == pytest.approx(0.0)  # the chance floor

    write_reports(result, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<th>judges among themselves (ceiling)</th>" in page and "Against the judges, on the pairs judged several times" in page
    assert f"{len(second)} gold pairs judged several times" in page
    segments = {name: s for _, name, s in result.models[0].segments}  # head/torso/tail: queries q % 3
    assert segments["head"].n_several_judged == sum(int(row["query_id"][1:]) % 6 == 0 for row in second)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "### Agreement by segment" in markdown and "| judges' κ (ceiling) |" in markdown
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["humans"]["humans_kappa"]["estimate"] == pytest.approx(result.humans["humans_kappa"].estimate)
    assert "vs_humans_kappa_gap" in document["models"][0]["metrics"]

    alone = evaluate(predictions, world.judgments, WANDS, ReasoningGraph.load("relevance7"), n_bootstrap=20)
    assert alone.humans == {} and "humans_kappa" not in alone.models[0].metrics
    write_reports(alone, tmp_path / "alone")
    page = (tmp_path / "alone" / "report.html").read_text(encoding="utf-8")
    assert "No gold pair has several judgments" in page and "ceiling)</th>" not in page.split("Per label: one-vs-rest")[0]
