"""Tests of :class:`pyro_emvae.EMOptim`, the closed-form (and ECM) M-step.

Expected values come from outside the package: scikit-learn's ``GaussianMixture`` and
hmmlearn's ``GaussianHMM`` / ``CategoricalHMM`` run from the same initial params with their
priors and regularizers off; a generic optimizer (L-BFGS) maximizing the same
:math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]` for families no reference library covers; EM's own
guarantees (monotone log-likelihood, additive sufficient statistics); and the MAP-EM formula
for a symmetric Dirichlet prior.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import hmm as hmmlearn_hmm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

from pyro_emvae import EMOptim, ExactEStep, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.gmm import COVARIANCE_TYPES, gmm_model, init_params, sample_gmm
from models.hmm import (
    categorical_hmm,
    categorical_hmm_markov,
    discrete_hmm_logits,
    gaussian_hmm,
    gaussian_hmm_markov,
    sample_categorical_hmm,
    sample_gaussian_hmm,
)
from models.hmm import init_params as hmm_init_params

PAR = {"enumerate": "parallel"}
LL_RTOL = 1e-8
PARAM_ATOL = 1e-6


# ---------------------------------------------------------------------------- helpers
def _em(model, *args, n: int, **opt_kwargs):
    """``n`` plain EM iterations (``tol=0``: no early stop) with ``EMOptim(**opt_kwargs)``."""
    opt_kwargs.setdefault("reg_covar", 0.0)
    guide = ExactEStep(model)
    return fit(model, guide, *args, optim=EMOptim(**opt_kwargs), max_iter=n, tol=0)


def _close(ours, ref, atol=PARAM_ATOL, what=""):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err < atol, f"{what}: max |ours - reference| = {err:.3g}"


def _ll_close(ours: float, ref: float, what=""):
    assert np.isfinite(ours), what
    assert abs(ours - ref) <= LL_RTOL * abs(ref), f"{what}: {ours!r} vs {ref!r}"


def _gmm_data(N=300, K=3, D=2, seed=1):
    x, _ = sample_gmm(N, K, D, seed=seed, separation=3.0)
    return x


def _gmm_closure(K, covariance_type, init):
    def model(data):
        return gmm_model(data, K, covariance_type, init=init)

    return model


def _our_covariances(params, covariance_type):
    if covariance_type in ("diag", "spherical"):
        return params["scales"] ** 2
    L = params["scale_tril"]
    return L @ L.mT


def _sklearn_gmm(x, init, covariance_type, n):
    if covariance_type in ("diag", "spherical"):
        precisions = 1.0 / init["scales"] ** 2
    else:
        L = init["scale_tril"]
        precisions = torch.linalg.inv(L @ L.mT)
    gm = GaussianMixture(
        n_components=init["weights"].shape[0],
        covariance_type=covariance_type,
        reg_covar=0.0,
        tol=0.0,
        max_iter=n,
        weights_init=init["weights"].numpy(),
        means_init=init["locs"].numpy(),
        precisions_init=precisions.numpy(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(x.numpy())
    return gm, float(gm.score(x.numpy())) * x.shape[0]


# ---------------------------------------------------------------------------- 1. GMM = sklearn
@pytest.mark.parametrize("n", [1, 5, 50])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gmm_matches_sklearn(covariance_type, n):
    x = _gmm_data()
    init = init_params(x, 3, covariance_type, seed=2)
    result = _em(_gmm_closure(3, covariance_type, init), x, n=n)
    gm, ll = _sklearn_gmm(x, init, covariance_type, n)
    assert result.algorithm == "EM"
    assert result.n_iter == n and len(result.history["log_likelihood"]) == n + 1
    _ll_close(result.log_likelihood, ll, f"{covariance_type} n={n}")
    _close(result.params["weights"], gm.weights_, what="weights")
    _close(result.params["locs"], gm.means_, what="means")
    _close(_our_covariances(result.params, covariance_type), gm.covariances_, what="covariances")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gmm_trajectory_matches_sklearn(covariance_type):
    """history[k] (log p(x) after k M-steps) equals sklearn's score after max_iter=k."""
    x = _gmm_data(seed=4)
    init = init_params(x, 3, covariance_type, seed=5)
    result = _em(_gmm_closure(3, covariance_type, init), x, n=5)
    history = result.history["log_likelihood"]
    assert history[-1] == result.log_likelihood
    for k in range(1, 6):
        _, ll = _sklearn_gmm(x, init, covariance_type, k)
        _ll_close(history[k], ll, f"{covariance_type} iteration {k}")
    assert all(b >= a for a, b in itertools.pairwise(history))


