"""The main-loss-driven edge controller (GRAPH_GRPO.md, "The main-loss-driven controller").

Toy: graph a -> y, b -> y; one prompt, G = 4 rollouts, each three tokens (a, b, y). The policy is a
logit table W (4 contexts x 2 tokens); rollout i's tokens all use context i; a and y emit token 0,
b emits token 1. So grad l_a = grad l_y (a's credit pushes the policy the way the main loss wants)
and, in a two-way softmax, grad l_b points opposite to grad l_y (p - e_1 vs p - e_0: anti-aligned). R = (1, 0, 1, 0) and both evidence
verifiers are (1, 1, 0, 0): raising phi moves a node's credit towards R. The controller must raise
phi(a->y) and lower phi(b->y).
"""

from __future__ import annotations

import io

import pytest
import torch

from schemas.graph import Node, ReasoningGraph
from training.grpo.controller import ControllerParams, EdgeController, lookahead_gradient, token_alignment
from training.grpo.credit import CreditGraph
from training.grpo.estimators import AdvantageBatch, AdvantageParams, get_estimator
from training.grpo.rewards import NodeRewards

TOY = ReasoningGraph(
    name="toy",
    nodes=(Node("a", "text"), Node("b", "text"), Node("y", "label")),
    edges=(("a", "y"), ("b", "y")),
    label_node="y",
    orders={"reasoning_first": ("a", "b", "y")},
)
CONTEXT = torch.arange(4).unsqueeze(1).expand(4, 3)  # (B, T): rollout i's tokens use row i of W
EMITTED = torch.tensor([[0, 1, 0]] * 4)  # a -> token 0, b -> token 1, y -> token 0
WEIGHT = 1.0 / 12  # token-mean aggregation over the 12 tokens


