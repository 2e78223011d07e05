"""Property-based battery (hypothesis): random mixtures and random HMMs with random data.

For every drawn model and data set, EM by ``fit(model, ExactEStep(model), data, max_iter=10,
tol=0)`` must

* never lower the log-likelihood (history non-decreasing within 1e-9 relative, 1e-9 nats near
  0) and never need
  EMOptim's guard to undo an M-step,
* keep everything finite,

and the exact posterior at the fitted params must be a distribution: every marginal, pairwise
marginal and factor joint in [0, 1], summing to one, pairwise marginals consistent with the
marginals. The input checks of :mod:`pyro_emvae.validate` must stay silent on all of them.

Mixtures: K in 1..4 components, D in 1..3 features, N in K..30 points, emissions Normal
(``models.gmm``, any covariance type), Bernoulli, Poisson or Categorical (M in 2..4 symbols per
feature). HMMs (``models.hmm``): K in 1..3 states, N in 1..3 sequences of T in max(2, K)..12 steps,
Gaussian (D in 1..2) or categorical (M in 2..4) emissions, in the DiscreteHMM or the
``pyro.markov`` form. The examples are derandomized, so a CI run is reproducible; the ``slow``-marked variants
(``-m slow``) draw 300 + 200 fresh examples.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.distributions import constraints

from models import gmm, hmm
from pyro_emvae import ExactEStep, fit
from pyro_emvae.validate import validate_fit_inputs

PAR = {"enumerate": "parallel"}
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------- the properties
def _monotone(history: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(history))), history
    for a, b in itertools.pairwise(history):
        # relative, with a floor of 1e-9 nats: a fit that explains the data exactly sits at
        # log p(x) ~ -1e-12 (probabilities clamped to 1 - 1e-12), where only round-off moves
        assert b >= a - 1e-9 * max(abs(a), 1.0), (a, b, history)


def _is_distribution(p: torch.Tensor, event_dims: int, what: str) -> None:
    assert torch.isfinite(p).all(), what
    assert (p >= -1e-12).all() and (p <= 1 + 1e-12).all(), what
    total = p.sum(tuple(range(-event_dims, 0)))
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-9, rtol=0, msg=what)


def _check_posterior(model: Callable, args: tuple) -> None:
    post = ExactEStep(model).posterior(*args)
    assert torch.isfinite(post.log_likelihood)
    assert post.marginals
    for name, m in post.marginals.items():
        _is_distribution(m, 1, f"marginal of {name}")
    for key, pair in post.pairwise.items():
        _is_distribution(pair, 2, f"pairwise {key}")
        torch.testing.assert_close(pair.sum(-2), post.marginals[key[1]], atol=1e-9, rtol=0)
    for name, (names, joint) in post.joints.items():
        if names:
            _is_distribution(joint, len(names), f"joint of factor {name}")


def _fit_and_check(model: Callable, args: tuple) -> None:
    validate_fit_inputs(model, args, {}, exact=True)  # no false alarm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, ExactEStep(model), *args, max_iter=10, tol=0)
    lowered = [str(w.message) for w in caught if "lowered the objective" in str(w.message)]
    assert not lowered, lowered
    assert result.n_iter == 10
    _monotone(result.history["log_likelihood"])
    for name, value in result.params.items():
        assert torch.isfinite(value).all(), name
    _check_posterior(model, args)


# ---------------------------------------------------------------------------- mixtures
def _simplex(g: torch.Generator, *shape: int) -> torch.Tensor:
    e = -torch.rand(*shape, generator=g).clamp_min(1e-6).log()
    return e / e.sum(-1, keepdim=True)


def discrete_mixture(family: str, k: int, d: int, m: int, g: torch.Generator) -> Callable:
    """A k-component mixture of ``family`` emissions over rows of d features, params drawn
    from ``g`` (Categorical: m symbols per feature)."""
    init = {"w": _simplex(g, k)}
    if family == "bernoulli":
        init["p"] = 0.1 + 0.8 * torch.rand(k, d, generator=g)
    elif family == "poisson":
        init["rate"] = 0.5 + 4 * torch.rand(k, d, generator=g)
    else:
        init["probs"] = _simplex(g, k, d, m)

    def model(x):
        w = pyro.param("w", init["w"], constraint=constraints.simplex)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if family == "bernoulli":
                p = pyro.param("p", init["p"], constraint=constraints.unit_interval)
                fn = dist.Bernoulli(p[z]).to_event(1)
            elif family == "poisson":
                rate = pyro.param("rate", init["rate"], constraint=constraints.positive)
                fn = dist.Poisson(rate[z]).to_event(1)
            else:
                probs = pyro.param("probs", init["probs"], constraint=constraints.simplex)
                fn = dist.Categorical(probs[z]).to_event(1)
            pyro.sample("x", fn, obs=x)

    return model


def _discrete_data(family: str, n: int, d: int, m: int, g: torch.Generator) -> torch.Tensor:
    if family == "bernoulli":
        return torch.bernoulli(torch.rand(n, d, generator=g), generator=g)
    if family == "poisson":
        return torch.poisson(5 * torch.rand(n, d, generator=g), generator=g)
    return torch.randint(m, (n, d), generator=g)


@st.composite
def mixtures(draw):
    family = draw(st.sampled_from(["normal", "bernoulli", "poisson", "categorical"]))
    k = draw(st.integers(1, 4))
    d = draw(st.integers(1, 3))
    n = draw(st.integers(k, 30))
    m = draw(st.integers(2, 4))
    cov = draw(st.sampled_from(gmm.COVARIANCE_TYPES))
    seed = draw(st.integers(0, 2**16))
    return family, k, d, n, m, cov, seed


@SETTINGS
@given(spec=mixtures())
def test_em_on_random_mixtures(spec) -> None:
    _mixture_case(spec)


@pytest.mark.slow
@settings(SETTINGS, max_examples=300, derandomize=False)
@given(spec=mixtures())
def test_em_on_many_random_mixtures(spec) -> None:
    _mixture_case(spec)


def _mixture_case(spec) -> None:
    family, k, d, n, m, cov, seed = spec
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if family == "normal":
        x = gmm.sample_gmm(n, k, d, seed=seed, covariance_type=cov)[0]
        model = gmm.make_gmm_model(k, cov, init=gmm.init_params(x, k, cov, seed=seed))
    else:
        x = _discrete_data(family, n, d, m, g)
        model = discrete_mixture(family, k, d, m, g)
    _fit_and_check(model, (x,))


# ---------------------------------------------------------------------------- HMMs
@st.composite
def hmms(draw):
    emission = draw(st.sampled_from(hmm.EMISSIONS))
    form = draw(st.sampled_from(["discrete_hmm", "markov"]))
    k = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    t = draw(st.integers(max(2, k), 12))  # K <= N * T, as init_params needs
    d = draw(st.integers(1, 2))
    m = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    return emission, form, k, n, t, d, m, seed


@settings(SETTINGS, max_examples=20)
@given(spec=hmms())
def test_em_on_random_hmms(spec) -> None:
    _hmm_case(spec)


@pytest.mark.slow
@settings(SETTINGS, max_examples=200, derandomize=False)
@given(spec=hmms())
def test_em_on_many_random_hmms(spec) -> None:
    _hmm_case(spec)


def _hmm_case(spec) -> None:
    emission, form, k, n, t, d, m, seed = spec
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if emission == "gaussian":
        x = hmm.sample_gaussian_hmm(n, t, k, d, seed=seed)[0]
        init = hmm.init_params(x, k, "gaussian", seed=seed)
        fn = hmm.gaussian_hmm if form == "discrete_hmm" else hmm.gaussian_hmm_markov

        def model(x):
            fn(x, k, init=init)

    else:
        x = hmm.sample_categorical_hmm(n, t, k, m, seed=seed)[0]
        init = hmm.init_params(x, k, "categorical", M=m, seed=seed)
        fn = hmm.categorical_hmm if form == "discrete_hmm" else hmm.categorical_hmm_markov

        def model(x):
            fn(x, k, m, init=init)

    _fit_and_check(model, (x,))


def test_battery_hmm_forms_agree() -> None:
    """A fixed example of the HMM battery, both forms: the same log-likelihood history."""
    x, _ = hmm.sample_gaussian_hmm(2, 8, 2, 1, seed=5)
    init = hmm.init_params(x, 2, "gaussian", seed=5)
    histories = {}
    for f, fn in (("discrete_hmm", hmm.gaussian_hmm), ("markov", hmm.gaussian_hmm_markov)):
        pyro.clear_param_store()

        def model(x, fn=fn):
            fn(x, 2, init=init)

        histories[f] = fit(model, ExactEStep(model), x, max_iter=5, tol=0).history
    torch.testing.assert_close(
        torch.tensor(histories["discrete_hmm"]["log_likelihood"]),
        torch.tensor(histories["markov"]["log_likelihood"]),
        atol=1e-8,
        rtol=1e-10,
    )
