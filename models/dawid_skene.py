r"""The Dawid–Skene crowdsourcing model (Dawid & Skene 1979) as a plain Pyro model function.

Items ``i = 1..I`` have an unknown true class; annotators ``j = 1..J`` each label some items,
each with its own confusion matrix:

.. math::

    z_i \sim \mathrm{Categorical}(\pi), \qquad
    y_{ij} \mid z_i = k \sim \mathrm{Categorical}(\theta_j[k]), \qquad (i, j) \text{ observed}.

Params in Pyro's param store:

==============  =============  ===========================================================
name            shape          meaning
==============  =============  ===========================================================
``pi``          ``(K,)``       class prevalences (simplex)
``confusion``   ``(J, K, K)``  ``confusion[j, k, l] = p(annotator j says l | true class k)``
                               (rows on the simplex)
==============  =============  ===========================================================

Labels are an ``(I, J)`` int64 tensor with a boolean ``observed`` mask of the same shape;
missing labels hold any valid class (0 by convention) and are masked out of the likelihood with
``Distribution.mask``, so they drop out of ``log p(y)`` exactly. The latent ``"z"`` lives in
``pyro.plate("items", I, dim=-2)`` and is enumerated in parallel; the labels ``"y"`` live in
``pyro.plate("annotators", J, dim=-1)`` inside it (``max_plate_nesting=2``). Both params have
closed-form M-steps (the Categorical rule): ``EMOptim`` runs classic Dawid–Skene EM.

Example::

    from pyro_emvae import ExactEStep, fit
    from models.dawid_skene import dawid_skene_model, init_params, sample_dawid_skene

    labels, observed, truth = sample_dawid_skene(500, 10, 3, seed=0, p_missing=0.3)
    pyro.clear_param_store()
    model = lambda y, m: dawid_skene_model(y, m, 3, init=init_params(y, m, 3))
    result = fit(model, ExactEStep(model), labels, observed)
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = [
    "dawid_skene_model",
    "init_params",
    "majority_vote",
    "sample_dawid_skene",
]


def _check(labels: Tensor, observed: Tensor) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (items, annotators), got {tuple(labels.shape)}")
    if observed.shape != labels.shape or observed.dtype != torch.bool:
        raise ValueError("observed must be a boolean tensor of the labels' shape")


def majority_vote(labels: Tensor, observed: Tensor, K: int) -> Tensor:
    """Per-item vote counts ``(I, K)`` normalised to proportions (uniform for an item nobody
    labelled). ``.argmax(-1)`` is the majority vote, ties broken towards the smaller class.

    Example::

        >>> majority_vote(torch.tensor([[0, 1, 1]]), torch.ones(1, 3, dtype=bool), 2)
        tensor([[0.3333, 0.6667]])
    """
    _check(labels, observed)
    dtype = torch.get_default_dtype()
    counts = torch.nn.functional.one_hot(labels.clamp(0, K - 1), K).to(dtype)
    counts = (counts * observed.unsqueeze(-1).to(dtype)).sum(1)
    total = counts.sum(-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1.0 / K))


def init_params(
    labels: Tensor, observed: Tensor, K: int, smoothing: float = 0.01
) -> dict[str, Tensor]:
    """Dawid & Skene's own start: one M-step from the majority-vote proportions (soft counts,
    with ``smoothing`` pseudo-counts so that no entry is exactly zero).

    Returns:
        ``{"pi": (K,), "confusion": (J, K, K)}``.

    Example::

        >>> from models.dawid_skene import init_params, sample_dawid_skene
        >>> labels, observed, truth = sample_dawid_skene(20, 4, K=3, seed=0)
        >>> init = init_params(labels, observed, K=3)
        >>> init["pi"].shape, init["confusion"].shape  # (K,), (J, K, K): rows sum to one
        (torch.Size([3]), torch.Size([4, 3, 3]))
    """
    _check(labels, observed)
    dtype = torch.get_default_dtype()
    T = majority_vote(labels, observed, K)  # (I, K)
    pi = T.sum(0) + smoothing
    onehot = torch.nn.functional.one_hot(labels.clamp(0, K - 1), K).to(dtype)
    onehot = onehot * observed.unsqueeze(-1).to(dtype)  # (I, J, L)
    conf = torch.einsum("ik,ijl->jkl", T, onehot) + smoothing
    return {"pi": pi / pi.sum(), "confusion": conf / conf.sum(-1, keepdim=True)}


def dawid_skene_model(
    labels: Tensor, observed: Tensor, K: int, init: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Pyro model of Dawid–Skene over ``labels`` ``(I, J)`` with mask ``observed`` ``(I, J)``.

    Sites: ``"z"`` (latent true class, ``Categorical(pi)``, enumerated, in the ``"items"``
    plate at ``dim=-2``) and ``"y"`` (observed labels, in the ``"annotators"`` plate at
    ``dim=-1``, masked by ``observed``). Params are created on the first call from ``init``
    (or :func:`init_params`); later calls read the param store.

    Returns:
        the value of ``z``.

    :math:`z_i \\sim \\mathrm{Categorical}(\\pi)`, :math:`y_{ij} \\mid z_i = k \\sim
    \\mathrm{Categorical}(C_{j,k,:})` for the observed labels, with :math:`C_j` the ``(K, K)``
    confusion matrix of annotator :math:`j`.

    Example::

        >>> from pyro_emvae import ExactEStep, fit
        >>> from models.dawid_skene import dawid_skene_model, majority_vote, sample_dawid_skene
        >>> labels, observed, truth = sample_dawid_skene(100, 5, K=3, seed=0)
        >>> model = lambda: dawid_skene_model(labels, observed, K=3)
        >>> result = fit(model, ExactEStep(model), tol=1e-4)
        >>> z = ExactEStep(model).map()["z"].flatten()  # each item's most probable class
        >>> em = (z == truth["z"]).double().mean()
        >>> vote = (majority_vote(labels, observed, 3).argmax(-1) == truth["z"]).double().mean()
        >>> bool(em >= vote)
        True
    """
    _check(labels, observed)
    I, J = labels.shape
    if init is None:
        init = init_params(labels, observed, K)
    pi = pyro.param("pi", lambda: init["pi"].detach().clone(), constraint=constraints.simplex)
    confusion = pyro.param(
        "confusion", lambda: init["confusion"].detach().clone(), constraint=constraints.simplex
    )
    annotators = torch.arange(J)
    with pyro.plate("items", I, dim=-2):
        z = pyro.sample("z", dist.Categorical(pi), infer={"enumerate": "parallel"})
        with pyro.plate("annotators", J, dim=-1):
            probs = confusion[annotators, z]  # (..., 1 or I, J, K)
            pyro.sample("y", dist.Categorical(probs).mask(observed), obs=labels)
    return z


