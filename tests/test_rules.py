"""Tests of :mod:`pyro_emvae.rules` and EMOptim's plan / summarize / maximize, one family at a time.

Each test builds a tiny model (one enumerated ``z`` with random weights, or no latent at all),
computes the posterior responsibilities ``r[n, k] = p(z_n = k | x_n)`` by hand with
``torch.distributions`` at the initial params, checks them against the E-step's marginals, and
compares EMOptim's closed-form update with the textbook formula written out from ``r``
(to 1e-10). Stage 0 (locations, probabilities, rates) is written to the param store before
stage 1 (scales, covariances) is summarized, as ``EMOptim.__call__`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from pyro_emvae import EMOptim, ExactEStep
from pyro_emvae.params import write as _write
from pyro_emvae.rules import HANDLED, RULES, Stats, summarize_site, unhandled_params
from pyro_emvae.track import probe

PAR = {"enumerate": "parallel"}
N, K = 7, 3
TOL = {"rtol": 1e-10, "atol": 1e-10}


# ---------------------------------------------------------------------------- helpers
@dataclass
class Step:
    plan: object
    post: object
    old: dict
    stats: tuple
    new: tuple  # (stage 0 values, stage 1 values)

    def value(self, name: str) -> torch.Tensor:
        """The param's value after the step (stage 1 if it moved there, else stage 0)."""
        if name in self.new[1]:
            return self.new[1][name]
        return self.new[0][name]


def _store() -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


def em_step(model, *args, force: tuple[str, ...] = (), reg_covar: float = 0.0, **kwargs) -> Step:
    """One ECM step by hand: posterior at the current params, then for stage 0 and 1
    summarize -> maximize -> write. ``force`` adds params to the plan's closed-form list (to
    check a rule's arithmetic where detection declines it)."""
    with poutine.trace():  # creates the params (quietly: observe sites inside a trace)
        model(*args, **kwargs)
    old = _store()
    guide = ExactEStep(model)
    post = guide.posterior(*args, **kwargs)
    opt = EMOptim(reg_covar=reg_covar)
    plan = opt.plan(guide, args, kwargs)
    for name in force:
        if name not in plan.closed_form:
            plan.closed_form.append(name)
            plan.gradient.remove(name)
    s0 = opt.summarize(plan, post, 0)
    new0 = opt.maximize(plan, s0, 0)
    _write(new0)
    s1 = opt.summarize(plan, post, 1)
    new1 = opt.maximize(plan, s1, 1)
    _write(new1)
    return Step(plan, post, old, (s0, s1), (new0, new1))


