"""fit's init strategies ("random", "kmeans++") on integer observations and on sites that
k-means++ cannot seed: they run, draw their potentials in a floating dtype, and reach the
optimum that init="model" reaches from the true params."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from models import count_mixtures, hmm
from pyro_emvae import ExactEStep, fit
from pyro_emvae.init import KMeansFallbackWarning, init_potentials


def _fit(model, data, init, seed=1, max_iter=500, tol=1e-9):
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KMeansFallbackWarning)
        return fit(model, ExactEStep(model), data, init=init, seed=seed, max_iter=max_iter, tol=tol)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_inits_fit_a_poisson_mixture_on_long_counts(init):
    x, truth = count_mixtures.sample_poisson_mixture(300, 3, 2, seed=0)
    counts = x.long()

    def model(data):
        return count_mixtures.poisson_mixture(data, 3, init=truth)

    best = _fit(model, counts, "model")  # EM from the true params
    result = _fit(model, counts, init)
    assert result.converged
    assert result.log_likelihood == pytest.approx(best.log_likelihood, abs=1e-3)
    # the Long counts are seeded on (k-means++) and fitted exactly as the same counts in float
    as_float = _fit(model, x, init)
    assert result.history["log_likelihood"] == pytest.approx(
        as_float.history["log_likelihood"], rel=1e-12
    )
    for name, value in result.params.items():
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(value, as_float.params[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", ["discrete_hmm", "markov"])
@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_inits_fit_a_categorical_hmm_on_long_symbols(form, init):
    data, truth = hmm.sample_categorical_hmm(N=6, T=20, K=2, M=3, seed=0, sharpness=4.0)
    assert data.dtype == torch.long
    chain = hmm.categorical_hmm if form == "discrete_hmm" else hmm.categorical_hmm_markov

    def model(d):
        return chain(d, 2, 3, init=truth)

    best = _fit(model, data, "model", max_iter=300, tol=1e-7)  # EM from the true params
    # the best of two random starts reaches the optimum EM reaches from the truth
    runs = [_fit(model, data, init, seed=s, max_iter=300, tol=1e-7) for s in (1, 2)]
    assert all(r.converged for r in runs)
    top = max(r.log_likelihood for r in runs)
    assert top == pytest.approx(best.log_likelihood, abs=1e-4)


def test_kmeanspp_seeds_a_poisson_hmm_on_long_counts():
    """A DiscreteHMM with Poisson emissions on Long counts: k-means++ seeds on the counts (the
    same init as on the float counts) and reaches the optimum of EM from the truth."""
    gen = torch.Generator().manual_seed(3)
    rates = torch.tensor([2.0, 12.0])
    z = (torch.rand(200, generator=gen) < 0.5).long().cumsum(0) // 40 % 2  # long runs
    counts = torch.poisson(rates[z], generator=gen).long()

    def model(d):
        start = pyro.param("start", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
        trans = pyro.param(
            "trans", torch.tensor([[0.9, 0.1], [0.1, 0.9]]), constraint=dist.constraints.simplex
        )
        r = pyro.param("rates", rates.clone(), constraint=dist.constraints.positive)
        logits = torch.cat([start.log().expand(1, 2, 2), trans.log().expand(len(d) - 1, 2, 2)])
        pyro.sample("x", dist.DiscreteHMM(torch.zeros(2), logits, dist.Poisson(r)), obs=d)

    best = _fit(model, counts, "model")
    result = _fit(model, counts, "kmeans++")
    assert result.log_likelihood == pytest.approx(best.log_likelihood, abs=1e-3)
    as_float = _fit(model, counts.double(), "kmeans++")
    assert result.history["log_likelihood"] == pytest.approx(
        as_float.history["log_likelihood"], rel=1e-12
    )


@pytest.mark.parametrize("strategy", ["random", "kmeans++"])
def test_potentials_of_integer_sites_take_the_params_dtype(strategy):
    """float32 params, Long values, float64 default: the potentials are float32 (the dtype of
    the log-likelihood they replace), for a plain site and for a DiscreteHMM site."""
    rates = torch.tensor([1.0, 5.0], dtype=torch.float32)
    value = torch.tensor([0, 3, 7, 1])
    site = {"fn": dist.Poisson(rates.unsqueeze(-1)), "value": value}  # (K=2, N=4)
    pot = init_potentials(strategy, 1)("x", site)
    assert pot.dtype == torch.float32 and pot.shape == (2, 4)
    logits = torch.zeros(4, 2, 2, dtype=torch.float32)
    chain = {"fn": dist.DiscreteHMM(logits[0, 0], logits, dist.Poisson(rates)), "value": value}
    pot = init_potentials(strategy, 0)("x", chain)
    assert pot.dtype == torch.float32 and pot.shape == (4, 2)


def _two_latents(x):
    locs = pyro.param("locs", torch.tensor([[-2.0, 0.0], [1.0, 3.0]]))
    g = pyro.sample("g", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[g, z], 1.0), obs=x)


def test_kmeanspp_warns_when_a_site_depends_on_two_latents_and_acts_as_random():
    x = torch.cat([torch.randn(30) - 2, torch.randn(30) + 3])
    pyro.clear_param_store()
    with pytest.warns(KMeansFallbackWarning, match=r"'x' depends on 2 enumerated latents") as rec:
        kmeans = fit(
            _two_latents, ExactEStep(_two_latents), x, init="kmeans++", seed=4, max_iter=3, tol=0
        )
    ours = [w for w in rec if issubclass(w.category, KMeansFallbackWarning)]
    assert len(ours) == 1 and "random potentials" in str(ours[0].message)
    assert issubclass(KMeansFallbackWarning, UserWarning)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KMeansFallbackWarning)  # "random" does not warn
        rand = fit(
            _two_latents, ExactEStep(_two_latents), x, init="random", seed=4, max_iter=3, tol=0
        )
    # the same random potentials: the same fit, step for step
    assert kmeans.history["log_likelihood"] == rand.history["log_likelihood"]
    torch.testing.assert_close(kmeans.params["locs"], rand.params["locs"], rtol=0, atol=0)
