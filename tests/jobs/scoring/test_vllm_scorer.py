"""VLLMScorer against HFScorer on the same policy and pairs: the same label distribution (fast path, full
CoT, and after the reasoning in `reasoning_first`), every generated CoT following `cot_regex` and so
parsing strictly unless it repeats a facet key (which a regex cannot forbid, and this briefly trained
policy often does), the hf text wherever that text is itself well formed, and the reasoning kept for
exactly the sampled pairs. Skipped where vllm is not installed.

One engine serves the module (its start dominates the run time), and a second one, with the checked-decoding logits
processor, the checked-verdicts test (a relevance8 policy: its CoT writes attribute checks). The engine does not depend on the
reasoning mode or the CoT order, which `score` reads from the scorer's spec at each call, so the
tests score under other settings by swapping that spec (`scored`).
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

pytest.importorskip("vllm")

from jobs.scoring.backends import HFScorer  # noqa: E402
from jobs.scoring.spec import ScorerSpec, scorer_version  # noqa: E402
from schemas.graph import ReasoningGraph  # noqa: E402
from schemas.tables import RELEVANCE  # noqa: E402
from training.cot import checked_rules, parse_cot  # noqa: E402
from training.predict import reasoning_wanted  # noqa: E402

DAY = dt.date(2024, 3, 2)
# Both backends run fp32; their matmul and attention kernels differ (largest |dp| measured on the demo policy: 2e-6).
PROB_TOL = 1e-3


@pytest.fixture(scope="module")
def pairs(tiny_world) -> list[dict]:
    """Every judged pair of the tiny world as the scorers take it (load_pairs already names the facets `attributes`)."""
    from training.examples import load_pairs

    judged = load_pairs(tiny_world, "wands", "train") + load_pairs(tiny_world, "wands", "validation")
    return [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": f"{pair['product_id']}-v1"}
            for pair in judged]


def vllm_spec(model, **settings) -> ScorerSpec:
    return ScorerSpec(backend="vllm", model=str(model), kv_cache_bytes=64 << 20, **settings)


@pytest.fixture(scope="module")
def vllm_scorer(vllm_policy):
    import torch

    from jobs.scoring.vllm_scorer import VLLMScorer

    torch.set_num_threads(1)
    scorer = VLLMScorer(vllm_spec(vllm_policy))
    yield scorer
    scorer.close()


def scored(scorer, pairs, **settings):
    """`scorer`'s table of `pairs` under the default spec with `settings` changed (the engine stays)."""
    scorer.spec = vllm_spec(scorer.spec.model, **settings)
    return scorer.score(pairs, DAY)


def hf_rows(vllm_policy, pairs, **settings):
    return HFScorer(ScorerSpec(backend="hf", model=str(vllm_policy), **settings)).score(pairs, DAY).to_pylist()


def assert_same_distributions(vllm_rows, hf_rows):
    for ours, theirs in zip(vllm_rows, hf_rows, strict=True):
        assert (ours["query"], ours["product_id"]) == (theirs["query"], theirs["product_id"])
        assert [name for name, _ in ours["label_probs"]] == [name for name, _ in theirs["label_probs"]]
        gaps = [abs(p - q) for (_, p), (_, q) in zip(ours["label_probs"], theirs["label_probs"])]
        assert max(gaps) < PROB_TOL, (ours["label_probs"], theirs["label_probs"])
        assert ours["expected_gain"] == pytest.approx(theirs["expected_gain"], abs=PROB_TOL)
        top_two = sorted(q for _, q in theirs["label_probs"])[-2:]
        if top_two[1] - top_two[0] > 2 * PROB_TOL:  # no near tie: the argmax is the same
            assert ours["label"] == theirs["label"]


