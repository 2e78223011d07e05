"""Evaluation after training: the importance-sampled log-likelihood (IWAE bound), the ELBO
split into reconstruction and KL, KL per latent dimension, active units, and the amortization
gap.

For each datum :math:`x_i`, with :math:`S` draws :math:`z^{(s)} \\sim q(z \\mid x_i)` and the
model's enumerated discrete sites :math:`c` summed out exactly,

.. math:: w_s = \\frac{\\sum_c p_\\theta(x_i, c, z^{(s)})}{q(z^{(s)} \\mid x_i)}, \\qquad
          \\widehat{\\log p}(x_i) = \\log \\frac1S \\sum_s w_s \\;\\le\\; \\log p_\\theta(x_i)
          \\text{ in expectation},

rising with :math:`S` towards :math:`\\log p_\\theta(x_i)` (Burda et al., 2016); with
:math:`S = 1` its mean is the ELBO. Everything is per datum: global latents (outside the data
plate) are held at the guide's point value (its median) and their own densities left out, so
the estimates are of :math:`\\log p(x_i \\mid \\text{globals})`. (``RenyiELBO(alpha=0)`` is not
used: it bounds the whole data set's likelihood when a global site exists, and draws
enumerated sites from the prior instead of summing them.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae import _compat
from pyro_emvae._compat import packed
from pyro_emvae.amortized import (
    AmortizedGuide,
    ForceSubsample,
    find_data_plate,
    frames_of,
    latent_sites,
    preserved_rng,
    prototype_trace,
)

__all__ = [
    "AmortizationGap",
    "Diagnostics",
    "LogMarginal",
    "amortization_gap",
    "diagnostics",
    "log_marginal",
    "score",
]

_PARTICLES = "_iwae_particles"


@dataclass
class LogMarginal:
    """Importance-sampled :math:`\\log p(x_i)` per datum (see :func:`log_marginal`).

    Attributes:
        per_datum: the IWAE estimate for each datum, shape ``(N,)`` (nats).
        stderr: its standard error by the delta method, :math:`\\mathrm{sd}(w)/(\\sqrt S\\,
            \\bar w)`, per datum.
        elbo: the mean of :math:`\\log w` per datum (the single-sample ELBO estimate).
        ess: the effective sample size :math:`(\\sum w)^2 / \\sum w^2` per datum.
        num_samples: S.

    With weights :math:`w_s = p(x_i, z_s) / q(z_s \\mid x_i)`, the estimate is :math:`\\log \\frac1S
    \\sum_s w_s`, above the ELBO estimate :math:`\\frac1S \\sum_s \\log w_s` (Jensen); the ESS is
    between 1 and S:

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import log_marginal
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the prior as q: a poor proposal, and the ESS says so
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> est = log_marginal(model, guide, torch.tensor([0.0, 4.0]), num_samples=200)
        >>> est.per_datum.shape, est.stderr.shape, est.num_samples
        (torch.Size([2]), torch.Size([2]), 200)
        >>> bool((est.elbo <= est.per_datum).all()), bool(est.ess[1] < est.ess[0])
        (True, True)
    """

    per_datum: torch.Tensor
    stderr: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    num_samples: int

    @property
    def total(self) -> float:
        """The estimate summed over the data."""
        return float(self.per_datum.sum())

    @property
    def total_stderr(self) -> float:
        """The standard error of :attr:`total` (the data's estimates are independent)."""
        return float(self.stderr.pow(2).sum().sqrt())

    def mean(self) -> float:
        """The estimate per datum, averaged over the data."""
        return float(self.per_datum.mean())

    def __repr__(self) -> str:
        n = len(self.per_datum)
        return (
            f"LogMarginal(total={self.total:.6g} ± {self.total_stderr:.2g}, "
            f"mean={self.mean():.6g}/datum over {n}, num_samples={self.num_samples}, "
            f"median ESS={float(self.ess.median()):.3g})"
        )


# ---------------------------------------------------------------------------- the weights
@dataclass
class _Setup:
    frame: Any  # the data plate's frame, or None
    depth: int  # max plate nesting
    batches: list[torch.Tensor | None]  # data indices per pass (None: the whole plate)
    keep: list[slice]  # which entries of each pass are new (the last batch may overlap)
    n_data: int
    fixed: dict[str, torch.Tensor]  # global latents held at a point


def _matched(model, guide):
    """An AmortizedGuide built for another version of the model (a minibatch model scored
    without subsampling) reads its plates from the model being evaluated."""
    if isinstance(guide, AmortizedGuide) and guide.local is not None:
        return guide.with_model(model)
    return guide


def _plan(model, guide, args, kwargs, data_plate, batch_size) -> _Setup:
    tr = prototype_trace(model, args, kwargs)
    frame = find_data_plate(tr, data_plate)
    dims = [
        f.dim
        for s in prune_subsample_sites(tr).nodes.values()
        if s["type"] == "sample"
        for f in frames_of(s)
    ]
    gtr = prototype_trace(guide, args, kwargs)
    dims += [
        f.dim
        for s in prune_subsample_sites(gtr).nodes.values()
        if s["type"] == "sample"
        for f in frames_of(s)
    ]
    depth = -min(dims) if dims else 0
    for site in latent_sites(tr):
        if site["infer"].get("enumerate") == "parallel" and (
            frame is None or frame not in frames_of(site)
        ):
            raise ValueError(
                f"site '{site['name']}' is an enumerated discrete site outside the data plate: "
                "it couples the data, so there is no per-datum log p(x_i). For a model "
                "with only discrete latents, ExactEStep(model).log_likelihood(...) is exact."
            )
    fixed = _global_point(guide, tr, frame, args, kwargs)
    if frame is None:
        return _Setup(None, depth, [None], [slice(None)], 1, fixed)
    full = frame.full_size or frame.size
    if frame.size == full:
        return _Setup(frame, depth, [None], [slice(None)], full, fixed)
    size = frame.size  # a subsampled plate takes batches of its own subsample size
    if batch_size is not None and batch_size != size:
        raise ValueError(
            f"batch_size={batch_size}: plate '{frame.name}' subsamples {size} of {full}, and "
            "evaluation goes through the model's own plate, so batches have its size"
        )
    batches, keep = [], []
    for start in range(0, full, size):
        stop = min(start + size, full)
        lo = stop - size  # the last batch overlaps the one before, to keep the plate's size
        batches.append(torch.arange(lo, stop))
        keep.append(slice(start - lo, size))
    return _Setup(frame, depth, batches, keep, full, fixed)


def _global_point(guide, tr, frame, args, kwargs) -> dict[str, torch.Tensor]:
    """Global latents (outside the data plate) at the guide's median."""
    names = [
        s["name"]
        for s in latent_sites(tr)
        if (frame is None or frame not in frames_of(s))
        and s["infer"].get("enumerate") != "parallel"
    ]
    if not names:
        return {}
    inner = guide.global_guide if isinstance(guide, AmortizedGuide) else guide
    with torch.no_grad(), poutine.block(), preserved_rng():
        if isinstance(inner, AutoGuide):
            point = inner.median(*args, **kwargs)
        else:  # a guide of the user's: the median of each global site's q (else its mean)
            gtr = poutine.trace(guide).get_trace(*args, **kwargs)
            point = {}
            for n in names:
                if n in gtr.nodes:
                    fn = gtr.nodes[n]["fn"]
                    try:
                        point[n] = fn.median
                    except (AttributeError, NotImplementedError):
                        try:
                            point[n] = fn.mean
                        except NotImplementedError:
                            point[n] = gtr.nodes[n]["value"]
    return {n: point[n].detach() for n in names if n in point}


def _as_target(t: torch.Tensor, symbols: list[str], sizes: list[int]) -> torch.Tensor:
    """A packed tensor -> a plain one over exactly ``symbols`` (broadcast where absent)."""
    dims = _compat.pyro_dims(t, "")
    extra = [d for d in dims if d not in symbols]
    if extra:
        raise RuntimeError(f"unexpected dims {extra} left after contraction")
    order = [dims.index(s) for s in symbols if s in dims]
    out = t.permute(order) if order else t.reshape(())
    shape = [sizes[i] if s in dims else 1 for i, s in enumerate(symbols)]
    return out.reshape(shape).expand(sizes)


class _Pass(NamedTuple):
    """What one vectorized pass gives: per datum ``log w`` ``(n, B)`` and (if asked)
    ``log p(z) - log q(z)`` ``(n, B)``, enumerated sites summed out of both; the traces; and,
    for the sites outside the data plate that are not held fixed, their observed
    log-densities (``global_rec``) and ``log q - log p`` of their latents (``global_kl``),
    ``(n,)`` each, unscaled."""

    log_w: torch.Tensor
    kl_term: torch.Tensor | None
    guide_tr: Any
    model_tr: Any
    global_rec: torch.Tensor
    global_kl: torch.Tensor
    log_q: torch.Tensor  # (n, B): log q(z) per datum


def _reduce(lp: torch.Tensor, symbols: list[str], sizes: list[int]) -> torch.Tensor:
    """Sum a packed log-density over every dim but ``symbols``; shape ``sizes``."""
    dims = _compat.pyro_dims(lp)
    keep = [d for d in dims if d in symbols]
    drop = [i for i, d in enumerate(dims) if d not in symbols]
    summed = lp.sum(drop) if drop else lp  # (a sum over [] would sum everything)
    _compat.set_pyro_dims(summed, "".join(keep))
    return _as_target(summed, symbols, sizes)


def _weights(model, guide, args, kwargs, setup: _Setup, n: int, indices, want_kl: bool) -> _Pass:
    """One pass of ``n`` particles over one batch of data (see :class:`_Pass`)."""
    frame, depth = setup.frame, setup.depth
    particles = pyro.plate(_PARTICLES, n, dim=-(depth + 1))
    cond_guide = poutine.condition(guide, data=setup.fixed) if setup.fixed else guide
    cond_model = poutine.condition(model, data=setup.fixed) if setup.fixed else model
    with ExitStack() as stack:
        if indices is not None:
            stack.enter_context(ForceSubsample(frame.name, indices))
        stack.enter_context(particles)
        guide_tr = poutine.trace(cond_guide).get_trace(*args, **kwargs)
        enum_model = poutine.enum(cond_model, first_available_dim=-(depth + 2))
        model_tr = poutine.trace(poutine.replay(enum_model, trace=guide_tr)).get_trace(
            *args, **kwargs
        )
    model_tr = prune_subsample_sites(model_tr)
    guide_tr = prune_subsample_sites(guide_tr)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    model_tr.pack_tensors()
    guide_tr.pack_tensors(model_tr.plate_to_symbol)
    p2s = model_tr.plate_to_symbol
    symbols = [p2s[_PARTICLES]] + ([p2s[frame.name]] if frame is not None else [])
    batch = frame.size if frame is not None else 1
    sizes = [n] + ([batch] if frame is not None else [])
    target = frozenset(symbols)

    def local(site) -> bool:
        return frame is None or frame in frames_of(site)

    sum_dims = {
        _compat.enum_symbol(s)
        for s in model_tr.nodes.values()
        if s["type"] == "sample" and _compat.enum_dim(s) is not None
    }
    joint: OrderedDict = OrderedDict()
    prior: OrderedDict = OrderedDict()
    like = next(  # a traced log-density: new tensors go on its device, in its dtype
        s["log_prob"]  # (not a value: integer data, a categorical HMM, has no float value)
        for s in model_tr.nodes.values()
        if s["type"] == "sample"
    )
    global_rec, global_kl = like.new_zeros(n), like.new_zeros(n)
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample" or name in setup.fixed:
            continue
        if not local(site):
            term = _reduce(site["packed"]["unscaled_log_prob"], symbols[:1], [n])
            if site["is_observed"]:
                global_rec = global_rec + term
            else:
                global_kl = global_kl - term
            continue
        lp = site["packed"]["unscaled_log_prob"]
        if _compat.enum_dim(site) is None:
            # as TraceEnum_ELBO: an enumerated site keeps its unmasked prior, the others' masks
            # act inside the sum (and may read an enumerated value: packed, to keep its dims)
            lp = packed.scale_and_mask(lp, mask=site["packed"]["mask"])
        ordinal = frozenset(p2s[f.name] for f in frames_of(site))
        joint.setdefault(ordinal, []).append(lp)
        if not site["is_observed"]:
            prior.setdefault(ordinal, []).append(lp)
    log_q = like.new_zeros(sizes)
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in setup.fixed:
            continue
        if local(site):
            log_q = log_q + _reduce(site["packed"]["unscaled_log_prob"], symbols, sizes)
        else:
            global_kl = global_kl + _reduce(site["packed"]["unscaled_log_prob"], symbols[:1], [n])
    # size-1 plates are dropped by packing: the ring must know their sizes to broadcast
    dim_to_size = {
        p2s[f.name]: f.size
        for s in model_tr.nodes.values()
        if s["type"] == "sample"
        for f in frames_of(s)
    }

    def contract(tree):
        ring = LogRing(dim_to_size=dim_to_size)
        return contract_to_tensor(tree, sum_dims, target_ordinal=target, ring=ring)

    log_p = _as_target(contract(joint), symbols, sizes)
    log_w = log_p - log_q
    kl_term = None
    if want_kl:
        if prior:
            log_pz = contract(prior)
            kl_term = _as_target(log_pz, symbols, sizes) - log_q
        else:
            kl_term = -log_q
    return _Pass(log_w, kl_term, guide_tr, model_tr, global_rec, global_kl, log_q)


def _chunks(num_samples: int, chunk_size: int | None) -> list[int]:
    chunk = num_samples if chunk_size is None else max(1, min(chunk_size, num_samples))
    out = [chunk] * (num_samples // chunk)
    if num_samples % chunk:
        out.append(num_samples % chunk)
    return out


def _summarize(log_w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``log w`` ``(S, N)`` -> IWAE estimate, delta-method standard error, ELBO, ESS."""
    s = log_w.shape[0]
    est = torch.logsumexp(log_w, 0) - math.log(s)
    r = (log_w - est).exp()  # w / mean(w), mean 1
    stderr = r.std(0, unbiased=s > 1) / math.sqrt(s) if s > 1 else torch.full_like(est, math.inf)
    ess = r.sum(0) ** 2 / r.pow(2).sum(0)
    return est, stderr, log_w.mean(0), ess


def log_marginal(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int | None = 100,
    batch_size: int | None = None,
    data_plate: str | None = None,
    **kwargs: Any,
) -> LogMarginal:
    """Importance-sampled estimate of :math:`\\log p_\\theta(x_i)` for every datum, with ``guide``
    as the proposal (the IWAE bound), enumerated discrete sites summed out exactly.

    Draws are vectorized under a particle plate (the model must broadcast, as for
    ``Trace_ELBO(vectorize_particles=True)``), ``chunk_size`` at a time, so 1000+ samples
    fit in memory. A subsampled data plate is walked in batches of its own subsample size,
    so every datum is scored once.

    Args:
        model, guide: the model and a guide for its continuous latents (any guide: an
            :class:`~pyro_emvae.amortized.AmortizedGuide`, an AutoGuide, your own).
        num_samples: S, draws per datum.
        chunk_size: draws per vectorized pass (``None``: all at once).
        batch_size: must equal the model's subsample size if given (the plate fixes it).
        data_plate: the data plate's name (default: the subsampled plate, else the outermost
            plate of every observed site).

    Returns:
        a :class:`LogMarginal` with ``per_datum``, ``stderr``, ``elbo``, ``ess`` per datum.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the exact posterior: every weight equals p(x)
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
        >>> x = torch.tensor([0.0, 1.0])
        >>> est = log_marginal(model, guide, x, num_samples=10)
        >>> torch.allclose(est.per_datum, dist.Normal(0.0, 2 ** 0.5).log_prob(x))
        True
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    guide = _matched(model, guide)
    setup = _plan(model, guide, args, kwargs, data_plate, batch_size)
    with torch.no_grad():
        log_w = _log_weights(model, guide, args, kwargs, setup, num_samples, chunk_size)
    _check_finite(log_w, "log_marginal")
    return LogMarginal(*_summarize(log_w), num_samples=num_samples)


def _log_weights(model, guide, args, kwargs, setup, num_samples, chunk_size) -> torch.Tensor:
    """``log w`` ``(S, N)`` over every datum."""
    out = []
    for indices, keep in zip(setup.batches, setup.keep, strict=True):
        parts = [
            _weights(model, guide, args, kwargs, setup, n, indices, False)[0]
            for n in _chunks(num_samples, chunk_size)
        ]
        log_w = torch.cat(parts, 0)
        if setup.frame is None:  # no data plate: the whole data set is one datum
            log_w = log_w.reshape(-1, 1)
        out.append(log_w[:, keep])
    return torch.cat(out, 1)


def _check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise FloatingPointError(
            f"{what}: a non-finite importance weight (datum {where[-1]}): the model gives "
            "zero density to a draw of the guide, or the guide's density underflowed"
        )


# ---------------------------------------------------------------------------- diagnostics
@dataclass
class Diagnostics:
    """What :func:`diagnostics` measures (nats; "per datum" means averaged over the data).

    Attributes:
        elbo: the ELBO summed over the data (Monte Carlo, ``num_samples`` draws per datum).
        reconstruction: :math:`\\sum_i \\mathbb E_q[\\log p(x_i \\mid z_i)]` (enumerated sites
            summed out).
        kl: :math:`\\sum_i \\mathbb E_q[\\log q(z_i \\mid x_i) - \\log p(z_i)]`; elbo =
            reconstruction - kl.
        kl_per_dim: site -> KL per latent element, averaged over the data (analytic for a
            Normal q against a Normal prior, else Monte Carlo); sites whose prior depends on
            an enumerated site (a mixture prior) have no per-element KL and are left out.
        activity: site -> :math:`\\mathrm{Var}_x(\\mathbb E_q[z_u])` per latent element.
        active_units: site -> the number of elements whose activity exceeds ``threshold``.
        log_marginal: the IWAE estimate from the same draws.
        n_data: the number of data.
        notes: what was left out and why.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import diagnostics
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z[..., :1], 1.0).to_event(1), obs=x)
        >>> def guide(x):  # unit 0 reads the datum, unit 1 stays at the prior (collapsed)
        ...     with pyro.plate("data", len(x)):
        ...         loc = torch.cat([x / 2, torch.zeros_like(x)], -1)
        ...         pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        >>> d = diagnostics(model, guide, torch.randn(50, 1), num_samples=10)
        >>> d.kl_per_dim["z"].shape, d.active_units["z"], d.n_data
        (torch.Size([2]), 1, 50)
        >>> abs(d.elbo - (d.reconstruction - d.kl)) < 1e-6 * abs(d.elbo)
        True
    """

    elbo: float
    reconstruction: float
    kl: float
    kl_per_dim: dict[str, torch.Tensor]
    activity: dict[str, torch.Tensor]
    active_units: dict[str, int]
    log_marginal: LogMarginal
    n_data: int
    threshold: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        n = self.n_data
        lm = self.log_marginal
        iwae = (
            f"IWAE-{lm.num_samples:<10d} {lm.mean():11.4f} nats/datum (± {lm.total_stderr / n:.2g})"
        )
        lines = [
            f"ELBO            {self.elbo / n:12.4f} nats/datum  (total {self.elbo:.6g})",
            f"  reconstruction {self.reconstruction / n:11.4f}",
            f"  KL             {self.kl / n:11.4f}",
            iwae,
        ]
        for site, k in self.kl_per_dim.items():
            vals = ", ".join(f"{v:.3g}" for v in k.tolist()[:16])
            more = " ..." if k.numel() > 16 else ""
            lines.append(f"KL per dim [{site}]: {vals}{more}")
        for site, a in self.active_units.items():
            total = self.activity[site].numel()
            lines.append(
                f"active units [{site}]: {a} of {total} (Var_x E_q[z] > {self.threshold:g})"
            )
        lines += [f"note: {m}" for m in self.notes]
        return "\n".join(lines)


def _per_element(fn, value):
    """Elementwise log-density of a factorized distribution, or ``None``."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    if fn.event_dim == 0 and not isinstance(fn, dist.TransformedDistribution):
        return fn, fn.log_prob(value)
    return None, None


def _layout(t: torch.Tensor, value: torch.Tensor, event_dim: int, depth: int, frame):
    """A tensor broadcast to a site value laid out ``(particles, B, n)``."""
    t = t.expand(value.shape)
    t = t.movedim(-(depth + 1) - event_dim, 0)
    if frame is not None:
        t = t.movedim(frame.dim - event_dim, 1)
    else:
        t = t.unsqueeze(1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def diagnostics(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 100,
    chunk_size: int | None = 100,
    threshold: float = 0.01,
    data_plate: str | None = None,
    **kwargs: Any,
) -> Diagnostics:
    """The ELBO split into reconstruction and KL, KL per latent dimension, and active units.

    A unit :math:`u` of a latent site is *active* when
    :math:`\\mathrm{Var}_{x}\\big(\\mathbb E_{q(z|x)}[z_u]\\big) > ` ``threshold`` (Burda et al.,
    2016): an inactive unit's posterior does not depend on the datum, and its KL per
    dimension hugs zero (the prior) - posterior collapse. Also returns the IWAE estimate from
    the same ``num_samples`` draws per datum.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z[..., :1], 1.0).to_event(1), obs=x)
        >>> def guide(x):  # unit 0 reads the datum, unit 1 is the prior
        ...     with pyro.plate("data", len(x)):
        ...         loc = torch.cat([x / 2, torch.zeros_like(x)], -1)
        ...         pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        >>> d = diagnostics(model, guide, torch.randn(50, 1), num_samples=10)
        >>> d.active_units["z"]
        1
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    guide = _matched(model, guide)
    setup = _plan(model, guide, args, kwargs, data_plate, None)
    if setup.n_data < 2:
        raise ValueError(
            f"diagnostics need at least 2 data (active units are a variance over the data), "
            f"got {setup.n_data}"
        )
    log_ws, kls, elem_kl, means = [], [], {}, {}
    notes: list[str] = []
    with torch.no_grad():
        for indices, keep in zip(setup.batches, setup.keep, strict=True):
            w_parts, k_parts = [], []
            sums: dict[str, torch.Tensor] = {}
            mean_sums: dict[str, torch.Tensor] = {}
            for n in _chunks(num_samples, chunk_size):
                log_w, kl_term, gtr, mtr, _, _, _ = _weights(
                    model, guide, args, kwargs, setup, n, indices, True
                )
                w_parts.append(log_w)
                k_parts.append(kl_term)
                for name, q_site in gtr.nodes.items():
                    if q_site["type"] != "sample" or q_site["is_observed"]:
                        continue
                    if name in setup.fixed or (
                        setup.frame is not None and setup.frame not in frames_of(q_site)
                    ):
                        continue
                    value, ev = q_site["value"], q_site["fn"].event_dim
                    try:
                        m = q_site["fn"].mean
                    except NotImplementedError:
                        m = value
                    m = _layout(m, value, ev, setup.depth, setup.frame).sum(0)
                    mean_sums[name] = mean_sums.get(name, 0) + m
                    k = _elementwise_kl(q_site, mtr.nodes.get(name), setup)
                    if k is None:
                        if not any(name in s for s in notes):
                            notes.append(
                                f"no KL per dimension for '{name}': its prior or q does not "
                                "factor over elements (e.g. a mixture prior)"
                            )
                        continue
                    sums[name] = sums.get(name, 0) + _layout(
                        k, value, ev, setup.depth, setup.frame
                    ).sum(0)
            log_ws.append(torch.cat(w_parts, 0)[:, keep])
            kls.append(torch.cat(k_parts, 0)[:, keep])
            for name, v in sums.items():
                elem_kl.setdefault(name, []).append(v[keep] / num_samples)
            for name, v in mean_sums.items():
                means.setdefault(name, []).append(v[keep] / num_samples)
    log_w = torch.cat(log_ws, 1)
    _check_finite(log_w, "diagnostics")
    neg_kl = torch.cat(kls, 1)
    lm = LogMarginal(*_summarize(log_w), num_samples=num_samples)
    elbo = float(log_w.mean(0).sum())
    kl = float(-neg_kl.mean(0).sum())
    kl_per_dim = {k: torch.cat(v, 0).mean(0) for k, v in elem_kl.items()}
    activity = {k: torch.cat(v, 0).var(0, unbiased=True) for k, v in means.items()}
    active = {k: int((a > threshold).sum()) for k, a in activity.items()}
    return Diagnostics(
        elbo=elbo,
        reconstruction=elbo + kl,
        kl=kl,
        kl_per_dim=kl_per_dim,
        activity=activity,
        active_units=active,
        log_marginal=lm,
        n_data=setup.n_data,
        threshold=threshold,
        notes=notes,
    )


