r"""Gaussian mixture model written as a plain Pyro model function.

The model is

.. math::

    z_n \sim \mathrm{Categorical}(\pi), \qquad
    x_n \mid z_n = k \sim \mathcal{N}(\mu_k, \Sigma_k), \qquad n = 1, \dots, N,

with the parameters stored in Pyro's param store under these names:

==============  ==============  ================  =========================================
name            shape           constraint        ``covariance_type`` and covariance
==============  ==============  ================  =========================================
``weights``     ``(K,)``        simplex           all
``locs``        ``(K, D)``      real              all
``scales``      ``(K, D)``      positive          ``"diag"``: ``diag(scales[k]**2)``
``scales``      ``(K,)``        positive          ``"spherical"``: ``scales[k]**2 * I``
``scale_tril``  ``(K, D, D)``   lower_cholesky    ``"full"``: ``L[k] @ L[k].T``
``scale_tril``  ``(D, D)``      lower_cholesky    ``"tied"``: ``L @ L.T`` shared by all k
==============  ==============  ================  =========================================

The latent site ``"z"`` is marked ``infer={"enumerate": "parallel"}`` and lives inside
``pyro.plate("data", N)`` (so ``max_plate_nesting=1``); the observed site is ``"x"``.

Example::

    import pyro
    import torch
    from pyro.infer import TraceEnum_ELBO
    from models.gmm import gmm_model, init_params, sample_gmm

    data, truth = sample_gmm(N=500, K=3, D=2, seed=0)
    pyro.clear_param_store()
    init = init_params(data, K=3, covariance_type="diag", seed=1)
    gmm_model(data, 3, "diag", init=init)      # first call creates the params
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    log_px = -elbo.loss(gmm_model, lambda *a, **k: None, data, 3, "diag")  # exact log p(x)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = [
    "COVARIANCE_TYPES",
    "gmm_model",
    "init_params",
    "make_gmm_model",
    "param_names",
    "sample_gmm",
]

COVARIANCE_TYPES: tuple[str, ...] = ("diag", "full", "tied", "spherical")


def _check_covariance_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
        )


def param_names(covariance_type: str = "diag") -> tuple[str, str, str]:
    """Names of the Pyro params used by :func:`gmm_model` for ``covariance_type``.

    Returns ``("weights", "locs", "scales")`` for ``"diag"``/``"spherical"`` and
    ``("weights", "locs", "scale_tril")`` for ``"full"``/``"tied"``.

    Example::

        >>> param_names("full")
        ('weights', 'locs', 'scale_tril')
    """
    _check_covariance_type(covariance_type)
    scale_name = "scales" if covariance_type in ("diag", "spherical") else "scale_tril"
    return ("weights", "locs", scale_name)


def _safe_std(data: Tensor) -> Tensor:
    """Per-dimension standard deviation of ``data`` (N, D), replacing zeros/NaNs by 1."""
    if data.shape[0] > 1:
        std = data.std(0)
    else:
        std = torch.zeros(data.shape[-1], dtype=data.dtype)
    return torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))


def init_params(
    data: Tensor, K: int, covariance_type: str = "diag", seed: int = 0
) -> dict[str, Tensor]:
    """Simple data-driven initial values for :func:`gmm_model`.

    ``weights`` are uniform ``(K,)``; ``locs`` are ``K`` distinct data points chosen at random
    (``(K, D)``, with a ``torch.Generator`` seeded by ``seed``; the global RNG is untouched);
    the scale parameter is the per-dimension data standard deviation ``std`` (``(D,)``):
    ``scales = std`` repeated to ``(K, D)`` for ``"diag"``, ``scales = mean(std)`` repeated to
    ``(K,)`` for ``"spherical"``, ``scale_tril = diag(std)`` repeated to ``(K, D, D)`` for
    ``"full"`` and ``diag(std)`` ``(D, D)`` for ``"tied"``.

    Args:
        data: observations, shape ``(N, D)``.
        K: number of components (``K <= N``).
        covariance_type: one of ``"diag"``, ``"full"``, ``"tied"``, ``"spherical"``.
        seed: seed for the choice of the initial ``locs``.

    Returns:
        dict with keys :func:`param_names` ``(covariance_type)``, constrained values.

    Example::

        >>> init = init_params(torch.randn(100, 2), K=3, covariance_type="full")
        >>> init["scale_tril"].shape
        torch.Size([3, 2, 2])
    """
    _check_covariance_type(covariance_type)
    if data.dim() != 2:
        raise ValueError(f"data must have shape (N, D), got {tuple(data.shape)}")
    N, D = data.shape
    if not 1 <= K <= N:
        raise ValueError(f"need 1 <= K <= N, got K={K}, N={N}")
    data = data.detach()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N, generator=gen)[:K]
    std = _safe_std(data)
    params: dict[str, Tensor] = {
        "weights": torch.full((K,), 1.0 / K, dtype=data.dtype),
        "locs": data[idx].clone(),
    }
    if covariance_type == "diag":
        params["scales"] = std.expand(K, D).clone()
    elif covariance_type == "spherical":
        params["scales"] = std.mean().expand(K).clone()
    elif covariance_type == "full":
        params["scale_tril"] = torch.diag_embed(std).expand(K, D, D).clone()
    else:  # tied
        params["scale_tril"] = torch.diag_embed(std)
    return params


def gmm_model(
    data: Tensor,
    K: int,
    covariance_type: str = "diag",
    init: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Pyro model of a ``K``-component Gaussian mixture over ``data`` of shape ``(N, D)``.

    Sites: ``"z"`` (latent, ``Categorical(weights)``, enumerated in parallel, shape ``(N,)``
    when sampled) and ``"x"`` (observed, ``data``), both inside ``pyro.plate("data", N)``
    (``dim=-1``, so ``max_plate_nesting=1``). Params: see the module docstring table.

    Params are created with ``pyro.param(name, init_value, constraint=...)``: the first call
    initializes them from ``init[name]`` (a clone is stored, so ``init`` is never modified)
    or, for names missing from ``init``, from :func:`init_params` ``(data, K,
    covariance_type, seed=0)``; later calls read the param store and ignore ``init``.
    Call ``pyro.clear_param_store()`` to start over.

    Args:
        data: observations, shape ``(N, D)``.
        K: number of mixture components.
        covariance_type: ``"diag"`` (default), ``"full"``, ``"tied"`` or ``"spherical"``.
        init: optional dict of initial (constrained) param values.

    Returns:
        the value of ``z`` (an enumeration tensor of shape ``(K, 1)`` under parallel
        enumeration, otherwise ``(N,)``).

    Example::

        >>> data, truth = sample_gmm(N=200, K=2, D=3, seed=0)
        >>> pyro.clear_param_store()
        >>> z = gmm_model(data, 2, "full", init=init_params(data, 2, "full"))
        >>> sorted(pyro.get_param_store().keys())
        ['locs', 'scale_tril', 'weights']
    """
    _check_covariance_type(covariance_type)
    if data.dim() != 2:
        raise ValueError(f"data must have shape (N, D), got {tuple(data.shape)}")
    N = data.shape[0]
    defaults: dict[str, Tensor] = {}

    def lazy(name: str) -> Callable[[], Tensor]:
        def value() -> Tensor:
            if init is not None and name in init:
                return torch.as_tensor(init[name], dtype=data.dtype).detach().clone()
            if not defaults:
                defaults.update(init_params(data, K, covariance_type, seed=0))
            return defaults[name]

        return value

    weights = pyro.param("weights", lazy("weights"), constraint=constraints.simplex)
    locs = pyro.param("locs", lazy("locs"))
    if covariance_type in ("diag", "spherical"):
        scales = pyro.param("scales", lazy("scales"), constraint=constraints.positive)
    else:
        scale_tril = pyro.param(
            "scale_tril", lazy("scale_tril"), constraint=constraints.lower_cholesky
        )

    with pyro.plate("data", N, dim=-1):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        if covariance_type == "diag":
            obs_dist = dist.Normal(locs[z], scales[z]).to_event(1)
        elif covariance_type == "spherical":
            obs_dist = dist.Normal(locs[z], scales[z].unsqueeze(-1)).to_event(1)
        elif covariance_type == "full":
            obs_dist = dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z])
        else:  # tied
            obs_dist = dist.MultivariateNormal(locs[z], scale_tril=scale_tril)
        pyro.sample("x", obs_dist, obs=data)
    return z