def responsibilities(log_w: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """``r[n, k] ∝ w_k p(x_n | k)`` from ``loglik`` of shape (N, K)."""
    return torch.softmax(log_w + loglik, -1)


def _random_simplex(*shape: int) -> torch.Tensor:
    e = torch.rand(*shape) + 0.2
    return e / e.sum(-1, keepdim=True)


def mixture(emit, data, w0, logits: bool = False):
    """``z ~ Categorical(w)`` (enumerated) and ``x ~ emit(z)`` observed, in a plate of N."""

    def model():
        w = pyro.param("w", w0.clone(), constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            zdist = dist.Categorical(logits=w.log()) if logits else dist.Categorical(w)
            z = pyro.sample("z", zdist, infer=PAR)
            pyro.sample("x", emit(z), obs=data)

    model.data = data
    return model


def check_weights(step: Step, r: torch.Tensor) -> None:
    assert torch.allclose(step.post.marginals["z"], r, **TOL)
    assert torch.allclose(step.value("w"), r.sum(0) / r.shape[0], **TOL)


def check_plan(step: Step, closed: set[str]) -> None:
    assert set(step.plan.closed_form) == closed, step.plan.reasons
    assert step.plan.gradient == []
    assert step.plan.reasons == {}


# ---------------------------------------------------------------------------- discrete families
@pytest.mark.parametrize("form", ["probs", "logits"])
def test_categorical(form):
    M = 4
    w0, p0 = _random_simplex(K), _random_simplex(K, M)
    x = torch.randint(M, (N,))

    def emit(z):
        p = pyro.param("p", p0.clone(), constraint=constraints.simplex)
        if form == "probs":
            return dist.Categorical(probs=p[z])
        lp = p.log()
        return dist.Categorical(logits=(lp - lp.logsumexp(-1, keepdim=True))[z])

    step = em_step(mixture(emit, x, w0, logits=form == "logits"))
    check_plan(step, {"w", "p"})
    r = responsibilities(w0.log(), p0.log()[:, x].T)
    check_weights(step, r)
    onehot = torch.nn.functional.one_hot(x, M).double()
    expected = (r.T @ onehot) / r.sum(0).unsqueeze(-1)
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_categorical_raw_logits_param_is_not_closed_form():
    """``Categorical(logits=p)`` with an unconstrained p: logsumexp of a value-form tracked
    tensor is not a normalization the tracker sees through, so p goes to gradient steps."""
    x = torch.randint(3, (N,))

    def model():
        p = pyro.param("p", torch.randn(3))
        with pyro.plate("data", N):
            pyro.sample("x", dist.Categorical(logits=p), obs=x)

    step = em_step(model)
    assert step.plan.closed_form == [] and step.plan.gradient == ["p"]
    assert step.new == ({}, {})


def _onehot_model(x, w0, p0):
    M = p0.shape[-1]

    def emit(z):
        p = pyro.param("p", p0.clone(), constraint=constraints.simplex)
        return dist.OneHotCategorical(p[z])

    return mixture(emit, torch.nn.functional.one_hot(x, M).double(), w0)


def test_one_hot_categorical():
    M = 4
    w0, p0 = _random_simplex(K), _random_simplex(K, M)
    x = torch.randint(M, (N,))
    step = em_step(_onehot_model(x, w0, p0))
    check_plan(step, {"w", "p"})
    r = responsibilities(w0.log(), p0.log()[:, x].T)
    expected = (r.T @ torch.nn.functional.one_hot(x, M).double()) / r.sum(0).unsqueeze(-1)
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_one_hot_categorical_rule_when_forced():
    M = 4
    w0, p0 = _random_simplex(K), _random_simplex(K, M)
    x = torch.randint(M, (N,))
    step = em_step(_onehot_model(x, w0, p0), force=("p",))
    r = responsibilities(w0.log(), p0.log()[:, x].T)
    check_weights(step, r)
    expected = (r.T @ torch.nn.functional.one_hot(x, M).double()) / r.sum(0).unsqueeze(-1)
    assert "p" in step.new[0]
    assert torch.allclose(step.value("p"), expected, **TOL)


def _multinomial_setup():
    M, total = 3, 5
    w0, p0 = _random_simplex(K), _random_simplex(K, M)
    x = dist.Multinomial(total, torch.ones(M) / M).sample((N,))

    def emit(z):
        p = pyro.param("p", p0.clone(), constraint=constraints.simplex)
        return dist.Multinomial(total, p[z])

    model = mixture(emit, x, w0)
    loglik = torch.stack([dist.Multinomial(total, p0[k]).log_prob(x) for k in range(K)], -1)
    r = responsibilities(w0.log(), loglik)
    expected = (r.T @ x) / (r.T @ x).sum(-1, keepdim=True)
    return model, r, expected


def test_multinomial():
    model, _r, expected = _multinomial_setup()
    step = em_step(model)
    check_plan(step, {"w", "p"})
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_multinomial_rule_when_forced():
    model, r, expected = _multinomial_setup()
    step = em_step(model, force=("p",))
    check_weights(step, r)
    assert torch.allclose(step.value("p"), expected, **TOL)


def _binary_mixture(family: str):
    w0 = _random_simplex(K)
    p0 = torch.rand(K) * 0.6 + 0.2
    n_trials = 6
    if family == "bernoulli":
        x = torch.randint(2, (N,)).double()
        make = lambda p: dist.Bernoulli(p)
    else:
        x = torch.randint(n_trials + 1, (N,)).double()
        make = lambda p: dist.Binomial(n_trials, p)

    def emit(z):
        p = pyro.param("p", p0.clone(), constraint=constraints.unit_interval)
        return make(p[z])

    model = mixture(emit, x, w0)
    loglik = make(p0).log_prob(x.unsqueeze(-1))
    r = responsibilities(w0.log(), loglik)
    n = 1.0 if family == "bernoulli" else float(n_trials)
    expected = (r * x.unsqueeze(-1)).sum(0) / (n * r.sum(0))
    return model, r, expected


def test_bernoulli():
    model, r, expected = _binary_mixture("bernoulli")
    step = em_step(model)
    check_plan(step, {"w", "p"})
    check_weights(step, r)
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_binomial_fixed_total_count():
    model, _r, expected = _binary_mixture("binomial")
    step = em_step(model)
    check_plan(step, {"w", "p"})
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_binomial_rule_when_forced():
    model, r, expected = _binary_mixture("binomial")
    step = em_step(model, force=("p",))
    check_weights(step, r)
    assert torch.allclose(step.value("p"), expected, **TOL)


def test_poisson():
    w0, rate0 = _random_simplex(K), torch.rand(K) * 4 + 0.5
    x = torch.randint(8, (N,)).double()

    def emit(z):
        rate = pyro.param("rate", rate0.clone(), constraint=constraints.positive)
        return dist.Poisson(rate[z])

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "rate"})
    r = responsibilities(w0.log(), dist.Poisson(rate0).log_prob(x.unsqueeze(-1)))
    check_weights(step, r)
    expected = (r * x.unsqueeze(-1)).sum(0) / r.sum(0)
    assert torch.allclose(step.value("rate"), expected, **TOL)


