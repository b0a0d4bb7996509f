"""The policy-gradient loss: aggregation, PPO-clip, k3 KL (worked by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from training.grpo.loss import StepParams, aggregation_weights, k3_kl, policy_loss, surrogate_token_losses

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