def _elementwise_kl(q_site, p_site, setup: _Setup):
    """KL per latent element at the draws: analytic for Normal against Normal, else
    ``log q - log p`` elementwise; ``None`` when either side does not factor over elements or
    the prior depends on an enumerated site (its log-density then carries enumeration dims)."""
    if p_site is None:
        return None
    value = q_site["value"]
    qb, q_lp = _per_element(q_site["fn"], value)
    pb, p_lp = _per_element(p_site["fn"], value)
    if qb is None or pb is None or p_lp.dim() > value.dim():
        return None
    if isinstance(qb, dist.Normal) and isinstance(pb, dist.Normal):
        k = torch.distributions.kl_divergence(qb, pb)
        if k.dim() <= value.dim():
            return k
    return q_lp - p_lp


# ---------------------------------------------------------------------------- amortization gap
@dataclass
class AmortizationGap:
    """The ELBO per datum with the encoder's q and with free per-datum q's optimized from it
    (see :func:`amortization_gap`).

    Attributes:
        encoder_elbo: ``(N,)`` ELBO per datum with q from the encoder.
        optimized_elbo: ``(N,)`` ELBO per datum with each datum's q optimized on its own.
        steps: optimization steps taken.

    The gap is the mean of ``optimized_elbo - encoder_elbo`` per datum, :math:`\\ge 0` up to the
    optimizer's reach:

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import AmortizedGuide, amortization_gap
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        >>> guide = AmortizedGuide(model, hidden=())  # untrained
        >>> g = amortization_gap(model, guide, 3 * torch.randn(20, 1), steps=20)
        >>> g.encoder_elbo.shape, g.optimized_elbo.shape, g.steps
        (torch.Size([20]), torch.Size([20]), 20)
        >>> g.gap > 0  # an untrained encoder: freeing each q gains ELBO
        True
    """

    encoder_elbo: torch.Tensor
    optimized_elbo: torch.Tensor
    steps: int

    @property
    def gap(self) -> float:
        """Mean over the data of ``optimized_elbo - encoder_elbo`` (nats per datum): what the
        encoder loses by sharing its parameters across the data."""
        return float((self.optimized_elbo - self.encoder_elbo).mean())

    def __repr__(self) -> str:
        return (
            f"AmortizationGap(gap={self.gap:.4g} nats/datum, encoder ELBO "
            f"{float(self.encoder_elbo.mean()):.6g}, optimized {float(self.optimized_elbo.mean()):.6g}"
            f"/datum, steps={self.steps})"
        )