# ---------------------------------------------------------------------------- 2. HMM = hmmlearn
def full_cov_hmm(data, K, init):
    """Gaussian HMM with full covariances, DiscreteHMM form."""
    N, T, _ = data.shape
    start = pyro.param("start", init["start"].clone(), constraint=constraints.simplex)
    trans = pyro.param("trans", init["trans"].clone(), constraint=constraints.simplex)
    locs = pyro.param("locs", init["locs"].clone())
    scale_tril = pyro.param(
        "scale_tril", init["scale_tril"].clone(), constraint=constraints.lower_cholesky
    )
    initial_logits, transition_logits = discrete_hmm_logits(start, trans, T)
    obs = dist.MultivariateNormal(locs, scale_tril=scale_tril)
    with pyro.plate("sequences", N, dim=-1):
        pyro.sample("x", dist.DiscreteHMM(initial_logits, transition_logits, obs), obs=data)


def _hmmlearn_fit(h, X, lengths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h.fit(X, lengths)
    return float(h.score(X, lengths))


def _gaussian_hmm_case(form, n):
    # the pyro.markov loop form costs one site per step: shorter chains there
    N, T = (3, 20) if form == "markov" else (4, 40)
    x, _ = sample_gaussian_hmm(N=N, T=T, K=3, D=2, seed=1)
    N, T, D = x.shape
    init = hmm_init_params(x, 3, "gaussian", seed=2)
    covariance_type = "full" if form == "full" else "diag"
    if form == "full":
        init["scale_tril"] = torch.diag_embed(init.pop("scales"))
        init["scale_tril"][:, 1, 0] = 0.3  # a non-diagonal start

        def model(data):
            return full_cov_hmm(data, 3, init)

        covars = init["scale_tril"] @ init["scale_tril"].mT
    else:
        fn = {"discrete": gaussian_hmm, "markov": gaussian_hmm_markov}[form]

        def model(data):
            return fn(data, 3, init=init)

        covars = init["scales"] ** 2
    result = _em(model, x, n=n)
    h = hmmlearn_hmm.GaussianHMM(
        n_components=3,
        covariance_type=covariance_type,
        n_iter=n,
        tol=-np.inf,  # never stop early
        init_params="",
        params="stmc",
        min_covar=0.0,
        covars_prior=0.0,
        covars_weight=1.0,
    )
    h.startprob_ = init["start"].numpy()
    h.transmat_ = init["trans"].numpy()
    h.means_ = init["locs"].numpy()
    h.covars_ = covars.numpy()
    X = x.reshape(-1, D).numpy()
    ll = _hmmlearn_fit(h, X, [T] * N)
    ours_cov = _our_covariances(result.params, "full" if form == "full" else "diag")
    ref_cov = h.covars_ if form == "full" else np.diagonal(h.covars_, axis1=-2, axis2=-1)
    return (
        result,
        ll,
        {
            "start": (result.params["start"], h.startprob_),
            "trans": (result.params["trans"], h.transmat_),
            "means": (result.params["locs"], h.means_),
            "covars": (ours_cov, ref_cov),
        },
    )


def _categorical_hmm_case(form, n):
    # the pyro.markov loop form costs one site per step: shorter chains there
    N, T = (5, 40) if form == "discrete" else (3, 15)
    y, _ = sample_categorical_hmm(N=N, T=T, K=3, M=4, seed=1)
    init = hmm_init_params(y, 3, "categorical", M=4, seed=2)
    fn = {"discrete": categorical_hmm, "markov": categorical_hmm_markov}[form]

    def model(data):
        return fn(data, 3, 4, init=init)

    result = _em(model, y, n=n)
    h = hmmlearn_hmm.CategoricalHMM(
        n_components=3,
        n_features=4,
        n_iter=n,
        tol=-np.inf,
        init_params="",
        params="ste",
        startprob_prior=1.0,
        transmat_prior=1.0,
        emissionprob_prior=1.0,
    )
    h.startprob_ = init["start"].numpy()
    h.transmat_ = init["trans"].numpy()
    h.emissionprob_ = init["emission_probs"].numpy()
    ll = _hmmlearn_fit(h, y.reshape(-1, 1).numpy(), [T] * N)
    return (
        result,
        ll,
        {
            "start": (result.params["start"], h.startprob_),
            "trans": (result.params["trans"], h.transmat_),
            "emission_probs": (result.params["emission_probs"], h.emissionprob_),
        },
    )


@pytest.mark.parametrize("n", [1, 5, 20])
@pytest.mark.parametrize(
    "case",
    [
        ("gaussian", "discrete"),
        ("gaussian", "markov"),
        ("gaussian", "full"),
        ("categorical", "discrete"),
        ("categorical", "markov"),
    ],
    ids=lambda c: "-".join(c),
)
def test_hmm_matches_hmmlearn(case, n):
    emission, form = case
    build = _gaussian_hmm_case if emission == "gaussian" else _categorical_hmm_case
    result, ll, pairs = build(form, n)
    assert result.algorithm == "EM"
    _ll_close(result.log_likelihood, ll, f"{case} n={n}")
    for what, (ours, ref) in pairs.items():
        _close(ours, ref, what=what)


# ---------------------------------------------------------------------------- 3. other families
def poisson_mixture(x):
    weights = pyro.param("weights", torch.tensor([0.2, 0.3, 0.5]), constraint=constraints.simplex)
    rates = pyro.param("rates", torch.tensor([1.0, 4.0, 9.0]), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
        pyro.sample("x", dist.Poisson(rates[z]), obs=x)


def bernoulli_mixture(x):
    weights = pyro.param("weights", torch.tensor([0.2, 0.3, 0.5]), constraint=constraints.simplex)
    probs = pyro.param(
        "probs",
        torch.linspace(0.2, 0.8, 15).reshape(3, 5),
        constraint=constraints.unit_interval,
    )
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def _poisson_data():
    gen = torch.Generator().manual_seed(3)
    rates = torch.tensor([2.0, 5.0, 12.0]).repeat_interleave(100)
    return torch.poisson(rates, generator=gen)


def _bernoulli_data():
    gen = torch.Generator().manual_seed(3)
    centers = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.5], [0.1, 0.2, 0.9, 0.8, 0.5]])
    z = torch.randint(0, 2, (300,), generator=gen)
    return torch.bernoulli(centers[z], generator=gen)


