r"""Exact forward-backward for a discrete Markov chain given as log-potentials.

A chain of ``T`` steps over ``K`` states is given by ``init (*batch, K)``, a log-potential on the
state :math:`z_{-1}`, and ``M (*batch, T, K, K)`` with ``M[..., t, i, j]`` the log-potential of
:math:`(z_{t-1}=i, z_t=j)` (for Pyro's ``DiscreteHMM``: log transition plus log emission). Its
log-partition function is

.. math::

    \log Z = \log \sum_{z_{-1}, \dots, z_{T-1}}
        \exp\Big(\text{init}(z_{-1}) + \sum_{t=0}^{T-1} M_t(z_{t-1}, z_t)\Big),

and its gradients are the posterior marginals :math:`\partial \log Z / \partial\,\text{init}(i)
= p(z_{-1}=i)` and :math:`\partial \log Z / \partial M_t(i, j) = \xi_t(i, j) = p(z_{t-1}=i,
z_t=j)`, the pairwise marginals Baum-Welch needs. :func:`hmm_log_z` returns :math:`\log Z`
as a differentiable tensor whose backward pass is one exact forward-backward: autograd through
it (the E-step's posterior, EG's parameter gradients) works as through any torch op.

The algorithm (work :math:`O(T K^3)` in batched matmuls, :math:`O(\log T)` Python steps).
With :math:`c_t = \max_{ij} M_t(i, j)` and :math:`W_t = \exp(M_t - c_t)` (entries in [0, 1]):

* **up-sweep**: a binary tree over time whose nodes are the products
  :math:`W_a W_{a+1} \cdots W_b` of their spans, each rescaled to max entry 1 with its log
  scale carried (one ``matmul`` of all nodes of a level at once); the root gives
  :math:`\log Z = \log(\pi^\top P_{\text{root}} \mathbf 1) + \sum` scales;
* **down-sweeps**: the forward message entering each node
  (:math:`\alpha \propto \pi^\top W_0 \cdots W_{a-1}`, a left child inherits its parent's, a
  right child's is its parent's times its left sibling's product) and the backward message
  leaving each node (mirrored), level by level, each rescaled to max 1;
* at the leaves :math:`\xi_t \propto \alpha_{t-1} \mathbf 1^\top \odot W_t \odot
  \mathbf 1 \beta_t^\top`, normalized per step (so no scale needs to be tracked for it).

The arithmetic runs in float64 whatever the input's dtype (a float32 chain of any length keeps
float64's range), in the probability domain like hmmlearn's ``implementation="scaling"``:
exact up to rounding unless a partial path falls below ~1e-300 of the best one and later
carries the sum. A chain where a rescaling factor falls below ``1e-250`` or is not finite (a
chain of probability zero, supports that only meet through such tiny paths, ``inf``/``nan``
inputs) falls back to the log-space scan :func:`log_space_log_z` for its value and gradients
(the other chains of the batch keep the fast path).

A chain whose transition is the same at every step after the first (Baum–Welch's usual HMM:
:class:`HomogeneousHMM`, ``z_0 ~ start`` then one ``(K, K)`` matrix) has a cheaper exact kernel,
:func:`chain_log_z`: :math:`O(T K^2)` memory, time cut into blocks of ~:math:`\sqrt{T/4}` steps
run side by side in the probability domain (batched GEMMs over all blocks per step, a tree over
the blocks), and a posterior (:class:`ChainPosterior`) that is what the M-step reads:
:math:`\gamma_t`, :math:`\xi_0` and :math:`\sum_{t \ge 1} \xi_t`, never a ``(T, K, K)``
tensor. :func:`hmm_log_z` of its dense ``M`` stays the reference and the fallback.

Example::

    >>> init = torch.randn(3)                       # (K,)
    >>> m = torch.randn(2, 100, 3, 3, requires_grad=True)  # (batch, T, K, K)
    >>> log_z = hmm_log_z(init, m)                  # (2,)
    >>> (xi,) = torch.autograd.grad(log_z.sum(), [m])  # pairwise marginals, each step sums to 1
    >>> torch.allclose(xi.sum((-1, -2)), torch.ones(2, 100, dtype=xi.dtype))
    True
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import ClassVar, NamedTuple

import pyro.distributions as dist
import torch
from torch.autograd.function import once_differentiable
from torch.distributions import constraints

__all__ = [
    "ChainParts",
    "ChainPosterior",
    "HomogeneousHMM",
    "chain_log_z",
    "chain_posterior",
    "hmm_log_z",
    "hmm_pairwise",
    "log_space_log_z",
]

# a rescaling factor below this (or 0, inf, nan) sends the call to the log-space scan: float64's
# smallest normal is 2.2e-308, so every factor above it leaves > 50 orders of headroom
_TINY = 1e-250


def log_space_log_z(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r""":math:`\log Z` ``(*batch)`` of ``init (*batch, K)``, ``M (*batch, T, K, K)`` by a log-space
    parallel scan (pairwise ``logsumexp`` products of neighbouring steps, :math:`O(\log T)`
    levels of :math:`O(T K^3)` broadcasts): slower than :func:`hmm_log_z`, exact in any case
    that has a finite answer. Differentiable by plain autograd.

    Example::

        >>> log_space_log_z(torch.zeros(2), torch.zeros(5, 2, 2))  # 2 ** 6 paths
        tensor(4.1589)
    """
    while m.size(-3) > 1:
        time = m.size(-3)
        even = time // 2 * 2
        x, y = m[..., 0:even:2, :, :], m[..., 1:even:2, :, :]
        xy = (x.unsqueeze(-1) + y.unsqueeze(-3)).logsumexp(-2)
        m = torch.cat((xy, m[..., even:, :, :]), dim=-3) if time > even else xy
    return (init.unsqueeze(-1) + m.squeeze(-3)).logsumexp(-1).logsumexp(-1)


def _safe(s: torch.Tensor) -> torch.Tensor:
    """``s`` with zeros replaced by ones (a zero product stays zero; the chain is flagged)."""
    return torch.where(s > 0, s, torch.ones((), dtype=s.dtype, device=s.device))


def _rescale(x: torch.Tensor, dims, mins: list):
    """``(x / s, s)`` with ``s`` the max of ``x`` over ``dims`` (kept); each chain's smallest
    ``s`` goes to ``mins`` (dim 1 of ``x`` is the chain)."""
    s = x.amax(dims, keepdim=True)
    if x.size(0):
        mins.append(s.amin(0).reshape(s.size(1), -1).amin(-1))
    return x / _safe(s), s


def _weights(m: torch.Tensor):
    """``W_t = exp(M_t - c_t)`` in float64, time-major, split by the parity of ``t`` (so that
    the bottom level of the tree multiplies contiguous operands): ``(even (ceil(T/2), B, K, K),
    odd (floor(T/2), B, K, K), c (T, B))``."""
    x = m.detach().transpose(0, 1)  # (T, B, K, K): a view
    c = x.amax((-1, -2))
    c = torch.where(torch.isfinite(c), c, torch.zeros((), dtype=c.dtype, device=c.device))
    out = []
    for p in (0, 1):
        xp = x[p::2]
        w = torch.empty(xp.shape, dtype=torch.float64, device=m.device)
        torch.sub(xp, c[p::2, :, None, None], out=w)  # (the subtraction, the cast, the copy)
        out.append(w.exp_())
    return out[0], out[1], c.to(torch.float64)


def _up(even: torch.Tensor, odd: torch.Tensor, c: torch.Tensor):
    """The up-sweep: level 1 of the tree is ``W_{2i} W_{2i+1}`` (and a last even step carried
    up), each level above multiplies neighbouring nodes, every node rescaled to max entry 1 with
    its log scale carried. Returns the levels from 1 up (interleaved, time-major), the root's log
    scale ``(B,)`` and each chain's smallest rescaling factor ``(B,)``."""
    mins = [torch.ones_like(c[0])]
    h = odd.size(0)
    prod, s = _rescale(torch.matmul(even[:h], odd), (-1, -2), mins)
    ls = c[0 : 2 * h : 2] + c[1::2] + s.log()[..., 0, 0]
    if even.size(0) > h:  # an odd T: the last step is carried up unchanged
        prod, ls = torch.cat((prod, even[h:])), torch.cat((ls, c[2 * h :]))
    levels, ls = _tree(prod, ls, mins)
    return levels, ls[0], torch.stack(mins).amin(0)


