"""Tests of the pure-torch reference implementations in ``benchmarks/reference.py``
against brute force (``itertools.product`` over all state paths / explicit loops)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference import (
    categorical_log_emission,
    gaussian_log_emission,
    gmm_component_log_probs,
    gmm_em_iteration_fast,
    gmm_estep,
    hmm_forward_backward,
    hmm_viterbi,
)


def _random_hmm(K: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = torch.softmax(torch.randn(K, generator=g), -1)
    trans = torch.softmax(torch.randn(K, K, generator=g), -1)
    log_e = 3.0 * torch.randn(T, K, generator=g)
    return start.log(), trans.log(), log_e


def _brute_force(
    log_start: torch.Tensor, log_trans: torch.Tensor, log_e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    T, K = log_e.shape
    paths = list(itertools.product(range(K), repeat=T))
    joint = torch.stack(
        [
            log_start[p[0]]
            + sum(log_trans[p[t - 1], p[t]] for t in range(1, T))
            + sum(log_e[t, p[t]] for t in range(T))
            for p in paths
        ]
    )
    ll = torch.logsumexp(joint, 0)
    w = (joint - ll).exp()
    gamma = torch.zeros(T, K)
    xi = torch.zeros(T - 1, K, K)
    for wp, p in zip(w, paths, strict=True):
        for t in range(T):
            gamma[t, p[t]] += wp
        for t in range(T - 1):
            xi[t, p[t], p[t + 1]] += wp
    best = paths[int(joint.argmax())]
    return ll, gamma, xi, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_backward_matches_brute_force(seed: int) -> None:
    log_start, log_trans, log_e = _random_hmm(K=3, T=4, seed=seed)
    ll, gamma, xi = hmm_forward_backward(log_start, log_trans, log_e)
    ll_bf, gamma_bf, xi_bf, _ = _brute_force(log_start, log_trans, log_e)
    assert ll.shape == ()
    assert gamma.shape == (4, 3) and xi.shape == (3, 3, 3)
    torch.testing.assert_close(ll, ll_bf)
    torch.testing.assert_close(gamma, gamma_bf)
    torch.testing.assert_close(xi, xi_bf)
    # consistency: xi sums to gamma
    torch.testing.assert_close(xi.sum(-1), gamma[:-1])
    torch.testing.assert_close(xi.sum(-2), gamma[1:])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_viterbi_matches_brute_force(seed: int) -> None:
    log_start, log_trans, log_e = _random_hmm(K=3, T=4, seed=seed)
    path = hmm_viterbi(log_start, log_trans, log_e)
    *_, best = _brute_force(log_start, log_trans, log_e)
    assert path.dtype == torch.long and path.shape == (4,)
    assert tuple(path.tolist()) == best


def test_forward_backward_single_step() -> None:
    log_start, log_trans, log_e = _random_hmm(K=3, T=1, seed=0)
    ll, gamma, xi = hmm_forward_backward(log_start, log_trans, log_e)
    torch.testing.assert_close(ll, torch.logsumexp(log_start + log_e[0], 0))
    torch.testing.assert_close(gamma[0], torch.softmax(log_start + log_e[0], 0))
    assert xi.shape == (0, 3, 3)
    assert hmm_viterbi(log_start, log_trans, log_e).tolist() == [
        int((log_start + log_e[0]).argmax())
    ]


def test_forward_backward_long_chain_is_stable() -> None:
    """Scaling keeps a long chain with very small emission densities finite."""
    log_start, log_trans, _ = _random_hmm(K=4, T=1, seed=0)
    g = torch.Generator().manual_seed(5)
    log_e = -500.0 + 5 * torch.randn(5000, 4, generator=g)
    ll, gamma, xi = hmm_forward_backward(log_start, log_trans, log_e)
    assert torch.isfinite(ll) and torch.isfinite(gamma).all() and torch.isfinite(xi).all()
    torch.testing.assert_close(gamma.sum(-1), torch.ones(5000))
    # compare with a log-space forward recursion
    la = log_start + log_e[0]
    for t in range(1, 5000):
        la = torch.logsumexp(la.unsqueeze(-1) + log_trans, dim=-2) + log_e[t]
    torch.testing.assert_close(ll, torch.logsumexp(la, 0))


def test_batched_matches_unbatched() -> None:
    log_start, log_trans, _ = _random_hmm(K=3, T=1, seed=0)
    g = torch.Generator().manual_seed(1)
    log_e = torch.randn(5, 7, 3, generator=g)
    ll, gamma, xi = hmm_forward_backward(log_start, log_trans, log_e)
    path = hmm_viterbi(log_start, log_trans, log_e)
    assert ll.shape == (5,) and gamma.shape == (5, 7, 3) and xi.shape == (5, 6, 3, 3)
    assert path.shape == (5, 7)
    for n in range(5):
        ll_n, gamma_n, xi_n = hmm_forward_backward(log_start, log_trans, log_e[n])
        torch.testing.assert_close(ll[n], ll_n)
        torch.testing.assert_close(gamma[n], gamma_n)
        torch.testing.assert_close(xi[n], xi_n)
        assert path[n].tolist() == hmm_viterbi(log_start, log_trans, log_e[n]).tolist()


def test_emission_helpers() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g)
    locs = torch.randn(3, 2, generator=g)
    scales = 0.5 + torch.rand(3, 2, generator=g)
    le = gaussian_log_emission(x, locs, scales)
    expected = torch.distributions.Normal(locs, scales).log_prob(x.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(le, expected)
    probs = torch.softmax(torch.randn(3, 4, generator=g), -1)
    sym = torch.tensor([0, 3, 2, 1, 1])
    lc = categorical_log_emission(sym, probs)
    assert lc.shape == (5, 3)
    torch.testing.assert_close(lc, probs.log()[:, sym].T)


def _gmm_params(
    covariance_type: str, K: int, D: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(K, generator=g), -1)
    locs = torch.randn(K, D, generator=g)
    if covariance_type == "diag":
        scale = 0.5 + torch.rand(K, D, generator=g)
    elif covariance_type == "spherical":
        scale = 0.5 + torch.rand(K, generator=g)
    else:
        shape = (K, D, D) if covariance_type == "full" else (D, D)
        scale = torch.tril(0.3 * torch.randn(*shape, generator=g), -1) + torch.diag_embed(
            0.5 + torch.rand(*shape[:-1], generator=g)
        )
    return weights, locs, scale


def _component_dist(
    covariance_type: str, locs: torch.Tensor, scale: torch.Tensor, k: int
) -> torch.distributions.Distribution:
    D = locs.shape[-1]
    if covariance_type == "diag":
        cov = torch.diag(scale[k] ** 2)
    elif covariance_type == "spherical":
        cov = scale[k] ** 2 * torch.eye(D)
    elif covariance_type == "full":
        cov = scale[k] @ scale[k].T
    else:
        cov = scale @ scale.T
    return torch.distributions.MultivariateNormal(locs[k], covariance_matrix=cov)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "full", "tied"])
def test_gmm_estep_matches_explicit_sum(covariance_type: str) -> None:
    K, D, N = 3, 2, 7
    weights, locs, scale = _gmm_params(covariance_type, K, D, seed=0)
    x = 2.0 * torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    ll, resp = gmm_estep(x, weights, locs, scale, covariance_type)
    lp = gmm_component_log_probs(x, weights, locs, scale, covariance_type)
    assert ll.shape == () and resp.shape == (N, K) and lp.shape == (N, K)
    ll_bf = 0.0
    for n in range(N):
        p = [
            weights[k] * _component_dist(covariance_type, locs, scale, k).log_prob(x[n]).exp()
            for k in range(K)
        ]
        total = sum(p)
        ll_bf += math.log(total)
        for k in range(K):
            torch.testing.assert_close(resp[n, k], p[k] / total)
    torch.testing.assert_close(ll, torch.tensor(ll_bf))
    torch.testing.assert_close(resp.sum(-1), torch.ones(N))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("n", "chunk"), [(1000, 2048), (1000, 128), (1001, 250)])
def test_gmm_em_iteration_fast_matches_plain_em(n: int, chunk: int) -> None:
    """The GEMM form (one chunk, several, a remainder) gives the plain E-step's log p(x) and the
    centred M-step's params (sklearn's formulas, a loop over k) to 1e-10 relative, over three
    iterations from data far from the origin (shifted once by their mean, as documented)."""
    K, D = 4, 3
    weights, locs, tril = _gmm_params("full", K, D, seed=2)
    g = torch.Generator().manual_seed(3)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    x = 50.0 + locs[z] + (tril[z] @ torch.randn(n, D, 1, generator=g)).squeeze(-1)
    centre = x.mean(0)
    w1, mu1, l1 = weights, locs + 50.0, tril  # plain EM on x
    w2, mu2, l2 = weights, locs + 50.0 - centre, tril  # GEMM form on x - centre
    for _ in range(3):
        ll1, resp = gmm_estep(x, w1, mu1, l1, "full")
        nk = resp.sum(0)
        w1, mu1 = nk / n, (resp.T @ x) / nk.unsqueeze(-1)
        covs = []
        for k in range(K):
            diff = x - mu1[k]
            covs.append((resp[:, k, None] * diff).T @ diff / nk[k])
        l1 = torch.linalg.cholesky(torch.stack(covs))
        ll2, (w2, mu2, l2) = gmm_em_iteration_fast(x - centre, w2, mu2, l2, chunk=chunk)
        assert ll2.shape == () and w2.shape == (K,) and mu2.shape == (K, D)
        assert l2.shape == (K, D, D)
        assert abs(float(ll2 - ll1)) / abs(float(ll1)) < 1e-10
        assert _rel(w2, w1) < 1e-10
        assert _rel(mu2 + centre, mu1) < 1e-10
        assert _rel(l2, l1) < 1e-10


def test_gmm_estep_rejects_unknown_covariance_type() -> None:
    with pytest.raises(ValueError):
        gmm_estep(torch.zeros(2, 2), torch.ones(1), torch.zeros(1, 2), torch.ones(1, 2), "bad")


def test_forward_backward_matches_hmmlearn() -> None:
    hmm = pytest.importorskip("hmmlearn.hmm")
    import numpy as np

    K, D, T = 3, 2, 300
    g = torch.Generator().manual_seed(0)
    start = torch.softmax(torch.randn(K, generator=g), -1)
    trans = torch.softmax(torch.randn(K, K, generator=g), -1)
    locs = 2 * torch.randn(K, D, generator=g)
    scales = 0.5 + torch.rand(K, D, generator=g)
    x = torch.randn(T, D, generator=g) * 2
    model = hmm.GaussianHMM(n_components=K, covariance_type="diag", init_params="", params="")
    model.startprob_ = start.numpy()
    model.transmat_ = trans.numpy()
    model.means_ = locs.numpy()
    model.covars_ = (scales**2).numpy()
    ll_ref, post_ref = model.score_samples(x.numpy())
    ll, gamma, _ = hmm_forward_backward(
        start.log(), trans.log(), gaussian_log_emission(x, locs, scales)
    )
    assert np.isclose(float(ll), ll_ref, rtol=1e-9)
    np.testing.assert_allclose(gamma.numpy(), post_ref, atol=1e-8)
    assert (
        hmm_viterbi(start.log(), trans.log(), gaussian_log_emission(x, locs, scales)).tolist()
        == model.predict(x.numpy()).tolist()
    )
