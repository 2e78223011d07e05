"""to_inference_data: the groups ArviZ needs, their contents checked against the fit."""

import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_emvae.arviz as arviz_export
from models import gmm, hmm
from pyro_emvae import AmortizedGuide, ExactEStep, PointEstimateWarning, fit
from pyro_emvae.__main__ import earthquake_hmm
from pyro_emvae.arviz import to_inference_data
from pyro_emvae.datasets import load_earthquakes

matplotlib.use("Agg")


def test_an_em_fit_exports_exact_draws_likelihood_and_history():
    x, _ = gmm.sample_gmm(60, 2, 2, seed=0)
    model = gmm.make_gmm_model(2, "diag", init=gmm.init_params(x, 2, "diag", seed=1))
    guide = ExactEStep(model)
    result = fit(model, guide, x, max_iter=20, tol=0)
    idata = to_inference_data(model, guide, x, result=result, num_samples=400)
    z = torch.as_tensor(idata.posterior["z"].values)
    assert z.shape == (1, 400, 60) and set(z.unique().tolist()) <= {0, 1}
    # the draws are from the exact posterior: their frequencies match the marginals
    marg = guide.marginals(x)["z"][:, 1]
    assert (z[0].double().mean(0) - marg).abs().max() < 0.15
    # per-datum log-likelihood: exact, summing to the fit's log p(x)
    ll = idata.log_likelihood["x_datum"].values
    assert ll.shape == (1, 400, 60)
    assert ll[0, 0].sum() == pytest.approx(result.log_likelihood, rel=1e-10)
    assert (ll[0, 0] == ll[0, -1]).all()
    assert idata.posterior_predictive["x"].shape == (1, 400, 60, 2)
    assert (idata.observed_data["x"].values == x.numpy()).all()
    assert list(idata.fit_history["log_likelihood"].values) == result.history["log_likelihood"]
    assert idata.attrs["algorithm"] == "EM" and idata.attrs["n_data"] == 60
    summary = az.summary(idata, var_names=["z"], kind="stats")
    assert len(summary) == 60
    assert az.plot_ppc(idata, data_pairs={"x": "x"}, num_pp_samples=20) is not None


def test_a_vae_exports_guide_draws_and_the_iwae_likelihood():
    decoder = torch.nn.Linear(2, 3).double()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    x = torch.randn(25, 3)
    guide = AmortizedGuide(model, hidden=(4,))
    fit(model, guide, x, max_iter=20, tol=0)
    idata = to_inference_data(model, guide, x, num_samples=30, log_likelihood_samples=50)
    assert idata.posterior["z"].shape == (1, 30, 25, 2)
    assert idata.posterior["z"].dims[2] == "data_dim"
    assert idata.posterior_predictive["x"].shape == (1, 30, 25, 3)
    ll = idata.log_likelihood["x_datum"].values
    assert ll.shape == (1, 30, 25) and (ll < 0).all()

    def subsampled(x):
        with pyro.plate("data", len(x), subsample_size=5) as idx:
            pyro.sample("x", dist.Normal(x.new_zeros(3), 1.0).to_event(1), obs=x[idx])

    with pytest.raises(ValueError, match="subsamples 5 of 25"):
        to_inference_data(subsampled, ExactEStep(subsampled), x)


def _z(estimate, expected, sd, num_samples):
    """Monte Carlo z-scores of a mean over ``num_samples`` draws, with a slack of 2 draws (a
    state of posterior probability 1e-5 drawn once in 300 draws is not a 10-sigma event)."""
    return ((estimate - expected).abs() - 2 / num_samples).clamp_min(0) / (
        sd / num_samples**0.5 + 1e-12
    )


