"""log_marginal (IWAE), diagnostics and the amortization gap, against analytic answers:
linear-Gaussian models whose log p(x), posterior and KL are known in closed form."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from models.ppca import ppca_exact_posterior, ppca_log_likelihood, ppca_mle, ppca_model, sample_ppca
from pyro_emvae import AmortizedGuide, amortization_gap, diagnostics, log_marginal
from pyro_emvae.evaluate import _plan, _weights

SIGMA = 0.5  # x | z ~ N(z, SIGMA), z ~ N(0, 1): x ~ N(0, sqrt(1 + SIGMA^2))
POST_SCALE = (SIGMA**2 / (1 + SIGMA**2)) ** 0.5
SHRINK = 1 / (1 + SIGMA**2)


def gauss_model(x, batch_size=None):
    with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])


def guide_for(loc_shift=0.0, scale=POST_SCALE, batch_size=None):
    def guide(x, batch_size_=None):
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            pyro.sample("z", dist.Normal(SHRINK * x[idx] + loc_shift, scale))

    return guide


def exact(x):
    return dist.Normal(0.0, (1 + SIGMA**2) ** 0.5).log_prob(x)


@pytest.mark.parametrize("num_samples, chunk_size", [(10, None), (10, 3), (1, 100)])
def test_the_exact_posterior_gives_log_p_with_zero_variance(num_samples, chunk_size):
    x = torch.randn(20) * 2
    est = log_marginal(gauss_model, guide_for(), x, num_samples=num_samples, chunk_size=chunk_size)
    assert est.per_datum.shape == (20,)
    assert torch.allclose(est.per_datum, exact(x), atol=1e-10)
    assert torch.allclose(est.elbo, exact(x), atol=1e-10)
    if num_samples > 1:
        assert est.stderr.abs().max() < 1e-10
        assert torch.allclose(est.ess, torch.full((20,), float(num_samples)))


def test_a_subsampled_plate_is_walked_over_every_datum_once():
    # 23 data in batches of 5: the last batch overlaps; each datum is scored once, in order
    x = torch.randn(23) * 2
    est = log_marginal(lambda x: gauss_model(x, 5), guide_for(batch_size=5), x, num_samples=4)
    assert torch.allclose(est.per_datum, exact(x), atol=1e-10)
    with pytest.raises(ValueError, match="subsamples 5 of 23"):
        log_marginal(lambda x: gauss_model(x, 5), guide_for(batch_size=5), x, batch_size=7)


def test_iwae_rises_with_samples_towards_log_p_and_its_stderr_is_honest():
    pyro.set_rng_seed(1)
    x = torch.randn(400) * 1.2
    guide = guide_for(loc_shift=0.4, scale=0.8)  # a poor q
    # the ELBO in closed form: log p(x) - KL(q || posterior)
    q = dist.Normal(SHRINK * x + 0.4, 0.8)
    post = dist.Normal(SHRINK * x, POST_SCALE)
    elbo = exact(x) - torch.distributions.kl_divergence(q, post)
    means = []
    for s in (1, 10, 100, 1000):
        est = log_marginal(gauss_model, guide, x, num_samples=s)
        means.append(est.mean())
        assert est.mean() <= float(exact(x).mean()) + 4 * est.total_stderr / 400
    assert means == sorted(means) and means[0] < means[-1] - 0.05
    assert abs(means[-1] - float(exact(x).mean())) < 0.01
    est = log_marginal(gauss_model, guide, x, num_samples=1000)
    assert abs(float(est.elbo.mean() - elbo.mean())) < 0.01
    # the delta-method standard error matches the spread of repeated estimates
    x5 = x[:5]
    reps = torch.stack(
        [log_marginal(gauss_model, guide, x5, num_samples=50).per_datum for _ in range(200)]
    )
    predicted = log_marginal(gauss_model, guide, x5, num_samples=5000).stderr * math.sqrt(100)
    ratio = reps.std(0) / predicted
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def mixture_model(x, enumerate_c=True):
    weights = torch.tensor([0.2, 0.5, 0.3])
    locs = torch.tensor([-3.0, 0.0, 2.5])
    with pyro.plate("data", len(x)):
        if enumerate_c:
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(locs[c], 1.0))
        else:  # the same prior with c summed out by hand
            mix = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, 1.0))
            z = pyro.sample("z", mix)
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def mixture_guide(x, enumerate_c=True):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.9 * x, 0.7))


def test_enumerated_sites_are_summed_exactly_inside_the_weights():
    x = torch.randn(30) * 2
    setup = _plan(mixture_model, mixture_guide, (x,), {}, None, None)
    out = _weights(mixture_model, mixture_guide, (x,), {}, setup, 7, None, False)
    log_w, guide_tr = out.log_w, out.guide_tr
    z = guide_tr.nodes["z"]["value"]  # (7, 30)
    weights, locs = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-3.0, 0.0, 2.5])
    prior = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, 1.0))
    by_hand = (
        prior.log_prob(z)
        + dist.Normal(z, SIGMA).log_prob(x)
        - dist.Normal(0.9 * x, 0.7).log_prob(z)
    )
    assert log_w.shape == (7, 30)
    assert torch.allclose(log_w, by_hand, atol=1e-10)
    # and the estimate converges to the exact mixture likelihood
    marginal = dist.MixtureSameFamily(
        dist.Categorical(weights), dist.Normal(locs, (1 + SIGMA**2) ** 0.5)
    )
    est = log_marginal(mixture_model, mixture_guide, x, num_samples=4000, chunk_size=1000)
    err = (est.per_datum - marginal.log_prob(x)).abs()
    assert (err < 5 * est.stderr + 1e-3).all()


def test_global_latents_are_held_at_the_guides_point():
    w0 = 1.7

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + w, SIGMA), obs=x)

    def guide(x):
        w = pyro.sample("w", dist.Delta(torch.tensor(w0)))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(SHRINK * (x - w), POST_SCALE))

    x = torch.randn(10) + w0
    est = log_marginal(model, guide, x, num_samples=5)
    # log p(x_i | w0): the prior of w is not spread over the data
    assert torch.allclose(est.per_datum, exact(x - w0), atol=1e-10)


def test_an_enumerated_global_site_is_refused():
    def model(x):
        s = pyro.sample("s", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + s, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 's'.*outside the data plate"):
        log_marginal(model, guide, torch.randn(4))
    with pytest.raises(ValueError, match="num_samples"):
        log_marginal(gauss_model, guide_for(), torch.randn(4), num_samples=0)


def two_unit_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z[..., :1], SIGMA).to_event(1), obs=x)


def two_unit_guide(x):
    # unit 0 follows the datum (its exact posterior); unit 1 is a constant, off the prior
    with pyro.plate("data", len(x)):
        loc = torch.cat([SHRINK * x, torch.full_like(x, 0.3)], -1)
        scale = torch.tensor([POST_SCALE, 0.8])
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_diagnostics_kl_per_dim_active_units_and_the_decomposition():
    pyro.set_rng_seed(0)
    x = torch.randn(300, 1) * 1.5
    d = diagnostics(two_unit_model, two_unit_guide, x, num_samples=200)
    # KL per dim in closed form: KL(N(m, s) || N(0, 1)) = (s^2 + m^2 - 1) / 2 - log s
    m0, s0 = SHRINK * x[:, 0], POST_SCALE
    kl0 = ((s0**2 + m0**2 - 1) / 2 - math.log(s0)).mean()
    kl1 = (0.8**2 + 0.3**2 - 1) / 2 - math.log(0.8)
    assert torch.allclose(d.kl_per_dim["z"], torch.tensor([kl0, kl1]), atol=1e-10)
    assert d.active_units == {"z": 1}
    assert torch.allclose(d.activity["z"][0], (SHRINK * x[:, 0]).var(), atol=1e-10)
    assert d.activity["z"][1] < 1e-20
    # the Monte Carlo KL total agrees with the closed form; elbo = reconstruction - kl
    assert abs(d.kl / 300 - float(kl0 + kl1)) < 0.02
    assert d.elbo == pytest.approx(d.reconstruction - d.kl)
    # q is exact on the unit the likelihood sees, so ELBO = log p(x) - KL(unit 1 || prior)
    log_p = dist.Normal(0.0, (1 + SIGMA**2) ** 0.5).log_prob(x[:, 0])
    assert abs(d.elbo / 300 - float(log_p.mean() - kl1)) < 0.01
    assert d.log_marginal.num_samples == 200 and d.n_data == 300
    report = str(d)
    assert "active units [z]: 1 of 2" in report and "KL per dim [z]" in report


def test_diagnostics_of_a_mixture_prior_say_why_kl_per_dim_is_missing():
    x = torch.randn(40) * 2
    d = diagnostics(mixture_model, mixture_guide, x, num_samples=20)
    assert "z" not in d.kl_per_dim
    assert any("'z'" in note for note in d.notes)
    assert d.active_units == {"z": 1}  # q's mean 0.9 x varies with the datum
    assert math.isfinite(d.elbo) and d.elbo < d.log_marginal.total


def test_amortization_gap_vanishes_for_an_exact_encoder_and_not_for_an_untrained_one():
    pyro.set_rng_seed(2)
    x, _ = sample_ppca(200, d=4, q=2, sigma=0.5, seed=3)
    mle = ppca_mle(x, 2)
    pyro.param("W", mle["W"])
    pyro.param("mu", mle["mu"])
    pyro.param("sigma", mle["sigma"], constraint=dist.constraints.positive)
    guide = AmortizedGuide(ppca_model, hidden=())
    untrained = amortization_gap(ppca_model, guide, x, 2, steps=150, num_samples=100)
    assert untrained.gap > 0.5
    # with the MLE's orthogonal W the exact posterior is diagonal: the linear encoder's
    # weights can be set to it, and then nothing is left to gain per datum
    mean, cov = ppca_exact_posterior(x, mle["W"], mle["mu"], mle["sigma"])
    A = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1)], 1), mean).solution
    head = guide.encoder.heads["z"]
    with torch.no_grad():
        head.loc.weight.copy_(A[:-1].T)
        head.loc.bias.copy_(A[-1])
        head.scale.weight.zero_()
        head.scale.bias.copy_(torch.expm1(cov.diagonal().sqrt() - 1e-6).log())
    exact_gap = amortization_gap(ppca_model, guide, x, 2, steps=100, num_samples=100)
    assert abs(exact_gap.gap) < 0.01
    log_p = ppca_log_likelihood(x, mle["W"], mle["mu"], mle["sigma"]).detach()
    assert torch.allclose(exact_gap.encoder_elbo, log_p, atol=1e-8)
    # the optimized ELBO never beats log p(x) beyond Monte Carlo noise
    assert float((untrained.optimized_elbo - log_p).mean()) < 0.01
    assert guide._override is None  # the encoder is back in charge
    with pytest.raises(TypeError, match="AmortizedGuide"):
        amortization_gap(gauss_model, guide_for(), torch.randn(5))


def test_score_is_the_exact_held_out_log_likelihood_per_datum():
    from models import gmm
    from pyro_emvae import ExactEStep, fit, score

    x, _ = gmm.sample_gmm(200, 2, 2, seed=0)
    train, test = x[:150], x[150:]
    model = gmm.make_gmm_model(2, "full", init=gmm.init_params(train, 2, "full", seed=1))
    result = fit(model, ExactEStep(model), train, max_iter=50, tol=0)
    assert score(model, ExactEStep(model), train) == pytest.approx(result.per_datum(), rel=1e-10)
    p = result.params
    cov = p["scale_tril"] @ p["scale_tril"].transpose(-1, -2)
    mixture = dist.MixtureSameFamily(
        dist.Categorical(p["weights"]), dist.MultivariateNormal(p["locs"], cov)
    )
    assert score(model, ExactEStep(model), test) == pytest.approx(
        float(mixture.log_prob(test).mean()), rel=1e-10
    )
    # with an encoder guide it is the IWAE estimate
    est = score(gauss_model, guide_for(), torch.randn(30), num_samples=5)
    assert math.isfinite(est)


def test_log_marginal_of_a_model_without_a_data_plate_on_integer_data():
    """One categorical DiscreteHMM sequence of Long symbols: no data plate (one datum) and no
    floating value in the trace (these raised IndexError and StopIteration)."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()

    def model(x):
        pyro.sample("x", dist.DiscreteHMM(torch.zeros(2), trans, dist.Categorical(probs)), obs=x)

    x = torch.tensor([0, 0, 1, 2, 2, 2, 0, 1])
    est = log_marginal(model, lambda x: None, x, num_samples=3)
    exact = dist.DiscreteHMM(torch.zeros(2), trans, dist.Categorical(probs)).log_prob(x)
    assert est.per_datum.shape == (1,)
    torch.testing.assert_close(est.per_datum, exact.reshape(1), rtol=1e-12, atol=0)
