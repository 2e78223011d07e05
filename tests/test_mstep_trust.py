"""A closed-form M-step is the maximizer of the model's own expected log-likelihood, or the
param takes gradient steps: never a fast wrong answer (issue 12, items 5, 6, 8 and 10).

References from outside the M-step: Pyro's ``TraceEnum_ELBO`` with an empty guide (its loss is
``-log p(x)``) and autograd for the gradient of :math:`\\log p(x)`; L-BFGS on that loss for the
optimum; hand-written EM and the analytic log-likelihood of independent latents.

The property every test of a converged fit checks (:func:`assert_stationary`): after ``fit``
reports ``converged``, the gradient of :math:`\\log p(x)` with respect to every param is ~0
(projected on the simplex for simplex params: a converged point is stationary).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

from pyro_emvae import EMOptim, ExactEStep, fit
from pyro_emvae.rules import Stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


PAR = {"enumerate": "parallel"}


# ---------------------------------------------------------------------------- helpers
def log_px_and_grads(model, *args, max_plate_nesting: int = 1):
    """``log p(x)`` by Pyro's ``TraceEnum_ELBO`` (empty guide) and its gradient with respect
    to each param's constrained value (the tensor the model reads)."""

    def guide(*_):
        pass

    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    with pyro.poutine.trace(param_only=True) as capture:
        loss = elbo.differentiable_loss(model, guide, *args)
    values = {n: s["value"] for n, s in capture.trace.nodes.items()}
    grads = torch.autograd.grad(-loss, list(values.values()), allow_unused=True)
    out = {}
    for (name, value), g in zip(values.items(), grads):
        g = torch.zeros_like(value) if g is None else g
        if isinstance(pyro.get_param_store()._constraints[name], type(constraints.simplex)):
            g = g - g.mean(-1, keepdim=True)  # (the simplex's tangent space)
        out[name] = g.detach()
    return float(-loss.detach()), out


def assert_stationary(model, *args, n_data: int, atol: float = 1e-4, max_plate_nesting=1):
    """A converged point is stationary: ``max |d log p(x) / d theta| / n_data < atol`` for
    every param."""
    _, grads = log_px_and_grads(model, *args, max_plate_nesting=max_plate_nesting)
    worst = {n: float(g.abs().max()) / n_data for n, g in grads.items()}
    assert all(v < atol for v in worst.values()), f"not stationary: {worst}"
    return worst


def lbfgs_optimum(model, *args, steps: int = 200, max_plate_nesting: int = 1) -> float:
    """``log p(x)`` maximized by L-BFGS over the unconstrained params (from their current
    values), with Pyro's ``TraceEnum_ELBO``."""

    def guide(*_):
        pass

    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    with pyro.poutine.trace(param_only=True) as capture:
        elbo.differentiable_loss(model, guide, *args)
    params = [s["value"].unconstrained() for s in capture.trace.nodes.values()]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide, *args)
        loss.backward()
        return loss

    opt.step(closure)
    return -elbo.loss(model, guide, *args)


def em(model, *args, max_iter=500, tol=1e-9, **kwargs):
    kwargs.setdefault("reg_covar", 0.0)
    opt = EMOptim(**kwargs)
    result = fit(model, ExactEStep(model), *args, optim=opt, max_iter=max_iter, tol=tol)
    return result, opt


def assert_monotone(history, rtol=1e-10):
    for a, b in itertools.pairwise(history):
        assert b >= a - rtol * abs(a), f"log p(x) fell from {a!r} to {b!r}"


def values() -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


# ---------------------------------------------------------------------------- item 10
M_LATENTS, REPEATS = 30, 4


def _many_latents():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(M_LATENTS, REPEATS, generator=g) < 0.35).double()
    x[: M_LATENTS // 2] = (torch.rand(M_LATENTS // 2, REPEATS, generator=g) < 0.8).double()
    p0 = torch.linspace(0.2, 0.8, M_LATENTS)
    q0 = torch.tensor([0.3, 0.6])

    def model(x):
        p = pyro.param("p", p0.clone(), constraint=constraints.unit_interval)
        q = pyro.param("q", q0.clone(), constraint=constraints.unit_interval)
        for i in range(M_LATENTS):
            z = pyro.sample(f"z{i}", dist.Bernoulli(p[i]), infer=PAR)
            with pyro.plate(f"obs{i}", REPEATS):
                pyro.sample(f"x{i}", dist.Bernoulli(q[z.long()]), obs=x[i])

    return model, x, p0, q0


def _analytic(x, p, q):
    """log p(x) (independent latents: a product of two-term sums) and the responsibilities."""
    s = x.sum(-1, keepdim=True)
    loglik = s * q.log() + (REPEATS - s) * (1 - q).log()  # (M, 2)
    joint = torch.stack([(1 - p).log(), p.log()], -1) + loglik
    return float(joint.logsumexp(-1).sum()), torch.softmax(joint, -1)


def test_thirty_global_binary_latents_match_hand_written_em():
    """31-dim tensors (30 enumerated dims and a plate): the statistics' einsum ran out of
    letters ('invalid subscript'); now fit runs and each iteration is hand-written EM's."""
    model, x, p, q = _many_latents()
    n = 3
    result, _ = em(model, x, max_iter=n, tol=0)
    expected = []
    for _ in range(n):
        ll, r = _analytic(x, p, q)
        expected.append(ll)
        s = x.sum(-1)
        p = r[:, 1]
        q = (r * s.unsqueeze(-1)).sum(0) / (REPEATS * r.sum(0))
    expected.append(_analytic(x, p, q)[0])
    assert result.history["log_likelihood"] == pytest.approx(expected, abs=1e-9)
    assert torch.allclose(pyro.param("p"), p, atol=1e-10)
    assert torch.allclose(pyro.param("q"), q, atol=1e-10)


def test_stats_add_beyond_26_dims():
    stats = Stats(4)
    shape = (1,) * 27 + (2, 3, 4)  # 30 dims, the last three (past 'z') carried by factors
    w, v = torch.rand(shape), torch.rand(3, 1)
    ids = torch.arange(4).expand(shape)  # pooled over dims 27 and 28
    stats.add("s", ids, w, v)
    assert torch.allclose(stats.sums["s"], (w.reshape(2, 3, 4) * v).sum((0, 1)))
