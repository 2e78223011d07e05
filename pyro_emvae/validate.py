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
a dependence longer than a ``pyro.markov`` window  :class:`~pyro_emvae.errors.EnumerationError`
(:func:`check_markov`)
an enumeration larger than memory, while the       :class:`~pyro_emvae.errors.EnumerationError`
model runs (:class:`EnumerationBudget`) and
before its log-probs
(:func:`check_enumeration_memory`)
a list, or an empty tensor, as data                :class:`ModelInputError`
(:func:`check_observed_types`,
:func:`check_nonempty`)
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
of :math:`\\log p(x)` exactly, and the missing entries of an enumerable discrete site (a
partly observed label) are summed over (see ``estep._ExactView``). Or fill the missing entries
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
import os
import re
import time
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
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae import _compat
from pyro_emvae._compat import ProvenanceTensor, Subsample, detach_provenance, get_provenance
from pyro_emvae.amortized import frames_of, preserved_rng
from pyro_emvae.errors import EnumerationError, ModelInputError, PrecisionWarning

__all__ = [
    "ENUM_BUDGET_ENV",
    "EnumerationBudget",
    "MarkConditioned",
    "ModelInputError",
    "PrecisionWarning",
    "available_memory",
    "check_components",
    "check_distributions",
    "check_enumeration_memory",
    "check_markov",
    "check_nonempty",
    "check_observed",
    "check_observed_types",
    "check_params",
    "check_precision",
    "check_shapes",
    "count_observed",
    "enumeration_budget",
    "explain_input_errors",
    "explain_model_errors",
    "model_inputs",
    "validate_estep_trace",
    "validate_fit_inputs",
]


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
    return site["type"] == "sample" and not isinstance(site["fn"], Subsample)


def _is_deterministic(site: dict) -> bool:
    return _compat.is_deterministic(site)


def _base(fn):
    """``fn`` without its Independent and MaskedDistribution wrappers."""
    while isinstance(fn, (dist.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _is_factor(site: dict) -> bool:
    """A ``pyro.factor`` site (an observed ``Unit``): a log-density term, not data."""
    return isinstance(_base(site["fn"]), dist.Unit)


def is_enumerated(site: dict) -> bool:
    """A site that the enum messenger enumerated (it has an enumeration dim)."""
    return _compat.enum_dim(site) is not None


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
    index = tuple(
        slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape)
    )
    # (``t`` itself where no dim is broadcast: the whole slice would be a view of the same
    # elements, one op more)
    return t[index] if any(i.stop == 1 for i in index) else t


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
        return _compat.categorical_num_events(fn)
    if not getattr(fn, "has_enumerate_support", False):
        return None
    try:
        return int(fn.enumerate_support(expand=False).shape[0])
    except (NotImplementedError, RuntimeError, ValueError):
        return None


def _hmm_duration(site: dict) -> int:
    fn, value = site["fn"], site["value"]
    return int(value.shape[-1 - fn.observation_dist.event_dim])


# ----------------------------------------------------------------------------------- inputs
def _describe(x: Any) -> str:
    """``numpy.ndarray of shape (20, 2) and dtype float64``, ``list of 3 lists``..."""
    kind = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"
    if type(x).__module__ == "builtins":
        kind = type(x).__name__
    shape = getattr(x, "shape", None)
    if shape is not None:
        dtype = getattr(x, "dtype", None)
        return f"{kind} of shape {_shape(shape)}" + (f" and dtype {dtype}" if dtype else "")
    if isinstance(x, (list, tuple)):
        inner = sorted({type(v).__name__ for v in x})
        return f"{kind} of {len(x)} {'/'.join(inner) or 'item'}{'s' if len(x) != 1 else ''}"
    return kind


def _where(key: int | str) -> str:
    return f"argument {key}" if isinstance(key, int) else f"keyword argument '{key}'"


def _is_pandas(x: Any) -> bool:
    return type(x).__module__.startswith("pandas") and hasattr(x, "to_numpy")


def _to_tensor(key: int | str, x: Any) -> Any:
    """A numpy array or a pandas DataFrame / Series as a tensor (anything else as it is)."""
    if _is_pandas(x):
        import numpy as np

        values = x.to_numpy()
        if values.dtype == object or not (
            np.issubdtype(values.dtype, np.number) or values.dtype == bool
        ):
            from pandas.api.types import is_bool_dtype, is_numeric_dtype

            dtypes = getattr(x, "dtypes", None)
            bad = (
                [str(c) for c, d in dtypes.items() if not (is_numeric_dtype(d) or is_bool_dtype(d))]
                if dtypes is not None and hasattr(dtypes, "items")
                else []
            )
            raise ModelInputError(
                f"data {_where(key)} is a {_describe(x)} with non-numeric values"
                + (f" (columns {bad})" if bad else "")
                + ": a model takes numeric tensors. Select or encode the numeric columns, "
                "then pass torch.as_tensor(df.to_numpy(dtype='float64'))."
            )
        x = values
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        import numpy as np

        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or x.dtype.kind == "c":
            ragged = x.dtype == object and x.ndim == 1 and len({np.shape(v) for v in x}) > 1
            raise ModelInputError(
                f"data {_where(key)} is a {_describe(x)}: a model takes numeric tensors. "
                + (
                    _ragged_advice()
                    if ragged
                    else "Pass torch.as_tensor(x.astype('float64')) (or the integer dtype the "
                    "model's distribution expects)."
                )
            )
        if not x.flags.writeable:  # (torch shares the array's memory only if it may write it)
            x = x.copy()
        t = torch.as_tensor(x)
        # floats in the dtype the model's params are made in (torch's default): float64 data
        # beside float32 params would fail in the E-step's contraction
        return t.to(torch.get_default_dtype()) if t.is_floating_point() else t
    return x


def _ragged_advice() -> str:
    return (
        "Sequences of different lengths do not make one tensor: pad them to the longest "
        "(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)) and mask the padding "
        "(poutine.mask(mask=...) per step, or .mask(...) on a DiscreteHMM's observation_dist, "
        "which leave log p(x) and n_data as for the unpadded data); or let the model loop "
        "over a list of tensors, one per sequence."
    )


def model_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The model's arguments with numpy arrays and pandas DataFrames / Series converted to
    tensors: floating arrays to torch's default dtype (the dtype ``pyro.param`` initial values
    are made in: float64 after ``torch.set_default_dtype(torch.float64)``, else float32),
    integer and boolean arrays keep their dtype; the memory is shared where the dtype is
    unchanged. Every other argument is passed as it is (a list too: a model may loop over a
    list of tensors; :func:`check_observed_types` and :func:`explain_input_errors` explain one
    that the model cannot take).

    Raises :class:`ModelInputError` for arrays or frames that are not numeric (an object array
    of sequences of different lengths: padding and masks are the way).

    Example::

        >>> import numpy as np
        >>> (x, n), _ = model_inputs((np.zeros((3, 2)), np.arange(3)), {})
        >>> x.dtype == torch.get_default_dtype(), tuple(x.shape), n.dtype
        (True, (3, 2), torch.int64)
    """
    args = tuple(_to_tensor(i, a) for i, a in enumerate(args))
    kwargs = {k: _to_tensor(k, v) for k, v in kwargs.items()}
    return args, kwargs


def _holds_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (list, tuple)):
        return any(_holds_tensor(v) for v in x)
    return False


def _lengths(x: Any) -> list[int] | None:
    """The lengths of a list's items, if they are sequences of different lengths."""
    if not isinstance(x, (list, tuple)) or not x:
        return None
    try:
        lengths = [len(v) for v in x]
    except TypeError:
        return None
    return lengths if len(set(lengths)) > 1 else None


