"""Tests of :class:`pyro_emvae.ExactEStep` against brute force.

Every expected value is computed by enumerating every joint assignment of the latents with
``itertools.product`` and evaluating ``log p(x, z)`` by hand (``torch.distributions`` and plain
indexing, from the param store's values, never through Pyro's enumeration); the exact log
evidence, marginals, pairwise marginals, joints and MAP then follow by logsumexp / normalised
weights / argmax. Params are drawn at random (a seeded generator), not hand-picked.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Bernoulli, Normal

from pyro_emvae import EnumerationError, ExactEStep, Posterior

PAR = {"enumerate": "parallel"}
TOL = 1e-9  # marginals etc.: a contraction vs a sum over assignments, both in float64


# ---------------------------------------------------------------------------- brute force
def _p(name: str) -> torch.Tensor:
    """The constrained value of a param in the store (differentiable wrt its unconstrained)."""
    return pyro.get_param_store().get_param(name)


def _assignments(cards: list[int]) -> torch.Tensor:
    """Every joint assignment, ``(M, len(cards))``, via itertools.product."""
    rows = list(itertools.product(*[range(k) for k in cards]))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class Brute:
    a: torch.Tensor  # (M, n) assignments
    lj: torch.Tensor  # (M,) log p(x, z)
    logpx: torch.Tensor  # log p(x)
    w: torch.Tensor  # (M,) p(z | x)

    def marginal(self, i: int, k: int) -> torch.Tensor:
        return torch.zeros(k).index_add(0, self.a[:, i], self.w)

    def pair(self, i: int, j: int, ki: int, kj: int) -> torch.Tensor:
        return (
            torch.zeros(ki * kj).index_add(0, self.a[:, i] * kj + self.a[:, j], self.w).view(ki, kj)
        )

    def argmax(self) -> torch.Tensor:
        return self.a[int(self.lj.argmax())]


def _brute(logjoint: Callable[[torch.Tensor], torch.Tensor], cards: list[int], grad=False) -> Brute:
    a = _assignments(cards)
    with torch.set_grad_enabled(grad):
        lj = logjoint(a)
        logpx = lj.logsumexp(0)
    w = (lj - logpx).exp().detach()
    return Brute(a, lj if grad else lj.detach(), logpx, w)


def _close(actual, expected, tol: float = TOL) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _simplex(g, *shape) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=g), -1)


def _positive(g, *shape) -> torch.Tensor:
    return 0.5 + torch.rand(*shape, generator=g)


@dataclass
class Case:
    model: Callable
    x: torch.Tensor
    logjoint: Callable[[torch.Tensor], torch.Tensor]  # (M, n) assignments -> (M,)
    cards: list[int]
    to_sites: Callable[[torch.Tensor], dict]  # one assignment row -> {site: value}
    depth: int  # max plate nesting
    from_draws: Callable[[dict], torch.Tensor]  # {site: (S, *batch)} -> (S, n) assignments

    def brute(self, grad=False) -> Brute:
        return _brute(self.logjoint, self.cards, grad)


# ---------------------------------------------------------------------------- models
def mixture_case(seed: int = 0, N: int = 4, K: int = 3) -> Case:
    """1. iid Gaussian mixture in a plate."""
    g = _gen(seed)
    w0, loc0, scale0 = _simplex(g, K), 2 * torch.randn(K, generator=g), _positive(g, K)
    x = 2 * torch.randn(N, generator=g)

    def model(x):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    def logjoint(a):
        w, loc, scale = _p("w"), _p("loc"), _p("scale")
        return (w.log()[a] + Normal(loc[a], scale[a]).log_prob(x)).sum(-1)

    return Case(model, x, logjoint, [K] * N, lambda r: {"z": r}, 1, lambda d: d["z"])


def two_latent_case(seed: int = 0, N: int = 3, K1: int = 3) -> Case:
    """2. z1 ~ Categorical, z2 ~ Bernoulli, x depends on both, per datum."""
    g = _gen(seed)
    w0, pb0 = _simplex(g, K1), 0.2 + 0.6 * torch.rand((), generator=g)
    loc0, scale0 = 2 * torch.randn(K1, 2, generator=g), _positive(g, K1, 2)
    x = 2 * torch.randn(N, generator=g)

    def model(x):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        pb = pyro.param("pb", pb0, constraint=constraints.unit_interval)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Categorical(w), infer=PAR)
            z2 = pyro.sample("z2", dist.Bernoulli(pb), infer=PAR).long()
            pyro.sample("x", dist.Normal(loc[z1, z2], scale[z1, z2]), obs=x)

    def logjoint(a):
        w, pb, loc, scale = _p("w"), _p("pb"), _p("loc"), _p("scale")
        z1, z2 = a[:, :N], a[:, N:]
        lp = w.log()[z1] + Bernoulli(pb).log_prob(z2.double())
        return (lp + Normal(loc[z1, z2], scale[z1, z2]).log_prob(x)).sum(-1)

    return Case(
        model,
        x,
        logjoint,
        [K1] * N + [2] * N,
        lambda r: {"z1": r[:N], "z2": r[N:].double()},
        1,
        lambda d: torch.cat([d["z1"], d["z2"].long()], -1),
    )


def nested_case(seed: int = 0, A: int = 2, B: int = 3, Ku: int = 2, Kz: int = 3) -> Case:
    """3. plate "a" (dim -2) with a latent u; plate "b" (dim -1) inside with z depending on u."""
    g = _gen(seed)
    wu0, trans0 = _simplex(g, Ku), _simplex(g, Ku, Kz)
    loc0, scale0 = 2 * torch.randn(Ku, Kz, generator=g), _positive(g, Kz)
    x = 2 * torch.randn(A, B, generator=g)

    def model(x):
        wu = pyro.param("wu", wu0, constraint=constraints.simplex)
        trans = pyro.param("trans", trans0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("a", x.shape[0], dim=-2):
            u = pyro.sample("u", dist.Categorical(wu), infer=PAR)
            with pyro.plate("b", x.shape[1], dim=-1):
                z = pyro.sample("z", dist.Categorical(trans[u]), infer=PAR)
                pyro.sample("x", dist.Normal(loc[u, z], scale[z]), obs=x)

    def logjoint(a):
        wu, trans, loc, scale = _p("wu"), _p("trans"), _p("loc"), _p("scale")
        u = a[:, :A]  # (M, A)
        z = a[:, A:].reshape(-1, A, B)  # (M, A, B), row-major cells
        uu = u[:, :, None]
        lp = wu.log()[u].sum(-1) + trans.log()[uu, z].sum((-1, -2))
        return lp + Normal(loc[uu, z], scale[z]).log_prob(x).sum((-1, -2))

    def to_sites(r):
        return {"u": r[:A].view(A, 1), "z": r[A:].view(A, B)}

    def from_draws(d):
        S = d["u"].shape[0]
        return torch.cat([d["u"].reshape(S, A), d["z"].reshape(S, A * B)], -1)

    return Case(model, x, logjoint, [Ku] * A + [Kz] * (A * B), to_sites, 2, from_draws)


def global_case(seed: int = 0, N: int = 3, Kg: int = 2, Kz: int = 3) -> Case:
    """4. a global discrete latent g, local z_n ~ trans[g], x_n ~ N(loc[g, z_n], scale[z_n])."""
    g = _gen(seed)
    wg0, trans0 = _simplex(g, Kg), _simplex(g, Kg, Kz)
    loc0, scale0 = 2 * torch.randn(Kg, Kz, generator=g), _positive(g, Kz)
    x = 2 * torch.randn(N, generator=g)

    def model(x):
        wg = pyro.param("wg", wg0, constraint=constraints.simplex)
        trans = pyro.param("trans", trans0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        gl = pyro.sample("g", dist.Categorical(wg), infer=PAR)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(trans[gl]), infer=PAR)
            pyro.sample("x", dist.Normal(loc[gl, z], scale[z]), obs=x)

    def logjoint(a):
        wg, trans, loc, scale = _p("wg"), _p("trans"), _p("loc"), _p("scale")
        gl, z = a[:, :1], a[:, 1:]
        lp = wg.log()[gl[:, 0]] + trans.log()[gl, z].sum(-1)
        return lp + Normal(loc[gl, z], scale[z]).log_prob(x).sum(-1)

    return Case(
        model,
        x,
        logjoint,
        [Kg] + [Kz] * N,
        lambda r: {"g": r[0], "z": r[1:]},
        1,
        lambda d: torch.cat([d["g"][:, None], d["z"]], -1),
    )


def _hmm_params(g, K):
    return _simplex(g, K), _simplex(g, K, K), 2 * torch.randn(K, generator=g), _positive(g, K)


def _hmm_declare(pi0, A0, loc0, scale0):
    pi = pyro.param("pi", pi0, constraint=constraints.simplex)
    A = pyro.param("A", A0, constraint=constraints.simplex)
    loc = pyro.param("loc", loc0)
    scale = pyro.param("scale", scale0, constraint=constraints.positive)
    return pi, A, loc, scale


def _hmm_logjoint(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x_{0:T}, z_{0:T}) of the pyro.markov HMM, paths ``a`` of shape (M, T)."""
    pi, A, loc, scale = _p("pi"), _p("A"), _p("loc"), _p("scale")
    lp = pi.log()[a[:, 0]] + A.log()[a[:, :-1], a[:, 1:]].sum(-1)
    return lp + Normal(loc[a], scale[a]).log_prob(x).sum(-1)


