"""Closed-form M-step rules, registered per distribution family.

Each rule reads one model site (its distribution, whose arguments :mod:`pyro_emvae.track` has
traced back to param elements, its value, and the exact posterior weight of every position) and
adds weighted expected sufficient statistics into :class:`Stats`: one vector per kind of
statistic over the probe's global id space, filled by ``index_add_`` at the ids of the param
element each position uses. Positions that share a param element (a scale shared by all
components, the rows of a transition matrix, a tied covariance) therefore pool their statistics
by construction, and statistics are additive: ``summarize(A) + summarize(B) = summarize(A ∪ B)``.

The maximization runs in two stages (ECM): stage 0 updates location-like arguments
(means, rates, probabilities) given the current scales; stage 1 updates scales and covariances
given the new locations. Each stage is an exact conditional maximization of
:math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]`, so the pair never lowers it.

=======================  =============================  ====================================
family                   argument (a selection of a      closed form
                         param, see ``track``)
=======================  =============================  ====================================
Categorical              probs (or logits = log p)       p ∝ Σ w [z = k] (+ α − 1)
OneHotCategorical        probs (or logits = log p)       same, value one-hot
Multinomial              probs                           p ∝ Σ w x
Bernoulli                probs                           p = Σ w x / Σ w
Binomial (fixed n)       probs                           p = Σ w x / Σ w n
Poisson                  rate                            λ = Σ w x / Σ w
Exponential              rate                            λ = Σ w / Σ w x
Normal (and .to_event)   loc; scale                      μ = Σ wλx / Σ wλ; σ² = Σ w (x−μ)² / Σ w
MultivariateNormal       loc; scale_tril, covariance_    μ = Σ w x / Σ w (one covariance per loc
                         matrix or precision_matrix      row; else μ = (Σ w P)⁻¹ Σ w P x);
                                                         Σ = Σ w (x−μ)(x−μ)ᵀ / Σ w + reg_covar·I
DiscreteHMM              transition / initial logits     Baum–Welch counts from pairwise
                         (log form); observation_dist    marginals; emissions by their rule
=======================  =============================  ====================================

Each updated argument has a role (:data:`ROLES`): a param reaching two roles, or whose
constraint its role's update cannot respect (:func:`constraint_problem`), takes gradient steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from torch.distributions import constraints

from pyro_emvae.kernels import outer_scatter
from pyro_emvae.track import Tracked

__all__ = [
    "HANDLED",
    "ROLES",
    "RULES",
    "Stats",
    "constraint_bounds",
    "constraint_problem",
    "leaves",
    "register",
    "roles_of",
    "summarize_site",
    "unhandled_params",
    "uses",
]


@dataclass
class Stats:
    """Additive sufficient statistics: ``sums[kind]`` is a vector over the global id space.

    ``used[id]`` marks ids that some rule can update in closed form; ``opaque`` collects params
    some site uses in a way no rule covers (they are left to gradient steps).
    """

    size: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    forms: dict[int, str] = field(default_factory=dict)
    # ids some site reached, per kind (a reached element with zero weight is an empty component)
    touched: dict[str, torch.Tensor] = field(default_factory=dict)
    # MultivariateNormal loc params each of whose rows meets one covariance only (EMOptim.plan
    # finds them): their update is the plain weighted mean; any other loc is precision-weighted
    plain_locs: frozenset = frozenset()

    def add(self, kind: str, ids: torch.Tensor, *factors: torch.Tensor) -> None:
        """``sums[kind][ids] += prod(factors)``, summed over positions sharing an id.

        The dims along which ``ids`` is broadcast (stride 0: every position there uses the same
        param entry, e.g. the data plate for a component's mean) are contracted by ``einsum``
        before the scatter, so the full product is never materialized (a (K, N, D, D)
        covariance statistic is computed as ``einsum('kn,kni,knj->kij')``). Only the dims
        some factor varies along get a subscript, in einsum's integer (sublist) form: a site
        under any number of enumerated dims (30 global latents) is fine.
        """
        # integer observations (Long counts) enter the sums in the weights' floating dtype
        dtype = next((f.dtype for f in factors if f.is_floating_point()), None)
        if dtype is not None:
            factors = tuple(f if f.is_floating_point() else f.to(dtype) for f in factors)
        shape = torch.broadcast_shapes(ids.shape, *(f.shape for f in factors))
        ids = ids.expand(shape)
        pooled = [d for d in range(len(shape)) if ids.stride(d) == 0 and shape[d] > 1]
        kept = [d for d in range(len(shape)) if d not in pooled]
        sub: dict[int, int] = {}  # tensor dim -> einsum subscript
        operands: list = []
        for f in factors:
            f = f.reshape((1,) * (len(shape) - f.dim()) + f.shape)
            dims = [d for d in range(len(shape)) if f.shape[d] > 1]
            for d in dims:
                sub.setdefault(d, len(sub))
            operands += [f.reshape([f.shape[d] for d in dims]), [sub[d] for d in dims]]
        out_dims = [d for d in kept if d in sub]
        values = torch.einsum(*operands, [sub[d] for d in out_dims])
        # a pooled dim no factor carries repeats the same value shape[d] times
        repeats = math.prod(shape[d] for d in pooled if d not in sub)
        if repeats != 1:
            values = values * repeats
        values = values.reshape([shape[d] if d in out_dims else 1 for d in kept])
        index = tuple(slice(None) if d in kept else slice(0, 1) for d in range(len(shape)))
        ids = ids[index].reshape([shape[d] for d in kept]).to(values.device)
        ids, values = torch.broadcast_tensors(ids, values)
        vec = self.sums.get(kind)
        if vec is None:
            vec = self.sums[kind] = torch.zeros(
                self.length(kind), dtype=values.dtype, device=values.device
            )
        vec.index_add_(0, ids.reshape(-1), values.reshape(-1))
        seen = self.touched.get(kind)
        if seen is None:
            seen = self.touched[kind] = torch.zeros(
                self.length(kind), dtype=torch.bool, device=vec.device
            )
        seen[ids.reshape(-1)] = True

    def length(self, kind: str) -> int:
        """The length of ``sums[kind]``: the id space, times ``w`` for a kind named ``"name:w"``
        (``w`` entries per id: the rows of a D x D matrix statistic indexed by a vector's ids)."""
        _, _, width = kind.partition(":")
        return self.size * (int(width) if width else 1)

    def add_(self, other: Stats, alpha: float = 1.0) -> Stats:
        """``self += alpha * other`` in place (a streaming pass accumulates batch by batch
        without copies; online EM blends with ``alpha``); returns ``self``."""
        for k, v in other.sums.items():
            mine = self.sums.get(k)
            if mine is None:
                self.sums[k] = v * alpha if alpha != 1.0 else v.clone()
            else:
                mine.add_(v, alpha=alpha)
        for k, v in other.touched.items():
            mine = self.touched.get(k)
            self.touched[k] = v.clone() if mine is None else mine | v
        self.forms.update(other.forms)
        return self

    def scale_(self, factor: float) -> Stats:
        """Multiply every statistic by ``factor`` in place; returns ``self``."""
        for v in self.sums.values():
            v.mul_(factor)
        return self

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.size).add_(self).add_(other)


# A rule: rule(fn, value, weight, stats, stage, current) with ``weight`` broadcastable to
# fn.log_prob(value); ``current(t)`` gives the current value of a (tracked) argument.
Rule = Callable[..., None]
RULES: dict[type, Rule] = {}


def register(*families: type) -> Callable[[Rule], Rule]:
    """Register a closed-form rule for distribution families (as Pyro's KL registry does)."""

    def deco(rule: Rule) -> Rule:
        for f in families:
            RULES[f] = rule
        return rule

    return deco


def _one(t: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=t.dtype, device=t.device)


def _tracked(fn, *names: str) -> dict[str, Tracked]:
    return {n: fn.__dict__[n] for n in names if isinstance(fn.__dict__.get(n), Tracked)}


def summarize_site(fn, value, weight, stats: Stats, stage: int, current) -> bool:
    """Add this site's statistics for ``stage``; False if no rule covers the family."""
    while True:
        if isinstance(fn, dist.Independent):
            for _ in range(fn.reinterpreted_batch_ndims):
                weight = weight.unsqueeze(-1)
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            mask = torch.as_tensor(fn._mask, device=weight.device)  # (a bool mask too)
            for _ in range(fn.event_dim):
                mask = mask.unsqueeze(-1)
            weight = weight * mask
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            break
    rule = RULES.get(type(fn))
    if rule is None:
        return False
    rule(fn, value, weight, stats, stage, current)
    return True


def _value_index(fn, value: torch.Tensor) -> torch.Tensor:
    if isinstance(fn, dist.OneHotCategorical):
        return value.argmax(-1)
    return value.long()


@register(dist.Categorical, dist.OneHotCategorical)
def _categorical(fn, value, weight, stats, stage, current) -> None:
    if stage != 0:
        return
    src = fn._categorical if isinstance(fn, dist.OneHotCategorical) else fn
    arg = _tracked(src, "probs", "logits", "_param")
    t = next(iter(arg.values()), None)
    if t is None or t.form not in ("normalized", "log"):
        return
    k = _value_index(fn, value)
    shape = torch.broadcast_shapes(t.shape[:-1], k.shape)
    ids = t.ids.expand(shape + t.shape[-1:]).gather(-1, k.expand(shape).unsqueeze(-1))
    stats.add("count", ids.squeeze(-1), weight)
    stats.add("rowmark", t.ids, _one(t))
    stats.forms[int(t.ids[(0,) * t.ids.dim()])] = "simplex"


@register(dist.Multinomial)
def _multinomial(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn._categorical, "probs", "logits", "_param")
    t = next(iter(t.values()), None)
    if stage != 0 or t is None or t.form not in ("normalized", "log"):
        return
    stats.add("count", t.ids, weight.unsqueeze(-1), value)
    stats.add("rowmark", t.ids, _one(t))


@register(dist.Bernoulli, dist.Binomial)
def _bernoulli(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "probs").get("probs")
    if stage != 0 or t is None or t.form != "value":
        return
    n = fn.total_count if isinstance(fn, dist.Binomial) else _one(value)
    stats.add("mean_num", t.ids, weight, value)
    stats.add("mean_den", t.ids, weight, n)


@register(dist.Poisson)
def _poisson(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "rate").get("rate")
    if stage != 0 or t is None or t.form != "value":
        return
    stats.add("mean_num", t.ids, weight, value)
    stats.add("mean_den", t.ids, weight)


@register(dist.Exponential)
def _exponential(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "rate").get("rate")
    if stage != 0 or t is None or t.form != "value":
        return
    stats.add("mean_num", t.ids, weight)  # rate = Σw / Σwx
    stats.add("mean_den", t.ids, weight, value)


@register(dist.Normal)
def _normal(fn, value, weight, stats, stage, current) -> None:
    loc, scale = fn.__dict__.get("loc"), fn.__dict__.get("scale")
    if stage == 0 and isinstance(loc, Tracked) and loc.form == "value":
        prec = 1.0 / current(scale) ** 2
        stats.add("mean_num", loc.ids, weight, prec, value)
        stats.add("mean_den", loc.ids, weight, prec)
    if stage == 1 and isinstance(scale, Tracked) and scale.form == "value":
        ids, mu = _compact(scale.ids), current(loc)
        # a mixture's outer product (locs along the components, data along the plate): the
        # sums per component without the (K, N, D) residual, chunk by chunk
        fused = outer_scatter(weight, value, mu, ids.shape, event=0, outer=False)
        if fused is not None:
            den, num = fused
            stats.add("var_num", ids, num)
            stats.add("var_den", ids, den)
            return
        resid = value - mu
        stats.add("var_num", scale.ids, weight, resid**2)
        stats.add("var_den", scale.ids, weight)


@register(dist.MultivariateNormal)
def _mvn(fn, value, weight, stats, stage, current) -> None:
    loc = fn.__dict__.get("loc")
    mats = _tracked(fn, "_unbroadcasted_scale_tril", "covariance_matrix", "precision_matrix")
    if stage == 0 and isinstance(loc, Tracked) and loc.form == "value":
        if loc.param_names <= stats.plain_locs:
            # every position of a loc row shares one covariance (full, tied, diagonal models):
            # the maximizer is the weighted mean
            stats.add("mean_num", loc.ids, weight.unsqueeze(-1), value)
            stats.add("mean_den", loc.ids, weight.unsqueeze(-1))
        else:
            _mvn_loc_precision_weighted(fn, loc, mats, value, weight, stats, current)
    if stage == 1 and mats:
        key, mat = next(iter(mats.items()))
        if mat.form != "value":
            return
        mat = mat.expand(fn.batch_shape + mat.shape[-2:])  # one matrix per position
        ids, mu = _compact(mat.ids), current(loc)
        # a mixture's outer product: per-component scatter matrices chunk by chunk, without
        # the (K, N, D) residual (same formula, centred at each component's loc)
        fused = outer_scatter(weight, value, mu, ids.shape[:-2], event=1, outer=True)
        if fused is not None:
            den, num = fused
            stats.add("cov_num", ids, num)
            stats.add("cov_den", ids, den.unsqueeze(-1).unsqueeze(-1))
        else:
            resid = value - mu
            w = weight.unsqueeze(-1).unsqueeze(-1)
            stats.add("cov_num", mat.ids, w, resid.unsqueeze(-1), resid.unsqueeze(-2))
            stats.add("cov_den", mat.ids, w)
        kind = {"_unbroadcasted_scale_tril": "scale_tril"}.get(key, key)
        stats.forms[int(mat.ids[(0,) * mat.ids.dim()])] = kind  # no copy of the expanded ids
        stats.add("matmark", mat.ids, _one(mat))


def mvn_precision(fn, mats: dict, current) -> torch.Tensor:
    """The precision matrices of ``fn`` at the params' current values, in their own
    (unbroadcast) batch shape: from the tracked matrix argument if any, else from the
    distribution's own factor (data, or a function of params that take gradient steps)."""
    if mats:
        key, mat = next(iter(mats.items()))
        m = current(mat)
        if key == "precision_matrix":
            return m
        if key == "covariance_matrix":
            m = torch.linalg.cholesky(m)
        return torch.cholesky_inverse(m)
    return torch.cholesky_inverse(fn._unbroadcasted_scale_tril)


def rows_aligned(ids: torch.Tensor, offset: int) -> bool:
    """Whether the last dim of ``ids`` runs over whole rows of its param, in order (element
    ``a`` of every position is element ``a`` of some row of a param whose last dim is D)."""
    d = ids.shape[-1]
    rel = ids - offset
    return bool(((rel % d) == torch.arange(d, device=ids.device)).all())


def _mvn_loc_precision_weighted(fn, loc, mats, value, weight, stats, current) -> None:
    """A loc row met under different covariances (a loc shared by components of different
    covariances; a known covariance per datum): the maximizer of
    :math:`\\sum_n w_n (x_n - \\mu)^T P_n (x_n - \\mu)` is
    :math:`(\\sum_n w_n P_n)^{-1} \\sum_n w_n P_n x_n`, not the weighted mean. Statistics:
    ``mvn_pnum`` (the vector, at the loc's ids) and ``mvn_prec:D`` (the matrix: entry ``b`` of
    row ``a`` at ``id_a * D + b``); ``EMOptim.maximize`` solves the system per row."""
    d = value.shape[-1]
    ids = _compact(loc.ids)
    steps = torch.arange(d, device=ids.device)
    if not bool((ids - ids[..., :1] == steps).all()):  # (EMOptim.plan checks the rows)
        return
    prec = mvn_precision(fn, mats, current)
    w = weight.unsqueeze(-1).unsqueeze(-1)
    stats.add("mvn_pnum", loc.ids.unsqueeze(-1), w, prec, value.unsqueeze(-2))
    # (built on the compact ids, then broadcast: every position counts, none is copied)
    pair = (ids.unsqueeze(-1) * d + steps).expand(loc.ids.shape + (d,))
    stats.add(f"mvn_prec:{d}", pair, w, prec)


def _compact(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with every broadcast (stride-0) dim sliced to size 1."""
    return ids[
        tuple(
            slice(0, 1) if st == 0 and n > 1 else slice(None)
            for st, n in zip(ids.stride(), ids.shape)
        )
    ]


def _pool_time(ids: torch.Tensor, pair: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, weight)`` pieces whose ``Stats.add`` sums equal those of
    ``(ids.expand(pair.shape), pair)`` for a chain's transition ids ``(..., T, K, K)`` and
    pairwise posterior ``pair (*batch, T, K, K)``: the trailing time steps whose ids all equal
    the last step's (a homogeneous chain after a few distinct steps, e.g. ``z_0``'s start rows
    then ``trans``) are summed over time first, so that the ``(*batch, T, K, K)`` weights are not
    copied and scattered one element at a time.

    Example: ids of ``cat([start_rows (1, K, K), trans (T-1, K, K)])`` give two pieces, step 0
    as it is and ``pair[..., 1:, :, :].sum(-3)`` at ``trans``'s ids.
    """
    t_len = pair.size(-3)
    if ids.dim() < 3 or ids.size(-3) != t_len or t_len < 64:
        return [(ids.expand(pair.shape), pair)]
    flat = ids.movedim(-3, 0).reshape(t_len, -1)
    same = (flat == flat[-1:]).all(-1)  # (T,)
    head = t_len - int(same.flip(0).cumprod(0).sum())  # the steps before the equal tail
    pieces = [(ids[..., -1:, :, :], pair[..., head:, :, :].sum(-3, keepdim=True))]
    if head:
        pieces.append((ids[..., :head, :, :], pair[..., :head, :, :]))
    return pieces


@register(dist.DiscreteHMM)
def _discrete_hmm(fn, value, weight, stats, stage, current) -> None:
    """``weight`` here is the chain's pairwise posterior ``(*batch, T, K, K)``."""
    pair = weight
    trans = fn.__dict__.get("transition_logits")
    init = fn.__dict__.get("initial_logits")
    if stage == 0:
        if isinstance(trans, Tracked) and trans.form == "log":
            for ids, w in _pool_time(trans.ids, pair):
                stats.add("count", ids, w)
            stats.add("rowmark", trans.ids, _one(trans))
        if isinstance(init, Tracked) and init.form == "log":
            stats.add("count", init.ids, pair[..., 0, :, :].sum(-1))
            stats.add("rowmark", init.ids, _one(init))
    obs = fn.observation_dist
    marg = pair.sum(-2)  # (*batch, T, K)
    obs_value = value.unsqueeze(-1 - obs.event_dim)
    summarize_site(obs, obs_value, marg, stats, stage, current)


# the (argument, form) pairs each rule can update; any other tracked argument is an opaque use
HANDLED: dict[type, dict[str, set[str]]] = {
    dist.Categorical: {"probs": {"normalized"}, "logits": {"log"}, "_param": {"normalized", "log"}},
    dist.OneHotCategorical: {
        "probs": {"normalized"},
        "logits": {"log"},
        "_param": {"normalized", "log"},
    },
    dist.Bernoulli: {"probs": {"value"}, "_param": {"value"}},
    dist.Binomial: {"probs": {"value"}, "_param": {"value"}},
    dist.Poisson: {"rate": {"value"}},
    dist.Exponential: {"rate": {"value"}},
    dist.Normal: {"loc": {"value"}, "scale": {"value"}},
    dist.MultivariateNormal: {
        "loc": {"value"},
        "_unbroadcasted_scale_tril": {"value"},
        "scale_tril": {"value"},
        "covariance_matrix": {"value"},
        "precision_matrix": {"value"},
    },
    dist.DiscreteHMM: {"transition_logits": {"log"}, "initial_logits": {"log"}},
}


# what each rule writes into each argument it updates. A param reaching two roles has no closed
# form (the rules' statistics would mix: Normal(θ, θ), a rate that is also a loc), and a
# role decides which constraints its update can respect (see ``constraint_problem``)
ROLES: dict[type, dict[str, str]] = {
    dist.Categorical: {"probs": "probs", "logits": "probs", "_param": "probs"},
    dist.OneHotCategorical: {"probs": "probs", "logits": "probs", "_param": "probs"},
    dist.Bernoulli: {"probs": "probability", "_param": "probability"},
    dist.Binomial: {"probs": "probability", "_param": "probability"},
    dist.Poisson: {"rate": "rate"},
    dist.Exponential: {"rate": "rate"},
    dist.Normal: {"loc": "loc", "scale": "scale"},
    dist.MultivariateNormal: {
        "loc": "mvn_loc",
        "_unbroadcasted_scale_tril": "scale_tril",
        "scale_tril": "scale_tril",
        "covariance_matrix": "covariance_matrix",
        "precision_matrix": "precision_matrix",
    },
    dist.DiscreteHMM: {"transition_logits": "probs", "initial_logits": "probs"},
}

# torch's own Categorical sits inside OneHotCategorical and Multinomial (``_categorical``)
_ALIASES = {torch.distributions.Categorical: dist.Categorical}
_WRAPPERS = (dist.Independent, MaskedDistribution, dist.ExpandedDistribution)


def leaves(fn):
    """The distributions the rules read from a site's ``fn``, as :func:`summarize_site` reaches
    them: through ``Independent``, masks and ``expand``, and into a ``DiscreteHMM``'s
    ``observation_dist``."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    yield fn
    if isinstance(fn, dist.DiscreteHMM):
        yield from leaves(fn.observation_dist)


def uses(fn) -> list[tuple[Tracked, str | None]]:
    """Every tracked argument anywhere in ``fn``, each with the role of the rule that updates
    it, or None where no rule reads it in that form (another family, a wrong form, a
    distribution nested where no rule looks, such as a ``MixtureSameFamily``'s components)."""
    out: list[tuple[Tracked, str | None]] = []
    for leaf in leaves(fn):
        family = _ALIASES.get(type(leaf), type(leaf))
        _args(leaf, family, out)
    return out


def _args(leaf, family, out) -> None:
    handled, roles = HANDLED.get(family, {}), ROLES.get(family, {})
    for attr, value in vars(leaf).items():
        if isinstance(value, Tracked):
            ok = value.form in handled.get(attr, set()) and family in RULES
            out.append((value, roles.get(attr) if ok else None))
        elif isinstance(value, torch.distributions.Distribution):
            if isinstance(leaf, dist.DiscreteHMM) and attr == "observation_dist":
                continue  # a leaf of its own
            if attr == "_categorical" and family in (dist.OneHotCategorical, dist.Multinomial):
                _args(value, dist.Categorical, out)  # what their rules read
            else:
                out.extend((t, None) for t, _ in _all_tracked(value))


def _all_tracked(fn) -> list[tuple[Tracked, None]]:
    out: list[tuple[Tracked, None]] = []
    for value in vars(fn).values():
        if isinstance(value, Tracked):
            out.append((value, None))
        elif isinstance(value, torch.distributions.Distribution):
            out.extend(_all_tracked(value))
    return out


def unhandled_params(fn) -> set[str]:
    """Params reaching ``fn``'s arguments in a way no rule covers (they need gradient steps)."""
    return {p for t, role in uses(fn) if role is None for p in t.param_names}


def roles_of(fn) -> dict[str, set[str]]:
    """``{param: roles}`` of the params some rule updates through ``fn``'s arguments."""
    out: dict[str, set[str]] = {}
    for t, role in uses(fn):
        if role is not None:
            for p in t.param_names:
                out.setdefault(p, set()).add(role)
    return out


# ---------------------------------------------------------------- constraints
_ELEMENTWISE = {"loc", "scale", "probability", "rate"}
_MATRIX_OK = {
    "scale_tril": (constraints._LowerCholesky, constraints._LowerTriangular, constraints._Square),
    "covariance_matrix": (constraints._Symmetric, constraints._Square),
    "precision_matrix": (constraints._Symmetric, constraints._Square),
}


def base_constraint(c):
    """``c`` without its ``independent`` wrappers (``real_vector`` is ``real``)."""
    while isinstance(c, constraints._IndependentConstraint):
        c = c.base_constraint
    return c


def constraint_bounds(c):
    """``(lower, upper)`` (floats or tensors, ``±inf`` where unbounded) of an elementwise
    constraint: real, positive, greater_than(_eq), nonnegative, less_than, interval,
    unit_interval, half_open_interval (also under ``independent``); None for any other."""
    c = base_constraint(c)
    inf = math.inf
    if type(c) is constraints._Real:
        return -inf, inf
    if isinstance(c, (constraints._GreaterThan, constraints._GreaterThanEq)):
        return c.lower_bound, inf
    if isinstance(c, constraints._LessThan):
        return -inf, c.upper_bound
    if isinstance(c, (constraints._Interval, constraints._HalfOpenInterval)):
        return c.lower_bound, c.upper_bound
    return None


def constraint_problem(role: str, c) -> str | None:
    """Why the closed form of ``role`` cannot respect the param's constraint ``c`` (None if it
    can). Elementwise updates (means, rates, probabilities, scales) are clipped into any
    elementwise bound (exact: each element's objective is unimodal); probability rows need
    a constraint holding the simplex; a MultivariateNormal loc is unconstrained (clipping
    coordinates of a correlated quadratic is not its constrained maximum); matrices need a
    constraint holding the Cholesky factors / positive-definite matrices the update writes."""
    base = base_constraint(c)
    if type(base) is constraints._Real:
        return None
    if role in _ELEMENTWISE:
        if constraint_bounds(base) is None:
            return f"its constraint {c} is not an elementwise bound the update can clip to"
        return None
    if role == "probs":
        if isinstance(base, constraints._Simplex):
            return None
        b = constraint_bounds(base)
        if (
            b is not None
            and bool(torch.all(torch.as_tensor(b[0]) <= 0))
            and bool(torch.all(torch.as_tensor(b[1]) >= 1))
        ):
            return None
        return f"its constraint {c} does not hold the probability vectors the update writes"
    if role == "mvn_loc":
        return (
            f"its constraint {c} binds a MultivariateNormal loc, whose closed form is unconstrained"
        )
    if isinstance(base, _MATRIX_OK.get(role, ())):
        return None
    return f"its constraint {c} does not hold the {role.replace('_', ' ')} the update writes"
