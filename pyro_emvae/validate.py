"""Input validation: clear errors before any work, instead of silent NaNs or obscure failures.

Every check reads one trace of the model (the first trace an
:class:`~pyro_emvae.estep.ExactEStep` takes for a set of arguments, or the prior trace that
:func:`~pyro_emvae.fit.fit` takes) and raises an exception whose message names the site or
param, the shape or value at fault, and what to do:

=================================================  ==========================================
check                                              raises
=================================================  ==========================================
NaN / inf / out-of-support observed values         :class:`ModelInputError`
(:func:`check_observed`)
non-finite params (:func:`check_params`)           :class:`ModelInputError`
NaN distribution arguments, e.g. from a NaN        :class:`ModelInputError`
covariate (:func:`check_distributions`)
value shapes that disagree with the plates or the  :class:`ModelInputError`
event shape (:func:`check_shapes`)
a dependence longer than a ``pyro.markov`` window  :class:`~pyro_emvae.estep.EnumerationError`
(:func:`check_markov`)
an enumeration larger than memory                  :class:`~pyro_emvae.estep.EnumerationError`
(:func:`check_enumeration_memory`)
more components than data, for EM                  :class:`ModelInputError`
(:func:`check_components`)
float32 on long chains (:func:`check_precision`)   :class:`PrecisionWarning` (a warning)
=================================================  ==========================================

Pyro's own errors from a model run that fails before a trace exists (a NaN distribution
argument under validation, a plate that disagrees with a batch shape, more than 64 enumerated
dims) are re-raised with the same information by :func:`explain_model_errors`.

:class:`~pyro_emvae.estep.ExactEStep` runs its checks on the first enumerated trace of each
set of arguments (:func:`validate_estep_trace`), before any log-prob is computed;
:func:`validate_fit_inputs` holds the checks for :func:`~pyro_emvae.fit.fit`.

Missing data. Under ``ExactEStep``, Pyro's ``obs_mask=`` works: the missing events drop out
of :math:`\\log p(x)` exactly (see ``estep._IntegrateObsMask``). Or fill the missing entries
with any finite value and mask their log-prob: per entry,
``dist.Normal(loc, scale).mask(observed).to_event(1)`` (the mask has the value's shape, so a
partially observed row keeps the likelihood of its observed entries), or per row,
``with poutine.mask(mask=observed_rows): pyro.sample(...)``. The masked entries then drop out
of :math:`\\log p(x)` exactly, which is the marginal likelihood of the observed entries when the
entries of an event are independent given the latents (a diagonal Normal, a product of
Bernoullis or Poissons). The fill value must be finite even where masked: masked entries still
enter the closed-form M-step's sums with weight 0, and ``0 * nan`` is ``nan``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import DiscreteHMM, constraints
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae.amortized import frames_of, preserved_rng

__all__ = [
    "ModelInputError",
    "PrecisionWarning",
    "available_memory",
    "check_components",
    "check_distributions",
    "check_enumeration_memory",
    "check_markov",
    "check_observed",
    "check_params",
    "check_precision",
    "check_shapes",
    "explain_model_errors",
    "validate_estep_trace",
    "validate_fit_inputs",
]


class ModelInputError(ValueError):
    """Bad data, shapes or initial params, found before any work; the message names the site or
    param, the shape or value at fault, and what to do."""


class PrecisionWarning(UserWarning):
    """The dtype is too coarse for the computation asked (float32 on long chains)."""


#: The E-step holds about this many tensors the size of its largest factor at once (the
#: log-prob, its masked and packed copies, the contraction's intermediates and the backward
#: pass's gradient). Measured peak resident memory over the largest factor: 4.4-6.5 on GMMs
#: (N up to 1e6, D up to 10), DiscreteHMMs (T up to 1e5) and 2**16 jointly enumerated global
#: sites; the low end is used, so that the check only refuses what cannot fit.
PEAK_FACTORS = 4

#: Float32 error of chain posteriors: the largest absolute error of posterior marginals,
#: divided by ``eps * |log p(x of one chain)|``, measured 0.09-0.40 over DiscreteHMM and
#: ``pyro.markov`` chains (K = 2-16, T = 1e2-1e5, Gaussian D = 1-20 and categorical emissions).
CHAIN_ERROR_PER_NAT = 0.4

#: Warn when the predicted absolute error of a chain's posterior marginals exceeds this.
CHAIN_ERROR_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------- helpers
def _shape(s) -> str:
    return str(tuple(s))


def _index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first True entry of ``mask``."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _show(t: torch.Tensor) -> str:
    """A small tensor's values, or a large one's shape."""
    if t.numel() <= 8:
        return str(t.tolist())
    return f"(a tensor of shape {_shape(t.shape)})"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


def _kind(fn) -> str:
    """``Independent(Normal)``, ``Categorical``..."""
    name = type(fn).__name__
    inner = getattr(fn, "base_dist", None)
    return f"{name}({_kind(inner)})" if inner is not None else name


def _plate_list(frames) -> str:
    if not frames:
        return "no plate"
    return ", ".join(f"plate '{f.name}' (size {f.size}, dim {f.dim})" for f in frames)


def _is_sample(site: dict) -> bool:
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def is_enumerated(site: dict) -> bool:
    """A site that the enum messenger enumerated (it has an enumeration dim)."""
    return site["infer"].get("_enumerate_dim") is not None


def _enumeration_error(message: str) -> Exception:
    from pyro_emvae.estep import EnumerationError  # estep imports this module

    return EnumerationError(message)


def _tensors(fn) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a distribution holds (its own attributes and those of the distributions and
    transforms it wraps), as ``(attribute path, tensor)``; lazily computed attributes that were
    never asked for are not computed."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", fn)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for key, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                yield prefix + key, value
            elif isinstance(value, (torch.distributions.Distribution, dist.transforms.Transform)):
                stack.append((f"{prefix}{key}.", value))
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, (torch.distributions.Distribution, dist.transforms.Transform)):
                        stack.append((f"{prefix}{key}[{i}].", v))


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every broadcast (stride-0) dim sliced to size 1: an expanded view of an
    enumerated factor's parameters is never materialized."""
    return t[
        tuple(
            slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape)
        )
    ]