def hmm_case(seed: int = 0, T: int = 5, K: int = 3) -> Case:
    """5. an HMM written with pyro.markov, one sequence."""
    g = _gen(seed)
    params = _hmm_params(g, K)
    x = 2 * torch.randn(T, generator=g)

    def model(x):
        pi, A, loc, scale = _hmm_declare(*params)
        z = None
        for t in pyro.markov(range(len(x))):
            z = pyro.sample(f"z_{t}", dist.Categorical(pi if z is None else A[z]), infer=PAR)
            pyro.sample(f"x_{t}", dist.Normal(loc[z], scale[z]), obs=x[t])

    return Case(
        model,
        x,
        lambda a: _hmm_logjoint(a, x),
        [K] * T,
        lambda r: {f"z_{t}": r[t] for t in range(T)},
        0,
        lambda d: torch.stack([d[f"z_{t}"] for t in range(T)], -1),
    )


def hmm_plate_model(params):
    """6. N sequences in a plate, each an HMM written with pyro.markov; x is (N, T)."""

    def model(x):
        pi, A, loc, scale = _hmm_declare(*params)
        with pyro.plate("seqs", x.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t}", dist.Categorical(pi if z is None else A[z]), infer=PAR)
                pyro.sample(f"x_{t}", dist.Normal(loc[z], scale[z]), obs=x[:, t])

    return model


def dhmm_model(init0, trans0, loc0, scale0):
    """7. an observed DiscreteHMM site in a plate of sequences; x is (N, T)."""

    def model(x):
        il = pyro.param("init_logits", init0)
        tl = pyro.param("trans_logits", trans0)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("seqs", x.shape[0], dim=-1):
            pyro.sample("x", dist.DiscreteHMM(il, tl, dist.Normal(loc, scale)), obs=x)

    return model


def dhmm_brute(x_seq: torch.Tensor, K: int, grad: bool = False) -> Brute:
    """One sequence of the DiscreteHMM, brute force over (z_{-1}, z_0, ..., z_{T-1}).

    Pyro's convention: initial_logits is the law of z_{-1}, z_0 ~ trans[z_{-1}], and the
    logits are normalised by the distribution (log_softmax)."""
    T = x_seq.shape[0]
    il = torch.log_softmax(_p("init_logits"), -1)
    tl = torch.log_softmax(_p("trans_logits"), -1)
    loc, scale = _p("loc"), _p("scale")
    tl = tl.expand(T, K, K)  # (T, K, K), t = transition into z_t

    def logjoint(a):
        prev, cur = a[:, :-1], a[:, 1:]  # (M, T) each
        steps = torch.arange(T)
        lp = il[a[:, 0]] + tl[steps, prev, cur].sum(-1)
        return lp + Normal(loc[cur], scale[cur]).log_prob(x_seq).sum(-1)

    return _brute(logjoint, [K] * (T + 1), grad)


def dhmm_setup(seed: int, N: int = 2, T: int = 4, K: int = 3, inhomogeneous: bool = False):
    g = _gen(seed)
    init0 = torch.randn(K, generator=g)
    trans0 = torch.randn(*((T,) if inhomogeneous else ()), K, K, generator=g)
    loc0, scale0 = 2 * torch.randn(K, generator=g), _positive(g, K)
    x = 2 * torch.randn(N, T, generator=g)
    return dhmm_model(init0, trans0, loc0, scale0), x


# ---------------------------------------------------------------------------- 1. iid mixture
@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_log_likelihood_and_marginals(seed):
    case = mixture_case(seed)
    guide = ExactEStep(case.model)
    post = guide.posterior(case.x)
    assert isinstance(post, Posterior)
    b = case.brute()
    N, K = 4, 3
    assert post.log_likelihood.shape == ()
    _close(post.log_likelihood, b.logpx, 1e-10)
    expected = torch.stack([b.marginal(n, K) for n in range(N)])
    _close(post.marginals["z"], expected)
    assert post.scale == 1.0
    # the convenience methods agree with the Posterior
    _close(guide.log_likelihood(case.x), b.logpx, 1e-10)
    _close(guide.marginals(case.x)["z"], expected)
    assert guide.pairwise_marginals(case.x) == {}


# ---------------------------------------------------------------------------- 2. two latents
@pytest.mark.parametrize("seed", [0, 1])
def test_two_latents_per_datum(seed):
    N, K1 = 3, 3
    case = two_latent_case(seed, N, K1)
    post = ExactEStep(case.model).posterior(case.x)
    b = case.brute()
    _close(post.log_likelihood, b.logpx, 1e-10)
    _close(post.marginals["z1"], torch.stack([b.marginal(n, K1) for n in range(N)]))
    _close(post.marginals["z2"], torch.stack([b.marginal(N + n, 2) for n in range(N)]))
    names, joint = post.joints["x"]
    assert names == ("z1", "z2")
    _close(joint, torch.stack([b.pair(n, N + n, K1, 2) for n in range(N)]))
    # each latent's own factor
    names1, joint1 = post.joints["z1"]
    assert names1 == ("z1",)
    _close(joint1, post.marginals["z1"])


# ---------------------------------------------------------------------------- 3. nested plates
@pytest.mark.parametrize("seed", [0, 1])
def test_nested_plates(seed):
    A, B, Ku, Kz = 2, 3, 2, 3
    case = nested_case(seed, A, B, Ku, Kz)
    post = ExactEStep(case.model).posterior(case.x)
    b = case.brute()
    _close(post.log_likelihood, b.logpx, 1e-10)
    # u lives in plate "a" (dim -2) only: value shape (A, 1), so marginals (A, 1, Ku)
    expected_u = torch.stack([b.marginal(i, Ku) for i in range(A)]).view(A, 1, Ku)
    _close(post.marginals["u"], expected_u)
    expected_z = torch.stack(
        [torch.stack([b.marginal(A + i * B + j, Kz) for j in range(B)]) for i in range(A)]
    )
    _close(post.marginals["z"], expected_z)  # (A, B, Kz)
    expected_uz = torch.stack(
        [torch.stack([b.pair(i, A + i * B + j, Ku, Kz) for j in range(B)]) for i in range(A)]
    )
    _close(post.pairwise[("u", "z")], expected_uz)  # (A, B, Ku, Kz)
    names, joint = post.joints["x"]
    assert names == ("u", "z")
    _close(joint, expected_uz)


