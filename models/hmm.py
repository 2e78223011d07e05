r"""Hidden Markov models (Gaussian and categorical emissions) as plain Pyro model functions.

All models follow the hmmlearn convention

.. math::

    z_0 \sim \mathrm{Categorical}(\text{start}), \quad
    z_t \mid z_{t-1} \sim \mathrm{Categorical}(\text{trans}[z_{t-1}]), \quad
    x_t \mid z_t \sim p(x \mid \theta_{z_t}), \qquad t = 0, \dots, T-1,

for ``N`` independent sequences of the same length ``T`` (inside
``pyro.plate("sequences", N, dim=-1)``, so ``max_plate_nesting=1``). Params (Pyro param store):

====================  ==========  ==========  ===================================
name                  shape       constraint  used by
====================  ==========  ==========  ===================================
``start``             ``(K,)``    simplex     all
``trans``             ``(K, K)``  simplex     all (row ``i`` is ``p(z_t | z_{t-1}=i)``)
``locs``              ``(K, D)``  real        Gaussian: ``Normal(locs[k], scales[k])``
``scales``            ``(K, D)``  positive    Gaussian (diagonal covariance)
``emission_probs``    ``(K, M)``  simplex     categorical: ``Categorical(emission_probs[k])``
====================  ==========  ==========  ===================================

Each HMM comes in two forms computing the same ``log p(x)``:

* the ``pyro.markov`` loop form (:func:`gaussian_hmm_markov`, :func:`categorical_hmm_markov`)
  with latent sites ``"z_0" .. "z_{T-1}"`` (``infer={"enumerate": "parallel"}``) and observed
  sites ``"x_0" .. "x_{T-1}"``; fine for short chains (one site per time step);
* the vectorized :class:`pyro.distributions.DiscreteHMM` form (:func:`gaussian_hmm`,
  :func:`categorical_hmm`), the recommended form for long chains, with a single observed site
  ``"x"`` holding the whole ``(N, T, ...)`` array and no latent sample site.

Pyro's ``DiscreteHMM(initial_logits, transition_logits, obs_dist)`` puts ``initial_logits`` on a
state at "time -1" and applies ``transition_logits[t]`` *before* emitting ``x_t``. To get
``z_0 ~ start`` exactly we use ``transition_logits`` of shape ``(T, K, K)`` whose slice 0 is
``log(start)`` in every row (so ``z_0`` is independent of the dummy time -1 state, whatever
its distribution) and whose slices ``1..T-1`` are ``log(trans)``; ``initial_logits`` is uniform
(see :func:`discrete_hmm_logits`). The models here use
:class:`pyro_emvae.distributions.HomogeneousHMM`, the ``DiscreteHMM`` of exactly those logits
given as ``log(start)`` and the one ``(K, K)`` ``log(trans)``: no ``(T, K, K)`` tensor is built or
normalized per trace, and the E-step runs the homogeneous chain's forward-backward
(:func:`pyro_emvae.distributions.chain_log_z`). The test-suite checks that both forms agree.

Example::

    import pyro
    from pyro.infer import TraceEnum_ELBO
    from models.hmm import gaussian_hmm, gaussian_hmm_markov, init_params, sample_gaussian_hmm

    data, truth = sample_gaussian_hmm(N=2, T=50, K=3, D=2, seed=0)   # data: (2, 50, 2)
    pyro.clear_param_store()
    gaussian_hmm(data, 3, init=truth)                 # create the params at the true values
    trace = pyro.poutine.trace(gaussian_hmm).get_trace(data, 3)
    log_px = trace.log_prob_sum()                     # exact log p(x), vectorized
    elbo = TraceEnum_ELBO(max_plate_nesting=1)        # same number from the markov form:
    log_px_markov = -elbo.loss(gaussian_hmm_markov, lambda *a, **k: None, data, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

from pyro_emvae.distributions import HomogeneousHMM

__all__ = [
    "EMISSIONS",
    "categorical_hmm",
    "categorical_hmm_markov",
    "discrete_hmm_logits",
    "gaussian_hmm",
    "gaussian_hmm_markov",
    "init_params",
    "sample_categorical_hmm",
    "sample_gaussian_hmm",
]

EMISSIONS: tuple[str, ...] = ("gaussian", "categorical")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _random_simplex(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> Tensor:
    """Rows drawn from a flat Dirichlet (normalized exponentials), shape ``shape``."""
    e = -torch.rand(*shape, generator=gen, dtype=dtype).clamp_min(1e-12).log()
    return e / e.sum(-1, keepdim=True)


def _as_gaussian_data(data: Tensor) -> Tensor:
    if data.dim() == 2:  # a single sequence (T, D)
        data = data.unsqueeze(0)
    if data.dim() != 3:
        raise ValueError(f"Gaussian HMM data must have shape (N, T, D), got {tuple(data.shape)}")
    return data


def _as_categorical_data(data: Tensor) -> Tensor:
    if data.dim() == 1:  # a single sequence (T,)
        data = data.unsqueeze(0)
    if data.dim() != 2:
        raise ValueError(f"categorical HMM data must have shape (N, T), got {tuple(data.shape)}")
    return data


def _float_dtype(data: Tensor) -> torch.dtype:
    return data.dtype if data.is_floating_point() else torch.get_default_dtype()


def init_params(
    data: Tensor,
    K: int,
    emission: str = "gaussian",
    M: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Simple data-driven initial values for the HMM models.

    ``start`` is uniform; ``trans = 0.5 I + 0.5 R`` with ``R`` rows from a flat Dirichlet
    (sticky, asymmetric). Gaussian: ``locs`` are ``K`` distinct frames ``x[n, t]`` chosen at
    random, ``scales`` the per-dimension data std repeated to ``(K, D)``. Categorical:
    ``emission_probs = 0.5 * empirical symbol frequencies + 0.5 * R'`` with ``R'`` random
    simplex rows, shape ``(K, M)``. Random draws use a ``torch.Generator`` seeded by ``seed``.

    Args:
        data: ``(N, T, D)`` (or ``(T, D)``) floats for ``"gaussian"``; ``(N, T)`` (or
            ``(T,)``) integer symbols in ``[0, M)`` for ``"categorical"``.
        K: number of hidden states.
        emission: ``"gaussian"`` or ``"categorical"``.
        M: number of symbols (categorical only; default ``data.max() + 1``).
        seed: random seed.

    Returns:
        dict with keys ``start``, ``trans`` and ``locs``/``scales`` or ``emission_probs``.

    Example::

        >>> data, _ = sample_gaussian_hmm(N=3, T=100, K=2, D=2, seed=0)
        >>> {k: tuple(v.shape) for k, v in init_params(data, K=2).items()}
        {'start': (2,), 'trans': (2, 2), 'locs': (2, 2), 'scales': (2, 2)}
    """
    if emission not in EMISSIONS:
        raise ValueError(f"emission must be one of {EMISSIONS}, got {emission!r}")
    data = data.detach()
    dtype = _float_dtype(data)
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, Tensor] = {
        "start": torch.full((K,), 1.0 / K, dtype=dtype),
        "trans": 0.5 * torch.eye(K, dtype=dtype) + 0.5 * _random_simplex(gen, K, K, dtype=dtype),
    }
    if emission == "gaussian":
        data = _as_gaussian_data(data)
        frames = data.reshape(-1, data.shape[-1])
        if K > frames.shape[0]:
            raise ValueError(f"need K <= N * T, got K={K}, N * T={frames.shape[0]}")
        idx = torch.randperm(frames.shape[0], generator=gen)[:K]
        std = frames.std(0) if frames.shape[0] > 1 else torch.ones(frames.shape[-1], dtype=dtype)
        std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
        params["locs"] = frames[idx].clone()
        params["scales"] = std.expand(K, frames.shape[-1]).clone()
    else:
        data = _as_categorical_data(data).long()
        if M is None:
            M = int(data.max()) + 1
        freq = torch.bincount(data.reshape(-1), minlength=M).to(dtype)
        freq = freq / freq.sum()
        params["emission_probs"] = 0.5 * freq + 0.5 * _random_simplex(gen, K, M, dtype=dtype)
    return params