def test_posterior_predictive_is_drawn_given_the_posterior_draws():
    """x_rep | draw s ~ p(x | z_s): its mean per datum is E[locs[z] | x], not the prior mean
    (uncondition outside condition had redrawn z from the prior)."""
    x = torch.cat([torch.randn(20) * 0.3 - 3, torch.randn(20) * 0.3 + 3])

    def model(x):
        weights = pyro.param(
            "weights", torch.tensor([0.9, 0.1]), constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", torch.tensor([-3.0, 3.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 0.3), obs=x)

    guide = ExactEStep(model)
    s = 300
    idata = to_inference_data(model, guide, x, num_samples=s)
    rep = torch.as_tensor(idata.posterior_predictive["x"].values[0])  # (S, 40)
    expected = guide.marginals(x)["z"] @ torch.tensor([-3.0, 3.0])
    assert _z(rep.mean(0), expected, rep.std(0), s).max() < 5
    # and each replicate sits at its own draw's component
    z = torch.as_tensor(idata.posterior["z"].values[0])
    assert ((rep - torch.tensor([-3.0, 3.0])[z]).abs() < 0.3 * 5).all()


def _pois_batch(x):
    rates = pyro.param("rates", torch.tensor([2.0, 10.0]), constraint=dist.constraints.positive)
    trans = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    with pyro.plate("seqs", x.shape[0]):
        hmm_dist = dist.DiscreteHMM(torch.zeros(2), trans, dist.Poisson(rates))
        pyro.sample("x", hmm_dist, obs=x)


def _gauss_scalar(x):
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    trans = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    with pyro.plate("seqs", x.shape[0]):
        pyro.sample("x", dist.DiscreteHMM(torch.zeros(2), trans, dist.Normal(locs, 0.7)), obs=x)


def _hmm_case(name):
    """(model, data, emission means (K, *event), plate dim name or None)."""
    if name == "earthquake, one Poisson sequence":
        _, counts = load_earthquakes()
        return earthquake_hmm, counts, lambda: pyro.param("rates")[:, None].squeeze(-1), None
    if name == "Poisson, 4 sequences of Long counts":
        counts = torch.poisson(torch.tensor([3.0, 3.0, 9.0, 9.0, 3.0]).repeat_interleave(20))
        return _pois_batch, counts.long().reshape(4, 25), lambda: pyro.param("rates"), "seqs_dim"
    if name == "Gaussian .to_event(1), 3 sequences":
        data, truth = hmm.sample_gaussian_hmm(N=3, T=30, K=2, D=2, seed=0)
        return (
            lambda x: hmm.gaussian_hmm(x, 2, init=truth),
            data,
            lambda: pyro.param("locs"),
            "sequences_dim",
        )
    if name == "Gaussian scalar, 5 sequences":
        x = torch.cat([torch.randn(5, 10) - 1, torch.randn(5, 10) + 1], -1)
        return _gauss_scalar, x, lambda: pyro.param("locs"), "seqs_dim"
    raise AssertionError(name)


HMM_CASES = [
    "earthquake, one Poisson sequence",
    "Poisson, 4 sequences of Long counts",
    "Gaussian .to_event(1), 3 sequences",
    "Gaussian scalar, 5 sequences",
]


@pytest.mark.parametrize("case", HMM_CASES)
def test_a_discrete_hmm_exports_exact_chains_per_sequence_likelihood_and_predictive(case):
    model, data, emission_means, plate = _hmm_case(case)
    guide = ExactEStep(model)
    s = 300
    idata = to_inference_data(model, guide, data, num_samples=s)
    site = next(iter(idata.observed_data.data_vars))
    post = guide.posterior(data)
    marg = post.marginals[site]  # (*sequences, T, K)
    states = idata.posterior[f"{site}_states"]
    assert states.dims[-1] == f"{site}_time" and states.shape == (1, s) + marg.shape[:-1]
    assert (states.dims[2] == plate) if plate else states.ndim == 3
    # exact FFBS draws: each state's frequency matches its posterior marginal
    draws = torch.as_tensor(states.values[0])
    k = marg.size(-1)
    freq = torch.stack([(draws == j).double().mean(0) for j in range(k)], -1)
    assert _z(freq, marg, (marg * (1 - marg)).clamp_min(0).sqrt(), s).max() < 5
    # log-likelihood per sequence, summing to the exact log p(x)
    ll = idata.log_likelihood[f"{site}_datum"]
    n_seq = 1 if plate is None else data.shape[0]
    assert ll.shape == (1, s, n_seq) and ll.dims[-1] == (plate or "datum")
    assert ll.values[0, 0].sum() == pytest.approx(float(post.log_likelihood), rel=1e-12)
    if plate is not None:  # each entry is its own sequence's log p
        each = [float(guide.log_likelihood(data[i : i + 1])) for i in range(n_seq)]
        np.testing.assert_allclose(ll.values[0, 0], each, rtol=1e-12)
    assert (ll.values[0] == ll.values[0, :1]).all()
    # posterior predictive: emissions given the drawn chain, mean E[mean of z_t's emission | x]
    rep = torch.as_tensor(idata.posterior_predictive[site].values[0]).double()
    obs = idata.observed_data[site]
    assert rep.shape[1:] == obs.shape and idata.posterior_predictive[site].dims[2:] == obs.dims
    assert (obs.values == data.numpy().reshape(obs.shape)).all()
    mu = emission_means().detach()  # (K, *event)
    expected = (marg.reshape(marg.shape + (1,) * (mu.dim() - 1)) * mu).sum(marg.dim() - 1)
    assert _z(rep.mean(0), expected.reshape(rep.shape[1:]), rep.std(0), s).max() < 5
    summary = az.summary(idata, var_names=[f"{site}_states"], kind="stats")
    assert len(summary) == marg[..., 0].numel()


def test_the_log_likelihood_says_it_is_in_sample_and_warns_once(monkeypatch):
    x, _ = gmm.sample_gmm(200, 2, 2, seed=0)
    monkeypatch.setattr(arviz_export, "_warned", False)
    exports, bic = {}, {}
    for k in (2, 5):
        pyro.clear_param_store()
        model = gmm.make_gmm_model(k, "full", init=gmm.init_params(x, k, "full", seed=1))
        guide = ExactEStep(model)
        result = fit(model, guide, x, max_iter=300, tol=1e-8)
        if k == 2:
            with pytest.warns(PointEstimateWarning, match=r"in-sample.*score\(\).*bic\(\)"):
                idata = to_inference_data(model, guide, x, num_samples=20)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PointEstimateWarning)  # once per process
                idata = to_inference_data(model, guide, x, num_samples=20)
        attrs = idata.log_likelihood.attrs
        assert attrs["in_sample"] == 1 and attrs["estimate"] == "point"
        assert attrs["method"] == "exact" and "plate 'data'" in attrs["datum"]
        assert "score()" in attrs["note"] and "bic()" in attrs["note"]
        exports[f"K={k}"], bic[k] = idata, result.bic()
        # what the note warns about: loo is the in-sample log-likelihood, p_loo = 0
        loo = az.loo(idata, pointwise=True)
        assert loo.elpd_loo == pytest.approx(result.log_likelihood, rel=1e-10)
        assert abs(loo.p_loo) < 1e-8 and not (loo.pareto_k.values < 0.7).any()
    assert issubclass(PointEstimateWarning, UserWarning)
    # and az.compare prefers the bigger K, where BIC prefers the true K=2
    assert az.compare(exports).index[0] == "K=5" and bic[2] < bic[5]