@contextlib.contextmanager
def explain_input_errors(args: tuple, kwargs: dict) -> Iterator[None]:
    """Re-raise a model's failure on a list argument (``AttributeError: 'list' object has no
    attribute 'dim'`` from inside the model or Pyro) as a :class:`ModelInputError` that names
    the argument and says what to pass: a tensor, or for sequences of different lengths,
    padding and a mask. A list of tensors the model loops over passes untouched."""
    try:
        yield
    except (AttributeError, TypeError, IndexError) as e:
        items = [*enumerate(args), *kwargs.items()]
        lists = [(k, v) for k, v in items if isinstance(v, (list, tuple)) and v]
        if not lists or not any(w in str(e) for w in ("list", "tuple")):
            raise  # (a failure that is not about a list argument)
        key, value = lists[0]
        lengths = _lengths(value)
        if lengths is not None:
            shown = ", ".join(map(str, lengths[:5])) + (", ..." if len(lengths) > 5 else "")
            advice = f"Its items have different lengths ({shown}). " + _ragged_advice()
        elif _holds_tensor(value):
            advice = "Pass one tensor: torch.stack(x) (or torch.cat)."
        else:
            advice = (
                "Pass a tensor: torch.tensor(x, dtype=torch.float64) (numpy arrays and pandas "
                "DataFrames are converted by fit and score; lists are not, since a model may "
                "loop over a list)."
            )
        raise ModelInputError(
            f"the model failed on data {_where(key)}, a {_describe(value)} "
            f"({type(e).__name__}: {e}). Pyro models take tensors. {advice}"
        ) from e


def _empty_inputs(inputs: tuple | None) -> str:
    if inputs is None:
        return ""
    args, kwargs = inputs
    empty = [
        f"data {_where(k)} has shape {_shape(v.shape)}"
        for k, v in [*enumerate(args), *kwargs.items()]
        if isinstance(v, torch.Tensor) and v.numel() == 0
    ]
    return f" ({'; '.join(empty)})" if empty else ""


def check_observed_types(trace, args: tuple = (), kwargs: dict | None = None) -> None:
    """Every observed value must be a tensor (a list or an array reaches Pyro's enumeration as
    ``AttributeError: 'list' object has no attribute 'data'``); the message names the site and,
    when the value is one of the model's arguments (``args``, ``kwargs``), the argument."""
    items = [*enumerate(args), *(kwargs or {}).items()]
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site) or not site["is_observed"]:
            continue
        value = site["value"]
        if isinstance(value, torch.Tensor):
            continue
        keys = [k for k, v in items if v is value]
        source = f" (data {_where(keys[0])})" if keys else ""
        lengths = _lengths(value)
        advice = (
            (f"Its items have different lengths. {_ragged_advice()}")
            if lengths is not None
            else "Pass a tensor: torch.as_tensor(x, dtype=torch.float64) (numpy arrays and "
            "pandas DataFrames passed to fit and score are converted; lists are not, since a "
            "model may loop over a list)."
        )
        raise ModelInputError(
            f"observed site '{name}' ({_kind(site['fn'])}) has a value of type "
            f"{_describe(value)}{source}, not a tensor: Pyro's distributions take tensors. "
            + advice
        )


