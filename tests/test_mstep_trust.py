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
import math
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

from pyro_emvae import ClosedFormWarning, EMOptim, ExactEStep, fit
from pyro_emvae.rules import RULES, Stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.count_mixtures import poisson_mixture, sample_poisson_mixture
from models.gmm import gmm_model, init_params, sample_gmm
from models.hmm import categorical_hmm, sample_categorical_hmm

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


# ---------------------------------------------------------------------------- item 5
def _contaminated(n=200, seed=0):
    """A Gaussian with a shared mean and two covariances (the bulk and a wide contamination)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) + torch.tensor([1.0, -0.5])
    x[: n // 5] = x[: n // 5] * 4 + torch.tensor([3.0, 2.0])

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        mu = pyro.param("mu", torch.zeros(2))
        scale = torch.tensor([1.0, 3.0]).view(2, 1, 1)
        L = pyro.param("L", torch.eye(2) * scale, constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.MultivariateNormal(mu, scale_tril=L[z]), obs=x)

    return model, x


def test_mvn_loc_shared_under_different_covariances_converges_to_a_stationary_point():
    """``MVN(mu, scale_tril=L[z])``: the plain weighted mean is not the maximizer; the update
    is precision-weighted. Before: converged at -820.15 with d log p / d mu = (-63, -11)."""
    model, x = _contaminated()
    result, opt = em(model, x)
    assert "mu" in opt._plan.closed_form and "mu" not in opt._plan.plain_locs
    assert result.converged
    assert_monotone(result.history["log_likelihood"])
    assert_stationary(model, x, n_data=len(x))
    ours = values()
    pyro.clear_param_store()
    best = lbfgs_optimum(model, x)  # from the same initial values
    assert result.log_likelihood == pytest.approx(best, abs=1e-6)
    assert torch.allclose(ours["mu"], pyro.param("mu").detach(), atol=1e-5)


def _per_datum_covariance(n=120, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(n) % 2
    a = torch.randn(n, 2, 2, generator=g) * 0.7
    S = a @ a.mT + 0.2 * torch.eye(2)  # known, one per datum
    centers = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    x = centers[z] + (torch.linalg.cholesky(S) @ torch.randn(n, 2, 1, generator=g)).squeeze(-1)

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        m = pyro.param("m", torch.tensor([[-1.0, 0.5], [1.0, -0.5]]))
        with pyro.plate("data", len(x)):
            k = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.MultivariateNormal(m[k], covariance_matrix=S), obs=x)

    return model, x, S


def test_mvn_loc_with_a_known_covariance_per_datum_is_precision_weighted():
    model, x, S = _per_datum_covariance()
    guide = ExactEStep(model)
    opt = EMOptim(reg_covar=0.0)
    guide.posterior(x)  # (creates the params)
    w0, m0 = pyro.param("w").detach().clone(), pyro.param("m").detach().clone()
    post = guide.posterior(x)
    opt(guide, post, (x,), {})
    # by hand: r from Bayes' rule, then m_k = (sum_n r_nk P_n)^-1 sum_n r_nk P_n x_n
    loglik = dist.MultivariateNormal(m0, covariance_matrix=S.unsqueeze(1)).log_prob(x.unsqueeze(1))
    r = torch.softmax(w0.log() + loglik, -1)
    P = torch.linalg.inv(S)
    for k in range(2):
        a = (r[:, k, None, None] * P).sum(0)
        b = (r[:, k, None, None] * P @ x.unsqueeze(-1)).sum(0).squeeze(-1)
        assert torch.allclose(pyro.param("m")[k], torch.linalg.solve(a, b), atol=1e-10)
    pyro.clear_param_store()
    result, _ = em(model, x)
    assert result.converged
    assert_monotone(result.history["log_likelihood"])  # before: log p(x) fell
    assert_stationary(model, x, n_data=len(x))


def test_gmm_locs_keep_the_plain_weighted_mean():
    """One covariance per loc row (full, tied): the weighted mean, as before."""
    x, _ = sample_gmm(150, 3, 2, seed=0, separation=3.0)
    for cov in ("full", "tied"):
        pyro.clear_param_store()
        init = init_params(x, 3, cov, seed=0)
        opt = EMOptim()
        guide = ExactEStep(lambda x, cov=cov, init=init: gmm_model(x, 3, cov, init=init))
        opt.plan(guide, (x,), {})
        assert opt._plan.plain_locs == frozenset({"locs"})


def test_mvn_loc_shared_across_sites_of_different_covariances_is_precision_weighted():
    """Two sites read one loc with two fixed covariances: no single covariance per row."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 2, generator=g), 3 * torch.randn(30, 2, generator=g) + 1
    ca, cb = torch.eye(2), torch.tensor([[9.0, 2.0], [2.0, 4.0]])

    def model(a, b):
        mu = pyro.param("mu", torch.zeros(2))
        with pyro.plate("a", len(a)):
            pyro.sample("xa", dist.MultivariateNormal(mu, covariance_matrix=ca), obs=a)
        with pyro.plate("b", len(b)):
            pyro.sample("xb", dist.MultivariateNormal(mu, covariance_matrix=cb), obs=b)

    _, opt = em(model, a, b, max_iter=3)
    assert opt._plan.plain_locs == frozenset()
    pa, pb = torch.linalg.inv(ca), torch.linalg.inv(cb)
    expected = torch.linalg.solve(len(a) * pa + len(b) * pb, pa @ a.sum(0) + pb @ b.sum(0))
    assert torch.allclose(pyro.param("mu"), expected, atol=1e-12)