def _site_dtype(site: dict) -> torch.dtype:
    value = site["value"]
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.dtype
    for _, t in _tensors(site["fn"]):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _site_device(site: dict) -> torch.device:
    value = site["value"]
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _event_dim(fn) -> int:
    return len(fn.event_shape)


def _cardinality(site: dict) -> int | None:
    """The number of values of an enumerable site (None if it cannot say)."""
    fn = site["fn"]
    if isinstance(fn, dist.Bernoulli):
        return 2
    if isinstance(fn, dist.Categorical):
        return int(fn._num_events)
    if not getattr(fn, "has_enumerate_support", False):
        return None
    try:
        return int(fn.enumerate_support(expand=False).shape[0])
    except (NotImplementedError, RuntimeError, ValueError):
        return None


def _hmm_duration(site: dict) -> int:
    fn, value = site["fn"], site["value"]
    return int(value.shape[-1 - fn.observation_dist.event_dim])


# ----------------------------------------------------------------------------------- params
def check_params(trace) -> None:
    """Every ``pyro.param`` the model reads must hold finite values.

    Why: a NaN or inf initial value (or a value outside the param's constraint, which Pyro maps
    to NaN: ``log`` of a negative scale, a negative Cholesky diagonal) makes every later
    log-likelihood NaN. A simplex initial value that does not sum to one is *not* an error:
    Pyro's simplex transform normalizes it (``[1, 3]`` becomes ``[0.25, 0.75]``).
    """
    for name, site in trace.nodes.items():
        if site["type"] != "param":
            continue
        value = detach_provenance(site["value"])
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value.detach())
        if not bad.any():
            continue
        idx = _index(bad)
        msg = (
            f"param '{name}' (shape {_shape(value.shape)}) has {int(bad.sum())} non-finite "
            f"value(s), the first {float(value.detach()[idx])} at index {idx}."
        )
        init = site["args"][1] if len(site["args"]) > 1 else None
        constraint = site["kwargs"].get("constraint")
        if isinstance(init, torch.Tensor) and init.is_floating_point():
            init = init.detach()
            if not torch.isfinite(init).all():
                msg += f" Its initial value in pyro.param has non-finite entries: {_show(init)}."
            elif constraint is not None:
                try:
                    ok = constraint.check(init)
                except (RuntimeError, ValueError):  # pragma: no cover - exotic constraints
                    ok = None
                if ok is not None and not bool(torch.as_tensor(ok).all()):
                    msg += (
                        f" Its initial value {_show(init)} is outside its constraint "
                        f"{constraint}, which Pyro maps to NaN."
                    )
        msg += (
            " Give pyro.param a finite initial value inside its constraint; if the param is "
            f"already in the param store, reset it (del pyro.get_param_store()['{name}'] or "
            "pyro.clear_param_store())."
        )
        raise ModelInputError(msg)


# ----------------------------------------------------------------------------------- data
def check_observed(trace, *, exact: bool = True) -> None:
    """Observed values must be finite, and inside their distribution's support.

    Why: a NaN in the data makes :math:`\\log p(x)` NaN (with Pyro's validation off) or fails
    deep inside ``log_prob``; an inf gives :math:`-\\infty`, which ``fit`` then reports as a
    diverged iteration; a count of -1 under a Poisson gives a finite but meaningless log-prob.
    Masked entries count too: they still enter the closed-form M-step's sums with weight 0, and
    ``0 * nan`` is ``nan``. The support is checked only where the distribution validates its
    arguments (Pyro's validation on, and no ``validate_args=False``). ``exact`` says whether
    the model runs under :class:`~pyro_emvae.estep.ExactEStep` (whose advice on missing data
    differs: it integrates ``obs_mask=``'s missing events out).
    """
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site) or not site["is_observed"]:
            continue
        value = site["value"]
        if not isinstance(value, torch.Tensor):
            continue
        value = detach_provenance(value)
        if value.is_floating_point() or value.is_complex():
            _check_finite_value(name, site, value, exact)
        _check_support(name, site, value)