def _lazy_init(
    init: Mapping[str, Tensor] | None, dtype: torch.dtype, default: Callable[[], dict]
) -> Callable[[str], Callable[[], Tensor]]:
    """Lazy initial values for ``pyro.param``: ``init[name]`` (cloned) or ``default()[name]``.

    ``default`` is evaluated at most once and only if some param is missing from the store.
    """
    cache: dict[str, Tensor] = {}

    def lazy(name: str) -> Callable[[], Tensor]:
        def value() -> Tensor:
            if init is not None and name in init:
                return torch.as_tensor(init[name], dtype=dtype).detach().clone()
            if not cache:
                cache.update(default())
            return cache[name]

        return value

    return lazy


def _chain_params(lazy: Callable[[str], Callable[[], Tensor]]) -> tuple[Tensor, Tensor]:
    start = pyro.param("start", lazy("start"), constraint=constraints.simplex)
    trans = pyro.param("trans", lazy("trans"), constraint=constraints.simplex)
    return start, trans


def discrete_hmm_logits(start: Tensor, trans: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """``(initial_logits, transition_logits)`` for :class:`~pyro.distributions.DiscreteHMM`
    that reproduce the convention ``z_0 ~ start``, ``z_t ~ trans[z_{t-1}]`` exactly.

    ``DiscreteHMM`` draws a state ``z_{-1}`` from ``initial_logits`` and then
    ``z_t ~ softmax(transition_logits[t][z_{t-1}])`` for ``t = 0..T-1`` before each emission.
    With ``transition_logits[0, i, :] = log(start)`` for every ``i``, the state ``z_0`` has
    distribution ``start`` regardless of ``z_{-1}``, so the marginal law of ``z_{0:T-1}``
    (and ``log p(x)``) is exactly that of the hmmlearn-style chain. ``initial_logits`` is
    uniform (``zeros(K)``; ``DiscreteHMM`` normalizes it).

    Args:
        start: ``(K,)`` initial distribution. trans: ``(K, K)`` row-stochastic matrix.
        T: number of time steps (``>= 1``).

    Returns:
        ``initial_logits`` of shape ``(K,)`` and ``transition_logits`` of shape ``(T, K, K)``.

    Example::

        >>> init_logits, trans_logits = discrete_hmm_logits(torch.ones(2) / 2, torch.eye(2), 5)
        >>> trans_logits.shape
        torch.Size([5, 2, 2])
    """
    K = start.shape[-1]
    first = start.log().unsqueeze(-2).expand(1, K, K)
    rest = trans.log().expand(T - 1, K, K)
    return torch.zeros(K, dtype=start.dtype), torch.cat([first, rest], dim=0)


# --------------------------------------------------------------------------------------------
# Gaussian emissions
# --------------------------------------------------------------------------------------------


def _gaussian_params(
    data: Tensor, K: int, init: Mapping[str, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lazy = _lazy_init(init, data.dtype, lambda: init_params(data, K, "gaussian", seed=0))
    start, trans = _chain_params(lazy)
    locs = pyro.param("locs", lazy("locs"))
    scales = pyro.param("scales", lazy("scales"), constraint=constraints.positive)
    return start, trans, locs, scales


def gaussian_hmm_markov(data: Tensor, K: int, init: Mapping[str, Tensor] | None = None) -> None:
    """Gaussian HMM, ``pyro.markov`` loop form (one latent and one observed site per step).

    ``z_0 ~ Categorical(start)``, ``z_t ~ Categorical(trans[z_{t-1}])``,
    ``x_t ~ Normal(locs[z_t], scales[z_t]).to_event(1)``.
    Sites ``"z_t"`` (enumerated in parallel) and ``"x_t"`` (observed ``data[:, t]``), for
    ``t = 0..T-1``, inside ``pyro.plate("sequences", N, dim=-1)``; use
    ``max_plate_nesting=1``. Params ``start``, ``trans``, ``locs``, ``scales`` are created on
    the first call from ``init`` (cloned) or :func:`init_params` ``(data, K, seed=0)``.

    Args:
        data: ``(N, T, D)`` float observations (``(T, D)`` is treated as ``N = 1``).
        K: number of hidden states.
        init: optional dict of initial (constrained) param values.

    Example::

        >>> data, truth = sample_gaussian_hmm(N=2, T=10, K=3, D=2, seed=0)
        >>> pyro.clear_param_store()
        >>> elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        >>> log_px = -elbo.loss(gaussian_hmm_markov, lambda *a, **k: None, data, 3, truth)
    """
    data = _as_gaussian_data(data)
    N, T, _ = data.shape
    start, trans, locs, scales = _gaussian_params(data, K, init)
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = start if z is None else trans[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(locs[z], scales[z]).to_event(1), obs=data[:, t])


def gaussian_hmm(data: Tensor, K: int, init: Mapping[str, Tensor] | None = None) -> None:
    """Gaussian HMM, vectorized :class:`~pyro.distributions.DiscreteHMM` form (long chains).

    Same model and params as :func:`gaussian_hmm_markov`; a single observed site ``"x"``
    (value ``data``, event shape ``(T, D)``) inside ``pyro.plate("sequences", N, dim=-1)``,
    with observation distribution ``Normal(locs, scales).to_event(1)`` (batch ``K``), as
    :class:`~pyro_emvae.distributions.HomogeneousHMM` ``(log start, log trans)``: the
    ``DiscreteHMM`` of :func:`discrete_hmm_logits` (exact ``z_0 ~ start``). No latent sample site:
    the hidden chain is marginalized inside ``DiscreteHMM.log_prob``, so
    ``poutine.trace(gaussian_hmm).get_trace(data, K).log_prob_sum()`` is ``log p(x)``.

    Args:
        data: ``(N, T, D)`` float observations (``(T, D)`` is treated as ``N = 1``).
        K: number of hidden states.
        init: optional dict of initial (constrained) param values.

    Example::

        >>> data, truth = sample_gaussian_hmm(N=4, T=1000, K=3, D=2, seed=0)
        >>> pyro.clear_param_store()
        >>> tr = pyro.poutine.trace(gaussian_hmm).get_trace(data, 3, truth)
        >>> log_px = tr.log_prob_sum()
    """
    data = _as_gaussian_data(data)
    N, T, _ = data.shape
    start, trans, locs, scales = _gaussian_params(data, K, init)
    obs_dist = dist.Normal(locs, scales).to_event(1)
    with pyro.plate("sequences", N, dim=-1):
        pyro.sample("x", HomogeneousHMM(start.log(), trans.log(), obs_dist, T), obs=data)


# --------------------------------------------------------------------------------------------
# Categorical emissions
# --------------------------------------------------------------------------------------------


def _categorical_params(
    data: Tensor, K: int, M: int | None, init: Mapping[str, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = torch.get_default_dtype()
    lazy = _lazy_init(init, dtype, lambda: init_params(data, K, "categorical", M=M, seed=0))
    start, trans = _chain_params(lazy)
    emission_probs = pyro.param(
        "emission_probs", lazy("emission_probs"), constraint=constraints.simplex
    )
    return start, trans, emission_probs


def categorical_hmm_markov(
    data: Tensor, K: int, M: int | None = None, init: Mapping[str, Tensor] | None = None
) -> None:
    """Categorical-emission HMM, ``pyro.markov`` loop form.

    ``z_0 ~ Categorical(start)``, ``z_t ~ Categorical(trans[z_{t-1}])``,
    ``x_t ~ Categorical(emission_probs[z_t])``. Sites ``"z_t"`` (enumerated) and ``"x_t"``
    (observed ``data[:, t]``) inside ``pyro.plate("sequences", N, dim=-1)``;
    ``max_plate_nesting=1``. Params ``start``, ``trans``, ``emission_probs`` ``(K, M)``.

    Args:
        data: ``(N, T)`` integer symbols in ``[0, M)`` (``(T,)`` is treated as ``N = 1``).
        K: number of hidden states.
        M: number of symbols; only used to build the default init (default
            ``data.max() + 1``).
        init: optional dict of initial (constrained) param values.

    Example::

        >>> data, truth = sample_categorical_hmm(N=2, T=10, K=2, M=4, seed=0)
        >>> pyro.clear_param_store()
        >>> elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        >>> log_px = -elbo.loss(categorical_hmm_markov, lambda *a, **k: None, data, 2, 4, truth)
    """
    data = _as_categorical_data(data)
    N, T = data.shape
    start, trans, emission_probs = _categorical_params(data, K, M, init)
    with pyro.plate("sequences", N, dim=-1):
        z = None
        for t in pyro.markov(range(T)):
            probs = start if z is None else trans[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Categorical(emission_probs[z]), obs=data[:, t])


def categorical_hmm(
    data: Tensor, K: int, M: int | None = None, init: Mapping[str, Tensor] | None = None
) -> None:
    """Categorical-emission HMM, vectorized :class:`~pyro.distributions.DiscreteHMM` form.

    Same model and params as :func:`categorical_hmm_markov`; a single observed site ``"x"``
    (value ``data``, event shape ``(T,)``) inside ``pyro.plate("sequences", N, dim=-1)``
    with observation distribution ``Categorical(emission_probs)`` (batch ``K``), as
    :class:`~pyro_emvae.distributions.HomogeneousHMM` ``(log start, log trans)``.

    Args:
        data: ``(N, T)`` integer symbols in ``[0, M)`` (``(T,)`` is treated as ``N = 1``).
        K: number of hidden states.
        M: number of symbols (default init only; default ``data.max() + 1``).
        init: optional dict of initial (constrained) param values.

    Example::

        >>> data, truth = sample_categorical_hmm(N=4, T=500, K=2, M=4, seed=0)
        >>> pyro.clear_param_store()
        >>> log_px = pyro.poutine.trace(categorical_hmm).get_trace(
        ...     data, 2, 4, truth).log_prob_sum()
    """
    data = _as_categorical_data(data)
    N, T = data.shape
    start, trans, emission_probs = _categorical_params(data, K, M, init)
    obs_dist = dist.Categorical(emission_probs)
    with pyro.plate("sequences", N, dim=-1):
        pyro.sample("x", HomogeneousHMM(start.log(), trans.log(), obs_dist, T), obs=data)


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def _sample_chain(gen: torch.Generator, start: Tensor, trans: Tensor, N: int, T: int) -> Tensor:
    """States ``(N, T)`` long of ``N`` independent chains."""
    z = torch.empty(N, T, dtype=torch.long)
    z[:, 0] = torch.multinomial(start, N, replacement=True, generator=gen)
    for t in range(1, T):
        z[:, t] = torch.multinomial(trans[z[:, t - 1]], 1, generator=gen).squeeze(-1)
    return z


def _true_chain(gen: torch.Generator, K: int, stickiness: float) -> tuple[Tensor, Tensor]:
    dtype = torch.get_default_dtype()
    start = 0.5 / K + 0.5 * _random_simplex(gen, K, dtype=dtype)
    trans = stickiness * torch.eye(K, dtype=dtype) + (1 - stickiness) * _random_simplex(
        gen, K, K, dtype=dtype
    )
    return start, trans


def sample_gaussian_hmm(
    N: int,
    T: int,
    K: int,
    D: int,
    seed: int = 0,
    stickiness: float = 0.8,
    separation: float = 3.0,
    return_states: bool = False,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], Tensor]:
    """Draw ``N`` sequences of length ``T`` from a Gaussian HMM with known random params.

    True params (seeded ``torch.Generator``, default dtype): ``start = (1/K + Dirichlet(1))/2``,
    ``trans = stickiness * I + (1 - stickiness) * Dirichlet(1) rows``,
    ``locs ~ N(0, separation^2)`` ``(K, D)``, ``scales ~ U[0.5, 1.5]`` ``(K, D)``.

    Returns:
        ``(data, params)`` with ``data`` ``(N, T, D)`` and ``params`` keyed ``start``,
        ``trans``, ``locs``, ``scales``; plus the states ``(N, T)`` long if ``return_states``.

    Example::

        >>> data, truth = sample_gaussian_hmm(N=2, T=100, K=3, D=2, seed=0)
        >>> data.shape
        torch.Size([2, 100, 2])
    """
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    start, trans = _true_chain(gen, K, stickiness)
    locs = separation * torch.randn(K, D, generator=gen, dtype=dtype)
    scales = 0.5 + torch.rand(K, D, generator=gen, dtype=dtype)
    z = _sample_chain(gen, start, trans, N, T)
    data = locs[z] + scales[z] * torch.randn(N, T, D, generator=gen, dtype=dtype)
    params = {"start": start, "trans": trans, "locs": locs, "scales": scales}
    if return_states:
        return data, params, z
    return data, params


def sample_categorical_hmm(
    N: int,
    T: int,
    K: int,
    M: int,
    seed: int = 0,
    stickiness: float = 0.8,
    sharpness: float = 2.0,
    return_states: bool = False,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], Tensor]:
    """Draw ``N`` sequences of length ``T`` from a categorical HMM with known random params.

    ``start`` and ``trans`` as in :func:`sample_gaussian_hmm`;
    ``emission_probs = softmax(sharpness * N(0, 1))`` rows, shape ``(K, M)``.

    Returns:
        ``(data, params)`` with ``data`` ``(N, T)`` long symbols in ``[0, M)`` and ``params``
        keyed ``start``, ``trans``, ``emission_probs``; plus states ``(N, T)`` if
        ``return_states``.

    Example::

        >>> data, truth = sample_categorical_hmm(N=2, T=100, K=2, M=5, seed=0)
        >>> data.shape, data.dtype
        (torch.Size([2, 100]), torch.int64)
    """
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    start, trans = _true_chain(gen, K, stickiness)
    emission_probs = torch.softmax(sharpness * torch.randn(K, M, generator=gen, dtype=dtype), -1)
    z = _sample_chain(gen, start, trans, N, T)
    flat = torch.multinomial(emission_probs[z.reshape(-1)], 1, generator=gen)
    data = flat.reshape(N, T)
    params = {"start": start, "trans": trans, "emission_probs": emission_probs}
    if return_states:
        return data, params, z
    return data, params