def test_a_constrained_mvn_loc_takes_gradient_steps():
    model, x = _contaminated(60)

    def constrained(x):
        pyro.param("mu", torch.zeros(2), constraint=constraints.interval(-5.0, 5.0))
        model(x)

    opt = EMOptim()
    guide = ExactEStep(constrained)
    guide.posterior(x)
    plan = opt.plan(guide, (x,), {})
    assert "mu" in plan.gradient and "MultivariateNormal loc" in plan.reasons["mu"]


# ---------------------------------------------------------------------------- item 6
def _two_clusters(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n // 2, generator=g) - 3, torch.randn(n // 2, generator=g) + 4])


def _normal_mixture(constraint):
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]), constraint=constraint)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    return model


INSIDE = [
    constraints.real,
    constraints.interval(-10.0, 10.0),
    constraints.half_open_interval(-10.0, 10.0),
    constraints.greater_than(-10.0),
    constraints.greater_than_eq(-10.0),
    constraints.less_than(10.0),
    constraints.independent(constraints.interval(-10.0, 10.0), 1),
    constraints.interval(torch.tensor([-10.0, -1.0]), torch.tensor([1.0, 10.0])),
]


@pytest.mark.parametrize("constraint", INSIDE, ids=lambda c: type(c).__name__)
def test_bounded_locs_match_the_unconstrained_fit_when_the_optimum_is_inside(constraint):
    """Before: any interval was clamped to [1e-12, 1 - 1e-12] (locs in [0, 1]; log p(x)
    -713.84 instead of -208.05)."""
    x = _two_clusters()
    free, _ = em(_normal_mixture(constraints.real), x)
    free_loc = pyro.param("loc").detach().clone()
    pyro.clear_param_store()
    result, opt = em(_normal_mixture(constraint), x)
    assert "loc" in opt._plan.closed_form
    assert result.log_likelihood == pytest.approx(free.log_likelihood, abs=1e-8)
    assert torch.allclose(pyro.param("loc"), free_loc, atol=1e-8)
    assert_stationary(_normal_mixture(constraint), x, n_data=len(x))


@pytest.mark.parametrize(
    "constraint, bound",
    [
        (constraints.interval(-10.0, 2.0), 2.0),
        (constraints.half_open_interval(-10.0, 2.0), 2.0),
        (constraints.less_than(2.0), 2.0),
        (constraints.interval(torch.tensor([-10.0, -10.0]), torch.tensor([10.0, 2.0])), 2.0),
    ],
    ids=["interval", "half_open", "less_than", "tensor_bounds"],
)
def test_bounded_locs_stop_at_the_bound_when_the_optimum_is_outside(constraint, bound):
    x = _two_clusters()
    model = _normal_mixture(constraint)
    result, _ = em(model, x)
    loc = pyro.param("loc").detach()
    assert bound - 1e-9 < float(loc[1]) < bound  # strictly inside, at the bound
    assert_monotone(result.history["log_likelihood"])
    # the constrained optimum (KKT): the gradient pushes outward at the bound, ~0 elsewhere
    _, grads = log_px_and_grads(model, x)
    assert float(grads["loc"][1]) > 1.0
    assert abs(float(grads["loc"][0])) / len(x) < 1e-4
    # and it is the best point of the interval: L-BFGS from there finds no better one
    fitted = result.log_likelihood
    assert lbfgs_optimum(model, x) <= fitted + 1e-6