def _tree(prod: torch.Tensor, ls: torch.Tensor, mins: list) -> tuple[list, torch.Tensor]:
    """The levels of the product tree over the time-major nodes ``prod`` (with log scales
    ``ls``), from ``prod`` up to the root: each level multiplies neighbouring nodes (an odd
    last node is carried up unchanged), every product rescaled to max entry 1 with its log
    scale carried (the smallest factors appended to ``mins``). Returns the levels and the
    last level's log scales."""
    levels = [prod]
    while prod.size(0) > 1:
        n, h = prod.size(0), prod.size(0) // 2
        nxt, s = _rescale(torch.matmul(prod[0 : 2 * h : 2], prod[1 : 2 * h : 2]), (-1, -2), mins)
        lsn = ls[0 : 2 * h : 2] + ls[1 : 2 * h : 2] + s.log()[..., 0, 0]
        if n > 2 * h:
            nxt, lsn = torch.cat((nxt, prod[2 * h :])), torch.cat((lsn, ls[2 * h :]))
        prod, ls = nxt, lsn
        levels.append(prod)
    return levels, ls


def _down(levels: list, start: torch.Tensor, end: torch.Tensor, mins: list):
    """Forward messages entering and backward messages leaving every node of level 1, each
    rescaled to max 1, from the root's ``start`` and ``end`` ``(1, B, K)``."""
    fwd, bwd = start, end
    for level in reversed(levels[:-1]):
        n, h = level.size(0), level.size(0) // 2
        # forward: a left child (even) enters with its parent's message; a right child (odd)
        # with its parent's message times its left sibling's product
        f = fwd.new_empty((n,) + fwd.shape[1:])
        f[0::2] = fwd
        f[1::2] = _rescale((fwd[:h].unsqueeze(-2) @ level[0 : 2 * h : 2]).squeeze(-2), -1, mins)[0]
        # backward: a right child (and a carried last one) leaves with its parent's message; a
        # left child with its right sibling's product times its parent's message
        b = bwd.new_empty((n,) + bwd.shape[1:])
        b[1::2] = bwd[:h]
        if n > 2 * h:
            b[2 * h] = bwd[h]
        b[0 : 2 * h : 2] = _rescale(
            (level[1 : 2 * h : 2] @ bwd[:h].unsqueeze(-1)).squeeze(-1), -1, mins
        )[0]
        fwd, bwd = f, b
    return fwd, bwd


