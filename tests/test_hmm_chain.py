"""The homogeneous chain's forward-backward (:func:`~pyro_emvae.distributions.hmm.chain_log_z`)
and :class:`~pyro_emvae.distributions.HomogeneousHMM` against exact references: a sum over every
path, the generic dense path (:func:`hmm_log_z` on the ``(T, K, K)`` potentials, autograd for
its marginals), Pyro's own ``DiscreteHMM``; and the E-step/M-step on the models against the same
model written as a plain ``DiscreteHMM`` (which keeps the generic path)."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_emvae.distributions.hmm as chain_mod
import pyro_emvae.estep as estep_mod
from models.hmm import (
    categorical_hmm,
    discrete_hmm_logits,
    gaussian_hmm,
    sample_categorical_hmm,
    sample_gaussian_hmm,
)
from pyro_emvae import EMOptim, ExactEStep, fit
from pyro_emvae.distributions import (
    ChainParts,
    HomogeneousHMM,
    chain_log_z,
    chain_posterior,
    hmm_log_z,
)
from pyro_emvae.distributions.hmm import _dense_posterior

NEG_INF = float("-inf")


def _random_parts(b: int, t_len: int, k: int, seed: int = 0) -> ChainParts:
    g = torch.Generator().manual_seed(seed)
    return ChainParts(
        torch.randn(b, k, generator=g, dtype=torch.float64),
        torch.randn(b, k, k, generator=g, dtype=torch.float64),
        2 * torch.randn(b, k, k, generator=g, dtype=torch.float64),
        3 * torch.randn(b, t_len, k, generator=g, dtype=torch.float64),
    )


def _brute(parts: ChainParts):
    """``(log Z, ChainPosterior)`` of one chain (batch 1) by listing all paths."""
    init, m = parts.dense()
    init, m = init[0], m[0]
    t_len, k = m.shape[0], m.shape[-1]
    paths = torch.tensor(list(itertools.product(range(k), repeat=t_len + 1)))
    w = init[paths[:, 0]] + m[torch.arange(t_len), paths[:, :-1], paths[:, 1:]].sum(-1)
    log_z = w.logsumexp(0)
    p = (w - log_z).exp()
    xi = torch.zeros(t_len, k, k, dtype=m.dtype)
    for t in range(t_len):
        xi[t].index_put_((paths[:, t], paths[:, t + 1]), p, accumulate=True)
    return log_z, (xi[0].sum(-1), xi[0], xi[1:].sum(0), xi.sum(-2))


def _close(a, b, tol=1e-11):
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


@pytest.mark.parametrize("t_len", [1, 2, 3, 6])
def test_chain_equals_the_sum_over_all_paths(t_len):
    parts = _random_parts(1, t_len, 3, seed=t_len)
    log_z, want = _brute(parts)
    _close(chain_log_z(*parts)[0], log_z)
    for got, ref in zip(chain_posterior(parts), want):
        _close(got[0], ref)


@pytest.mark.parametrize("block", [1, 3, 7, None])
@pytest.mark.parametrize("t_len", [2, 29, 200])
def test_chain_equals_the_dense_path_for_any_block_length(monkeypatch, block, t_len):
    """Blocks that divide the steps or leave a padded last block, one step per block, one
    block; a batch of chains each with its own transition."""
    if block is not None:
        monkeypatch.setattr(chain_mod, "_block_len", lambda n: min(block, n))
    parts = _random_parts(3, t_len, 4, seed=t_len)
    _close(chain_log_z(*parts), hmm_log_z(*parts.dense()), 1e-10)
    for got, ref in zip(chain_posterior(parts), _dense_posterior(parts)):
        _close(got, ref)


def test_chain_broadcasts_and_keeps_forbidden_transitions():
    """A (K, K) transition shared by a batch of chains, -inf entries (forbidden moves, a state
    never entered): the dense path's numbers, exact zeros where it has them."""
    parts = _random_parts(2, 50, 3, seed=1)
    trans = parts.trans[0].clone()
    trans[0, 1] = NEG_INF
    trans[:, 2] = NEG_INF  # state 2 is never entered after step 0
    first = parts.first.clone()
    first[..., 2] = NEG_INF
    log_z = chain_log_z(parts.init, first, trans, parts.emit)  # trans broadcast
    full = ChainParts(parts.init, first, trans.expand(2, 3, 3), parts.emit)
    _close(log_z, hmm_log_z(*full.dense()), 1e-10)
    got, ref = chain_posterior(full), _dense_posterior(full)
    for a, b in zip(got, ref):
        _close(a, b)
    assert bool((got.gamma[..., 2] == 0).all()) and bool((got.trans[:, 0, 1] == 0).all())


