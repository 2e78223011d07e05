"""The chain kernel :mod:`pyro_emvae.distributions.hmm` against exact references: a sum over
every path (short chains), Pyro's ``DiscreteHMM.log_prob`` and autograd through Pyro's log-space
parallel scan (long chains), and autograd of Pyro's ``log_prob`` for parameter gradients."""

from __future__ import annotations

import itertools

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.hmm import _sequential_logmatmulexp

from pyro_emvae.distributions.hmm import _sweep_up, hmm_log_z, hmm_pairwise, log_space_log_z
from pyro_emvae.estep import _hmm_parts
from pyro_emvae.rules import Stats, _pool_time

NEG_INF = float("-inf")


def brute(init: torch.Tensor, m: torch.Tensor):
    """``(log Z, p(z_-1), xi)`` of one chain by listing all ``K ** (T + 1)`` paths."""
    t_len, k = m.shape[0], m.shape[-1]
    paths = torch.tensor(list(itertools.product(range(k), repeat=t_len + 1)))  # (P, T+1)
    steps = torch.arange(t_len)
    w = init[paths[:, 0]] + m[steps, paths[:, :-1], paths[:, 1:]].sum(-1)  # (P,)
    log_z = w.logsumexp(0)
    p = (w - log_z).exp()
    p_init = torch.zeros(k, dtype=m.dtype).index_add_(0, paths[:, 0], p)
    xi = torch.zeros(t_len, k, k, dtype=m.dtype)
    for t in range(t_len):
        xi[t].index_put_((paths[:, t], paths[:, t + 1]), p, accumulate=True)
    return log_z, p_init, xi