@pytest.mark.parametrize(
    "constraint, expected",
    [
        (constraints.positive, None),
        (constraints.interval(0.0, 100.0), None),
        (constraints.greater_than(5.0), None),
        (constraints.interval(0.0, 20.0), 20.0),
        (constraints.greater_than(40.0), 40.0),
    ],
    ids=["positive", "interval_0_100", "greater_than_5", "interval_0_20", "greater_than_40"],
)
def test_bounded_poisson_rates(constraint, expected):
    """Before: ``interval(0, 100)`` made every rate 1 (log p(x) -7406 instead of -306)."""
    c = torch.poisson(torch.full((100,), 30.0), generator=torch.Generator().manual_seed(0))

    def model(c):
        rate = pyro.param("rate", torch.tensor([45.0]), constraint=constraint)
        with pyro.plate("data", len(c)):
            pyro.sample("c", dist.Poisson(rate[0]), obs=c)

    result, _ = em(model, c, max_iter=5)
    rate = float(pyro.param("rate"))
    if expected is None:
        assert rate == pytest.approx(float(c.mean()), abs=1e-10)
        assert result.log_likelihood == pytest.approx(
            float(dist.Poisson(c.mean()).log_prob(c).sum()), abs=1e-8
        )
    else:
        assert abs(rate - expected) < 1e-8 * max(1.0, expected)


def test_bernoulli_probs_and_normal_scales_clip_into_their_intervals():
    g = torch.Generator().manual_seed(3)
    b = (torch.rand(200, generator=g) < 0.1).double()
    y = torch.randn(200, generator=g)

    def model(b, y):
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.interval(0.2, 0.8))
        s = pyro.param("s", torch.tensor(3.0), constraint=constraints.greater_than(2.0))
        with pyro.plate("data", len(b)):
            pyro.sample("b", dist.Bernoulli(p), obs=b)
            pyro.sample("y", dist.Normal(0.0, s), obs=y)

    em(model, b, y, max_iter=3)
    assert 0.2 < float(pyro.param("p")) < 0.2 + 1e-9
    assert 2.0 < float(pyro.param("s")) < 2.0 + 1e-9


@pytest.mark.parametrize(
    "site, constraint, closed",
    [
        ("loc", constraints.simplex, False),
        ("loc", constraints.ordered_vector, False),
        ("loc", constraints.positive_ordered_vector, False),
        ("probs", constraints.simplex, True),
        ("probs", constraints.positive, True),
        ("probs", constraints.unit_interval, True),
        ("probs", constraints.interval(0.0, 0.5), False),
        ("scale_tril", constraints.lower_cholesky, True),
        ("scale_tril", constraints.softplus_lower_cholesky, True),
        ("scale_tril", constraints.corr_cholesky, False),
        ("scale_tril", constraints.unit_lower_cholesky, False),
        ("covariance_matrix", constraints.positive_definite, True),
        ("covariance_matrix", constraints.corr_matrix, False),
    ],
)
def test_every_constraint_is_respected_or_left_to_gradient_steps(site, constraint, closed):
    x = torch.randn(20, 2)
    eye = torch.eye(2)
    init = {
        "loc": torch.tensor([0.1, 0.9]),
        "probs": torch.tensor([0.3, 0.4, 0.3]),
        "scale_tril": eye,
        "covariance_matrix": eye,
    }[site]

    def model(x):
        t = pyro.param("t", init, constraint=constraint)
        with pyro.plate("data", len(x)):
            if site == "loc":
                pyro.sample("x", dist.Normal(t, 1.0).to_event(1), obs=x)
            elif site == "probs":
                pyro.sample("k", dist.Categorical(t), obs=(x[:, 0] > 0).long())
            else:
                pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), **{site: t}), obs=x)

    guide = ExactEStep(model)
    guide.posterior(x)
    plan = EMOptim().plan(guide, (x,), {})
    assert ("t" in plan.closed_form) == closed, plan.reasons
    if not closed:
        assert "constraint" in plan.reasons["t"]
    else:
        em(model, x, max_iter=2)  # the update writes a value inside the constraint
        assert constraint.check(pyro.param("t").detach()).all()


