"""M-steps: how parameters move once the E-step has fixed q.

An M-step is any callable ``mstep(guide, posterior, args, kwargs) -> dict`` that updates the
params in Pyro's param store in place, given the exact posterior ``posterior`` computed by
``guide`` (an :class:`~pyro_emvae.estep.ExactEStep`) at the current params, and returns a dict of
diagnostics. :func:`~pyro_emvae.fit.fit` alternates E-steps with it. An M-step with the class
attribute ``needs_param_grads = True`` receives ``posterior.param_grads`` (the gradient of
:math:`\\log p_\theta(x)`, computed in the E-step's backward pass at no extra model pass).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.distributions import Categorical, DiscreteHMM, MultivariateNormal
from pyro.optim import PyroOptim
from torch.distributions import constraints

from pyro_emvae import _compat
from pyro_emvae import distributed as dp
from pyro_emvae import kernels as _kernels
from pyro_emvae import params as _params
from pyro_emvae import rules as _rules
from pyro_emvae import track as _track
from pyro_emvae._compat import Subsample, packed
from pyro_emvae.checkpoint import load_optim_state
from pyro_emvae.errors import ClosedFormWarning
from pyro_emvae.estep import ExactEStep, Posterior, is_implicit
from pyro_emvae.kernels import outer_rows
from pyro_emvae.plan import Plan, PlanKey, same_rows, subsample_sites
from pyro_emvae.rules import (
    MAXIMIZERS,
    MStepContext,
    Stats,
    _clamp_cost,
    _compact,
    _reg_cost_later,
    _tracked,
    _unbounded,
    allowance_parts,
    constraint_problem,
    leaves,
    probability_rows,
    regularized_covariances,
    roles_of,
    rows_aligned,
    small_ints,
    sum_allowance,
    summarize_site,
    unhandled_params,
    uses,
)
from pyro_emvae.stats import _memoized
from pyro_emvae.track import IdSpace, Tracked

__all__ = ["ClosedFormWarning", "EMOptim", "GradientMStep", "OnlineEM", "StreamPass"]


def gradient_steps(
    guide: ExactEStep,
    posterior: Posterior,
    args: tuple,
    kwargs: dict,
    optim: PyroOptim,
    steps: int,
    names: set[str] | None = None,
) -> float | None:
    """``steps`` optimizer steps on :math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]` with q held at
    ``posterior``, moving the params ``names`` (all the model's if None); each step is one
    model pass. Returns the last value of the objective (None if ``steps`` is 0)."""
    value = None
    for _ in range(steps):
        with pyro.poutine.trace(param_only=True) as capture:
            q = guide.expected_log_joint(posterior, *args, **kwargs)
        params = {n: s["value"].unconstrained() for n, s in capture.trace.nodes.items()}
        (-q).backward()
        moved = [p for n, p in params.items() if names is None or n in names]
        dp.all_reduce_grads(moved)  # data-parallel: the gradient of the sum over shards
        optim(moved)
        pyro.infer.util.zero_grads(set(params.values()))
        value = dp.all_reduce_float(float(q.detach()))
    return value


class GradientMStep:
    """Generalized EM with a gradient M-step (EG / GEM): ``steps`` optimizer steps on

    .. math::

        Q(\\theta) = \\mathbb{E}_{q}[\\log p_\\theta(x, z)], \\qquad q = p_{\\theta_{old}}(z \\mid x)

    with q held at the E-step's exact posterior. The first step uses the gradient the E-step
    already computed (by Fisher's identity :math:`\\nabla Q(\\theta_{old}) =
    \\nabla \\log p_{\\theta_{old}}(x)`), so ``steps=1`` costs one model pass per iteration; each
    further step re-evaluates Q by one more model pass.

    Args:
        optim: a Pyro optimizer (e.g. ``pyro.optim.Adam({"lr": 0.05})``). Its per-param state
            persists across iterations, as in SVI.
        steps: optimizer steps per E-step.

    Example::

        >>> import pyro
        >>> mstep = GradientMStep(pyro.optim.Adam({"lr": 0.05}), steps=5)
    """

    def __init__(self, optim: PyroOptim, steps: int = 1) -> None:
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim optimizer such as pyro.optim.Adam({{'lr': 0.01}}), "
                f"got {type(optim).__name__}"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.optim = optim
        self.steps = steps

    needs_param_grads = True

    def __call__(
        self, guide: ExactEStep, posterior: Posterior, args: tuple, kwargs: dict
    ) -> dict[str, Any]:
        store = pyro.get_param_store()
        if posterior.param_grads is None:
            raise ValueError("GradientMStep needs posterior(..., param_grads=True)")
        params = {n: store.get_param(n).unconstrained() for n in posterior.param_grads}
        for name, p in params.items():
            p.grad = -posterior.param_grads[name].detach().clone()
        dp.all_reduce_grads(params.values())
        self.optim(params.values())
        pyro.infer.util.zero_grads(set(params.values()))
        q_value = gradient_steps(guide, posterior, args, kwargs, self.optim, self.steps - 1)
        info: dict[str, Any] = {"gradient": sorted(params)}
        if q_value is not None:
            info["expected_log_joint"] = q_value
        return info

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, for checkpoints."""
        return {"optim": self.optim.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optim_state(self.optim, state["optim"])

    def __repr__(self) -> str:
        return f"GradientMStep({type(self.optim).__name__}, steps={self.steps})"


@dataclass
class StreamPass:
    """What one pass over a stream gathered: the total :math:`\\log p(x)` at the pass's params,
    the statistics of stage 0 and stage 1 (None where not gathered), the ids the stage-1 rules
    read, the last batch's plan, and the params the guard undid (if it did)."""

    log_likelihood: float
    stats: list
    reads: torch.Tensor | None
    plan: Plan
    rejected: list[str] | None = None
    potentials: Any = None  # the E-step's init potentials (an initialization pass)


class EMOptim:
    """The EM M-step: closed-form updates where the model's own sites allow, SVI steps elsewhere.

    Which params have a closed form is found from the model (no declaration): a param qualifies
    when every distribution argument it reaches is the param itself or a selection of it
    (indexed by enumerated latents, expanded, reshaped, concatenated) of a family in
    :data:`pyro_emvae.rules.RULES`. Those params are set to the maximizer of
    :math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]` in two conditional stages (locations and
    probabilities, then scales and covariances); the others (neural nets, params under
    nonlinear transforms, other families) then take ``svi_steps`` gradient steps with q held
    at the exact posterior (ECM: each step conditions on the ones before).

    Args:
        svi_optim: Pyro optimizer for the gradient part (default ``Adam({"lr": 0.01})``).
        svi_steps: gradient steps per M-step (only when some param has no closed form).
        reg_covar: added to the diagonal of every closed-form covariance and to every
            closed-form variance (as scikit-learn's ``reg_covar``); 0 for plain maximum
            likelihood.
        dirichlet: concentration of a symmetric Dirichlet prior on every closed-form probability
            vector (MAP-EM); 1.0 is no prior, 2.0 adds one pseudo-count per category.
        closed_form: ``"auto"``, or the list of param names to update in closed form (each must
            qualify), or ``[]`` for gradient steps only.
        min_prob: probabilities are clamped to ``[min_prob, 1 - min_prob]``, rates to
            ``>= min_prob``. (Any param is also clipped into its own constraint's bounds.)
        guard: check at each E-step that the previous M-step did not lower the objective
            (:math:`\\log p(x)`, plus the log-prior under ``dirichlet``) beyond round-off; if it
            did, undo it, name the param(s) whose update lowered
            :math:`\\mathbb{E}_q[\\log p(x, z)]` (``info["rejected"]``, ``self.rejected``), warn,
            and redo the iteration with closed-form updates only. After closed-form updates
            only (which a redo would repeat), a fall beyond round-off and what ``reg_covar`` /
            ``min_prob`` may cost raises a :class:`ClosedFormWarning` naming the params.

    Example::

        >>> from pyro_emvae import EMOptim
        >>> mstep = EMOptim(reg_covar=1e-6)
    """

    def __init__(
        self,
        svi_optim: PyroOptim | None = None,
        svi_steps: int = 10,
        reg_covar: float = 1e-6,
        dirichlet: float = 1.0,
        closed_form: str | list[str] = "auto",
        min_prob: float = 1e-12,
        guard: bool = True,
    ) -> None:
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
        if dirichlet < 1:
            raise ValueError(f"dirichlet must be >= 1 (1 = no prior), got {dirichlet}")
        if closed_form != "auto" and not isinstance(closed_form, (list, tuple)):
            raise TypeError(f"closed_form must be 'auto' or a list of names, got {closed_form!r}")
        self.svi_optim = svi_optim or pyro.optim.Adam({"lr": 0.01})
        self.svi_steps = svi_steps
        self.reg_covar = reg_covar
        self.dirichlet = dirichlet
        self.closed_form = closed_form
        self.min_prob = min_prob
        self.guard = guard
        self.rejected: list[list[str]] = []
        # what the last M-step's regularization may cost (see maximize; ``allowance``)
        self._allowance = _Allowance()
        self._warned = False  # a ClosedFormWarning was given in this run
        self._prev: dict | None = None
        self._wrote = False  # the guard wrote params in this step (see _step)
        self._plan: Plan | None = None
        self._plan_key: PlanKey | None = None
        self._two_pass: bool | None = None  # streaming: whether stage 1 needs its own pass
        # (fit's loop sets it for one call: its rollback's copies and stamps, see __call__)
        self._taken: tuple | None = None

    needs_param_grads = False

    @property
    def allowance(self) -> float:
        """What the last M-step's regularizations may cost in
        :math:`\\mathbb{E}_q[\\log p(x, z)]` (nats; see :meth:`maximize`)."""
        return self._allowance.value()

    @allowance.setter
    def allowance(self, nats: float) -> None:
        self._allowance = _Allowance(nats)

    @property
    def algorithm(self) -> str:
        if self._plan is None or not self._plan.gradient:
            return "EM"
        return "ECM" if self._plan.closed_form else "EG"

    # ---------------------------------------------------------------- the plan (probe)
    def plan(
        self, guide: ExactEStep, args: tuple, kwargs: dict, subsample=None, cache: bool = True
    ) -> Plan:
        """Probe the model and split its params: once per fit, unless ``cache`` is False.

        The plan depends on the model's structure, not on the params' values, so it is
        reused while what it depends on stays the same (:class:`PlanKey`): the same argument
        objects (unchanged in place, same shapes and dtypes), the same params (names, shapes,
        constraints), and the same rows of every plate (``subsample``, the E-step's trace of
        the plates' subsample sites: a plate that does not subsample has the same full range
        each time; a new minibatch is probed again, on its rows). A plan with gradient params
        is probed again at each call: its trace holds the values of the arguments no param
        tracks, some of them functions of the gradient params (a scale = softplus(ρ)), which
        move."""
        cached = self._plan
        if (
            cache
            and cached is not None
            and not cached.gradient
            and self._plan_key is not None
            and self._plan_key.holds(args, kwargs)
            and same_rows(cached.trace, subsample, self._probed_rows(cached))
        ):
            return cached
        key = PlanKey(args, kwargs)
        depth = guide._plate_nesting(args, kwargs)
        shared, dims = getattr(guide, "_probe", None), {}
        if shared is not None:
            guide._probe = None  # (taken once: it belongs to the E-step just made)
        if (
            shared is not None
            and cache
            and shared[3].matches(key)
            and same_rows(shared[0], subsample)
        ):  # the E-step's structure check probed the model just now (ExactEStep._shared_probe)
            trace, space, dims = shared[0], shared[1], shared[2]
            shared_key = key  # (no probe ran here: the params are those the key read)
        else:
            shared_key = None
            trace, space = _track.probe(guide.model, args, kwargs, depth, replay=subsample)
        reasons: dict[str, str] = {
            n: "used by an operation no rule sees through" for n in space.opaque
        }
        covered: set[str] = set()
        roles: dict[str, set[str]] = {}
        sites = [
            (name, site)
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not isinstance(site["fn"], Subsample)
        ]
        for name, site in sites:
            found = uses(site["fn"])  # (read once: unhandled_params and roles_of, from it)
            for p in unhandled_params(site["fn"], found):
                reasons.setdefault(
                    p,
                    f"reaches site '{name}' ({type(site['fn']).__name__}) "
                    "in a form no closed-form rule covers",
                )
            for p, r in roles_of(site["fn"], found).items():
                roles.setdefault(p, set()).update(r)
            covered |= _tracked_params(site["fn"])
        for p, r in roles.items():
            if len(r) > 1:
                reasons.setdefault(
                    p, f"reaches arguments with different closed forms ({', '.join(sorted(r))})"
                )
            elif (why := constraint_problem(next(iter(r)), _params.constraint_of(p))) is not None:
                reasons.setdefault(p, why)
        plain_locs = _mvn_loc_sharing(sites, space, roles, reasons)
        for p in space.offsets:
            if p not in covered:
                reasons.setdefault(p, "reaches no distribution argument directly")
        eligible = [p for p in space.offsets if p not in reasons]
        if self.closed_form == "auto":
            closed = eligible
        else:
            for p in self.closed_form:
                if p not in space.offsets:
                    raise ValueError(f"closed_form names '{p}', which the model has no param of")
                if p in reasons:
                    raise ValueError(f"param '{p}' has no closed-form update: it {reasons[p]}")
            closed = list(self.closed_form)
        gradient = [p for p in space.offsets if p not in closed]
        if gradient and shared_key is not None:
            # a plan with gradient params is probed again at every M-step in its own layout;
            # the shared probe's layout (an unused dim beside each enumerated one) contracts
            # the statistics in another order (the last bits differ), so a fit resumed from a
            # checkpoint would not equal the uninterrupted one: its own probe here too
            return self.plan(guide, args, kwargs, subsample, cache=cache)
        role = {p: next(iter(r)) for p, r in roles.items() if len(r) == 1}
        self._plan = Plan(
            trace, space, closed, gradient, reasons, role, frozenset(plain_locs), dims=dims
        )
        # (after the probe: it may create params)
        self._plan_key = shared_key if shared_key is not None else PlanKey(args, kwargs)
        return self._plan

    def _probed_rows(self, plan: Plan) -> dict:
        """``subsample_sites(plan.trace)``, read once per plan (a plan's trace does not
        change): what the cached plan's check compares the posterior's rows with."""
        hit = self.__dict__.get("_rows")
        if hit is not None and hit[0] is plan.trace:
            return hit[1]
        rows = subsample_sites(plan.trace)
        self._rows = (plan.trace, rows)
        return rows

    # ---------------------------------------------------------------- statistics
    def summarize(
        self,
        plan: Plan,
        posterior: Posterior,
        stage: int,
        flat: torch.Tensor | None = None,
        reads: torch.Tensor | None = None,
        sites: list | None = None,
    ) -> Stats:
        """Expected sufficient statistics of every site under ``posterior`` (additive).

        The rules read the params' current values (stage 1 reads the locations stage 0 set)
        from the store, or from ``flat`` (all params flattened over the probe's id space) if
        given; ``reads`` (bool over the id space), if given, marks the ids they read.
        ``sites``: :meth:`_sites` of this plan and posterior, when the caller summarizes both
        stages of one posterior (the weights are then unpacked once)."""
        if sites is None:
            sites = self._sites(plan, posterior)
        space = plan.space
        # (read from the store when a rule first asks: stage 0's plain means read no param)
        flats = [flat]
        stats = Stats(space.size, plain_locs=plan.plain_locs, memo=plan.memo)

        def current(t):
            # gather at the compact ids: broadcast (stride-0) dims stay size 1 and broadcast
            if not isinstance(t, Tracked) or t.form != "value":
                # (a log or normalized form belongs to a gradient param: the plan was probed
                # at its current value)
                return t.as_subclass(torch.Tensor) if isinstance(t, Tracked) else t
            ids, local = _memoized(stats, (t,), lambda: _local_ids(t, space))
            if reads is not None:
                reads[ids.reshape(-1)] = True
            if flats[0] is None:
                if local is not None and _same_dtypes(space):
                    # (one param: gathered from its own value, the same elements the flat
                    # vector would give, without computing every param's value; a copy of
                    # the value itself where the ids read it whole, in order)
                    theta = _params.value(t.param)
                    if isinstance(local, tuple):
                        # (the param's own shape: no view op before the copy)
                        return (theta if theta.shape == local else theta.reshape(local)).clone()
                    return theta.reshape(-1)[local]
                flats[0] = _flat_params(space)
            return flats[0][ids]

        for name, fn, value, weight in sites:
            summarize_site(fn, value, weight, stats, stage, current)
        return stats

    def _sites(self, plan: Plan, posterior: Posterior, checked: bool = False) -> list[tuple]:
        """``(name, fn, value, weight)`` of every sample site of the plan: the posterior weight
        of each position (the E-step's factor, unpacked, times the site's mask and scale).
        Raises ValueError if the posterior is of other rows than the plan was probed on
        (``checked``: the caller has just seen that they are the same, as :meth:`plan` does)."""
        if not checked:
            for name, site in posterior.subsample.nodes.items() if posterior.subsample else ():
                probed = plan.trace.nodes.get(name)
                if probed is None or not (
                    probed["value"] is site["value"] or torch.equal(probed["value"], site["value"])
                ):
                    raise ValueError(
                        f"the plan was probed on another minibatch of plate '{name}' than the "
                        "posterior's; make it with plan(guide, args, kwargs, posterior.subsample)"
                    )
        out = []
        symbol_to_dim = posterior.symbol_to_dim
        if plan.dims:  # (the probe's enumerated dims: see Plan.dims)
            symbol_to_dim = {s: plan.dims.get(d, d) for s, d in symbol_to_dim.items()}
        # (a factor posterior shared by several sites, a mixture's latent and observation:
        # its unpacked view made once, the same view of the same tensor for each)
        unpacked: dict[int, torch.Tensor] = {}
        for name, fn, value, direct, mask, scale in _site_layout(plan):
            if direct:
                # factor_q: zero on a sequence poutine.mask drops (pairwise holds its prior)
                weight = posterior.factor_q[name]
            else:
                q = posterior.factor_q.get(name)
                if q is None:
                    weight = torch.ones((), device=value.device)
                else:
                    weight = unpacked.get(id(q))
                    if weight is None:
                        weight = unpacked[id(q)] = _unpack(q, symbol_to_dim)
                if mask is not None:
                    weight = weight * mask
            if scale is not None:
                weight = weight * scale
            out.append((name, fn, value, weight))
        return out

    # ---------------------------------------------------------------- maximization
    def maximize(self, plan: Plan, stats: Stats, stage: int) -> dict[str, torch.Tensor]:
        """New constrained values of the closed-form params from ``stats``.

        Each value is the maximizer of :math:`\\mathbb{E}_q[\\log p(x, z)]` over the param's
        constraint (elementwise bounds clip it, strictly inside by a relative margin of
        1e-12: the param store's transforms reach a bound only at infinity), regularized by
        ``reg_covar``, ``dirichlet`` and ``min_prob``. What those regularizations may cost in
        :math:`\\mathbb{E}_q[\\log p(x, z)]` against the plain constrained maximizer is added
        to ``self.allowance`` (nats): the guard tolerates that much of a drop in
        :math:`\\log p(x)` after a closed-form step, and no more."""
        new: dict[str, torch.Tensor] = {}
        for name in plan.closed_form:
            role = plan.roles.get(name)
            rule = MAXIMIZERS.get(role)
            if name in new or rule is None or rule.stage_of(role) != stage:
                continue  # (a rule updating several params at once already set this one)
            ctx = MStepContext(
                name=name,
                role=role,
                shape=plan.space.shapes[name],
                offset=plan.space.offsets[name],
                constraint=_params.constraint_of(name),
                current=None,  # (read when a rule asks: see MStepContext)
                stats=stats,
                reg_covar=self.reg_covar,
                dirichlet=self.dirichlet,
                min_prob=self.min_prob,
                space=plan.space,
                closed_form=tuple(plan.closed_form),
            )
            try:
                value = rule.maximize(role, stats, ctx)
            finally:
                self._allowance.add(allowance_parts(ctx))
                for message, category in ctx.warnings:
                    warnings.warn(message, category, stacklevel=4)
            if isinstance(value, dict):
                new.update({n: v for n, v in value.items() if n not in new})
            elif value is not None:
                new[name] = value if value.shape == ctx.shape else value.reshape(ctx.shape)
        return new

    # ---------------------------------------------------------------- the step
    def _objective(self, plan: Plan, log_likelihood: float) -> float:
        """What EM never lowers: log p(x), plus the Dirichlet log-prior under MAP-EM."""
        # (tolist(): the number without an aten op; the same double as float())
        value = (
            float(log_likelihood.tolist())
            if isinstance(log_likelihood, torch.Tensor) and log_likelihood.dim() == 0
            else float(log_likelihood)
        )
        if self.dirichlet != 1.0:
            store = pyro.get_param_store()
            for name in plan.closed_form:
                if isinstance(_params.constraint_of(name), type(constraints.simplex)):
                    value += (self.dirichlet - 1.0) * float(store[name].detach().log().sum())
        return value

    def _guard(self, guide, posterior, plan, args, kwargs):
        """Undo the previous update if it lowered the objective; name the param(s) that did.

        A drop after closed-form updates only is not undone (a redo would make the same
        update): within round-off and what ``reg_covar`` / ``min_prob`` may cost
        (``allowance``) it is the regularized update asked for; beyond, some closed form is
        wrong for this model, and a :class:`ClosedFormWarning` names the params."""
        objective = self._objective(plan, posterior.log_likelihood)
        prev, self._prev = self._prev, None
        if prev is None or _minibatch(posterior):
            # (two minibatches' log-likelihoods do not compare)
            return posterior, objective, None
        drop = prev["objective"] - objective
        if drop <= 1e-9 * (1.0 + abs(prev["objective"])):
            return posterior, objective, None
        slack = _slack(prev, posterior.log_likelihood.dtype)
        if not plan.gradient and (drop <= slack or self._warned):
            return posterior, objective, None
        after = _params.constrained(prev["params"])
        self._wrote = True
        _params.write(prev["params"])
        before = guide.posterior(*args, **kwargs)
        dp.all_reduce_([before.log_likelihood])
        with torch.no_grad():

            def q_value() -> float:
                return dp.all_reduce_float(float(guide.expected_log_joint(before, *args, **kwargs)))

            base = q_value()
            culprits = []
            for name in prev["params"]:
                _params.write({name: after[name]})
                if q_value() < base - 1e-9 * (1.0 + abs(base)):
                    culprits.append(name)
                _params.write({name: prev["params"][name]})
        if not (set(culprits) & set(plan.gradient) if culprits else plan.gradient):
            _params.write(after)  # (closed-form culprits would do the same again)
            if drop > slack:
                moved = culprits or _moved(prev["params"], after, plan.closed_form)
                self._warn_closed_form(moved, drop, slack, stacklevel=5)
            return posterior, objective, None
        rejected = culprits or sorted(prev["params"])
        warnings.warn(
            f"an M-step lowered the objective by {drop:.3g} nats; it was "
            f"undone (params {rejected}), and this iteration takes closed-form updates only",
            stacklevel=4,
        )
        return before, self._objective(plan, before.log_likelihood), rejected

    def _warn_closed_form(self, names, drop: float, slack: float, stacklevel: int) -> None:
        """Warn, once per run, that the closed form of ``names`` lowered the objective."""
        if self._warned:
            return
        self._warned = True
        others = [n for n in (self._plan.closed_form if self._plan else []) if n not in names]
        warnings.warn(
            f"a closed-form M-step lowered log p(x) by {drop:.3g} nats (more than round-off "
            f"and what reg_covar / min_prob may cost, {slack:.3g}): the closed-form update of "
            f"param(s) {sorted(names)} does not maximize this model's expected log-likelihood "
            "(an assumption of its rule does not hold here). Give them gradient steps: "
            f"EMOptim(closed_form={others!r})",
            ClosedFormWarning,
            stacklevel=stacklevel,
        )

    def reset(self) -> None:
        """Forget the guard's memory of the last update (a new run, or params set by hand)."""
        self._prev = None
        self._two_pass = None
        self._warned = False

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs: the gradient optimizer's state and the guard's memory."""
        prev = None
        if self._prev is not None:
            prev = {
                "objective": self._prev["objective"],
                "params": {k: v.detach().clone() for k, v in self._prev["params"].items()},
                "allowance": _nats(self._prev.get("allowance", 0.0)),
            }
        return {
            "svi_optim": self.svi_optim.get_state(),
            "prev": prev,
            "rejected": self.rejected,
            "reg_covar": self.reg_covar,  # recover=True may have raised it
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optim_state(self.svi_optim, state["svi_optim"])
        self._prev = state["prev"]
        self.rejected = list(state["rejected"])
        self.reg_covar = state.get("reg_covar", self.reg_covar)

    def __call__(self, guide: ExactEStep, posterior: Posterior, args: tuple, kwargs: dict):
        # (fit's loop: its rollback's copies, for this call only)
        taken, self._taken = self.__dict__.get("_taken"), None
        cached = self._plan
        plan = self.plan(guide, args, kwargs, posterior.subsample)
        # (the values to roll back to and the guard's memory: read only when needed; the
        # loop's copies of this E-step's params where no probe ran the model since)
        before = _params.Snapshot(
            plan.closed_form + plan.gradient, taken if plan is cached else None
        )
        try:
            # (the plan was checked, or probed, on the posterior's rows: posterior.subsample)
            return self._step(guide, posterior, plan, args, kwargs, before, checked=True)
        except Exception:
            _params.write(before)  # an M-step that fails leaves no half-updated params behind
            self._prev = None
            raise

    def _step(self, guide, posterior, plan, args, kwargs, before=None, checked=False):
        rejected = None
        if self.guard:
            self._wrote = False
            posterior, objective, rejected = self._guard(guide, posterior, plan, args, kwargs)
            # (the params as this step found them, unless the guard wrote any: then read again)
            self._prev = {
                "objective": objective,
                "params": (
                    before
                    if before is not None and not self._wrote
                    else _params.constrained(plan.closed_form + plan.gradient)
                ),
            }
        if plan.closed_form:
            self._allowance = _Allowance()
            # (a posterior the guard made again is of its own E-step: its rows checked anew)
            self._closed_form(plan, posterior, checked=checked and rejected is None)
            if self._prev is not None:
                # (summed when the guard reads it, after a drop: see MStepContext._allow_later)
                self._prev["allowance"] = self._allowance
        info: dict[str, Any] = {
            "closed_form": list(plan.closed_form),
            "gradient": list(plan.gradient),
        }
        if rejected is not None:
            info["rejected"] = rejected
            info["log_likelihood"] = float(posterior.log_likelihood)  # at the restored params
            self.rejected.append(rejected)
        if plan.gradient and self.svi_steps > 0 and rejected is None:
            info["expected_log_joint"] = gradient_steps(
                guide, posterior, args, kwargs, self.svi_optim, self.svi_steps, set(plan.gradient)
            )
        return info

    def _plain(self) -> bool:
        """Whether this M-step's statistics and maximizers are the built-in ones, summed on one
        process (a subclass's own summarize or maximize, a rule registered over a built-in one,
        the general paths asked for by the tests, or a data-parallel run: the general path)."""
        cls = type(self)
        return (
            cls.summarize is EMOptim.summarize
            and cls.maximize is EMOptim.maximize
            and _rules._FAST_PATHS
            and _kernels._STEADY_SCATTER
            and _rules.builtin_mixture_rules()
            and not dp.active()
        )

    def _closed_form(self, plan: Plan, posterior: Posterior, checked: bool = False) -> None:
        """Both stages of the closed-form update from one posterior (data-parallel: from the
        statistics summed over the ranks)."""
        # (both stages read the same weights; __call__'s plan has just checked the rows)
        sites = self._sites(plan, posterior, checked=checked)
        done = 0  # (the stages the mixture recipe made)
        if _MIXTURE and self._plain():
            recipe = _mixture_recipe(plan)
            if recipe is not None:
                done = recipe.run(self, plan, sites)
        for stage in (0, 1)[done:]:
            stats = self.summarize(plan, posterior, stage, sites=sites)
            dp.all_reduce_stats(stats)
            # (nothing reads these statistics after the maximizers: they need not copy what
            # they keep of them for later, see Stats.transient)
            stats.transient = True
            _params.write(self.maximize(plan, stats, stage))

    # ---------------------------------------------------------------- streaming EM
    def stream_estep(self, guide: ExactEStep, batches, potentials=None) -> StreamPass:
        """The E-step of one exact streaming EM iteration: one pass over ``batches`` (an
        iterable of ``(args, kwargs)``, read again each iteration) at the current params,
        summing :math:`\\log p(x)` and the closed-form params' expected sufficient statistics
        batch by batch (data-parallel: then over the ranks). Only the statistics are kept, so
        memory is that of one batch. With ``guard``, an iteration that lowered the objective is
        undone (the pass is then made again at the restored params).

        :meth:`stream_mstep` then applies the update; the pair equals one full-batch
        ``EMOptim`` iteration on the concatenated batches."""
        spass = self._pass(guide, batches, potentials)
        if not self.guard or potentials is not None:
            return spass
        objective = self._objective(spass.plan, spass.log_likelihood)
        prev, self._prev = self._prev, None
        drop = math.nan if prev is None else prev["objective"] - objective
        if (
            prev is not None
            and spass.plan.gradient  # (closed-form maximizers alone: see _guard)
            and drop > 1e-9 * (1.0 + abs(prev["objective"]))
        ):
            _params.write(prev["params"])
            rejected = sorted(prev["params"])
            warnings.warn(
                f"an M-step lowered the objective by {drop:.3g} nats; "
                f"it was undone (params {rejected}), and this iteration takes closed-form "
                "updates only",
                stacklevel=3,
            )
            self.rejected.append(rejected)
            spass = self._pass(guide, batches)
            spass.rejected = rejected
            objective = self._objective(spass.plan, spass.log_likelihood)
        elif prev is not None and drop > (slack := _slack(prev, _dtype(spass.plan))):
            now = _params.constrained(prev["params"])
            moved = _moved(prev["params"], now, spass.plan.closed_form)
            self._warn_closed_form(moved, drop, slack, stacklevel=4)
        self._prev = {
            "objective": objective,
            "params": _params.constrained(spass.plan.closed_form + spass.plan.gradient),
        }
        return spass

    def _pass(self, guide, batches, potentials=None, stage1_flat=None) -> StreamPass:
        """One pass: ``log p(x)`` and stage-0 statistics (and stage-1 statistics, read at the
        store's params, or at ``stage1_flat``: only those are summed when it is given)."""
        total = 0.0
        stats: list[Stats | None] = [None, None]
        reads = None
        plan = None
        speculate = stage1_flat is None and self._two_pass is not True
        for args, kwargs in batches:
            post = guide.posterior(*args, potentials=potentials, **kwargs)
            total += float(post.log_likelihood)
            plan = self.plan(guide, args, kwargs, post.subsample, cache=False)
            if not plan.closed_form:
                continue
            if reads is None:  # (over the probe's ids, on the params' device)
                reads = torch.zeros(plan.space.size, dtype=torch.bool, device=_device(plan))
            if stats[0] is not None and stats[0].size != plan.space.size:
                raise ValueError(
                    f"the model's params changed between minibatches ({stats[0].size} elements, "
                    f"then {plan.space.size}); a streamed model must make the same params for "
                    "every batch"
                )
            stages = [1] if stage1_flat is not None else [0, 1] if speculate else [0]
            sites = self._sites(plan, post)
            for stage in stages:
                s = self.summarize(plan, post, stage, flat=stage1_flat, reads=reads, sites=sites)
                stats[stage] = s if stats[stage] is None else stats[stage].add_(s)
            del post
        if plan is None:
            raise ValueError("the stream gave no batch: a DataLoader over an empty dataset?")
        total = dp.all_reduce_float(total)
        for s in stats:
            if s is not None:
                dp.all_reduce_stats(s)
        if reads is not None and dp.active():
            counts = reads.double()
            dp.all_reduce_([counts])
            reads = counts > 0
        return StreamPass(total, stats, reads, plan, potentials=potentials)

    def stream_mstep(self, guide: ExactEStep, batches, spass: StreamPass) -> dict[str, Any]:
        """The M-step of an exact streaming iteration, from :meth:`stream_estep`'s statistics:
        stage 0 (locations, probabilities) in closed form; stage 1 (scales, covariances) from
        statistics about the *new* locations, which takes a second pass over the batches at
        the E-step's params when the stage-1 statistics read a location that stage 0 moved
        (Gaussian emissions; not for counts, categories or fixed locations). Then, if some
        params have no closed form, ``svi_steps`` gradient steps per batch on
        :math:`\\mathbb{E}_q[\\log p(x_b, z_b)]` with q the batch's exact posterior at the current
        params (stochastic: that part is minibatch EG)."""
        plan = spass.plan
        before = _params.constrained(plan.closed_form + plan.gradient)
        try:
            return self._stream_mstep(guide, batches, spass, plan)
        except Exception:
            _params.write(before)
            self._prev = None
            raise

    def _stream_mstep(self, guide, batches, spass, plan) -> dict[str, Any]:
        info: dict[str, Any] = {
            "closed_form": list(plan.closed_form),
            "gradient": list(plan.gradient),
            "passes": 1,
        }
        if plan.closed_form:
            self.allowance = 0.0
            new0 = self.maximize(plan, spass.stats[0], 0)
            stage1 = spass.stats[1]
            old = _flat_params(plan.space)
            flat = old.clone()
            for name, value in new0.items():
                o = plan.space.offsets[name]
                flat[o : o + value.numel()] = value.reshape(-1).to(flat.dtype)
            changed = flat != old
            if stage1 is None or (spass.reads is not None and (changed & spass.reads).any()):
                self._two_pass = True
                stage1 = self._pass(guide, batches, spass.potentials, stage1_flat=flat).stats[1]
                info["passes"] = 2
            _params.write(new0)
            if stage1 is not None:
                _params.write(self.maximize(plan, stage1, 1))
            if self._prev is not None:
                self._prev["allowance"] = self.allowance
        if spass.rejected is not None:
            info["rejected"] = spass.rejected
        elif plan.gradient and self.svi_steps > 0:
            names = set(plan.gradient)  # (the same for every batch: the model's params)
            for args, kwargs in dp.lockstep(batches):
                post = guide.posterior(*args, **kwargs)
                info["expected_log_joint"] = gradient_steps(
                    guide, post, args, kwargs, self.svi_optim, self.svi_steps, names
                )
            info["passes"] += 1
        return info

    def __repr__(self) -> str:
        return (
            f"EMOptim(svi_steps={self.svi_steps}, reg_covar={self.reg_covar}, "
            f"dirichlet={self.dirichlet}, closed_form={self.closed_form!r})"
        )


class OnlineEM(EMOptim):
    """Online EM (Cappé & Moulines, 2009): after each minibatch, a stochastic-approximation
    step on the expected sufficient statistics, then the closed-form update from them.

    With :math:`\\hat s_k` the statistics of minibatch k under its exact posterior (scaled by
    N / B, as Pyro scales a subsampled plate, so that they estimate the full data's),

    .. math::

        s_k = (1 - \\rho_k)\\, s_{k-1} + \\rho_k \\hat s_k, \\qquad
        \\rho_k = (k + t_0)^{-\\kappa}, \\quad \\rho_0 = 1,

    and the params are set to the maximizer given :math:`s_k`. With
    :math:`\\kappa \\in (0.5, 1]` the steps satisfy :math:`\\sum \\rho = \\infty,
    \\sum \\rho^2 < \\infty`, and the fit converges to a stationary point of the full-data
    log-likelihood while each update costs one minibatch. The two stages of
    :class:`EMOptim` (locations, then scales about the new locations) each keep their own
    average. Params with no closed form take ``svi_steps`` gradient steps on the minibatch.

    Use it with :func:`~pyro_emvae.fit.fit` on a ``DataLoader`` (each iteration is an epoch,
    an update per minibatch), or on in-memory data with a subsampled plate
    (``pyro.plate("data", N, subsample_size=B)``: one update per iteration).

    Args:
        kappa: the step-size decay, in (0.5, 1]; smaller forgets faster.
        t0: the step-size offset (>= 0); larger damps the early steps.
        **kwargs: as :class:`EMOptim` (``reg_covar``, ``dirichlet``, ``svi_optim``, ...);
            there is no guard, since a minibatch step may lower the full-data likelihood.

    Example::

        >>> from pyro_emvae import OnlineEM
        >>> mstep = OnlineEM(kappa=0.6, t0=2.0)
        >>> [round(mstep.step_size(k), 3) for k in range(3)]
        [1.0, 0.517, 0.435]
    """

    def __init__(self, kappa: float = 0.6, t0: float = 2.0, **kwargs: Any) -> None:
        if not 0.5 < kappa <= 1.0:
            raise ValueError(f"kappa must be in (0.5, 1] (Cappé & Moulines), got {kappa}")
        if t0 < 0 or not math.isfinite(t0):
            raise ValueError(f"t0 must be a finite number >= 0, got {t0}")
        if kwargs.pop("guard", False):
            raise ValueError("OnlineEM has no guard: a minibatch step may lower log p(x)")
        super().__init__(guard=False, **kwargs)
        self.kappa = kappa
        self.t0 = t0
        self.n_updates = 0
        self._running: dict[int, Stats] = {}

    @property
    def algorithm(self) -> str:
        return "online " + super().algorithm

    def step_size(self, k: int) -> float:
        """:math:`\\rho_k`: 1 for the first update, then :math:`(k + t_0)^{-\\kappa}`."""
        return 1.0 if k == 0 else float((k + self.t0) ** -self.kappa)

    def _closed_form(self, plan: Plan, posterior: Posterior, checked: bool = False) -> None:
        rho = self.step_size(self.n_updates)
        sites = self._sites(plan, posterior, checked=checked)
        for stage in (0, 1):
            stats = self.summarize(plan, posterior, stage, sites=sites)
            dp.all_reduce_stats(stats)
            running = self._running.get(stage)
            if running is None or rho == 1.0 or running.size != stats.size:
                self._running[stage] = stats
            else:
                running.scale_(1.0 - rho).add_(stats, alpha=rho)
            _params.write(self.maximize(plan, self._running[stage], stage))
        self.n_updates += 1

    def reset(self) -> None:
        """A new run: forget the averaged statistics and restart the step sizes."""
        super().reset()
        self.n_updates = 0
        self._running = {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["n_updates"] = self.n_updates
        state["running"] = {
            stage: {
                "size": st.size,
                "sums": {k: v.detach().clone() for k, v in st.sums.items()},
                "touched": {k: v.clone() for k, v in st.touched.items()},
                "forms": dict(st.forms),
            }
            for stage, st in self._running.items()
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.n_updates = state["n_updates"]
        self._running = {
            stage: Stats(s["size"], dict(s["sums"]), dict(s["forms"]), dict(s["touched"]))
            for stage, s in state["running"].items()
        }

    def stream_estep(self, *args, **kwargs):
        raise TypeError(
            "OnlineEM updates after every minibatch; fit runs it batch by batch (exact "
            "streaming passes are EMOptim's)"
        )

    def __repr__(self) -> str:
        return (
            f"OnlineEM(kappa={self.kappa}, t0={self.t0}, reg_covar={self.reg_covar}, "
            f"dirichlet={self.dirichlet}, svi_steps={self.svi_steps})"
        )


# ---------------------------------------------------------------- a mixture's M-step
# EMOptim's recipe for a one-latent mixture of full-covariance Gaussians; False: the general
# path only (the tests compare the two bit for bit)
_MIXTURE = True


class _Mixture:
    """The closed-form M-step of a one-latent mixture of full-covariance Gaussians: mixture
    weights ``P`` (K,) read by ``z ~ Categorical(P)``, locs ``L`` (K, D) and Cholesky factors
    ``S`` (K, D, D) read at ``z`` by ``x ~ MultivariateNormal(L[z], scale_tril=S[z])`` over
    one plate of N <= ``kernels.CHUNK`` rows on the CPU (the batch shape ``(K, 1, ..., 1, N)``: the
    enumerated dim, any unused dims, the plate); no mask, no scale, one dtype, no gradient
    param.
    With the weights ``W`` (K, N) and ``N_k = \\sum_n W_{kn}``:
    ``P = probability_rows(N)``, ``L = W X / N_k``, ``S = chol(sym(outer_rows(W, X, L)) / N_k +
    reg I)``, straight from the posterior's weights in the params' own layout. These are the
    general path's ops on the same tensors (its statistics are these sums scattered into
    zeros by ``index_add``: the same values, a ``-0.0`` made ``+0.0``, which the recipe does
    with ``+ 0.0``), so the params, the allowance's parts and their order are the same bits;
    its three statistics of ``W``'s sums over the plate (the counts, the locs' and the
    covariances' weights) are one sum of the same view here. The usual case only, each stage
    in one test (every component with mass; every covariance positive definite): a stage whose
    test fails is made by the general path (stage 0's before anything is written), which then
    warns or raises as it does.

    Made once per plan (structure only: which params, their ids in their own layout, the
    sites' shapes); ``None`` where the plan is anything else."""

    __slots__ = (
        "batch",
        "d",
        "dtype",
        "k",
        "locs",
        "n",
        "probs",
        "stage0",
        "tril",
    )

    def __init__(self, batch, d, probs, locs, tril, order, dtype) -> None:
        self.batch, self.k, self.n, self.d = batch, batch[0], batch[-1], d
        self.probs, self.locs, self.tril = probs, locs, tril
        self.stage0 = [p for p in order if p != tril]  # (the maximizers' order)
        self.dtype = dtype

    def run(self, opt: EMOptim, plan: Plan, sites: list) -> int:
        """Make the stages the usual case allows (0, 1 or 2 of them), as the general path would:
        the params written, the allowance's parts added in its order."""
        (_, _, _, wz), (_, _, x, w) = sites
        if not (
            w.shape == self.batch
            and (
                wz is w
                or (
                    wz.shape == w.shape
                    and wz.stride() == w.stride()
                    and wz.data_ptr() == w.data_ptr()
                )
            )
            and w.dtype == x.dtype == self.dtype
            and w.device.type == "cpu"
            and not (w.requires_grad or x.requires_grad)
            and all(_params.leaf(p).dtype == self.dtype for p in (self.probs, self.locs, self.tril))
        ):
            return 0
        if w.dim() != 2:  # (a view: the one Stats.add and outer_scatter read)
            w = w.reshape(self.k, self.n)
        nk = w.sum(1)  # (the general path's three sums of W over the plate: the same op)
        # (every count > 0, in one op: amin propagates a nan, which fails the test as
        # (nk > 0).all() does; tolist(): the number without an aten op)
        if not nk.amin().tolist() > 0:
            return 0  # (an empty component, a nan: the general path warns, keeps, raises)
        # stage 0: the weights (_Counts) and the locs (the weighted means, unbounded)
        counts, _, exact, probs = probability_rows(nk, opt.dirichlet, opt.min_prob)
        # (Stats.add's matrix product for the locs' sums; + 0.0: its index_add into zeros)
        num = torch.bmm(w.unsqueeze(0), x.unsqueeze(0)).squeeze(0) + 0.0
        new = {self.probs: probs, self.locs: num / nk.unsqueeze(-1)}
        for name in self.stage0:
            # (what each maximizer records: the clamp's deferred cost; a mean's 0.0)
            opt._allowance.add(
                [functools.partial(_clamp_cost, counts, exact, probs)]
                if name == self.probs
                else 0.0
            )
        _params.write({name: new[name] for name in self.stage0})
        # stage 1: the Cholesky factors about the new locs (as the store holds them)
        wt = w.as_strided((self.n, self.k, 1), (w.stride(1), w.stride(0), 1))  # (N, K, 1)
        s, _ = outer_rows(w, wt, x, _params.value(self.locs), den=nk)
        ml, cov = regularized_covariances(s + 0.0, nk, opt.reg_covar)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.any().tolist():  # (info >= 0: one op where (info == 0).all() is two)
            return 1  # (a singular covariance: the general path raises)
        opt._allowance.add(
            [functools.partial(_reg_cost_later, ml, chol, nk)] if opt.reg_covar > 0 else 0.0
        )
        _params.write({self.tril: chol})
        return 2


def _mixture_recipe(plan: Plan) -> _Mixture | None:
    """The plan's :class:`_Mixture`, made once (held in its memo), or None."""
    memo = plan.memo if plan.memo is not None else {}
    hit = memo.get("_mixture")
    if hit is not None and hit[0] is plan.trace:
        return hit[1]
    recipe = _make_mixture(plan)
    memo["_mixture"] = (plan.trace, recipe)
    return recipe


def _identity_ids(ids: torch.Tensor, offset: int, shape: tuple) -> bool:
    """Whether ``ids`` are ``offset + arange`` in the shape ``shape`` (a param read whole, in
    its own layout)."""
    n = math.prod(shape)
    if tuple(ids.shape) != shape:
        return False
    flat = small_ints(ids)
    if flat is not None:  # (a few ids: compared as Python ints, as torch.equal compares them)
        return flat == list(range(offset, offset + n))
    return torch.equal(ids.reshape(-1) - offset, torch.arange(n, device=ids.device))


def _enumeration_values(z: torch.Tensor, k: int) -> bool:
    """Whether ``z`` holds ``0 .. k - 1`` in order (``torch.equal(z.reshape(-1), arange(k))``)."""
    flat = small_ints(z)
    if flat is not None:  # (a few values: compared as Python numbers, as torch.equal does)
        return flat == list(range(k))
    return torch.equal(z.reshape(-1), torch.arange(k, device=z.device))


def _make_mixture(plan: Plan) -> _Mixture | None:
    """The :class:`_Mixture` of a plan that is exactly that model, else None (the general
    path): every condition the recipe's shortcuts rest on is checked here (structure, read
    once per plan) or at each run (the weights' geometry and dtypes)."""
    if plan.gradient or len(plan.closed_form) != 3:
        return None
    layout = _site_layout(plan)
    if len(layout) != 2:
        return None
    (_, zfn, zval, zdirect, zmask, zscale), (_, xfn, xval, xdirect, xmask, xscale) = layout
    if (
        type(zfn) is not Categorical
        or type(xfn) is not MultivariateNormal
        or zdirect
        or xdirect
        or any(m is not None for m in (zmask, xmask, zscale, xscale))
    ):
        return None
    space, roles = plan.space, plan.roles
    t = next(iter(_tracked(zfn, "probs", "logits", _compat.TORCH_PARAM_ATTR).values()), None)
    loc = xfn.__dict__.get("loc")
    mats = _tracked(xfn, _compat.MVN_SCALE_TRIL_ATTR, "covariance_matrix", "precision_matrix")
    key, mat = next(iter(mats.items()), (None, None))
    if (
        t is None
        or t.form not in ("normalized", "log")
        or not isinstance(loc, Tracked)
        or loc.form != "value"
        or key != _compat.MVN_SCALE_TRIL_ATTR
        or mat.form != "value"
        or any(len(a.param_names) != 1 for a in (t, loc, mat))
    ):
        return None
    probs, locs, tril = t.param, loc.param, mat.param
    if (
        {probs, locs, tril} != set(plan.closed_form)
        or len({probs, locs, tril}) != 3
        or (roles.get(probs), roles.get(locs), roles.get(tril))
        != ("probs", "mvn_loc", "scale_tril")
        or locs not in plan.plain_locs
        or not _unbounded(_params.constraint_of(locs))
    ):
        return None
    # (on the CPU only: Stats.add contracts the locs' sums by bmm there, by einsum elsewhere)
    if (
        xval.dim() != 2
        or xval.requires_grad
        or xval.layout != torch.strided
        or xval.device.type != "cpu"
        or any(_params.leaf(p).device.type != "cpu" for p in (probs, locs, tril))
    ):
        return None
    n, d = xval.shape
    k = space.shapes[probs][0] if len(space.shapes[probs]) == 1 else 0
    batch = tuple(xfn.batch_shape)
    # (the enumerated dim first, then unused dims of size 1, then the plate)
    ones = (1,) * (len(batch) - 2)
    if not (
        0 < n <= _kernels.CHUNK
        and k > 0
        and batch == (k, *ones, n)
        and tuple(space.shapes[locs]) == (k, d)
        and tuple(space.shapes[tril]) == (k, d, d)
        and zval.shape == (k, *ones, 1)
        and _enumeration_values(zval, k)
        # (each component's row of every param at its own place: component j is row j)
        and _identity_ids(_compact(t.ids.expand(t.shape)), space.offsets[probs], (1, k))
        and _identity_ids(_compact(loc.ids), space.offsets[locs], (k, *ones, 1, d))
        and _identity_ids(
            # (the ids the tracked expand gives: the same expand of the ids)
            _compact(mat.ids.expand(xfn.batch_shape + mat.shape[-2:])),
            space.offsets[tril],
            (k, *ones, 1, d, d),
        )
    ):
        return None
    dtype = xval.dtype
    if not dtype.is_floating_point:
        return None
    return _Mixture(batch, d, probs, locs, tril, plan.closed_form, dtype)


# (shape, strides, dims, their places) of a packed factor -> the geometry of its unpacked view
_UNPACKED: dict = {}


def _unpack(q: torch.Tensor, symbol_to_dim: dict) -> torch.Tensor:
    """``packed.unpack(q, symbol_to_dim)``: the same view of ``q`` (its dims moved to the
    places ``symbol_to_dim`` gives them), made in one ``as_strided`` op where Pyro's takes a
    permute and a reshape; the geometry is worked out by Pyro's once per layout."""
    dims = _compat.pyro_dims(q)
    if q.dim() == 0 or q.requires_grad:
        return packed.unpack(q, symbol_to_dim)
    key = (q.shape, q.stride(), dims, tuple([symbol_to_dim[d] for d in dims]))
    hit = _UNPACKED.get(key)
    if hit is None:
        out = packed.unpack(q, symbol_to_dim)
        same = out.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
        hit = (out.shape, out.stride(), out.storage_offset() - q.storage_offset()) if same else ()
        if len(_UNPACKED) > 256:
            _UNPACKED.clear()
        _UNPACKED[key] = hit
        return out
    if not hit:  # (Pyro's copies for this layout)
        return packed.unpack(q, symbol_to_dim)
    return q.as_strided(hit[0], hit[1], q.storage_offset() + hit[2])


def _site_layout(plan: Plan) -> list[tuple]:
    """``(name, fn, value, direct, mask, scale)`` of the plan's sample sites, in trace order:
    ``direct`` when the E-step's factor is the weight as it is (a chain's pairwise posterior,
    an implicit latent's counts), ``scale`` None where it is 1. Structure only, read from
    the probe's trace: made once per plan (held in its memo, which the plan owns)."""
    memo = plan.memo if plan.memo is not None else {}  # (None: nothing kept, as the tests ask)
    layout = memo.get("_sites")
    if layout is not None and layout[0] is plan.trace:
        return layout[1]
    sites = []
    for name, site in plan.trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], Subsample):
            continue
        fn = site["fn"]
        direct = isinstance(fn, DiscreteHMM) or is_implicit(fn)
        scale = site["scale"]
        plain = isinstance(scale, (int, float)) and scale == 1  # (no (K, N) copy)
        sites.append((name, fn, site["value"], direct, site["mask"], None if plain else scale))
    memo["_sites"] = (plan.trace, sites)
    return sites


def _flat_params(space: IdSpace) -> torch.Tensor:
    return torch.cat([_params.value(n).reshape(-1) for n in space.offsets])


def _local_ids(t: Tracked, space: IdSpace) -> tuple:
    """``(ids, local)`` of a tracked argument: its compact global ids, and the same ids
    within its one param's value flattened (None when they reach another param's range, as a
    linear form's may). Structure only: made once per plan (``_memoized``)."""
    ids = _compact(t.ids)
    local = None
    name = getattr(t, "param", None)
    if len(t.param_names) == 1 and name in space.offsets:
        o, numel = space.offsets[name], math.prod(space.shapes[name])
        rel = ids - o
        if bool(((rel >= 0) & (rel < numel)).all()):
            local = rel
            if rel.numel() == numel and torch.equal(
                rel.reshape(-1), torch.arange(numel, device=rel.device)
            ):
                local = tuple(rel.shape)  # (every element once, in order: a reshape)
    return ids, local


def _same_dtypes(space: IdSpace) -> bool:
    """Whether every param of the space has one dtype (else the flat vector, a ``cat`` of
    them, is in their promoted dtype, and a param's own value is not what it would give)."""
    return len({u.dtype for u in _params.unconstrained(space.offsets).values()}) == 1


def _device(plan: Plan) -> torch.device:
    """Where the plan's params (and so its ids) live."""
    store = pyro.get_param_store()
    name = next(iter(plan.space.offsets), None)
    return store[name].device if name is not None else torch.device("cpu")


_SMALL_PAIRS = 4096  # (row, key) pair entries read as Python tuples in _mvn_loc_sharing


def _pair_entries(ids: torch.Tensor, key, shape: torch.Size) -> int:
    """The number of entries of :func:`_pair_tensor`'s result."""
    return math.prod(shape) * (1 + (key.shape[-1] if torch.is_tensor(key) else 1))


def _pair_tensor(ids: torch.Tensor, key, shape: torch.Size) -> torch.Tensor:
    """``(row, *key)`` at every position of ``shape``: the first id of each position's loc row
    beside the ids of its covariance (``key``, ``(..., W)``), or an int standing for one
    matrix, broadcast; shape ``(positions, 1 + W)``."""
    if not torch.is_tensor(key):
        key = torch.full((1,), key, device=ids.device)
    rows = ids[..., :1]
    return torch.cat(
        [rows.expand(shape + rows.shape[-1:]), key.expand(shape + key.shape[-1:])], -1
    ).reshape(-1, 1 + key.shape[-1])


def _rows_at(t: torch.Tensor, shape: torch.Size) -> list[tuple] | None:
    """The last-dim rows of ``t`` (as tuples of Python ints) at every position of ``shape``
    (``t``'s other dims broadcast to it), in row-major order; None for many ids."""
    flat = small_ints(t)
    if flat is None:
        return None
    w, batch = t.shape[-1], tuple(t.shape[:-1])
    lead = len(shape) - len(batch)
    steps = [math.prod(batch[i + 1 :]) if n > 1 else 0 for i, n in enumerate(batch)]
    out = []
    for index in itertools.product(*(range(n) for n in shape)):
        at = w * sum(i * st for i, st in zip(index[lead:], steps))
        out.append(tuple(flat[at : at + w]))
    return out


def _pair_tuples(ids: torch.Tensor, key, shape: torch.Size) -> list[tuple]:
    """``_pair_tensor(ids, key, shape).tolist()``'s rows as tuples, read as Python ints
    without the tensor ops where the ids are few."""
    rows = _rows_at(ids, shape)
    keys = _rows_at(key, shape) if torch.is_tensor(key) else [(key,)] * math.prod(shape)
    if rows is None or keys is None:
        return [tuple(r) for r in _pair_tensor(ids, key, shape).tolist()]
    return [(r[0], *k) for r, k in zip(rows, keys, strict=True)]


def _mvn_loc_sharing(sites, space: IdSpace, roles: dict, reasons: dict) -> set[str]:
    """The MultivariateNormal loc params each of whose rows meets a single covariance over
    every position of every site (GMMs full, tied, diagonal; an HMM's emissions): their
    closed form is the weighted mean. The others (a loc shared by components of different
    covariances, a known covariance per datum) are precision-weighted, which needs each
    position's loc to be a whole row of one param (else a reason is added to ``reasons``)."""
    pairs: dict[str, list[torch.Tensor]] = {}
    varies: set[str] = set()
    unaligned: set[str] = set()
    for index, (_, site) in enumerate(sites):
        for leaf in leaves(site["fn"]):
            loc = leaf.__dict__.get("loc") if isinstance(leaf, MultivariateNormal) else None
            if not isinstance(loc, Tracked) or loc.form != "value":
                continue
            ids = _compact(loc.ids)
            if (
                len(loc.param_names) > 1
                or space.shapes[loc.param][-1] != ids.shape[-1]
                or not rows_aligned(ids, space.offsets[loc.param])
            ):
                unaligned |= loc.param_names
            mats = _tracked(
                leaf, _compat.MVN_SCALE_TRIL_ATTR, "covariance_matrix", "precision_matrix"
            )
            if mats:  # a matrix of params: known by its elements' ids
                key = _compact(next(iter(mats.values())).ids).flatten(-2)
            elif all(n == 1 for n in _compat.mvn_scale_tril(leaf).shape[:-2]):
                key = -1 - index  # one matrix: this site's
            else:  # a matrix per position, not of params (data, or a function of params)
                varies |= loc.param_names
                continue
            # (made when read: as Python tuples where they are few)
            key_batch = key.shape[:-1] if torch.is_tensor(key) else ()
            shape = _compat.broadcast_shapes(ids.shape[:-1], key_batch)
            for p in loc.param_names:
                pairs.setdefault(p, []).append((ids, key, shape))
    plain = set()
    for p, found in pairs.items():
        if p in varies:
            continue
        if sum(_pair_entries(*f) for f in found) <= _SMALL_PAIRS:
            # (a few pairs, as for a mixture's K rows: the same test on the pairs read once,
            # as tuples, without torch.unique's sorts; a shorter key cannot equal a padded one)
            pairs_seen = {r for f in found for r in _pair_tuples(*f)}
            if len({r[0] for r in pairs_seen}) == len(pairs_seen):  # one key per row
                plain.add(p)
            continue
        found = [_pair_tensor(*f) for f in found]
        width = max(f.shape[-1] for f in found)  # (sites' matrices may differ in size)
        found = [
            torch.nn.functional.pad(f, (0, width - f.shape[-1]), value=-(2**62)) for f in found
        ]
        unique = torch.unique(torch.cat(found), dim=0)
        if len(torch.unique(unique[:, 0])) == len(unique):  # one key per row
            plain.add(p)
    for p in (set(pairs) | varies) - plain:
        if p in unaligned:
            reasons.setdefault(
                p,
                "is a MultivariateNormal loc met under different covariances (precision-"
                "weighted) whose positions are not whole rows of it",
            )
    return plain


def _slack(prev: dict, dtype) -> float:
    """How far log p(x) may fall after closed-form updates only: round-off (relative,
    :math:`\\max(10^{-8}, \\sqrt{\\epsilon})`) plus what their regularization may cost."""
    roundoff = max(1e-8, torch.finfo(dtype).eps ** 0.5) * (1.0 + abs(prev["objective"]))
    return roundoff + _nats(prev.get("allowance", 0.0))


class _Allowance:
    """The allowance of one M-step: each maximizer's total (``allowance_parts``), added from
    ``start`` in the order they ran, computed when first read."""

    def __init__(self, start: float = 0.0) -> None:
        self._start = float(start)
        self._parts: list = []
        self._value: float | None = self._start

    def add(self, parts) -> None:
        self._parts.append(parts)
        self._value = None

    def value(self) -> float:
        if self._value is None:
            total = self._start
            for parts in self._parts:
                total += sum_allowance(parts)
            self._value = total
        return self._value


def _nats(allowance) -> float:
    """An allowance as a float (a stored float, or an :class:`_Allowance`)."""
    return allowance.value() if isinstance(allowance, _Allowance) else float(allowance)


def _moved(old: dict, new: dict, names) -> list[str]:
    """The params among ``names`` whose value differs between ``old`` and ``new``."""
    return [n for n in names if n in old and n in new and not torch.equal(old[n], new[n])]


def _minibatch(posterior: Posterior) -> bool:
    """Whether ``posterior`` is of a minibatch (a plate subsampled to fewer than its size)."""
    sub = posterior.subsample
    return sub is not None and any(
        isinstance(site.get("fn"), Subsample)
        and site["fn"].subsample_size is not None
        and site["fn"].subsample_size < site["fn"].size
        for site in sub.nodes.values()
    )


def _dtype(plan: Plan) -> torch.dtype:
    """The dtype of the plan's params (that of the log-likelihoods computed from them)."""
    store = pyro.get_param_store()
    name = next(iter(plan.space.offsets), None)
    return store[name].dtype if name is not None else torch.get_default_dtype()


def _tracked_params(fn) -> set[str]:
    out: set[str] = set()
    for value in vars(fn).values():
        if isinstance(value, Tracked):
            out |= set(value.param_names)
        elif isinstance(value, torch.distributions.Distribution):
            out |= _tracked_params(value)
    return out