def _pairwise(up, g: torch.Tensor, dtype: torch.dtype):
    """The backward pass of the fast path: ``g * p(z_-1)`` ``(B, K)``, ``g * xi``
    ``(B, T, K, K)`` and each chain's ``ok`` ``(B,)``. The weights are spent (xi is written in
    their place)."""
    levels, even, odd, pi, v, z, _, ok = up
    mins: list = [torch.ones_like(z)]
    fwd, bwd = _down(levels, pi.unsqueeze(0), torch.ones_like(v).unsqueeze(0), mins)
    # the bottom level, by parity: alpha entering each step, beta leaving it, and the per-step
    # normalizer sum_ij alpha_i W_ij beta_j from the same products (no extra pass over W)
    h = odd.size(0)
    f_odd, sf = _rescale((fwd[:h].unsqueeze(-2) @ even[:h]).squeeze(-2), -1, mins)
    b_even = bwd.clone()
    b_even[:h], sb = _rescale((odd @ bwd[:h].unsqueeze(-1)).squeeze(-1), -1, mins)
    both = (f_odd * b_even[:h]).sum(-1)  # alpha W_{2i} | W_{2i+1} beta, rescaled: (h, B)
    norm_odd, norm_even = both * sb[..., 0], both * sf[..., 0]
    if even.size(0) > h:  # the last step, an even one: alpha_{T-2} W_{T-1} beta_{T-1}
        last = ((fwd[h:].unsqueeze(-2) @ even[h:]).squeeze(-2) * b_even[h:]).sum(-1)
        norm_even = torch.cat((norm_even, last))
    ok = ok & torch.stack(mins).amin(0).gt(_TINY)
    ok = ok & norm_even.amin(0).gt(_TINY) & (norm_odd.amin(0).gt(_TINY) if h else True)
    gg = g.detach().to(torch.float64)
    t_len, b, k = even.size(0) + h, even.size(1), even.size(-1)
    xi = torch.empty((t_len, b, k, k), dtype=dtype, device=even.device)
    for w, a, beta, norm, p in (
        (even, fwd, b_even, norm_even, 0),
        (odd, f_odd, bwd[:h], norm_odd, 1),
    ):
        a = a * (gg / _safe(norm)).unsqueeze(-1)
        w.mul_(a.unsqueeze(-1))
        if dtype == torch.float64:
            torch.mul(w, beta.unsqueeze(-2), out=xi[p::2])
        else:
            xi[p::2] = w.mul_(beta.unsqueeze(-2))
    g_init = pi * v * (gg / _safe(z)).unsqueeze(-1)
    return g_init, xi.transpose(0, 1), ok


def _sweep_up(init: torch.Tensor, m: torch.Tensor):
    """The up-sweep of ``init (B, K)``, ``M (B, T, K, K)``: ``(levels, even, odd, pi, v, z,
    log Z, ok)`` with ``pi`` the rescaled ``exp(init)``, ``v`` the root's product times ones,
    ``z = pi . v`` (``(B, K)``, ``(B, K)``, ``(B,)``) and ``ok (B,)`` False for the chains that
    must fall back (``x > tiny`` is also False for nan)."""
    even, odd, c = _weights(m)
    levels, root_ls, low = _up(even, odd, c)
    i0 = init.detach().to(torch.float64)
    imax = i0.amax(-1, keepdim=True)
    imax = torch.where(torch.isfinite(imax), imax, torch.zeros_like(imax))
    pi = (i0 - imax).exp()  # (B, K)
    v = levels[-1][0].sum(-1)  # (B, K)
    z = (pi * v).sum(-1)
    ok = (low > _TINY) & (z > _TINY)
    return levels, even, odd, pi, v, z, z.log() + imax.squeeze(-1) + root_ls, ok