def test_a_param_in_two_roles_takes_gradient_steps():
    """``Normal(theta, theta)``, or a rate that is also a loc: the rules' statistics would mix."""
    y = torch.rand(10) + 0.5

    def model(y):
        t = pyro.param("t", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(t, t), obs=y)
            pyro.sample("c", dist.Poisson(t), obs=y.round())

    guide = ExactEStep(model)
    guide.posterior(y)
    plan = EMOptim().plan(guide, (y,), {})
    assert plan.gradient == ["t"] and "different closed forms" in plan.reasons["t"]


def test_a_mixture_same_family_param_is_not_claimed_closed_form():
    """No rule reads a MixtureSameFamily: its component locs stayed at their initial value
    while fit reported converged."""
    x = _two_clusters(120)

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            mix = dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(loc, 1.0))
            pyro.sample("x", mix, obs=x)

    opt = EMOptim(svi_optim=pyro.optim.Adam({"lr": 0.1}), svi_steps=20)
    result = fit(model, ExactEStep(model), x, optim=opt, max_iter=300, tol=1e-9)
    assert opt._plan.closed_form == [] and "MixtureSameFamily" in opt._plan.reasons["loc"]
    assert result.converged
    assert_stationary(model, x, n_data=len(x), atol=1e-3)


def test_the_plan_is_probed_again_when_gradient_params_move():
    """A closed-form loc reads scales computed from gradient params (two sites, no plate):
    the plan was cached with the probe's values, so the loc update kept weighting the two
    sites by the first iteration's scales and EM stopped away from the optimum."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=g) * 0.5 + 1, torch.randn(40, generator=g) * 3 + 4

    def model(a, b):
        loc = pyro.param("loc", torch.tensor(0.0))
        rho = pyro.param("rho", torch.tensor([0.0, 2.0]))  # scales 0.69, 2.13 (best: ~0.5, 3)
        scale = torch.nn.functional.softplus(rho)
        pyro.sample("a", dist.Normal(loc, scale[0]).expand([len(a)]).to_event(1), obs=a)
        pyro.sample("b", dist.Normal(loc, scale[1]).expand([len(b)]).to_event(1), obs=b)

    opt = EMOptim(reg_covar=0.0, svi_optim=pyro.optim.Adam({"lr": 0.1}), svi_steps=20)
    result = fit(model, ExactEStep(model), a, b, optim=opt, max_iter=400, tol=1e-9)
    assert opt._plan.closed_form == ["loc"] and result.converged
    assert_stationary(model, a, b, n_data=len(a) + len(b), atol=1e-3, max_plate_nesting=0)


# ---------------------------------------------------------------------------- item 8
def _poisson_data():
    data, _ = sample_poisson_mixture(150, 2, 1, seed=0)
    return data


def test_the_guard_names_a_closed_form_that_lowers_log_px(monkeypatch):
    """A rule resting on a broken assumption (here: a rate set to twice its maximizer) lowers
    log p(x) after a purely closed-form M-step: the guard warns and names it."""
    data = _poisson_data()

    def wrong(fn, value, weight, stats, stage, current):
        t = fn.__dict__.get("rate")
        if stage == 0:
            stats.add("mean_num", t.ids, weight, 2 * value)
            stats.add("mean_den", t.ids, weight)

    monkeypatch.setitem(RULES, dist.Poisson, wrong)
    opt = EMOptim()
    with pytest.warns(ClosedFormWarning, match=r"param\(s\) \['rates'\] does not") as caught:
        result = fit(
            lambda x: poisson_mixture(x, 2), ExactEStep(lambda x: poisson_mixture(x, 2)), data,
            optim=opt, max_iter=4, tol=0,
        )  # fmt: skip
    h = result.history["log_likelihood"]
    assert min(b - a for a, b in itertools.pairwise(h)) < -1.0  # it did fall
    assert len([w for w in caught if issubclass(w.category, ClosedFormWarning)]) == 1  # once


def test_the_guard_names_a_wrong_closed_form_over_a_stream(monkeypatch):
    from pyro_emvae import Batches

    data = _poisson_data()

    def wrong(fn, value, weight, stats, stage, current):
        if stage == 0:
            stats.add("mean_num", fn.__dict__["rate"].ids, weight, 2 * value)
            stats.add("mean_den", fn.__dict__["rate"].ids, weight)

    monkeypatch.setitem(RULES, dist.Poisson, wrong)

    def model(x):
        poisson_mixture(x, 2)

    with pytest.warns(ClosedFormWarning, match="rates"):
        fit(model, ExactEStep(model), Batches(list(data.split(50))), max_iter=4, tol=0)


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_a_regularized_closed_form_may_lower_log_px_without_a_warning(kind):
    """reg_covar = 4 at the unregularized optimum lowers log p(x) by what the regularization
    costs (not a wrong closed form): no warning, the update stands (commit bac153a)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(60, 2, generator=g) - 3, torch.randn(60, 2, generator=g) + 3])
    if kind == "normal":
        x = x[:, 0]

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        loc = pyro.param("loc", x[[0, -1]].clone())
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if kind == "normal":
                s = pyro.param("s", torch.ones(2), constraint=constraints.positive)
                pyro.sample("x", dist.Normal(loc[z], s[z]), obs=x)
            else:
                L = pyro.param(
                    "L", torch.eye(2).expand(2, 2, 2), constraint=constraints.lower_cholesky
                )
                pyro.sample("x", dist.MultivariateNormal(loc[z], scale_tril=L[z]), obs=x)

    em(model, x, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormWarning)
        result, opt = em(model, x, reg_covar=4.0, max_iter=3, tol=0)
    h = result.history["log_likelihood"]
    assert h[1] < h[0] - 1.0 and opt.rejected == []