MIXTURES = {
    "poisson": (poisson_mixture, _poisson_data, {"weights", "rates"}),
    "bernoulli": (bernoulli_mixture, _bernoulli_data, {"weights", "probs"}),
}


@pytest.mark.parametrize("family", sorted(MIXTURES))
def test_closed_form_is_the_argmax_of_the_expected_log_joint(family):
    model, data, names = MIXTURES[family]
    x = data()
    guide = ExactEStep(model)
    post = guide.posterior(x)
    store = pyro.get_param_store()
    start = {n: store.get_param(n).unconstrained().detach().clone() for n in names}
    opt = EMOptim()
    plan = opt.plan(guide, (x,), {})
    assert set(plan.closed_form) == names and plan.gradient == []
    opt(guide, post, (x,), {})
    closed = {n: store[n].detach().clone() for n in names}
    q_closed = guide.expected_log_joint(post, x).item()

    # the same objective, maximized numerically from the same starting point
    with torch.no_grad():
        for n, v in start.items():
            store.get_param(n).unconstrained().copy_(v)
    params = [store.get_param(n).unconstrained() for n in names]
    lbfgs = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad()
        loss = -guide.expected_log_joint(post, x) / len(x)
        loss.backward()
        return loss

    for _ in range(5):
        lbfgs.step(closure)
    for n in names:
        _close(closed[n], store[n], what=n)
    # and no point L-BFGS found beats the closed form
    assert q_closed >= guide.expected_log_joint(post, x).item() - 1e-9 * abs(q_closed)