def amortization_gap(
    model: Callable,
    guide: AmortizedGuide,
    *args: Any,
    steps: int = 300,
    lr: float = 0.05,
    num_particles: int = 8,
    num_samples: int = 200,
    chunk_size: int | None = 100,
    **kwargs: Any,
) -> AmortizationGap:
    """The amortization gap (Cremer et al., 2018): each datum's q is freed from the encoder
    (initialized at the encoder's output) and optimized on its own ELBO with the model held
    fixed, by ``steps`` Adam steps (learning rate decayed from ``lr`` to ``lr / 1000``) on
    ``num_particles``-sample reparameterized estimates; both
    ELBOs are then estimated with ``num_samples`` draws per datum. The remaining distance to
    :math:`\\log p(x)` (e.g. :func:`log_marginal`) is the approximation gap of q's family.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        >>> guide = AmortizedGuide(model, hidden=())  # untrained: q far from the posterior
        >>> g = amortization_gap(model, guide, 3 * torch.randn(20, 1), steps=20)
        >>> g.gap > 0
        True
    """
    if not isinstance(guide, AmortizedGuide):
        raise TypeError(f"amortization_gap needs an AmortizedGuide, got {type(guide).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if num_particles < 1 or num_samples < 1:
        raise ValueError(
            f"num_particles and num_samples must be >= 1, got {num_particles}, {num_samples}"
        )
    guide = _matched(model, guide)
    setup = _plan(model, guide, args, kwargs, None, None)
    with torch.no_grad():
        enc = _log_weights(model, guide, args, kwargs, setup, num_samples, chunk_size).mean(0)
    init = guide.local_params(*args, **kwargs)
    leaves: dict[str, dict[str, torch.Tensor]] = {}
    for key, p in init.items():
        leaf = {"loc": p["loc"], "log_scale": p["scale"].log()}
        if "factor" in p:
            leaf["factor"] = p["factor"]
        if "scale_tril" in p:
            leaf["tril"] = p["scale_tril"].tril(-1)
        leaves[key] = {k: v.clone().requires_grad_() for k, v in leaf.items()}

    def current() -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for key, leaf in leaves.items():
            d = {"loc": leaf["loc"], "scale": leaf["log_scale"].exp()}
            if "factor" in leaf:
                d["factor"] = leaf["factor"]
            if "tril" in leaf:
                d["scale_tril"] = leaf["tril"].tril(-1) + torch.diag_embed(d["scale"])
            out[key] = d
        return out

    flat = [t for leaf in leaves.values() for t in leaf.values()]
    opt = torch.optim.Adam(flat, lr=lr)
    # Adam keeps stepping ~lr at an optimum: decay to lr/1000 so the end point is not jitter
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1e-3 ** (t / max(steps, 1)))
    try:
        for _ in range(steps):
            guide.override(current())
            loss = 0.0
            for indices, keep in zip(setup.batches, setup.keep, strict=True):
                log_w = _weights(model, guide, args, kwargs, setup, num_particles, indices, False)[
                    0
                ]
                loss = loss - log_w[:, keep].mean(0).sum()
            grads = torch.autograd.grad(loss, flat)
            for t, g in zip(flat, grads, strict=True):
                t.grad = g
            opt.step()
            decay.step()
        with torch.no_grad():
            guide.override({k: {p: v.detach() for p, v in d.items()} for k, d in current().items()})
            opt_elbo = _log_weights(model, guide, args, kwargs, setup, num_samples, chunk_size)
    finally:
        guide.override(None)
    return AmortizationGap(enc, opt_elbo.mean(0), steps)