def test_a_large_min_prob_may_lower_log_px_without_a_warning():
    """A probability whose maximizer is 0, clamped to min_prob = 0.05: the clamp's cost."""
    b = torch.zeros(100)

    def model(b):
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        with pyro.plate("data", len(b)):
            pyro.sample("b", dist.Bernoulli(p), obs=b)

    pyro.param("p", torch.tensor(0.01), constraint=constraints.unit_interval)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormWarning)
        result, _ = em(model, b, min_prob=0.05, max_iter=2, tol=0)
    h = result.history["log_likelihood"]
    assert h[1] < h[0] and float(pyro.param("p")) == pytest.approx(0.05)


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


# ------------------------------------------------------------------ converged = stationary
@pytest.mark.parametrize("cov", ["full", "diag", "tied", "spherical"])
def test_a_converged_gmm_is_stationary(cov):
    x, truth = sample_gmm(120, 2, 2, seed=0, separation=3.0, covariance_type=cov)
    init = {k: v * 1.2 if k != "weights" else v for k, v in truth.items()}  # (near: fast)

    def model(x):
        gmm_model(x, 2, cov, init=init)

    result, _ = em(model, x)
    assert result.converged
    assert_stationary(model, x, n_data=len(x))


def test_a_converged_poisson_mixture_is_stationary():
    data = _poisson_data()

    def model(x):
        poisson_mixture(x, 2)

    result, _ = em(model, data)
    assert result.converged
    assert_stationary(model, data, n_data=len(data))


def test_a_converged_categorical_hmm_is_stationary():
    data, truth = sample_categorical_hmm(N=6, T=40, K=2, M=3, seed=0)
    init = {k: 0.8 * v + 0.2 * v.flip(-1) for k, v in truth.items()}  # (near: fast)

    def model(x):
        categorical_hmm(x, 2, 3, init=init)

    result, _ = em(model, data, max_iter=2000)
    assert result.converged
    assert_stationary(model, data, n_data=data.numel())
    assert math.isfinite(result.log_likelihood)
