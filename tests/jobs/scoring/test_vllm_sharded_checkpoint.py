"""VLLMScorer on a real-shaped checkpoint folder: the tiny Mistral of tests/sharded_checkpoint.py, weights in
shards, Mistral's production tokenizer with a label of several tokens. vLLM loads the shards through the
index and gives the label distribution the hf backend gives, under the same version. Its own module, so its
engine never runs beside test_vllm_scorer's. Skipped where vllm is not installed."""

from __future__ import annotations

import datetime as dt

import pytest

pytest.importorskip("vllm")

from jobs.scoring.backends import HFScorer  # noqa: E402
from jobs.scoring.spec import ScorerSpec  # noqa: E402

DAY = dt.date(2024, 3, 2)
PROB_TOL = 1e-3  # as test_vllm_scorer: both fp32, different kernels


def test_a_sharded_folder_scores_as_the_hf_backend_scores_it(sharded_policy, tiny_world):
    import torch

    from jobs.scoring.vllm_scorer import VLLMScorer
    from training.examples import load_pairs

    pairs = [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": "h"}
             for pair in load_pairs(tiny_world, "wands", "validation")]
    torch.set_num_threads(1)
    scorer = VLLMScorer(ScorerSpec(backend="vllm", model=str(sharded_policy), kv_cache_bytes=64 << 20))
    try:
        ours = scorer.score(pairs, DAY).to_pylist()
    finally:
        scorer.close()
    hf = HFScorer(ScorerSpec(backend="hf", model=str(sharded_policy)))
    theirs = hf.score(pairs, DAY).to_pylist()
    assert scorer.model_version == hf.model_version
    for mine, row in zip(ours, theirs, strict=True):
        assert (mine["product_id"], [name for name, _ in mine["label_probs"]]) == (row["product_id"], [name for name, _ in row["label_probs"]])
        assert max(abs(p - q) for (_, p), (_, q) in zip(mine["label_probs"], row["label_probs"])) < PROB_TOL
