"""to_inference_data: the groups ArviZ needs, their contents checked against the fit."""

import arviz as az
import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

from models import gmm
from pyro_emvae import AmortizedGuide, ExactEStep, fit
from pyro_emvae.arviz import to_inference_data

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