def test_fast_path_runs_only_label_steps_and_matches_hf(vllm_scorer, vllm_policy, pairs, monkeypatch):
    requests = []
    generate = vllm_scorer.engine.generate
    monkeypatch.setattr(vllm_scorer.engine, "generate",
                        lambda prompts, params, **options: requests.extend(params) or generate(prompts, params, **options))
    table = scored(vllm_scorer, pairs, reasoning="none")
    assert table.schema == RELEVANCE.arrow_schema()
    assert len(requests) == len(pairs) and all(params.max_tokens == 1 for params in requests), "no CoT is generated"
    rows = table.to_pylist()
    assert_same_distributions(rows, hf_rows(vllm_policy, pairs))
    assert all(row["reasoning"] is None and row["node_decisions"] == [] for row in rows)
    assert {row["model_version"] for row in rows} == {scorer_version(ScorerSpec(backend="hf", model=str(vllm_policy)))}


def repeats_a_facet_key(text: str, graph) -> bool:
    """Whether a facets line of `text` names a key twice, the one rule `cot_regex` cannot state."""
    lines = [line.partition(": ") for line in text.split("\n")]
    keys = [[entry.partition("=")[0] for entry in value.split("; ")] for tag, _, value in lines if graph.node(tag).kind == "facets"]
    return any(len(set(names)) < len(names) for names in keys)


def test_full_cot_follows_the_regex_and_matches_hf(vllm_scorer, vllm_policy, pairs):
    from training.cot import cot_regex

    graph, labels = vllm_scorer.graph, vllm_scorer.labels.names
    ours, theirs = scored(vllm_scorer, pairs, reasoning="all").to_pylist(), hf_rows(vllm_policy, pairs, reasoning="all")
    assert_same_distributions(ours, theirs)
    regex = cot_regex(graph, labels, "label_first")
    for row in ours:
        assert re.fullmatch(regex, row["reasoning"]), row["reasoning"]
        strict = parse_cot(row["reasoning"], graph, "label_first", labels, "strict")
        assert strict.well_formed or repeats_a_facet_key(row["reasoning"], graph), strict.problems
    hf_well_formed = [(mine, row) for mine, row in zip(ours, theirs)
                      if parse_cot(row["reasoning"], graph, "label_first", labels, "strict").well_formed]
    assert len(hf_well_formed) >= len(pairs) // 6, "the briefly trained policy still writes some well-formed CoTs"
    for mine, row in hf_well_formed:
        assert mine["reasoning"] == row["reasoning"]
        assert mine["node_decisions"] == row["node_decisions"]


def test_sample_mode_keeps_the_reasoning_of_the_sampled_pairs_only(vllm_scorer, pairs):
    rows = scored(vllm_scorer, pairs, reasoning="sample", reasoning_sample=0.5).to_pylist()
    wanted = reasoning_wanted(pairs, "sample", 0.5)
    assert 0 < sum(wanted) < len(pairs)
    assert [row["reasoning"] is not None for row in rows] == wanted
    assert [bool(row["node_decisions"]) for row in rows] == wanted
    fast = scored(vllm_scorer, pairs, reasoning="none").to_pylist()
    for row, fast_row in zip(rows, fast, strict=True):  # label_first: the label step comes before the CoT
        assert [q for _, q in row["label_probs"]] == pytest.approx([q for _, q in fast_row["label_probs"]], abs=1e-5)


def test_reasoning_first_reads_the_label_after_the_generated_reasoning(vllm_scorer, vllm_policy, pairs):
    """The second engine call: vLLM's distribution at the label step after its own reasoning equals the hf
    model's at the same step (the label_first policy is pushed into the other order by the regex)."""
    from training.predict import answer_format, label_prefix, label_step_probabilities, label_steps, pair_prompts

    graph, labels = vllm_scorer.graph, vllm_scorer.labels
    rows = scored(vllm_scorer, pairs[:12], reasoning="all", order="reasoning_first").to_pylist()
    assert all(row["reasoning"].startswith("qs: ") for row in rows)
    hf = HFScorer(ScorerSpec(backend="hf", model=str(vllm_policy), order="reasoning_first"))
    answer = answer_format(graph, "reasoning_first")
    steps = label_steps(hf.tokenizer, pair_prompts(hf.tokenizer, pairs[:12], hf.spec.prompt_tokens),
                        [label_prefix(row["reasoning"], answer) for row in rows], answer, labels)
    expected = label_step_probabilities(hf.model, steps, batch_size=16)
    for row, probabilities in zip(rows, expected, strict=True):
        assert [q for _, q in row["label_probs"]] == pytest.approx(probabilities, abs=PROB_TOL)


