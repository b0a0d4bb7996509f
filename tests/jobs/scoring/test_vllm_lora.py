"""LoRA through vLLM, unmerged, on the real-shaped checkpoint (tests/sharded_checkpoint.py): the scorer serves an
adapter folder as its base with a `LoRARequest` and gives the label distribution the hf backend gives (base + peft
adapter) under the same version; GRPO's vLLM backend syncs a LoRA policy by its adapter alone, and its rollout
logprobs follow the policy through two syncs. Both engines run in the test process (tests/vllm_in_process.py). Skipped where
vllm is not installed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm_in_process import engine_in_this_process  # noqa: E402

from jobs.scoring.backends import HFScorer  # noqa: E402
from jobs.scoring.spec import ScorerSpec  # noqa: E402
from training.examples import load_pairs  # noqa: E402
from training.loop import wrap_lora  # noqa: E402
from training.model import load_model, save_policy  # noqa: E402
from training.policy_format import PolicyFormat  # noqa: E402

DAY = dt.date(2024, 3, 2)
PROB_TOL = 1e-3  # as test_vllm_scorer: both fp32, different kernels
LOGPROB_TOL = 1e-3  # as test_vllm_backend


def random_adapter(model, seed: int):
    """`model` with a LoRA adapter (rank 4 on q, v, o) whose B matrices are random (peft starts them at zero: a no-op)."""
    lora = wrap_lora(model, 4, 8.0, ("q_proj", "v_proj", "o_proj"))
    randomize(lora, seed)
    return lora.eval()


def randomize(lora, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_an_adapter_folder_scores_unmerged_as_the_hf_backend_scores_it(sharded_policy, tiny_world, tmp_path):
    from jobs.scoring.vllm_scorer import VLLMScorer

    model, tokenizer = load_model(sharded_policy)
    folder = tmp_path / "adapter"
    save_policy(random_adapter(model, 0), tokenizer, folder, PolicyFormat(), base=sharded_policy)
    pairs = [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": "h"}
             for pair in load_pairs(tiny_world, "wands", "validation")]
    torch.set_num_threads(1)
    with engine_in_this_process():
        scorer = VLLMScorer(ScorerSpec(backend="vllm", model=str(folder), kv_cache_bytes=64 << 20))
    try:
        ours = scorer.score(pairs, DAY).to_pylist()
    finally:
        scorer.close()
    hf = HFScorer(ScorerSpec(backend="hf", model=str(folder)))
    theirs = hf.score(pairs, DAY).to_pylist()
    base = HFScorer(ScorerSpec(backend="hf", model=str(sharded_policy))).score(pairs, DAY).to_pylist()
    assert scorer.model_version == hf.model_version
    gaps = [abs(p - q) for mine, row in zip(ours, theirs, strict=True) for (_, p), (_, q) in zip(mine["label_probs"], row["label_probs"])]
    assert max(gaps) < PROB_TOL
    # the adapter moves the distribution by far more than the tolerance: vLLM did apply it
    assert max(abs(p - q) for mine, row in zip(ours, base) for (_, p), (_, q) in zip(mine["label_probs"], row["label_probs"])) > 10 * PROB_TOL


def test_grpo_backend_syncs_the_adapter_alone_and_follows_the_policy(sharded_policy, tiny_world):
    from schemas.graph import ReasoningGraph
    from training.examples import encode_example
    from training.grpo.rollout import Sampling
    from training.grpo.vllm_backend import VLLMBackend

    torch.set_num_threads(1)
    model, tokenizer = load_model(sharded_policy)
    graph = ReasoningGraph.load("relevance7")
    prompts = [list(encode_example(pair, tokenizer, graph, "label_first", 48).prompt_ids)
               for pair in load_pairs(tiny_world, "wands", "validation")[::5][:3]]
    sampling = Sampling(group_size=2, temperature=0.7, max_new_tokens=24)
    policy = random_adapter(model, 1)

    def largest_gap(rollouts) -> float:
        """max |rollout logprob - the peft policy's teacher-forced log_softmax(logits / T)| over the response tokens."""
        gaps = []
        for k, ids, logprobs in zip(rollouts.group, rollouts.response_ids, rollouts.logprobs):
            sequence = torch.tensor([prompts[k] + list(ids)])
            with torch.no_grad():
                logits = policy(input_ids=sequence).logits[0, len(prompts[k]) - 1 : -1]
            expected = torch.log_softmax(logits / sampling.temperature, -1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
            gaps.append((expected - torch.tensor(logprobs)).abs().max().item())
        return max(gaps)

    with engine_in_this_process():
        backend = VLLMBackend(sharded_policy, tokenizer, seed=0, max_model_len=256, kv_cache_bytes=64 << 20, lora_rank=4)
    try:
        backend.sync(policy)
        synced = sorted(path.name for path in Path(backend.weights_dir.name).glob("*.safetensors"))
        assert synced == ["adapter_model.safetensors"]  # the adapter alone, not the base weights
        first = backend.generate(prompts, sampling, seed=3)
        assert largest_gap(first) < LOGPROB_TOL
        randomize(policy, 2)  # a training step's worth of change, and more
        assert largest_gap(first) > 100 * LOGPROB_TOL
        backend.sync(policy)
        assert largest_gap(backend.generate(prompts, sampling, seed=3)) < LOGPROB_TOL
        with pytest.raises(ValueError, match="serves a LoRA policy"):
            backend.sync(model)  # not the peft model: its full weights, which this engine does not take
    finally:
        backend.close()