def test_exponential():
    w0, rate0 = _random_simplex(K), torch.rand(K) * 2 + 0.3
    x = torch.rand(N) * 3 + 0.1

    def emit(z):
        rate = pyro.param("rate", rate0.clone(), constraint=constraints.positive)
        return dist.Exponential(rate[z])

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "rate"})
    r = responsibilities(w0.log(), dist.Exponential(rate0).log_prob(x.unsqueeze(-1)))
    check_weights(step, r)
    expected = r.sum(0) / (r * x.unsqueeze(-1)).sum(0)
    assert torch.allclose(step.value("rate"), expected, **TOL)


@pytest.mark.parametrize("family", ["poisson", "exponential", "bernoulli"])
def test_no_latent_single_observed_site(family):
    """No enumerated site: the site's args are the params; the update is the plain MLE."""
    if family == "poisson":
        x, make, cons = torch.randint(6, (N,)).double(), dist.Poisson, constraints.positive
        init, expected = torch.tensor(2.0), x.mean()
    elif family == "exponential":
        x, make, cons = torch.rand(N) + 0.2, dist.Exponential, constraints.positive
        init, expected = torch.tensor(2.0), 1 / x.mean()
    else:
        x, make, cons = (
            torch.tensor([1.0, 0, 0, 1, 1, 1, 0]),
            dist.Bernoulli,
            constraints.unit_interval,
        )
        init, expected = torch.tensor(0.5), x.mean()

    def model():
        theta = pyro.param("theta", init.clone(), constraint=cons)
        with pyro.plate("data", N):
            pyro.sample("x", make(theta), obs=x)

    step = em_step(model)
    check_plan(step, {"theta"})
    assert torch.allclose(step.value("theta"), expected, **TOL)


def test_no_latent_normal_mle():
    x = torch.randn(N) * 2 + 1

    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", N):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    step = em_step(model)
    check_plan(step, {"loc", "scale"})
    assert torch.allclose(step.value("loc"), x.mean(), **TOL)
    assert torch.allclose(step.value("scale"), ((x - x.mean()) ** 2).mean().sqrt(), **TOL)


# ---------------------------------------------------------------------------- Normal
def test_normal_loc_and_scale_to_event():
    Dd = 2
    w0, locs0, scales0 = _random_simplex(K), torch.randn(K, Dd), torch.rand(K, Dd) + 0.5
    x = torch.randn(N, Dd) * 2

    def emit(z):
        locs = pyro.param("locs", locs0.clone())
        scales = pyro.param("scales", scales0.clone(), constraint=constraints.positive)
        return dist.Normal(locs[z], scales[z]).to_event(1)

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "locs", "scales"})
    loglik = dist.Normal(locs0, scales0).log_prob(x.unsqueeze(-2)).sum(-1)
    r = responsibilities(w0.log(), loglik)
    check_weights(step, r)
    nk = r.sum(0)
    mu = (r.T @ x) / nk.unsqueeze(-1)
    var = torch.stack([(r[:, k : k + 1] * (x - mu[k]) ** 2).sum(0) / nk[k] for k in range(K)])
    assert torch.allclose(step.new[0]["locs"], mu, **TOL)
    assert "scales" not in step.new[0]  # scales move in stage 1, given the new locs
    assert torch.allclose(step.new[1]["scales"], var.sqrt(), **TOL)


