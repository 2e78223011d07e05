"""Probabilistic PCA: the linear-Gaussian decoder, whose maximum likelihood is known in closed
form (Tipping & Bishop, 1999), so a linear VAE can be checked against it.

.. math:: z_i \\sim \\mathcal N(0, I_q), \\qquad
          x_i \\mid z_i \\sim \\mathcal N(W z_i + \\mu, \\sigma^2 I_d), \\qquad
          x_i \\sim \\mathcal N(\\mu, W W^\\top + \\sigma^2 I_d).

At the maximum, :math:`\\mu` is the sample mean, :math:`\\sigma^2` the mean of the
:math:`d - q` smallest eigenvalues of the sample covariance :math:`S` (divisor N), and
:math:`W = U_q (\\Lambda_q - \\sigma^2 I)^{1/2} R` for the top-q eigenpairs and any rotation R.
The exact posterior is :math:`z_i \\mid x_i \\sim \\mathcal N(M^{-1} W^\\top (x_i - \\mu),
\\sigma^2 M^{-1})` with :math:`M = W^\\top W + \\sigma^2 I`; at the maximum with R = I it has a
diagonal covariance, so a VAE with a diagonal Gaussian encoder can reach the maximum (Lucas et
al., 2019).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = [
    "init_params",
    "ppca_exact_posterior",
    "ppca_log_likelihood",
    "ppca_mle",
    "ppca_model",
    "principal_angles",
    "sample_ppca",
]


def ppca_model(x: torch.Tensor, latent_dim: int, batch_size: int | None = None) -> None:
    """The PPCA model with params ``W`` (d, q), ``mu`` (d,) and ``sigma`` (> 0).

    ``batch_size`` subsamples the data plate (minibatch SVI).

    :math:`z_i \\sim \\mathcal N(0, I_q)`, :math:`x_i \\mid z_i \\sim \\mathcal N(W z_i + \\mu,
    \\sigma^2 I_d)`.

    Example::

        >>> import pyro
        >>> from pyro_emvae import ExactEStep
        >>> from models.ppca import init_params, ppca_model, sample_ppca
        >>> x, truth = sample_ppca(100, d=5, q=2)
        >>> init_params(x, 2)
        >>> trace = pyro.poutine.trace(ppca_model).get_trace(x, 2)
        >>> trace.nodes["z"]["value"].shape, trace.nodes["x"]["value"].shape  # (N, q), (N, d)
        (torch.Size([100, 2]), torch.Size([100, 5]))
    """
    n, d = x.shape
    W = pyro.param("W", lambda: 0.1 * torch.randn(d, latent_dim, dtype=x.dtype))
    mu = pyro.param("mu", lambda: torch.zeros(d, dtype=x.dtype))
    sigma = pyro.param(
        "sigma", lambda: torch.ones((), dtype=x.dtype), constraint=constraints.positive
    )
    with pyro.plate("data", n, subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([latent_dim]).to_event(1))
        loc = z @ W.T + mu
        pyro.sample("x", dist.Normal(loc, sigma).to_event(1), obs=x[idx])


def init_params(x: torch.Tensor, latent_dim: int, seed: int = 0) -> None:
    """Set the params to a random start (W small, mu the data mean, sigma 1).

    Example::

        >>> import pyro, torch
        >>> from models.ppca import init_params
        >>> init_params(torch.randn(50, 4), 2)
        >>> pyro.param("W").shape, pyro.param("mu").shape, pyro.param("sigma").item()
        (torch.Size([4, 2]), torch.Size([4]), 1.0)
    """
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    store = pyro.get_param_store()
    for name in ("W", "mu", "sigma"):
        if name in store:
            del store[name]
    pyro.param("W", 0.1 * torch.randn(d, latent_dim, generator=g, dtype=x.dtype))
    pyro.param("mu", x.mean(0).clone())
    pyro.param("sigma", torch.ones((), dtype=x.dtype), constraint=constraints.positive)


def ppca_mle(x: torch.Tensor, latent_dim: int) -> dict[str, torch.Tensor]:
    """Tipping & Bishop's closed-form maximum likelihood: ``{"W", "mu", "sigma"}`` (W with
    orthogonal columns, largest first).

    :math:`\\mu = \\bar x`, :math:`\\sigma^2 = \\frac{1}{d - q}\\sum_{j > q} \\lambda_j`, :math:`W =
    U_q (\\Lambda_q - \\sigma^2 I)^{1/2}` from the eigenpairs of the sample covariance.

    Example::

        >>> from models.ppca import ppca_mle, principal_angles, sample_ppca
        >>> x, truth = sample_ppca(5000, d=5, q=2, sigma=0.5)
        >>> mle = ppca_mle(x, 2)
        >>> mle["W"].shape, round(float(mle["sigma"]), 1)  # (d, q); sigma near the truth
        (torch.Size([5, 2]), 0.5)
        >>> bool(principal_angles(mle["W"], truth["W"]).max() < 0.1)  # the same subspace
        True
    """
    n, d = x.shape
    if not 0 < latent_dim < d:
        raise ValueError(f"latent_dim must be in [1, {d - 1}] for data of dimension {d}")
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / n
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[latent_dim:].mean()
    W = evecs[:, :latent_dim] * (evals[:latent_dim] - sigma2).clamp_min(0).sqrt()
    return {"W": W, "mu": mu, "sigma": sigma2.sqrt()}


def ppca_log_likelihood(x: torch.Tensor, W, mu, sigma) -> torch.Tensor:
    """Exact :math:`\\log p(x_i)` per datum under :math:`\\mathcal N(\\mu, WW^\\top+\\sigma^2 I)`.

    Example::

        >>> import torch
        >>> from models.ppca import ppca_log_likelihood
        >>> W, mu, sigma = torch.zeros(3, 1), torch.zeros(3), torch.tensor(1.0)
        >>> ll = ppca_log_likelihood(torch.zeros(2, 3), W, mu, sigma)  # N(0, I_3) at 0
        >>> torch.allclose(ll, torch.full((2,), -1.5 * torch.log(torch.tensor(2 * torch.pi))))
        True
    """
    d = x.shape[1]
    cov = W @ W.T + sigma**2 * torch.eye(d, dtype=x.dtype)
    return dist.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)


def ppca_exact_posterior(x: torch.Tensor, W, mu, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior's mean ``(N, q)`` and covariance ``(q, q)``.

    Mean :math:`M^{-1} W^\\top (x_i - \\mu)` and covariance :math:`\\sigma^2 M^{-1}`, :math:`M =
    W^\\top W + \\sigma^2 I`.

    Example::

        >>> import torch
        >>> from models.ppca import ppca_exact_posterior
        >>> W, mu, sigma = torch.eye(2), torch.zeros(2), torch.tensor(1.0)  # M = 2 I
        >>> mean, cov = ppca_exact_posterior(torch.tensor([[2.0, 4.0]]), W, mu, sigma)
        >>> mean, cov
        (tensor([[1., 2.]]), tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]]))
    """
    q = W.shape[1]
    M = W.T @ W + sigma**2 * torch.eye(q, dtype=x.dtype)
    Minv = torch.linalg.inv(M)
    return (x - mu) @ W @ Minv.T, sigma**2 * Minv


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The principal angles (radians) between the column spans of A and B.

    Example::

        >>> import torch
        >>> from models.ppca import principal_angles
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> B = torch.tensor([[2.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # the same plane, other basis
        >>> principal_angles(A, B).abs().max() < 1e-6
        tensor(True)
    """
    qa, _ = torch.linalg.qr(A)
    qb, _ = torch.linalg.qr(B)
    s = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(s)


def sample_ppca(n: int, d: int = 5, q: int = 2, sigma: float = 0.5, seed: int = 0):
    """Synthetic PPCA data: ``(x, truth)`` with random W (scaled so the signal dominates).

    Example::

        >>> from models.ppca import sample_ppca
        >>> x, truth = sample_ppca(100, d=5, q=2, sigma=0.5)
        >>> x.shape, truth["W"].shape, float(truth["sigma"])
        (torch.Size([100, 5]), torch.Size([5, 2]), 0.5)
    """
    g = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    W = torch.randn(d, q, generator=g, dtype=dtype) * 2.0
    mu = torch.randn(d, generator=g, dtype=dtype)
    z = torch.randn(n, q, generator=g, dtype=dtype)
    x = z @ W.T + mu + sigma * torch.randn(n, d, generator=g, dtype=dtype)
    return x, {"W": W, "mu": mu, "sigma": torch.tensor(sigma, dtype=dtype)}


def log_likelihood_per_datum(x: torch.Tensor, params: dict) -> float:
    """Mean exact log-likelihood per datum at ``params`` (nats).

    At the maximum likelihood it is at least its value at the true params:

    Example::

        >>> from models.ppca import log_likelihood_per_datum, ppca_mle, sample_ppca
        >>> x, truth = sample_ppca(500, d=5, q=2)
        >>> log_likelihood_per_datum(x, ppca_mle(x, 2)) >= log_likelihood_per_datum(x, truth)
        True
    """
    return float(ppca_log_likelihood(x, params["W"], params["mu"], params["sigma"]).mean())
