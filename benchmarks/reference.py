r"""Hand-written pure-torch reference implementations (no Pyro) of the exact E-steps.

These are the baselines that ``pyro_emvae``'s generic E-step is tested and benchmarked
against:

* :func:`gmm_estep` -- Gaussian-mixture log-likelihood and responsibilities
  (``"diag"``, ``"spherical"``, ``"full"``, ``"tied"`` covariances, same parameterization and
  param names as :mod:`models.gmm`);
* :func:`gmm_em_iteration_fast` -- one whole EM iteration of a full-covariance mixture written
  for speed (GEMMs over row chunks): the hardware's limit the benchmarks compare against;
* :func:`hmm_forward_backward` -- the scaled (normalized, probability-space) forward-backward
  recursion, a plain Python loop over ``t`` with torch ops;
* :func:`hmm_viterbi` -- max-product (log space) Viterbi decoding;
* :func:`gaussian_log_emission` / :func:`categorical_log_emission` -- per-state emission
  log-densities in the ``(..., T, K)`` layout the HMM routines take.

HMM convention (hmmlearn): ``z_0 ~ start``, ``z_t ~ trans[z_{t-1}]``, ``x_t ~ p(x | z_t)``.

Example::

    import torch
    from benchmarks.reference import gaussian_log_emission, hmm_forward_backward
    from models.hmm import sample_gaussian_hmm

    data, p = sample_gaussian_hmm(N=1, T=1000, K=3, D=2, seed=0)
    log_e = gaussian_log_emission(data[0], p["locs"], p["scales"])        # (T, K)
    ll, gamma, xi = hmm_forward_backward(p["start"].log(), p["trans"].log(), log_e)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "categorical_log_emission",
    "gaussian_log_emission",
    "gmm_component_log_probs",
    "gmm_em_iteration_fast",
    "gmm_estep",
    "hmm_forward_backward",
    "hmm_viterbi",
]

_COVARIANCE_TYPES = ("diag", "full", "tied", "spherical")


def gmm_component_log_probs(
    x: Tensor, weights: Tensor, locs: Tensor, scales_or_scale_tril: Tensor, covariance_type: str
) -> Tensor:
    r"""Joint log-densities :math:`\log \pi_k + \log \mathcal{N}(x_n; \mu_k, \Sigma_k)`.

    Written out by hand (Mahalanobis distance via a triangular solve for full/tied):
    :math:`\log\mathcal N(x;\mu,LL^\top) = -\tfrac12\|L^{-1}(x-\mu)\|^2 - \sum_i\log L_{ii}
    - \tfrac D2\log 2\pi`.

    Args:
        x: data ``(N, D)``.
        weights: mixture weights ``(K,)`` (a probability vector).
        locs: component means ``(K, D)``.
        scales_or_scale_tril: ``(K, D)`` std devs for ``"diag"``; ``(K,)`` std devs for
            ``"spherical"``; ``(K, D, D)`` lower Cholesky factors for ``"full"``; one
            ``(D, D)`` lower Cholesky factor for ``"tied"``.
        covariance_type: ``"diag"``, ``"spherical"``, ``"full"`` or ``"tied"``.

    Returns:
        ``(N, K)`` tensor of joint log-densities ``log p(x_n, z_n = k)``.

    Example::

        >>> lp = gmm_component_log_probs(torch.zeros(5, 2), torch.ones(3) / 3,
        ...                              torch.zeros(3, 2), torch.ones(3, 2), "diag")
        >>> lp.shape
        torch.Size([5, 3])
    """
    if covariance_type not in _COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {_COVARIANCE_TYPES}")
    D = x.shape[-1]
    diff = x.unsqueeze(-2) - locs  # (N, K, D)
    s = scales_or_scale_tril
    if covariance_type == "diag":
        maha = ((diff / s) ** 2).sum(-1)
        half_logdet = s.log().sum(-1)
    elif covariance_type == "spherical":
        maha = (diff**2).sum(-1) / s**2
        half_logdet = D * s.log()
    else:
        L = s if covariance_type == "full" else s.expand(locs.shape[0], D, D)
        # solve L_k y = diff_k for every component: (K, D, N)
        y = torch.linalg.solve_triangular(L, diff.permute(1, 2, 0), upper=False)
        maha = (y**2).sum(-2).T  # (N, K)
        half_logdet = torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
    log_norm = -0.5 * maha - half_logdet - 0.5 * D * math.log(2 * math.pi)
    return weights.log() + log_norm


def gmm_estep(
    x: Tensor, weights: Tensor, locs: Tensor, scales_or_scale_tril: Tensor, covariance_type: str
) -> tuple[Tensor, Tensor]:
    r"""Exact E-step of a Gaussian mixture.

    .. math::

        \log p(x) = \sum_n \log \sum_k \pi_k \mathcal N(x_n;\mu_k,\Sigma_k), \qquad
        r_{nk} = p(z_n = k \mid x_n) = \frac{\pi_k \mathcal N(x_n;\mu_k,\Sigma_k)}
        {\sum_j \pi_j \mathcal N(x_n;\mu_j,\Sigma_j)}.

    Args: see :func:`gmm_component_log_probs` (``x`` is ``(N, D)``).

    Returns:
        ``(log_likelihood, responsibilities)``: a 0-dim tensor (total over the ``N`` points,
        nats) and an ``(N, K)`` tensor whose rows sum to one.

    Example::

        >>> from models.gmm import sample_gmm
        >>> x, p = sample_gmm(N=100, K=3, D=2, seed=0)
        >>> ll, r = gmm_estep(x, p["weights"], p["locs"], p["scales"], "diag")
        >>> r.shape
        torch.Size([100, 3])
    """
    lp = gmm_component_log_probs(x, weights, locs, scales_or_scale_tril, covariance_type)
    log_px = torch.logsumexp(lp, dim=-1)
    return log_px.sum(), (lp - log_px.unsqueeze(-1)).exp()


def gmm_em_iteration_fast(
    x: Tensor, weights: Tensor, locs: Tensor, scale_tril: Tensor, chunk: int = 2048
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    r"""One EM iteration of a full-covariance Gaussian mixture, written for speed: the E-step
    (``log p(x)`` at the given params) and the closed-form M-step (maximum likelihood, no
    regularization), fused in one pass over row chunks, all in GEMMs.

    E-step: with the precision Cholesky factors :math:`P_k = L_k^{-\top}` stacked side by side
    into :math:`P` ``(D, K D)``, :math:`Y = X P - [\mu_1^\top P_1, \dots, \mu_K^\top P_K]`
    (one GEMM, ``(n, K D)``) holds every :math:`(x_n - \mu_k)^\top L_k^{-\top}`; the squared
    norm of block :math:`k` of a row is the Mahalanobis distance, and

    .. math::

        \log p(x_n, z_n = k) = \log\pi_k - \textstyle\sum_i \log L_{k,ii}
        - \tfrac D2 \log 2\pi - \tfrac12 \lVert Y_{n,k}\rVert^2,\qquad
        r_{nk} = \exp(\log p(x_n, z_n = k) - \log p(x_n)).

    M-step from the uncentred statistics, accumulated by GEMMs chunk by chunk:
    :math:`N_k = \sum_n r_{nk}`, :math:`S^{(1)} = R^\top X` ``(K, D)`` and all K second
    moments at once, :math:`S^{(2)} = X^\top (R \otimes X)` ``(D, K D)`` with
    :math:`(R \otimes X)_{n, kD + e} = r_{nk} x_{ne}` (``addmm_`` into one buffer); then
    :math:`\pi_k = N_k / N`, :math:`\mu_k = S^{(1)}_k / N_k`,
    :math:`\Sigma_k = S^{(2)}_k / N_k - \mu_k \mu_k^\top = L_k L_k^\top`.

    Rows go in chunks of ``chunk`` so that the ``(chunk, K D)`` temporaries stay in cache;
    memory is the data plus a few chunk-sized buffers whatever ``N`` is. The uncentred second
    moment loses digits when the data sit far from the origin relative to their spread:
    shift the data once by their global mean before the first iteration (EM is
    translation-equivariant: shift the locs alike, and back at the end; ``log p(x)`` does
    not change), as :func:`benchmarks.gmm.run_torch_em_fast` does.

    Args:
        x: data ``(N, D)`` (ideally centred, see above). weights: ``(K,)``. locs: ``(K, D)``.
        scale_tril: ``(K, D, D)`` lower Cholesky factors of the covariances.
        chunk: rows per chunk.

    Returns:
        ``(log_likelihood, (weights, locs, scale_tril))``: ``log p(x)`` (0-dim, nats, at the
        params given) and the M-step's new params (same shapes as given).

    Example::

        >>> from models.gmm import init_params, sample_gmm
        >>> x, _ = sample_gmm(N=500, K=3, D=2, seed=0, covariance_type="full")
        >>> p = init_params(x, 3, "full", seed=1)
        >>> ll, (w, mu, L) = gmm_em_iteration_fast(x, p["weights"], p["locs"], p["scale_tril"])
        >>> bool(torch.isclose(ll, gmm_estep(x, p["weights"], p["locs"], p["scale_tril"],
        ...                                  "full")[0]))
        True
    """
    n, d = x.shape
    k = locs.shape[0]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    prec = torch.linalg.solve_triangular(scale_tril, eye.expand(k, d, d), upper=False).mT
    stacked = prec.permute(1, 0, 2).reshape(d, k * d)  # (D, K D): [P_1, ..., P_K]
    shift = torch.einsum("kd,kde->ke", locs, prec).reshape(k * d)  # mu_k^T P_k side by side
    const = (
        weights.log()
        - scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        - 0.5 * d * math.log(2 * math.pi)
    )
    nk = torch.zeros(k, dtype=x.dtype, device=x.device)
    s1 = torch.zeros(k, d, dtype=x.dtype, device=x.device)
    s2 = torch.zeros(d, k * d, dtype=x.dtype, device=x.device)
    ll = torch.zeros((), dtype=x.dtype, device=x.device)
    # block sums of the squares by a GEMM with a (K D, K) 0/1 matrix: faster than a reduction
    # over a last dim of size D
    blocks = torch.eye(k, dtype=x.dtype, device=x.device).repeat_interleave(d, 0)
    # the chunk-sized temporaries, allocated once
    ybuf = torch.empty(min(chunk, n), k * d, dtype=x.dtype, device=x.device)
    rxbuf = torch.empty(min(chunk, n), k, d, dtype=x.dtype, device=x.device)
    for a in range(0, n, chunk):
        xc = x[a : a + chunk]
        c = xc.shape[0]
        y = torch.mm(xc, stacked, out=ybuf[:c]).sub_(shift).square_()  # (c, K D)
        lp = torch.addmm(const, y, blocks, alpha=-0.5)  # (c, K): log p(x_n, z_n = k)
        top = lp.amax(1, keepdim=True)
        r = lp.sub_(top).exp_()  # unnormalized responsibilities, in place
        tot = r.sum(1, keepdim=True)
        ll += tot.log().add_(top).sum()
        r.div_(tot)
        nk += r.sum(0)
        s1.addmm_(r.T, xc)
        rx = torch.mul(r.unsqueeze(-1), xc.unsqueeze(1), out=rxbuf[:c])  # (c, K, D)
        s2.addmm_(xc.T, rx.view(c, k * d))
    new_locs = s1 / nk.unsqueeze(-1)
    cov = s2.view(d, k, d).transpose(0, 1) / nk.view(k, 1, 1)
    cov = cov - new_locs.unsqueeze(-1) * new_locs.unsqueeze(-2)
    return ll, (nk / n, new_locs, torch.linalg.cholesky(cov))


def gaussian_log_emission(x: Tensor, locs: Tensor, scales: Tensor) -> Tensor:
    r"""Diagonal-Gaussian emission log-densities
    :math:`\log \mathcal N(x_t; \mu_k, \mathrm{diag}(s_k^2))`.

    Args:
        x: observations ``(..., T, D)``. locs, scales: ``(K, D)``.

    Returns:
        ``(..., T, K)`` log-densities.

    Example::

        >>> gaussian_log_emission(torch.zeros(7, 2), torch.zeros(3, 2), torch.ones(3, 2)).shape
        torch.Size([7, 3])
    """
    z = (x.unsqueeze(-2) - locs) / scales  # (..., T, K, D)
    D = x.shape[-1]
    return -0.5 * (z**2).sum(-1) - scales.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)


def categorical_log_emission(x: Tensor, emission_probs: Tensor) -> Tensor:
    """Categorical emission log-probabilities ``log emission_probs[k, x_t]``.

    Args:
        x: integer symbols ``(..., T)``. emission_probs: ``(K, M)`` row-stochastic.

    Returns:
        ``(..., T, K)`` log-probabilities.

    Example::

        >>> categorical_log_emission(torch.tensor([0, 2, 1]), torch.ones(2, 3) / 3).shape
        torch.Size([3, 2])
    """
    return emission_probs.log().T[x.long()]


def hmm_forward_backward(
    log_start: Tensor, log_trans: Tensor, log_emission: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Scaled forward-backward for a discrete HMM (probability space, Python loop over ``t``).

    With :math:`e_t(k) = p(x_t \mid z_t = k)` (computed as ``exp(log_emission[t] - m_t)``
    with :math:`m_t = \max_k` ``log_emission[t, k]`` for stability) and
    :math:`A` = ``exp(log_trans)``:

    .. math::

        \tilde\alpha_0 = \pi \odot e_0,\quad
        \tilde\alpha_t = (\hat\alpha_{t-1} A) \odot e_t,\quad
        c_t = \textstyle\sum_k \tilde\alpha_t(k),\quad \hat\alpha_t = \tilde\alpha_t / c_t,

        \hat\beta_{T-1} = 1,\quad
        \hat\beta_t = A (e_{t+1} \odot \hat\beta_{t+1}) / c_{t+1},

        \log p(x) = \textstyle\sum_t (\log c_t + m_t),\quad
        \gamma_t = \hat\alpha_t \odot \hat\beta_t,\quad
        \xi_t(i, j) = \hat\alpha_t(i) A_{ij} e_{t+1}(j) \hat\beta_{t+1}(j) / c_{t+1}.

    Leading batch dimensions (e.g. ``N`` independent sequences) are supported and broadcast.
    A sequence of probability zero gives ``-inf``/NaN.

    Args:
        log_start: ``(K,)`` (or ``(..., K)``) log initial distribution.
        log_trans: ``(K, K)`` (or ``(..., K, K)``) log transition matrix, rows ``z_{t-1}``.
        log_emission: ``(T, K)`` (or ``(..., T, K)``) ``log p(x_t | z_t = k)``.

    Returns:
        ``(log_likelihood, gamma, xi)``: ``log p(x_{0:T-1})`` with shape ``(...)`` (0-dim for
        a single sequence), posterior marginals ``gamma`` ``(..., T, K)`` =
        ``p(z_t = k | x)``, and pairwise marginals ``xi`` ``(..., T-1, K, K)`` =
        ``p(z_t = i, z_{t+1} = j | x)``.

    Example::

        >>> K, T = 3, 10
        >>> ll, gamma, xi = hmm_forward_backward(
        ...     torch.full((K,), 1 / K).log(), torch.full((K, K), 1 / K).log(), torch.randn(T, K))
        >>> gamma.shape, xi.shape
        (torch.Size([10, 3]), torch.Size([9, 3, 3]))
    """
    T = log_emission.shape[-2]
    m = log_emission.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = (log_emission - m).exp()  # (..., T, K)
    start = log_start.exp()
    A = log_trans.exp()

    alphas: list[Tensor] = []
    cs: list[Tensor] = []
    a = start * e[..., 0, :]
    for t in range(T):
        if t > 0:
            a = (alphas[-1].unsqueeze(-2) @ A).squeeze(-2) * e[..., t, :]
        c = a.sum(-1, keepdim=True)
        cs.append(c)
        alphas.append(a / c)

    betas: list[Tensor] = [torch.ones_like(alphas[-1])]  # filled backwards: beta_{T-1}, ...
    for t in range(T - 2, -1, -1):
        b = e[..., t + 1, :] * betas[-1]
        betas.append((A @ b.unsqueeze(-1)).squeeze(-1) / cs[t + 1])
    betas.reverse()

    alpha = torch.stack(alphas, dim=-2)  # (..., T, K)
    beta = torch.stack(betas, dim=-2)
    c = torch.cat(cs, dim=-1)  # (..., T)
    log_likelihood = c.log().sum(-1) + m.squeeze(-1).sum(-1)
    gamma = alpha * beta
    eb = e[..., 1:, :] * beta[..., 1:, :] / c[..., 1:].unsqueeze(-1)  # (..., T-1, K)
    xi = alpha[..., :-1, :].unsqueeze(-1) * A.unsqueeze(-3) * eb.unsqueeze(-2)
    return log_likelihood, gamma, xi