def test_normal_scale_shared_across_components_via_expand():
    Dd = 2
    w0, locs0, s0 = _random_simplex(K), torch.randn(K, Dd), torch.rand(Dd) + 0.5
    x = torch.randn(N, Dd) * 2

    def emit(z):
        locs = pyro.param("locs", locs0.clone())
        s = pyro.param("s", s0.clone(), constraint=constraints.positive)
        return dist.Normal(locs[z], s.expand(K, Dd)[z]).to_event(1)

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "locs", "s"})
    r = responsibilities(w0.log(), dist.Normal(locs0, s0).log_prob(x.unsqueeze(-2)).sum(-1))
    check_weights(step, r)
    mu = (r.T @ x) / r.sum(0).unsqueeze(-1)
    # one variance per dim, pooled over every component and point
    var = sum((r[:, k : k + 1] * (x - mu[k]) ** 2).sum(0) for k in range(K)) / N
    assert torch.allclose(step.value("locs"), mu, **TOL)
    assert torch.allclose(step.value("s"), var.sqrt(), **TOL)


def test_normal_scale_broadcast_over_event_dim_spherical():
    Dd = 3
    w0, locs0, s0 = _random_simplex(K), torch.randn(K, Dd), torch.rand(K) + 0.5
    x = torch.randn(N, Dd) * 2

    def emit(z):
        locs = pyro.param("locs", locs0.clone())
        s = pyro.param("s", s0.clone(), constraint=constraints.positive)
        return dist.Normal(locs[z], s[z].unsqueeze(-1)).to_event(1)

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "locs", "s"})
    r = responsibilities(
        w0.log(), dist.Normal(locs0, s0.unsqueeze(-1)).log_prob(x.unsqueeze(-2)).sum(-1)
    )
    mu = (r.T @ x) / r.sum(0).unsqueeze(-1)
    var = torch.stack([(r[:, k] * ((x - mu[k]) ** 2).sum(-1)).sum() for k in range(K)])
    var = var / (Dd * r.sum(0))
    assert torch.allclose(step.value("locs"), mu, **TOL)
    assert torch.allclose(step.value("s"), var.sqrt(), **TOL)


def test_normal_loc_shared_across_components_is_precision_weighted():
    """One loc, a scale per component: stage 0 weights each point by r / sigma_k^2."""
    w0, mu0, s0 = _random_simplex(K), torch.tensor(0.3), torch.rand(K) + 0.5
    x = torch.randn(N) * 2

    def emit(z):
        mu = pyro.param("mu", mu0.clone())
        s = pyro.param("s", s0.clone(), constraint=constraints.positive)
        return dist.Normal(mu, s[z])

    step = em_step(mixture(emit, x, w0))
    check_plan(step, {"w", "mu", "s"})
    r = responsibilities(w0.log(), dist.Normal(mu0, s0).log_prob(x.unsqueeze(-1)))
    lam = 1 / s0**2
    mu = (r * lam * x.unsqueeze(-1)).sum() / (r * lam).sum()
    var = (r * (x.unsqueeze(-1) - mu) ** 2).sum(0) / r.sum(0)
    assert torch.allclose(step.value("mu"), mu, **TOL)
    assert torch.allclose(step.value("s"), var.sqrt(), **TOL)