# ---------------------------------------------------------------------------- 4. global latent
@pytest.mark.parametrize("seed", [0, 1])
def test_global_latent(seed):
    N, Kg, Kz = 3, 2, 3
    case = global_case(seed, N, Kg, Kz)
    post = ExactEStep(case.model).posterior(case.x)
    b = case.brute()
    _close(post.log_likelihood, b.logpx, 1e-10)
    _close(post.marginals["g"], b.marginal(0, Kg))  # (Kg,)
    _close(post.marginals["z"], torch.stack([b.marginal(1 + n, Kz) for n in range(N)]))
    _close(post.pairwise[("g", "z")], torch.stack([b.pair(0, 1 + n, Kg, Kz) for n in range(N)]))


# ---------------------------------------------------------------------------- 5. markov HMM
@pytest.mark.parametrize("seed", [0, 1])
def test_markov_hmm(seed):
    T, K = 5, 3
    case = hmm_case(seed, T, K)
    post = ExactEStep(case.model).posterior(case.x)
    b = case.brute()
    _close(post.log_likelihood, b.logpx, 1e-10)
    for t in range(T):
        _close(post.marginals[f"z_{t}"], b.marginal(t, K))
    for t in range(1, T):
        _close(post.pairwise[(f"z_{t - 1}", f"z_{t}")], b.pair(t - 1, t, K, K))
    assert set(post.pairwise) == {(f"z_{t - 1}", f"z_{t}") for t in range(1, T)}


# ---------------------------------------------------------------------------- 6. plate of chains
def test_markov_hmm_plate_of_sequences():
    N, T, K = 3, 4, 3
    g = _gen(6)
    params = _hmm_params(g, K)
    x = 2 * torch.randn(N, T, generator=g)
    model = hmm_plate_model(params)
    post = ExactEStep(model).posterior(x)
    # brute force over all K^(N T) = 531441 joint assignments of the N chains (variable
    # n * T + t is z_t of sequence n)

    def logjoint(a):
        return sum(_hmm_logjoint(a[:, n * T : (n + 1) * T], x[n]) for n in range(N))

    b = _brute(logjoint, [K] * (N * T))
    _close(post.log_likelihood, b.logpx, 1e-10)
    for t in range(T):
        expected = torch.stack([b.marginal(n * T + t, K) for n in range(N)])  # (N, K)
        _close(post.marginals[f"z_{t}"], expected)
    for t in range(1, T):
        expected = torch.stack([b.pair(n * T + t - 1, n * T + t, K, K) for n in range(N)])
        _close(post.pairwise[(f"z_{t - 1}", f"z_{t}")], expected)  # (N, K, K)


# ---------------------------------------------------------------------------- 7. DiscreteHMM
def _check_dhmm_posterior(post: Posterior, x: torch.Tensor, K: int) -> None:
    N, T = x.shape
    brutes = [dhmm_brute(x[n], K) for n in range(N)]
    _close(post.log_likelihood, sum(b.logpx for b in brutes), 1e-10)
    # marginals (N, T, K): variable t + 1 of the brute force is z_t
    expected_m = torch.stack(
        [torch.stack([b.marginal(t + 1, K) for t in range(T)]) for b in brutes]
    )
    _close(post.marginals["x"], expected_m)
    # pairwise (N, T, K, K), [n, t, i, j] = p(z_{t-1}=i, z_t=j | x); t = 0 pairs z_{-1} with z_0
    expected_p = torch.stack(
        [torch.stack([b.pair(t, t + 1, K, K) for t in range(T)]) for b in brutes]
    )
    _close(post.pairwise[("x", "x")], expected_p)