def check_nonempty(trace) -> None:
    """Every observed site must hold at least one value: with N = 0 there is no data to fit (and
    per-datum values, ``tol``, BIC would divide by zero)."""
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site) or not site["is_observed"]:
            continue
        if _is_factor(site):
            continue  # (pyro.factor's value is always empty)
        value = site["value"]
        if isinstance(value, torch.Tensor) and value.numel() == 0:
            raise ModelInputError(
                f"observed site '{name}' ({_kind(site['fn'])}) has an empty value (shape "
                f"{_shape(value.shape)}): there is no data to fit. Pass at least one datum."
            )


# ----------------------------------------------------------------------------------- params
def check_params(trace) -> None:
    """Every ``pyro.param`` the model reads must hold finite values.

    Why: a NaN or inf initial value (or a value outside the param's constraint, which Pyro maps
    to NaN: ``log`` of a negative scale, a negative Cholesky diagonal) makes every later
    log-likelihood NaN. A simplex initial value that does not sum to one is *not* an error:
    Pyro's simplex transform normalizes it (``[1, 3]`` becomes ``[0.25, 0.75]``).
    """
    if _all_finite_sums(_param_values(trace)):
        return  # (every param finite: one read of one flag, not one per param)
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
        finite = False
        if value.is_floating_point() or value.is_complex():
            finite = _check_finite_value(name, site, value, exact)
        if finite and _real_support(site["fn"]):
            continue  # (a finite value is in the support of the reals: no (N, D) check of it)
        base = name[: -len("_observed")] if name.endswith("_observed") else None
        _check_support(
            name, site, value, obs_mask_of=base if f"{base}_unobserved" in trace else None
        )


def _distribution_tensors(trace) -> list[tuple]:
    """``(site name, fn, attribute, compact tensor)`` of the floating tensors each sample
    site's distribution holds (:func:`check_distributions` reads them)."""
    held = []
    compacts: dict[int, torch.Tensor] = {}  # (a tensor held under two names is compacted once)
    for name, site in trace.nodes.items():
        if not _is_sample(site) or _is_deterministic(site):
            continue
        for attr, held_t in _tensors(site["fn"]):
            t = detach_provenance(held_t)
            if t.is_floating_point():
                c = compacts.get(id(t))
                if c is None:
                    c = compacts[id(t)] = _compact(t)
                held.append((name, site["fn"], attr, c))
    return held


def _distinct(tensors) -> list[torch.Tensor]:
    """Each view of the same elements once (a Categorical's probs and _param, an MVN's
    scale_tril and _unbroadcasted_scale_tril once compact; the stride of a dim of size 1 reads
    no other element)."""
    return list(
        {
            (
                t.data_ptr(),
                t.shape,
                tuple(st if n > 1 else 0 for st, n in zip(t.stride(), t.shape)),
                t.dtype,
                t.device,
            ): t
            for t in tensors
        }.values()
    )


def _param_values(trace) -> list[torch.Tensor]:
    values = [
        detach_provenance(site["value"]) for site in trace.nodes.values() if site["type"] == "param"
    ]
    return [v for v in values if isinstance(v, torch.Tensor)]


def check_params_and_distributions(trace) -> None:
    """:func:`check_params` then :func:`check_distributions`, with one finiteness flag read
    for both where every param and every distribution tensor is finite (then neither can
    raise); otherwise each runs as it does alone, in that order."""
    held = _distribution_tensors(trace)
    if _all_finite_sums(_distinct([*_param_values(trace), *(t for *_, t in held)])):
        return
    check_params(trace)
    check_distributions(trace, held)


def check_distributions(trace, held: list | None = None) -> None:
    """The tensors each sample site's distribution holds (built by the model from its inputs
    and params) must not be NaN.

    Why: a NaN covariate or a NaN computed from a param makes the site's log-prob NaN; with
    Pyro's validation on the model fails while building the distribution (a message that names
    the argument but not the site), with it off the NaN is silent. Infinite entries are allowed
    (``-inf`` logits are zero probabilities).
    """
    if held is None:
        held = _distribution_tensors(trace)
    # (each view of the same elements summed once: the same flag, fewer ops)
    if _all_finite_sums(_distinct([t for *_, t in held])):
        return  # (no NaN anywhere: one read of one flag, not one per tensor)
    for name, fn, attr, t in held:
        if _finite_sum(t):
            continue  # (no NaN: the sum of a tensor with a NaN is NaN)
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


def _all_finite_sums(tensors: list) -> bool:
    """True only if every entry of every floating tensor of ``tensors`` is finite (as
    :func:`_finite_sum` of each, in one read): the sums, each in its own dtype as
    :func:`_finite_sum` takes it, then one flag. False says nothing: the caller then checks
    each tensor as before. Tensors on several devices are not combined (False)."""
    with torch.no_grad():
        sums = [t.sum() for t in tensors if t.is_floating_point()]
        if not sums:
            return True
        if len({s.device for s in sums}) > 1:
            return False
        # (a NaN or inf sum makes the total NaN or inf; a total that overflows only sends the
        # caller to its per-tensor checks)
        total = sums[0]
        for s in sums[1:]:
            total = total + s
        return bool(torch.isfinite(total))


def _finite_sum(t: torch.Tensor) -> bool:
    """True only if every entry of ``t`` is finite, without a tensor of ``t``'s size: a NaN
    or inf entry makes the sum NaN or inf. False says nothing (a sum of large finite entries
    may overflow): then the caller runs its elementwise check, which names the entry."""
    with torch.no_grad():
        return bool(torch.isfinite(t.sum()))