@pytest.mark.parametrize("family", sorted(MIXTURES))
def test_fit_of_other_families_is_plain_em(family):
    model, data, names = MIXTURES[family]
    x = data()
    result = _em(model, x, n=10)
    assert result.algorithm == "EM"
    assert set(result.info["closed_form"]) == names and result.info["gradient"] == []
    h = result.history["log_likelihood"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(h))
    assert h[-1] > h[0]


def test_fit_result_names_closed_form_and_gradient_params():
    model, data, names = MIXTURES["poisson"]
    x = data()
    result = _em(model, x, n=2)
    assert set(result.closed_form) == names
    assert result.gradient == []


# ---------------------------------------------------------------------------- 4. monotone EM
def _random_simplex(gen, *shape):
    e = -torch.rand(*shape, generator=gen).clamp_min(1e-12).log()
    return e / e.sum(-1, keepdim=True)


def _assert_monotone(history):
    h = np.asarray(history)
    assert np.isfinite(h).all(), h
    drops = h[:-1] - h[1:]
    assert (drops <= 1e-9 * np.abs(h[:-1])).all(), f"log-likelihood decreased: {h}"


def _unguarded_history(model, x, n=12):
    """log p(x) at each E-step of ``n`` plain (unguarded) EM iterations. Maximum likelihood
    has singularities: should a component collapse onto one point on the way (a variance of 0,
    which fit refuses), the climb up to there is returned."""
    seen = []
    try:
        result = fit(
            model,
            ExactEStep(model),
            x,
            optim=EMOptim(reg_covar=0.0, guard=False),
            max_iter=n,
            tol=0,
            callback=lambda it, info: seen.append(info["log_likelihood"]),
        )
    except FloatingPointError as e:
        assert "scales" in str(e), e  # only a collapsed variance may stop plain EM
        return seen
    for name, value in result.params.items():
        assert torch.isfinite(value).all(), name
    assert result.history["log_likelihood"][:-1] == seen
    return result.history["log_likelihood"]


