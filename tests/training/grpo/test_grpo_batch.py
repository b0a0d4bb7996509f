"""Packing rollouts for the forward pass, and the teacher-forced logprobs against the sampled ones."""

from __future__ import annotations

import pytest
import torch

from training.grpo.batch import pack_rollouts, response_logprobs


def test_packing_puts_responses_after_left_padded_prompts():
    packed = pack_rollouts([[5, 6], [7]], [[8, 9, 2], [10]], [[-0.1, -0.2, -0.3], [-0.4]], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 8, 9, 2], [0, 7, 10, 0, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert packed.position_ids[1, 1:3].tolist() == [0, 1]
    assert packed.mask.tolist() == [[True, True, True], [True, False, False]]
    assert packed.sampling_logprobs[1].tolist() == pytest.approx([-0.4, 0.0, 0.0])


def test_sampled_logprobs_equal_teacher_forced_ones(sft_policy):
    from training.grpo.rollout import HFBackend, Sampling
    from training.model import load_model

    model, tokenizer = load_model(sft_policy)
    prompts = [[tokenizer.bos_token_id or 1, 40, 41, 42], [tokenizer.bos_token_id or 1, 50]]
    sampling = Sampling(group_size=3, temperature=0.7, max_new_tokens=12)
    rollouts = HFBackend(model, tokenizer).generate(prompts, sampling, seed=3)
    assert rollouts == HFBackend(model, tokenizer).generate(prompts, sampling, seed=3)
    assert rollouts.group == (0, 0, 0, 1, 1, 1)
    for ids, ended, text in zip(rollouts.response_ids, rollouts.ended, rollouts.texts):
        assert (ids[-1] == tokenizer.eos_token_id) == ended and tokenizer.eos_token_id not in ids[:-1]
        assert text == tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
    packed = pack_rollouts([prompts[k] for k in rollouts.group], rollouts.response_ids, rollouts.logprobs, tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, packed, temperature=0.7, with_entropy=True)
    assert torch.allclose(logprobs[packed.mask], packed.sampling_logprobs[packed.mask], atol=1e-4)
    assert bool((entropy[packed.mask] >= 0).all())