def check_distributions(trace) -> None:
    """The tensors each sample site's distribution holds (built by the model from its inputs
    and params) must not be NaN.

    Why: a NaN covariate or a NaN computed from a param makes the site's log-prob NaN; with
    Pyro's validation on the model fails while building the distribution (a message that names
    the argument but not the site), with it off the NaN is silent. Infinite entries are allowed
    (``-inf`` logits are zero probabilities).
    """
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site):
            continue
        fn = site["fn"]
        for attr, t in _tensors(fn):
            t = detach_provenance(t)
            if not t.is_floating_point():
                continue
            t = _compact(t)
            bad = torch.isnan(t)
            if bad.any():
                raise ModelInputError(
                    f"site '{name}' ({_kind(fn)}): its distribution's '{attr}' (shape "
                    f"{_shape(t.shape)}) has {int(bad.sum())} NaN value(s), the first at index "
                    f"{_index(bad)}. It is computed from the model's inputs and params: check "
                    "the tensors passed to the model and the params with torch.isfinite."
                )


def _missing_data_advice(exact: bool) -> str:
    mask_way = (
        "fill them with any finite value (e.g. torch.nan_to_num(x)) and mask their log-prob: "
        "dist.Normal(loc, scale).mask(observed).to_event(1) per entry, or "
        "`with poutine.mask(mask=observed_rows):` per row"
    )
    if exact:
        return (
            f"For missing values, use Pyro's obs_mask= (under ExactEStep the missing events "
            f"drop out exactly, whatever their values), or {mask_way}."
        )
    return (
        f"For missing values, {mask_way}; or use Pyro's obs_mask= (its '<name>_unobserved' "
        "latent then needs a guide), still with finite fill values."
    )


def _check_finite_value(name: str, site: dict, value: torch.Tensor, exact: bool) -> None:
    nan = torch.isnan(value)
    inf = torch.isinf(value)
    if not (nan.any() or inf.any()):
        return
    n_nan, n_inf = int(nan.sum()), int(inf.sum())
    bad = nan | inf
    idx = _index(bad)
    what = " and ".join(
        p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "") if p
    )
    masked = " (some of them masked)" if site["mask"] is not None else ""
    raise ModelInputError(
        f"observed site '{name}' ({_kind(site['fn'])}): its value of shape "
        f"{_shape(value.shape)} has {what} value(s){masked}, the first "
        f"({float(value[idx])}) at index {idx}. {_missing_data_advice(exact)}"
    )


def _validates(fn) -> bool:
    """Whether ``fn`` (and every distribution it wraps) validates its arguments: a user who
    turned validation off (Pyro's global switch, or ``validate_args=False`` on a Bernoulli fed
    grey levels in a VAE) is not second-guessed on the support."""
    while fn is not None:
        flag = getattr(fn, "_validate_args", None)
        if flag is False or (flag is None and not is_validation_enabled()):
            return False
        fn = getattr(fn, "base_dist", None)
    return True


def _check_support(name: str, site: dict, value: torch.Tensor) -> None:
    fn = site["fn"]
    if not _validates(fn):
        return
    try:
        support = fn.support
        # an independent constraint is checked elementwise, to name the entry at fault
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        ok = support.check(value)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AttributeError):
        return  # a support that depends on params in ways the value alone cannot show
    ok = torch.as_tensor(ok)
    if ok.dtype != torch.bool:
        return
    shape = value.shape[: value.dim() - support.event_dim]
    # a support that depends on params (with enumerated dims): valid for some component is valid
    while ok.dim() > len(shape):
        ok = ok.any(0)
    if bool(ok.all()):
        return
    bad = ~ok.expand(shape)
    idx = _index(bad)
    shown = value[idx]
    shown = shown.item() if shown.dim() == 0 else shown.flatten()[:5].tolist()
    raise ModelInputError(
        f"observed site '{name}' ({_kind(fn)}): {int(bad.sum())} value(s) of its value of shape "
        f"{_shape(value.shape)} are outside the distribution's support {support}, the first at "
        f"index {idx}: {shown}. Check the data's encoding (categories 0..K-1, counts >= 0, "
        "binary 0/1) or the distribution family; fill missing entries with a valid value and "
        "mask them (dist.<Family>(...).mask(observed) or poutine.mask)."
    )