def _log_space_grads(init: torch.Tensor, m: torch.Tensor, g: torch.Tensor):
    """``g * p(z_-1)`` and ``g * xi`` of ``init (B, K)``, ``M (B, T, K, K)`` by the same tree in
    log space (logsumexp products: no rescaling, so no range limit; a forbidden entry gets an
    exact 0, where autograd through ``logsumexp`` of all ``-inf`` would give nan)."""
    lm = m.detach().transpose(0, 1)  # (T, B, K, K)
    levels = [lm]
    while lm.size(0) > 1:
        n, h = lm.size(0), lm.size(0) // 2
        prod = (lm[0 : 2 * h : 2].unsqueeze(-1) + lm[1 : 2 * h : 2].unsqueeze(-3)).logsumexp(-2)
        lm = torch.cat((prod, lm[2 * h :])) if n > 2 * h else prod
        levels.append(lm)
    root = lm[0].logsumexp(-1)  # (B, K)
    init = init.detach()
    log_z = (init + root).logsumexp(-1)  # (B,)
    fwd, bwd = init.unsqueeze(0), torch.zeros_like(init).unsqueeze(0)
    for level in reversed(levels[:-1]):
        n, h = level.size(0), level.size(0) // 2
        f = fwd.new_empty((n,) + fwd.shape[1:])
        f[0::2] = fwd
        f[1::2] = (fwd[:h].unsqueeze(-1) + level[0 : 2 * h : 2]).logsumexp(-2)
        b = bwd.new_empty((n,) + bwd.shape[1:])
        b[1::2] = bwd[:h]
        if n > 2 * h:
            b[2 * h] = bwd[h]
        b[0 : 2 * h : 2] = (level[1 : 2 * h : 2] + bwd[:h].unsqueeze(-2)).logsumexp(-1)
        fwd, bwd = f, b
    xi = (fwd.unsqueeze(-1) + levels[0] + bwd.unsqueeze(-2) - log_z[:, None, None]).exp()
    g_init = (init + root - log_z.unsqueeze(-1)).exp()
    return g_init * g.unsqueeze(-1), xi.transpose(0, 1) * g[:, None, None, None]