# ---------------------------------------------------------------------------- held-out score
def _no_latents(*args: Any, **kwargs: Any) -> None:
    """The guide of a model whose latents are all enumerated: nothing to draw."""


def score(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    per: str = "value",
    **kwargs: Any,
) -> float:
    """Mean log-likelihood of (held-out) data under the fitted params, as scikit-learn's
    ``score``: exact when ``guide`` is an :class:`~pyro_emvae.estep.ExactEStep` (the discrete
    latents are summed out), else the IWAE estimate with ``num_samples`` draws per datum
    (:func:`log_marginal`).

    ``per`` is the unit it is averaged over:

    * ``"value"`` (the default): per observed value, the unit of ``fit``'s ``n_data``,
      :meth:`~pyro_emvae.fit.FitResult.per_datum`, ``tol`` and BIC
      (:func:`~pyro_emvae.validate.observed_count`): a row of a mixture, a time step of an HMM
      (the unmasked ones), so ``score`` on the training data equals ``result.per_datum()``;
    * ``"row"``: per element of the data plate (a sequence of an HMM; the whole data when the
      model has no plate): ``log_marginal(...).mean()``, and the unit of ``score`` in
      pyro_emvae 0.1.0. For a mixture with one observed site per row the two are equal.

    Numpy arrays and pandas DataFrames are converted as :func:`~pyro_emvae.fit.fit` converts
    them (:func:`~pyro_emvae.validate.model_inputs`).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
        >>> x = torch.tensor([0.0, 2.0])
        >>> exact = dist.Normal(torch.tensor([0.0, 2.0]), 1.0).log_prob(x[:, None]).exp().mean(-1)
        >>> abs(score(model, ExactEStep(model), x) - float(exact.log().mean())) < 1e-6
        True
    """
    from pyro_emvae.estep import ExactEStep, _ExactViewModel
    from pyro_emvae.validate import count_observed, model_inputs

    if per not in ("value", "row"):
        raise ValueError(f"per must be 'value' or 'row', got {per!r}")
    args, kwargs = model_inputs(args, kwargs)
    exact = isinstance(guide, ExactEStep)
    if exact:
        # the model as the E-step reads it (obs_mask's missing discrete labels enumerated)
        model = _ExactViewModel(model)
    est = log_marginal(
        model,
        _no_latents if exact else guide,
        *args,
        num_samples=1 if exact else num_samples,
        **kwargs,
    )
    if per == "row":
        return est.mean()
    # (counted as fit counts: under ExactEStep, obs_mask's missing events are not data)
    n = count_observed(guide.model if exact else model, args, kwargs)
    return est.total / max(n, 1)
