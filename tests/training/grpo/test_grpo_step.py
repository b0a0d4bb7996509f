"""The shared policy-gradient step: aggregation, PPO-clip, k3 KL (worked by hand), packing and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from training.grpo.step import (
    StepParams,
    aggregation_weights,
    k3_kl,
    pack_rollouts,
    policy_loss,
    response_logprobs,
    surrogate_token_losses,
)

MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_aggregation_weights_by_hand():
    third, quarter, half, sixth = 1 / 3, 1 / 4, 1 / 2, 1 / 6
    expected = {
        "token_mean": [[third, third, 0], [third, 0, 0]],
        "seq_mean_token_mean": [[quarter, quarter, 0], [half, 0, 0]],
        "seq_mean_token_sum_norm": [[sixth, sixth, 0], [sixth, 0, 0]],
    }
    for mode, weights in expected.items():
        assert torch.allclose(aggregation_weights(MASK, mode), torch.tensor(weights)), mode
    with pytest.raises(ValueError, match="token_mean"):
        aggregation_weights(MASK, "sum")


def test_k3_by_hand():
    value = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert value.item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


def test_ppo_clip_by_hand():
    # token 0: A=+1, ratio 1.5 -> clipped at 1 + eps_high = 1.28; token 1: A=-2, ratio 0.5 -> clipped at 0.8;
    # token 2: A=+1, ratio 0.5 -> unclipped (the pessimistic term); row 1 is padding.
    sampling = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 0.5], [1.0, 1.0, 1.0]]))
    advantages = torch.tensor([[1.0, -2.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    loss, metrics = policy_loss(logprobs, sampling, advantages, mask, StepParams(eps_low=0.2, eps_high=0.28))
    assert loss.item() == pytest.approx((-1.28 + 2 * 0.8 - 0.5) / 3)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 3)


def test_kl_term_is_added_with_beta_and_needs_a_reference():
    logprobs, reference = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.2]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero = torch.zeros(1, 2)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), zero, mask, StepParams(beta=0.1), reference)
    expected_kl = (0.5 - math.log(0.5) - 1) / 2
    assert metrics["kl"].item() == pytest.approx(expected_kl) and loss.item() == pytest.approx(0.1 * expected_kl)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, logprobs, zero, mask, StepParams(beta=0.1))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_surrogate_token_losses_give_the_loss_and_its_gradient_inside_the_clip_range(mode):
    torch.manual_seed(0)
    sampling = torch.randn(2, 3)
    logprobs = (sampling + 0.01 * torch.randn(2, 3)).requires_grad_(True)
    advantages = torch.randn(2, 3)
    loss, _ = policy_loss(logprobs, sampling, advantages, MASK, StepParams(aggregation=mode))
    total = (advantages * surrogate_token_losses(logprobs, sampling, MASK, mode)).sum()
    assert total.item() == pytest.approx(loss.item())
    (a,) = torch.autograd.grad(loss, logprobs)
    (b,) = torch.autograd.grad(total, logprobs)
    assert torch.allclose(a, b)


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
