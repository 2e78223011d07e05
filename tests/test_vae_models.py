"""The digits VAE, the mixture VAE and M2 (``models/vae.py``, ``models/mixture_vae.py``) with
AmortizedGuide, fit and log_marginal: shapes, the ELBO rising under SVI, IWAE against the ELBO,
enumerated discrete latents summed exactly (against sums by hand), and clustering accuracy.
Small data, small nets and few steps: the whole file runs in seconds.

The tests at the end pin limitations of ``pyro_emvae.amortized`` found while writing these
models, since fixed: two data plates, held-out data of another size, the unsubsampled model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.mixture_vae import (
    _cat_last,
    cluster_accuracy,
    cluster_posterior,
    m2_classify,
    m2_inputs,
    make_m2,
    make_mixture_vae,
    mixture_log_joint,
)
from models.vae import (
    decoder_net,
    encode_mean,
    likelihood_dist,
    load_digits,
    load_digits_labels,
    make_vae,
    prior_samples,
    reconstructions,
    train_test_split,
)
from pyro_emvae import AmortizedGuide, fit, log_marginal
from pyro_emvae.evaluate import _plan, _weights

Z, H = 3, (32,)  # small latent and nets: fast


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny nets: two threads on a shared 2-core machine only add contention (several x slower)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    x, labels = load_digits(binarize=True, return_labels=True)
    return x, labels


def _subset(digits, n=200):
    x, labels = digits
    return x[:n].to(torch.get_default_dtype()), labels[:n]


def _fit(model, guide, *args, steps=200, lr=1e-2):
    return fit(
        model,
        guide,
        *args,
        optim=pyro.optim.Adam({"lr": lr}),
        max_iter=steps,
        tol=0,
        progress=False,
    )


def _rises(result, n_data, by=5.0):
    """The mean SVI ELBO of the last 20 steps beats that of the first 20 by ``by`` nats/datum
    (seeds 0-2 give 12 to 18 nats/datum here)."""
    h = result.history["elbo"]
    first, last = sum(h[:20]) / 20, sum(h[-20:]) / 20
    assert (last - first) / n_data > by, (first, last)


# ---------------------------------------------------------------------------- data
def test_load_digits_shape_range_labels_and_split():
    x = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert len(torch.unique(x)) == 17  # 0..16 scaled by 1/16
    xb, labels = load_digits(binarize=True, return_labels=True)
    assert set(torch.unique(xb).tolist()) == {0.0, 1.0}
    assert torch.equal(xb, (x > 0.5).double())
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert set(labels.tolist()) == set(range(10))
    assert torch.equal(load_digits_labels(), labels)
    tr, te = train_test_split(1797, 1500, seed=0)
    assert len(tr) == 1500 and len(te) == 297
    assert torch.equal(torch.cat([tr, te]).sort().values, torch.arange(1797))
    assert torch.equal(train_test_split(1797, 1500, seed=0)[0], tr)
    with pytest.raises(ValueError):
        train_test_split(10, 10)


# ---------------------------------------------------------------------------- the VAE
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
def test_vae_traces_with_the_documented_shapes(likelihood):
    x = load_digits(binarize=likelihood == "bernoulli")[:40]
    model, decoder = make_vae(latent_dim=Z, hidden=H, likelihood=likelihood)
    tr = pyro.poutine.trace(model).get_trace(x, batch_size=10)
    assert tr.nodes["z"]["value"].shape == (10, Z)
    assert tr.nodes["z"]["fn"].event_shape == (Z,)
    assert tr.nodes["x"]["fn"].batch_shape == (10,) and tr.nodes["x"]["fn"].event_shape == (64,)
    assert tr.nodes["x"]["is_observed"]
    assert "decoder$$$0.weight" in pyro.get_param_store()
    # the encoder is found and the guide gives one z per datum of the minibatch
    guide = AmortizedGuide(lambda x: model(x, batch_size=10), hidden=H)
    assert guide(x)["z"].shape == (10, Z)
    assert [s["name"] for s in guide.local] == ["z"]
    # pictures for the notebook: (n, 8, 8) pixel means in [0, 1]
    rec = reconstructions(decoder, guide, x, likelihood)
    samples = prior_samples(decoder, 5, Z, likelihood, seed=0)
    assert rec.shape == (40, 8, 8) and samples.shape == (5, 8, 8)
    for img in (rec, samples):
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.equal(samples, prior_samples(decoder, 5, Z, likelihood, seed=0))


def test_bernoulli_vae_refuses_grey_levels_and_bad_options():
    model, _ = make_vae(latent_dim=Z, hidden=H)
    tr = pyro.poutine.trace(model).get_trace(load_digits()[:10])
    with pytest.raises(ValueError):  # Pyro's validation: Bernoulli needs 0/1 pixels
        tr.compute_log_prob()
    with pytest.raises(ValueError, match="likelihood"):
        make_vae(likelihood="gaussian")


def test_vae_elbo_rises_and_iwae_is_tighter_than_the_elbo(digits):
    x, _ = _subset(digits)
    model, _ = make_vae(latent_dim=Z, hidden=H)

    def train_model(x):
        model(x, batch_size=50)

    guide = AmortizedGuide(train_model, hidden=H)
    result = _fit(train_model, guide, x)
    _rises(result, 200)
    lm = log_marginal(train_model, guide, x, num_samples=100)
    assert lm.per_datum.shape == (200,)
    # IWAE-100 >= ELBO: log of a mean >= mean of logs, per datum and in the mean
    assert (lm.per_datum >= lm.elbo - 1e-12).all()
    assert lm.mean() >= float(lm.elbo.mean())
    assert lm.mean() > float(lm.elbo.mean()) + 0.05  # a trained but imperfect q: strictly
    # and the bound rises with S (in expectation; 100 vs 1 draws is far beyond the noise)
    lm1 = log_marginal(train_model, guide, x, num_samples=1)
    assert lm.mean() > lm1.mean()
    # the SVI ELBO (scaled minibatch estimates) agrees with the evaluated one
    assert abs(result.elbo / 200 - float(lm.elbo.mean())) < 1.0


def test_the_trained_guide_scores_held_out_data_and_the_unsubsampled_model(digits):
    x, _ = _subset(digits, 130)
    x_train, x_test = x[:100], x[100:]
    model, _ = make_vae(latent_dim=Z, hidden=H)

    def train_model(x):
        model(x, batch_size=20)

    guide = AmortizedGuide(train_model, hidden=H)
    _fit(train_model, guide, x_train, steps=20)
    lm = log_marginal(train_model, guide, x_test, num_samples=10)
    assert lm.per_datum.shape == (30,) and torch.isfinite(lm.per_datum).all()
    with torch.no_grad():
        enc = guide.encoder(x_test)["z"]
    # on the model without subsampling, q of every row is the trained encoder's
    full = guide.with_model(model)
    tr = pyro.poutine.trace(full).get_trace(x_test)
    q = tr.nodes["z"]["fn"].base_dist
    assert torch.allclose(q.loc, enc["loc"]) and torch.allclose(q.scale, enc["scale"])
    assert full.encoder is guide.encoder
    # the encoder's means on new data, of any size
    assert torch.allclose(encode_mean(guide, x_test), enc["loc"], atol=1e-12)


# ---------------------------------------------------------------------------- mixture VAE
def test_mixture_vae_traces_trains_and_clusters(digits):
    x, labels = _subset(digits)
    model, _ = make_mixture_vae(latent_dim=Z, n_clusters=4, hidden=H, seed=0)
    guide = AmortizedGuide(model, hidden=H)
    guide(x)
    store = pyro.get_param_store()
    assert store["weights"].shape == (4,) and torch.allclose(store["weights"].sum(), torch.ones(()))
    assert store["locs"].shape == (4, Z) and store["scales"].shape == (4, Z)
    assert torch.pdist(store["locs"]).min() > 0.1  # spread out: the clusters differ
    tr = pyro.poutine.trace(model).get_trace(x)
    assert tr.nodes["c"]["infer"] == {"enumerate": "parallel"}
    assert [s["name"] for s in guide.local] == ["z"]  # c is left to the ELBO
    result = _fit(model, guide, x)
    _rises(result, 200)
    post = cluster_posterior(guide, x)
    assert post.shape == (200, 4)
    assert torch.allclose(post.sum(-1), torch.ones(200))
    # Bayes by hand at the encoder's mean
    z = guide.local_params(x)["z"]["loc"]
    w, locs, scales = (store[k].detach() for k in ("weights", "locs", "scales"))
    log_joint = w.log() + dist.Normal(locs, scales).log_prob(z[:, None, :]).sum(-1)
    assert torch.allclose(post, log_joint.softmax(-1), atol=1e-10)
    assert torch.allclose(mixture_log_joint(z), log_joint, atol=1e-10)
    acc = cluster_accuracy(post.argmax(-1), labels)
    assert 0.0 < acc <= 1.0
    assert cluster_posterior(guide, x[:17]).shape == (17, 4)  # held-out data of any size


def _copy_guide(src: AmortizedGuide, dst: AmortizedGuide) -> None:
    dst.encoder.load_state_dict(src.encoder.state_dict())


def test_mixture_vae_with_one_cluster_is_the_vae_to_1e_8(digits):
    x, _ = _subset(digits, 60)
    vae, vae_decoder = make_vae(latent_dim=Z, hidden=H)
    mix, mix_decoder = make_mixture_vae(latent_dim=Z, n_clusters=1, hidden=H)
    mix_decoder.load_state_dict(vae_decoder.state_dict())
    vae_guide = AmortizedGuide(vae, hidden=H, name="enc_vae")
    mix_guide = AmortizedGuide(mix, hidden=H, name="enc_mix")
    vae_guide.setup(x)
    mix_guide.setup(x)
    _copy_guide(vae_guide, mix_guide)
    store = pyro.get_param_store()  # pyro.param would keep the values set up by the trace
    store["locs"] = torch.zeros(1, Z)  # the mixture's one component is the VAE's prior
    store["scales"] = torch.ones(1, Z)
    assert store["weights"].item() == 1.0
    pyro.set_rng_seed(7)
    a = log_marginal(vae, vae_guide, x, num_samples=30, chunk_size=7)
    pyro.set_rng_seed(7)
    b = log_marginal(mix, mix_guide, x, num_samples=30, chunk_size=7)
    assert torch.allclose(a.per_datum, b.per_datum, rtol=0, atol=1e-8)
    assert torch.allclose(a.elbo, b.elbo, rtol=0, atol=1e-8)


def test_mixture_vae_log_weights_sum_the_clusters_exactly(digits):
    # log w by hand: log sum_k pi_k N(z; mu_k, sigma_k) + log p(x | z) - log q(z | x),
    # at the very draws of z that log_marginal used
    x, _ = _subset(digits, 40)
    model, decoder = make_mixture_vae(latent_dim=Z, n_clusters=5, hidden=H, init_spread=2.0)
    guide = AmortizedGuide(model, hidden=H)
    guide(x)
    store = pyro.get_param_store()  # (keeps each param's constraint)
    store["weights"] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    store["scales"] = 0.5 + torch.rand(5, Z)
    setup = _plan(model, guide, (x,), {}, None, None)
    out = _weights(model, guide, (x,), {}, setup, 6, None, False)
    z = out.guide_tr.nodes["z"]["value"]  # (6, 40, Z)
    assert z.shape == (6, 40, Z)
    w, locs, scales = (pyro.param(k).detach() for k in ("weights", "locs", "scales"))
    log_prior = torch.logsumexp(
        w.log() + dist.Normal(locs, scales).log_prob(z[..., None, :]).sum(-1), -1
    )
    q = guide.local_params(x)["z"]
    log_q = dist.Normal(q["loc"], q["scale"]).log_prob(z).sum(-1)
    with torch.no_grad():
        log_lik = likelihood_dist(decoder(z), "bernoulli").log_prob(x)
    assert torch.allclose(out.log_w, log_prior + log_lik - log_q, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------- M2
def _m2_data(digits, n=200, n_labeled=50):
    x, labels = _subset(digits, n)
    labeled = torch.arange(n) < n_labeled
    return x, labels, labeled


def test_m2_log_weights_observe_labels_and_sum_the_rest_exactly(digits):
    x, labels, labeled = _m2_data(digits, 40, 15)
    y = torch.where(labeled, labels, torch.zeros_like(labels))  # placeholders never read
    model, decoder = make_m2(latent_dim=Z, hidden=H)
    guide = AmortizedGuide(model, hidden=H, inputs=m2_inputs(10))
    guide(x, y, labeled)
    pi = torch.softmax(torch.randn(10), 0)
    pyro.get_param_store()["class_weights"] = pi
    args = (x, y, labeled)
    setup = _plan(model, guide, args, {}, None, None)
    out = _weights(model, guide, args, {}, setup, 4, None, False)
    z = out.guide_tr.nodes["z"]["value"]  # (4, 40, Z)
    with torch.no_grad():
        q = guide.encode(torch.arange(40), *args)["z"]
        log_q = dist.Normal(q["loc"], q["scale"]).log_prob(z).sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        ys = torch.eye(10)[:, None, None, :]
        log_px = likelihood_dist(decoder(_cat_last(ys, z)), "bernoulli").log_prob(x)  # (10,4,40)
    joint = pi.log()[:, None, None] + log_px
    by_class = joint.gather(0, labels.expand(1, 4, 40)).squeeze(0)  # the label's class
    summed = torch.logsumexp(joint, 0)  # every class
    by_hand = torch.where(labeled, by_class, summed) + log_pz - log_q
    assert torch.allclose(out.log_w, by_hand, rtol=0, atol=1e-8)
    # the encoder sees the label only where there is one
    inp = m2_inputs(10)(*args)
    assert inp.shape == (40, 74)
    assert torch.equal(inp[:15, 64:].argmax(-1), labels[:15])
    assert (inp[15:, 64:] == 0).all()


def test_m2_trains_and_classifies_better_than_chance(digits):
    x, labels, labeled = _m2_data(digits, 300, 100)
    y = torch.where(labeled, labels, torch.zeros_like(labels))
    model, decoder = make_m2(latent_dim=Z, hidden=H)

    def train_model(x, y, labeled):
        model(x, y, labeled, batch_size=100)

    guide = AmortizedGuide(train_model, hidden=H, inputs=m2_inputs(10))
    result = _fit(train_model, guide, x, y, labeled)
    _rises(result, 300)
    unlabeled = ~labeled
    for s in (0, 20):
        p = m2_classify(decoder, guide, x[unlabeled], num_samples=s)
        assert p.shape == (200, 10) and torch.allclose(p.sum(-1), torch.ones(200))
        acc = float((p.argmax(-1) == labels[unlabeled]).double().mean())
        assert acc > 0.7, (s, acc)  # chance is 0.1; seeds 0-2 give 0.89 to 0.94
    lm = log_marginal(train_model, guide, x, y, labeled, num_samples=20)
    assert torch.isfinite(lm.per_datum).all() and lm.mean() >= float(lm.elbo.mean())


# ---------------------------------------------------------------------------- accuracy
def test_cluster_accuracy_is_invariant_to_relabeling_and_counts_errors():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=g)
    perm = torch.randperm(10, generator=g)
    assert cluster_accuracy(perm[labels], labels) == 1.0
    assert cluster_accuracy(perm[labels] + 5, labels) == 1.0  # any cluster ids
    wrong = perm[labels].clone()
    wrong[:37] = (wrong[:37] + 1) % 10  # 37 moved to another cluster: still the best map
    assert cluster_accuracy(wrong, labels) == pytest.approx(1 - 37 / 500)
    # one cluster for everything: the largest class is right
    assert cluster_accuracy(torch.zeros(500), labels) == pytest.approx(
        float(torch.bincount(labels).max()) / 500
    )
    # more clusters than labels: the unmatched ones are errors
    pred = torch.tensor([0, 0, 1, 1, 2, 3])
    assert cluster_accuracy(pred, torch.tensor([0, 0, 1, 1, 1, 1])) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        cluster_accuracy(torch.zeros(3), torch.zeros(4))


def test_decoder_broadcasts_over_particles_and_enumeration():
    decoder = decoder_net(10 + Z, H, 64)
    ys = nn.functional.one_hot(torch.arange(10), 10).double()[:, None, None, :]  # (10, 1, 1, 10)
    z = torch.randn(7, 5, Z)  # (particles, data, Z)
    assert decoder(_cat_last(ys, z)).shape == (10, 7, 5, 64)


# ---------------------------------------------------------------------------- benchmark
def test_benchmark_quick_run_prints_the_report(capsys):
    from benchmarks import vae_digits

    results = vae_digits.main(["--quick"])
    out = capsys.readouterr().out
    for text in ("VAE", "mixture VAE (K=10", "IWAE-50/datum", "active units", "cluster acc."):
        assert text in out, text
    for r in results.values():
        assert r["test_iwae"] >= r["test_elbo"]
        assert math.isfinite(r["train_elbo"])


# ---------------------------------------------------------------------------- limitations
def _two_plate_m2():
    decoder = decoder_net(10 + Z, H, 64)

    def model(x_labeled, y_labeled, x_unlabeled):
        pyro.module("decoder", decoder)
        pi = pyro.param(
            "class_weights", torch.full((10,), 0.1), constraint=dist.constraints.simplex
        )
        prior = dist.Normal(torch.zeros(()), 1.0).expand([Z]).to_event(1)
        with pyro.plate("labeled", len(x_labeled)):
            y = pyro.sample("y_l", dist.Categorical(pi), obs=y_labeled)
            z = pyro.sample("z_l", prior)
            logits = decoder(_cat_last(nn.functional.one_hot(y, 10).double(), z))
            pyro.sample("x_l", likelihood_dist(logits, "bernoulli"), obs=x_labeled)
        with pyro.plate("unlabeled", len(x_unlabeled)):
            y = pyro.sample("y_u", dist.Categorical(pi), infer={"enumerate": "parallel"})
            z = pyro.sample("z_u", prior)
            logits = decoder(_cat_last(nn.functional.one_hot(y, 10).double(), z))
            pyro.sample("x_u", likelihood_dist(logits, "bernoulli"), obs=x_unlabeled)

    return model


def test_amortized_guide_amortizes_the_latents_of_two_data_plates(digits):
    x, labels = _subset(digits, 50)
    guide = AmortizedGuide(_two_plate_m2(), hidden=H)
    guide.setup(x[:20], labels[:20], x[20:])
    assert sorted(s["name"] for s in guide.local) == ["z_l", "z_u"]


def test_trained_guide_scores_held_out_data_of_another_size(digits):
    x, _ = _subset(digits, 130)
    model, _ = make_vae(latent_dim=Z, hidden=H)
    guide = AmortizedGuide(model, hidden=H)
    _fit(model, guide, x[:100], steps=2)
    lm = log_marginal(model, guide, x[100:], num_samples=5)
    assert lm.per_datum.shape == (30,)


def test_local_params_on_held_out_data_of_another_size(digits):
    x, _ = _subset(digits, 130)
    model, _ = make_vae(latent_dim=Z, hidden=H)
    guide = AmortizedGuide(model, hidden=H)
    guide.setup(x[:100])
    assert guide.local_params(x[100:])["z"]["loc"].shape == (30, Z)


def test_minibatch_trained_guide_scores_the_full_plate_model(digits):
    x, _ = _subset(digits, 100)
    model, _ = make_vae(latent_dim=Z, hidden=H)

    def train_model(x):
        model(x, batch_size=20)

    guide = AmortizedGuide(train_model, hidden=H)
    _fit(train_model, guide, x, steps=2)
    lm = log_marginal(model, guide, x, num_samples=5)
    assert lm.per_datum.shape == (100,)