_MONOTONE = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_MONOTONE
@given(
    K=st.integers(1, 4),
    K_true=st.integers(1, 4),
    N=st.integers(60, 250),
    separation=st.floats(0.5, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_em_is_monotone_gmm(K, K_true, N, separation, seed):
    pyro.clear_param_store()
    x, _ = sample_gmm(N, K_true, 2, seed=seed, separation=separation)
    gen = torch.Generator().manual_seed(seed + 1)
    std = x.std(0)
    init = {
        "weights": _random_simplex(gen, K),
        "locs": x[torch.randperm(N, generator=gen)[:K]] + 0.1 * torch.randn(K, 2, generator=gen),
        "scales": std * (0.3 + 1.7 * torch.rand(K, 2, generator=gen)),
    }
    _assert_monotone(_unguarded_history(_gmm_closure(K, "diag", init), x))


@_MONOTONE
@given(
    K=st.integers(1, 4),
    n_seq=st.integers(1, 4),
    T=st.integers(20, 50),
    D=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
# (found by hypothesis: a state collapses onto the first frame; the HMM emissions' expanded
# quadratic form then lost the path through it and log p(x) 'dropped' by 26 nats)
@example(K=2, n_seq=1, T=20, D=2, seed=2)
def test_em_is_monotone_gaussian_hmm(K, n_seq, T, D, seed):
    pyro.clear_param_store()
    x, _ = sample_gaussian_hmm(N=n_seq, T=T, K=3, D=D, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    frames = x.reshape(-1, D)
    init = {
        "start": _random_simplex(gen, K),
        "trans": _random_simplex(gen, K, K),
        "locs": frames[torch.randperm(len(frames), generator=gen)[:K]],
        "scales": frames.std(0) * (0.3 + 1.7 * torch.rand(K, D, generator=gen)),
    }

    def model(data):
        return gaussian_hmm(data, K, init=init)

    _assert_monotone(_unguarded_history(model, x))


# ---------------------------------------------------------------------------- 5. additive stats
def _additivity_case(kind):
    if kind == "gaussian_hmm":
        x, _ = sample_gaussian_hmm(N=5, T=30, K=2, D=2, seed=2)
        init = hmm_init_params(x, 2, "gaussian", seed=3)

        def model(data):
            return gaussian_hmm(data, 2, init=init)

        return model, x, x[:2], x[2:]
    x = _gmm_data(N=250, seed=6)
    init = init_params(x, 3, kind, seed=7)
    return _gmm_closure(3, kind, init), x, x[:100], x[100:]


@pytest.mark.parametrize("kind", ["diag", "full", "tied", "spherical", "gaussian_hmm"])
def test_sufficient_statistics_are_additive(kind):
    model, x, a, b = _additivity_case(kind)
    model(x)  # create the params once: the three data sets share them
    opt = EMOptim()
    stats = {}
    plans = {}
    for label, data in (("A", a), ("B", b), ("AB", x)):
        guide = ExactEStep(model)
        plans[label] = plan = opt.plan(guide, (data,), {})
        post = guide.posterior(data)
        stats[label] = [opt.summarize(plan, post, stage) for stage in (0, 1)]
    assert plans["A"].space.offsets == plans["AB"].space.offsets == plans["B"].space.offsets
    for stage in (0, 1):
        whole = stats["AB"][stage]
        summed = stats["A"][stage] + stats["B"][stage]
        assert set(summed.sums) == set(whole.sums) and whole.sums, stage
        for key, value in whole.sums.items():
            if key.endswith("mark"):  # markers: which ids some site uses (read by .any())
                assert torch.equal(summed.sums[key] > 0, value > 0), key
            else:
                torch.testing.assert_close(summed.sums[key], value, rtol=1e-10, atol=1e-10)
        # the same statistics give the same M-step
        new_whole = opt.maximize(plans["AB"], whole, stage)
        new_summed = opt.maximize(plans["AB"], summed, stage)
        assert new_whole.keys() == new_summed.keys() and new_whole
        for name in new_whole:
            torch.testing.assert_close(new_summed[name], new_whole[name], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- 6. ECM
def _ecm_data():
    gen = torch.Generator().manual_seed(5)
    return torch.cat([torch.randn(100, generator=gen) + c for c in (-4.0, 0.0, 4.0)])


def make_net_mixture():
    """Component locs from a Linear layer: locs[k] = w * k + b (a poor start: w=3, b=-3.5)."""
    linear = torch.nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(3.0)
        linear.bias.fill_(-3.5)

    def net_mixture(x):
        weights = pyro.param("weights", torch.ones(3) / 3, constraint=constraints.simplex)
        scales = pyro.param("scales", torch.ones(3), constraint=constraints.positive)
        net = pyro.module("net", linear)
        locs = net(torch.arange(3, dtype=x.dtype).unsqueeze(-1)).squeeze(-1)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)

    return net_mixture


def softplus_mixture(x):
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 0.0, 1.0]))
    raw_scale = pyro.param("raw_scale", torch.zeros(3))
    scales = torch.nn.functional.softplus(raw_scale)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)


@pytest.mark.filterwarnings("ignore:an M-step lowered")  # Adam may overshoot: the guard undoes it
@pytest.mark.parametrize(
    "model, closed, gradient",
    [
        ("nn", {"weights", "scales"}, {"net$$$weight", "net$$$bias"}),
        ("softplus", {"weights", "locs"}, {"raw_scale"}),
    ],
    ids=["nn", "softplus"],
)
def test_ecm_splits_closed_form_and_gradient(model, closed, gradient):
    model = make_net_mixture() if model == "nn" else softplus_mixture
    x = _ecm_data()
    model(x)
    start = {n: pyro.param(n).detach().clone() for n in gradient}
    guide = ExactEStep(model)
    opt = EMOptim(svi_optim=pyro.optim.Adam({"lr": 0.05}), svi_steps=5)
    plan = opt.plan(guide, (x,), {})
    assert set(plan.closed_form) == closed
    assert set(plan.gradient) == gradient
    for name in gradient:
        assert isinstance(plan.reasons.get(name), str) and plan.reasons[name], name
    for name in closed:
        assert name not in plan.reasons
    result = fit(model, guide, x, optim=opt, max_iter=30, tol=0)
    assert result.algorithm == "ECM"
    assert set(result.info["closed_form"]) == closed
    assert set(result.info["gradient"]) == gradient
    h = result.history["log_likelihood"]
    assert np.isfinite(h).all()
    assert h[-1] > h[0] + 50.0  # from a poor start (-840 and -2500 nats) to a good fit
    for name in gradient:  # the gradient params moved
        assert (result.params[name] - start[name]).abs().max() > 0.1, name