# ----------------------------------------------------------------------------------- shapes
def check_shapes(trace, max_plate_nesting: int) -> None:
    """Each sample site's value must fit its distribution and its plates.

    The value must end in the distribution's event shape; the rest of it (its batch shape) must
    broadcast with the distribution's batch shape; and the resulting log-prob shape must have,
    at each plate's dim, that plate's size, and size 1 at the other plate positions (Pyro's
    ``check_site_shape``, evaluated on shapes alone, before any log-prob is computed).

    Why: Pyro's own messages say "invalid log_prob shape" or "The size of tensor a (2) must
    match the size of tensor b (3)" without saying which data or plate is wrong.
    """
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site):
            continue
        value = site["value"]
        if not isinstance(value, torch.Tensor):
            continue
        fn = site["fn"]
        frames = frames_of(site)
        kind = "observed site" if site["is_observed"] else "site"
        where = f"{kind} '{name}' ({_kind(fn)}, inside {_plate_list(frames)})"
        deep = [f for f in frames if f.dim < -max_plate_nesting]
        if deep:
            raise ModelInputError(
                f"{where}: {_plate_list(deep)} lies left of max_plate_nesting="
                f"{max_plate_nesting}, where enumerated dims go. Pass max_plate_nesting >= "
                f"{-min(f.dim for f in deep)} (or leave it None to have it read from the model)."
            )
        vshape = value.shape
        if isinstance(fn, DiscreteHMM):
            event = tuple(fn.observation_dist.event_shape)
            event_dim = 1 + len(event)
            ok = len(vshape) >= event_dim and tuple(vshape[len(vshape) - len(event) :]) == event
            if fn.event_shape[0] != 1:  # a time dim of size 1 broadcasts over any T
                ok = ok and vshape[len(vshape) - event_dim] == fn.event_shape[0]
            expected = f"(T, *{event})" if event else "(T,)"
        else:
            event = tuple(fn.event_shape)
            event_dim = len(event)
            ok = len(vshape) >= event_dim and tuple(vshape[len(vshape) - event_dim :]) == event
            expected = _shape(event)
        if not ok:
            raise ModelInputError(
                f"{where}: its value has shape {_shape(vshape)}, which does not end in the "
                f"distribution's event shape {expected} (batch shape "
                f"{_shape(fn.batch_shape)}). Check the data's trailing dims (the number of "
                "features per row) against the model's params, or .to_event() the right dims."
            )
        vbatch = vshape[: len(vshape) - event_dim]
        try:
            lp_shape = torch.broadcast_shapes(fn.batch_shape, vbatch)
        except RuntimeError:
            raise ModelInputError(
                f"{where}: its value's batch shape {_shape(vbatch)} (value shape "
                f"{_shape(vshape)}, event shape {_shape(fn.event_shape)}) does not broadcast "
                f"with the distribution's batch shape {_shape(fn.batch_shape)}. Pass one value "
                f"per plate element ({_plate_sizes(frames)}) in the plates' dims, right-aligned "
                "before the event dims."
            ) from None
        _check_plate_dims(where, lp_shape, vshape, fn, frames, max_plate_nesting)


def _plate_sizes(frames) -> str:
    return ", ".join(f"'{f.name}': {f.size} at dim {f.dim}" for f in frames) or "no plates"


def _check_plate_dims(where, lp_shape, vshape, fn, frames, depth) -> None:
    by_dim = {f.dim: f for f in frames}
    for d in range(-depth, 0):
        actual = lp_shape[d] if len(lp_shape) >= -d else 1
        f = by_dim.get(d)
        if f is not None and actual != f.size:
            raise ModelInputError(
                f"{where}: plate '{f.name}' has size {f.size} at dim {d}, but the site's "
                f"log-prob would have size {actual} there (value shape {_shape(vshape)}, "
                f"distribution batch shape {_shape(fn.batch_shape)}, event shape "
                f"{_shape(fn.event_shape)}). Pass one value per element of plate '{f.name}' "
                f"at dim {d} (e.g. pyro.plate('{f.name}', len(data)) with data rows along that "
                "dim)."
            )
        if f is None and actual != 1:
            raise ModelInputError(
                f"{where}: its log-prob would have size {actual} at dim {d}, which no plate "
                f"declares (value shape {_shape(vshape)}, distribution batch shape "
                f"{_shape(fn.batch_shape)}; plates: {_plate_sizes(frames)}). Declare that dim "
                "with a pyro.plate, or move it into the event with .to_event(1) (e.g. the "
                "features of a row)."
            )


# ----------------------------------------------------------------------------------- memory
def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes that can still be allocated: free CUDA memory for a CUDA device; else
    ``psutil.virtual_memory().available`` if psutil is installed, else ``MemAvailable`` from
    ``/proc/meminfo``, capped by a cgroup v2 memory limit when one is set. None if unknown."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                left = int(limit) - int(f.read().strip())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def _factor(name: str, site: dict, depth: int) -> tuple[int, tuple[int, ...], int] | None:
    """``(numel of the largest tensor the site's log-prob makes, its shape, itemsize)``."""
    fn, value = site["fn"], site["value"]
    if not isinstance(value, torch.Tensor):
        return None
    itemsize = torch.empty((), dtype=_site_dtype(site)).element_size()
    if isinstance(fn, DiscreteHMM):
        k = fn.transition_logits.size(-1)
        batch = torch.broadcast_shapes(
            fn.batch_shape, value.shape[: value.dim() - 1 - fn.observation_dist.event_dim]
        )
        shape = tuple(batch) + (_hmm_duration(site), k, k)
        return math.prod(shape), shape, itemsize
    event_dim = _event_dim(fn)
    try:
        shape = tuple(
            torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - event_dim])
        )
    except RuntimeError:
        return None
    # the elementwise log-density before its event dims are summed
    numel = math.prod(shape) * max(1, math.prod(fn.event_shape))
    return numel, shape, itemsize


