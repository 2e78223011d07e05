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
  responsibilities), as scikit-learn's ``'k-means++'``. Sites whose values are not real vectors
  (counts, categories) get random potentials.
* ``"model"``: the model's own ``pyro.param`` initial values (no E-step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import DiscreteHMM

__all__ = ["STRATEGIES", "init_potentials", "kmeans_pp_centers"]

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

    def random_like(shape, like):
        u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
        return u.clamp_min(1e-12).log()

    def potentials(name: str, site: dict):
        fn, value = site["fn"], site["value"]
        if isinstance(fn, DiscreteHMM):
            obs = fn.observation_dist
            t, k = value.shape[-1 - obs.event_dim], obs.batch_shape[-1]
            batch = value.shape[: value.dim() - 1 - obs.event_dim]
            shape = batch + (t, k)
            like = fn.transition_logits
            if strategy == "kmeans++" and value.is_floating_point():
                points = value.reshape(batch + (t, -1))
                return _nearest(points, k, generator, centers, name)
            return random_like(shape, like)
        shape = _lp_shape(site)
        enum = [i for i, s in enumerate(shape) if i < len(shape) - depth and s > 1]
        if not enum:
            return None  # the site does not depend on a latent: keep its likelihood
        if strategy == "random" or len(enum) != 1 or not value.is_floating_point():
            return random_like(shape, value)
        k = shape[enum[0]]
        batch = value.shape[: value.dim() - fn.event_dim]
        points = value.reshape(batch + (math.prod(value.shape[len(batch) :]),))
        pot = _nearest(points, k, generator, centers, name)  # batch + (K,)
        pot = pot.movedim(-1, 0)
        target = (k,) + (1,) * (len(shape) - enum[0] - 1 - len(batch)) + tuple(batch)
        return pot.reshape(target).expand(shape[enum[0] :])

    return potentials


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
