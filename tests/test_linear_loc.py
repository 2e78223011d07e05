"""A Normal loc linear in params (``X @ W[z] + b[z]``): the weighted-least-squares rule.

The mixture of linear regressions is checked against EM written out by hand in torch from the
same start, iteration by iteration (to 1e-8), and in iterations to the optimum; the single
regression against ordinary least squares; and the rule's refusals (a param used elsewhere,
a design that depends on the param, a singular system, a constrained param).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from models.mixture_regression import init_params, mixture_regression, sample_mixture_regression
from pyro_emvae import EMOptim, ExactEStep, fit

PAR = {"enumerate": "parallel"}


# ---------------------------------------------------------------------------- hand-written EM
def hand_em_step(X, y, p):
    """One EM iteration for the mixture of regressions, by hand: responsibilities, then
    weights = mean responsibility, [w_k; b_k] by weighted least squares on [X, 1], and
    sigma_k^2 = the weighted mean squared residual about the new fit. Returns the log
    p(y | X) at the old params and the new params."""
    n = len(y)
    design = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], -1)  # (N, D + 1)
    beta = torch.cat([p["W"], p["b"].unsqueeze(-1)], -1)  # (K, D + 1)
    mean = design @ beta.T  # (N, K)
    logp = torch.distributions.Normal(mean, p["sigma"]).log_prob(y.unsqueeze(-1))
    joint = logp + p["weights"].log()
    ll = torch.logsumexp(joint, -1).sum()
    r = torch.softmax(joint, -1)  # (N, K)
    gram = torch.einsum("nk,ni,nj->kij", r, design, design)
    rhs = torch.einsum("nk,ni,n->ki", r, design, y)
    beta = torch.linalg.solve(gram, rhs)
    resid = y.unsqueeze(-1) - design @ beta.T
    sigma = ((r * resid**2).sum(0) / r.sum(0)).sqrt()
    new = {"weights": r.sum(0) / n, "W": beta[:, :-1], "b": beta[:, -1], "sigma": sigma}
    return float(ll), new


def _store():
    return {n: pyro.param(n).detach().clone() for n in ("weights", "W", "b", "sigma")}


def _iterations_to(lls, target, tol=1e-6):
    return next(i for i, v in enumerate(lls) if v >= target - tol)


def test_mixture_of_regressions_is_em_and_equals_hand_written_em():
    """N=2000, 4 features, 3 components: W and b are closed form (EM, no gradient params),
    every iterate equals hand-written EM's to 1e-8, and the optimum is reached in as many
    iterations (the target: at most 1.5x)."""
    X, y, _ = sample_mixture_regression(2000, K=3, D=4, seed=0)
    init = init_params(X, y, 3, seed=1)

    def model(X, y):
        mixture_regression(X, y, 3, init=init)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    opt = EMOptim(reg_covar=0.0)
    plan = opt.plan(guide, (X, y), {})
    assert sorted(plan.closed_form) == ["W", "b", "sigma", "weights"]
    assert plan.gradient == [] and opt.algorithm == "EM"

    hand = {k: v.detach().clone() for k, v in init.items()}
    ours_ll, hand_ll = [], []
    for _ in range(40):
        post = guide.posterior(X, y)
        ours_ll.append(float(post.log_likelihood))
        opt(guide, post, (X, y), {})
        ll, hand = hand_em_step(X, y, hand)
        hand_ll.append(ll)
        now = _store()
        for name in hand:
            torch.testing.assert_close(now[name], hand[name], rtol=1e-8, atol=1e-8)
        assert ours_ll[-1] == pytest.approx(hand_ll[-1], rel=1e-10)
    # EM: monotone
    assert all(b >= a - 1e-8 for a, b in itertools.pairwise(ours_ll))
    # the optimum: hand-written EM run on to convergence
    for _ in range(500):
        ll, new = hand_em_step(X, y, hand)
        hand_ll.append(ll)
        done = max((new[k] - hand[k]).abs().max() for k in hand) < 1e-12
        hand = new
        if done:
            break
    best = max(hand_ll)
    n_hand = _iterations_to(hand_ll, best)
    n_ours = _iterations_to(ours_ll, best)
    assert n_ours <= 1.5 * n_hand, (n_ours, n_hand)


def test_mixture_of_regressions_fits_to_the_same_optimum():
    X, y, _ = sample_mixture_regression(500, K=3, D=4, seed=2)
    init = init_params(X, y, 3, seed=3)

    def model(X, y):
        mixture_regression(X, y, 3, init=init)

    pyro.clear_param_store()
    result = fit(
        model, ExactEStep(model), X, y, optim=EMOptim(reg_covar=0.0), max_iter=500, tol=1e-12
    )
    assert result.converged
    hand = {k: v.detach().clone() for k, v in init.items()}
    for _ in range(2000):
        _, new = hand_em_step(X, y, hand)
        done = max((new[k] - hand[k]).abs().max() for k in hand) < 1e-12
        hand = new
        if done:
            break
    for name in hand:
        torch.testing.assert_close(result.params[name], hand[name], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- one regression
LOCS = {
    "matmul": lambda X, w, b0: X @ w + b0,
    "rmatmul_bias_first": lambda X, w, b0: b0 + X @ w,
    "mul_sum": lambda X, w, b0: (X * w).sum(-1) + b0,
    "vector_matmul": lambda X, w, b0: w @ X.T + b0,
    "torch_matmul_consts": lambda X, w, b0: 1.0 + torch.matmul(X, w) - 1.0 + b0,
    "scaled": lambda X, w, b0: 0.5 * (2.0 * X @ w) + b0,
}


@pytest.mark.parametrize("form", list(LOCS), ids=list(LOCS))
def test_a_linear_regression_is_ordinary_least_squares(form):
    """No latent: one M-step sets (w, b0) to the OLS solution and sigma to the residual
    root-mean-square about it, whatever way the loc is written."""
    g = torch.Generator().manual_seed(0)
    n, d = 50, 3
    X = torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(n, generator=g)
    loc = LOCS[form]

    def model(X, y):
        w = pyro.param("w", torch.zeros(d))
        b0 = pyro.param("b0", torch.tensor(0.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(loc(X, w, b0), s), obs=y)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    opt = EMOptim(reg_covar=0.0)
    plan = opt.plan(guide, (X, y), {})
    assert sorted(plan.closed_form) == ["b0", "s", "w"], plan.reasons
    opt(guide, guide.posterior(X, y), (X, y), {})
    design = torch.cat([X, torch.ones(n, 1)], -1)
    beta = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(pyro.param("w").detach(), beta[:d], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pyro.param("b0").detach(), beta[d], rtol=1e-10, atol=1e-10)
    rms = (y - design @ beta).pow(2).mean().sqrt()
    torch.testing.assert_close(pyro.param("s").detach(), rms, rtol=1e-10, atol=1e-10)


def test_a_gradient_bias_is_held_and_w_is_its_conditional_maximizer():
    """closed_form without the bias: W's update is least squares given the bias's value
    (ECM), the bias is left to gradient steps."""
    g = torch.Generator().manual_seed(1)
    n, d = 40, 2
    X = torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, 2.0]) + 1.5 + 0.1 * torch.randn(n, generator=g)

    def model(X, y):
        w = pyro.param("w", torch.zeros(d))
        b0 = pyro.param("b0", torch.tensor(0.7))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(X @ w + b0, 1.0), obs=y)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    opt = EMOptim(closed_form=["w"], svi_steps=0)
    opt(guide, guide.posterior(X, y), (X, y), {})
    expected = torch.linalg.lstsq(X, (y - 0.7).unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(pyro.param("w").detach(), expected, rtol=1e-10, atol=1e-10)
    assert float(pyro.param("b0")) == pytest.approx(0.7)


def test_precision_weighted_across_components_and_the_scale_reads_the_new_fit():
    """A weight vector shared by components of different scales (one block for all):
    the least squares are precision-weighted; the scales are about the new fit."""
    g = torch.Generator().manual_seed(4)
    n, d = 60, 2
    X = torch.randn(n, d, generator=g)
    y = X @ torch.tensor([1.0, -1.0]) + torch.randn(n, generator=g)

    def model(X, y):
        pi = pyro.param("pi", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        w = pyro.param("w", torch.zeros(d))
        s = pyro.param("s", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Categorical(pi), infer=PAR)
            pyro.sample("y", dist.Normal(X @ w, s[z]), obs=y)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    post = guide.posterior(X, y)
    r = guide.marginals(X, y)["z"]  # (N, K)
    opt = EMOptim(reg_covar=0.0)
    assert "w" in opt.plan(guide, (X, y), {}).closed_form
    opt(guide, post, (X, y), {})
    lam = (r / torch.tensor([0.5, 2.0]) ** 2).sum(-1)  # each datum's expected precision
    w = torch.linalg.solve(X.T @ (lam.unsqueeze(-1) * X), X.T @ (lam * y))
    torch.testing.assert_close(pyro.param("w").detach(), w, rtol=1e-10, atol=1e-10)
    resid2 = (y - X @ w) ** 2
    s = ((r * resid2.unsqueeze(-1)).sum(0) / r.sum(0)).sqrt()
    torch.testing.assert_close(pyro.param("s").detach(), s, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- refusals
def _plan(model, *args):
    pyro.clear_param_store()
    return EMOptim().plan(ExactEStep(model), args, {})


def test_a_weight_also_used_as_a_plain_loc_takes_gradient_steps():
    X, y = torch.randn(10, 2), torch.randn(10)

    def model(X, y):
        w = pyro.param("w", torch.zeros(2))
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)
        pyro.sample("prior", dist.Normal(w, 1.0).to_event(1), obs=torch.zeros(2))

    plan = _plan(model, X, y)
    assert plan.gradient == ["w"]
    assert "different closed forms" in plan.reasons["w"]


def test_a_design_that_depends_on_the_weight_takes_gradient_steps():
    X, y = torch.randn(10, 2), torch.randn(10)

    def model(X, y):
        w = pyro.param("w", torch.ones(2))
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Normal((X * w.exp()) @ w, 1.0), obs=y)

    plan = _plan(model, X, y)
    assert plan.gradient == ["w"]
    assert "no rule sees through" in plan.reasons["w"]


def test_a_product_of_two_params_takes_gradient_steps():
    X, y = torch.randn(10, 2), torch.randn(10)

    def model(X, y):
        w = pyro.param("w", torch.ones(2))
        c = pyro.param("c", torch.tensor(1.0))
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Normal(c * (X @ w), 1.0), obs=y)

    plan = _plan(model, X, y)
    assert sorted(plan.gradient) == ["c", "w"]


def test_a_constrained_weight_takes_gradient_steps():
    X, y = torch.randn(10, 2), torch.randn(10)

    def model(X, y):
        w = pyro.param("w", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    plan = _plan(model, X, y)
    assert plan.gradient == ["w"] and "linear loc" in plan.reasons["w"]


def test_a_linear_rate_is_not_claimed():
    """A Poisson rate linear in a param has no least-squares rule: gradient steps."""
    X, y = torch.rand(10, 2), torch.ones(10)

    def model(X, y):
        w = pyro.param("w", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", 10):
            pyro.sample("y", dist.Poisson(X @ w), obs=y)

    plan = _plan(model, X, y)
    assert plan.gradient == ["w"] and "Poisson" in plan.reasons["w"]


def test_a_singular_design_warns_and_keeps_the_current_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, generator=g)
    X = torch.cat([x, x], -1)  # two equal columns: rank 1
    y = 2 * x.squeeze(-1)

    def model(X, y):
        w = pyro.param("w", torch.tensor([0.3, 0.4]))
        with pyro.plate("data", 20):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    opt = EMOptim()
    opt.plan(guide, (X, y), {})
    with pytest.warns(UserWarning, match="singular"):
        opt(guide, guide.posterior(X, y), (X, y), {})
    torch.testing.assert_close(pyro.param("w").detach(), torch.tensor([0.3, 0.4]))


def test_an_empty_component_keeps_its_regression():
    """A component no datum can belong to (its posterior underflows to 0: a line far from
    every point, with a tiny scale) keeps its W and b, with a warning."""
    X, y, _ = sample_mixture_regression(100, K=2, D=2, seed=5)
    init = init_params(X, y, 2, seed=6)
    init["b"][1], init["sigma"][1] = 1e4, 0.01

    def model(X, y):
        mixture_regression(X, y, 2, init=init)

    pyro.clear_param_store()
    guide = ExactEStep(model)
    opt = EMOptim(reg_covar=0.0)
    opt.plan(guide, (X, y), {})
    assert guide.marginals(X, y)["z"][:, 1].max() == 0
    with pytest.warns(UserWarning, match="no posterior mass"):
        opt(guide, guide.posterior(X, y), (X, y), {})
    torch.testing.assert_close(pyro.param("W").detach()[1], init["W"][1])
    torch.testing.assert_close(pyro.param("b").detach()[1], init["b"][1])


def test_streaming_equals_the_full_batch():
    """The statistics are additive: an exact streaming pass over chunks gives the same
    update as the whole data."""
    from pyro_emvae import Batches

    X, y, _ = sample_mixture_regression(300, K=2, D=3, seed=7)
    init = init_params(X, y, 2, seed=8)

    def model(X, y):
        mixture_regression(X, y, 2, init=init)

    out = {}
    for how in ("full", "stream"):
        pyro.clear_param_store()
        data = (X, y) if how == "full" else (Batches(list(zip(X.split(100), y.split(100)))),)
        res = fit(model, ExactEStep(model), *data, optim=EMOptim(), max_iter=3, tol=0)
        out[how] = res.params
    for name in ("W", "b", "sigma", "weights"):
        torch.testing.assert_close(out["stream"][name], out["full"][name], rtol=1e-9, atol=1e-9)
    assert math.isfinite(float(out["full"]["W"].sum()))
