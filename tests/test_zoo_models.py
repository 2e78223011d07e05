"""Tests of the crowdsourcing and count-data models in ``models/``: Dawid–Skene
(``models/dawid_skene.py``), the Poisson and Bernoulli mixtures (``models/count_mixtures.py``).

Exact ``log p(x)`` from ``ExactEStep`` against brute force (``itertools.product`` over every
joint assignment of the latents, ``log p(x, z)`` by hand from the param store's values); EM via
``fit`` is monotone with every param closed-form; Dawid–Skene beats majority vote on noisy
labels with adversarial annotators; the Poisson mixture's EM matches hand-written EM.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pyro
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Poisson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.count_mixtures import (
    bernoulli_mixture,
    init_bernoulli,
    init_poisson,
    poisson_mixture,
    sample_bernoulli_mixture,
    sample_poisson_mixture,
)
from models.dawid_skene import (
    dawid_skene_model,
    init_params,
    majority_vote,
    sample_dawid_skene,
)
from pyro_emvae import EMOptim, ExactEStep, fit

TOL = 1e-10


def _p(name: str) -> torch.Tensor:
    return pyro.get_param_store().get_param(name).detach()


def _brute_force(n: int, K: int, log_joint) -> torch.Tensor:
    """log sum_z p(x, z) over every z in {0..K-1}^n, via itertools.product."""
    terms = [log_joint(torch.tensor(z)) for z in itertools.product(range(K), repeat=n)]
    return torch.logsumexp(torch.stack(terms), 0)


def _monotone(result, slack: float = 1e-9) -> None:
    ll = torch.tensor(result.history["log_likelihood"])
    assert len(ll) > 2
    assert (ll.diff() >= -slack * ll.abs()[1:].clamp_min(1)).all(), ll.diff().min()


# --------------------------------------------------------------------------------------------
# Dawid–Skene
# --------------------------------------------------------------------------------------------


def _ds_model(K, init):
    def model(labels, observed):
        return dawid_skene_model(labels, observed, K, init=init)

    return model


def test_dawid_skene_log_likelihood_equals_brute_force():
    K = 3
    labels, observed, _ = sample_dawid_skene(5, 4, K, seed=1, p_missing=0.4)
    assert not observed.all()  # the mask matters
    gen = torch.Generator().manual_seed(2)
    pi = torch.rand(K, generator=gen) + 0.1
    conf = torch.rand(4, K, K, generator=gen) + 0.1
    init = {"pi": pi / pi.sum(), "confusion": conf / conf.sum(-1, keepdim=True)}
    model = _ds_model(K, init)
    post = ExactEStep(model).posterior(labels, observed)
    pi, conf = _p("pi"), _p("confusion")

    def log_joint(z):
        lp = Categorical(pi).log_prob(z).sum()
        for i, j in itertools.product(range(labels.shape[0]), range(labels.shape[1])):
            if observed[i, j]:
                lp = lp + conf[j, z[i], labels[i, j]].log()
        return lp

    expected = _brute_force(labels.shape[0], K, log_joint)
    assert abs(float(post.log_likelihood) - float(expected)) < TOL
    # missing labels drop out: a different fill value leaves log p(y) unchanged
    refill = torch.where(observed, labels, torch.full_like(labels, K - 1))
    again = ExactEStep(model).posterior(refill, observed)
    assert abs(float(again.log_likelihood) - float(expected)) < TOL


def test_dawid_skene_plan_is_closed_form_and_em_is_monotone():
    K = 3
    labels, observed, _ = sample_dawid_skene(200, 6, K, seed=3, p_missing=0.3)
    model = _ds_model(K, init_params(labels, observed, K))
    guide = ExactEStep(model)
    plan = EMOptim().plan(guide, (labels, observed), {})
    assert sorted(plan.closed_form) == ["confusion", "pi"] and not plan.gradient
    result = fit(model, guide, labels, observed, max_iter=100, tol=1e-9)
    assert result.algorithm == "EM"
    assert sorted(result.closed_form) == ["confusion", "pi"] and not result.gradient
    _monotone(result)
    conf = result.params["confusion"]
    assert torch.allclose(conf.sum(-1), torch.ones(6, K), atol=1e-12)


def test_dawid_skene_beats_majority_vote_with_adversarial_annotators():
    K = 3
    labels, observed, truth = sample_dawid_skene(
        600, 9, K, seed=0, p_missing=0.3, accuracy=(0.45, 0.8), n_adversarial=3
    )
    model = _ds_model(K, init_params(labels, observed, K))
    guide = ExactEStep(model)
    result = fit(model, guide, labels, observed, max_iter=300, tol=1e-9)
    z_map = guide.marginals(labels, observed)["z"].reshape(-1, K).argmax(-1)
    acc_em = (z_map == truth["z"]).double().mean()
    acc_mv = (majority_vote(labels, observed, K).argmax(-1) == truth["z"]).double().mean()
    assert acc_em > acc_mv + 0.05, (acc_em, acc_mv)
    assert acc_em > 0.9
    # the learned confusion matrices are close to the truth, the adversaries' included
    err = (result.params["confusion"] - truth["confusion"]).abs().max()
    init_err = (init_params(labels, observed, K)["confusion"] - truth["confusion"]).abs().max()
    assert err < 0.15 and err < init_err, (err, init_err)
    assert (result.params["confusion"][:3].diagonal(dim1=-2, dim2=-1) < 0.3).all()


def test_majority_vote_counts_only_observed_labels():
    labels = torch.tensor([[0, 1, 1], [2, 2, 0]])
    observed = torch.tensor([[True, True, True], [False, False, True]])
    mv = majority_vote(labels, observed, 3)
    assert mv.argmax(-1).tolist() == [1, 0]
    assert torch.allclose(mv.sum(-1), torch.ones(2, dtype=mv.dtype))


# --------------------------------------------------------------------------------------------
# Poisson and Bernoulli mixtures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 3])
def test_poisson_mixture_log_likelihood_equals_brute_force(D):
    K = 3
    x, _ = sample_poisson_mixture(5, K, D, seed=4)
    model = lambda x: poisson_mixture(x, K, init=init_poisson(x, K, seed=5))
    post = ExactEStep(model).posterior(x)
    w, rates = _p("weights"), _p("rates")
    x2 = x.view(len(x), -1)

    def log_joint(z):
        return Categorical(w).log_prob(z).sum() + Poisson(rates[z]).log_prob(x2).sum()

    expected = _brute_force(len(x), K, log_joint)
    assert abs(float(post.log_likelihood) - float(expected)) < TOL


def test_bernoulli_mixture_log_likelihood_equals_brute_force():
    K = 3
    x, _ = sample_bernoulli_mixture(5, K, 6, seed=6)
    model = lambda x: bernoulli_mixture(x, K, init=init_bernoulli(x, K, seed=7))
    post = ExactEStep(model).posterior(x)
    w, probs = _p("weights"), _p("probs")

    def log_joint(z):
        return Categorical(w).log_prob(z).sum() + Bernoulli(probs=probs[z]).log_prob(x).sum()

    expected = _brute_force(len(x), K, log_joint)
    assert abs(float(post.log_likelihood) - float(expected)) < TOL


@pytest.mark.parametrize("which", ["poisson", "bernoulli"])
def test_count_mixture_em_is_monotone_and_closed_form(which):
    K = 3
    if which == "poisson":
        x, _ = sample_poisson_mixture(300, K, 2, seed=8)
        init, fn, names = init_poisson(x, K, seed=9), poisson_mixture, ["rates", "weights"]
    else:
        x, _ = sample_bernoulli_mixture(300, K, 16, seed=8)
        init, fn, names = init_bernoulli(x, K, seed=9), bernoulli_mixture, ["probs", "weights"]
    model = lambda x: fn(x, K, init=init)
    guide = ExactEStep(model)
    assert sorted(EMOptim().plan(guide, (x,), {}).closed_form) == names
    result = fit(model, guide, x, max_iter=60, tol=0)
    assert result.algorithm == "EM"
    assert sorted(result.closed_form) == names and not result.gradient
    _monotone(result)


def _hand_em_poisson(x, w, rates, n_iter):
    """Plain EM for a mixture of independent Poissons, in a few lines of torch."""
    for _ in range(n_iter):
        lp = w.log() + Poisson(rates).log_prob(x[:, None, :]).sum(-1)  # (N, K)
        r = torch.softmax(lp, -1)
        nk = r.sum(0)
        w, rates = nk / nk.sum(), (r.T @ x) / nk[:, None]
    lp = w.log() + Poisson(rates).log_prob(x[:, None, :]).sum(-1)
    return w, rates, torch.logsumexp(lp, -1).sum()


def test_poisson_mixture_em_matches_hand_written_em():
    K, n_iter = 3, 40
    x, _ = sample_poisson_mixture(400, K, 2, seed=10)
    init = init_poisson(x, K, seed=11)
    model = lambda x: poisson_mixture(x, K, init=init)
    # EMOptim's defaults: no Dirichlet pseudo-counts beyond the flat prior
    result = fit(model, ExactEStep(model), x, optim=EMOptim(reg_covar=0.0), max_iter=n_iter, tol=0)
    w, rates, ll = _hand_em_poisson(x, init["weights"], init["rates"], n_iter)
    assert torch.allclose(result.params["weights"], w, atol=TOL, rtol=0)
    assert torch.allclose(result.params["rates"], rates, atol=TOL, rtol=0)
    final = ExactEStep(model).posterior(x).log_likelihood
    assert abs(float(final) - float(ll)) < TOL * max(1.0, abs(float(ll)))


def test_n_data_counts_only_the_observed_labels():
    from models.dawid_skene import dawid_skene_model, init_params, sample_dawid_skene
    from pyro_emvae import ExactEStep, fit

    y, m, _ = sample_dawid_skene(100, 5, 2, seed=0, p_missing=0.5)
    init = init_params(y, m, 2)

    def model(y, m):
        dawid_skene_model(y, m, 2, init=init)

    result = fit(model, ExactEStep(model), y, m, max_iter=3, tol=0)
    assert result.n_data == int(m.sum()) < m.numel()