def _real_support(fn) -> bool:
    """Whether ``fn``'s support is the reals (elementwise, whatever its event dims): a finite
    value is in it."""
    try:
        support = fn.support
    except (NotImplementedError, AttributeError):
        return False
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _check_finite_value(name: str, site: dict, value: torch.Tensor, exact: bool) -> bool:
    """Raise for a NaN or inf entry of ``value``; returns True (every entry finite)."""
    if _finite_sum(value):
        return True
    nan = torch.isnan(value)
    # (torch.isinf(x) is x.abs() == inf: a float copy of the data; the comparisons are bools)
    inf = (value == math.inf) | (value == -math.inf) if value.is_floating_point() else value.isinf()
    if not (nan.any() or inf.any()):
        return True
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
        flag = _compat.validate_args_flag(fn)
        if flag is False or (flag is None and not is_validation_enabled()):
            return False
        fn = getattr(fn, "base_dist", None)
    return True


def _check_support(
    name: str, site: dict, value: torch.Tensor, obs_mask_of: str | None = None
) -> None:
    """``obs_mask_of``: the site's name when ``name`` is the observed part of its ``obs_mask=``."""
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
    head = (
        f"observed site '{name}' ({_kind(fn)}): {int(bad.sum())} value(s) of its value of shape "
        f"{_shape(value.shape)} are outside the distribution's support {support}, the first at "
        f"index {idx}: {shown}."
    )
    if obs_mask_of is not None:
        raise ModelInputError(
            f"{head} It is the observed part of site '{obs_mask_of}' (obs_mask=): Pyro computes "
            "its log-prob at the missing entries too before masking it, so fill them with any "
            "value inside the support (e.g. 0 for categories); they do not enter log p(x) (under "
            f"ExactEStep a discrete '{obs_mask_of}_unobserved' is summed over at the missing "
            "entries, whatever the fill value)."
        )
    raise ModelInputError(
        f"{head} Check the data's encoding (categories 0..K-1, counts >= 0, binary 0/1) or the "
        "distribution family. For missing entries that no other site reads, fill them with a "
        "valid value and mask them (dist.<Family>(...).mask(observed) or poutine.mask); for a "
        "partly observed value that other sites depend on (a missing label), do not mask it: "
        "pass obs=filled, obs_mask=observed (fill with any valid value), so that ExactEStep "
        "sums the missing entries over."
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
            lp_shape = _compat.broadcast_shapes(fn.batch_shape, vbatch)
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
# looked up once each: a failed ``import psutil`` searches every sys.path entry again at each
# call, and a cgroup v2 memory file that is not there does not appear while the process runs
_PSUTIL: Any = None  # the psutil module, or False where it is not installed
_CGROUP_V2 = True  # False once /sys/fs/cgroup/memory.max was found missing


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes that can still be allocated: free CUDA memory for a CUDA device; else
    ``psutil.virtual_memory().available`` if psutil is installed, else ``MemAvailable`` from
    ``/proc/meminfo``, capped by a cgroup v2 memory limit when one is set. None if unknown."""
    global _PSUTIL, _CGROUP_V2
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if _PSUTIL is None:
        try:
            import psutil

            _PSUTIL = psutil
        except ImportError:
            _PSUTIL = False
    avail = None
    if _PSUTIL:
        avail = int(_PSUTIL.virtual_memory().available)
    else:
        try:  # (bytes, read whole: no text decoding, no line iteration)
            with open("/proc/meminfo", "rb") as f:
                data = f.read()
            at = data.find(b"MemAvailable:")
            if at >= 0:
                avail = int(data[at + len(b"MemAvailable:") :].split(None, 1)[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    if not _CGROUP_V2:
        return avail
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except FileNotFoundError:
        _CGROUP_V2 = False
        return avail
    except OSError:
        return avail
    try:
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                left = int(limit) - int(f.read().strip())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


#: The environment variable that sets the memory an enumeration may take (see
#: :func:`enumeration_budget`): bytes, with an optional unit ("64GB", "500MiB"); "inf" turns the
#: enumeration memory checks off.
ENUM_BUDGET_ENV = "PYRO_EMVAE_MAX_ENUM_BYTES"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def _parse_bytes(text: str) -> float:
    t = text.strip().lower().replace("_", "")
    if t in ("inf", "infinity", "off", "none"):
        return math.inf
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", t)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(
            f"{ENUM_BUDGET_ENV}={text!r}: give a number of bytes with an optional unit "
            "(e.g. 8000000000, '64GB', '500MiB'), or 'inf' to turn the memory checks off"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def enumeration_budget(device: torch.device | None = None) -> tuple[float | None, str]:
    """``(bytes, where the number comes from)``: the memory an enumerated model run may take.

    The environment variable ``PYRO_EMVAE_MAX_ENUM_BYTES`` if it is set (a number of bytes with
    an optional unit, ``"64GB"``, ``"500MiB"``; ``"inf"`` turns the enumeration memory checks
    off), else :func:`available_memory` of ``device`` (None if unknown).

    Example::

        >>> import os
        >>> os.environ["PYRO_EMVAE_MAX_ENUM_BYTES"] = "2GiB"
        >>> enumeration_budget()
        (2147483648.0, 'PYRO_EMVAE_MAX_ENUM_BYTES=2GiB')
        >>> del os.environ["PYRO_EMVAE_MAX_ENUM_BYTES"]
    """
    raw = _budget_set()
    if raw is not None:
        return _parse_bytes(raw), f"{ENUM_BUDGET_ENV}={raw}"
    return available_memory(device), "the available memory"


def _budget_set() -> str | None:
    """The budget ``ENUM_BUDGET_ENV`` sets (stripped), or None where it is unset or blank."""
    raw = os.environ.get(ENUM_BUDGET_ENV)
    return raw.strip() if raw is not None and raw.strip() else None


def _budget_advice() -> str:
    return (
        f"or, if the model never combines these sites in one tensor, raise the budget: set the "
        f"environment variable {ENUM_BUDGET_ENV} (bytes, e.g. '200GB'; 'inf' turns this check "
        "off)."
    )


def _long_shape(shape: tuple[int, ...]) -> str:
    if len(shape) <= 10:
        return _shape(shape)
    head = ", ".join(map(str, shape[:3]))
    tail = ", ".join(map(str, shape[-3:]))
    return f"({head}, ..., {tail}) ({len(shape)} dims)"


def _enumerated_size(value, dim: int, event_dim: int) -> int:
    """The number of values an enumerated site takes (the size of its enumeration dim)."""
    if not isinstance(value, torch.Tensor):
        return 1
    at = dim - event_dim
    return int(value.shape[at]) if value.dim() >= -at else 1


#: Elementwise ops whose result has the broadcast shape of their tensor arguments: the ops
#: by which a model's arithmetic on enumerated values grows (``total + z``, ``a * b``,
#: ``torch.where(c, a, b)``). Indexing, reductions and products are left out: their result is
#: not the broadcast of their arguments, and estimating it so could refuse a model that fits.
_BROADCASTING_OPS = frozenset(
    {
        f"{prefix}{op}{suffix}"
        for op in (
            "add", "sub", "mul", "div", "truediv", "floordiv", "pow", "and", "or", "xor",
            "eq", "ne", "lt", "le", "gt", "ge", "mod",
        )
        for prefix, suffix in (("__", "__"), ("__r", "__"), ("", ""))
    }
    | {
        "true_divide", "subtract", "multiply", "where", "maximum", "minimum", "logaddexp",
        "atan2", "fmod", "remainder", "logical_and", "logical_or", "logical_xor",
        "bitwise_and", "bitwise_or", "bitwise_xor", "greater", "less", "equal", "not_equal",
        "greater_equal", "less_equal", "lerp", "hypot", "xlogy", "copysign",
    }
)  # fmt: skip


class _BroadcastWatch(torch.overrides.TorchFunctionMode):
    """Looks at each elementwise op (:data:`_BROADCASTING_OPS`) of a model run *before* it runs:
    the shape its result will have is the broadcast of its arguments' shapes, so a result too
    big for the budget is refused before it is allocated."""

    def __init__(self, budget: EnumerationBudget) -> None:
        super().__init__()
        self.budget = budget

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.budget.sites and getattr(func, "__name__", "") in _BROADCASTING_OPS:
            shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if shapes:
                try:
                    shape = _compat.broadcast_shapes(*shapes)
                except RuntimeError:  # (the op itself will say what is wrong)
                    shape = None
                if shape is not None and math.prod(shape) > max(map(math.prod, shapes)):
                    self.budget.check(tuple(shape), args, kwargs)
        return func(*args, **kwargs)


class EnumerationBudget(Messenger):
    """Refuse an enumeration too large for memory *while the model runs*, before the model's
    own arithmetic allocates it.

    Installed under :func:`pyro.poutine.enum` on the handler stack (by
    :func:`explain_model_errors`), it records each enumerated site's dim as Pyro allocates it,
    and watches the model's elementwise arithmetic (a torch function mode,
    :class:`_BroadcastWatch`): an op whose result broadcasts its arguments to a larger shape
    (``total + z``, the way enumerated values combine) is checked before it runs.
    :data:`PEAK_FACTORS` times the result's size must fit the budget
    (:func:`enumeration_budget`: ``PYRO_EMVAE_MAX_ENUM_BYTES``, else the available memory),
    else an :class:`~pyro_emvae.errors.EnumerationError` names the enumerated sites the result
    spans and its size. So 40 binary sites summed into one observation are refused at about
    the 30th (with 24 GB available) instead of exhausting memory, while 30 independent binary
    sites, each with its own observation, never build a tensor over more than one of them and
    run. Observed sites' log-probs are left to :func:`check_enumeration_memory`, which reads
    their exact shapes before any log-prob is computed.
    """

    #: below this many bytes (with 8-byte elements) the budget is not read at all
    FLOOR = 2**26

    def __enter__(self):
        # enum dim -> the latest site on it: (name, size, fn, order of enumeration)
        self.sites: dict[int, tuple[str, int, Any, int]] = {}
        self._count = 0
        self._budget: tuple[float | None, str] | None = None
        self._floor = float(self.FLOOR)
        if _budget_set() is not None:
            self._budget = enumeration_budget()
            self._floor = self._budget[0]
        # The watch does nothing until a site is enumerated (it checks only ops over
        # enumerated dims), so it starts then, at the place on torch's stack of function
        # modes it would have had from here: the ops of a model that enumerates nothing (fit's
        # prior trace) and those before its first enumerated site skip a Python dispatch each.
        self._watch = _BroadcastWatch(self)
        self._depth = _compat.function_mode_depth()
        self._watching = False
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._watching:
                _compat.remove_function_mode(self._watch)
                self._watching = False

    def _pyro_post_sample(self, msg) -> None:
        fn = msg["fn"]
        dim = _compat.enum_dim(msg)
        if dim is None or not isinstance(fn, torch.distributions.Distribution):
            return
        # (a pyro.markov chain recycles dims: the latest site on a dim is the one it holds)
        k = _enumerated_size(msg["value"], dim, len(fn.event_shape))
        self._count += 1
        self.sites[dim] = (msg["name"], k, fn, self._count)
        if not self._watching:
            _compat.insert_function_mode(self._watch, self._depth)
            self._watching = True

    def check(self, shape: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        """Refuse an op whose result has ``shape`` if it does not fit the budget."""
        numel = math.prod(shape)
        if PEAK_FACTORS * numel * 8 <= self._floor:
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), tensors[0].dtype)
        device = tensors[0].device
        if self._budget is None:
            self._budget = enumeration_budget(device)
        budget, source = self._budget
        itemsize = dtype.itemsize
        need = PEAK_FACTORS * numel * itemsize
        if budget is None or need <= budget:
            return
        spanned = [
            (d, self.sites[d])
            for d in range(-len(shape), 0)
            if shape[d] > 1 and d in self.sites and self.sites[d][1] == shape[d]
        ]
        if not spanned:  # (the model's own arithmetic on its data: not the enumeration's)
            return
        names = [f"'{e[0]}' ({e[1]} values)" for _, e in sorted(spanned, reverse=True)]
        if len(names) > 8:
            names = [*names[:3], f"... {len(names) - 6} more ...", *names[-3:]]
        latest = max([e for _, e in spanned] or self.sites.values(), key=lambda e: e[3])
        raise EnumerationError(
            f"enumerating this model would need at least {_bytes(need)} but the budget is "
            f"{_bytes(budget)} ({source}): after site '{latest[0]}' ({_kind(latest[2])}), the "
            f"model's arithmetic builds a tensor of shape {_long_shape(shape)} over "
            f"{len(spanned)} enumerated site(s) at once: {', '.join(names)}. It has "
            f"{numel:.3g} values of {itemsize} bytes = {_bytes(numel * itemsize)}, and the "
            f"exact E-step holds about {PEAK_FACTORS} such tensors; refused before it is "
            "allocated. An enumerated site outside pyro.markov keeps its tensor dim for the "
            "rest of the model: write chains with pyro.markov (only a window of sites is then "
            "in scope), put independent repeats of a site in a pyro.plate (one site, one dim), "
            "lower the cardinalities, " + _budget_advice()
        )


def _factor(name: str, site: dict, depth: int) -> tuple[int, tuple[int, ...], int] | None:
    """``(numel of the largest tensor the site's log-prob makes, its shape, itemsize)``."""
    fn, value = site["fn"], site["value"]
    if not isinstance(value, torch.Tensor):
        return None
    itemsize = _site_dtype(site).itemsize
    if isinstance(fn, DiscreteHMM):
        k = fn.initial_logits.size(-1)  # (K, without building a HomogeneousHMM's (T, K, K))
        batch = _compat.broadcast_shapes(
            fn.batch_shape, value.shape[: value.dim() - 1 - fn.observation_dist.event_dim]
        )
        shape = tuple(batch) + (_hmm_duration(site), k, k)
        return math.prod(shape), shape, itemsize
    event_dim = _event_dim(fn)
    try:
        shape = tuple(
            _compat.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - event_dim])
        )
    except RuntimeError:
        return None
    # the elementwise log-density before its event dims are summed
    numel = math.prod(shape) * max(1, math.prod(fn.event_shape))
    return numel, shape, itemsize