def check_enumeration_memory(
    trace, max_plate_nesting: int, available: int | None = None, factors: int = PEAK_FACTORS
) -> None:
    """The log-prob factors of an enumerated trace must fit in memory.

    Reads each site's log-prob shape from its distribution's batch shape and its value's shape
    (the cardinalities of the enumerated sites it depends on times its plate sizes; for a
    DiscreteHMM, ``batch * T * K * K``), before any log-prob is computed, and raises when
    ``factors`` (the E-step's measured peak, :data:`PEAK_FACTORS`) times the largest one exceeds
    ``available`` bytes (default :func:`available_memory`). The model's own arithmetic on
    enumerated values has run by then; the factors, which are usually far larger, have not.
    """
    best = None
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site):
            continue
        f = _factor(name, site, max_plate_nesting)
        if f is not None and (best is None or f[0] * f[2] > best[1][0] * best[1][2]):
            best = (name, f)
    if best is None:
        return
    name, (numel, shape, itemsize) = best
    need = factors * numel * itemsize
    if available is None:
        available = available_memory(_site_device(trace.nodes[name]))
    if available is None or need <= available:
        return
    site = trace.nodes[name]
    raise _enumeration_error(
        f"enumerating this model would need at least {_bytes(need)} but {_bytes(available)} "
        f"is available: site '{name}' ({_kind(site['fn'])}) has a log-prob factor of shape "
        f"{_shape(shape)} ({numel:.3g} values of {itemsize} bytes = {_bytes(numel * itemsize)}"
        f"; the exact E-step holds about {factors} such tensors at once) over "
        f"{_factor_scope(trace, site, shape, max_plate_nesting)}. Enumerate fewer values "
        "jointly: subsample the plate (pyro.plate(..., subsample_size=...)), lower the "
        "cardinalities, make sites depend on fewer enumerated sites at once (pyro.markov for "
        "chains), or use a lower precision."
    )


def _factor_scope(trace, site: dict, shape: tuple[int, ...], depth: int) -> str:
    """The enumerated sites and plates whose sizes make up a factor's shape."""
    parts = []
    if isinstance(site["fn"], DiscreteHMM):
        k = shape[-1]
        parts.append(f"its hidden chain (T={shape[-3]}, K={k})")
    enum_dims = {
        i - len(shape): n
        for i, n in enumerate(shape)
        if i - len(shape) < -depth and n > 1 and not isinstance(site["fn"], DiscreteHMM)
    }
    own = {}
    for n, s in trace.nodes.items():
        if _is_sample(s) and is_enumerated(s):
            own.setdefault(s["infer"]["_enumerate_dim"], []).append(n)
    for d, n in sorted(enum_dims.items(), reverse=True):
        names = own.get(d, ["?"])
        parts.append(f"enumerated site '{names[-1]}' ({n} values)")
    frames = frames_of(site)
    if frames:
        parts.append(_plate_list(frames))
    return ", ".join(parts) if parts else "no enumerated site"


# ----------------------------------------------------------------------------------- markov
class _TrackProvenance(Messenger):
    """Tags each sample site's value with the site's name (direct dependencies only), as
    :func:`pyro.infer.inspect.get_dependencies` does, so that the provenance of a distribution's
    parameters names the sample sites they were computed from."""

    def _pyro_post_sample(self, msg):
        if msg["type"] == "sample" and not isinstance(msg["fn"], _Subsample):
            value = msg["value"]
            if isinstance(value, torch.Tensor):
                msg["value"] = ProvenanceTensor(detach_provenance(value), frozenset({msg["name"]}))


def _has_markov_enumeration(trace) -> bool:
    return any(
        _is_sample(s) and is_enumerated(s) and "_markov_depth" in s["infer"]
        for s in trace.nodes.values()
    )


def _dependencies(fn) -> frozenset:
    out: set = set()
    for _, t in _tensors(fn):
        out |= get_provenance(t)
    return frozenset(out)


def check_markov(
    model: Callable, args: tuple, kwargs: dict, max_plate_nesting: int, trace=None
) -> None:
    """A site may depend on an enumerated ``pyro.markov``-local site only inside that site's
    Markov window.

    Pyro recycles the tensor dim of an enumerated site once it leaves the window
    (``history`` steps); a site that still depends on it then reads the dim of another site:
    the result is silently wrong (an observed ``x_t`` depending on ``z_{t-2}`` under
    ``history=1``), a bare ``AssertionError`` (a Categorical ``z_t`` depending on ``z_{t-2}``)
    or a packing error (a site after the loop depending on its last state). The dependencies
    are read by provenance tracking in one enumerated pass of the model (only when ``trace``,
    an enumerated trace, has enumerated sites under ``pyro.markov``; without ``trace`` the pass
    always runs).
    """
    if trace is not None and not _has_markov_enumeration(trace):
        return
    try:
        with (
            preserved_rng(),
            torch.no_grad(),
            pyro.validation_enabled(False),
            poutine.block(),
            _TrackProvenance(),
        ):
            enum = poutine.enum(model, first_available_dim=-1 - max_plate_nesting)
            tr = poutine.trace(enum, graph_type="flat").get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a model that cannot run on provenance tensors: skip
        return
    tr = prune_subsample_sites(tr)
    for name, site in tr.nodes.items():
        if not _is_sample(site):
            continue
        scope = site["infer"].get("_markov_scope")
        for dep in sorted(_dependencies(site["fn"]) - {name}):
            up = tr.nodes.get(dep)
            if up is None or not _is_sample(up) or not is_enumerated(up):
                continue
            depth = up["infer"].get("_markov_depth")
            if depth is None:
                continue  # a global enumerated site: its dim is never recycled
            if scope is not None and scope.get(dep, 0) == depth:
                continue
            raise _enumeration_error(_markov_message(tr, name, site, dep, scope))


