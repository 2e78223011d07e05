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
PCFG                     root / rule / emission logits   inside–outside: expected counts,
                         (log form)                      normalized per left-hand side
HomogeneousHMM           start / transition logits (log  Baum–Welch counts from γ₀ and Σₜ ξₜ
                         form); observation_dist         (no (T, K, K) tensor)
=======================  =============================  ====================================

Each updated argument has a role (:data:`ROLES`): a param reaching two roles, or whose
constraint its role's update cannot respect (:func:`constraint_problem`), takes gradient steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import MaskedDistribution

from pyro_emvae import _compat
from pyro_emvae import params as _params
from pyro_emvae.distributions.hmm import ChainPosterior, HomogeneousHMM
from pyro_emvae.distributions.pcfg import PCFG
from pyro_emvae.kernels import outer_scatter
from pyro_emvae.stats import Stats, _memoized
from pyro_emvae.track import Tracked

__all__ = [
    "HANDLED",
    "MAXIMIZERS",
    "ROLES",
    "RULES",
    "MStepContext",
    "Rule",
    "Stats",
    "allowance_parts",
    "constraint_bounds",
    "constraint_problem",
    "leaves",
    "register",
    "register_rule",
    "roles_of",
    "sum_allowance",
    "summarize_site",
    "unhandled_params",
    "uses",
]


# ---------------------------------------------------------------- rules and their registry
class Rule:
    """The closed-form M-step of a distribution family: which arguments it updates, in which
    ECM stage, the statistics it adds, and the maximizer it computes from them.

    A subclass declares

    * ``families``: the distribution classes it reads (``dist.Gamma``, ...);
    * ``arguments``: ``{attribute: {form: role}}``: the distribution attributes it updates,
      the provenance forms it reads them in (:class:`~pyro_emvae.track.Tracked`'s ``form``:
      ``"value"``, ``"log"``, ``"normalized"``, ``"linear"``) and the *role* each gets. A role
      names one closed form: params are grouped by role (a param reaching two roles takes
      gradient steps), and the rule that declares a role maximizes every param of it (families
      sharing a role, as Poisson and Exponential share ``"rate"``, share its statistics);
    * ``stage`` (0: locations, probabilities, rates; 1: scales, covariances, updated about the
      new locations), or ``stages = {role: stage}`` where its roles differ;

    and implements

    * ``summarize(fn, value, weight, stats, stage, current)``: add this site's weighted
      expected sufficient statistics for ``stage`` into ``stats`` (``stats.add(kind, ids,
      *factors)`` sums ``prod(factors)`` at the param element ids ``ids``; ``weight`` is the
      posterior weight of every position, broadcastable to ``fn.log_prob(value)``;
      ``current(t)`` is the current value of a tracked argument ``t``);
    * ``maximize(role, stats, ctx)``: the new constrained value of the param ``ctx.name``
      (a tensor of ``ctx.shape``, a ``{name: value}`` dict for several params, or None to
      keep it), read from ``ctx.stat(kind)`` (the param's slice of its statistics); see
      :class:`MStepContext` for the options, bounds, allowance and warnings.

    ``log_prob`` is an optional fused kernel: ``log_prob(fn, value)`` equal to
    ``fn.log_prob(value)`` computed from the family's sufficient statistics (None: the E-step
    uses the distribution's own). Register a rule with :func:`register_rule`.

    The rate of a Gamma with a fixed concentration :math:`\\alpha`: the maximizer of :math:`\\sum_n
    w_{nk} (\\alpha \\log \\beta_k - \\beta_k x_n)` is :math:`\\beta_k = \\alpha \\sum_n w_{nk} /
    \\sum_n w_{nk} x_n` (see :doc:`/guide/custom_rule`):

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import EMOptim, ExactEStep, Rule, fit, register_rule
        >>> @register_rule
        ... class GammaRate(Rule):
        ...     families = (dist.Gamma,)
        ...     arguments = {"rate": {"value": "gamma_rate"}}  # attribute: {provenance form: role}
        ...     stage = 0  # ECM stage: 0 locations/rates/probabilities, 1 scales
        ...     def summarize(self, fn, value, weight, stats, stage, current):
        ...         rate = fn.__dict__.get("rate")
        ...         if stage == 0 and getattr(rate, "form", None) == "value":  # the param itself
        ...             stats.add("gamma_num", rate.ids, weight, current(fn.concentration))
        ...             stats.add("gamma_den", rate.ids, weight, value)
        ...     def maximize(self, role, stats, ctx):
        ...         return ctx.elementwise("gamma_num", "gamma_den")
        >>> def model(x):
        ...     rates = pyro.param("rates", torch.tensor([1.0, 2.0]),
        ...                        constraint=dist.constraints.positive)
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2),
        ...                         infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Gamma(3.0, rates[z]), obs=x)
        >>> x = dist.Gamma(3.0, torch.tensor([0.5, 5.0])).sample((100,)).flatten()
        >>> w = ExactEStep(model).marginals(x)["z"]  # (N, K) responsibilities
        >>> EMOptim().plan(ExactEStep(model), (x,), {}).closed_form
        ['rates']
        >>> result = fit(model, ExactEStep(model), x, max_iter=1, tol=0)  # one EM step
        >>> torch.allclose(pyro.param("rates"), 3.0 * w.sum(0) / (w * x[:, None]).sum(0))
        True
    """

    families: ClassVar[tuple] = ()
    arguments: ClassVar[dict[str, dict[str, str]]] = {}
    stage: ClassVar[int] = 0
    stages: ClassVar[dict[str, int]] = {}
    log_prob: Callable | None = None

    def stage_of(self, role: str) -> int:
        """The ECM stage in which params of ``role`` are updated."""
        return self.stages.get(role, self.stage)

    # (the two methods every rule implements: register_rule refuses a class without them)
    def summarize(self, fn, value, weight, stats: Stats, stage: int, current) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define summarize")

    def maximize(self, role: str, stats: Stats, ctx: MStepContext):
        raise NotImplementedError(f"{type(self).__name__} does not define maximize")

    def constraint_problem(self, role: str, constraint) -> str | None:
        """Why this rule's update of ``role`` cannot respect a param's ``constraint`` (None if
        it can). The default: the built-in roles as :func:`constraint_problem` says; any other
        role is elementwise (an unconstrained param, or one with elementwise bounds its
        update is clipped into by :meth:`MStepContext.elementwise`)."""
        return _constraint_problem(role, constraint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f.__name__ for f in self.families)})"


# family -> the rule reading it (a Rule, or a plain summarize function: ``register``)
RULES: dict[type, Rule | Callable[..., None]] = {}
# family -> {attribute: forms} a rule reads, and {attribute: {form: role}}
HANDLED: dict[type, dict[str, set[str]]] = {}
ROLES: dict[type, dict[str, dict[str, str]]] = {}
# role -> the rule whose ``maximize`` updates params of that role
MAXIMIZERS: dict[str, Rule] = {}


def register_rule(*families):
    """Register a :class:`Rule` subclass for distribution families (as Pyro's
    ``register_kl`` does); it then replaces any rule registered before for them. Use as
    ``@register_rule`` (the class's own ``families``) or ``@register_rule(dist.Gamma)``.

    Example (the rate of a Gamma with a fixed concentration α: the maximizer of
    :math:`\\sum_n w_n (\\alpha \\log \\beta - \\beta x_n)` is
    :math:`\\beta = \\alpha \\sum w / \\sum w x`)::

        >>> import pyro.distributions as dist
        >>> from pyro_emvae import Rule, register_rule
        >>> @register_rule
        ... class GammaRate(Rule):
        ...     families = (dist.Gamma,)
        ...     arguments = {"rate": {"value": "gamma_rate"}}
        ...     def summarize(self, fn, value, weight, stats, stage, current):
        ...         rate = fn.__dict__.get("rate")
        ...         if stage == 0 and getattr(rate, "form", None) == "value":
        ...             stats.add("gamma_num", rate.ids, weight, fn.concentration)
        ...             stats.add("gamma_den", rate.ids, weight, value)
        ...     def maximize(self, role, stats, ctx):
        ...         return ctx.elementwise("gamma_num", "gamma_den")
    """
    if len(families) == 1 and isinstance(families[0], type) and issubclass(families[0], Rule):
        cls = families[0]
        _register(cls, cls.families)
        return cls

    def deco(cls: type[Rule]) -> type[Rule]:
        _register(cls, families or cls.families)
        return cls

    return deco