# ---------------------------------------------------------------------------- MVN
def _mvn_setup(kind: str, tying: str):
    Dd = 2
    w0, locs0 = _random_simplex(K), torch.randn(K, Dd)
    a = torch.randn(K, Dd, Dd) * 0.3
    cov0 = a @ a.mT + torch.eye(Dd)
    if tying == "tied":
        cov0 = cov0[0]
    init = {
        "scale_tril": torch.linalg.cholesky(cov0),
        "covariance_matrix": cov0,
        "precision_matrix": torch.linalg.inv(cov0),
    }[kind]
    cons = constraints.lower_cholesky if kind == "scale_tril" else constraints.positive_definite
    x = torch.randn(N, Dd) * 2

    def emit(z):
        locs = pyro.param("locs", locs0.clone())
        m = pyro.param("m", init.clone(), constraint=cons)
        return dist.MultivariateNormal(locs[z], **{kind: m[z] if tying == "full" else m})

    model = mixture(emit, x, w0)
    loglik = dist.MultivariateNormal(locs0, covariance_matrix=cov0).log_prob(x.unsqueeze(-2))
    r = responsibilities(w0.log(), loglik)
    nk = r.sum(0)
    mu = (r.T @ x) / nk.unsqueeze(-1)
    covs = torch.stack(
        [
            ((r[:, k, None, None] * (x - mu[k]).unsqueeze(-1) * (x - mu[k]).unsqueeze(-2)).sum(0))
            for k in range(K)
        ]
    )
    cov = covs.sum(0) / N if tying == "tied" else covs / nk[:, None, None]
    expected = {
        "scale_tril": torch.linalg.cholesky(cov),
        "covariance_matrix": cov,
        "precision_matrix": torch.linalg.inv(cov),
    }[kind]
    return model, r, mu, expected


def _opaque_cov(kind):
    return kind


@pytest.mark.parametrize("tying", ["full", "tied"])
@pytest.mark.parametrize(
    "kind", [_opaque_cov(k) for k in ("scale_tril", "covariance_matrix", "precision_matrix")]
)
def test_mvn(kind, tying):
    model, r, mu, expected = _mvn_setup(kind, tying)
    step = em_step(model)
    check_plan(step, {"w", "locs", "m"})
    check_weights(step, r)
    assert torch.allclose(step.new[0]["locs"], mu, **TOL)
    assert torch.allclose(step.new[1]["m"], expected, **TOL)


@pytest.mark.parametrize("tying", ["full", "tied"])
@pytest.mark.parametrize("kind", ["covariance_matrix", "precision_matrix"])
def test_mvn_rule_when_forced(kind, tying):
    model, r, mu, expected = _mvn_setup(kind, tying)
    step = em_step(model, force=("m",))
    check_weights(step, r)
    assert torch.allclose(step.new[0]["locs"], mu, **TOL)
    assert torch.allclose(step.new[1]["m"], expected, **TOL)


def test_reg_covar_is_added_to_variances_and_covariances():
    reg = 0.25
    model, r, mu, _ = _mvn_setup("scale_tril", "full")
    step = em_step(model, reg_covar=reg)
    x = model.data
    covs = torch.stack(
        [
            (r[:, k, None, None] * (x - mu[k]).unsqueeze(-1) * (x - mu[k]).unsqueeze(-2)).sum(0)
            / r[:, k].sum()
            for k in range(K)
        ]
    )
    expected = torch.linalg.cholesky(covs + reg * torch.eye(x.shape[-1]))
    assert torch.allclose(step.new[1]["m"], expected, **TOL)

    pyro.clear_param_store()
    y = torch.randn(N, 2)

    def normal_model():
        loc = pyro.param("loc", torch.zeros(2))
        s = pyro.param("s", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(loc, s).to_event(1), obs=y)

    step = em_step(normal_model, reg_covar=reg)
    yc = y - y.mean(0)
    assert torch.allclose(step.value("s"), ((yc**2).mean(0) + reg).sqrt(), **TOL)


@pytest.mark.parametrize(
    "kind",
    [
        "scale_tril",
        "covariance_matrix",
        "precision_matrix",
    ],
)
def test_mvn_without_latent_is_the_sample_covariance(kind):
    Dd = 2
    x = torch.randn(N, Dd) @ torch.tensor([[1.0, 0.0], [0.5, 0.7]])
    cons = constraints.lower_cholesky if kind == "scale_tril" else constraints.positive_definite

    def model():
        loc = pyro.param("loc", torch.zeros(Dd))
        m = pyro.param("m", torch.eye(Dd), constraint=cons)
        with pyro.plate("data", N):
            pyro.sample("x", dist.MultivariateNormal(loc, **{kind: m}), obs=x)

    step = em_step(model, force=("m",))
    xc = x - x.mean(0)
    cov = xc.T @ xc / N
    assert torch.allclose(step.value("loc"), x.mean(0), **TOL)
    expected = {
        "scale_tril": torch.linalg.cholesky(cov),
        "covariance_matrix": cov,
        "precision_matrix": torch.linalg.inv(cov),
    }[kind]
    assert torch.allclose(step.value("m"), expected, **TOL)


