r"""Mixtures for counts and binary vectors, written as plain Pyro model functions.

Poisson mixture (``D`` independent counts per datum):

.. math::

    z_n \sim \mathrm{Categorical}(w), \qquad
    x_{nd} \mid z_n = k \sim \mathrm{Poisson}(\lambda_{kd}),

Bernoulli mixture (binary vectors, e.g. binarized digits from
``pyro_emvae.datasets.load_digits(binarize=True)``):

.. math::

    z_n \sim \mathrm{Categorical}(w), \qquad
    x_{nd} \mid z_n = k \sim \mathrm{Bernoulli}(p_{kd}).

Params in Pyro's param store:

==============  ============  ===============  ==========================
name            shape         constraint       model
==============  ============  ===============  ==========================
``weights``     ``(K,)``      simplex          both
``rates``       ``(K, D)``    positive         :func:`poisson_mixture`
``probs``       ``(K, D)``    unit_interval    :func:`bernoulli_mixture`
==============  ============  ===============  ==========================

The latent ``"z"`` is enumerated in parallel inside ``pyro.plate("data", N, dim=-1)``; the
observed ``"x"`` is ``.to_event(1)`` over the ``D`` dimensions. Every param has a closed-form
M-step (Categorical, Poisson and Bernoulli rules), so ``fit`` with the default ``EMOptim`` runs
plain EM.

Example::

    from pyro_emvae import ExactEStep, fit
    from models.count_mixtures import poisson_mixture, init_poisson, sample_poisson_mixture

    x, truth = sample_poisson_mixture(500, K=3, D=4, seed=0)
    pyro.clear_param_store()
    init = init_poisson(x, 3, seed=1)
    model = lambda x: poisson_mixture(x, 3, init=init)
    result = fit(model, ExactEStep(model), x)
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = [
    "bernoulli_mixture",
    "init_bernoulli",
    "init_poisson",
    "poisson_mixture",
    "sample_bernoulli_mixture",
    "sample_poisson_mixture",
]


def _as_2d(data: Tensor) -> Tensor:
    if data.dim() == 1:
        data = data.unsqueeze(-1)
    if data.dim() != 2:
        raise ValueError(f"data must have shape (N,) or (N, D), got {tuple(data.shape)}")
    return data


def init_poisson(data: Tensor, K: int, seed: int = 0, jitter: float = 0.5) -> dict[str, Tensor]:
    """Uniform weights; rates = the data mean times a random factor in ``[1 - jitter, 1 +
    jitter]`` per component and dimension (seeded generator), never below 1e-3.

    Returns:
        ``{"weights": (K,), "rates": (K, D)}``.

    Example::

        >>> import torch
        >>> from models.count_mixtures import init_poisson
        >>> init = init_poisson(torch.tensor([[1.0, 4.0], [3.0, 8.0], [2.0, 6.0]]), K=3)
        >>> init["weights"], init["rates"].shape
        (tensor([0.3333, 0.3333, 0.3333]), torch.Size([3, 2]))
    """
    data = _as_2d(data).detach()
    N, D = data.shape
    if not 1 <= K <= N:
        raise ValueError(f"need 1 <= K <= N, got K={K}, N={N}")
    gen = torch.Generator().manual_seed(seed)
    mean = data.to(torch.get_default_dtype()).mean(0)
    factor = 1 + jitter * (2 * torch.rand(K, D, generator=gen, dtype=mean.dtype) - 1)
    return {
        "weights": torch.full((K,), 1.0 / K, dtype=mean.dtype),
        "rates": (mean * factor).clamp_min(1e-3),
    }


def init_bernoulli(data: Tensor, K: int, seed: int = 0, jitter: float = 0.25) -> dict[str, Tensor]:
    """Uniform weights; probs = the pixel means (shrunk into ``[0.05, 0.95]``) plus uniform
    noise of half-width ``jitter``, clamped into ``[0.01, 0.99]`` (seeded generator).

    Returns:
        ``{"weights": (K,), "probs": (K, D)}``.

    Example::

        >>> import torch
        >>> from models.count_mixtures import init_bernoulli
        >>> init = init_bernoulli(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), K=2)
        >>> init["probs"].shape, bool(((0.01 <= init["probs"]) & (init["probs"] <= 0.99)).all())
        (torch.Size([2, 2]), True)
    """
    data = _as_2d(data).detach()
    N, D = data.shape
    if not 1 <= K <= N:
        raise ValueError(f"need 1 <= K <= N, got K={K}, N={N}")
    gen = torch.Generator().manual_seed(seed)
    mean = 0.05 + 0.9 * data.to(torch.get_default_dtype()).mean(0)
    noise = jitter * (2 * torch.rand(K, D, generator=gen, dtype=mean.dtype) - 1)
    return {
        "weights": torch.full((K,), 1.0 / K, dtype=mean.dtype),
        "probs": (mean + noise).clamp(0.01, 0.99),
    }


def _param(name: str, init: Mapping[str, Tensor], constraint) -> Tensor:
    return pyro.param(name, lambda: init[name].detach().clone(), constraint=constraint)


def poisson_mixture(data: Tensor, K: int, init: Mapping[str, Tensor] | None = None) -> Tensor:
    """Pyro model of a ``K``-component mixture of independent Poissons over ``data`` ``(N, D)``
    (or ``(N,)``, read as ``D = 1``). Params ``weights`` and ``rates`` are created on the first
    call from ``init`` (or :func:`init_poisson` with ``seed=0``).

    Returns:
        the value of ``z``.

    :math:`z_n \\sim \\mathrm{Categorical}(w)`, :math:`x_{nd} \\mid z_n = k \\sim
    \\mathrm{Poisson}(\\lambda_{kd})`; EM's rate update is :math:`\\lambda_{kd} = \\sum_n w_{nk}
    x_{nd} / \\sum_n w_{nk}`.

    Example::

        >>> from pyro_emvae import ExactEStep, fit
        >>> from models.count_mixtures import poisson_mixture, sample_poisson_mixture
        >>> x, truth = sample_poisson_mixture(300, K=2, D=3, seed=0)
        >>> model = lambda x: poisson_mixture(x, 2)
        >>> result = fit(model, ExactEStep(model), x)
        >>> result.algorithm, result.params["rates"].shape  # closed-form Poisson and weight updates
        ('EM', torch.Size([2, 3]))
    """
    data = _as_2d(data)
    if init is None:
        init = init_poisson(data, K)
    weights = _param("weights", init, constraints.simplex)
    rates = _param("rates", init, constraints.positive)
    with pyro.plate("data", data.shape[0], dim=-1):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Poisson(rates[z]).to_event(1), obs=data)
    return z


def bernoulli_mixture(data: Tensor, K: int, init: Mapping[str, Tensor] | None = None) -> Tensor:
    """Pyro model of a ``K``-component mixture of independent Bernoullis over binary ``data``
    ``(N, D)``. Params ``weights`` and ``probs`` are created on the first call from ``init``
    (or :func:`init_bernoulli` with ``seed=0``).

    Returns:
        the value of ``z``.

    :math:`z_n \\sim \\mathrm{Categorical}(w)`, :math:`x_{nd} \\mid z_n = k \\sim
    \\mathrm{Bernoulli}(p_{kd})`.

    Example::

        >>> from pyro_emvae import ExactEStep
        >>> from models.count_mixtures import bernoulli_mixture, sample_bernoulli_mixture
        >>> x, truth = sample_bernoulli_mixture(100, K=3, D=8, seed=0)
        >>> post = ExactEStep(lambda x: bernoulli_mixture(x, 3)).posterior(x)
        >>> post.marginals["z"].shape  # p(z_n = k | x_n)
        torch.Size([100, 3])
    """
    data = _as_2d(data)
    if init is None:
        init = init_bernoulli(data, K)
    weights = _param("weights", init, constraints.simplex)
    probs = _param("probs", init, constraints.unit_interval)
    with pyro.plate("data", data.shape[0], dim=-1):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Bernoulli(probs=probs[z]).to_event(1), obs=data)
    return z


def _weights(gen: torch.Generator, K: int, dtype: torch.dtype) -> Tensor:
    e = -torch.rand(K, generator=gen, dtype=dtype).clamp_min(1e-12).log()
    return 0.5 / K + 0.5 * e / e.sum()


def sample_poisson_mixture(
    N: int, K: int, D: int = 1, seed: int = 0, max_rate: float = 20.0, return_assignments=False
):
    """Draw ``N`` count vectors from a Poisson mixture with random truth: weights
    ``(1/K + Dirichlet(1))/2``, rates log-uniform in ``[0.5, max_rate]`` (seeded generator).

    Returns:
        ``(data (N, D), {"weights", "rates"})`` and, with ``return_assignments``, ``z (N,)``.

    Example::

        >>> from models.count_mixtures import sample_poisson_mixture
        >>> x, truth, z = sample_poisson_mixture(50, K=3, D=2, seed=0, return_assignments=True)
        >>> x.shape, truth["rates"].shape, z.shape
        (torch.Size([50, 2]), torch.Size([3, 2]), torch.Size([50]))
    """
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    weights = _weights(gen, K, dtype)
    lo, hi = (
        torch.log(torch.tensor(0.5, dtype=dtype)),
        torch.log(torch.tensor(max_rate, dtype=dtype)),
    )
    rates = torch.exp(lo + (hi - lo) * torch.rand(K, D, generator=gen, dtype=dtype))
    z = torch.multinomial(weights, N, replacement=True, generator=gen)
    data = torch.poisson(rates[z], generator=gen)
    truth = {"weights": weights, "rates": rates}
    return (data, truth, z) if return_assignments else (data, truth)


def sample_bernoulli_mixture(N: int, K: int, D: int, seed: int = 0, return_assignments=False):
    """Draw ``N`` binary vectors from a Bernoulli mixture with random truth: weights
    ``(1/K + Dirichlet(1))/2``, probs ``Beta(0.5, 0.5)``-like (``sin^2`` of a uniform angle).

    Returns:
        ``(data (N, D), {"weights", "probs"})`` and, with ``return_assignments``, ``z (N,)``.

    Example::

        >>> from models.count_mixtures import sample_bernoulli_mixture
        >>> x, truth = sample_bernoulli_mixture(50, K=3, D=4, seed=0)
        >>> x.shape, sorted(x.unique().tolist()), truth["probs"].shape
        (torch.Size([50, 4]), [0.0, 1.0], torch.Size([3, 4]))
    """
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    weights = _weights(gen, K, dtype)
    probs = torch.sin(0.5 * torch.pi * torch.rand(K, D, generator=gen, dtype=dtype)) ** 2
    probs = probs.clamp(0.02, 0.98)
    z = torch.multinomial(weights, N, replacement=True, generator=gen)
    data = torch.bernoulli(probs[z], generator=gen)
    truth = {"weights": weights, "probs": probs}
    return (data, truth, z) if return_assignments else (data, truth)