def toy_batch(phi: torch.Tensor | None) -> AdvantageBatch:
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    local = torch.tensor([[1.0, 1.0, 0.0]] * 2 + [[0.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    has_local = torch.tensor([[True, True, False]] * 4)
    rewards = NodeRewards(outcome, local, has_local, local, has_local, torch.ones(4, dtype=torch.bool))
    token_nodes = torch.tensor([[0, 1, 2]] * 4)
    return AdvantageBatch(rewards, token_nodes, torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.long), CreditGraph.from_graph(TOY), phi)


def token_losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """l_t(W) = -log pi(token t) / 12, shape (4, 3)."""
    logprobs = torch.log_softmax(params["W"][CONTEXT], dim=-1)
    return -logprobs.gather(-1, EMITTED.unsqueeze(-1)).squeeze(-1) * WEIGHT


def advantages(phi: torch.Tensor) -> torch.Tensor:
    return get_estimator("graph_grpo")(toy_batch(phi), AdvantageParams(eps=0.0))[0]


def main_loss_fn(label_advantages: torch.Tensor):
    """L_main: the policy-gradient loss on the y tokens alone (column 2)."""
    return lambda params: (label_advantages * token_losses(params)[:, 2]).sum()


def initial_weights() -> torch.Tensor:
    return (0.3 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_(True)


def test_alignment_finite_difference_and_jvp_equal_explicit_inner_products():
    w = initial_weights()
    label_adv = advantages(torch.full((2,), 0.5, dtype=torch.float64))[:, 2].detach()
    main_loss = main_loss_fn(label_adv)
    fd = token_alignment(token_losses, main_loss, {"W": w}, h=1e-4)
    jvp = token_alignment(token_losses, main_loss, {"W": w}, method="jvp")
    (g,) = torch.autograd.grad(main_loss({"W": w}), w)
    explicit = torch.zeros(4, 3, dtype=torch.float64)
    for i in range(4):
        for t in range(3):
            (grad_t,) = torch.autograd.grad(token_losses({"W": w})[i, t], w)
            explicit[i, t] = (g * grad_t).sum()
    assert torch.allclose(jvp, explicit, rtol=1e-10, atol=1e-14)
    assert torch.allclose(fd, explicit, rtol=1e-6, atol=1e-12)
    # The toy's construction: a's tokens align with the main loss exactly like y's, b's have the opposite sign.
    assert torch.allclose(explicit[:, 0], explicit[:, 2]) and (explicit[:, 1] * explicit[:, 2] < 0).all()
    with pytest.raises(ValueError, match="unknown method 'adjoint'"):
        token_alignment(token_losses, main_loss, {"W": w}, method="adjoint")


def test_lookahead_gradient_matches_the_derivative_of_a_real_virtual_step():
    # d/dphi L_main(W - alpha * grad_W L_total(phi)), differentiated exactly by autograd, against the
    # spec's first-order formula -alpha * sum_t dA_t/dphi * a_t; they agree as alpha -> 0.
    w = initial_weights()
    phi0 = torch.tensor([0.3, 0.7], dtype=torch.float64)
    label_adv = advantages(phi0)[:, 2].detach()
    main_loss = main_loss_fn(label_adv)
    alignment = token_alignment(token_losses, main_loss, {"W": w}, h=1e-4)
    for alpha in (1e-2, 1e-3):
        phi = phi0.clone().requires_grad_(True)
        total = (advantages(phi) * token_losses({"W": w})).sum()
        (grad_w,) = torch.autograd.grad(total, w, create_graph=True)
        (exact,) = torch.autograd.grad(main_loss({"W": w - alpha * grad_w}), phi)
        approx = lookahead_gradient(advantages, phi0, alignment, alpha)
        assert torch.allclose(approx, exact, rtol=10 * alpha, atol=1e-12)
    assert approx[0] < 0 < approx[1]  # descent raises phi(a->y) and lowers phi(b->y)


def test_controller_raises_the_aligned_edge_and_lowers_the_anti_aligned_one():
    params = ControllerParams(lr=0.2, every=2, ema=0.5, phi_min=0.05, phi_max=0.95, alpha=1.0)
    controller = EdgeController(TOY.edges, params)
    w = initial_weights()
    policy = torch.optim.SGD([w], lr=2.0)
    history = [controller.phi()]
    for step in range(40):
        phi = controller.phi()
        tokens = advantages(phi)
        if controller.due(step):
            alignment = token_alignment(token_losses, main_loss_fn(tokens[:, 2].detach()), {"W": w})
            metrics = controller.update(lookahead_gradient(advantages, phi, alignment, params.alpha))
            history.append(controller.phi())
        policy.zero_grad()
        (tokens.detach() * token_losses({"W": w})).sum().backward()
        policy.step()
    trajectory = torch.stack(history)
    assert int(controller.updates) == 20
    assert (trajectory[1:, 0] >= trajectory[:-1, 0]).all() and (trajectory[1:, 1] <= trajectory[:-1, 1]).all()
    assert trajectory[-1, 0] > 0.9 and trajectory[-1, 1] < 0.1
    assert (trajectory >= 0.05).all() and (trajectory <= 0.95).all()
    assert metrics["phi/a->y"] == pytest.approx(float(trajectory[-1, 0])) and metrics["phi_grad/a->y"] < 0


def test_one_update_by_hand_adam_step_bounds_and_ema():
    # Adam's first step moves theta by lr * sign(grad); phi(theta) = sigmoid; the EMA mixes it in.
    controller = EdgeController([("a", "y"), ("b", "y")], ControllerParams(lr=0.1, ema=0.75))
    controller.update(torch.tensor([2.0, -3.0]))
    raw = torch.sigmoid(torch.tensor([-0.1, 0.1]))
    assert controller.phi().tolist() == pytest.approx((0.75 * 0.5 + 0.25 * raw).tolist(), rel=1e-6)
    for _ in range(200):
        controller.update(torch.tensor([-1.0, 1.0]))
    assert controller.theta.detach().tolist() == pytest.approx([torch.logit(torch.tensor(0.95)).item(), torch.logit(torch.tensor(0.05)).item()], rel=1e-5)
    assert controller.phi().tolist() == pytest.approx([0.95, 0.05], rel=1e-4)
    assert [controller.due(s) for s in range(4)] == [True] * 4
    assert [EdgeController([("a", "y")], ControllerParams(every=3)).due(s) for s in range(7)] == [True, False, False, True, False, False, True]


def test_state_dict_round_trip_continues_identically():
    edges = [("a", "y"), ("b", "y")]
    first = EdgeController(edges, ControllerParams(lr=0.1))
    for grad in ([1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]):
        first.update(torch.tensor(grad))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = EdgeController(edges, ControllerParams(lr=0.1))
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(first.phi(), second.phi()) and int(second.updates) == 3
    first.update(torch.tensor([0.2, -0.7]))
    second.update(torch.tensor([0.2, -0.7]))
    assert torch.equal(first.theta, second.theta) and torch.equal(first.phi(), second.phi())
    other = EdgeController([("a", "y"), ("c", "y")], ControllerParams())
    with pytest.raises(ValueError, match="checkpoint edges"):
        other.load_state_dict(first.state_dict())


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="phi_min <= init_phi <= phi_max"):
        ControllerParams(init_phi=0.99)
    with pytest.raises(ValueError, match="every >= 1"):
        ControllerParams(every=0)
    with pytest.raises(ValueError, match=r"gradient has shape \(3,\), expected \(2,\)"):
        EdgeController([("a", "y"), ("b", "y")], ControllerParams()).update(torch.zeros(3))