def test_param_passed_through_to_dtype():
    w0, rate0 = _random_simplex(K), torch.rand(K) * 4 + 0.5
    x = torch.randint(8, (N,)).double()

    def emit(z):
        rate = pyro.param("rate", rate0.clone(), constraint=constraints.positive)
        return dist.Poisson(rate.to(x.dtype)[z])

    step = em_step(mixture(emit, x, w0))
    r = responsibilities(w0.log(), dist.Poisson(rate0).log_prob(x.unsqueeze(-1)))
    assert torch.allclose(step.value("rate"), (r * x.unsqueeze(-1)).sum(0) / r.sum(0), **TOL)


# ---------------------------------------------------------------------------- Stats
def test_stats_add_is_elementwise_and_merges_kinds():
    a, b = Stats(5), Stats(5)
    a.add("mean_num", torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    a.add("count", torch.tensor([4]), torch.tensor([7.0]))
    b.add("mean_num", torch.tensor([1, 3]), torch.tensor([10.0, 20.0]))
    b.add("var_num", torch.tensor([[2, 2]]), torch.tensor(0.5))  # broadcasts, repeated ids add
    a.forms[0] = "simplex"
    b.forms[3] = "scale_tril"
    c = a + b
    assert torch.equal(c.sums["mean_num"], torch.tensor([1.0, 15.0, 0.0, 20.0, 0.0]))
    assert torch.equal(c.sums["count"], torch.tensor([0.0, 0, 0, 0, 7]))
    assert torch.equal(c.sums["var_num"], torch.tensor([0.0, 0, 1, 0, 0]))
    assert c.forms == {0: "simplex", 3: "scale_tril"} and c.size == 5
    # the operands are unchanged
    assert torch.equal(a.sums["mean_num"], torch.tensor([1.0, 5.0, 0.0, 0.0, 0.0]))
    assert set(a.sums) == {"mean_num", "count"} and set(b.sums) == {"mean_num", "var_num"}


def test_stats_sum_does_not_alias_operands():
    a, b = Stats(3), Stats(3)
    a.add("count", torch.tensor([0]), torch.tensor([1.0]))
    b.add("mean_num", torch.tensor([1]), torch.tensor([1.0]))
    c = a + b
    c.add("count", torch.tensor([0]), torch.tensor([5.0]))
    c.add("mean_num", torch.tensor([1]), torch.tensor([5.0]))
    assert torch.equal(a.sums["count"], torch.tensor([1.0, 0, 0]))
    assert torch.equal(b.sums["mean_num"], torch.tensor([0.0, 1, 0]))


def test_summaries_are_additive_over_disjoint_masks():
    x = torch.randint(6, (N,)).double()
    mask_a = torch.tensor([True, False, True, True, False, False, True])

    def model(mask):
        rate = pyro.param("rate", torch.tensor(2.0), constraint=constraints.positive)
        with pyro.plate("data", N), poutine.mask(mask=mask):
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def stats(mask):
        guide = ExactEStep(model)
        post = guide.posterior(mask)
        opt = EMOptim(reg_covar=0.0)
        return opt.summarize(opt.plan(guide, (mask,), {}), post, 0)

    with poutine.trace():
        model(torch.ones(N, dtype=torch.bool))
    full = stats(torch.ones(N, dtype=torch.bool))
    both = stats(mask_a) + stats(~mask_a)
    assert set(both.sums) == set(full.sums) == {"mean_num", "mean_den"}
    for k in full.sums:
        assert torch.allclose(both.sums[k], full.sums[k], **TOL)
    assert torch.allclose(full.sums["mean_num"], x.sum().reshape(1), **TOL)


# ---------------------------------------------------------------------------- unhandled uses
def _plan_of(model, *args):
    with poutine.trace():
        model(*args)
    guide = ExactEStep(model)
    return EMOptim().plan(guide, args, {})


def test_unhandled_params_nonlinear_loc_is_opaque_not_unhandled():
    y = torch.randn(N)

    def model(y):
        p = pyro.param("p", torch.tensor(0.2))
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(loc=p.exp(), scale=1.0), obs=y)

    with poutine.trace():
        model(y)
    tr, space = probe(model, (y,), {}, 1)
    assert unhandled_params(tr.nodes["y"]["fn"]) == set()  # not tracked at all ...
    assert space.opaque == {"p"}  # ... but recorded as an opaque use
    plan = _plan_of(model, y)
    assert plan.closed_form == [] and plan.gradient == ["p"]
    assert "no rule sees through" in plan.reasons["p"]