# ---------------------------------------------------------------------------- 7. closed_form arg
def _diag_gmm_setup():
    x = _gmm_data(N=200, seed=8)
    init = init_params(x, 3, "diag", seed=9)
    model = _gmm_closure(3, "diag", init)
    return x, init, model


def test_closed_form_empty_list_is_eg():
    x, _, model = _diag_gmm_setup()
    opt = EMOptim(closed_form=[], svi_steps=3)
    guide = ExactEStep(model)
    plan = opt.plan(guide, (x,), {})
    assert plan.closed_form == []
    assert set(plan.gradient) == {"weights", "locs", "scales"}
    result = fit(model, guide, x, optim=opt, max_iter=5, tol=0)
    assert result.algorithm == "EG"
    assert result.info["closed_form"] == []
    assert set(result.info["gradient"]) == {"weights", "locs", "scales"}


def test_closed_form_subset_updates_only_those_in_closed_form():
    x, init, model = _diag_gmm_setup()
    lr, steps = 0.01, 5
    opt = EMOptim(closed_form=["weights"], svi_optim=pyro.optim.Adam({"lr": lr}), svi_steps=steps)
    guide = ExactEStep(model)
    model(x)
    post = guide.posterior(x)
    info = opt(guide, post, (x,), {})
    assert info["closed_form"] == ["weights"]
    assert set(info["gradient"]) == {"locs", "scales"}
    assert opt.algorithm == "ECM"
    store = pyro.get_param_store()
    resp = post.marginals["z"]
    torch.testing.assert_close(store["weights"], resp.sum(0) / len(x), rtol=1e-12, atol=1e-12)
    # locs took `steps` Adam steps (each about lr per coordinate), not the closed-form jump
    moved = (store["locs"] - init["locs"]).abs()
    assert (moved > 0).all() and (moved <= 2 * steps * lr).all()
    closed_locs = (resp.T @ x) / resp.sum(0).unsqueeze(-1)
    assert (store["locs"] - closed_locs).abs().max() > 10 * steps * lr


def test_closed_form_unknown_name_raises():
    x, _, model = _diag_gmm_setup()
    with pytest.raises(ValueError, match="nonexistent"):
        EMOptim(closed_form=["nonexistent"]).plan(ExactEStep(model), (x,), {})


def test_closed_form_param_without_rule_raises():
    x = _ecm_data()
    guide = ExactEStep(softplus_mixture)
    with pytest.raises(ValueError, match="raw_scale"):
        EMOptim(closed_form=["weights", "raw_scale"]).plan(guide, (x,), {})
    with pytest.raises(ValueError, match="raw_scale"):  # and through fit
        fit(
            softplus_mixture,
            guide,
            x,
            optim=EMOptim(closed_form=["raw_scale"]),
            max_iter=2,
            tol=0,
        )


def test_bad_options_raise():
    with pytest.raises(TypeError, match="closed_form"):
        EMOptim(closed_form="weights")
    with pytest.raises(ValueError, match="reg_covar"):
        EMOptim(reg_covar=-1.0)
    with pytest.raises(ValueError, match="dirichlet"):
        EMOptim(dirichlet=0.5)


