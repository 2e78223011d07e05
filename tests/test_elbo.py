"""KLControlledELBO (KL annealing, free bits) against hand computations from the same draws,
and fit() with amortized guides: the SVI path, hybrid models, KL schedules."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_emvae import AmortizedGuide, ExactEStep, KLControlledELBO, fit, linear_warmup

DECODER = torch.nn.Linear(3, 4)


def model(x, batch_size=None):
    DECODER.double()
    pyro.module("decoder", DECODER)
    with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([3]).to_event(1))
        pyro.sample("x", dist.Normal(DECODER(z), 0.5).to_event(1), obs=x[idx])


def make_guide(x):
    guide = AmortizedGuide(model, hidden=(6,))
    guide.setup(x, 5)
    return guide


def rec_and_kl(guide, x, seed):
    pyro.set_rng_seed(seed)
    guide_tr = poutine.trace(guide).get_trace(x, 5)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, 5)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    rec = model_tr.nodes["x"]["log_prob_sum"]
    kl = guide_tr.nodes["z"]["log_prob_sum"] - model_tr.nodes["z"]["log_prob_sum"]
    idx = guide_tr.nodes["data"]["value"]
    q = guide_tr.nodes["z"]["fn"].base_dist
    kl_u = (
        q.log_prob(guide_tr.nodes["z"]["value"])
        - dist.Normal(0.0, 1.0).log_prob(guide_tr.nodes["z"]["value"])
    ).mean(0)  # per unit, averaged over the minibatch
    return rec, kl, kl_u, idx


def test_weight_one_and_no_free_bits_is_the_elbo():
    x = torch.randn(20, 4)
    guide = make_guide(x)
    loss = KLControlledELBO()
    pyro.set_rng_seed(7)
    ours = loss(model, guide, x, 5)
    pyro.set_rng_seed(7)
    theirs = Trace_ELBO().differentiable_loss(model, guide, x, 5)
    assert torch.allclose(ours, theirs, atol=1e-10)
    assert loss.last_elbo == pytest.approx(-float(theirs.detach()))


def test_kl_weight_scales_the_kl_and_free_bits_floor_it():
    x = torch.randn(20, 4)
    guide = make_guide(x)
    rec, kl, kl_u, _ = rec_and_kl(guide, x, 3)
    pyro.set_rng_seed(3)
    value = KLControlledELBO(kl_weight=0.25)(model, guide, x, 5)
    assert torch.allclose(value, -(rec - 0.25 * kl), atol=1e-10)
    lam = 0.4
    loss = KLControlledELBO(kl_weight=0.5, free_bits=lam)
    pyro.set_rng_seed(3)
    value = loss(model, guide, x, 5)
    floor = 20 * torch.relu(lam - kl_u).sum()  # scaled to the 20 data
    assert torch.allclose(value, -(rec - 0.5 * (kl + floor)), atol=1e-10)
    assert loss.last_elbo == pytest.approx(float((rec - kl).detach()))  # the plain ELBO is kept


def test_free_bits_above_every_units_kl_remove_the_kl_gradient():
    x = torch.randn(20, 4)
    guide = make_guide(x)
    params = list(guide.encoder.parameters())

    def grads(loss):
        pyro.set_rng_seed(11)
        value = loss(model, guide, x, 5)
        return torch.autograd.grad(value, params, allow_unused=True)

    floored = grads(KLControlledELBO(free_bits=1e3))
    rec_only = grads(KLControlledELBO(kl_weight=0.0))
    for a, b in zip(floored, rec_only, strict=True):
        if a is None:
            assert b is None
        else:
            assert torch.allclose(a, b, atol=1e-8)


def test_schedules_and_bad_options():
    w = linear_warmup(4, start=0.2)
    assert [w(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    with pytest.raises(ValueError, match="steps"):
        linear_warmup(0)
    with pytest.raises(ValueError, match="free_bits"):
        KLControlledELBO(free_bits=-1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        KLControlledELBO(kl_weight=float("nan"))
    loss = KLControlledELBO(kl_weight=lambda s: -1.0)
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"kl_weight\(0\) returned -1.0"):
        loss(model, make_guide(x), x, 5)


def mixture_vae(x, batch_size=None):
    DECODER.double()
    pyro.module("decoder", DECODER)
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(locs[c], 1.0).to_event(1))
        pyro.sample("x", dist.Normal(DECODER(z), 0.5).to_event(1), obs=x[idx])


def test_fit_runs_svi_with_an_amortized_guide_and_the_elbo_rises():
    pyro.set_rng_seed(0)
    x = torch.randn(200, 3) @ torch.randn(3, 4) + 1.0
    guide = AmortizedGuide(model, hidden=(16,))
    result = fit(model, guide, x, 50, optim=pyro.optim.Adam({"lr": 0.02}), max_iter=300, tol=0)
    assert result.algorithm == "SVI" and result.log_likelihood is None
    h = result.history["elbo"]
    assert len(h) == 300 and sum(h[-30:]) / 30 > sum(h[:30]) / 30 + 100
    assert any(k.startswith("encoder$$$") for k in result.params)


def test_fit_follows_a_kl_schedule():
    pyro.set_rng_seed(0)
    x = torch.randn(120, 4)
    guide = AmortizedGuide(model, hidden=(8,))
    result = fit(
        model,
        guide,
        x,
        40,
        optim=pyro.optim.Adam({"lr": 0.02}),
        max_iter=60,
        tol=0,
        kl_weight=linear_warmup(30),
        free_bits=0.05,
    )
    assert result.history["kl_weight"][:3] == pytest.approx([0.0, 1 / 30, 2 / 30])
    assert result.history["kl_weight"][-1] == 1.0
    assert all(math.isfinite(v) for v in result.history["elbo"])


def test_fit_of_a_hybrid_sums_the_discrete_site_exactly():
    pyro.set_rng_seed(0)
    x = torch.randn(120, 4)
    guide = AmortizedGuide(mixture_vae, hidden=(8,))
    result = fit(
        mixture_vae, guide, x, 40, optim=pyro.optim.Adam({"lr": 0.02}), max_iter=200, tol=0
    )
    h = result.history["elbo"]
    assert sum(h[-20:]) / 20 > sum(h[:20]) / 20
    # the enumerated site is not in the guide: TraceEnum_ELBO summed it
    assert "c" not in poutine.trace(guide).get_trace(x, 40).nodes
    annealed = fit(mixture_vae, guide, x, 40, max_iter=5, tol=0, kl_weight=linear_warmup(3))
    assert annealed.history["kl_weight"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    with pytest.raises(ValueError, match="free_bits needs a KL per latent element"):
        fit(mixture_vae, guide, x, 40, max_iter=2, free_bits=0.5)


def test_kl_control_of_a_hybrid_sums_the_discrete_site_and_splits_at_the_marginal_prior():
    x = torch.randn(30, 4)
    guide = AmortizedGuide(mixture_vae, hidden=(8,))
    guide.setup(x, 10)
    pyro.set_rng_seed(4)
    ours = KLControlledELBO()(mixture_vae, guide, x, 10)
    pyro.set_rng_seed(4)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(mixture_vae, guide, x, 10)
    assert torch.allclose(ours, theirs, atol=1e-10)
    # the KL is against p(z) = sum_c p(c) p(z | c), from the same draws
    loss = KLControlledELBO(kl_weight=0.3)
    pyro.set_rng_seed(4)
    value = loss(mixture_vae, guide, x, 10)
    pyro.set_rng_seed(4)
    guide_tr = poutine.trace(guide).get_trace(x, 10)
    z = guide_tr.nodes["z"]["value"]
    store = pyro.get_param_store()
    prior = dist.MixtureSameFamily(
        dist.Categorical(store["weights"]), dist.Normal(store["locs"], 1.0).to_event(1)
    )
    kl = 3.0 * (guide_tr.nodes["z"]["fn"].log_prob(z) - prior.log_prob(z)).sum()
    assert loss.last_kl == pytest.approx(float(kl.detach()), abs=1e-9)
    assert float(value.detach()) == pytest.approx(-(loss.last_elbo + 0.7 * loss.last_kl))
    assert loss.last_elbo == pytest.approx(-float(theirs.detach()))


def test_fit_refuses_kl_options_where_they_mean_nothing():
    def discrete(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    x = torch.randn(10)
    with pytest.raises(ValueError, match="ExactEStep guide has none"):
        fit(discrete, ExactEStep(discrete), x, kl_weight=0.5)
    with pytest.raises(ValueError, match="either loss or kl_weight"):
        fit(model, AmortizedGuide(model), torch.randn(10, 4), loss=Trace_ELBO(), free_bits=0.1)