@pytest.mark.parametrize("inhomogeneous", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_discrete_hmm_log_likelihood(seed, inhomogeneous):
    N, T, K = 2, 4, 3
    model, x = dhmm_setup(seed, N, T, K, inhomogeneous)
    guide = ExactEStep(model)
    post = guide.posterior(x)
    brutes = [dhmm_brute(x[n], K) for n in range(N)]
    _close(post.log_likelihood, sum(b.logpx for b in brutes), 1e-10)
    _close(guide.log_likelihood(x), post.log_likelihood, 1e-10)
    # p(x) agrees with Pyro's own DiscreteHMM.log_prob too
    with torch.no_grad():
        d = dist.DiscreteHMM(
            _p("init_logits"), _p("trans_logits"), dist.Normal(_p("loc"), _p("scale"))
        )
        _close(d.log_prob(x).sum(), post.log_likelihood, 1e-10)


@pytest.mark.parametrize("param_grads", [False, True])
@pytest.mark.parametrize("T", [4, 5])
@pytest.mark.parametrize("inhomogeneous", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_discrete_hmm_posterior(seed, inhomogeneous, T, param_grads):
    """Marginals (N, T, K) and pairwise marginals (N, T, K, K) of the hidden chain. (Regression:
    an earlier version returned all-zero marginals unless param_grads=True.)"""
    model, x = dhmm_setup(seed, 2, T, 3, inhomogeneous)
    post = ExactEStep(model).posterior(x, param_grads=param_grads)
    _check_dhmm_posterior(post, x, 3)


def test_discrete_hmm_convenience_marginals():
    model, x = dhmm_setup(1, 2, 4, 3)
    guide = ExactEStep(model)
    expected = guide.posterior(x, param_grads=True)
    _close(guide.marginals(x)["x"], expected.marginals["x"])
    _close(guide.pairwise_marginals(x)[("x", "x")], expected.pairwise[("x", "x")])


def test_discrete_hmm_param_grads():
    N, T, K = 2, 4, 3
    model, x = dhmm_setup(14, N, T, K, inhomogeneous=True)
    post = ExactEStep(model).posterior(x, param_grads=True)
    store = pyro.get_param_store()
    names = sorted(store.keys())
    assert set(post.param_grads) == set(names)
    leaves = [store.get_param(n).unconstrained() for n in names]
    with torch.enable_grad():
        logpx = sum(dhmm_brute(x[n], K, grad=True).logpx for n in range(N))
    grads = torch.autograd.grad(logpx, leaves)
    for n, gr in zip(names, grads, strict=True):
        _close(post.param_grads[n], gr, 1e-8)


def test_discrete_hmm_subsampled():
    """A DiscreteHMM in a subsampled plate: log p scaled by N / B, the chain posterior is the
    minibatch's own (unscaled)."""
    N, B, T, K = 3, 2, 4, 3
    _, x = dhmm_setup(15, N, T, K)
    g = _gen(15)
    init0, trans0 = torch.randn(K, generator=g), torch.randn(K, K, generator=g)
    loc0, scale0 = 2 * torch.randn(K, generator=g), _positive(g, K)
    used = []

    def model(x):
        il = pyro.param("init_logits", init0)
        tl = pyro.param("trans_logits", trans0)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("seqs", x.shape[0], subsample_size=B, dim=-1) as idx:
            used.append(idx.clone())
            pyro.sample("x", dist.DiscreteHMM(il, tl, dist.Normal(loc, scale)), obs=x[idx])

    post = ExactEStep(model).posterior(x, param_grads=True)
    xb = x[used[-1]]
    brutes = [dhmm_brute(xb[n], K) for n in range(B)]
    _close(post.log_likelihood, N / B * sum(b.logpx for b in brutes), 1e-10)
    expected_p = torch.stack(
        [torch.stack([b.pair(t, t + 1, K, K) for t in range(T)]) for b in brutes]
    )
    _close(post.pairwise[("x", "x")], expected_p)
    _close(post.marginals["x"], expected_p.sum(-2))


# ---------------------------------------------------------------------------- 8. MAP
NO_DISCRETE_WARNING = pytest.mark.filterwarnings("ignore:infer_discrete found no sample sites")


@pytest.mark.parametrize(
    "make",
    [mixture_case, global_case, hmm_case, two_latent_case, nested_case],
    ids=["mix", "global", "hmm", "two", "nested"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_brute_force_argmax(make, seed):
    case = make(seed)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)  # creates the params
    best = case.to_sites(case.brute().argmax())
    got = guide.map(case.x)
    assert set(got) == set(best)
    for name, value in best.items():
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name].long(), value.long()), (name, got[name], value)


@NO_DISCRETE_WARNING
@pytest.mark.parametrize("T", [4, 5])
@pytest.mark.parametrize("inhomogeneous", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_discrete_hmm(seed, inhomogeneous, T):
    """MAP over (z_{-1}, z_0, ..., z_{T-1}) jointly; z_0..z_{T-1} reported."""
    N, K = 2, 3
    model, x = dhmm_setup(seed, N, T, K, inhomogeneous)
    guide = ExactEStep(model)
    guide.posterior(x)
    got = guide.map(x)
    assert got["x"].shape == (N, T)
    expected = torch.stack([dhmm_brute(x[n], K).argmax()[1:] for n in range(N)])
    assert torch.equal(got["x"], expected), (got["x"], expected)


def test_map_plate_of_chains():
    N, T, K = 3, 4, 3
    g = _gen(16)
    params = _hmm_params(g, K)
    x = 2 * torch.randn(N, T, generator=g)
    guide = ExactEStep(hmm_plate_model(params))
    guide.posterior(x)
    got = guide.map(x)
    best = torch.stack(
        [_brute(lambda a, n=n: _hmm_logjoint(a, x[n]), [K] * T).argmax() for n in range(N)]
    )  # (N, T)
    for t in range(T):
        assert got[f"z_{t}"].shape == (N,)
        assert torch.equal(got[f"z_{t}"], best[:, t])


def test_discrete_hmm_map_and_sample_do_not_warn():
    model, x = dhmm_setup(0)
    guide = ExactEStep(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide.map(x)
        guide.sample(x, num_samples=2)


# ---------------------------------------------------------------------------- 9. sampling
def _assert_freq(draws: torch.Tensor, p: torch.Tensor, what: str) -> None:
    """Empirical frequencies of ``draws`` (S, ...) each in 0..K-1 against ``p`` (..., K):
    within 4 standard errors. A cell outside that band fails unless its count is plausible
    under the exact Binomial(S, p) law (both tails above 1e-6): with a handful of expected
    draws the normal band is meaningless (one draw of a value of probability 1e-4 is 4.5 SE
    out at S = 200)."""
    S, K = draws.shape[0], p.shape[-1]
    counts = torch.nn.functional.one_hot(draws.long(), K).double().sum(0)
    freq = counts / S
    se = (p * (1 - p) / S).clamp_min(0).sqrt()
    flagged = ((freq - p).abs() > 4 * se).nonzero().tolist()
    k = torch.arange(S + 1, dtype=torch.float64)
    for cell in flagged:
        c, q = int(counts[tuple(cell)]), float(p[tuple(cell)])
        lp = torch.distributions.Binomial(S, probs=torch.tensor(min(max(q, 0.0), 1.0))).log_prob(k)
        tails = min(lp[c:].logsumexp(0), lp[: c + 1].logsumexp(0))
        assert tails > math.log(1e-6), f"{what}: cell {cell}: {c} of {S} draws, exact p = {q}"


def _assert_pair_freq(prev: torch.Tensor, cur: torch.Tensor, p: torch.Tensor, what: str) -> None:
    K = p.shape[-1]
    _assert_freq(prev.long() * K + cur.long(), p.flatten(-2), what)


def _code(a: torch.Tensor, cards: list[int]) -> torch.Tensor:
    """Index of each assignment row in itertools.product order."""
    strides = [math.prod(cards[i + 1 :]) for i in range(len(cards))]
    return (a.long() * torch.tensor(strides)).sum(-1)


SAMPLE_CASES = {
    "mix": mixture_case,
    "hmm": hmm_case,
    "global": global_case,
    "two": two_latent_case,
    "nested": nested_case,
}


@pytest.mark.filterwarnings("error:the model failed under a particle plate")
@pytest.mark.parametrize(
    "name",
    [
        "mix",
        "hmm",
        "two",
        "global",
        "nested",
    ],
)
def test_sample(name):
    """Exact draws (one vectorized pass): every joint assignment's frequency, every site's
    marginals (and, on the chain, pairwise frequencies) against the brute-force posterior."""
    _check_samples(name, 4000, vectorize=True)


@pytest.mark.parametrize("name", list(SAMPLE_CASES))
def test_sample_per_draw(name):
    """The one-pass-per-draw path (vectorize=False), fewer draws."""
    _check_samples(name, 60, vectorize=False)


def _check_samples(name: str, num_samples: int, vectorize: bool) -> None:
    case = SAMPLE_CASES[name](3)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)
    b = case.brute()
    draws = guide.sample(case.x, num_samples=num_samples, vectorize=vectorize)
    one = case.to_sites(b.a[0])
    assert set(draws) == set(one)
    for site, value in one.items():  # shapes (num_samples, *batch)
        assert draws[site].shape == (num_samples,) + value.shape, site
    a = case.from_draws(draws)  # (S, n)
    for i, k in enumerate(case.cards):
        _assert_freq(a[:, i], b.marginal(i, k), f"{name} variable {i}")
    _assert_freq(_code(a, case.cards), b.w, f"{name} joint")
    if name == "hmm":
        K = case.cards[0]
        for t in range(1, len(case.cards)):
            _assert_pair_freq(a[:, t - 1], a[:, t], b.pair(t - 1, t, K, K), f"pair {t}")


def test_sample_plate_of_chains():
    N, T, K, S = 3, 4, 3, 4000
    g = _gen(19)
    params = _hmm_params(g, K)
    x = 2 * torch.randn(N, T, generator=g)
    guide = ExactEStep(hmm_plate_model(params))
    guide.posterior(x)
    draws = guide.sample(x, num_samples=S)
    paths = torch.stack([draws[f"z_{t}"] for t in range(T)], -1)  # (S, N, T)
    assert paths.shape == (S, N, T)
    for n in range(N):
        b = _brute(lambda a, n=n: _hmm_logjoint(a, x[n]), [K] * T)
        _assert_freq(_code(paths[:, n], [K] * T), b.w, f"seq {n} paths")
        for t in range(1, T):
            _assert_pair_freq(paths[:, n, t - 1], paths[:, n, t], b.pair(t - 1, t, K, K), "pair")


@NO_DISCRETE_WARNING
@pytest.mark.parametrize("inhomogeneous", [False, True])
def test_sample_discrete_hmm(inhomogeneous):
    N, T, K, S = 2, 4, 3, 4000
    model, x = dhmm_setup(3, N, T, K, inhomogeneous)
    guide = ExactEStep(model)
    guide.posterior(x)
    draws = guide.sample(x, num_samples=S)
    assert set(draws) == {"x"}
    assert draws["x"].shape == (S, N, T)
    for n in range(N):
        b = dhmm_brute(x[n], K)
        z = draws["x"][:, n]  # (S, T)
        for t in range(T):
            _assert_freq(z[:, t], b.marginal(t + 1, K), f"seq {n} z_{t}")
        for t in range(1, T):
            _assert_pair_freq(z[:, t - 1], z[:, t], b.pair(t, t + 1, K, K), f"seq {n} pair {t}")
        # whole paths z_0..z_{T-1} (z_{-1} summed out)
        p_path = torch.zeros(K**T).index_add(0, _code(b.a[:, 1:], [K] * T), b.w)
        _assert_freq(_code(z, [K] * T), p_path, f"seq {n} paths")


# ---------------------------------------------------------------------------- 10. guide / ELBO
CASES = {"mix": mixture_case, "global": global_case, "hmm": hmm_case}


NO_ENUM_WARNING = pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")


@NO_ENUM_WARNING
@pytest.mark.parametrize("name", list(CASES))
def test_elbo_with_exact_guide_is_log_likelihood(name):
    case = CASES[name](4)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)
    logpx = case.brute().logpx
    for _ in range(5):  # every draw gives exactly log p(x)
        _close(torch.tensor(-Trace_ELBO().loss(case.model, guide, case.x)), logpx, 1e-10)
        elbo = TraceEnum_ELBO(max_plate_nesting=case.depth)
        _close(torch.tensor(-elbo.loss(case.model, guide, case.x)), logpx, 1e-10)
    many = Trace_ELBO(num_particles=7)
    _close(torch.tensor(-many.loss(case.model, guide, case.x)), logpx, 1e-10)


@NO_ENUM_WARNING
@pytest.mark.parametrize("make", [two_latent_case, nested_case], ids=["two", "nested"])
def test_elbo_with_exact_guide_other_models(make):
    case = make(5)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)
    logpx = case.brute().logpx
    for _ in range(3):
        _close(torch.tensor(-Trace_ELBO().loss(case.model, guide, case.x)), logpx, 1e-10)
        elbo = TraceEnum_ELBO(max_plate_nesting=case.depth)
        _close(torch.tensor(-elbo.loss(case.model, guide, case.x)), logpx, 1e-10)