#: device -> (when, the available_memory function that read it, bytes): the available memory
#: as read by the last :func:`check_enumeration_memory` (a system query, ~0.1 ms between two
#: fits where the E-step's own work is ~1 ms)
_RECENT_MEMORY: dict = {}
#: how long (seconds) a read of the available memory stands in for a new one, for factors of
#: at most half of it: the memory would have to halve in that time for the check to differ
RECENT_MEMORY_S = 1.0


def _fits_recent_read(need: float, device: torch.device) -> bool:
    """Whether ``need`` bytes are at most half of the available memory read for ``device``
    less than :data:`RECENT_MEMORY_S` ago (by the same ``available_memory``: a replaced one,
    as tests do, reads again)."""
    hit = _RECENT_MEMORY.get(device)
    return (
        hit is not None
        and hit[1] is available_memory
        and time.monotonic() - hit[0] < RECENT_MEMORY_S
        and 2 * need <= hit[2]
    )


def check_enumeration_memory(
    trace, max_plate_nesting: int, available: int | None = None, factors: int = PEAK_FACTORS
) -> None:
    """The log-prob factors of an enumerated trace must fit in memory.

    Reads each site's log-prob shape from its distribution's batch shape and its value's shape
    (the cardinalities of the enumerated sites it depends on times its plate sizes; for a
    DiscreteHMM, ``batch * T * K * K``), before any log-prob is computed, and raises when
    ``factors`` (the E-step's measured peak, :data:`PEAK_FACTORS`) times the largest one exceeds
    ``available`` bytes (default :func:`enumeration_budget`: ``PYRO_EMVAE_MAX_ENUM_BYTES`` if
    set, else the available memory). The model's own arithmetic on enumerated values has run
    by then (:class:`EnumerationBudget` bounds it while the model runs); the factors, which
    are usually far larger, have not.
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
    source = "available"
    if available is None:
        device = _site_device(trace.nodes[name])
        if _budget_set() is None and _fits_recent_read(need, device):
            return
        available, source = enumeration_budget(device)
        if source == "the available memory" and available is not None:
            _RECENT_MEMORY[device] = (time.monotonic(), available_memory, available)
        source = "available" if source == "the available memory" else f"the budget ({source})"
    if available is None or need <= available:
        return
    site = trace.nodes[name]
    raise EnumerationError(
        f"enumerating this model would need at least {_bytes(need)} but {_bytes(available)} "
        f"is {source}: site '{name}' ({_kind(site['fn'])}) has a log-prob factor of shape "
        f"{_shape(shape)} ({numel:.3g} values of {itemsize} bytes = {_bytes(numel * itemsize)}"
        f"; the exact E-step holds about {factors} such tensors at once) over "
        f"{_factor_scope(trace, site, shape, max_plate_nesting)}. Enumerate fewer values "
        "jointly: subsample the plate (pyro.plate(..., subsample_size=...)), lower the "
        "cardinalities, make sites depend on fewer enumerated sites at once (pyro.markov for "
        f"chains), or use a lower precision; the budget is {ENUM_BUDGET_ENV} if set (bytes, "
        "e.g. '200GB'), else the available memory."
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
            own.setdefault(_compat.enum_dim(s), []).append(n)
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
        if msg["type"] == "sample" and not isinstance(msg["fn"], Subsample):
            value = msg["value"]
            if isinstance(value, torch.Tensor):
                msg["value"] = ProvenanceTensor(detach_provenance(value), frozenset({msg["name"]}))


def _has_markov_enumeration(trace) -> bool:
    return any(
        _is_sample(s) and is_enumerated(s) and _compat.markov_depth(s) is not None
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
        scope = _compat.markov_scope(site)
        for dep in sorted(_dependencies(site["fn"]) - {name}):
            up = tr.nodes.get(dep)
            if up is None or not _is_sample(up) or not is_enumerated(up):
                continue
            depth = _compat.markov_depth(up)
            if depth is None:
                continue  # a global enumerated site: its dim is never recycled
            if scope is not None and scope.get(dep, 0) == depth:
                continue
            raise EnumerationError(_markov_message(tr, name, site, dep, scope))


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
        if n in tr.nodes and is_enumerated(tr.nodes[n]) and _compat.markov_depth(tr.nodes[n]) == d
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
        elif _compat.markov_depth(site) is not None:
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
class MarkConditioned(Messenger):
    """Marks the sites that an enclosing ``poutine.condition`` made observed
    (``site["infer"]["_conditioned"] = True``), so that :func:`observed_count` can tell a
    latent fixed to a value from data: Pyro marks both ``is_observed`` and keeps no other trace
    of the difference. The rule: a site named in the data of a ``poutine.condition`` (or
    ``pyro.condition``) that encloses the model run is conditioned, even if the model also
    gave it ``obs=`` (the condition replaces that value)."""

    def _pyro_post_sample(self, msg) -> None:
        if not msg["is_observed"] or msg["infer"] is None:
            return
        name = msg["name"]
        for frame in _compat.handler_stack():
            if not isinstance(frame, ConditionMessenger):
                continue
            data = frame.data
            held = name in data.nodes if isinstance(data, pyro.poutine.Trace) else name in data
            if held:
                msg["infer"]["_conditioned"] = True
                return


def _mask_share(fn) -> float:
    """The share of a distribution's batch entries that its ``.mask(...)`` wrappers keep (1.0
    without one), read through Independent wrappers."""
    share = 1.0
    while isinstance(fn, (dist.Independent, MaskedDistribution)):
        if isinstance(fn, MaskedDistribution):
            mask = _compat.mask_of(fn)
            if mask is False:
                return 0.0
            if torch.is_tensor(mask):
                kept = torch.broadcast_to(
                    mask, _compat.broadcast_shapes(mask.shape, fn.batch_shape)
                )
                share *= float(kept.float().mean()) if kept.numel() else 0.0
        fn = fn.base_dist
    return share


def observed_count(trace) -> int:
    """Observed values as :func:`~pyro_emvae.fit.fit` counts them (``n_data``: per-datum values,
    ``tol``, BIC): over the observed sites, the cells of their plates (full sizes under
    subsampling), times T for a DiscreteHMM site, times the share of those cells that the
    site's masks keep (``poutine.mask``, a ``.mask(...)`` on the distribution, on a
    DiscreteHMM's ``observation_dist`` too), so that an HMM over ragged sequences counts the
    same unpadded time steps in the ``pyro.markov`` and the DiscreteHMM form.

    Not data, so not counted: ``pyro.factor`` terms, deterministic sites, fully masked sites
    (obs_mask's missing events under ExactEStep) and latents fixed by ``poutine.condition`` (a
    trace taken under :class:`MarkConditioned`; a site the model gives ``obs=`` is data). Pass
    ``fit(..., n_data=...)`` to count otherwise.
    """
    total = 0.0
    for site in trace.nodes.values():
        if not _is_sample(site) or not site["is_observed"] or _is_deterministic(site):
            continue
        if _is_factor(site) or site["infer"].get("_conditioned"):
            continue
        mask = site["mask"]
        if mask is False:
            continue
        cells = math.prod(f.full_size or f.size for f in frames_of(site))
        fn = site["fn"]
        if isinstance(fn, DiscreteHMM):
            cells *= _hmm_duration(site)
            # (the emissions' mask: (*batch, T, K) or broadcastable, per step)
            cells *= _mask_share(fn.observation_dist)
        else:
            cells *= _mask_share(fn)
        if torch.is_tensor(mask):  # the share of cells the site's mask keeps
            batch = fn.batch_shape
            kept = torch.broadcast_to(mask, _compat.broadcast_shapes(mask.shape, batch))
            cells *= float(kept.float().mean()) if kept.numel() else 0.0
        total += cells
    return round(total)


def count_observed(model: Callable, args: tuple = (), kwargs: dict | None = None) -> int:
    """:func:`observed_count` of one prior trace of ``model`` (the RNG state restored after).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
        ...     pyro.factor("penalty", torch.tensor(-1.0))  # a log-density term, not data
        >>> count_observed(model, (torch.zeros(5),))
        5
    """
    kwargs = kwargs or {}
    tracer = poutine.trace(model)
    with (
        preserved_rng(),
        poutine.block(),
        torch.no_grad(),
        explain_model_errors(tracer, inputs=(args, kwargs)),
        MarkConditioned(),
    ):
        trace = tracer.get_trace(*args, **kwargs)
    return observed_count(trace)


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
            k, what = site["fn"].initial_logits.size(-1), "hidden states"
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
    here, before SVI turns it into a NaN loss), value shapes that fit the plates
    (:func:`check_shapes`), and data that is not empty (:func:`check_nonempty`). With an :class:`~pyro_emvae.estep.ExactEStep` guide (``exact``):
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
    check_observed_types(trace, args, kwargs)
    check_observed(trace, exact=exact)
    check_params_and_distributions(trace)
    check_shapes(trace, depth)
    check_nonempty(trace)
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
def explain_model_errors(
    tracer=None,
    max_plate_nesting: int | None = None,
    inputs: tuple | None = None,
    budget: bool = True,
) -> Iterator[None]:
    """Re-raise Pyro's obscure errors from a model run with what they mean and what to do.

    * "Expected parameter ... to satisfy the constraint": a distribution built from a NaN (or
      otherwise invalid) tensor. If a param of the partial trace is non-finite, the error
      names that param (:func:`check_params`); else it says where the bad value comes from.
    * "Shape mismatch inside plate": a distribution's batch shape disagrees with a plate (or,
      with ``max_plate_nesting`` given, a plate lies where the enumerated dims go).
    * "only tensors with up to 64 dims": more enumerated dims than torch allows.
    * "size cannot be zero": a ``pyro.plate`` of size 0, i.e. empty data
      (``inputs``, the model's ``(args, kwargs)``, lets the message name the empty argument).

    While the model runs, :class:`EnumerationBudget` refuses an enumeration that would not fit
    in memory, before it is allocated (unless ``budget`` is False: arguments an earlier run
    was checked on, whose enumeration has the same sizes). ``tracer`` (the ``poutine.trace``
    handler that runs the model) gives the partial trace.
    """
    try:
        with EnumerationBudget() if budget else contextlib.nullcontext():
            yield
    except ZeroDivisionError as e:
        if "size cannot be zero" not in str(e):
            raise
        partial = _partial_trace(tracer)
        plates = [
            n
            for n, s in (partial.nodes.items() if partial is not None else ())
            if s["type"] == "sample" and isinstance(s["fn"], Subsample)
        ]
        which = f"pyro.plate '{plates[-1]}'" if plates else "a pyro.plate"
        raise ModelInputError(
            f"{which} has size 0: the data is empty"
            + _empty_inputs(inputs)
            + ". Pass at least one datum."
        ) from e
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
        raise EnumerationError(
            f"the model enumerates more sites at once than torch has tensor dims (64){count}: "
            "each enumerated site outside pyro.markov takes a dim of its own for the whole "
            "model. Put independent repeats of a site in a pyro.plate (one site, one dim), "
            "or chains in pyro.markov (dims are recycled)."
        ) from e


_ONE_TENSOR_SHAPES: dict = {}  # ((shape, dtype)) -> ValidationState.key's repr of them


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
            out.append(("t", weakref.ref(obj), _compat.tensor_version(obj)))
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
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            # (one tensor, the common call: what _entries gives it, its shapes' repr read
            # from a small table, as the E-step asks for it at every iteration)
            t = args[0]
            out = [("seq", 2), ("seq", 1), ("t", weakref.ref(t), _compat.tensor_version(t))]
            out.append(("dict", ()))
            shape = (tuple(t.shape), t.dtype)
            text = _ONE_TENSOR_SHAPES.get(shape)
            if text is None:
                if len(_ONE_TENSOR_SHAPES) > 256:
                    _ONE_TENSOR_SHAPES.clear()
                text = _ONE_TENSOR_SHAPES[shape] = repr([2, 1, shape, ()])
            return out, text
        out = []
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

    def forget_values(self) -> None:
        """Check the arguments' values again at the next call (their shapes, which the
        structure check follows, stay known)."""
        self._key = None

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
    key: tuple | None = None,
    prechecked: int | None = None,
) -> tuple | None:
    """The checks an ExactEStep runs on an enumerated trace before computing any log-prob, once
    per set of arguments (``state`` remembers which). Returns None when the arguments were
    validated before; else the arguments' key, which the caller hands to ``state.remember``
    once :func:`check_precision` has read the log-probs. ``key``: ``state.key(args, kwargs)``
    if the caller has it already (the arguments' key is read once per E-step).

    Params, observed values and shapes, the memory of the enumeration and the
    ``pyro.markov`` windows (the latter, one more model pass, only when the argument shapes
    change). Under subsampling the observed values are checked on every call (each call sees
    another minibatch; a cheap pass over it). ``prechecked``: this very trace went through
    :func:`validate_fit_inputs` (``exact=True``: fit's checks of its first E-step's pass, see
    :meth:`~pyro_emvae.estep.ExactEStep._first_trace`), whose ``check_shapes`` read this many
    plate dims; the same checks of the same trace are not run again.
    """
    key, shapes = state.key(args, kwargs) if key is None else key
    if state.seen(key):
        if _subsampled(trace):
            check_observed(trace, exact=True)
        return None
    if prechecked is None:
        check_observed(trace, exact=True)
        check_params_and_distributions(trace)
    if prechecked != max_plate_nesting:
        check_shapes(trace, max_plate_nesting)
    check_enumeration_memory(trace, max_plate_nesting)
    if not state.same_shapes(shapes):
        check_markov(model, args, kwargs, max_plate_nesting, trace=trace)
    return key, shapes