def _markov_message(tr, name: str, site: dict, dep: str, scope) -> str:
    if scope is None:
        return (
            f"site '{name}' is outside the pyro.markov context of the enumerated site '{dep}', "
            "on which it depends. Pyro frees the tensor dims of markov-local sites when their "
            "context exits, so this site would read another site's dim (a packing error, or a "
            f"silently wrong result). Sample '{name}' inside the markov loop (e.g. in its last "
            "step), or take it out of the chain's dependencies."
        )
    visible = sorted(
        n
        for n, d in scope.items()
        if n in tr.nodes
        and is_enumerated(tr.nodes[n])
        and tr.nodes[n]["infer"].get("_markov_depth") == d
    )
    return (
        f"site '{name}' depends on the enumerated site '{dep}', which is outside its pyro.markov "
        f"window (the enumerated sites visible from '{name}' are {visible}). Pyro reuses the "
        "tensor dim of a site that has left the window, so this dependence would be computed "
        f"wrong (silently, or as an AssertionError). Declare a window that reaches '{dep}': "
        "pyro.markov(..., history=h) with h the largest lag of any dependence in the chain."
    )


# ----------------------------------------------------------------------------------- precision
def check_precision(trace, max_plate_nesting: int) -> None:
    """Warn (:class:`PrecisionWarning`) when a chain is long enough that the dtype's round-off
    visibly changes its posterior marginals.

    The forward-backward recursions carry log-potentials of the size of :math:`\\log p(x)` of a
    chain; their relative round-off ``eps`` becomes an absolute error ``eps * |log p(x)|`` in
    the log-marginals. Measured (float32 against float64, max absolute error of the posterior
    marginals): about ``0.1-0.4 * eps * |log p(x)|`` per chain, independent of K, e.g. 2e-4 at
    T = 1e4 and 8e-3 at T = 1e5 for a Gaussian HMM with D = 1 (about 1.5 nats per step), 3e-3
    at T = 1e4 with D = 5. The warning fires when ``0.4 * eps * |log p(x)|`` exceeds 1e-3: in
    float32, chains above about 21,000 nats (T of about 12,000 at D = 1, 2,900 at D = 5).
    Reads the log-probs of a trace after ``compute_log_prob``: per chain for a DiscreteHMM
    site; for ``pyro.markov`` chains, the sum over the chain's sites of each site's largest
    log-prob over the enumerated values, averaged over the plate cells (a lower bound on
    :math:`|\\log p(x)|`).
    """
    markov_sum, markov_cells, markov_sites, dtype = 0.0, 1, 0, None
    for name, site in trace.nodes.items():
        if not _is_sample(site) or "unscaled_log_prob" not in site:
            continue
        lp = site["unscaled_log_prob"].detach()
        if not lp.is_floating_point():
            continue
        if isinstance(site["fn"], DiscreteHMM):
            if lp.numel() == 0:
                continue
            nats = float(lp.abs().max())
            _warn_precision(f"site '{name}' (a DiscreteHMM chain)", _hmm_duration(site), nats, lp)
        elif "_markov_depth" in site["infer"]:
            extra = lp.dim() - max_plate_nesting
            best = lp.flatten(0, extra - 1).amax(0) if extra > 0 else lp
            best = best[torch.isfinite(best)]
            markov_sum += float(best.sum())
            markov_cells = max(markov_cells, best.numel())
            markov_sites += is_enumerated(site)
            dtype = lp
    if markov_sites > 1 and dtype is not None:
        nats = abs(markov_sum) / markov_cells
        _warn_precision("a pyro.markov chain", markov_sites, nats, dtype)


def _warn_precision(what: str, length: int, nats: float, like: torch.Tensor) -> None:
    eps = torch.finfo(like.dtype).eps
    error = CHAIN_ERROR_PER_NAT * eps * nats
    if error <= CHAIN_ERROR_TOLERANCE:
        return
    warnings.warn(
        f"{what} of length {length} in {like.dtype}: its log p(x) is about {nats:.3g} nats, so "
        f"round-off will change its posterior marginals by about {error:.1g} (measured: "
        f"0.1-0.4 * eps * |log p(x)|, eps={eps:.3g}). Use float64 for long chains "
        "(torch.set_default_dtype(torch.float64), data.double(), and params in float64).",
        PrecisionWarning,
        stacklevel=5,
    )