def _register(cls: type[Rule], families) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"register_rule registers a Rule subclass, got {cls!r}")
    if not families:
        raise ValueError(f"{cls.__name__} names no families (set `families` or pass them)")
    missing = [m for m in ("summarize", "maximize") if getattr(cls, m) is getattr(Rule, m)]
    if missing:
        raise TypeError(f"{cls.__name__} must define {' and '.join(missing)} to be registered")
    rule = cls()
    rule.families = tuple(families)
    for f in families:
        RULES[f] = rule
        HANDLED[f] = {attr: set(forms) for attr, forms in rule.arguments.items()}
        ROLES[f] = {attr: dict(forms) for attr, forms in rule.arguments.items()}
    for forms in rule.arguments.values():
        for role in forms.values():
            MAXIMIZERS[role] = rule


def register(*families: type) -> Callable:
    """Register a plain summarize function ``rule(fn, value, weight, stats, stage, current)``
    for families that keep the arguments, roles and maximizers already registered for them
    (the older, summarize-only form of :func:`register_rule`)."""

    def deco(rule):
        for f in families:
            RULES[f] = rule
        return rule

    return deco


@dataclass
class MStepContext:
    """What :meth:`Rule.maximize` needs to update one param: its place in the statistics, the
    :class:`~pyro_emvae.optim.EMOptim` options, and ways to record what regularization costs
    and to warn.

    Attributes:
        name, role, shape, constraint: the param being updated.
        offset: where its elements start in the global id space of the statistics.
        current: its current constrained value, flattened (a copy: the rule may write in it;
            made when first read, from the param store, where the M-step passes None).
        reg_covar, dirichlet, min_prob: the EMOptim options.
        space: the probe's :class:`~pyro_emvae.track.IdSpace` (``offsets``, ``shapes``).
        closed_form: the params updated in closed form in this M-step.

    The Gamma rate rule of :class:`Rule`, looking at its context:

    Example::

        >>> seen = {}
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import EMOptim, ExactEStep, Rule, fit, register_rule
        >>> @register_rule
        ... class GammaRate(Rule):
        ...     families = (dist.Gamma,)
        ...     arguments = {"rate": {"value": "gamma_rate"}}  # attribute: {provenance form: role}
        ...     stage = 0  # ECM stage: 0 locations/rates/probabilities, 1 scales
        ...     def summarize(self, fn, value, weight, stats, stage, current):
        ...         rate = fn.__dict__.get("rate")
        ...         if stage == 0 and getattr(rate, "form", None) == "value":  # the param itself
        ...             stats.add("gamma_num", rate.ids, weight, current(fn.concentration))
        ...             stats.add("gamma_den", rate.ids, weight, value)
        ...     def maximize(self, role, stats, ctx):
        ...         seen.update(name=ctx.name, shape=ctx.shape, num=ctx.stat("gamma_num"))
        ...         return ctx.elementwise("gamma_num", "gamma_den")
        >>> def model(x):
        ...     rates = pyro.param("rates", torch.tensor([1.0, 2.0]),
        ...                        constraint=dist.constraints.positive)
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2),
        ...                         infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Gamma(3.0, rates[z]), obs=x)
        >>> x = dist.Gamma(3.0, torch.tensor([0.5, 5.0])).sample((100,)).flatten()
        >>> w = ExactEStep(model).marginals(x)["z"]  # (N, K) responsibilities
        >>> result = fit(model, ExactEStep(model), x, max_iter=1, tol=0)
        >>> seen["name"], seen["shape"]
        ('rates', torch.Size([2]))
        >>> torch.allclose(seen["num"], 3.0 * w.sum(0))  # the param's slice: sum_n w_nk alpha
        True
    """

    name: str
    role: str
    shape: torch.Size
    offset: int
    constraint: Any
    current: torch.Tensor
    stats: Stats
    reg_covar: float = 0.0
    dirichlet: float = 1.0
    min_prob: float = 0.0
    space: Any = None
    closed_form: tuple = ()
    allowance: float = 0.0
    warnings: list = field(default_factory=list)
    # what allow() and _allow_later() recorded, in order (floats, and functions giving floats)
    _parts: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.current is None:  # (read lazily: an update of every element never needs it)
            del self.current

    def __getattr__(self, attr: str):
        # (only reached while ``current`` is unset: see __post_init__)
        if attr == "current":
            self.current = _params.value(self.name).clone().reshape(-1)
            return self.current
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def _dtype(self) -> torch.dtype:
        """The dtype of ``current`` (without copying the value when it was not read)."""
        held = self.__dict__.get("current")
        if held is not None:
            return held.dtype
        # (the leaf's: a transform keeps the dtype; the value itself need not be computed)
        return _params.leaf(self.name).dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)

    def stat(self, kind: str) -> torch.Tensor | None:
        """This param's slice of ``stats.sums[kind]`` (``numel * w`` entries for a kind
        ``"name:w"``), or None when no site added that kind."""
        vec = self.stats.sums.get(kind)
        if vec is None:
            return None
        if ":" not in kind:  # (one entry per id: the usual kinds)
            return vec[self.offset : self.offset + math.prod(self.shape)]
        w = self.stats.length(kind) // self.stats.size
        return vec[self.offset * w : (self.offset + self.numel) * w]

    def touched(self, kind: str) -> torch.Tensor | None:
        """Which of this param's elements some site reached with ``kind`` (None: no site)."""
        seen = self.stats.touched.get(kind)
        return None if seen is None else seen[self.slice]

    def allow(self, nats: float) -> None:
        """Record that the regularized update may cost ``nats`` of
        :math:`\\mathbb{E}_q[\\log p(x, z)]` against the plain maximizer: EMOptim's guard
        tolerates that much of a drop in :math:`\\log p(x)` and no more."""
        self.allowance += float(nats)
        self._parts.append(float(nats))

    def _allow_later(self, costs: Callable[[], Any]) -> None:
        """:meth:`allow` each of ``costs()`` (an iterable of nats), when EMOptim's total is
        first read: the guard reads it only after a drop, so that the cost of an update that
        moved as it should is not computed at every step. ``costs`` must read only tensors
        nothing modifies afterwards (its own copies). Not counted in ``allowance``."""
        self._parts.append(costs)

    def warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """A warning for the user, given at the line that called the M-step."""
        self.warnings.append((message, category))

    def value_of(self, name: str) -> torch.Tensor:
        """The current constrained value of another param, flattened."""
        return pyro.get_param_store()[name].detach().reshape(-1)

    def bounds(self, ok: torch.Tensor, like: torch.Tensor) -> tuple:
        """The interval the elements ``ok`` are clipped to: strictly inside the constraint's
        bounds (the param store's transforms reach them only at ±inf), by 1e-12 (at least a
        few ulps) of the interval's width, or of ``max(1, |bound|)`` for a half-line; in
        ``like``'s dtype and device."""
        lower, upper = constraint_bounds(self.constraint)
        if type(lower) is float and type(upper) is float and -lower == upper == math.inf:
            # (unbounded, a mean's usual case: ±inf, without the margin's arithmetic)
            n = int(ok.sum()) if ok.dtype == torch.bool else ok.numel()
            return like.new_full((n,), -math.inf), like.new_full((n,), math.inf)
        margin = max(_MARGIN, 8 * torch.finfo(like.dtype).eps)
        as_like = {"dtype": like.dtype, "device": like.device}  # (ok: on the params' device)
        shape = self.shape
        lo = torch.as_tensor(lower, **as_like).expand(shape).reshape(-1)[ok.to(like.device)]
        hi = torch.as_tensor(upper, **as_like).expand(shape).reshape(-1)[ok.to(like.device)]
        finite_lo, finite_hi = torch.isfinite(lo), torch.isfinite(hi)
        width = torch.where(
            finite_lo & finite_hi,
            hi - lo,
            torch.where(finite_lo, lo.abs(), hi.abs()).nan_to_num(1.0, 1.0).clamp_min(1.0),
        )
        lo = torch.where(finite_lo, lo + margin * width, lo)
        hi = torch.where(finite_hi, hi - margin * width, hi)
        return lo, hi

    def elementwise(self, num: str, den: str) -> torch.Tensor | None:
        """A mean-like update ``stat(num) / stat(den)`` of every element with ``den > 0`` (the
        others, with no posterior mass, keep their values: a warning names those some site
        reached), clipped into the constraint (exact: each element's objective is concave).
        Returns the new flat value, or None where nothing moved."""
        n, d = self.stat(num), self.stat(den)
        if n is None or d is None:
            return None
        ok = d > 0
        # (tolist(): the bool without an aten op)
        if _FAST_PATHS and d.numel() and ok.all().tolist():
            # (the usual case, in one test: no element is empty and every one moves; the
            # same values as the general path below, which would overwrite all of current)
            self.current = _elementwise(self, ok, n, d, every=True).to(self._dtype())
            return self.current
        _warn_empty(self, self.touched(den) & ~ok)
        if not ok.any():
            return None
        self.current[ok] = _elementwise(self, ok, n, d).to(self.current.dtype)
        return self.current