def test_elbo_with_exact_guide_plate_of_chains():
    N, T, K = 3, 4, 3
    g = _gen(7)
    params = _hmm_params(g, K)
    x = 2 * torch.randn(N, T, generator=g)
    model = hmm_plate_model(params)
    guide = ExactEStep(model)
    logpx = guide.posterior(x).log_likelihood
    brute = sum(_brute(lambda a, n=n: _hmm_logjoint(a, x[n]), [K] * T).logpx for n in range(N))
    _close(logpx, brute, 1e-10)
    for _ in range(3):
        _close(torch.tensor(-Trace_ELBO().loss(model, guide, x)), brute, 1e-10)


def _log_q_from_posterior(name: str, post: Posterior, a: torch.Tensor) -> torch.Tensor:
    """log q(z) of each assignment, q rebuilt from the guide's marginals / pairwise marginals
    (exact for these models: iid given g, or Markov)."""
    if name == "mix":
        m = post.marginals["z"]  # (N, K)
        return m.log()[torch.arange(a.shape[1]), a].sum(-1)
    if name == "global":
        mg, pair = post.marginals["g"], post.pairwise[("g", "z")]  # (Kg,), (N, Kg, Kz)
        gl, z = a[:, 0], a[:, 1:]
        cond = (pair / mg[:, None]).log()  # log q(z_n | g)
        n = torch.arange(z.shape[1])
        return mg.log()[gl] + cond[n, gl[:, None], z].sum(-1)
    T = a.shape[1]
    lq = post.marginals["z_0"].log()[a[:, 0]]
    for t in range(1, T):
        pair = post.pairwise[(f"z_{t - 1}", f"z_{t}")]
        cond = (pair / post.marginals[f"z_{t - 1}"][:, None]).log()
        lq = lq + cond[a[:, t - 1], a[:, t]]
    return lq


def _two_elbos(lq: torch.Tensor, b: Brute) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) - KL(q || p(z|x))  and  E_q[log p(x,z)] - E_q[log q], by brute force."""
    q = lq.exp()
    log_post = b.lj - b.logpx
    kl = (q * (lq - log_post)).sum()
    return b.logpx - kl, (q * (b.lj - lq)).sum()


@pytest.mark.parametrize("name", list(CASES))
def test_brute_force_elbo_forms(name):
    case = CASES[name](8)
    post = ExactEStep(case.model).posterior(case.x)
    b = case.brute()
    lq = _log_q_from_posterior(name, post, b.a)
    _close(lq.exp().sum(), torch.tensor(1.0), 1e-10)
    _close(lq, b.lj - b.logpx, 1e-8)  # q is the exact posterior, assignment by assignment
    first, second = _two_elbos(lq, b)
    _close(first, b.logpx, 1e-10)
    _close(second, b.logpx, 1e-10)
    _close(post.log_likelihood, b.logpx, 1e-10)
    # perturbed away from the posterior: the two forms agree and fall below log p(x)
    g = _gen(9)
    for size in (0.1, 1.0):
        lq2 = torch.log_softmax(lq + size * torch.randn(lq.shape, generator=g), 0)
        first, second = _two_elbos(lq2, b)
        _close(first, second, 1e-10)
        assert first < b.logpx - 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_guide_log_q_is_exact_posterior(name):
    """The guide's own log q(z), traced with z conditioned, equals log p(z | x) by brute force."""
    case = CASES[name](10)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)
    b = case.brute()
    rows = range(b.a.shape[0])
    if name == "hmm":  # 243 paths: a random subset is enough (and keeps this fast)
        rows = torch.randperm(b.a.shape[0], generator=_gen(11))[:30].tolist()
    for i in rows:
        data = case.to_sites(b.a[i])
        tr = poutine.trace(poutine.condition(guide, data=data)).get_trace(case.x)
        tr = prune_subsample_sites(tr)
        assert {n for n, s in tr.nodes.items() if s["type"] == "sample"} == set(data)
        _close(tr.log_prob_sum(), b.lj[i] - b.logpx, 1e-9)


# ---------------------------------------------------------------------------- 11. param grads
@pytest.mark.parametrize("make", [mixture_case, hmm_case], ids=["mix", "hmm"])
def test_param_grads(make):
    case = make(12)
    guide = ExactEStep(case.model)
    post = guide.posterior(case.x, param_grads=True)
    store = pyro.get_param_store()
    names = sorted(store.keys())
    assert set(post.param_grads) == set(names)
    leaves = [store.get_param(n).unconstrained() for n in names]
    logpx = case.brute(grad=True).logpx
    _close(post.log_likelihood, logpx.detach(), 1e-10)
    grads = torch.autograd.grad(logpx, leaves)
    for n, gr in zip(names, grads, strict=True):
        _close(post.param_grads[n], gr, 1e-8)
        assert gr.abs().sum() > 0  # every param matters here: not a vacuous comparison


# ---------------------------------------------------------------------------- 12. errors
def _mixture_with(site: Callable) -> Callable:
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = site(w)
            pyro.sample("x", dist.Normal(z.double(), 1.0), obs=x)

    return model


X_ERR = torch.tensor([0.3, -1.2, 2.0])