def test_a_prompt_the_engine_cannot_hold_is_refused_by_name(vllm_scorer, pairs):
    too_long = {**pairs[0], "query_id": "qx", "query": " ".join(["sofa"] * 400)}  # the query is never cut from the prompt
    with pytest.raises(ValueError, match="query_id='qx'.*shorten the query"):
        scored(vllm_scorer, [pairs[1], too_long])


CHECKS = {"graph": "relevance8", "order": "product_first", "reasoning": "all"}


def checks_consistent(text: str) -> bool:
    """No wrong yes/no in the checks and no subject match the subjects written contradict."""
    return checked_rules(ReasoningGraph.load("relevance8")).text_follows(text)


UNSEEN_QUERIES = ("blue sofa", "king bed frame", "white oak coffee table", "queen cotton sheet set", "leather sofa", "pine bed frame")


def unseen_pairs(pairs: list[dict]) -> list[dict]:
    """Queries the policy never saw beside each product: constraints it checks without having learned their answers."""
    products = {pair["product_id"]: pair for pair in pairs}
    return [{**product, "query": query, "query_id": f"u{k}"} for k, query in enumerate(UNSEEN_QUERIES) for product in products.values()]


def test_checked_verdicts_follow_the_values_and_match_hf(vllm_checks_policy, vllm_scorer, pairs):
    """The logits processor (imported by name in the engine's core process) computes each check's verdict and the subject
    match as the hf loop does: the same text wherever the hf one is well formed, every verdict the comparison of its
    values, every `ms: match` under two equal subjects, and a CoT that broke no rule left as it was."""
    from jobs.scoring.vllm_scorer import VLLMScorer

    pairs = unseen_pairs(pairs)

    checked = VLLMScorer(vllm_spec(vllm_checks_policy, checked_verdicts=True, **CHECKS))
    try:
        ours = {flag: scored(checked, pairs, checked_verdicts=flag, **CHECKS).to_pylist() for flag in (False, True)}
    finally:
        checked.close()
    theirs = {flag: hf_rows(vllm_checks_policy, pairs, checked_verdicts=flag, **CHECKS) for flag in (False, True)}
    graph, labels = checked.graph, checked.labels.names
    for flag in (False, True):  # the label step follows the reasoning: the distributions agree where the texts do
        well_formed = [(mine, row) for mine, row in zip(ours[flag], theirs[flag])
                       if parse_cot(row["reasoning"], graph, "product_first", labels, "strict").well_formed]
        assert len(well_formed) >= len(pairs) // 6, "the briefly trained policy still writes some well-formed CoTs"
        assert all(mine["reasoning"] == row["reasoning"] for mine, row in well_formed)
        assert_same_distributions(*zip(*well_formed))
    assert any(not checks_consistent(row["reasoning"]) for row in theirs[False]), "the policy breaks a rule somewhere"
    for rows in (ours[True], theirs[True]):
        assert all(checks_consistent(row["reasoning"]) for row in rows)
    for free, row in zip(theirs[False], theirs[True]):
        if checks_consistent(free["reasoning"]):
            assert row["reasoning"] == free["reasoning"]
    assert {row["model_version"] for row in theirs[True]} != {row["model_version"] for row in theirs[False]}  # another distribution
    with pytest.raises(ValueError, match="built without the checked-decoding logits processor"):
        scored(vllm_scorer, pairs[:1], checked_verdicts=True, **CHECKS)