# the maximizers' one-test paths for the usual case (every element, row or matrix reached and
# with mass); False: the general path only (the tests compare the two bit for bit)
_FAST_PATHS = True
_MARGIN = 1e-12  # how far inside its bounds an update clips a param (relative to the interval)


def allowance_parts(ctx: MStepContext) -> float | list:
    """What ``ctx`` recorded for the allowance: its float total, or (where some cost was
    deferred) the recorded parts in order, for :func:`sum_allowance`."""
    return list(ctx._parts) if any(callable(p) for p in ctx._parts) else ctx.allowance


def sum_allowance(parts) -> float:
    """The total of :func:`allowance_parts`: the deferred costs computed now, every part
    added from 0.0 in the order recorded (the same sum as ``allow`` made it)."""
    if not isinstance(parts, list):
        return parts
    total = 0.0
    for part in parts:
        for nats in part() if callable(part) else (part,):
            total += float(nats)
    return total


def _clamp_cost(counts, exact, probs) -> list:
    """What clamping the probability rows ``exact`` to ``probs`` costs the counts' log-likelihood
    (nats, one total)."""
    cost = torch.xlogy(counts, exact) - torch.xlogy(counts, probs)
    return [cost.sum().clamp_min(0)]


def _unbounded(constraint) -> bool:
    """Whether an elementwise constraint is the whole real line (no clipping to do)."""
    bounds = constraint_bounds(constraint)
    return (
        bounds is not None
        and all(type(b) is float for b in bounds)
        and (-bounds[0] == bounds[1] == math.inf)
    )


def _warn_empty(ctx: MStepContext, empty: torch.Tensor) -> None:
    if empty.any():
        ctx.warn(
            f"param '{ctx.name}': elements {empty.nonzero().flatten().tolist()} have no "
            "posterior mass (an empty component); kept at their current values"
        )


def _elementwise(ctx: MStepContext, ok, num, den, every: bool = False) -> torch.Tensor:
    """``num / den`` at the elements ``ok`` (a loc, rate or probability; ``every``: ``ok`` is
    known to hold everywhere), clipped into the constraint and into the family's own range
    (probabilities in [min_prob, 1 - min_prob], rates >= min_prob); what the family's range
    costs goes to the allowance."""
    a, b = (num, den) if every else (num[ok], den[ok])
    value = a / b
    if _unbounded(ctx.constraint):
        best = value  # (clipping to ±inf is the identity, nan included)
    else:
        lo, hi = ctx.bounds(ok, value)
        best = torch.minimum(torch.maximum(value, lo), hi)
    if ctx.role == "probability":
        final = best.clamp(ctx.min_prob, 1 - ctx.min_prob)
        q = lambda p: torch.xlogy(a, p) + torch.xlogy(b - a, 1 - p)
    elif ctx.role == "rate":
        final = best.clamp_min(ctx.min_prob)
        q = lambda r: torch.xlogy(a, r) - b * r
    else:
        return best
    # (the family's range may cut the constrained maximizer: what that costs)
    ctx.allow(float((q(best) - q(final)).nan_to_num(0.0).clamp_min(0).sum()))
    return final


def _reg_cost(ml: torch.Tensor, chol_ml, chol, n: torch.Tensor) -> list[float]:
    """What covariances :math:`C = L L^T` (regularized; ``chol`` holds ``L``) cost against
    the maximizers :math:`S` (``ml``) in the expected log-likelihood of ``n`` (weighted) points
    each: :math:`\\tfrac n2 (\\log|C| - \\log|S| + \\mathrm{tr}(C^{-1} S) - d)`; infinite for
    an ``S`` that is not positive definite (``chol_ml``: its factor and ``cholesky_ex`` info;
    a singular S's likelihood is unbounded). Batched: ``(M, D, D)`` matrices, ``n`` ``(M,)``;
    one cost per matrix, from the factors the update computes anyway."""
    factor_ml, info_ml = chol_ml
    logdet_ml = 2 * factor_ml.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    trace = torch.cholesky_solve(ml, chol).diagonal(dim1=-2, dim2=-1).sum(-1)
    gap = logdet - logdet_ml + trace - ml.shape[-1]
    # (one transfer for the three: the counts and info as doubles are exact)
    bad, ks, gaps = torch.stack([info_ml.ne(0).to(gap.dtype), n.to(gap.dtype), gap]).tolist()
    return [
        math.inf if b else max(0.0, 0.5 * float(k) * g)
        for b, k, g in zip(bad, ks, gaps, strict=True)
    ]


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
            mask = torch.as_tensor(_compat.mask_of(fn), device=weight.device)  # (a bool mask too)
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
    if isinstance(rule, Rule):
        rule.summarize(fn, value, weight, stats, stage, current)
    else:  # a plain summarize function (``register``)
        rule(fn, value, weight, stats, stage, current)
    return True


def _value_index(fn, value: torch.Tensor) -> torch.Tensor:
    if isinstance(fn, dist.OneHotCategorical):
        return value.argmax(-1)
    return value.long()


def _categorical(fn, value, weight, stats, stage, current) -> None:
    if stage != 0:
        return
    src = _compat.inner_categorical(fn) if isinstance(fn, dist.OneHotCategorical) else fn
    arg = _tracked(src, "probs", "logits", _compat.TORCH_PARAM_ATTR)
    t = next(iter(arg.values()), None)
    if t is None or t.form not in ("normalized", "log"):
        return

    def structure() -> tuple:
        k = _value_index(fn, value)
        # the ids' broadcast dims (a weight vector expanded along a plate) stay size 1, so that
        # the gathered ids are the enumerated value's (K, 1), not (K, N) copies that Stats.add
        # would scatter one by one (it pools a dim along which the ids are broadcast)
        tids = _compact(t.ids.expand(t.shape))
        shape = _compat.broadcast_shapes(tids.shape[:-1], k.shape)
        ids = tids.expand(shape + tids.shape[-1:]).gather(-1, k.expand(shape).unsqueeze(-1))
        return ids.squeeze(-1), _one(t), int(t.ids[(0,) * t.ids.dim()])

    # (the probe's argument and value: the same at every iteration of a plan)
    ids, one, first = _memoized(stats, (t, value), structure)
    stats.add("count", ids, weight)
    stats.add("rowmark", t.ids, one)
    stats.forms[first] = "simplex"