def test_chain_out_of_the_probability_domain_falls_back_to_log_space():
    """A forced alternation through a state whose emissions are e^-700 below the other's: the
    running products leave float64 between two rescalings, so the call takes the log-space
    path, and still equals it."""
    k, t_len = 2, 64
    trans = torch.tensor([[NEG_INF, 0.0], [0.0, NEG_INF]], dtype=torch.float64)
    emit = torch.tensor([0.0, -700.0], dtype=torch.float64).expand(1, t_len, k).clone()
    parts = ChainParts(
        torch.zeros(1, k, dtype=torch.float64), trans.expand(1, k, k), trans[None], emit
    )
    _, _, ok = chain_mod._chain_up(*parts)
    assert not bool(ok.all())  # (the fast path refuses it)
    want = chain_mod.log_space_log_z(*parts.dense())
    _close(chain_log_z(*parts), want, 1e-12)
    got = chain_posterior(parts)
    ref = _dense_posterior(parts)
    for a, b in zip(got, ref):
        _close(a, b)


def test_homogeneous_hmm_is_the_discrete_hmm_of_discrete_hmm_logits():
    K, T, D = 3, 40, 2
    g = torch.Generator().manual_seed(0)
    start = torch.rand(K, generator=g, dtype=torch.float64)
    trans = torch.rand(K, K, generator=g, dtype=torch.float64)
    start, trans = start / start.sum(), trans / trans.sum(-1, keepdim=True)
    obs = dist.Normal(torch.randn(K, D, generator=g, dtype=torch.float64), 1.0).to_event(1)
    x = torch.randn(4, T, D, generator=g, dtype=torch.float64)
    h = HomogeneousHMM(start.log(), trans.log(), obs, T)
    ref = dist.DiscreteHMM(*discrete_hmm_logits(start, trans, T), obs)
    assert h.event_shape == ref.event_shape and h.batch_shape == ref.batch_shape
    _close(h.log_prob(x), ref.log_prob(x), 1e-10)
    _close(h.transition_logits, ref.transition_logits, 1e-14)
    _close(h.initial_logits, ref.initial_logits, 1e-14)
    e = h.expand((4,))
    assert e.batch_shape == (4,)
    _close(e.log_prob(x), ref.log_prob(x), 1e-10)


def _plain_gaussian_hmm(data, K, init=None):
    """models.hmm.gaussian_hmm written with Pyro's DiscreteHMM and the (T, K, K) logits."""
    from models.hmm import _gaussian_params

    N, T, _ = data.shape
    start, trans, locs, scales = _gaussian_params(data, K, init)
    obs = dist.Normal(locs, scales).to_event(1)
    with pyro.plate("sequences", N, dim=-1):
        pyro.sample("x", dist.DiscreteHMM(*discrete_hmm_logits(start, trans, T), obs), obs=data)


def _masked(model, keep):
    def masked(data, K, init=None):
        with poutine.mask(mask=keep):
            model(data, K, init)

    return masked


@pytest.mark.parametrize("masked", [False, True])
def test_estep_on_a_homogeneous_hmm_equals_the_generic_path(masked):
    """Batched sequences (one of them masked out): log p(x), the marginals (the prior chain's
    where masked), the pairwise marginals and the E[log p(x, z)] of the fast path equal those
    of the same model as a plain DiscreteHMM; and the generic path is what the plain one runs."""
    K, N, T = 3, 3, 60
    x, truth = sample_gaussian_hmm(N, T, K, 2, seed=3)
    x, truth = x.double(), {k: v.double() for k, v in truth.items()}
    keep = torch.tensor([True, False, True])
    fast_model = _masked(gaussian_hmm, keep) if masked else gaussian_hmm
    plain_model = _masked(_plain_gaussian_hmm, keep) if masked else _plain_gaussian_hmm
    out = {}
    for name, model in (("fast", fast_model), ("plain", plain_model)):
        pyro.clear_param_store()
        guide = ExactEStep(model)
        post = guide.posterior(x, K, truth)
        out[name] = (post, guide.expected_log_joint(post, x, K, truth))
        tr = guide._enum_trace((x, K, truth), {})
        assert isinstance(tr.nodes["x"]["_hmm"], ChainParts) == (name == "fast")
    (fp, fe), (pp, pe) = out["fast"], out["plain"]
    _close(fp.log_likelihood, pp.log_likelihood, 1e-12)
    _close(fp.marginals["x"], pp.marginals["x"])
    _close(fp.pairwise[("x", "x")], pp.pairwise[("x", "x")])
    _close(fe, pe, 1e-11)
    q, pair = fp.factor_q["x"], pp.factor_q["x"]  # the M-step's weights: zero where masked
    _close(q.gamma, pair.sum(-2))
    _close(q.trans, pair[..., 1:, :, :].sum(-3))
    pyro.clear_param_store()