# ---------------------------------------------------------------------------- 8. in-place writes
def test_in_place_writes_keep_optimizer_state():
    x = _ecm_data()
    guide = ExactEStep(softplus_mixture)
    steps = 3
    opt = EMOptim(svi_optim=pyro.optim.Adam({"lr": 0.05}), svi_steps=steps)
    softplus_mixture(x)
    store = pyro.get_param_store()
    names = ["weights", "locs", "raw_scale"]
    before = {n: store.get_param(n).unconstrained() for n in names}
    seen = []

    def callback(it, info):
        objs = opt.svi_optim.optim_objs
        raw = store.get_param("raw_scale").unconstrained()
        seen.append(
            {
                "ids": {n: id(store.get_param(n).unconstrained()) for n in names},
                "keys": tuple(id(k) for k in objs),
                "step": int(objs[raw].state[raw]["step"]) if raw in objs else None,
                "gradient_steps": 0 if "rejected" in info else steps,  # the guard skips them
            }
        )

    result = fit(softplus_mixture, guide, x, optim=opt, max_iter=6, tol=0, callback=callback)
    assert result.algorithm == "ECM" and result.n_iter == 6
    taken = 0
    for it, s in enumerate(seen, start=1):
        taken += s["gradient_steps"]
        assert s["ids"] == {n: id(t) for n, t in before.items()}, it
        assert s["keys"] == (id(before["raw_scale"]),), it
        assert s["step"] == taken, it  # Adam's state accumulates across M-steps
    assert taken >= steps * 3
    # the closed-form params really changed (through the same tensor objects)
    assert not torch.allclose(store["locs"], torch.tensor([-1.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------- the guard
def test_guard_never_fires_in_exact_em():
    """Every M-step of plain EM raises log p(x): the guard has nothing to undo."""
    x = _gmm_data(seed=14)
    opt = EMOptim()
    model = _gmm_closure(3, "full", init_params(x, 3, "full", seed=15))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="an M-step lowered")  # the guard's warning
        result = fit(model, ExactEStep(model), x, optim=opt, max_iter=20, tol=0)
    assert opt.rejected == [] and "rejected" not in result.info


@pytest.mark.parametrize("strategy", ["random", "kmeans++"])
def test_guard_keeps_the_init_strategy(strategy):
    x = _gmm_data(seed=1)

    def model(data):
        return gmm_model(data, 3, "diag")

    runs = {}
    for guard in (True, False):
        pyro.clear_param_store()
        opt = EMOptim(guard=guard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(
                model, ExactEStep(model), x, optim=opt, init=strategy, seed=0, max_iter=3, tol=0
            )
        runs[guard] = (result.history["log_likelihood"], opt.rejected)
    assert runs[True][1] == []
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-12)


def test_guard_state_does_not_leak_across_restarts():
    x = _gmm_data(seed=1)
    inits = [init_params(x, 3, "diag", seed=s) for s in range(3)]

    def model(data):
        return gmm_model(data, 3, "diag")

    def start(run):
        pyro.clear_param_store()
        gmm_model(x, 3, "diag", init=inits[run])

    alone = []
    for run in range(3):
        result = fit(
            model,
            ExactEStep(model),
            x,
            optim=EMOptim(),
            init=lambda _r, run=run: start(run),
            max_iter=10,
            tol=0,
        )
        alone.append(result.log_likelihood)
    opt = EMOptim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(
            model, ExactEStep(model), x, optim=opt, init=start, n_init=3, max_iter=10, tol=0
        )
    assert opt.rejected == []
    np.testing.assert_allclose(result.restarts, alone, rtol=1e-10)


# ---------------------------------------------------------------------------- 9. degenerate cases
def _far_component_init(x, covariance_type):
    init = init_params(x, 3, covariance_type, seed=2)
    init["locs"][2] = torch.tensor([1e3, 1e3])  # no point is anywhere near: q underflows to 0
    return init


def test_empty_component_full_warns_and_stays_finite():
    x = _gmm_data(N=200, seed=10)
    init = _far_component_init(x, "full")
    model = _gmm_closure(3, "full", init)
    assert float(ExactEStep(model).posterior(x).marginals["z"][:, 2].max()) == 0.0
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="scale_tril"):
        result = _em(model, x, n=3)
    assert np.isfinite(result.history["log_likelihood"]).all()
    for name, value in result.params.items():
        assert torch.isfinite(value).all(), name
    # the empty component keeps its loc and covariance, and gets (almost) no weight
    torch.testing.assert_close(result.params["locs"][2], init["locs"][2])
    torch.testing.assert_close(result.params["scale_tril"][2], init["scale_tril"][2])
    assert float(result.params["weights"][2]) < 1e-10


def test_empty_component_diag_stays_finite():
    x = _gmm_data(N=200, seed=10)
    init = _far_component_init(x, "diag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _em(_gmm_closure(3, "diag", init), x, n=3)
    assert np.isfinite(result.history["log_likelihood"]).all()
    for name, value in result.params.items():
        assert torch.isfinite(value).all(), name
    torch.testing.assert_close(result.params["locs"][2], init["locs"][2])
    torch.testing.assert_close(result.params["scales"][2], init["scales"][2])


def test_empty_component_diag_warns():
    x = _gmm_data(N=200, seed=10)
    init = _far_component_init(x, "diag")
    with pytest.warns(UserWarning, match="locs|scales"):
        _em(_gmm_closure(3, "diag", init), x, n=1)


def _outlier_case(covariance_type):
    """100 points near 0 and one outlier that a tight component captures alone."""
    gen = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(100, 2, generator=gen), torch.tensor([[30.0, 30.0]])])
    init = init_params(x, 2, covariance_type, seed=0)
    init["locs"] = torch.tensor([[0.0, 0.0], [30.0, 30.0]])
    if covariance_type == "full":
        init["scale_tril"] = torch.stack([torch.eye(2), 0.1 * torch.eye(2)])
    else:
        init["scales"] = torch.tensor([[1.0, 1.0], [0.1, 0.1]])
    return x, _gmm_closure(2, covariance_type, init)