class _ForwardBackward(torch.autograd.Function):
    """``log Z (B,)`` of ``init (B, K)``, ``M (B, T, K, K)``; backward: the marginals. Chains the
    probability domain cannot hold (see ``_TINY``) go to the log-space scan, one by one."""

    @staticmethod
    def forward(ctx, init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(init, m)
        ctx.up, ctx.spent = _sweep_up(init, m), False
        log_z, ok = ctx.up[-2].to(m.dtype), ctx.up[-1]
        if not bool(ok.all()):  # (one sync)
            bad = (~ok).nonzero().squeeze(-1)
            log_z[bad] = log_space_log_z(init[bad], m[bad])
        return log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        init, m = ctx.saved_tensors
        # the backward pass spends the forward's buffers (W becomes xi in place); a second
        # backward (retain_graph=True) runs the up-sweep again
        up = _sweep_up(init, m) if ctx.spent else ctx.up
        ctx.spent, ctx.up = True, None
        g_init, xi, ok = _pairwise(up, g, m.dtype)
        g_init = g_init.to(init.dtype)
        if not bool(ok.all()):
            bad = (~ok).nonzero().squeeze(-1)
            g_init[bad], xi[bad] = _log_space_grads(init[bad], m[bad], g[bad])
        return g_init, xi


def hmm_log_z(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r""":math:`\log Z` ``(*batch)`` of a chain with log-potentials ``init (*batch, K)`` over
    :math:`z_{-1}` and ``M (*batch, T, K, K)`` over :math:`(z_{t-1}, z_t)` (batch dims broadcast),
    differentiable: the gradient is ``p(z_{-1})`` for ``init`` and the pairwise marginals
    :math:`\xi_t(i, j)` for ``M`` (see the module's docstring). Any float dtype and device;
    ``-inf`` entries (forbidden transitions) are fine. Not twice differentiable.

    Example::

        >>> hmm_log_z(torch.zeros(2), torch.zeros(5, 2, 2))  # log(2 ** 6)
        tensor(4.1589)
    """
    k, t = m.shape[-1], m.shape[-3]
    batch = torch.broadcast_shapes(init.shape[:-1], m.shape[:-3])
    init_b = init.expand(batch + (k,)).reshape((-1, k))
    m_b = m.expand(batch + m.shape[-3:]).reshape((-1, t, k, k))
    return _ForwardBackward.apply(init_b, m_b).reshape(batch)


def hmm_pairwise(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r"""The pairwise posterior marginals :math:`\xi_t(i, j) = p(z_{t-1}=i, z_t=j)`
    ``(*batch, T, K, K)`` of a chain (see :func:`hmm_log_z`), without tracking gradients.

    Example::

        >>> hmm_pairwise(torch.zeros(2), torch.zeros(3, 2, 2))[0]  # uniform
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    m = m.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(hmm_log_z(init.detach(), m).sum(), [m])
    return g


# --------------------------------------------------------------------------------------------
# time-homogeneous chains: blocks of time in the probability domain, O(T K^2) per pass
# --------------------------------------------------------------------------------------------
class ChainParts(NamedTuple):
    r"""The log-potentials of a chain whose transition is the same at every step after the
    first: ``init (B, K)`` over :math:`z_{-1}`, ``first (B, K, K)`` over :math:`(z_{-1}, z_0)`,
    ``trans (B, K, K)`` over :math:`(z_{t-1}, z_t)` for every :math:`t \ge 1` and ``emit
    (B, T, K)`` over :math:`z_t`, so that the chain's ``M`` of :func:`hmm_log_z` is
    ``M_0 = first + emit_0``, ``M_t = trans + emit_t``."""

    init: torch.Tensor
    first: torch.Tensor
    trans: torch.Tensor
    emit: torch.Tensor

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(init (B, K), M (B, T, K, K))`` of the same chain (for :func:`hmm_log_z`)."""
        b, t_len, k = self.emit.shape
        steps = torch.cat(
            (self.first.unsqueeze(-3), self.trans.unsqueeze(-3).expand(b, t_len - 1, k, k)), -3
        )
        return self.init, steps + self.emit.unsqueeze(-2)


class ChainPosterior(NamedTuple):
    r"""What Baum–Welch needs of a time-homogeneous chain's posterior, without its
    ``(B, T, K, K)`` pairwise marginals: ``init (B, K)`` :math:`p(z_{-1})`, ``first (B, K, K)``
    :math:`\xi_0`, ``trans (B, K, K)`` :math:`\sum_{t \ge 1} \xi_t` and ``gamma (B, T, K)``
    :math:`p(z_t)` (the gradients of :func:`chain_log_z` in its four inputs)."""

    init: torch.Tensor
    first: torch.Tensor
    trans: torch.Tensor
    gamma: torch.Tensor

    def scaled(self, c) -> ChainPosterior:
        """Every field times ``c``: a number, or a tensor broadcastable to the batch shape (a
        site's ``poutine.scale``)."""
        if torch.is_tensor(c) and c.dim():
            extra = (1, 2, 2, 2)  # the fields' dims after the batch's
            return ChainPosterior(*(t * c.reshape(c.shape + (1,) * e) for t, e in zip(self, extra)))
        return ChainPosterior(*(t * c for t in self))

    def __mul__(self, c) -> ChainPosterior:  # (not a tuple's repetition: a weight's scaling)
        return self.scaled(c)

    __rmul__ = __mul__


def _block_len(n: int) -> int:
    """Steps per block: ~sqrt(n / 4) (158 at n = 1e5, measured best of 64..600 there) balances
    the Python steps of the loops inside the blocks (``~6 L`` small ops) against the memory
    the blocks' products stream through (``n / L`` blocks, joined by a tree of
    ``log2(n / L)`` levels)."""
    return max(1, min(n, round(math.sqrt(n / 4))))


@contextmanager
def one_thread():
    """Run torch on one thread inside: the chain's loops run ops of a few thousand elements
    each, far too small to share out (torch's grain size does not cover BLAS's small GEMMs),
    and its passes over ``(T, K)`` gain little from a second thread; on a busy machine a
    thread pool's waits cost 5-10x (measured, two threads on two shared cores)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_EVERY = 8  # rescale the running products every this many steps (and check them)


def _chain_up(init, first, trans, emit, block: int | None = None):
    """The forward pass of :func:`chain_log_z`: ``(log Z (B,), state, ok (B,))``.

    The transition rows are normalized (``A = exp(trans - r)``, ``r`` the rows' logsumexp, the
    ``r`` of a step's source state added to that step's emission), so that the steps padding
    the last block (emission 1, transition ``A``) leave the sum unchanged; emissions are
    rescaled per step to max 1 (``E_t``). Time ``1..T-1`` is cut into ``nb`` blocks of ``L``
    steps; a block's product ``P_b = prod A diag(E_t)`` is built by ``L`` batched GEMMs over
    all blocks at once, and the blocks are joined by a tree (as in :func:`hmm_log_z`)."""
    f64 = torch.float64
    b, t_len, k = emit.shape
    init, first, trans = (x.detach().to(f64) for x in (init, first, trans))
    r = trans.logsumexp(-1)  # (B, K)
    fin = torch.isfinite(r)
    zero = torch.zeros((), dtype=f64, device=emit.device)
    a = (trans - torch.where(fin, r, zero).unsqueeze(-1)).exp()
    a = torch.where(fin.unsqueeze(-1), a, torch.full((), 1.0 / k, dtype=f64, device=a.device))
    n = t_len - 1
    length = block or _block_len(n) if n else 1
    nb = -(-n // length) if n else 0
    # emissions in time order, padded to 1 + nb * L steps (log 0: E = 1)
    lg = torch.zeros((b, 1 + nb * length, k), dtype=f64, device=emit.device)
    lg[:, :t_len] = emit.detach()
    if n:
        lg[:, :n] += r.unsqueeze(1)
    lg0 = lg[:, 0].clone()  # step 0's emission term (with r), for xi_0
    lg[:, 0] += (init.unsqueeze(-1) + first).logsumexp(-2)
    m = lg.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, zero)
    e = lg.sub_(m).exp_()  # (B, 1 + nb L, K), entries in [0, 1]
    log_z = m[:, :t_len, 0].sum(-1)
    st = {"a": a, "e": e, "lg0": lg0, "n": n, "L": length, "nb": nb, "levels": None}
    if not n:
        z = e[:, 0].sum(-1)
        return log_z + z.log(), st, z > _TINY
    # steps 1.. by block, step-major: blocks[s] (B, nb, K) is step s of every block
    blocks = e[:, 1:].view(b, nb, length, k).permute(2, 0, 1, 3).contiguous()
    st["blocks"] = blocks
    p = a.unsqueeze(1) * blocks[0].unsqueeze(-2)  # (B, nb, K, K)
    q = torch.empty_like(p)
    scales = torch.empty((length // _EVERY + 1, b, nb, 1, 1), dtype=f64, device=p.device)
    j = 0
    for s in range(1, length):
        torch.bmm(p.view(b, nb * k, k), a, out=q.view(b, nb * k, k))
        q.mul_(blocks[s].unsqueeze(-2))
        p, q = q, p
        if s % _EVERY == 0 or s == length - 1:
            torch.amax(p, (-1, -2), keepdim=True, out=scales[j])
            p.div_(scales[j])
            j += 1
    if j == 0:  # (one step per block)
        torch.amax(p, (-1, -2), keepdim=True, out=scales[0])
        p.div_(_safe(scales[0]))
        j = 1
    ok = scales[:j].amin((0, 2, 3, 4)) > _TINY
    ls = scales[:j].log().sum(0)[..., 0, 0].T  # (nb, B)
    prod = p.transpose(0, 1).contiguous()  # (nb, B, K, K): time-major for the tree
    mins = [torch.ones_like(log_z)]
    levels, ls = _tree(prod, ls, mins)
    z = (e[:, 0] * levels[-1][0].sum(-1)).sum(-1)
    ok = ok & torch.stack(mins).amin(0).gt(_TINY) & z.gt(_TINY)
    st["levels"] = levels
    return log_z + ls[0] + z.log(), st, ok


def _chain_down(init, first, st) -> tuple[ChainPosterior, torch.Tensor]:
    """The backward pass of :func:`chain_log_z`: the posterior and each chain's ``ok``.

    From the messages entering and leaving every block (the tree's down-sweep), the forward
    messages :math:`\\alpha_t` and backward messages :math:`\\beta_t` inside all blocks at once
    (``L`` steps, each at its own scale), then from them, in time order, with
    :math:`u_t = \\alpha_{t-1} A` and :math:`w_t = E_t \\beta_t / n_t`,
    :math:`n_t = u_t \\cdot E_t \\beta_t` (so each step's scale cancels):
    :math:`\\gamma_t = u_t w_t` and :math:`\\sum_t \\xi_t = A \\odot \\sum_t \\alpha_{t-1}^\\top
    w_t` (one GEMM over time)."""
    a, e, n, length, nb = st["a"], st["e"], st["n"], st["L"], st["nb"]
    b, k, f64 = a.size(0), a.size(-1), torch.float64
    t_len = n + 1
    gamma = torch.empty((b, t_len, k), dtype=f64, device=a.device)
    if n:
        mins = [torch.ones(b, dtype=f64, device=a.device)]
        ones = torch.ones_like(e[:, 0]).unsqueeze(0)
        fwd, bwd = _down(st["levels"], e[:, 0].unsqueeze(0), ones, mins)  # (nb, B, K) each
        # step-major by block (the layout of ``blocks``): alpha[s + 1] is step s of every
        # block and alpha[0] the message entering it; beta[s] the backward message at step s
        blocks, at = st["blocks"], a.transpose(-1, -2)
        alpha = torch.empty((length + 1, b, nb, k), dtype=f64, device=a.device)
        beta = torch.empty((length, b, nb, k), dtype=f64, device=a.device)
        alpha[0] = fwd.transpose(0, 1)
        beta[length - 1] = bwd.transpose(0, 1)
        tmp = torch.empty((b, nb, k), dtype=f64, device=a.device)
        scales = torch.empty((2 * (length // _EVERY) + 2, b, nb, 1), dtype=f64, device=a.device)
        j = 0
        for s in range(length):
            nxt = alpha[s + 1]
            torch.bmm(alpha[s], a, out=nxt)
            nxt.mul_(blocks[s])
            sb = length - 1 - s
            rescale = s % _EVERY == _EVERY - 1
            if sb:
                torch.mul(blocks[sb], beta[sb], out=tmp)
                torch.bmm(tmp, at, out=beta[sb - 1])
                if rescale:
                    torch.amax(beta[sb - 1], -1, keepdim=True, out=scales[j])
                    beta[sb - 1].div_(scales[j])
                    j += 1
            if rescale:
                torch.amax(nxt, -1, keepdim=True, out=scales[j])
                nxt.div_(scales[j])
                j += 1
        ok = torch.stack(mins).amin(0).gt(_TINY)
        if j:
            ok = ok & scales[:j].amin((0, 2, 3)).gt(_TINY)
        beta0 = ((blocks[0, :, 0] * beta[0, :, 0]).unsqueeze(-2) @ at).squeeze(-2)  # (B, K)
        # u_t = alpha_{t-1} A and w_t = E_t beta_t / n_t, n_t = u_t . E_t beta_t
        prev = alpha[:length]
        if b == 1:  # (one GEMM, (L nb, K) x (K, K))
            u = torch.mm(prev.reshape(-1, k), a[0]).view(prev.shape)
        else:
            u = torch.matmul(prev, a.unsqueeze(0))  # (L, B, nb, K)
        w = beta.mul_(blocks)
        pad = nb * length - n
        if pad:  # the steps padding the last block count for nothing
            w[length - pad :, :, nb - 1] = 0.0
        u.mul_(w)
        norm = u.sum(-1, keepdim=True)
        if pad:
            norm[length - pad :, :, nb - 1] = 1.0
        ok = ok & norm.amin((0, 2, 3)).gt(_TINY)
        norm = _safe(norm)
        u.div_(norm)
        w.div_(norm)
        if b == 1:
            trans = a * (prev.reshape(-1, k).T @ w.reshape(-1, k)).unsqueeze(0)
        else:
            trans = a * torch.einsum("sbni,sbnj->bij", prev, w)
        gamma[:, 1:] = u.permute(1, 2, 0, 3).reshape(b, nb * length, k)[:, :n]
    else:
        ok = torch.ones(b, dtype=torch.bool, device=a.device)
        trans = torch.zeros((b, k, k), dtype=f64, device=a.device)
        beta0 = torch.ones((b, k), dtype=f64, device=a.device)
    lx = init.detach().to(f64).unsqueeze(-1) + first.detach().to(f64)
    lx = lx + (st["lg0"] + beta0.log()).unsqueeze(-2)
    xi0 = torch.softmax(lx.reshape(b, k * k), -1).reshape(b, k, k)
    gamma[:, 0] = xi0.sum(-2)
    return ChainPosterior(xi0.sum(-1), xi0, trans, gamma), ok


class _Chain(torch.autograd.Function):
    """``log Z (B,)`` of :class:`ChainParts` ``(B, ...)``; backward: :class:`ChainPosterior`
    times the incoming gradient. A chain the probability domain cannot hold falls back to
    :func:`hmm_log_z` on its dense ``M`` (the whole call, for its value and gradients)."""

    @staticmethod
    def forward(ctx, init, first, trans, emit):
        ctx.save_for_backward(init, first, trans, emit)
        with one_thread():
            log_z, ctx.st, ok = _chain_up(init, first, trans, emit)
        ctx.dense = not bool(ok.all())
        if ctx.dense:
            log_z = log_space_log_z(*ChainParts(init, first, trans, emit).dense())
        return log_z.to(emit.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        init, first, trans, emit = ctx.saved_tensors
        gg = g.detach().to(torch.float64)
        post = None
        if not ctx.dense:
            with one_thread():
                st = ctx.st if ctx.st is not None else _chain_up(init, first, trans, emit)[1]
                post, ok = _chain_down(init, first, st)
            ctx.dense = not bool(ok.all())
        ctx.st = None
        if ctx.dense:
            post = _dense_posterior(ChainParts(init, first, trans, emit))
        return tuple(
            (p * gg.reshape((-1,) + (1,) * (p.dim() - 1))).to(x.dtype)
            for p, x in zip(post, (init, first, trans, emit))
        )


def _dense_posterior(parts: ChainParts) -> ChainPosterior:
    """:class:`ChainPosterior` by :func:`hmm_log_z` on the dense ``M`` (the fallback, and the
    reference the tests hold the fast path to)."""
    init, m = parts.dense()
    init = init.detach().requires_grad_()
    m = m.detach().requires_grad_()
    with torch.enable_grad():
        g_init, xi = torch.autograd.grad(hmm_log_z(init, m).sum(), [init, m])
    return ChainPosterior(g_init, xi[:, 0], xi[:, 1:].sum(1), xi.sum(-2))


def chain_log_z(init, first, trans, emit) -> torch.Tensor:
    r""":math:`\log Z` ``(*batch)`` of a chain with one transition for all steps after the
    first (see :class:`ChainParts`: ``init (*batch, K)``, ``first (*batch, K, K)``, ``trans
    (*batch, K, K)``, ``emit (*batch, T, K)``, batch dims broadcast), differentiable: the
    gradients are :class:`ChainPosterior`'s fields, :math:`p(z_{-1})`, :math:`\xi_0`,
    :math:`\sum_{t\ge1}\xi_t` and :math:`\gamma_t`. Equal to :func:`hmm_log_z` of
    :meth:`ChainParts.dense` (up to rounding), in :math:`O(T K^2)` memory and
    :math:`O(T K^3 + T K^2)` work, never a ``(T, K, K)`` tensor: time is cut into blocks of
    ~:math:`\sqrt{T / 4}` steps run side by side in the probability domain (batched GEMMs),
    joined by a tree over the blocks. The same range limits and fallback as :func:`hmm_log_z`.

    Example::

        >>> init, first, trans = torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2)
        >>> chain_log_z(init, first, trans, torch.zeros(5, 2))  # log(2 ** 6)
        tensor(4.1589)
    """
    k, t_len = emit.shape[-1], emit.shape[-2]
    batch = torch.broadcast_shapes(
        init.shape[:-1], first.shape[:-2], trans.shape[:-2], emit.shape[:-2]
    )
    flat = (
        init.expand(batch + (k,)).reshape(-1, k),
        first.expand(batch + (k, k)).reshape(-1, k, k),
        trans.expand(batch + (k, k)).reshape(-1, k, k),
        emit.expand(batch + (t_len, k)).reshape(-1, t_len, k),
    )
    return _Chain.apply(*flat).reshape(batch)


def chain_posterior(parts: ChainParts) -> ChainPosterior:
    """:class:`ChainPosterior` of ``parts`` ``(B, ...)`` (no graph kept)."""
    leaves = [t.detach().requires_grad_() for t in parts]
    with torch.enable_grad():
        grads = torch.autograd.grad(chain_log_z(*leaves).sum(), leaves)
    return ChainPosterior(*grads)


class HomogeneousHMM(dist.DiscreteHMM):
    r"""A :class:`~pyro.distributions.DiscreteHMM` whose chain starts at ``z_0 ~ start`` and then
    moves by one transition matrix: :math:`z_0 \sim \text{softmax}(\text{start\_logits})`,
    :math:`z_t \mid z_{t-1} \sim \text{softmax}(\text{transition\_logits}[z_{t-1}])`,
    :math:`x_t \mid z_t \sim` ``observation_dist[z_t]``, for ``t = 0..duration-1`` (hmmlearn's
    convention). The same law as ``DiscreteHMM(zeros(K), cat([start rows, trans, ...]),
    observation_dist)`` (``initial_logits`` and ``transition_logits`` read as those, built on
    demand), without its ``(T, K, K)`` transition tensor: :meth:`log_prob` runs
    :func:`chain_log_z`, and :class:`~pyro_emvae.ExactEStep` its posterior (Baum–Welch's sums).

    Args:
        start_logits: ``(*batch, K)``. transition_logits: ``(*batch, K, K)``, the same at every
            step. observation_dist: batch shape ``(*batch, K)`` or ``(*batch, T, K)``.
        duration: ``T``, the time axis ``event_shape[0]``.

    Example::

        >>> import pyro.distributions as dist
        >>> hmm = HomogeneousHMM(torch.zeros(2), torch.zeros(2, 2), dist.Normal(torch.zeros(2), 1.0), 5)
        >>> hmm.event_shape, hmm.transition_logits.shape
        (torch.Size([5]), torch.Size([5, 2, 2]))
    """

    arg_constraints: ClassVar[dict] = {
        "start_logits": constraints.real,
        "trans_logits": constraints.real,
    }

    def __init__(
        self,
        start_logits: torch.Tensor,
        transition_logits: torch.Tensor,
        observation_dist,
        duration: int,
        validate_args=None,
    ):
        if start_logits.dim() < 1 or transition_logits.dim() < 2:
            raise ValueError(
                "expected start_logits (*batch, K) and transition_logits (*batch, K, K), got "
                f"{tuple(start_logits.shape)} and {tuple(transition_logits.shape)}"
            )
        if len(observation_dist.batch_shape) < 1:
            raise ValueError("expected observation_dist to have at least one batch dim (K)")
        obs_batch = observation_dist.batch_shape[:-1]
        if len(obs_batch) and obs_batch[-1] == duration:  # (*batch, T, K): time is not batch
            obs_batch = obs_batch[:-1]
        batch_shape = torch.broadcast_shapes(
            start_logits.shape[:-1], transition_logits.shape[:-2], obs_batch
        )
        self.start_logits = start_logits - start_logits.logsumexp(-1, True)
        self.trans_logits = transition_logits - transition_logits.logsumexp(-1, True)
        self.observation_dist = observation_dist
        event_shape = torch.Size((duration,)) + observation_dist.event_shape
        super(dist.DiscreteHMM, self).__init__(
            duration, batch_shape, event_shape, validate_args=validate_args
        )

    @property
    def initial_logits(self) -> torch.Tensor:
        """``DiscreteHMM``'s: a uniform :math:`z_{-1}` (``start`` is reached from any)."""
        k = self.start_logits.size(-1)
        out = self.start_logits.new_full((k,), -math.log(k))
        return out.expand(self.batch_shape + (k,))

    @property
    def transition_logits(self) -> torch.Tensor:
        """``DiscreteHMM``'s ``(*batch, T, K, K)``: step 0's rows are ``start``, the rest
        ``trans`` (materialized: the generic path's, for Viterbi and sampling)."""
        k, t_len = self.start_logits.size(-1), self.duration
        start = self.start_logits.unsqueeze(-2).unsqueeze(-3)
        start = start.expand(self.start_logits.shape[:-1] + (1, k, k))
        trans = self.trans_logits.unsqueeze(-3)
        trans = trans.expand(self.trans_logits.shape[:-2] + (t_len - 1, k, k))
        shape = torch.broadcast_shapes(start.shape[:-3], trans.shape[:-3])
        return torch.cat(
            (start.expand(shape + start.shape[-3:]), trans.expand(shape + trans.shape[-3:])), -3
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HomogeneousHMM, _instance)
        batch_shape = torch.Size(torch.broadcast_shapes(self.batch_shape, batch_shape))
        new.start_logits = self.start_logits.expand(batch_shape + self.start_logits.shape[-1:])
        new.trans_logits = self.trans_logits
        new.observation_dist = self.observation_dist
        super(dist.DiscreteHMM, new).__init__(
            self.duration, batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self.__dict__.get("_validate_args")
        return new

    def parts(self, value: torch.Tensor, emit: torch.Tensor | None = None) -> ChainParts:
        """The chain's :class:`ChainParts` at ``value``, shaped ``batch_shape`` (not
        flattened); ``emit`` ``(*batch, T, K)`` replaces the emission log-likelihoods."""
        if emit is None:
            obs = self.observation_dist
            emit = obs.log_prob(value.unsqueeze(-1 - obs.event_dim))
        k = self.start_logits.size(-1)
        first = self.start_logits.unsqueeze(-2).expand(self.start_logits.shape[:-1] + (k, k))
        return ChainParts(self.initial_logits, first, self.trans_logits, emit)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        init, first, trans, emit = self.parts(value)
        return chain_log_z(init, first, trans, emit)