def test_unhandled_params_family_without_rule():
    y = torch.rand(N) + 0.1

    def model(y):
        p = pyro.param("p", torch.tensor(1.5), constraint=constraints.positive)
        with pyro.plate("data", N):
            pyro.sample("y", dist.Gamma(concentration=p, rate=1.0), obs=y)

    with poutine.trace():
        model(y)
    tr, space = probe(model, (y,), {}, 1)
    assert dist.Gamma not in RULES and dist.Gamma not in HANDLED
    assert space.opaque == set()
    assert unhandled_params(tr.nodes["y"]["fn"]) == {"p"}
    plan = _plan_of(model, y)
    assert plan.gradient == ["p"]
    assert "'y'" in plan.reasons["p"] and "Gamma" in plan.reasons["p"]
    # and summarize_site says no rule covers it
    stats = Stats(1)
    assert not summarize_site(tr.nodes["y"]["fn"], y, torch.ones(()), stats, 0, lambda t: t)
    assert stats.sums == {}


def test_unhandled_params_wrong_form_and_wrapped():
    y = torch.rand(N) + 0.1

    def model(y):
        p = pyro.param("p", torch.tensor(1.5), constraint=constraints.positive)
        q = pyro.param("q", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
        with pyro.plate("data", N):
            pyro.sample("y", dist.Normal(p.log(), 1.0), obs=y)  # log form: Normal wants value
            pyro.sample("v", dist.Gamma(q, 1.0).to_event(1).mask(False), obs=y.expand(2, N).T)

    with poutine.trace():
        model(y)
    tr, space = probe(model, (y,), {}, 1)
    assert space.opaque == set()
    assert unhandled_params(tr.nodes["y"]["fn"]) == {"p"}
    assert unhandled_params(tr.nodes["v"]["fn"]) == {"q"}  # through Masked and Independent
    plan = _plan_of(model, y)
    assert set(plan.gradient) == {"p", "q"} and plan.closed_form == []


def test_param_shared_by_handled_and_unhandled_site_gets_gradient():
    y = torch.rand(N) + 0.1

    def model(y):
        p = pyro.param("p", torch.tensor(1.5), constraint=constraints.positive)
        with pyro.plate("data", N):
            pyro.sample("a", dist.Poisson(p), obs=y.round())
            pyro.sample("b", dist.Gamma(p, 1.0), obs=y)

    plan = _plan_of(model, y)
    assert plan.closed_form == [] and plan.gradient == ["p"]


# ---------------------------------------------------------------------------- masks
def _poisson_mixture_masked(how: str):
    w0, rate0 = _random_simplex(K), torch.rand(K) * 4 + 0.5
    x = torch.randint(8, (N,)).double()
    mask = torch.tensor([True, True, False, True, False, True, True])
    x_obs = torch.where(mask, x, torch.tensor(1.0e6))  # garbage where masked

    def model():
        w = pyro.param("w", w0.clone(), constraint=constraints.simplex)
        rate = pyro.param("rate", rate0.clone(), constraint=constraints.positive)
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if how == "dist":
                pyro.sample("x", dist.Poisson(rate[z]).mask(mask), obs=x_obs)
            else:
                with poutine.mask(mask=mask):
                    pyro.sample("x", dist.Poisson(rate[z]), obs=x_obs)

    loglik = dist.Poisson(rate0).log_prob(x.unsqueeze(-1)) * mask.unsqueeze(-1)
    r = responsibilities(w0.log(), loglik)
    m = mask.double().unsqueeze(-1)
    expected = (r * m * x.unsqueeze(-1)).sum(0) / (r * m).sum(0)
    return model, r, m, x, expected


@pytest.mark.parametrize("how", ["dist", "poutine"])
def test_masked_positions_contribute_nothing(how):
    model, r, m, x, expected = _poisson_mixture_masked(how)
    step = em_step(model)
    check_plan(step, {"w", "rate"})
    check_weights(step, r)  # z is drawn everywhere: its counts use every point
    assert torch.allclose(step.value("rate"), expected, **TOL)
    s0 = step.stats[0]
    off = step.plan.space.offsets["rate"]
    assert torch.allclose(s0.sums["mean_den"][off : off + K], (r * m).sum(0), **TOL)
    assert torch.allclose(
        s0.sums["mean_num"][off : off + K], (r * m * x.unsqueeze(-1)).sum(0), **TOL
    )


# ---------------------------------------------------------------------------- subsampling
def test_subsample_scales_statistics_by_n_over_b():
    Nfull = 10
    idx = torch.tensor([1, 4, 5, 8])
    B = len(idx)
    w0, rate0 = _random_simplex(K), torch.rand(K) * 4 + 0.5
    x = torch.randint(8, (Nfull,)).double()

    def model():
        w = pyro.param("w", w0.clone(), constraint=constraints.simplex)
        rate = pyro.param("rate", rate0.clone(), constraint=constraints.positive)
        with pyro.plate("data", Nfull, subsample=idx) as ind:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Poisson(rate[z]), obs=x[ind])

    step = em_step(model)
    check_plan(step, {"w", "rate"})
    xb = x[idx]
    r = responsibilities(w0.log(), dist.Poisson(rate0).log_prob(xb.unsqueeze(-1)))
    assert torch.allclose(step.post.marginals["z"], r, **TOL)
    s0 = step.stats[0]
    space = step.plan.space
    ow, orate = space.offsets["w"], space.offsets["rate"]
    scale = Nfull / B
    assert torch.allclose(s0.sums["count"][ow : ow + K], scale * r.sum(0), **TOL)
    assert torch.allclose(s0.sums["mean_den"][orate : orate + K], scale * r.sum(0), **TOL)
    assert torch.allclose(
        s0.sums["mean_num"][orate : orate + K], scale * (r * xb.unsqueeze(-1)).sum(0), **TOL
    )
    # ratios: the scale cancels
    assert torch.allclose(step.value("w"), r.sum(0) / B, **TOL)
    assert torch.allclose(step.value("rate"), (r * xb.unsqueeze(-1)).sum(0) / r.sum(0), **TOL)


