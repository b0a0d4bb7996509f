"""The main-loss-driven edge controller (GRAPH_GRPO.md, "The main-loss-driven controller").

The main loss L_main is the policy-gradient loss on the label node's tokens alone. With l_t(w) the
per-token surrogate loss as it enters the aggregated loss (aggregation weights included, so that
L_total = sum_t A_t(phi) * l_t(w)), one virtual SGD step of size alpha gives

    d L_main(w - alpha * grad_w L_total) / d phi_e  ~=  -alpha * sum_t (dA_t/dphi_e) * a_t,
    a_t = <grad_w L_main, grad_w l_t>.

`token_alignment` computes a_t for all tokens at once: one backward for g = grad_w L_main, then a
central finite difference of l_t along g/|g| (two forward passes) or a forward-mode JVP.
`lookahead_gradient` contracts a_t with dA/dphi by autograd through the credit (it touches phi only).
`EdgeController` holds theta (phi = sigmoid(theta)), its own Adam, the bounds and the EMA of phi;
the trainer calls `update` every `every` steps (`due`). Descent raises phi on edges whose credit
moves the policy the way L_main wants and lowers it where it pushes against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("finite_difference", "jvp")


def token_alignment(
    token_losses: Callable[[dict[str, Tensor]], Tensor],
    main_loss: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    h: float = 1e-3,
    method: str = "finite_difference",
    reduce_gradient: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> Tensor:
    """a_t = <grad_w L_main, grad_w l_t> for every token, shape of `token_losses(params)` (e.g. (B, T)).

    token_losses: params -> per-token surrogate losses l_t (call the model with
        `torch.func.functional_call(model, params, ...)`); main_loss: params -> scalar L_main.
    params: the trainable weights w by name (parameters not listed keep the module's values).
    method: `finite_difference`: |g| * (l_t(w + h u) - l_t(w - h u)) / (2h) with u = g / |g|;
        `jvp`: the exact directional derivative by forward-mode AD (`torch.func.jvp`).
    reduce_gradient: when the tokens are split over processes (each passes the losses of its share), sums
        the shares' gradients of L_main into g, so every process aligns its tokens with the same direction.
    Returns zeros when g = 0. The result is detached.
    """
    if method not in METHODS:
        raise ValueError(f"token_alignment: unknown method {method!r}; use one of {list(METHODS)}")
    names = list(params)
    weights = [params[name] for name in names]
    grads = torch.autograd.grad(main_loss(dict(params)), weights, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g.detach() for w, g in zip(weights, grads)]
    if reduce_gradient is not None:
        grads = reduce_gradient(grads)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    if method == "jvp":
        primals = {name: w.detach() for name, w in zip(names, weights)}
        return torch.func.jvp(token_losses, (primals,), (dict(zip(names, grads)),))[1].detach()
    with torch.no_grad():
        if float(norm) == 0.0:
            return torch.zeros_like(token_losses(dict(params)))
        step = [h * g / norm for g in grads]
        plus = {name: w + s for name, w, s in zip(names, weights, step)}
        minus = {name: w - s for name, w, s in zip(names, weights, step)}
        return norm * (token_losses(plus) - token_losses(minus)) / (2 * h)


def lookahead_gradient(advantages: Callable[[Tensor], Tensor], phi: Tensor, alignment: Tensor, alpha: float) -> Tensor:
    """(E,) d L_main(w - alpha grad_w L_total) / d phi ~= -alpha * sum_t (dA_t/dphi) * a_t.

    advantages: phi -> token advantages A (same shape as `alignment`), differentiable in phi (an
    estimator's advantages with `AdvantageBatch.phi = phi`). alignment: a_t from `token_alignment`.
    """
    phi = phi.detach().requires_grad_(True)
    tokens = advantages(phi)
    if tokens.shape != alignment.shape:
        raise ValueError(f"lookahead_gradient: advantages {tuple(tokens.shape)} and alignment {tuple(alignment.shape)} differ in shape")
    (grad,) = torch.autograd.grad((tokens * alignment.detach()).sum(), phi, allow_unused=True)
    return torch.zeros_like(phi) if grad is None else -alpha * grad.detach()


@dataclass(frozen=True)
class ControllerParams:
    """Scalars of the edge controller (the trainer's config fills them)."""

    lr: float = 0.05
    every: int = 1
    init_phi: float = 0.5
    phi_min: float = 0.05
    phi_max: float = 0.95
    ema: float = 0.9
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.phi_min <= self.init_phi <= self.phi_max < 1.0:
            raise ValueError(f"ControllerParams: need 0 < phi_min <= init_phi <= phi_max < 1; got {self.phi_min}, {self.init_phi}, {self.phi_max}")
        if self.lr <= 0 or self.every < 1 or not 0.0 <= self.ema < 1.0 or self.alpha <= 0:
            raise ValueError(f"ControllerParams: need lr > 0, every >= 1, ema in [0, 1), alpha > 0; got {self}")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class EdgeController(torch.nn.Module):
    """Edge coefficients phi = sigmoid(theta), theta kept in [logit(phi_min), logit(phi_max)].

    `phi()` is what the credit uses: the EMA of sigmoid(theta) over updates (with `ema = 0`, sigmoid(theta)
    itself). `update(grad_phi)` takes d L / d phi (from `lookahead_gradient`), applies the chain rule
    through the sigmoid, one Adam step, the bounds, then the EMA. `state_dict()` holds theta, the EMA,
    the update count and the Adam state (checkpointing).
    """

    def __init__(self, edges: Sequence[tuple[str, str]], params: ControllerParams) -> None:
        super().__init__()
        self.edges = tuple(edges)
        self.params = params
        self.theta = torch.nn.Parameter(torch.full((len(self.edges),), _logit(params.init_phi)))
        self.register_buffer("phi_ema", torch.full((len(self.edges),), params.init_phi))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam([self.theta], lr=params.lr)

    def phi(self) -> Tensor:
        """(E,) current coefficients (detached), in `edges` order."""
        return self.phi_ema.detach().clone()

    def due(self, step: int) -> bool:
        """Whether the trainer's step `step` (0-based) runs a controller update: every `every` steps."""
        return step % self.params.every == 0

    def update(self, grad_phi: Tensor) -> dict[str, float]:
        """One controller step from d L_main / d phi; returns `phi/<edge>` and `phi_grad/<edge>` metrics."""
        if grad_phi.shape != self.theta.shape:
            raise ValueError(f"EdgeController.update: gradient has shape {tuple(grad_phi.shape)}, expected ({len(self.edges)},)")
        raw = torch.sigmoid(self.theta.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.theta.grad = grad_phi.detach().to(self.theta) * raw * (1 - raw)
        self.optimizer.step()
        with torch.no_grad():
            self.theta.clamp_(_logit(self.params.phi_min), _logit(self.params.phi_max))
            decay = self.params.ema
            self.phi_ema.mul_(decay).add_((1 - decay) * torch.sigmoid(self.theta))
            self.updates += 1
        values = torch.cat([self.phi_ema, grad_phi.detach().to(self.phi_ema)]).tolist()
        names = [f"{a}->{b}" for a, b in self.edges]
        metrics = {f"phi/{name}": values[e] for e, name in enumerate(names)}
        metrics.update({f"phi_grad/{name}": values[len(names) + e] for e, name in enumerate(names)})
        return metrics

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "edges": list(self.edges)}

    def set_extra_state(self, state: dict) -> None:
        if [tuple(edge) for edge in state["edges"]] != list(self.edges):
            raise ValueError(f"EdgeController: checkpoint edges {state['edges']} differ from this graph's {list(self.edges)}")
        self.optimizer.load_state_dict(state["optimizer"])