def test_singular_covariance_raises_naming_param_and_reg_covar():
    x, model = _outlier_case("full")
    with pytest.raises((torch.linalg.LinAlgError, FloatingPointError)) as info:
        _em(model, x, n=3, reg_covar=0.0)
    message = str(info.value)
    assert "scale_tril" in message and "reg_covar" in message, message


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_failed_m_step_leaves_the_last_params(covariance_type):
    x, model = _outlier_case(covariance_type)
    model(x)
    before = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
    with pytest.raises((torch.linalg.LinAlgError, FloatingPointError)):
        _em(model, x, n=3, reg_covar=0.0)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), before[name], msg=name)


def test_singular_covariance_with_reg_covar_runs():
    x, model = _outlier_case("full")
    result = _em(model, x, n=5, reg_covar=1e-3)
    assert np.isfinite(result.history["log_likelihood"]).all()
    L = result.params["scale_tril"][1]
    torch.testing.assert_close(L @ L.T, 1e-3 * torch.eye(2), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.params["locs"][1], torch.tensor([30.0, 30.0]))


def test_zero_variance_raises_naming_param():
    x, model = _outlier_case("diag")
    with pytest.raises((FloatingPointError, torch.linalg.LinAlgError), match="scales"):
        _em(model, x, n=3, reg_covar=0.0)


def test_zero_variance_message_suggests_reg_covar():
    x, model = _outlier_case("diag")
    with pytest.raises((FloatingPointError, torch.linalg.LinAlgError), match="reg_covar"):
        _em(model, x, n=3, reg_covar=0.0)


@pytest.mark.parametrize("dirichlet", [1.0, 2.0, 5.0])
def test_dirichlet_prior_is_map_em(dirichlet):
    x, _, model = _diag_gmm_setup()
    model(x)
    guide = ExactEStep(model)
    post = guide.posterior(x)
    EMOptim(dirichlet=dirichlet)(guide, post, (x,), {})
    counts = post.marginals["z"].sum(0)
    K, N = counts.shape[0], len(x)
    expected = (counts + dirichlet - 1) / (N + K * (dirichlet - 1))
    torch.testing.assert_close(pyro.get_param_store()["weights"], expected, rtol=1e-12, atol=0)


def test_dirichlet_moves_weights_toward_uniform():
    x = _gmm_data(N=60, seed=12)
    init = init_params(x, 3, "diag", seed=13)
    model = _gmm_closure(3, "diag", init)
    weights = {}
    for alpha in (1.0, 2.0):
        pyro.clear_param_store()
        model(x)
        guide = ExactEStep(model)
        EMOptim(dirichlet=alpha)(guide, guide.posterior(x), (x,), {})
        weights[alpha] = pyro.get_param_store()["weights"].detach().clone()
    dist_flat, dist_map = (weights[a] - 1 / 3 for a in (1.0, 2.0))
    assert (dist_map.abs() < dist_flat.abs()).all()
    assert (torch.sign(dist_map) == torch.sign(dist_flat)).all()