def test_subsample_no_latent_scales_statistics():
    Nfull, idx = 9, torch.tensor([0, 2, 3])
    x = torch.randint(6, (Nfull,)).double()

    def model():
        rate = pyro.param("rate", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", Nfull, subsample=idx) as ind:
            pyro.sample("x", dist.Poisson(rate), obs=x[ind])

    step = em_step(model)
    s0 = step.stats[0]
    assert torch.allclose(s0.sums["mean_den"], torch.tensor([3.0 * 3]), **TOL)
    assert torch.allclose(s0.sums["mean_num"], 3.0 * x[idx].sum().reshape(1), **TOL)
    assert torch.allclose(step.value("rate"), x[idx].mean(), **TOL)


def test_random_subsample_statistics_use_the_posterior_minibatch():
    Nfull, B = 40, 5
    x = torch.arange(Nfull).double()  # every point distinct: a wrong minibatch shows

    def model():
        rate = pyro.param("rate", torch.tensor(3.0), constraint=constraints.positive)
        with pyro.plate("data", Nfull, subsample_size=B) as ind:
            pyro.sample("x", dist.Poisson(rate), obs=x[ind])

    with poutine.trace():
        model()
    guide = ExactEStep(model)
    opt = EMOptim(reg_covar=0.0)
    stale = opt.plan(guide, (), {})  # probed on a minibatch of its own
    post = guide.posterior()
    ind = post.subsample.nodes["data"]["value"]
    if not torch.equal(stale.trace.nodes["data"]["value"], ind):
        with pytest.raises(ValueError, match="another minibatch"):
            opt.summarize(stale, post, 0)
    plan = opt.plan(guide, (), {}, post.subsample)
    new = opt.maximize(plan, opt.summarize(plan, post, 0), 0)
    assert torch.allclose(new["rate"], x[ind].mean(), **TOL)