def _entrypoints(model):
    guide = ExactEStep(model)
    return [
        lambda: guide.posterior(X_ERR),
        lambda: guide.log_likelihood(X_ERR),
        lambda: guide(X_ERR),
    ]


def test_error_continuous_latent():
    def model(x):
        mu = pyro.sample("mu_shift", dist.Normal(0.0, 1.0))
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(z.double() + mu, 1.0), obs=x)

    for call in _entrypoints(model):
        with pytest.raises(EnumerationError) as err:
            call()
        assert "mu_shift" in str(err.value) and "continuous" in str(err.value)
    assert issubclass(EnumerationError, ValueError)


def test_error_discrete_without_annotation():
    model = _mixture_with(lambda w: pyro.sample("cluster_id", dist.Categorical(w)))
    for call in _entrypoints(model):
        with pytest.raises(EnumerationError) as err:
            call()
        assert "cluster_id" in str(err.value) and "enumerate" in str(err.value)


def test_error_sequential_enumeration():
    model = _mixture_with(
        lambda w: pyro.sample("cluster_id", dist.Categorical(w), infer={"enumerate": "sequential"})
    )
    for call in _entrypoints(model):
        with pytest.raises(EnumerationError) as err:
            call()
        assert "cluster_id" in str(err.value)


@pytest.mark.parametrize("method", ["map", "sample"])
def test_error_continuous_latent_map_sample(method):
    def model(x):
        mu = pyro.sample("mu_shift", dist.Normal(0.0, 1.0))
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(z.double() + mu, 1.0), obs=x)

    with pytest.raises(EnumerationError, match="mu_shift"):
        getattr(ExactEStep(model), method)(X_ERR)


@pytest.mark.parametrize("method", ["map", "sample"])
def test_error_discrete_without_annotation_map_sample(method):
    model = _mixture_with(lambda w: pyro.sample("cluster_id", dist.Categorical(w)))
    with pytest.raises(EnumerationError, match="cluster_id"):
        getattr(ExactEStep(model), method)(X_ERR)


# ---------------------------------------------------------------------------- masks and scales
def test_masked_observations():
    """poutine.mask on the likelihood only: masked points contribute nothing, so their
    posterior is the prior."""
    N, K = 4, 3
    g = _gen(17)
    w0, loc0, scale0 = _simplex(g, K), 2 * torch.randn(K, generator=g), _positive(g, K)
    x = 2 * torch.randn(N, generator=g)
    keep = torch.tensor([True, False, True, False])

    def model(x):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            with poutine.mask(mask=keep):
                pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    def logjoint(a):
        w, loc, scale = _p("w"), _p("loc"), _p("scale")
        return (w.log()[a] + Normal(loc[a], scale[a]).log_prob(x) * keep).sum(-1)

    guide = ExactEStep(model)
    post = guide.posterior(x)
    b = _brute(logjoint, [K] * N)
    _close(post.log_likelihood, b.logpx, 1e-10)
    _close(post.marginals["z"], torch.stack([b.marginal(n, K) for n in range(N)]))
    _close(post.marginals["z"][1], _p("w").detach())
    _close(torch.tensor(-Trace_ELBO().loss(model, guide, x)), b.logpx, 1e-10)


def test_common_scale():
    """poutine.scale on the whole model scales log p(x); marginals are unchanged."""
    case = mixture_case(18)
    model = poutine.scale(case.model, scale=2.5)
    post = ExactEStep(model).posterior(case.x)
    b = case.brute()
    assert post.scale == 2.5
    _close(post.log_likelihood, 2.5 * b.logpx, 1e-10)
    _close(post.marginals["z"], torch.stack([b.marginal(n, 3) for n in range(4)]))


# ---------------------------------------------------------------------------- 13. subsampling
def test_subsampled_mixture_in_svi():
    N, K, B = 4, 3, 2
    g = _gen(13)
    w0, loc0, scale0 = _simplex(g, K), 2 * torch.randn(K, generator=g), _positive(g, K)
    x = 2 * torch.randn(N, generator=g)
    used = []  # the minibatch of every model run

    def model(x):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("data", len(x), subsample_size=B) as idx:
            used.append(idx.clone())
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x[idx])

    def brute_minibatch(idx):
        w, loc, scale = _p("w"), _p("loc"), _p("scale")
        xb = x[idx]
        b = _brute(lambda a: (w.log()[a] + Normal(loc[a], scale[a]).log_prob(xb)).sum(-1), [K] * B)
        return b

    loc_init = loc0.clone()  # the param store's leaf is loc0 itself, updated in place
    guide = ExactEStep(model)
    # the posterior is that of the model's own minibatch, log p scaled by N / B
    post = guide.posterior(x)
    b = brute_minibatch(used[-1])
    assert post.scale == N / B
    _close(post.log_likelihood, N / B * b.logpx, 1e-10)
    _close(post.marginals["z"], torch.stack([b.marginal(i, K) for i in range(B)]))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(4):
        before = {n: _p(n).detach().clone() for n in ("w", "loc", "scale")}
        used.clear()
        loss = svi.step(x)
        assert math.isfinite(loss)
        # the guide's replayed model run and the ELBO's model run used the same minibatch
        assert len(used) >= 2 and torch.equal(used[-1], used[-2])
        w, loc, scale = before["w"], before["loc"], before["scale"]
        a, xb = _assignments([K] * B), x[used[-1]]
        lj = (w.log()[a] + Normal(loc[a], scale[a]).log_prob(xb)).sum(-1)
        assert abs(loss - (-(N / B) * lj.logsumexp(0).item())) < 1e-10
    # the params moved
    assert not torch.equal(_p("loc").detach(), loc_init)


# ---------------------------------------------------------------------------- edge cases
def _expected_marginals(case: Case, b: Brute) -> dict[str, torch.Tensor]:
    """Brute-force marginals of every site, shaped like its value + (K,): ``to_sites`` of the
    row 0..n-1 tells which variable sits at each position of each site's value."""
    where = case.to_sites(torch.arange(len(case.cards)))
    out = {}
    for site, idx in where.items():
        idx = idx.long()
        k = case.cards[int(idx.flatten()[0])]
        m = torch.stack([b.marginal(int(i), k) for i in idx.flatten()])
        out[site] = m.reshape(idx.shape + (k,))
    return out


SIZE_ONE = {
    "mix-N1": lambda: mixture_case(20, N=1),
    "global-N1": lambda: global_case(20, N=1),
    "nested-A1": lambda: nested_case(20, A=1),
    "nested-B1": lambda: nested_case(20, B=1),
    "two-N1": lambda: two_latent_case(20, N=1),
}


@pytest.mark.parametrize("name", list(SIZE_ONE))
def test_size_one_plates_posterior_and_map_values(name):
    case = SIZE_ONE[name]()
    guide = ExactEStep(case.model)
    post = guide.posterior(case.x)
    b = case.brute()
    _close(post.log_likelihood, b.logpx, 1e-10)
    for site, expected in _expected_marginals(case, b).items():
        _close(post.marginals[site], expected)
    best = case.to_sites(b.argmax())
    got = guide.map(case.x)
    for site, value in best.items():  # values (shapes: see the next test)
        assert torch.equal(got[site].long().reshape(value.shape), value.long()), site


@pytest.mark.parametrize(
    "name",
    list(SIZE_ONE),
)
def test_size_one_plates_map_and_sample_shapes(name):
    case = SIZE_ONE[name]()
    guide = ExactEStep(case.model)
    guide.posterior(case.x)
    shapes = {site: v.shape for site, v in case.to_sites(torch.zeros(len(case.cards))).items()}
    got = guide.map(case.x)
    assert {n: v.shape for n, v in got.items()} == shapes
    for vectorize in (True, False):
        draws = guide.sample(case.x, num_samples=5, vectorize=vectorize)
        assert {n: v.shape for n, v in draws.items()} == {
            n: (5,) + sh for n, sh in shapes.items()
        }, vectorize