@pytest.mark.parametrize("model, plain", [("gaussian", True), ("categorical", False)])
def test_baum_welch_on_a_homogeneous_hmm_equals_the_generic_path(model, plain):
    """Three EM iterations from the same params give the same params and log p(x) as the plain
    DiscreteHMM form (Gaussian), and as the hand-counted Baum-Welch step (categorical)."""
    pyro.clear_param_store()
    if model == "gaussian":
        x, truth = sample_gaussian_hmm(2, 80, 3, 2, seed=1)
        x = x.double()
        init = {k: v.double() for k, v in truth.items()}
        forms = {"fast": gaussian_hmm, "plain": _plain_gaussian_hmm}
        results = {}
        for name, m in forms.items():
            pyro.clear_param_store()

            def fm(data, m=m):
                m(data, 3, init)

            r = fit(fm, ExactEStep(fm), x, optim=EMOptim(reg_covar=0), max_iter=3, tol=0)
            results[name] = (r, {k: pyro.param(k).detach().clone() for k in init})
        (rf, pf), (rp, pp) = results["fast"], results["plain"]
        _close(torch.as_tensor(rf.log_likelihood), torch.as_tensor(rp.log_likelihood), 1e-12)
        for k in init:
            _close(pf[k], pp[k], 1e-10)
    else:
        x, truth = sample_categorical_hmm(2, 50, 2, 3, seed=0)
        init = {k: v.double() for k, v in truth.items()}

        def cm(data):
            categorical_hmm(data, 2, 3, init)

        guide = ExactEStep(cm)
        post = guide.posterior(x)
        fit(cm, ExactEStep(cm), x, optim=EMOptim(), max_iter=1, tol=0)
        q = post.factor_q["x"]
        start = q.gamma[:, 0].sum(0)
        trans = q.trans.sum(0)
        emis = torch.einsum("ntk,ntm->km", q.gamma, torch.nn.functional.one_hot(x, 3).double())
        _close(pyro.param("start").detach(), start / start.sum(), 1e-10)
        _close(pyro.param("trans").detach(), trans / trans.sum(-1, keepdim=True), 1e-10)
        _close(pyro.param("emission_probs").detach(), emis / emis.sum(-1, keepdim=True), 1e-10)
    pyro.clear_param_store()


def test_time_varying_transitions_keep_the_generic_path(monkeypatch):
    """A DiscreteHMM whose transition changes over time never reaches the homogeneous kernel
    (made to fail here): its E-step is the dense one and equals Pyro's log_prob."""

    def refuse(*args, **kwargs):
        raise AssertionError("the homogeneous kernel ran on a time-varying chain")

    monkeypatch.setattr(estep_mod, "chain_log_z", refuse)
    K, T = 2, 30
    g = torch.Generator().manual_seed(0)
    tl = torch.randn(T, K, K, generator=g, dtype=torch.float64)
    x = torch.randn(2, T, generator=g, dtype=torch.float64)

    def model(data):
        obs = dist.Normal(torch.tensor([-1.0, 1.0], dtype=torch.float64), 1.0)
        with pyro.plate("s", 2, dim=-1):
            pyro.sample(
                "x", dist.DiscreteHMM(torch.zeros(K, dtype=torch.float64), tl, obs), obs=data
            )

    post = ExactEStep(model).posterior(x)
    want = (
        dist.DiscreteHMM(
            torch.zeros(K, dtype=torch.float64),
            tl,
            dist.Normal(torch.tensor([-1.0, 1.0], dtype=torch.float64), 1.0),
        )
        .log_prob(x)
        .sum()
    )
    _close(post.log_likelihood, want, 1e-10)
    assert post.pairwise[("x", "x")].shape == (2, T, K, K)