def hmm_viterbi(log_start: Tensor, log_trans: Tensor, log_emission: Tensor) -> Tensor:
    r"""Most probable state path :math:`\arg\max_{z_{0:T-1}} p(z_{0:T-1} \mid x)` (Viterbi).

    Max-product in log space:
    :math:`\delta_0 = \log\pi + \log e_0`,
    :math:`\delta_t(j) = \max_i [\delta_{t-1}(i) + \log A_{ij}] + \log e_t(j)`, with
    back-pointers, then backtracking from :math:`\arg\max_k \delta_{T-1}(k)`.
    Ties are broken towards the lowest state index.

    Args: as :func:`hmm_forward_backward` (leading batch dims supported).

    Returns:
        ``(..., T)`` long tensor of states.

    Example::

        >>> path = hmm_viterbi(torch.zeros(2), torch.zeros(2, 2), torch.tensor([[0.0, -1.0]] * 4))
        >>> path.tolist()
        [0, 0, 0, 0]
    """
    T = log_emission.shape[-2]
    delta = log_start + log_emission[..., 0, :]
    pointers: list[Tensor] = []
    for t in range(1, T):
        scores = delta.unsqueeze(-1) + log_trans  # (..., K_prev, K_next)
        best, ptr = scores.max(dim=-2)
        pointers.append(ptr)
        delta = best + log_emission[..., t, :]
    state = delta.argmax(-1)
    path = [state]  # filled backwards: z_{T-1}, z_{T-2}, ...
    for ptr in reversed(pointers):
        state = ptr.gather(-1, state.unsqueeze(-1)).squeeze(-1)
        path.append(state)
    path.reverse()
    return torch.stack(path, dim=-1)