# ----------------------------------------------------------------------------------- fit
def observed_count(trace) -> int:
    """Observed values as :func:`~pyro_emvae.fit.fit` counts them: the plate cells of each
    observed site (full sizes under subsampling) that its mask keeps, times T for a
    DiscreteHMM site; deterministic sites and fully masked sites (obs_mask's missing events
    under ExactEStep) count nothing."""
    total = 0.0
    for site in trace.nodes.values():
        if not _is_sample(site) or not site["is_observed"] or _is_deterministic(site):
            continue
        mask = site["mask"]
        if mask is False:
            continue
        cells = math.prod(f.full_size or f.size for f in frames_of(site))
        if isinstance(site["fn"], DiscreteHMM):
            cells *= _hmm_duration(site)
        if torch.is_tensor(mask):  # the share of cells the site's mask keeps
            batch = site["fn"].batch_shape
            kept = torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, batch))
            cells *= float(kept.float().mean())
        fn = site["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if isinstance(fn, MaskedDistribution) and torch.is_tensor(fn._mask):
            # a .mask(...) on the distribution: the share of its entries it keeps
            inner = fn._mask
            kept = torch.broadcast_to(inner, torch.broadcast_shapes(inner.shape, fn.batch_shape))
            cells *= float(kept.float().mean())
        total += cells
    return round(total)


def check_components(trace, n: int | None = None) -> None:
    """EM needs at least as many observed values as components (``n``, default those of
    ``trace``: a stream or a data-parallel fit counts all its batches or shards).

    Compares the cardinality K of every enumerated latent that lives inside a plate (a
    per-datum choice: a mixture's component, a chain's state; global choices such as a change
    point are exempt) and the hidden states of every DiscreteHMM with the number of observed
    values (plate cells, times T for chains). With K larger than that, at least K - n
    components get no data and their maximum-likelihood estimates degenerate (a zero variance, a
    probability of zero); scikit-learn's mixtures refuse ``n_components > n_samples`` likewise.
    """
    if n is None:
        n = observed_count(trace)
    if n == 0:
        return
    for name, site in trace.nodes.items():
        if not _is_sample(site):
            continue
        frames = frames_of(site)
        if isinstance(site["fn"], DiscreteHMM) and site["is_observed"]:
            k, what = site["fn"].transition_logits.size(-1), "hidden states"
        elif not site["is_observed"] and site["infer"].get("enumerate") == "parallel" and frames:
            k, what = _cardinality(site), "values"
        else:
            continue
        if k is not None and k > n:
            raise ModelInputError(
                f"site '{name}' ({_kind(site['fn'])}, inside {_plate_list(frames)}) has K={k} "
                f"{what} but the model observes only {n} value(s): at least {k - n} of them "
                "would get no data, and EM's estimates for them degenerate (a zero "
                f"variance, a probability of zero); scikit-learn refuses n_components > "
                f"n_samples likewise. Use K <= {n}, or more data."
            )


def _max_plate_nesting(trace) -> int:
    dims = [f.dim for s in trace.nodes.values() if s["type"] == "sample" for f in frames_of(s)]
    return -min(dims) if dims else 0


def validate_fit_inputs(
    model: Callable,
    args: tuple = (),
    kwargs: dict | None = None,
    trace=None,
    *,
    exact: bool = True,
    max_plate_nesting: int | None = None,
    components: bool = True,
) -> None:
    """The checks :func:`~pyro_emvae.fit.fit` runs before its first iteration, on one prior
    trace of the model (``trace``, or a fresh one, taken with the RNG state restored after).

    For every guide: finite params (:func:`check_params`), finite and in-support observed values
    and finite distribution parameters (:func:`check_observed`: NaN in the data of a VAE fails
    here, before SVI turns it into a NaN loss), and value shapes that fit the plates
    (:func:`check_shapes`). With an :class:`~pyro_emvae.estep.ExactEStep` guide (``exact``):
    no more components than observed values (:func:`check_components`); the E-step's own
    checks (memory, ``pyro.markov`` windows, float32 chains) run in its first
    E-step (``components=False`` leaves the count of components to the caller, which knows
    the whole data). For SVI on a model that enumerates: the memory of the enumeration and the
    ``pyro.markov`` windows (one enumerated pass of the model).
    """
    kwargs = kwargs or {}
    if trace is None:
        tracer = poutine.trace(model)
        with (
            preserved_rng(),
            poutine.block(),
            torch.no_grad(),
            explain_model_errors(tracer, max_plate_nesting),
        ):
            trace = tracer.get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    depth = _max_plate_nesting(trace) if max_plate_nesting is None else max_plate_nesting
    check_observed(trace, exact=exact)
    check_params(trace)
    check_distributions(trace)
    check_shapes(trace, depth)
    if exact:
        if components:
            check_components(trace)
        return
    if any(
        _is_sample(s) and not s["is_observed"] and s["infer"].get("enumerate") == "parallel"
        for s in trace.nodes.values()
    ):
        tracer = poutine.trace(poutine.enum(model, first_available_dim=-1 - depth))
        with (
            preserved_rng(),
            poutine.block(),
            torch.no_grad(),
            explain_model_errors(tracer, depth),
        ):
            etr = prune_subsample_sites(tracer.get_trace(*args, **kwargs))
        check_enumeration_memory(etr, depth)
        check_markov(model, args, kwargs, depth, trace=etr)


# ----------------------------------------------------------------------------------- E-step
def _partial_trace(tracer):
    return getattr(getattr(tracer, "msngr", None), "trace", None)


def _last_site(tracer) -> str:
    tr = _partial_trace(tracer)
    names = [n for n, s in tr.nodes.items() if s["type"] == "sample"] if tr is not None else []
    return f" (the last site traced before it: '{names[-1]}')" if names else ""


@contextlib.contextmanager
def explain_model_errors(tracer=None, max_plate_nesting: int | None = None) -> Iterator[None]:
    """Re-raise Pyro's obscure errors from a model run with what they mean and what to do.

    * "Expected parameter ... to satisfy the constraint": a distribution built from a NaN (or
      otherwise invalid) tensor. If a param of the partial trace is non-finite, the error
      names that param (:func:`check_params`); else it says where the bad value comes from.
    * "Shape mismatch inside plate": a distribution's batch shape disagrees with a plate (or,
      with ``max_plate_nesting`` given, a plate lies where the enumerated dims go).
    * "only tensors with up to 64 dims": more enumerated dims than torch allows.

    ``tracer`` (the ``poutine.trace`` handler that runs the model) gives the partial trace.
    """
    try:
        yield
    except ValueError as e:
        text = str(e)
        partial = _partial_trace(tracer)
        if "Expected parameter" in text:
            if partial is not None:
                check_params(partial)
            raise ModelInputError(
                f"{text.splitlines()[0]}{_last_site(tracer)}. The distribution's argument is "
                "computed from the model's inputs and params: look for a NaN in the tensors "
                "passed to the model (torch.isnan(x).any()) and in the params."
            ) from e
        if "Shape mismatch inside plate" not in text:
            raise
        if partial is not None and max_plate_nesting is not None:
            deep = {
                f.name: f
                for s in partial.nodes.values()
                if s["type"] == "sample"
                for f in frames_of(s)
                if f.dim < -max_plate_nesting
            }
            if deep:
                raise ModelInputError(
                    f"{_plate_list(deep.values())} lies left of max_plate_nesting="
                    f"{max_plate_nesting}, where enumerated dims go. Pass max_plate_nesting >= "
                    f"{-min(f.dim for f in deep.values())} (or leave it None to have it read "
                    "from the model)."
                ) from e
        raise ModelInputError(
            f"{text.splitlines()[0]}. A distribution's batch shape disagrees with the plate's "
            "size at that dim: give its parameters the plate's size there (or 1), or move "
            "trailing dims that are not plates (features) into the event with .to_event(1)."
        ) from e
    except RuntimeError as e:
        if "up to 64 dims" not in str(e):
            raise
        partial = _partial_trace(tracer)
        count = ""
        if partial is not None:
            n_enum = sum(
                1 for s in partial.nodes.values() if s["type"] == "sample" and is_enumerated(s)
            )
            count = f" ({n_enum} enumerated sites traced){_last_site(tracer)}"
        raise _enumeration_error(
            f"the model enumerates more sites at once than torch has tensor dims (64){count}: "
            "each enumerated site outside pyro.markov takes a dim of its own for the whole "
            "model. Put independent repeats of a site in a pyro.plate (one site, one dim), "
            "or chains in pyro.markov (dims are recycled)."
        ) from e


class ValidationState:
    """Which arguments an ExactEStep has validated: the validated tensors (by weak reference
    and in-place version: a new tensor, or one changed in place, is checked again) and the
    other arguments (by equality for numbers and strings, else by identity)."""

    def __init__(self) -> None:
        self._key: list | None = None
        self._shapes: Any = None

    @staticmethod
    def _entries(obj, out: list, shapes: list) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(("t", weakref.ref(obj), obj._version))
            shapes.append((tuple(obj.shape), obj.dtype))
        elif isinstance(obj, (list, tuple)):
            out.append(("seq", len(obj)))
            shapes.append(len(obj))
            for o in obj:
                ValidationState._entries(o, out, shapes)
        elif isinstance(obj, dict):
            out.append(("dict", tuple(obj)))
            shapes.append(tuple(obj))
            for o in obj.values():
                ValidationState._entries(o, out, shapes)
        elif obj is None or isinstance(obj, (bool, int, float, str)):
            out.append(("v", obj))
            shapes.append(obj)
        else:
            out.append(("id", id(obj)))
            shapes.append(id(obj))

    def key(self, args: tuple, kwargs: dict) -> tuple[list, Any]:
        out: list = []
        shapes: list = []
        self._entries((args, kwargs), out, shapes)
        return out, repr(shapes)

    def seen(self, key: list) -> bool:
        if self._key is None or len(self._key) != len(key):
            return False
        for a, b in zip(self._key, key):
            if a[0] != b[0]:
                return False
            if a[0] == "t":
                if a[1]() is None or a[1]() is not b[1]() or a[2] != b[2]:
                    return False
            elif a != b:
                return False
        return True

    def remember(self, key: list, shapes: Any) -> None:
        self._key = key
        self._shapes = shapes

    def same_shapes(self, shapes: Any) -> bool:
        return self._shapes is not None and self._shapes == shapes

    def __getstate__(self) -> dict:  # weak references do not pickle: forget them
        return {"_key": None, "_shapes": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _subsampled(trace) -> bool:
    return any(
        f.full_size is not None and f.size < f.full_size
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for f in frames_of(s)
    )


def validate_estep_trace(
    state: ValidationState,
    model: Callable,
    args: tuple,
    kwargs: dict,
    trace,
    max_plate_nesting: int,
) -> tuple | None:
    """The checks an ExactEStep runs on an enumerated trace before computing any log-prob, once
    per set of arguments (``state`` remembers which). Returns None when the arguments were
    validated before; else the arguments' key, which the caller hands to ``state.remember``
    once :func:`check_precision` has read the log-probs.

    Params, observed values and shapes, the memory of the enumeration and the
    ``pyro.markov`` windows (the latter, one more model pass, only when the argument shapes
    change). Under subsampling the observed values are checked on every call (each call sees
    another minibatch; a cheap pass over it).
    """
    key, shapes = state.key(args, kwargs)
    if state.seen(key):
        if _subsampled(trace):
            check_observed(trace, exact=True)
        return None
    check_observed(trace, exact=True)
    check_params(trace)
    check_distributions(trace)
    check_shapes(trace, max_plate_nesting)
    check_enumeration_memory(trace, max_plate_nesting)
    if not state.same_shapes(shapes):
        check_markov(model, args, kwargs, max_plate_nesting, trace=trace)
    return key, shapes
