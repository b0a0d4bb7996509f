"""VLLMScorer on a real-shaped checkpoint folder: the tiny Mistral of tests/sharded_checkpoint.py, weights in
shards, Mistral's production tokenizer with a label of several tokens. vLLM loads the shards through the
index and gives the label distribution the hf backend gives, under the same version, both for the folder as a
policy and judging zero-shot through its chat template (tests/jobs/scoring/test_zero_shot.py has the hf side).
Its own module, so its engine never runs beside test_vllm_scorer's; one engine serves the module, opened for
the longest prompts (zero-shot with reasoning), `score` reading the prompt, order and reasoning from the
scorer's spec at each call, in the test process (tests/vllm_in_process.py). Skipped where vllm is not installed."""

from __future__ import annotations

import datetime as dt

import pytest

pytest.importorskip("vllm")

from vllm_in_process import engine_in_this_process  # noqa: E402

from jobs.scoring.backends import HFScorer  # noqa: E402
from jobs.scoring.spec import ScorerSpec, scorer_version  # noqa: E402

DAY = dt.date(2024, 3, 2)
PROB_TOL = 1e-3  # as test_vllm_scorer: both fp32, different kernels
ZERO_SHOT = {"prompt": "zero_shot", "prompt_tokens": 64, "max_new_tokens": 12}


def vllm_spec(model, **settings) -> ScorerSpec:
    return ScorerSpec(backend="vllm", model=str(model), kv_cache_bytes=64 << 20, **settings)


@pytest.fixture(scope="module")
def pairs(tiny_world) -> list[dict]:
    from training.examples import load_pairs

    return [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": "h"}
            for pair in load_pairs(tiny_world, "wands", "validation")]


@pytest.fixture(scope="module")
def vllm_scorer(sharded_policy):
    import torch

    from jobs.scoring.vllm_scorer import VLLMScorer

    torch.set_num_threads(1)
    with engine_in_this_process():
        scorer = VLLMScorer(vllm_spec(sharded_policy, **ZERO_SHOT, order="reasoning_first", reasoning="all"))
    yield scorer
    scorer.close()


def both_backends(vllm_scorer, model, pairs, **settings) -> tuple[list[dict], list[dict]]:
    """(vLLM's rows, the hf backend's rows) of `pairs` under the same settings."""
    vllm_scorer.spec = vllm_spec(model, **settings)
    ours = vllm_scorer.score(pairs, DAY).to_pylist()
    theirs = HFScorer(ScorerSpec(backend="hf", model=str(model), **settings)).score(pairs, DAY).to_pylist()
    return ours, theirs


def largest_gap(mine: dict, row: dict) -> float:
    assert (mine["product_id"], [name for name, _ in mine["label_probs"]]) == (row["product_id"], [name for name, _ in row["label_probs"]])
    assert sum(q for _, q in mine["label_probs"]) == pytest.approx(1.0, abs=1e-5)
    return max(abs(p - q) for (_, p), (_, q) in zip(mine["label_probs"], row["label_probs"]))


def test_a_sharded_folder_scores_as_the_hf_backend_scores_it(vllm_scorer, sharded_policy, pairs):
    ours, theirs = both_backends(vllm_scorer, sharded_policy, pairs)
    assert scorer_version(vllm_spec(sharded_policy)) == scorer_version(ScorerSpec(backend="hf", model=str(sharded_policy)))
    for mine, row in zip(ours, theirs, strict=True):
        assert largest_gap(mine, row) < PROB_TOL


def test_zero_shot_judging_gives_the_hf_distribution(vllm_scorer, sharded_policy, pairs):
    ours, theirs = both_backends(vllm_scorer, sharded_policy, pairs, **ZERO_SHOT)
    version = scorer_version(vllm_spec(sharded_policy, **ZERO_SHOT))  # the engine's scorer was opened under another order
    assert {row["model_version"] for row in theirs} == {version} and version.split("-")[1] == "zero_shot"
    for mine, row in zip(ours, theirs, strict=True):
        assert largest_gap(mine, row) < PROB_TOL


def test_zero_shot_reasoning_is_generated_then_the_label_read_after_it(vllm_scorer, sharded_policy, pairs):
    ours, theirs = both_backends(vllm_scorer, sharded_policy, pairs[:4], **ZERO_SHOT, order="reasoning_first", reasoning="all")
    assert all(row["reasoning"] for row in ours)
    # the same greedy reasoning (unconstrained in both), then the same label step after it
    same = [(mine, row) for mine, row in zip(ours, theirs, strict=True) if mine["reasoning"] == row["reasoning"]]
    assert same
    for mine, row in same:
        assert largest_gap(mine, row) < PROB_TOL