@pytest.mark.parametrize("name", list(SIZE_ONE))
def test_size_one_plates_guide(name):
    case = SIZE_ONE[name]()
    guide = ExactEStep(case.model)
    guide.posterior(case.x)  # creates the params
    logpx = case.brute().logpx
    _close(torch.tensor(-Trace_ELBO().loss(case.model, guide, case.x)), logpx, 1e-10)


def test_subsample_size_one_in_svi():
    case = mixture_case(22)

    def model(x):
        w = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 0.0, 1.0]))
        with pyro.plate("data", len(x), subsample_size=1) as idx:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x[idx])

    svi = SVI(model, ExactEStep(model), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(case.x))


def test_single_component_marginals():
    case = mixture_case(23, N=3, K=1)
    post = ExactEStep(case.model).posterior(case.x)
    _close(post.log_likelihood, case.brute().logpx, 1e-10)
    _close(post.marginals["z"], torch.ones(3, 1))


def test_single_component_guide():
    case = mixture_case(23, N=3, K=1)
    guide = ExactEStep(case.model)
    guide.posterior(case.x)  # creates the params
    logpx = case.brute().logpx
    _close(torch.tensor(-Trace_ELBO().loss(case.model, guide, case.x)), logpx, 1e-10)


# ---------------------------------------------------------------------------- M-step objective
@pytest.mark.parametrize("name", ["mix", "global", "hmm"])
def test_expected_log_joint(name):
    """E_q[log p_theta(x, z)] with q held at the E-step's posterior: at the E-step's params it is
    log p(x) - H(q); after the params move it is sum_z q(z) log p_theta'(x, z), and its
    gradient is that sum's, by brute force."""
    case = CASES[name](24)
    guide = ExactEStep(case.model)
    post = guide.posterior(case.x)
    b = case.brute()
    value = guide.expected_log_joint(post, case.x)
    _close(value.detach(), (b.w * b.lj).sum(), 1e-10)
    # E_q[log p(x, z)] = log p(x) + E_q[log p(z | x)] = log p(x) - H(q) at q = p(z | x)
    entropy = -(b.w * b.w.clamp_min(1e-300).log()).sum()
    _close(value.detach(), b.logpx - entropy, 1e-9)
    store = pyro.get_param_store()
    with torch.no_grad():
        for n in store:
            u = store.get_param(n).unconstrained()
            u.add_(0.3 * torch.randn(u.shape, generator=_gen(25)))
    value = guide.expected_log_joint(post, case.x)
    names = sorted(store.keys())
    leaves = [store.get_param(n).unconstrained() for n in names]
    expected = (b.w * case.brute(grad=True).lj).sum()
    _close(value.detach(), expected.detach(), 1e-10)
    got = torch.autograd.grad(value, leaves, allow_unused=True)
    want = torch.autograd.grad(expected, leaves)
    for n, g1, g2 in zip(names, got, want, strict=True):
        assert g1 is not None, n
        _close(g1, g2, 1e-8)


def test_expected_log_joint_discrete_hmm():
    N, T, K = 2, 4, 3
    model, x = dhmm_setup(26, N, T, K, inhomogeneous=True)
    guide = ExactEStep(model)
    post = guide.posterior(x)
    old = [dhmm_brute(x[n], K) for n in range(N)]
    value = guide.expected_log_joint(post, x)
    _close(value.detach(), sum((b.w * b.lj).sum() for b in old), 1e-10)
    store = pyro.get_param_store()
    with torch.no_grad():
        for n in store:
            u = store.get_param(n).unconstrained()
            u.add_(0.3 * torch.randn(u.shape, generator=_gen(27)))
    value = guide.expected_log_joint(post, x)
    names = sorted(store.keys())
    leaves = [store.get_param(n).unconstrained() for n in names]
    expected = sum((b.w * dhmm_brute(x[n], K, grad=True).lj).sum() for n, b in enumerate(old))
    _close(value.detach(), expected.detach(), 1e-10)
    got = torch.autograd.grad(value, leaves, allow_unused=True)
    want = torch.autograd.grad(expected, leaves)
    for n, g1, g2 in zip(names, got, want, strict=True):
        assert g1 is not None, n
        _close(g1, g2, 1e-8)


def test_posterior_works_under_no_grad():
    """The posterior is the gradient of log p(x) with respect to the factors: it must not
    depend on the caller's grad mode."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)

    x = torch.tensor([0.0, 2.5, 1.0])
    guide = ExactEStep(model)
    expected = guide.posterior(x).marginals["z"]
    with torch.no_grad():
        post = guide.posterior(x)
    assert torch.allclose(post.marginals["z"], expected)


# ---------------------------------------------------------------------------- Pyro's errors, named
def _scaled_likelihood(x):
    """The likelihood alone under poutine.scale: its scale would sit inside the sum over z."""
    w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        with poutine.scale(scale=2.0):
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)


@pytest.mark.parametrize("call", ["log_likelihood", "posterior", "guide"])
def test_error_scales_differ_across_enumerated_factors(call):
    """Pyro's 'Expected all enumerated sample sites to share a common poutine.scale' names
    the sites and their scales, as an EnumerationError."""
    guide = ExactEStep(_scaled_likelihood)
    fn = guide if call == "guide" else getattr(guide, call)
    with pytest.raises(EnumerationError) as err:
        fn(X_ERR)
    msg = str(err.value)
    for part in ["one poutine.scale", "scale 1 on 'z'", "scale 2 on 'x'", "whole model"]:
        assert part in msg, (part, msg)


def _crossed(x):
    """x[b, a] reads latents of two independent plates: not tree-structured."""
    loc = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])
    plate_a = pyro.plate("rows_a", x.shape[1], dim=-1)
    plate_b = pyro.plate("rows_b", x.shape[0], dim=-2)
    with plate_a:
        a = pyro.sample("a", dist.Categorical(torch.ones(2) / 2), infer=PAR)
    with plate_b:
        b = pyro.sample("b", dist.Categorical(torch.ones(2) / 2), infer=PAR)
    with plate_a, plate_b:
        pyro.sample("x", dist.Normal(loc[a, b], 1.0), obs=x)


@pytest.mark.parametrize("call", ["log_likelihood", "posterior", "map", "sample", "guide"])
def test_error_plates_not_tree_structured(call):
    guide = ExactEStep(_crossed)
    fn = guide if call == "guide" else getattr(guide, call)
    with pytest.raises(EnumerationError) as err:
        fn(torch.zeros(3, 2))
    msg = str(err.value)
    for part in [
        "site 'x' (plates 'rows_a', 'rows_b')",
        "enumerated site 'a' (plates 'rows_a')",
        "enumerated site 'b' (plates 'rows_b')",
        "independent plates",
        "sequential",
    ]:
        assert part in msg, (part, msg)
    assert isinstance(err.value.__cause__, NotImplementedError)


# ---------------------------------------------------------------------------- fit: the guide's model
def _mixture_k(k: int):
    def model(x):
        w = pyro.param("w", torch.ones(k) / k, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.linspace(-2.0, 2.0, k))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    return model


def test_fit_refuses_a_guide_built_for_another_model():
    """Re-running a notebook's model cell (new K) but not its guide cell: fit would fit the
    guide's old model. Both are named 'model'; the error says so."""
    from pyro_emvae import fit
    from pyro_emvae.validate import ModelInputError

    old, new = _mixture_k(2), _mixture_k(3)
    x = torch.tensor([-2.0, 0.1, 2.2, 1.9])
    with pytest.raises(ModelInputError) as err:
        fit(new, ExactEStep(old), x, max_iter=2)
    msg = str(err.value)
    for part in [
        "'_mixture_k.<locals>.model'",
        "not the model the ExactEStep guide was built",
        "same name",
        "ExactEStep(model)",
    ]:
        assert part in msg, (part, msg)
    assert "w" not in pyro.get_param_store()  # refused before any work


