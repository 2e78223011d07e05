r"""Mixture of linear regressions (a mixture of experts with a constant gate), as a plain Pyro
model function.

.. math::

    z_n \sim \mathrm{Categorical}(\pi), \qquad
    y_n \mid x_n, z_n = k \sim \mathcal N(x_n^T w_k + b_k, \sigma_k^2),
    \qquad n = 1, \dots, N,

with the params in Pyro's param store:

===========  ==========  ==========
name         shape       constraint
===========  ==========  ==========
``weights``  ``(K,)``    simplex
``W``        ``(K, D)``  real
``b``        ``(K,)``    real
``sigma``    ``(K,)``    positive
===========  ==========  ==========

The loc ``(X * W[z]).sum(-1) + b[z]`` is linear in ``W`` and ``b`` with the data ``X`` as
design, so ``EMOptim`` updates them jointly by weighted least squares (one
``(D + 1) x (D + 1)`` solve per component), the weights by expected counts and the scales by
the weighted residual variance about the new fit: ``fit`` runs plain EM.

Example::

    import pyro
    from pyro_emvae import EMOptim, ExactEStep, fit
    from models.mixture_regression import init_params, mixture_regression, sample_mixture_regression

    X, y, truth = sample_mixture_regression(2000, K=3, D=4, seed=0)
    pyro.clear_param_store()
    init = init_params(X, y, K=3, seed=1)

    def model(X, y):
        mixture_regression(X, y, 3, init=init)

    result = fit(model, ExactEStep(model), X, y, optim=EMOptim(reg_covar=0.0))
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = ["init_params", "mixture_regression", "sample_mixture_regression"]


def mixture_regression(X: Tensor, y: Tensor, K: int, init: Mapping[str, Tensor] | None = None):
    """The model: ``X`` (N, D) covariates, ``y`` (N,) responses, ``K`` components; ``init``
    gives the params' first values (see :func:`init_params`).

    :math:`z_n \\sim \\mathrm{Categorical}(w)`, :math:`y_n \\mid z_n = k \\sim
    \\mathrm{Normal}(x_n^\\top \\beta_k + b_k, \\sigma_k)`.

    Example::

        >>> from pyro_emvae import ExactEStep, fit
        >>> from models.mixture_regression import init_params, mixture_regression
        >>> from models.mixture_regression import sample_mixture_regression
        >>> X, y, truth = sample_mixture_regression(400, K=2, D=3, seed=0)
        >>> init = init_params(X, y, 2)
        >>> model = lambda X, y: mixture_regression(X, y, 2, init=init)
        >>> result = fit(model, ExactEStep(model), X, y, max_iter=5, tol=0)
        >>> result.algorithm  # every param in closed form: weighted least squares per component
        'EM'
    """
    N, D = X.shape
    # (copies: the param store updates a real param's tensor in place)
    init = {k: v.detach().clone() for k, v in (init or {}).items()}
    weights = pyro.param(
        "weights", lambda: init.get("weights", torch.ones(K) / K), constraint=constraints.simplex
    )
    W = pyro.param("W", lambda: init.get("W", torch.zeros(K, D)))
    b = pyro.param("b", lambda: init.get("b", torch.zeros(K)))
    sigma = pyro.param(
        "sigma", lambda: init.get("sigma", torch.ones(K)), constraint=constraints.positive
    )
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal((X * W[z]).sum(-1) + b[z], sigma[z]), obs=y)


def sample_mixture_regression(
    N: int, K: int = 3, D: int = 4, seed: int = 0, noise: tuple[float, float] = (0.3, 1.0)
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``N`` draws ``(X, y)`` from a random mixture of ``K`` regressions on ``D`` standard
    normal features (slopes N(0, 2²), intercepts N(0, 1), noise uniform in ``noise``,
    weights Dirichlet(5)); returns ``X``, ``y`` and the true params and labels.

    Example::

        >>> from models.mixture_regression import sample_mixture_regression
        >>> X, y, truth = sample_mixture_regression(100, K=3, D=2, seed=0)
        >>> X.shape, y.shape, sorted(truth)
        (torch.Size([100, 2]), torch.Size([100]), ['W', 'b', 'sigma', 'weights', 'z'])
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch._standard_gamma(torch.full((K,), 5.0), generator=g)
    weights = weights / weights.sum()
    W = 2.0 * torch.randn(K, D, generator=g)
    b = torch.randn(K, generator=g)
    sigma = noise[0] + (noise[1] - noise[0]) * torch.rand(K, generator=g)
    X = torch.randn(N, D, generator=g)
    z = torch.multinomial(weights, N, replacement=True, generator=g)
    y = (X * W[z]).sum(-1) + b[z] + sigma[z] * torch.randn(N, generator=g)
    truth = {"weights": weights, "W": W, "b": b, "sigma": sigma, "z": z}
    return X, y, truth


def init_params(X: Tensor, y: Tensor, K: int, seed: int = 1) -> dict[str, Tensor]:
    """A random start: the pooled least-squares fit plus noise per component, the residual
    scale, equal weights.

    Example::

        >>> from models.mixture_regression import init_params, sample_mixture_regression
        >>> X, y, truth = sample_mixture_regression(100, K=3, D=2, seed=0)
        >>> {k: tuple(v.shape) for k, v in init_params(X, y, 3).items()}
        {'weights': (3,), 'W': (3, 2), 'b': (3,), 'sigma': (3,)}
    """
    g = torch.Generator().manual_seed(seed)
    N, D = X.shape
    design = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], -1)
    beta = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
    resid = (y - design @ beta).std()
    jitter = torch.randn(K, D + 1, generator=g, dtype=X.dtype)
    return {
        "weights": torch.ones(K, dtype=X.dtype) / K,
        "W": beta[:D] + jitter[:, :D],
        "b": beta[D] + jitter[:, D],
        "sigma": torch.full((K,), float(resid), dtype=X.dtype),
    }
