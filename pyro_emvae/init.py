"""Initialization strategies for EM, for any model an :class:`~pyro_emvae.ExactEStep` handles.

Each strategy is one E-step in which every observed site's log-likelihood is replaced by an
*init potential* over the enumerated latents it depends on, followed by one M-step. The
posterior of that E-step combines the model's own prior over the latents (its mixture weights,
its Markov chain) with the potentials, so the responsibilities are consistent for mixtures and
chains alike:

* ``"random"`` (scikit-learn's ``init_params='random'``): i.i.d. potentials
  :math:`\\log u,\\ u \\sim \\mathrm{Uniform}(0, 1)`: random soft responsibilities.
* ``"kmeans++"``: K centers picked from the observed points by k-means++ seeding
  (each next center drawn with probability proportional to its squared distance from the
  nearest chosen one), then each point assigned to its nearest center (hard
  responsibilities), as scikit-learn's ``'k-means++'``. Integer values (counts, binary
  vectors) are seeded on as real vectors; category labels (a ``Categorical`` site, whose
  values have no distance) get random potentials, and so does a site that depends on more
  than one enumerated latent (a :class:`KMeansFallbackWarning` says so): its potentials would
  have to split K centers between the latents, which k-means++ cannot say how to do.
* ``"model"``: the model's own ``pyro.param`` initial values (no E-step).

An implicit latent's site (:func:`~pyro_emvae.estep.is_implicit`) that declares the shape of
the potentials it can take (``implicit_override_shape(value)``) gets random ones: a
:class:`~pyro_emvae.distributions.PCFG`'s words are labels, so both strategies give it random
tag potentials ``(*batch, L, PT)`` in place of its emission log-probabilities, and the first
E-step's parse posterior (under the model's own root and rule probabilities) is random. One
without it (a CTC, whose emissions come from a network) keeps its likelihood.

The potentials are drawn in a floating dtype whatever the observed values' dtype: the
value's own if it is real, else the dtype of the site distribution's parameters (the
log-likelihood the potentials replace has that dtype), else torch's default.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro.distributions import DiscreteHMM

from pyro_emvae.errors import KMeansFallbackWarning

__all__ = ["STRATEGIES", "KMeansFallbackWarning", "init_potentials", "kmeans_pp_centers"]

STRATEGIES = ("model", "random", "kmeans++")
_HARD = -1e4  # log-potential of a non-nearest center: a hard assignment without -inf


def kmeans_pp_centers(points: torch.Tensor, k: int, generator=None) -> torch.Tensor:
    """k-means++ seeding: ``k`` rows of ``points (n, d)``, the first uniformly at random, each
    next one with probability proportional to its squared distance to the nearest chosen."""
    n = points.size(0)
    if n < k:
        raise ValueError(f"k-means++ needs at least K={k} observed points, got {n}")
    first = torch.randint(n, (1,), generator=generator, device=points.device)
    centers = [points[first[0]]]
    d2 = ((points - centers[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        nxt = torch.multinomial(probs, 1, generator=generator)[0]
        centers.append(points[nxt])
        d2 = torch.minimum(d2, ((points - points[nxt]) ** 2).sum(-1))
    return torch.stack(centers)


def _lp_shape(site: dict) -> torch.Size:
    fn, value = site["fn"], site["value"]
    return torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])


def init_potentials(
    strategy: str, depth: int, generator=None, centers: dict | None = None
) -> Callable:
    """The ``potentials(name, site)`` callback of ``strategy`` for
    :meth:`ExactEStep.posterior <pyro_emvae.estep.ExactEStep.posterior>` (``depth`` is the
    model's max_plate_nesting). ``centers``, a dict, keeps each site's k-means++ centers from
    the first call, so that every minibatch of a stream is assigned to the centers seeded on
    the first one."""
    if strategy not in ("random", "kmeans++"):
        raise ValueError(f"unknown init strategy {strategy!r}; choose one of {STRATEGIES}")

    warned: set[str] = set()  # one warning per site, not one per minibatch of a stream

    def random_like(shape, like):
        u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
        return u.clamp_min(1e-12).log()

    def potentials(name: str, site: dict):
        fn, value = site["fn"], site["value"]
        override_shape = getattr(fn, "implicit_override_shape", None)
        if callable(override_shape):  # an implicit latent's observations (a PCFG's word tags)
            shape, like = override_shape(value)
            return random_like(shape, like)
        if isinstance(fn, DiscreteHMM):
            obs = fn.observation_dist
            t, k = value.shape[-1 - obs.event_dim], obs.batch_shape[-1]
            batch = value.shape[: value.dim() - 1 - obs.event_dim]
            shape = batch + (t, k)
            like = _float_like(fn, value)
            if strategy == "kmeans++" and not _is_label(obs):
                points = value.to(like.dtype).reshape(batch + (t, -1))
                return _nearest(points, k, generator, centers, name)
            return random_like(shape, like)
        shape = _lp_shape(site)
        enum = [i for i, s in enumerate(shape) if i < len(shape) - depth and s > 1]
        if not enum:
            return None  # the site does not depend on a latent: keep its likelihood
        like = _float_like(fn, value)
        if strategy == "random" or _is_label(fn):
            return random_like(shape, like)
        if len(enum) != 1:
            if name not in warned:
                warned.add(name)
                warnings.warn(
                    f"init='kmeans++': observed site '{name}' depends on {len(enum)} enumerated "
                    f"latents (log-prob shape {tuple(shape)}); k-means++ seeds the clusters of "
                    "one latent and cannot split them between several, so this site gets "
                    "random potentials, as with init='random'",
                    KMeansFallbackWarning,
                    stacklevel=2,
                )
            return random_like(shape, like)
        k = shape[enum[0]]
        batch = value.shape[: value.dim() - fn.event_dim]
        points = value.to(like.dtype).reshape(batch + (math.prod(value.shape[len(batch) :]),))
        pot = _nearest(points, k, generator, centers, name)  # batch + (K,)
        pot = pot.movedim(-1, 0)
        target = (k,) + (1,) * (len(shape) - enum[0] - 1 - len(batch)) + tuple(batch)
        return pot.reshape(target).expand(shape[enum[0] :])

    return potentials


def _base(fn):
    """The innermost distribution under Independent / Expanded / Masked wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _is_label(fn) -> bool:
    """Whether the site's values are category labels (no distance between them)."""
    return isinstance(_base(fn), torch.distributions.Categorical)


def _float_like(fn, value: torch.Tensor) -> torch.Tensor:
    """A tensor with the floating dtype (and device) the potentials take: the value's own if
    it is real; for integer values (counts, labels) the first floating parameter of the site's
    distribution, whose log-prob the potentials replace; else torch's default dtype."""
    if value.is_floating_point():
        return value
    if isinstance(fn, DiscreteHMM):
        return fn.transition_logits
    d = fn
    while d is not None:
        for arg in getattr(d, "arg_constraints", {}):
            # __dict__, not getattr: a lazy parameter (Categorical's probs from its logits)
            # is not computed just to read a dtype
            t = d.__dict__.get(arg)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t
        d = getattr(d, "base_dist", None)
    return torch.empty((), device=value.device)


def _nearest(points: torch.Tensor, k: int, generator, cache=None, key=None) -> torch.Tensor:
    """Hard log-potentials ``(*batch, K)``: 0 at each point's nearest k-means++ center (the
    centers are seeded on these points, or taken from ``cache[key]`` if an earlier call put
    them there)."""
    if cache is not None and key in cache:
        centers = cache[key]
    else:
        centers = kmeans_pp_centers(points.reshape(-1, points.size(-1)), k, generator)
        if cache is not None:
            cache[key] = centers
    d2 = ((points.unsqueeze(-2) - centers) ** 2).sum(-1)
    nearest = d2.argmin(-1, keepdim=True)
    pot = torch.full_like(d2, _HARD)
    return pot.scatter(-1, nearest, 0.0)