def make_gmm_model(
    K: int, covariance_type: str = "diag", init: Mapping[str, Tensor] | None = None
) -> Callable[[Tensor], Tensor]:
    """Closure form of :func:`gmm_model`: returns ``model(data)`` with ``K``,
    ``covariance_type`` and ``init`` bound, convenient where a one-argument model is wanted.

    Example::

        >>> pyro.clear_param_store()
        >>> model = make_gmm_model(3, "tied")
        >>> data, _ = sample_gmm(100, 3, 2, seed=0)
        >>> _ = model(data)
    """
    _check_covariance_type(covariance_type)

    def model(data: Tensor) -> Tensor:
        return gmm_model(data, K, covariance_type, init=init)

    model.__name__ = f"gmm_model_K{K}_{covariance_type}"
    model.__doc__ = f"gmm_model(data, K={K}, covariance_type={covariance_type!r}, init=...)"
    return model


def _random_simplex(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    """Rows drawn from a flat Dirichlet (normalized exponentials), shape ``shape``."""
    e = -torch.rand(*shape, generator=gen, dtype=dtype).clamp_min(1e-12).log()
    return e / e.sum(-1, keepdim=True)


def sample_gmm(
    N: int,
    K: int,
    D: int,
    seed: int = 0,
    covariance_type: str = "diag",
    separation: float = 4.0,
    return_assignments: bool = False,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], Tensor]:
    """Draw synthetic data from a Gaussian mixture with known, randomly chosen parameters.

    True parameters (seeded ``torch.Generator``; the global RNG is untouched; dtype is the
    default dtype): ``weights = (1/K + Dirichlet(1))/2`` (no tiny components),
    ``locs ~ N(0, separation^2 I)``, scales uniform in ``[0.5, 1.5]``; for ``"full"``/
    ``"tied"`` a lower-triangular ``scale_tril`` with diagonal in ``[0.5, 1.5]`` and
    off-diagonal ``N(0, 0.3^2)`` entries.

    Args:
        N: number of points. K: number of components. D: dimension.
        seed: random seed.
        covariance_type: which covariance structure (and param names) the truth uses.
        separation: standard deviation of the component means.
        return_assignments: also return the true component of each point, ``(N,)`` long.

    Returns:
        ``(data, params)`` with ``data`` of shape ``(N, D)`` and ``params`` keyed like
        :func:`gmm_model`'s params, or ``(data, params, z)`` if ``return_assignments``.

    Example::

        >>> data, truth = sample_gmm(N=1000, K=3, D=2, seed=0, covariance_type="full")
        >>> data.shape, truth["scale_tril"].shape
        (torch.Size([1000, 2]), torch.Size([3, 2, 2]))
    """
    _check_covariance_type(covariance_type)
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    weights = 0.5 / K + 0.5 * _random_simplex(gen, K, dtype=dtype)
    locs = separation * torch.randn(K, D, generator=gen, dtype=dtype)
    params: dict[str, Tensor] = {"weights": weights, "locs": locs}

    def tril(*batch: int) -> Tensor:
        diag = 0.5 + torch.rand(*batch, D, generator=gen, dtype=dtype)
        off = 0.3 * torch.randn(*batch, D, D, generator=gen, dtype=dtype)
        return torch.tril(off, diagonal=-1) + torch.diag_embed(diag)

    if covariance_type == "diag":
        params["scales"] = 0.5 + torch.rand(K, D, generator=gen, dtype=dtype)
    elif covariance_type == "spherical":
        params["scales"] = 0.5 + torch.rand(K, generator=gen, dtype=dtype)
    elif covariance_type == "full":
        params["scale_tril"] = tril(K)
    else:
        params["scale_tril"] = tril()

    z = torch.multinomial(weights, N, replacement=True, generator=gen)
    eps = torch.randn(N, D, generator=gen, dtype=dtype)
    if covariance_type == "diag":
        noise = params["scales"][z] * eps
    elif covariance_type == "spherical":
        noise = params["scales"][z].unsqueeze(-1) * eps
    elif covariance_type == "full":
        noise = (params["scale_tril"][z] @ eps.unsqueeze(-1)).squeeze(-1)
    else:
        noise = eps @ params["scale_tril"].T
    data = locs[z] + noise
    if return_assignments:
        return data, params, z
    return data, params