def test_fit_tells_copies_of_a_function_from_changed_ones():
    """Two copies of the same lambda compute the same model: accepted. The same lambda with
    another constant, or a closure over another K, is another model: refused."""
    from pyro_emvae import fit
    from pyro_emvae.validate import ModelInputError

    def mixture(x, k):
        _mixture_k(k)(x)

    x = torch.tensor([-2.0, 0.1, 2.2, 1.9])
    result = fit(lambda x: mixture(x, 2), ExactEStep(lambda x: mixture(x, 2)), x, max_iter=2)
    assert result.n_iter == 2
    pyro.clear_param_store()
    with pytest.raises(ModelInputError, match="not the model the ExactEStep guide"):
        fit(lambda x: mixture(x, 3), ExactEStep(lambda x: mixture(x, 2)), x, max_iter=2)
    with pytest.raises(ModelInputError, match="same name"):
        fit(_mixture_k(3), ExactEStep(_mixture_k(2)), x, max_iter=2)


def test_fit_accepts_a_guide_built_on_the_model_wrapped_in_handlers():
    """ExactEStep(config_enumerate(model)) is a guide of model: fit runs, on that model."""
    from pyro.infer import config_enumerate

    from pyro_emvae import fit

    def raw(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    x = torch.tensor([-2.0, 0.1, 2.2, 1.9])
    guide = ExactEStep(config_enumerate(raw))
    result = fit(raw, guide, x, max_iter=3, tol=0)
    assert result.log_likelihood == pytest.approx(float(guide.log_likelihood(x)), abs=1e-10)


def test_fit_accepts_the_same_bound_method_or_partial_and_refuses_others():
    """A bound method is made anew at each attribute access (``m.model is not m.model``) and a
    partial is a new object each time: the same method of the same object, or a partial of the
    same model with the same arguments, is the guide's own model; another object's method, or
    other arguments, is not."""
    import functools

    from pyro_emvae import fit
    from pyro_emvae.validate import ModelInputError

    def mixture(k, x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z] * k, 1.0), obs=x)

    class Holder:
        def model(self, x):
            mixture(1.0, x)

    holder, x = Holder(), torch.tensor([-2.0, 0.1, 2.2, 1.9])
    fit(holder.model, ExactEStep(holder.model), x, max_iter=2, tol=0)
    pyro.clear_param_store()
    fit(functools.partial(mixture, 2.0), ExactEStep(functools.partial(mixture, 2.0)), x, max_iter=2)
    with pytest.raises(ModelInputError, match="is not the model the ExactEStep guide was built"):
        fit(functools.partial(mixture, 2.0), ExactEStep(functools.partial(mixture, 3.0)), x)
    with pytest.raises(ModelInputError, match="is not the model the ExactEStep guide was built"):
        fit(Holder().model, ExactEStep(holder.model), x)


class _SummedMixture(dist.TorchDistribution):
    """A user's own implicit latent (the protocol PCFG and CTC share): a mixture whose
    component is summed inside ``log_prob``; ``override`` replaces its components' likelihoods."""

    arg_constraints = {}  # noqa: RUF012
    support = dist.constraints.real

    def __init__(self, logw, locs, n):
        self.logw, self.locs = logw, locs
        super().__init__(torch.Size([n]), torch.Size())

    def expand(self, batch_shape, _instance=None):  # (a plate expands its site's fn)
        return type(self)(self.logw, self.locs, batch_shape[-1])

    def _leaf(self, value, override=None):
        like = dist.Normal(self.locs, 1.0).log_prob(value.unsqueeze(-1))
        return self.logw + (like if override is None else override)

    def log_prob(self, value):
        return self._leaf(value).logsumexp(-1)

    def implicit_potentials(self, value, override=None):
        return self._leaf(value, override), None

    def implicit_log_z(self, leaf, ctx):
        return leaf.logsumexp(-1)

    def implicit_marginals(self, weight, ctx):
        return weight

    def implicit_map(self, value):
        return self._leaf(value).argmax(-1)

    def implicit_sample(self, value, num_samples):
        return dist.Categorical(logits=self._leaf(value)).sample((num_samples,))


class _DeclaredMixture(_SummedMixture):
    """:class:`_SummedMixture` that declares the potentials it takes (for ``fit(init=...)``)."""

    def implicit_override_shape(self, value):
        return self.batch_shape + (2,), self.logw


def test_a_users_own_implicit_latent_distribution_is_summed_out_by_its_gradient():
    """The implicit-latent protocol PCFG and CTC share is open: a distribution written here (a
    mixture whose component is summed inside ``log_prob``) gets log p(x), its posterior (the
    gradient of log p in its leaf), map and exact draws, equal to the enumerated mixture's."""
    import pyro.distributions as dist

    x = torch.tensor([-2.0, -1.5, 0.3, 2.2, 2.5])
    logw = torch.tensor([0.3, 0.7]).log()
    locs = torch.tensor([-2.0, 2.0])

    def implicit(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", _SummedMixture(logw, locs, len(x)), obs=x)

    def enumerated(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logw.exp()), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    ours, ref = ExactEStep(implicit), ExactEStep(enumerated)
    assert float(ours.log_likelihood(x)) == pytest.approx(float(ref.log_likelihood(x)), rel=1e-12)
    assert torch.allclose(ours.marginals(x)["x"], ref.marginals(x)["z"], atol=1e-12)
    assert torch.equal(ours.map(x)["x"], ref.map(x)["z"])
    draws = ours.sample(x, num_samples=2000)["x"].double().mean(0)
    assert torch.allclose(draws, ref.marginals(x)["z"][:, 1], atol=0.05)


def test_init_draws_random_potentials_for_a_users_implicit_latent_that_declares_them():
    """fit(init=...)'s random potentials reach any implicit latent through the protocol's
    optional ``implicit_override_shape`` (not a PCFG-only branch): a mixture summed inside
    ``log_prob``, written here, gets uniform-log draws of the declared shape, and its first
    posterior is the one those potentials give; without the method it keeps its likelihood."""

    from pyro_emvae.init import init_potentials

    x = torch.tensor([-2.0, -1.5, 0.3, 2.2, 2.5])
    logw = torch.tensor([0.3, 0.7]).log()
    locs = torch.tensor([-2.0, 2.0])
    for cls, declared in ((_DeclaredMixture, True), (_SummedMixture, False)):

        def model(x, cls=cls):
            with pyro.plate("data", len(x)):
                pyro.sample("x", cls(logw, locs, len(x)), obs=x)

        seen = {}
        draw = init_potentials("random", 1, torch.Generator().manual_seed(0))

        def potentials(name, site, draw=draw, seen=seen):
            seen[name] = draw(name, site)
            return seen[name]

        post = ExactEStep(model).posterior(x, potentials=potentials)
        if not declared:
            assert seen["x"] is None
            continue
        assert seen["x"].shape == (5, 2) and bool((seen["x"] <= 0).all())
        want = (logw + seen["x"]).softmax(-1)
        assert torch.allclose(post.marginals["x"], want, atol=1e-12)