def _multinomial(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(_compat.inner_categorical(fn), "probs", "logits", _compat.TORCH_PARAM_ATTR)
    t = next(iter(t.values()), None)
    if stage != 0 or t is None or t.form not in ("normalized", "log"):
        return
    stats.add("count", t.ids, weight.unsqueeze(-1), value)
    stats.add("rowmark", t.ids, _one(t))


def _bernoulli(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "probs").get("probs")
    if stage != 0 or t is None or t.form != "value":
        return
    n = fn.total_count if isinstance(fn, dist.Binomial) else _one(value)
    stats.add("mean_num", t.ids, weight, value)
    stats.add("mean_den", t.ids, weight, n)


def _poisson(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "rate").get("rate")
    if stage != 0 or t is None or t.form != "value":
        return
    stats.add("mean_num", t.ids, weight, value)
    stats.add("mean_den", t.ids, weight)


def _exponential(fn, value, weight, stats, stage, current) -> None:
    t = _tracked(fn, "rate").get("rate")
    if stage != 0 or t is None or t.form != "value":
        return
    stats.add("mean_num", t.ids, weight)  # rate = Σw / Σwx
    stats.add("mean_den", t.ids, weight, value)


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


def _mvn(fn, value, weight, stats, stage, current) -> None:
    loc = fn.__dict__.get("loc")
    mats = _tracked(fn, _compat.MVN_SCALE_TRIL_ATTR, "covariance_matrix", "precision_matrix")
    if stage == 0 and isinstance(loc, Tracked) and loc.form == "value":
        if loc.param_names <= stats.plain_locs:
            # every position of a loc row shares one covariance (full, tied, diagonal models):
            # the maximizer is the weighted mean
            w = weight.unsqueeze(-1)
            stats.add("mean_num", loc.ids, w, value)
            stats.add("mean_den", loc.ids, w)
        else:
            _mvn_loc_precision_weighted(fn, loc, mats, value, weight, stats, current)
    if stage == 1 and mats:
        key, mat = next(iter(mats.items()))
        if mat.form != "value":
            return

        def structure() -> tuple:
            m = mat.expand(fn.batch_shape + mat.shape[-2:])  # one matrix per position
            # (the first id: no copy of the expanded ids)
            return m.ids, _compact(m.ids), int(m.ids[(0,) * m.ids.dim()]), _one(mat)

        # (the probe's distribution: the same at every iteration of a plan)
        mat_ids, ids, first, one = _memoized(stats, (fn, mat), structure)
        mu = current(loc)
        # a mixture's outer product: per-component scatter matrices chunk by chunk, without
        # the (K, N, D) residual (same formula, centred at each component's loc)
        fused = outer_scatter(weight, value, mu, ids.shape[:-2], event=1, outer=True)
        if fused is not None:
            den, num = fused
            stats.add("cov_num", ids, num)
            stats.add("cov_den", ids, den.reshape(den.shape + (1, 1)))
        else:
            resid = value - mu
            w = weight.unsqueeze(-1).unsqueeze(-1)
            stats.add("cov_num", mat_ids, w, resid.unsqueeze(-1), resid.unsqueeze(-2))
            stats.add("cov_den", mat_ids, w)
        stats.forms[first] = {_compat.MVN_SCALE_TRIL_ATTR: "scale_tril"}.get(key, key)
        stats.add("matmark", mat_ids, one)


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
    return torch.cholesky_inverse(_compat.mvn_scale_tril(fn))


#: at most this many ids are read as Python ints by the plan's structure tests (a mixture's
#: K rows: no tensor op per comparison); more are compared by tensor ops
SMALL_IDS = 4096


def small_ints(ids: torch.Tensor) -> list[int] | None:
    """The entries of ``ids`` in row-major order as Python ints (``ids.reshape(-1).tolist()``
    without the reshape's op), or None where there are more than :data:`SMALL_IDS`."""
    if ids.numel() > SMALL_IDS:
        return None
    out = ids.tolist()
    if ids.dim() == 0:
        return [out]
    for _ in range(ids.dim() - 1):
        out = [v for row in out for v in row]
    return out


def rows_aligned(ids: torch.Tensor, offset: int) -> bool:
    """Whether the last dim of ``ids`` runs over whole rows of its param, in order (element
    ``a`` of every position is element ``a`` of some row of a param whose last dim is D)."""
    d = ids.shape[-1]
    flat = small_ints(ids)
    if flat is not None:  # (Python's % is torch's: the remainder takes the divisor's sign)
        return all((v - offset) % d == i % d for i, v in enumerate(flat))
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
    """``ids`` with every broadcast (stride-0) dim sliced to size 1 (``ids`` itself where
    none is: the whole slice would be a view of the same elements, one op more)."""
    index = tuple(
        slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(ids.stride(), ids.shape)
    )
    return ids[index] if any(i.stop == 1 for i in index) else ids


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


def _homogeneous_hmm(fn, value, weight, stats, stage, current) -> None:
    r"""``weight`` here is the chain's :class:`~pyro_emvae.distributions.hmm.ChainPosterior`:
    ``start`` counts :math:`\gamma_0`, ``trans`` counts :math:`\sum_{t \ge 1} \xi_t`."""
    if not isinstance(weight, ChainPosterior):  # (a dense pairwise, from a caller of its own)
        pair = weight
        first, rest = pair[..., 0, :, :], pair[..., 1:, :, :].sum(-3)
        weight = ChainPosterior(first.sum(-1), first, rest, pair.sum(-2))
    if stage == 0:
        for attr, w in (("start_logits", weight.gamma[..., 0, :]), ("trans_logits", weight.trans)):
            t = fn.__dict__.get(attr)
            if isinstance(t, Tracked) and t.form == "log":
                stats.add("count", t.ids, w)
                stats.add("rowmark", t.ids, _one(t))
    obs = fn.observation_dist
    obs_value = value.unsqueeze(-1 - obs.event_dim)
    summarize_site(obs, obs_value, weight.gamma, stats, stage, current)


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


# ---------------------------------------------------------------- the built-in rules
def probability_rows(counts: torch.Tensor, dirichlet: float, min_prob: float) -> tuple:
    """``(counts, total, exact, probs)`` of probability rows (the last dim) from expected
    counts: the counts with the Dirichlet's pseudo-counts, their row totals, the plain
    maximizer ``counts / total`` and the regularized rows (clamped to
    ``[min_prob, 1 - min_prob]``, normalized again). One copy of the formula: the counts rule
    and EMOptim's mixture recipe both use it (the same ops, the same bits).

    Example::

        >>> probability_rows(torch.tensor([[1.0, 3.0]]), 1.0, 0.0)[3]
        tensor([[0.2500, 0.7500]])
    """
    if dirichlet != 1.0:  # (+ 0.0 changes no count: a sum from +0.0 is never -0.0)
        counts = counts + (dirichlet - 1.0)
    total = counts.sum(-1, keepdim=True)
    exact = counts / total.clamp_min(1e-300)
    probs = exact.clamp(min_prob, 1 - min_prob)
    probs = probs / probs.sum(-1, keepdim=True)
    return counts, total, exact, probs


def regularized_covariances(num: torch.Tensor, den: torch.Tensor, reg: float) -> tuple:
    """``(ml, cov)``: the maximizers :math:`S = \\tfrac12 (N + N^T) / n` of scatter matrices
    ``num`` ``(M, D, D)`` with weights ``den`` ``(M,)`` (symmetrized), and ``S + reg I``. One
    copy of the formula (the covariance maximizers and EMOptim's mixture recipe).

    Example::

        >>> ml, cov = regularized_covariances(torch.eye(2)[None] * 4, torch.tensor([2.0]), 0.5)
        >>> cov[0]
        tensor([[2.5000, 0.0000],
                [0.0000, 2.5000]])
    """
    ml = 0.5 * (num + num.mT) / den.view(-1, 1, 1)
    return ml, ml + _scaled_eye(num.shape[-1], reg, num.dtype, num.device)


class _Counts(Rule):
    """Probability rows from expected counts: :math:`p \\propto \\sum w\\,[x = k] + \\alpha - 1`
    (role ``"probs"``: Categorical, OneHotCategorical, Multinomial, a DiscreteHMM's
    transition and initial logits). Statistics: ``count`` (at the row element counted) and
    ``rowmark`` (the rows some site reached)."""

    def maximize(self, role, stats, ctx):
        rowmark = ctx.stat("rowmark")
        if rowmark is None or not rowmark.numel():
            return None
        last = ctx.shape[-1]
        counts, total, exact, probs = probability_rows(
            ctx.stat("count").reshape(-1, last), ctx.dirichlet, ctx.min_prob
        )
        rows = None
        if _FAST_PATHS:
            # (every row marked, known once per plan where the marks are a constant's copy)
            marked = _marked(ctx, "rowmark", last, "rows")
            if marked is None:
                rows = rowmark.reshape(-1, last).any(-1)
                fast = (rows & (total.squeeze(-1) > 0)).all().tolist()
            else:
                fast = marked and (total > 0).all().tolist()
        if _FAST_PATHS and fast:
            # (the usual case, in one test: every row reached, none empty; the general path
            # below gives the same values, with a test and an index per step)
            # (what the clamp costs, computed if the guard reads it; the counts may be a view of
            # the statistics, which online EM updates in place: a copy)
            kept = counts if ctx.stats.transient else counts.clone()
            ctx._allow_later(functools.partial(_clamp_cost, kept, exact, probs))
            return probs.to(ctx._dtype())  # ((rows, K): EMOptim reshapes it, a view)
        if not rowmark.any():
            return None
        if rows is None:
            rows = rowmark.reshape(-1, last).any(-1)
        empty = rows & (total.squeeze(-1) <= 0)
        if empty.any():
            ctx.warn(
                f"param '{ctx.name}': rows {empty.nonzero().flatten().tolist()} "
                "have no posterior mass; kept at their current values "
                "(use dirichlet > 1 to regularize)"
            )
        ok = rows & ~empty
        ctx.allow(float(_clamp_cost(counts[ok], exact[ok], probs[ok])[0]))
        cur = ctx.current.reshape(-1, last)
        cur[ok] = probs[ok].to(cur.dtype)
        return cur.reshape(-1)


_PROBS = {"probs": {"normalized": "probs"}, "logits": {"log": "probs"}}
_PROBS_PARAM = {**_PROBS, _compat.TORCH_PARAM_ATTR: {"normalized": "probs", "log": "probs"}}


@register_rule
class CategoricalRule(_Counts):
    families = (dist.Categorical, dist.OneHotCategorical)
    arguments: ClassVar[dict] = _PROBS_PARAM

    def summarize(self, fn, value, weight, stats, stage, current):
        _categorical(fn, value, weight, stats, stage, current)


@register_rule
class MultinomialRule(_Counts):
    families = (dist.Multinomial,)
    arguments: ClassVar[dict] = {}  # (its probs are its ``_categorical``'s: see ``uses``)

    def summarize(self, fn, value, weight, stats, stage, current):
        _multinomial(fn, value, weight, stats, stage, current)


class _Means(Rule):
    """Elementwise weighted means ``mean_num / mean_den``, clipped into the param's bounds
    (and, for probabilities and rates, into [min_prob, 1 - min_prob] / >= min_prob)."""

    def maximize(self, role, stats, ctx):
        return ctx.elementwise("mean_num", "mean_den")


@register_rule
class BernoulliRule(_Means):
    families = (dist.Bernoulli, dist.Binomial)
    arguments: ClassVar[dict] = {
        "probs": {"value": "probability"},
        _compat.TORCH_PARAM_ATTR: {"value": "probability"},
    }

    def summarize(self, fn, value, weight, stats, stage, current):
        _bernoulli(fn, value, weight, stats, stage, current)


@register_rule
class PoissonRule(_Means):
    families = (dist.Poisson,)
    arguments: ClassVar[dict] = {"rate": {"value": "rate"}}

    def summarize(self, fn, value, weight, stats, stage, current):
        _poisson(fn, value, weight, stats, stage, current)


@register_rule
class ExponentialRule(_Means):
    families = (dist.Exponential,)
    arguments: ClassVar[dict] = {"rate": {"value": "rate"}}

    def summarize(self, fn, value, weight, stats, stage, current):
        _exponential(fn, value, weight, stats, stage, current)


@register_rule
class NormalRule(_Means):
    """Normal (and ``.to_event``): a loc by precision-weighted means (stage 0), a loc linear
    in params (``X @ W[z] + b[z]``) by weighted least squares (stage 0), a scale by the
    weighted variance about the new loc (stage 1)."""

    families = (dist.Normal,)
    arguments: ClassVar[dict] = {
        "loc": {"value": "loc", "linear": "linear_loc"},
        "scale": {"value": "scale"},
    }
    stages: ClassVar[dict] = {"loc": 0, "linear_loc": 0, "scale": 1}

    def summarize(self, fn, value, weight, stats, stage, current):
        loc = fn.__dict__.get("loc")
        if isinstance(loc, Tracked) and loc.form == "linear":
            if stage == 0:
                _linear_loc(fn, loc, value, weight, stats, current)
            current = _reading_linear(current)  # (stage 1: the scale about the new fit)
        _normal(fn, value, weight, stats, stage, current)

    def maximize(self, role, stats, ctx):
        if role == "scale":
            return _variances(ctx)
        if role == "linear_loc":
            return _least_squares(ctx)
        return super().maximize(role, stats, ctx)


@register_rule
class MultivariateNormalRule(Rule):
    """MultivariateNormal: a loc by weighted means (one covariance per loc row) or
    precision-weighted means (stage 0), a covariance / its Cholesky factor / precision
    about the new loc (stage 1)."""

    families = (dist.MultivariateNormal,)
    arguments: ClassVar[dict] = {
        "loc": {"value": "mvn_loc"},
        _compat.MVN_SCALE_TRIL_ATTR: {"value": "scale_tril"},
        "scale_tril": {"value": "scale_tril"},
        "covariance_matrix": {"value": "covariance_matrix"},
        "precision_matrix": {"value": "precision_matrix"},
    }
    stage = 1
    stages: ClassVar[dict] = {"mvn_loc": 0}

    def summarize(self, fn, value, weight, stats, stage, current):
        _mvn(fn, value, weight, stats, stage, current)

    def maximize(self, role, stats, ctx):
        if role != "mvn_loc":
            return _covariances(ctx)
        out = ctx.elementwise("mean_num", "mean_den")
        pnum = ctx.touched("mvn_pnum")
        if pnum is not None and pnum.any():
            out = _precision_weighted_locs(ctx)
        return out


@register_rule
class DiscreteHMMRule(_Counts):
    """Baum–Welch: transition and initial probabilities from the pairwise posterior's
    expected counts; the emissions by their own family's rule."""

    families = (dist.DiscreteHMM,)
    arguments: ClassVar[dict] = {
        "transition_logits": {"log": "probs"},
        "initial_logits": {"log": "probs"},
    }

    def summarize(self, fn, value, weight, stats, stage, current):
        _discrete_hmm(fn, value, weight, stats, stage, current)


@register_rule
class PCFGRule(_Counts):
    """Inside–outside: root, rule and emission probabilities from the expected counts (the
    gradient of :math:`\\log p(x)` in the log-potentials), normalized per left-hand side
    (a rules param is ``(NT, S * S)`` on the simplex, passed as ``probs.log().reshape(NT, S,
    S)``). ``weight`` is the E-step's flat counts (see ``PCFG.split``)."""

    families = (PCFG,)
    arguments: ClassVar[dict] = {
        "root_logits": {"log": "probs"},
        "rule_logits": {"log": "probs"},
        "emission_logits": {"log": "probs"},
    }

    def summarize(self, fn, value, weight, stats, stage, current):
        if stage != 0:
            return
        root, rules, spans = fn.split(weight)
        tags = spans[:, 0, :, fn.num_nonterminals :]  # (B, L, PT): p(word i tagged P | x)
        for t, w in (("root_logits", root), ("rule_logits", rules)):
            arg = fn.__dict__.get(t)
            if isinstance(arg, Tracked) and arg.form == "log":
                stats.add("count", arg.ids, w)
                stats.add("rowmark", arg.ids, _one(arg))
        em = fn.__dict__.get("emission_logits")
        if isinstance(em, Tracked) and em.form == "log":
            words = value.reshape(tags.shape[:2]).long().clamp(0, em.shape[-1] - 1)
            ids = em.ids.T[words]  # (B, L, PT): the emission element each tag would use
            stats.add("count", ids, tags)
            stats.add("rowmark", em.ids, _one(em))


@register_rule
class HomogeneousHMMRule(_Counts):
    """Baum–Welch for :class:`~pyro_emvae.distributions.HomogeneousHMM`: ``start`` and the
    ``(K, K)`` transition from the chain's summed posterior counts (never a ``(T, K, K)``
    tensor); the emissions by their own family's rule."""

    families = (HomogeneousHMM,)
    arguments: ClassVar[dict] = {
        "start_logits": {"log": "probs"},
        "trans_logits": {"log": "probs"},
    }

    def summarize(self, fn, value, weight, stats, stage, current):
        _homogeneous_hmm(fn, value, weight, stats, stage, current)


def _variances(ctx: MStepContext):
    """Normal scales: :math:`\\sigma^2 = \\sum w (x - \\mu)^2 / \\sum w` + ``reg_covar``,
    clipped into the bounds; what ``reg_covar`` and the bounds cost goes to the allowance."""
    den, num = ctx.stat("var_den"), ctx.stat("var_num")
    if den is None:
        return None
    ok = den > 0
    _warn_empty(ctx, ctx.touched("var_den") & ~ok)
    if not ok.any():
        return None
    var = num[ok] / den[ok] + ctx.reg_covar
    if (var <= 0).any():
        bad = ok.nonzero().flatten()[var <= 0].tolist()
        raise FloatingPointError(
            f"param '{ctx.name}': the variance of elements {bad} collapsed to 0 (a "
            "component on a single point, or a constant feature); raise "
            f"reg_covar (now {ctx.reg_covar})"
        )
    lo, hi = ctx.bounds(ok, var)
    sigma = var.sqrt().clamp(lo, hi)
    # the maximizer without reg_covar, within the bounds (σ ↦ E log p is unimodal): what
    # reg_covar may cost is the difference
    ml = num[ok] / den[ok]
    best = ml.sqrt().clamp(lo, hi)

    def q(s, ml=ml, d=den[ok]):
        return -0.5 * d * (torch.log(s**2) + ml / s**2)

    # (a variance of 0 without reg_covar: an unbounded likelihood, any cost)
    cost = torch.where(best > 0, q(best) - q(sigma), math.inf)
    ctx.allow(float(cost.clamp_min(0).sum()))
    ctx.current[ok] = sigma.to(ctx.current.dtype)
    return ctx.current


def _precision_weighted_locs(ctx: MStepContext) -> torch.Tensor:
    """Each row of a MultivariateNormal loc met under different covariances:
    :math:`\\mu = (\\sum w P)^{-1} \\sum w P x`, one D x D solve per row."""
    d = ctx.shape[-1]
    a = ctx.stat(f"mvn_prec:{d}").reshape(-1, d, d)
    b = ctx.stat("mvn_pnum").reshape(-1, d)
    used = ctx.touched("mvn_pnum").reshape(-1, d).any(-1)
    empty = used & ~(a.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
    if empty.any():
        ctx.warn(
            f"param '{ctx.name}': rows {empty.nonzero().flatten().tolist()} have no posterior "
            "mass (an empty component); kept at their current values"
        )
    ok = used & ~empty
    cur = ctx.current.reshape(-1, d)
    if ok.any():
        a = 0.5 * (a[ok] + a[ok].mT)
        chol, info = torch.linalg.cholesky_ex(a)
        if info.any():
            raise torch.linalg.LinAlgError(
                f"param '{ctx.name}': the summed precision of rows "
                f"{ok.nonzero().flatten()[info > 0].tolist()} is singular"
            )
        cur[ok] = torch.cholesky_solve(b[ok].unsqueeze(-1), chol).squeeze(-1).to(cur.dtype)
    return cur.reshape(-1)


_EYES: dict = {}  # (d, reg_covar, dtype, device) -> reg_covar * I: read only, never written


def _scaled_eye(d: int, reg: float, dtype, device) -> torch.Tensor:
    """``reg * torch.eye(d)``, made once per size, value, dtype and device (the same bits)."""
    key = (d, float(reg).hex(), dtype, device)  # (hex: -0.0 is not 0.0 here)
    eye = _EYES.get(key)
    if eye is None:
        if len(_EYES) > 64:
            _EYES.clear()
        eye = _EYES[key] = reg * torch.eye(d, dtype=dtype, device=device)
    return eye


def _covariances(ctx: MStepContext):
    """Covariances :math:`\\Sigma = \\sum w (x-\\mu)(x-\\mu)^T / \\sum w` + ``reg_covar``
    ``I``, written as the param's kind (a covariance, its Cholesky factor, or its inverse)."""
    if _FAST_PATHS:
        new = _covariances_every(ctx)
        if new is not None:
            return new
    return _covariances_general(ctx)


def _covariances_every(ctx: MStepContext):
    """The usual case of :func:`_covariances` in one test: every matrix reached, with mass,
    and (where a factor is kept) positive definite. The same values and deferred costs as
    the general path, which makes them again where this test fails (None)."""
    found = _cov_stats(ctx)
    if found is None:
        return None
    matmark, d, num, den, kind = found
    ml, cov = regularized_covariances(num, den, ctx.reg_covar)
    marked = _marked(ctx, "matmark", d * d, "matrices")  # (known once per plan, or None)
    if marked is False:
        return None
    ok = den > 0 if marked else (matmark[:: d * d] > 0) & (den > 0)
    chol = None
    if ctx.reg_covar > 0 or kind != "covariance_matrix":
        chol, info = torch.linalg.cholesky_ex(cov)
        if kind != "covariance_matrix":  # (a covariance itself is kept as the general path does)
            ok &= info == 0
    if not ok.all().tolist():  # (tolist(): the bool without an aten op)
        return None
    if ctx.reg_covar > 0:
        # (n: a view of the statistics, which online EM updates in place, unless transient)
        n = den if ctx.stats.transient else den.clone()
        ctx._allow_later(functools.partial(_reg_cost_later, ml, chol, n))
    if kind == "covariance_matrix":
        return cov.to(ctx._dtype()).reshape(-1)
    new = chol if kind == "scale_tril" else torch.cholesky_inverse(chol)
    # ((M, D, D): EMOptim reshapes it to the param's shape, a view, not a copy)
    return new.to(ctx._dtype())


def _cov_stats(ctx: MStepContext) -> tuple | None:
    """``(matmark, D, num (M, D, D), den (M,), kind)`` of a covariance param's statistics
    (``den``: entry (0, 0) of each matrix, every D*D-th, one strided view; ``kind``: the
    matrix the param is, from the forms its sites recorded), None where no site reached it."""
    matmark = ctx.stat("matmark")
    if matmark is None or not matmark.numel():
        return None
    d = ctx.shape[-1]
    num = ctx.stat("cov_num").reshape(-1, d, d)
    den = ctx.stat("cov_den")[:: d * d]
    sl = ctx.slice
    kind = next(
        (k for i, k in ctx.stats.forms.items() if sl.start <= i < sl.stop and k != "simplex"),
        "scale_tril",
    )
    return matmark, d, num, den, kind


def _marked(ctx: MStepContext, kind: str, width: int, what: str) -> bool | None:
    """Whether every row (``what="rows"``: some of its ``width`` entries) or every matrix
    (``"matrices"``: its first entry) of this param's slice of ``stats.sums[kind]`` is > 0,
    worked out once per constant where the sums are an unmodified copy of one
    (:meth:`Stats.constant_of`: the marks of a plan's sites), kept with that constant;
    None where they are not (the caller then tests the sums themselves)."""
    found = ctx.stats.constant_of(kind)
    if found is None:
        return None
    const, notes = found
    key = ("marked", ctx.offset, ctx.numel, width, what)
    value = notes.get(key)
    if value is None:
        piece = const[ctx.offset : ctx.offset + ctx.numel]
        if what == "rows":
            value = bool(piece.reshape(-1, width).any(-1).all())
        else:
            value = bool((piece[::width] > 0).all())
        notes[key] = value
    return value


def _reg_cost_later(ml: torch.Tensor, chol, n: torch.Tensor) -> list[float]:
    """:func:`_reg_cost`, with the factor of ``ml`` computed now (when the guard reads the
    allowance: the same LAPACK call on the same matrices as at the update)."""
    return _reg_cost(ml, torch.linalg.cholesky_ex(ml), chol, n)


def _covariances_general(ctx: MStepContext):
    """:func:`_covariances`, every case: matrices not reached or without mass are kept (with a
    warning), a singular covariance raises."""
    found = _cov_stats(ctx)
    if found is None:
        return None
    matmark, d, num, den, kind = found
    used = matmark[:: d * d] > 0
    # (every matrix reached and with mass: all of current is overwritten; a nan mass is kept,
    # with a warning, below)
    every = bool((used & (den > 0)).all())
    if every:
        rows = list(range(len(den)))
    else:
        if not matmark.any():
            return None
        rows = []
        for m, w in zip(used.nonzero().flatten().tolist(), den[used].tolist(), strict=True):
            if w <= 0:
                ctx.warn(f"param '{ctx.name}': matrix {m} has no posterior mass; kept")
                continue
            rows.append(m)
        if not rows:
            return ctx.current.reshape(-1)
        every = len(rows) == len(den)
    # every matrix at once (batched LAPACK: the same per-matrix results as one by one)
    at = slice(None) if every else torch.tensor(rows, device=num.device)
    n, picked = (den, num) if every else (den[at], num[at])
    ml, cov = regularized_covariances(picked, n, ctx.reg_covar)
    if ctx.reg_covar > 0:
        # (the factors of both: the cost reads them, the update keeps C's; two calls, as
        # each matrix is factored on its own either way, and no concatenated copy)
        chol, info = torch.linalg.cholesky_ex(cov)
        # (computed if the guard reads it, ml's factor too: n may be a view of the
        # statistics, which online EM updates in place; the others are new tensors nothing
        # writes to)
        ctx._allow_later(functools.partial(_reg_cost_later, ml, chol, n.clone()))
    elif kind != "covariance_matrix":
        chol, info = torch.linalg.cholesky_ex(cov)
    if kind == "covariance_matrix":
        if every:  # (all of current is overwritten)
            return cov.to(ctx._dtype()).reshape(-1)
        cur = ctx.current.reshape(-1, d, d)
        cur[at] = cov
        return cur.reshape(-1)
    if info.any():
        m = rows[int(info.ne(0).nonzero()[0, 0])]
        raise torch.linalg.LinAlgError(
            f"param '{ctx.name}': the covariance of component {m} is singular (too few "
            f"points, or collapsed onto a subspace); raise reg_covar (now "
            f"{ctx.reg_covar})"
        )
    new = chol if kind == "scale_tril" else torch.cholesky_inverse(chol)
    if every:  # ((M, D, D): EMOptim reshapes it to the param's shape, a view, not a copy)
        return new.to(ctx._dtype())
    cur = ctx.current.reshape(-1, d, d)
    cur[at] = new
    return cur.reshape(-1)


# (the rules and maximizers of a Gaussian mixture's sites as registered here)
_BUILTIN_MIXTURE = (
    RULES[dist.Categorical],
    RULES[dist.MultivariateNormal],
    MAXIMIZERS["probs"],
    MAXIMIZERS["mvn_loc"],
    MAXIMIZERS["scale_tril"],
)


def builtin_mixture_rules() -> bool:
    """Whether Categorical and MultivariateNormal sites (and the probs, mvn_loc and scale_tril
    roles) are still handled by the rules registered here (EMOptim's mixture recipe makes their
    updates; a rule registered over them takes it off)."""
    now = (
        RULES.get(dist.Categorical),
        RULES.get(dist.MultivariateNormal),
        MAXIMIZERS.get("probs"),
        MAXIMIZERS.get("mvn_loc"),
        MAXIMIZERS.get("scale_tril"),
    )
    return all(a is b for a, b in zip(now, _BUILTIN_MIXTURE, strict=True))


# ---------------------------------------------------------------- linear locs (least squares)
def _linear_value(loc: Tracked, current) -> torch.Tensor:
    """The current value of a linear-form argument: :math:`\\sum_p a_p \\theta_{i_p} + c`."""
    theta = current(Tracked.wrap(loc.ids, loc.param, loc.ids))  # (P, *compact shape)
    out = (loc.design * theta).sum(0)
    return out if loc.const is None else out + loc.const


def _reading_linear(current):
    """``current`` that also evaluates linear-form arguments at the params it reads."""

    def read(t):
        if isinstance(t, Tracked) and t.form == "linear":
            return _linear_value(t, current)
        return current(t)

    return read


def _linear_loc(fn, loc: Tracked, value, weight, stats: Stats, current) -> None:
    """Weighted least squares for a Normal loc :math:`\\mu = \\sum_p a_p \\theta_{i_p} + c`
    (``X @ W[z] + b[z]``: the design ``a`` is data, ``i`` the param elements): minimizing
    :math:`\\sum_n w_n \\lambda_n (x_n - c_n - a_n^T \\theta_{i_n})^2`, with
    :math:`\\lambda = 1/\\sigma^2` at the current scale, gives the normal equations
    :math:`(\\sum w\\lambda a a^T) \\theta = \\sum w \\lambda a (x - c)` per *block* (the ids
    one position combines: a component's row of ``W`` and its bias). Statistics, for ``P``
    slots: ``linP_xy`` at ``i_p``; ``linP_gram:P`` (entry ``q`` of ``i_p``'s row);
    ``linP_mark`` (positions at ``i_p``) and ``linP_pair:P`` (the sum of the ids beside
    ``i_p``: their mean is the block, which the maximizer checks is one per id)."""
    p = loc.design.shape[0]
    design = loc.design.movedim(0, -1)  # (*shape, P)
    ids = loc.ids.movedim(0, -1)
    shape = _compat.broadcast_shapes(design.shape, ids.shape)
    y = value if loc.const is None else value - loc.const
    prec = 1.0 / current(fn.__dict__.get("scale")) ** 2
    w = (weight * prec).unsqueeze(-1)
    compact = _compact(ids)
    steps = torch.arange(p, device=ids.device)
    pair = (compact.unsqueeze(-1) * p + steps).expand(shape + (p,))
    stats.add(f"lin{p}_xy", ids, w, design, y.unsqueeze(-1))
    stats.add(f"lin{p}_gram:{p}", pair, w.unsqueeze(-1), design.unsqueeze(-1), design.unsqueeze(-2))
    ones = torch.ones((), dtype=torch.float64, device=ids.device)
    stats.add(f"lin{p}_mark", ids, ones)
    stats.add(f"lin{p}_pair:{p}", pair, compact.unsqueeze(-2).to(torch.float64))


def _least_squares(ctx: MStepContext):
    """Solve the normal equations of every block reaching this param (jointly with the other
    closed-form params of the block, e.g. a bias; those of gradient params are held at their
    values). A block with no posterior mass, or a singular system (a design of rank below
    its slots), keeps its values, with a warning. Returns ``{name: value}``."""
    space = ctx.space
    names = list(space.offsets)
    # every param flattened over the id space (the probe gives each a contiguous range)
    flat = torch.cat([ctx.value_of(n) for n in names])
    free_ids = torch.zeros(space.size, dtype=torch.bool, device=flat.device)
    for n in ctx.closed_form:
        o = space.offsets[n]
        free_ids[o : o + math.prod(space.shapes[n])] = True
    moved = torch.zeros_like(free_ids)
    for kind in sorted(ctx.stats.sums):
        if not (kind.startswith("lin") and kind.endswith("_mark")):
            continue
        p = int(kind[3:-5])
        mark = ctx.stats.sums[kind]
        mine = (mark[ctx.slice] > 0).nonzero().flatten() + ctx.offset
        if not len(mine):
            continue
        pairs = ctx.stats.sums[f"lin{p}_pair:{p}"].reshape(-1, p) / mark.unsqueeze(-1)
        blocks = pairs[mine].round()
        ok = bool((pairs[mine] - blocks).abs().max() < 1e-6)
        blocks = torch.unique(blocks.long(), dim=0)  # (B, P)
        if ok:  # each id of a block sees the same block, at its own slot
            ok = bool((mark[blocks] > 0).all()) and bool(
                (pairs[blocks] - blocks.unsqueeze(1)).abs().max() < 1e-6
            )
        if not ok:
            ctx.warn(
                f"param '{ctx.name}': its linear locs combine its elements with different "
                "others at different positions (no block structure the least-squares update "
                "supports); kept at its current values: give it gradient steps"
            )
            return None
        gram = ctx.stats.sums[f"lin{p}_gram:{p}"].reshape(-1, p)[blocks]  # (B, P, P)
        rhs = ctx.stats.sums[f"lin{p}_xy"][blocks]  # (B, P)
        theta = flat[blocks].to(gram.dtype)
        free = free_ids[blocks]
        # the slots of params not updated in closed form are held: they move to the right
        rhs = rhs - ((gram * (~free).unsqueeze(-2)) @ theta.unsqueeze(-1)).squeeze(-1)
        eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
        a = torch.where(free.unsqueeze(-1) & free.unsqueeze(-2), 0.5 * (gram + gram.mT), eye)
        b = torch.where(free, rhs, theta)
        empty = ~(a.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
        chol, info = torch.linalg.cholesky_ex(a)
        # singular: no factor, or a pivot lost to round-off (a rank-deficient design factors
        # with a pivot of the order of eps times the largest diagonal entry)
        pivots = chol.diagonal(dim1=-2, dim2=-1) ** 2
        scale = a.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
        tiny = (pivots <= 1e3 * p * torch.finfo(a.dtype).eps * scale).any(-1)
        singular = ~empty & ((info > 0) | tiny)
        if empty.any():
            ctx.warn(
                f"param '{ctx.name}': the linear locs of blocks {blocks[empty].tolist()} (their "
                "elements) have no posterior mass (an empty component); kept at their values"
            )
        if singular.any():
            ctx.warn(
                f"param '{ctx.name}': the least-squares system of blocks "
                f"{blocks[singular].tolist()} (their elements) is singular (a design of rank "
                "below its slots, or too few points in a component); kept at their values"
            )
        good = ~(empty | singular)
        if not good.any():
            continue
        sol = torch.cholesky_solve(b[good].unsqueeze(-1), chol[good]).squeeze(-1)
        write = free[good]
        flat[blocks[good][write]] = sol[write].to(flat.dtype)
        moved[blocks[good][write]] = True
    out = {}
    for n in names:
        o = space.offsets[n]
        sl = slice(o, o + math.prod(space.shapes[n]))
        if moved[sl].any():
            out[n] = flat[sl].reshape(space.shapes[n])
    return out or None


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
    roles = ROLES.get(family, {}) if family in RULES else {}
    for attr, value in vars(leaf).items():
        if isinstance(value, Tracked):
            out.append((value, roles.get(attr, {}).get(value.form)))
        elif isinstance(value, torch.distributions.Distribution):
            if isinstance(leaf, dist.DiscreteHMM) and attr == "observation_dist":
                continue  # a leaf of its own
            if attr == _compat.INNER_CATEGORICAL_ATTR and family in (
                dist.OneHotCategorical,
                dist.Multinomial,
            ):
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


def unhandled_params(fn, found: list | None = None) -> set[str]:
    """Params reaching ``fn``'s arguments in a way no rule covers (they need gradient steps).
    ``found``: :func:`uses` of ``fn``, if the caller has it."""
    return {p for t, role in (uses(fn) if found is None else found) if role is None for p in t.param_names}  # fmt: skip


def roles_of(fn, found: list | None = None) -> dict[str, set[str]]:
    """``{param: roles}`` of the params some rule updates through ``fn``'s arguments.
    ``found``: :func:`uses` of ``fn``, if the caller has it."""
    out: dict[str, set[str]] = {}
    for t, role in uses(fn) if found is None else found:
        if role is not None:
            for p in t.param_names:
                out.setdefault(p, set()).add(role)
    return out


# ---------------------------------------------------------------- constraints
_ELEMENTWISE = {"loc", "scale", "probability", "rate"}
_MATRIX_OK = {
    "scale_tril": (_compat.LowerCholesky, _compat.LowerTriangular, _compat.Square),
    "covariance_matrix": (_compat.Symmetric, _compat.Square),
    "precision_matrix": (_compat.Symmetric, _compat.Square),
}


def base_constraint(c):
    """``c`` without its ``independent`` wrappers (``real_vector`` is ``real``)."""
    while isinstance(c, _compat.IndependentConstraint):
        c = c.base_constraint
    return c


def constraint_bounds(c):
    """``(lower, upper)`` (floats or tensors, ``±inf`` where unbounded) of an elementwise
    constraint: real, positive, greater_than(_eq), nonnegative, less_than, interval,
    unit_interval, half_open_interval (also under ``independent``); None for any other."""
    c = base_constraint(c)
    inf = math.inf
    if type(c) is _compat.Real:
        return -inf, inf
    if isinstance(c, (_compat.GreaterThan, _compat.GreaterThanEq)):
        return c.lower_bound, inf
    if isinstance(c, _compat.LessThan):
        return -inf, c.upper_bound
    if isinstance(c, (_compat.Interval, _compat.HalfOpenInterval)):
        return c.lower_bound, c.upper_bound
    return None


def constraint_problem(role: str, c) -> str | None:
    """Why the closed form of ``role`` cannot respect the param's constraint ``c`` (None if it
    can), as the rule that maximizes ``role`` says (:meth:`Rule.constraint_problem`)."""
    rule = MAXIMIZERS.get(role)
    if rule is not None:
        return rule.constraint_problem(role, c)
    return _constraint_problem(role, c)


def _constraint_problem(role: str, c) -> str | None:
    """Why the closed form of ``role`` cannot respect the param's constraint ``c`` (None if it
    can). Elementwise updates (means, rates, probabilities, scales) are clipped into any
    elementwise bound (exact: each element's objective is unimodal); probability rows need
    a constraint holding the simplex; a MultivariateNormal loc is unconstrained (clipping
    coordinates of a correlated quadratic is not its constrained maximum); matrices need a
    constraint holding the Cholesky factors / positive-definite matrices the update writes."""
    base = base_constraint(c)
    if type(base) is _compat.Real:
        return None
    if role in _ELEMENTWISE:
        if constraint_bounds(base) is None:
            return f"its constraint {c} is not an elementwise bound the update can clip to"
        return None
    if role == "probs":
        if isinstance(base, _compat.Simplex):
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
    if role == "linear_loc":
        return f"its constraint {c} binds a linear loc, whose least-squares update is unconstrained"
    if role in _MATRIX_OK:
        if isinstance(base, _MATRIX_OK[role]):
            return None
        return f"its constraint {c} does not hold the {role.replace('_', ' ')} the update writes"
    # any other role (a user's rule): elementwise
    if constraint_bounds(base) is None:
        return f"its constraint {c} is not an elementwise bound the update can clip to"
    return None