def pyro_scan_log_z(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The E-step's earlier path: Pyro's log-space parallel scan, differentiable by autograd."""
    return (init.unsqueeze(-1) + _sequential_logmatmulexp(m)).logsumexp(-1).logsumexp(-1)


def grads(fn, init, m):
    init = init.detach().requires_grad_()
    m = m.detach().requires_grad_()
    log_z = fn(init, m)
    g_init, g_m = torch.autograd.grad(log_z.sum(), [init, m])
    return log_z.detach(), g_init, g_m


def random_chain(batch, t_len, k, forbid=0.25, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(batch + (k,), generator=g, dtype=dtype)
    m = 2 * torch.randn(batch + (t_len, k, k), generator=g, dtype=dtype)
    m = m.masked_fill(torch.rand(m.shape, generator=g) < forbid, NEG_INF)
    init = init.masked_fill(torch.rand(init.shape, generator=g) < forbid, NEG_INF)
    return init, m


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
@pytest.mark.parametrize("t_len", [1, 2, 3, 4, 5, 6])
def test_log_z_and_marginals_equal_the_sum_over_all_paths(batch, t_len):
    init, m = random_chain(batch, t_len, 3, seed=t_len)
    log_z, g_init, xi = grads(hmm_log_z, init, m)
    assert log_z.shape == batch and xi.shape == m.shape and g_init.shape == init.shape
    for idx in itertools.product(*(range(n) for n in batch)):
        ref_z, ref_init, ref_xi = brute(init[idx], m[idx])
        torch.testing.assert_close(log_z[idx], ref_z, rtol=1e-12, atol=1e-12)
        if ref_z == NEG_INF:  # (a chain of probability zero has no posterior)
            continue
        torch.testing.assert_close(g_init[idx], ref_init, rtol=0, atol=1e-12)
        torch.testing.assert_close(xi[idx], ref_xi, rtol=0, atol=1e-12)
    finite = torch.isfinite(log_z)[..., None, None, None].expand(m.shape)
    assert not (xi[(m == NEG_INF) & finite] != 0).any()  # a forbidden transition: posterior 0


def test_one_state_and_one_step():
    init, m = (
        torch.tensor([0.3], dtype=torch.float64),
        torch.full((4, 1, 1), -0.5, dtype=torch.float64),
    )
    log_z, g_init, xi = grads(hmm_log_z, init, m)
    torch.testing.assert_close(log_z, torch.tensor(0.3 - 2.0, dtype=torch.float64))
    assert (xi == 1).all() and (g_init == 1).all()
    init, m = random_chain((3,), 1, 4, seed=1)
    ref = grads(pyro_scan_log_z, init, m)
    for a, b in zip(grads(hmm_log_z, init, m), ref):
        torch.testing.assert_close(a, b.nan_to_num(0.0), rtol=1e-12, atol=1e-12)


def test_init_broadcasts_against_a_batch_of_chains():
    init, m = random_chain((), 7, 3, forbid=0, seed=2)
    mb = torch.stack([m, m.flip(0)])  # (2, T, K, K)
    _, g_init, xi = grads(hmm_log_z, init, mb)
    assert g_init.shape == init.shape
    sep = [grads(hmm_log_z, init, mb[i]) for i in range(2)]
    torch.testing.assert_close(g_init, sep[0][1] + sep[1][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xi, torch.stack([s[2] for s in sep]), rtol=1e-12, atol=1e-12)


def test_a_chain_of_probability_zero_and_a_path_below_float64_range():
    # every path meets a forbidden transition: log Z = -inf (the log-space fallback)
    init = torch.zeros(2, dtype=torch.float64)
    m = torch.zeros(3, 2, 2, dtype=torch.float64)
    m[1] = NEG_INF
    assert hmm_log_z(init, m) == NEG_INF
    # state 1 is out of reach until step 2 and M_2's only reachable entries are 1000 nats below
    # its largest: exp(M - max) underflows to zero there, the answer is finite all the same
    m = torch.zeros(4, 2, 2, dtype=torch.float64)
    m[:2, :, 1] = NEG_INF
    m[2, 0, :] = -1000.0
    m[2, 1, 1] = 0.0
    init = torch.tensor([0.0, NEG_INF], dtype=torch.float64)
    log_z, g_init, xi = grads(hmm_log_z, init, m)
    ref_z, ref_init, ref_xi = brute(init, m)
    assert torch.isfinite(log_z)
    torch.testing.assert_close(log_z, ref_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xi, ref_xi, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_init, ref_init, rtol=0, atol=1e-12)
    # in a batch with an ordinary chain, only this one leaves the probability domain
    other_init, other_m = random_chain((), 4, 2, forbid=0, seed=9)
    inits, ms = torch.stack([init, other_init]), torch.stack([m, other_m])
    assert _sweep_up(inits, ms)[-1].tolist() == [False, True]
    log_z, g_init, xi = grads(hmm_log_z, inits, ms)
    for i in range(2):
        ref_z, ref_init, ref_xi = brute(inits[i], ms[i])
        torch.testing.assert_close(log_z[i], ref_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xi[i], ref_xi, rtol=0, atol=1e-12)
        torch.testing.assert_close(g_init[i], ref_init, rtol=0, atol=1e-12)


def test_a_second_backward_pass_gives_the_same_marginals():
    init, m = random_chain((2,), 50, 4, forbid=0.1, seed=3)
    m.requires_grad_()
    log_z = hmm_log_z(init, m).sum()
    (a,) = torch.autograd.grad(log_z, [m], retain_graph=True)
    (b,) = torch.autograd.grad(log_z, [m])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_marginals_without_gradients_and_under_no_grad():
    init, m = random_chain((2,), 6, 3, forbid=0.1, seed=4)
    with torch.no_grad():
        xi = hmm_pairwise(init, m)
        log_z = hmm_log_z(init, m)
    for i in range(2):
        ref_z, _, ref_xi = brute(init[i], m[i])
        torch.testing.assert_close(log_z[i], ref_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xi[i], ref_xi, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_space_log_z(init, m), log_z, rtol=1e-12, atol=1e-12)


def _gaussian_hmm(batch, t_len, k, seed, dtype=torch.float64, homogeneous=False):
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(k, generator=g, dtype=dtype)
    trans = torch.randn((k, k) if homogeneous else batch + (t_len, k, k), generator=g, dtype=dtype)
    trans = trans.masked_fill(torch.eye(k, dtype=torch.bool).roll(1, -1), NEG_INF)
    loc = 3 * torch.randn(k, generator=g, dtype=dtype)
    scale = 0.5 + torch.rand(k, generator=g, dtype=dtype)
    x = 3 * torch.randn(batch + (t_len,), generator=g, dtype=dtype)
    return init, trans, loc, scale, x


@pytest.mark.parametrize("homogeneous", [False, True])
def test_long_chains_equal_pyro_in_float64(homogeneous):
    init, trans, loc, scale, x = _gaussian_hmm((2,), 10_000, 4, 5, homogeneous=homogeneous)
    fn = dist.DiscreteHMM(init, trans, dist.Normal(loc, scale))
    i0, m = _hmm_parts(fn, x)
    ours = grads(hmm_log_z, i0, m)
    torch.testing.assert_close(ours[0], fn.log_prob(x), rtol=1e-10, atol=0)
    ref = grads(pyro_scan_log_z, i0, m)  # the E-step's earlier path
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours[2], ref[2].nan_to_num(0.0), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours[2].sum((-1, -2)), torch.ones(2, 10_000, dtype=torch.float64))


def test_long_chains_in_float32_are_float32_accurate():
    init, trans, loc, scale, x = _gaussian_hmm((2,), 10_000, 4, 6)
    args = [init, trans, loc, scale, x]
    fn64 = dist.DiscreteHMM(init, trans, dist.Normal(loc, scale))
    ref = grads(hmm_log_z, *_hmm_parts(fn64, x))
    f32 = [a.float() for a in args]
    fn32 = dist.DiscreteHMM(f32[0], f32[1], dist.Normal(f32[2], f32[3]))
    ours = grads(hmm_log_z, *_hmm_parts(fn32, f32[4]))
    assert ours[0].dtype == ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[2].double(), ref[2], rtol=0, atol=1e-4)
    torch.testing.assert_close(
        ours[2].sum((-1, -2)), torch.ones(2, 10_000, dtype=torch.float32), rtol=0, atol=1e-5
    )


def test_parameter_gradients_equal_autograd_through_pyro():
    """EG's gradients: autograd through the kernel's backward to every upstream parameter."""
    init, trans, loc, scale, x = _gaussian_hmm((3,), 300, 3, 7)
    params = [p.requires_grad_() for p in (init, trans, loc, scale)]

    def dist_():
        return dist.DiscreteHMM(params[0], params[1], dist.Normal(params[2], params[3]))

    ours = torch.autograd.grad(hmm_log_z(*_hmm_parts(dist_(), x)).sum(), params)
    ref = torch.autograd.grad(dist_().log_prob(x).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.nan_to_num(0.0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("head", [0, 1, 3])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_transition_counts_pooled_over_a_homogeneous_tail_equal_the_full_scatter(head, batch):
    """``_discrete_hmm``'s transition counts: the pooled pieces add what the (T, K, K) scatter
    adds, ids that differ only at the first steps (start rows, then trans) or not at all."""
    k, t_len = 3, 80
    trans_ids = torch.arange(k * k).reshape(k, k) + 100
    first = torch.arange(head * k * k).reshape(head, k, k)
    ids = torch.cat([first, trans_ids.expand(t_len - head, k, k)])
    pair = torch.rand(batch + (t_len, k, k), dtype=torch.float64)
    full, pooled = Stats(size=200), Stats(size=200)
    full.add("count", ids.expand(pair.shape), pair)
    pieces = _pool_time(ids, pair)
    assert len(pieces) == 1 + (head > 0)
    for i, w in pieces:
        pooled.add("count", i, w)
    torch.testing.assert_close(pooled.sums["count"], full.sums["count"], rtol=1e-12, atol=0)
    assert torch.equal(pooled.touched["count"], full.touched["count"])
    # ids that vary at the last step too: nothing is pooled, the sums are the same
    ids[-1] = ids[-1] + 50
    full, pooled = Stats(size=200), Stats(size=200)
    full.add("count", ids.expand(pair.shape), pair)
    pieces = _pool_time(ids, pair)
    assert len(pieces) == 2
    for i, w in pieces:
        pooled.add("count", i, w)
    torch.testing.assert_close(pooled.sums["count"], full.sums["count"], rtol=1e-12, atol=0)
