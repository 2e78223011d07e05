"""HMM-VAE (models/hmm_vae.py): the enumerated chain is exact inside the ELBO that ``fit``
climbs, the state posteriors given u are exact, and the IWAE bound sits below the exact
log p(x) of a linear-Gaussian HMM-VAE (u integrated per path, paths summed) and reaches it."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from models.hmm_vae import (
    StepEncoderGuide,
    _draws,
    digit_sequences,
    kl_decomposition,
    make_hmm_vae,
    match_states,
    state_marginals,
)
from pyro_emvae import AmortizedGuide, fit, log_marginal

K, T, Q, D = 2, 3, 1, 2


@pytest.fixture(autouse=True)
def _one_thread():
    # DiscreteHMM.log_prob's small reductions run parallel regions: on a loaded 2-core
    # machine a second thread made a short fit 20x slower (13.6 s vs 0.63 s for 30 steps)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(form: str, seed: int = 0):
    """A linear-Gaussian HMM-VAE (T=3, K=2, 1-d u, 2-d x) with params off their defaults,
    its guide and data."""
    torch.manual_seed(seed)
    model, decoder = make_hmm_vae(
        K, latent_dim=Q, data_dim=D, hidden=(), likelihood="normal", form=form, seed=seed
    )
    guide = StepEncoderGuide(Q, data_dim=D, hidden=(4,), form=form, init_scale=0.7)
    x = torch.randn(5, T, D)
    poutine.trace(model).get_trace(x)  # create the params, then move them off their defaults
    store = pyro.get_param_store()
    store["start"] = torch.tensor([0.3, 0.7])
    store["trans"] = torch.tensor([[0.8, 0.2], [0.35, 0.65]])
    store["locs"] = torch.tensor([[-1.5], [1.0]])
    store["scales"] = torch.tensor([[0.5], [0.9]])
    store["x_scale"] = torch.tensor([0.6, 0.8])
    return model, decoder, guide, x


def params():
    s = pyro.get_param_store()
    return {k: s[k].detach() for k in ("start", "trans", "locs", "scales", "x_scale")}


def paths():
    return list(itertools.product(range(K), repeat=T))


def brute_log_pu_paths(u: torch.Tensor) -> torch.Tensor:
    """log p(z, u) for every path: ``u`` ``(B, T, Q)`` -> ``(B, K^T)``."""
    p = params()
    out = []
    for z in paths():
        lp = p["start"][z[0]].log() + sum(p["trans"][z[t - 1], z[t]].log() for t in range(1, T))
        for t in range(T):
            lp = lp + dist.Normal(p["locs"][z[t]], p["scales"][z[t]]).log_prob(u[:, t]).sum(-1)
        out.append(lp)
    return torch.stack(out, -1)


def brute_log_px_given_u(decoder, u, x):
    return dist.Normal(decoder(u), params()["x_scale"]).log_prob(x).sum((-2, -1))


def brute_state_marginals(u):
    post = brute_log_pu_paths(u).softmax(-1)  # (B, K^T)
    gamma = torch.zeros(u.shape[0], T, K)
    for j, z in enumerate(paths()):
        for t in range(T):
            gamma[:, t, z[t]] += post[:, j]
    return gamma


def exact_log_px(decoder, x):
    """Linear-Gaussian: given a path, x_t ~ N(W mu + b, W diag(s^2) W^T + diag(sx^2))."""
    p = params()
    W, b = decoder[0].weight.detach(), decoder[0].bias.detach()
    out = []
    for z in paths():
        lp = p["start"][z[0]].log() + sum(p["trans"][z[t - 1], z[t]].log() for t in range(1, T))
        for t in range(T):
            k = z[t]
            cov = W @ torch.diag(p["scales"][k] ** 2) @ W.T + torch.diag(p["x_scale"] ** 2)
            lp = lp + dist.MultivariateNormal(W @ p["locs"][k] + b, cov).log_prob(x[:, t])
        out.append(lp)
    return torch.logsumexp(torch.stack(out, -1), -1)


def guide_draw(guide, x, form):
    """One draw of u from the guide: ``(trace, u (B, T, Q), log q (B,))``."""
    tr = poutine.trace(guide).get_trace(x)
    if form == "hmm":
        u = tr.nodes["u"]["value"]
    else:
        u = torch.stack([tr.nodes[f"u_{t}"]["value"] for t in range(T)], 1)
    log_q = sum(
        s["fn"].log_prob(s["value"])
        for s in tr.nodes.values()
        if s["type"] == "sample" and not s["is_observed"] and s["name"].startswith("u")
    )
    return tr, u, log_q


@pytest.mark.parametrize("form", ["hmm", "markov"])
def test_elbo_sums_the_chain_exactly(form):
    model, decoder, guide, x = tiny(form)
    tr, u, log_q = guide_draw(guide, x, form)
    with torch.no_grad():
        brute = (
            torch.logsumexp(brute_log_pu_paths(u), -1) + brute_log_px_given_u(decoder, u, x) - log_q
        ).sum()
        fixed = poutine.replay(guide, trace=tr)
        # the markov form enumerates z_t; the hmm form sums the chain inside DiscreteHMM
        loss = TraceEnum_ELBO(max_plate_nesting=1) if form == "markov" else Trace_ELBO()
        elbo = -loss.loss(model, fixed, x)
    assert elbo == pytest.approx(float(brute), rel=1e-10)
    # what fit climbs (its first step's objective, before the update) is the same number:
    # for the markov form fit must have picked TraceEnum_ELBO (Trace_ELBO would draw z)
    result = fit(model, fixed, x, optim=pyro.optim.Adam({"lr": 1e-3}), max_iter=1, tol=0)
    assert result.history["elbo"][0] == pytest.approx(float(brute), rel=1e-10)


@pytest.mark.parametrize("form", ["hmm", "markov"])
def test_state_marginals_given_u_equal_brute_force(form):
    model, _, guide, x = tiny(form)
    with torch.no_grad():
        gamma = state_marginals(model, guide, x, mean=True)
        loc, _ = guide.encode(x)
    torch.testing.assert_close(gamma, brute_state_marginals(loc))
    # with draws: the average of the exact marginals given each draw
    pyro.set_rng_seed(1)
    with torch.no_grad():
        gamma = state_marginals(model, guide, x, num_samples=3)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        _, _, u, _ = _draws(guide, x, 3, False)
    want = brute_state_marginals(u).reshape(3, len(x), T, K).mean(0)
    torch.testing.assert_close(gamma, want)


@pytest.mark.parametrize("form", ["hmm", "markov"])
def test_iwae_below_exact_log_px_and_reaches_it(form):
    model, decoder, guide, x = tiny(form)
    with torch.no_grad():
        exact = exact_log_px(decoder, x)
        one = log_marginal(model, guide, x, num_samples=200, chunk_size=200)
        many = log_marginal(model, guide, x, num_samples=4000, chunk_size=1000)
    # the ELBO (mean of log w) is a strict bound; the IWAE estimate approaches from below
    assert (one.elbo < exact).all()
    assert (many.per_datum <= exact + 3 * many.stderr + 1e-9).all()
    assert ((many.per_datum - exact).abs() < 4 * many.stderr + 0.02).all()
    assert ((exact - many.per_datum).abs() < (exact - one.elbo)).all()


def test_kl_decomposition_chain_part_equals_brute_force():
    model, _, guide, x = tiny("hmm")
    pyro.set_rng_seed(2)
    kl = kl_decomposition(model, guide, x, num_samples=2)
    pyro.set_rng_seed(2)
    with torch.no_grad():
        _, _, u, log_q = _draws(guide, x, 2, False)
        joint = brute_log_pu_paths(u)  # log p(z, u)
        log_pu = torch.logsumexp(joint, -1)
        post = (joint - log_pu.unsqueeze(-1)).exp()
        prior_z = joint.clone()
        for j, z in enumerate(paths()):  # log p(z) alone
            p = params()
            prior_z[:, j] = p["start"][z[0]].log() + sum(
                p["trans"][z[t - 1], z[t]].log() for t in range(1, T)
            )
        chain = (post * ((joint - log_pu.unsqueeze(-1)) - prior_z)).sum(-1)  # KL(p(z|u)||p(z))
        total = log_q.sum((-2, -1)) - log_pu
    assert kl["chain"] == pytest.approx(float(chain.mean()), rel=1e-9)
    assert kl["total"] == pytest.approx(float(total.mean()), rel=1e-9)
    assert float(kl["per_dim"].sum()) + kl["chain"] == pytest.approx(kl["total"], rel=1e-9)
    assert kl["per_step_dim"].shape == (T, Q)


def test_short_fit_raises_the_elbo():
    model, decoder, guide, _ = tiny("hmm")
    # data from the model itself at its current params: two well separated states
    g = torch.Generator().manual_seed(0)
    z = torch.randint(K, (60, T), generator=g)
    u = params()["locs"][z] + params()["scales"][z] * torch.randn(60, T, Q, generator=g)
    with torch.no_grad():
        x = decoder(u) + 0.6 * torch.randn(60, T, D, generator=g)
        before = log_marginal(model, guide, x, num_samples=50).mean()
    result = fit(model, guide, x, optim=pyro.optim.Adam({"lr": 3e-2}), max_iter=150, tol=0)
    with torch.no_grad():
        after = log_marginal(model, guide, x, num_samples=50).mean()
    h = torch.tensor(result.history["elbo"])
    assert h[-20:].mean() > h[:20].mean()
    assert after > before + 0.1


def test_amortized_guide_fits_the_hmm_form():
    model, decoder, _, x = tiny("hmm")
    guide = AmortizedGuide(model, hidden=(8,))
    assert guide(x)["u"].shape == (len(x), T, Q)
    fit(model, guide, x, optim=pyro.optim.Adam({"lr": 1e-2}), max_iter=5, tol=0)
    with torch.no_grad():
        lm = log_marginal(model, guide, x, num_samples=20)
        assert (lm.per_datum <= exact_log_px(decoder, x) + 3 * lm.stderr + 1e-9).all()


def test_digit_sequences_follow_the_chain_and_match_states():
    images = torch.arange(12.0).reshape(6, 2)
    labels = torch.tensor([3, 5, 3, 5, 7, 7])
    trans = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [0.7, 0.0, 0.3]])
    x, s = digit_sequences(images, labels, [3, 5, 7], trans, n_seqs=400, T=30, seed=0)
    # every frame is an image of its state's class
    for k, c in enumerate([3, 5, 7]):
        pool = images[labels == c]
        frames = x[s == k]
        assert ((frames.unsqueeze(1) == pool).all(-1).any(-1)).all()
    counts = torch.zeros(3, 3)
    counts.index_put_((s[:, :-1].reshape(-1), s[:, 1:].reshape(-1)), torch.ones(400 * 29), True)
    freq = counts / counts.sum(-1, keepdim=True)
    assert (freq - trans).abs().max() < 0.03
    assert (freq[trans == 0] == 0).all()
    perm = torch.tensor([2, 0, 1])  # fitted state k is true state perm[k]
    pred = perm.argsort()[s]
    assert torch.equal(match_states(pred, s, 3), perm)
    assert math.isclose(float((perm[pred] == s).double().mean()), 1.0)


def test_benchmark_quick_run_checks_the_two_forms_agree(capsys):
    from benchmarks import hmm_vae

    results = hmm_vae.main(["--quick"])
    assert "markov+TraceEnum" in capsys.readouterr().out
    r = results[5]
    assert r["rel_diff"] < 1e-10 and math.isfinite(r["elbo"])
    assert r["hmm"] > 0 and r["markov"] > 0