def test_diag_normal_rows_equals_the_generic_log_prob():
    """The HMM emissions row chunk by row chunk (data far from the origin), and None where the structure is not that (autograd recording, batched params)."""
    from pyro_emvae.kernels import diag_normal_rows

    g = torch.Generator().manual_seed(0)
    loc = 100.0 + torch.randn(4, 3, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(4, 3, generator=g, dtype=torch.float64)
    fn = dist.Normal(loc, scale).to_event(1)
    x = 100.0 + torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    want = fn.log_prob(x.unsqueeze(-2))
    _close(diag_normal_rows(fn, x), want, 1e-12)
    leaf = loc.clone().requires_grad_()
    assert diag_normal_rows(dist.Normal(leaf, scale).to_event(1), x) is None
    batched = dist.Normal(loc.expand(2, 4, 3), scale).to_event(1)
    assert diag_normal_rows(batched, x) is None
    assert diag_normal_rows(dist.Normal(loc, scale), x) is None  # (not a D-dim event)


def test_a_collapsed_state_keeps_its_exact_emissions_and_log_likelihood():
    """Regression: a state whose scale collapsed onto one data point (1e-12, what plain EM
    reaches before it stops on the collapse) has log-densities of +53 there and -1e25 elsewhere.
    The expanded quadratic form x^2/s^2 - 2 x mu/s^2 + mu^2/s^2 (two GEMMs) cancelled its
    ~1e24 terms to a wrong density at the point, lost the path through that state and returned
    log p(x) = -70.8 where Pyro's DiscreteHMM says +5.93 (EM then 'dropped' the likelihood by
    26 nats: tests/test_optim.py's monotonicity example). Emissions and log p(x) now equal
    Pyro's to 1e-12 relative."""
    from pyro_emvae.kernels import diag_normal_rows

    x, _ = sample_gaussian_hmm(N=1, T=20, K=3, D=2, seed=2)
    locs = torch.stack([torch.tensor([-4.16, -3.98], dtype=x.dtype), x[0, 0]])
    scales = torch.tensor([[1.26, 0.565], [1e-12, 1e-12]], dtype=x.dtype)
    fn = dist.Normal(locs, scales).to_event(1)
    want = fn.log_prob(x.unsqueeze(-2))
    assert want[0, 0, 1] > 50 and want[0, 1:, 1].max() < -1e23  # (the regime tested)
    _close(diag_normal_rows(fn, x), want, 1e-12)

    start = torch.tensor([6e-8, 1 - 6e-8], dtype=x.dtype)
    trans = torch.tensor([[1 - 1e-12, 1e-12], [1 - 1e-12, 1e-12]], dtype=x.dtype)
    init = {"start": start, "trans": trans, "locs": locs, "scales": scales}
    pyro.clear_param_store()

    def model(data):
        return gaussian_hmm(data, 2, init=init)

    post = ExactEStep(model).posterior(x)
    il, tl = discrete_hmm_logits(start, trans, 20)
    pyro_lp = dist.DiscreteHMM(il, tl, fn).log_prob(x).sum()
    assert pyro_lp > 5  # the path through the collapsed state at t=0 dominates
    _close(post.log_likelihood, pyro_lp, 1e-12)


def test_lazy_pairwise_reads_like_a_dict():
    """The posterior's pairwise entry of a homogeneous chain is built when read, and the dict
    behaves as a plain one (membership, iteration, pickling)."""
    import pickle

    pyro.clear_param_store()
    x, truth = sample_gaussian_hmm(2, 20, 2, 2, seed=0)
    init = {k: v.double() for k, v in truth.items()}
    post = ExactEStep(gaussian_hmm).posterior(x.double(), 2, init)
    pairs = post.pairwise
    assert ("x", "x") in pairs and len(pairs) == 1
    assert list(pairs) == [("x", "x")] and pairs[("x", "x")].shape == (2, 20, 2, 2)
    again = pickle.loads(pickle.dumps(pairs))
    assert type(again) is dict and torch.equal(again[("x", "x")], pairs[("x", "x")])
    _close(pairs[("x", "x")].sum(-2), post.marginals["x"])
    pyro.clear_param_store()


def test_chain_posterior_scales_like_a_weight():
    """``posterior * scale`` (the M-step's weight under ``poutine.scale``) scales every field,
    by a number or per sequence."""
    post = chain_posterior(_random_parts(2, 5, 3))
    for c, per in ((0.5, torch.tensor([0.5, 0.5])), (2.0, torch.tensor([2.0, 2.0]))):
        for got in (post * c, c * post, post * per):
            for a, b in zip(got, post):
                _close(a, b * c)