def sample_dawid_skene(
    n_items: int,
    n_annotators: int,
    K: int,
    seed: int = 0,
    p_missing: float = 0.0,
    accuracy: tuple[float, float] = (0.55, 0.9),
    n_adversarial: int = 0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Synthetic crowdsourcing data with known truth (seeded generator; global RNG untouched).

    Annotator ``j`` is correct with probability ``a_j ~ Uniform(accuracy)`` and otherwise picks
    one of the other classes with random (Dirichlet(1)) preferences per true class. The first
    ``n_adversarial`` annotators are *adversarial*: their confusion matrix is a permutation
    (class ``k`` is labelled ``k + 1 mod K``) with probability ``a_j``. Each label is missing
    independently with probability ``p_missing`` (every item keeps at least one label).

    Returns:
        ``(labels, observed, truth)``: ``labels`` ``(I, J)`` int64 (0 where missing),
        ``observed`` ``(I, J)`` bool, and ``truth = {"pi", "confusion", "z"}``.

    Example::

        >>> from models.dawid_skene import sample_dawid_skene
        >>> labels, observed, truth = sample_dawid_skene(10, 3, K=4, seed=0, p_missing=0.3)
        >>> labels.shape, observed.dtype, truth["confusion"].shape, bool(observed.any(1).all())
        (torch.Size([10, 3]), torch.bool, torch.Size([3, 4, 4]), True)
    """
    dtype = torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    I, J = n_items, n_annotators
    e = -torch.rand(K, generator=gen, dtype=dtype).clamp_min(1e-12).log()
    pi = 0.5 / K + 0.5 * e / e.sum()
    lo, hi = accuracy
    acc = lo + (hi - lo) * torch.rand(J, generator=gen, dtype=dtype)
    e = -torch.rand(J, K, K, generator=gen, dtype=dtype).clamp_min(1e-12).log()
    eye = torch.eye(K, dtype=dtype)
    off = e * (1 - eye)
    off = off / off.sum(-1, keepdim=True).clamp_min(1e-300)
    conf = acc[:, None, None] * eye + (1 - acc[:, None, None]) * off
    if K > 1:
        shift = torch.roll(eye, 1, dims=1)  # row k has its 1 at k + 1
        for j in range(min(n_adversarial, J)):
            conf[j] = acc[j] * shift + (1 - acc[j]) * (1 - shift) / (K - 1)
    z = torch.multinomial(pi, I, replacement=True, generator=gen)
    probs = conf[torch.arange(J), z[:, None]]  # (I, J, K)
    labels = torch.multinomial(probs.reshape(-1, K), 1, generator=gen).view(I, J)
    observed = torch.rand(I, J, generator=gen) >= p_missing
    first = torch.randint(J, (I,), generator=gen)
    observed[torch.arange(I), first] = True
    labels = torch.where(observed, labels, torch.zeros_like(labels))
    return labels, observed, {"pi": pi, "confusion": conf, "z": z}
