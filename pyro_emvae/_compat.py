"""The one importer of Pyro's and torch's private APIs.

Every private name (a leading underscore, an undocumented module, a private attribute of a
public object, a private key Pyro writes into a site's ``infer`` dict) that pyro_emvae uses is
reached through this module, and each one is pinned by a test in ``tests/test_compat.py``: a
Pyro or torch upgrade that renames or changes one fails there first, under the name of what
broke, instead of deep inside an E-step.

Supported: ``pyro-ppl`` 1.9.x (tested on 1.9.2; the bound in ``pyproject.toml``) and torch >= 2.2.

Example::

    >>> import torch
    >>> from pyro_emvae import _compat
    >>> x = torch.randn(5, 3, 3)
    >>> _compat.sequential_logmatmulexp(x).shape  # the 5 matrices' product, in log space
    torch.Size([3, 3])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pyro
import torch

# The log-space product of a chain of matrices by a parallel scan (time dim -3): DiscreteHMM's
# own forward pass. estep's HMM log-likelihood uses it so that it equals DiscreteHMM.log_prob.
from pyro.distributions.hmm import _sequential_logmatmulexp as sequential_logmatmulexp

# Pyro's forward-filter backward-sample messenger: estep's exact conditionals subclass it and
# read the attributes its __init__ sets (``enum_trace``, ``log_factors``: ordinal -> list of
# packed log-factors, ``sum_dims``: the enumerated symbols still to sum out).
from pyro.infer.traceenum_elbo import BackwardSampleMessenger
from pyro.infer.traceenum_elbo import _find_ordinal as find_ordinal

# pyro.ops.packed: tensors whose dims are named by a string of symbols (``_pyro_dims``), the
# representation of Pyro's enumerated log-factors; undocumented, so it lives here.
from pyro.ops import packed

# pyro.ops.provenance: tensors that carry the names of the sample sites they were computed
# from (what pyro.infer.inspect.get_dependencies uses); undocumented. validate.check_markov
# reads which sites a site's distribution depends on.
from pyro.ops.provenance import (
    ProvenanceTensor,
    detach_provenance,
    get_provenance,
)

# How a Messenger wraps a function (``Messenger.__call__``): see handler_inner.
from pyro.poutine.messenger import _bound_partial, _context_wrap

# The global allocator of enumeration dims (``allocate(scope_dims) -> (dim, id)``): estep
# allocates a spare dim so that a moved dim lands on no site.
from pyro.poutine.runtime import _ENUM_ALLOCATOR as ENUM_ALLOCATOR

# The stack of active messengers (a list Pyro mutates in place, never rebinds): see handler_stack.
from pyro.poutine.runtime import _PYRO_STACK

# The fn of a plate's subsample site: told apart from the model's own sample sites.
from pyro.poutine.subsample_messenger import _Subsample as Subsample

# get/set the state of Python's, NumPy's and torch's generators at once (pyro.util, not in
# Pyro's public API): a probe or a check that draws must not move the user's stream.
from pyro.util import get_rng_state, set_rng_state
from torch.distributions import constraints as _tc

__all__ = [
    "ENUM_ALLOCATOR",
    "INNER_CATEGORICAL_ATTR",
    "MARKOV_KEYS",
    "MVN_SCALE_TRIL_ATTR",
    "TORCH_CHECK_OPS",
    "TORCH_PARAM_ATTR",
    "BackwardSampleMessenger",
    "Cat",
    "GreaterThan",
    "GreaterThanEq",
    "HalfOpenInterval",
    "IndependentConstraint",
    "IntegerGreaterThan",
    "IntegerInterval",
    "IntegerLessThan",
    "Interval",
    "LessThan",
    "LowerCholesky",
    "LowerTriangular",
    "MixtureSameFamilyConstraint",
    "MultinomialConstraint",
    "ProvenanceTensor",
    "Real",
    "Simplex",
    "Square",
    "Stack",
    "Subsample",
    "Symmetric",
    "categorical_num_events",
    "detach_provenance",
    "dim_to_symbol",
    "disable_torch_function_subclass",
    "enum_dim",
    "enum_symbol",
    "find_ordinal",
    "function_mode_depth",
    "get_provenance",
    "get_rng_state",
    "handler_inner",
    "handler_stack",
    "inner_categorical",
    "insert_function_mode",
    "is_deterministic",
    "markov_depth",
    "markov_scope",
    "mask_of",
    "mvn_scale_tril",
    "packed",
    "param_constraint",
    "pyro_dims",
    "remove_function_mode",
    "sequential_logmatmulexp",
    "set_pyro_dims",
    "set_pyro_name",
    "set_rng_state",
    "tensor_version",
    "validate_args_flag",
]


# ------------------------------------------------------------------ the Pyro runtime
def handler_stack() -> list:
    """The active Pyro messengers, innermost last (``pyro.poutine.runtime._PYRO_STACK``):
    validate reads whether a ``poutine.condition`` above a site holds its value."""
    return _PYRO_STACK


def handler_inner(fn: Any) -> Callable | None:
    """One layer inside a ``poutine.*(fn)`` handler, or None when ``fn`` is not one. Pyro 1.9
    wraps ``fn`` as ``_bound_partial(partial(_context_wrap, messenger, fn))``: the
    ``_bound_partial`` gives the partial it holds, the partial gives ``fn`` (two calls per
    handler). fit walks this chain to compare the model a guide was built for with the one it
    is given."""
    if isinstance(fn, _bound_partial):
        return fn.func
    if isinstance(fn, functools.partial) and fn.func is _context_wrap and len(fn.args) >= 2:
        return fn.args[1]
    return None


def param_constraint(name: str):
    """The constraint of the param ``name`` in Pyro's param store (``ParamStoreDict._constraints``;
    the public ``get_state()`` copies every param's)."""
    return pyro.get_param_store()._constraints[name]


def transform_factory(c) -> Callable | None:
    """The factory ``transform_to`` calls for the constraint ``c`` (``ConstraintRegistry.
    _registry[type(c)]``; None if none is registered): what a transform cached per constraint
    is keyed on besides the constraint itself (a registration replaces it)."""
    return torch.distributions.transform_to._registry.get(type(c))


def set_pyro_name(module: torch.nn.Module, name: str) -> None:
    """Name a root ``PyroModule`` (an autoguide) after construction (``module._pyro_name``): its
    params are then called ``f"{name}.…"``. AutoGuide takes no name argument."""
    module._pyro_name = name


# ------------------------------------------------------------------ enumerated sites
#: The keys ``pyro.markov`` writes into a site's ``infer``: dropped where a site leaves a scope.
MARKOV_KEYS = ("_markov_scope", "_markov_depth")


def enum_dim(site: dict) -> int | None:
    """The (negative) tensor dim the enum messenger gave a site, or None if not enumerated."""
    return (site["infer"] or {}).get("_enumerate_dim")


def enum_dim_ids(site: dict) -> dict:
    """The enum messenger's map of a site's enumeration dims (negative tensor dims) to their
    allocation ids (``Trace.symbolize_dims`` names each by ``get_symbol(1 + 2 * id)``)."""
    return (site["infer"] or {}).get("_dim_to_id", {})


def enum_symbol(site: dict) -> str | None:
    """The packed-dim symbol of an enumerated site (set by ``Trace.pack_tensors``), or None."""
    return (site["infer"] or {}).get("_enumerate_symbol")


# the keys Trace.pack_tensors adds to an enumerated site's infer (the trace's, not the model's)
PACKED_INFER_KEYS = frozenset(("_dim_to_symbol", "_enumerate_symbol"))


def dim_to_symbol(site: dict) -> dict:
    """``Trace.pack_tensors``' map from tensor dims to symbols, as the site's packed values use."""
    return site["infer"]["_dim_to_symbol"]


def markov_scope(site: dict):
    """The sites a site sampled under ``pyro.markov`` may depend on: a Counter ``{name: in how
    many of the site's markov contexts that name is within the history window}``, or None. A
    site reads ``dep`` legitimately iff ``markov_scope(site)[dep] == markov_depth(dep_site)``
    (Pyro's own rule, in ``TraceEnum_ELBO``'s dependency check)."""
    return (site["infer"] or {}).get("_markov_scope")


def markov_depth(site: dict) -> int | None:
    """How many ``pyro.markov`` contexts a site was sampled in (nesting depth), or None."""
    return (site["infer"] or {}).get("_markov_depth")


def is_deterministic(site: dict) -> bool:
    """A ``pyro.deterministic`` site (an observed Delta of zero log-density)."""
    return bool((site["infer"] or {}).get("_deterministic"))


def pyro_dims(t: torch.Tensor, default: str | None = None) -> str:
    """The symbols naming a packed tensor's dims, one per dim (``t._pyro_dims``); ``default``
    (if not None) for a tensor that has none."""
    if default is None:
        return t._pyro_dims
    return getattr(t, "_pyro_dims", default)


def set_pyro_dims(t: torch.Tensor, dims: str) -> torch.Tensor:
    """Name a tensor's dims for :mod:`pyro.ops.packed` and Pyro's contractions; returns ``t``."""
    t._pyro_dims = dims
    return t


# ------------------------------------------------------------------ distributions
#: The private attribute that holds a torch Categorical's / Bernoulli's / Binomial's parameter
#: (the same tensor as ``.probs`` or ``.logits``, whichever was given, normalized as stored):
#: the M-step tracks params through it.
TORCH_PARAM_ATTR = "_param"

#: MultivariateNormal's Cholesky factor before broadcasting to the batch shape: the one its
#: log_prob reads, whichever of scale_tril / covariance / precision was given.
MVN_SCALE_TRIL_ATTR = "_unbroadcasted_scale_tril"


#: The attribute of a torch OneHotCategorical / Multinomial that holds its Categorical.
INNER_CATEGORICAL_ATTR = "_categorical"

#: Private torch ops that only inspect a tensor (distribution argument validation runs
#: ``Tensor._is_all_true``): a tracked param passing through them is not "used".
TORCH_CHECK_OPS = frozenset({"_is_all_true"})


def mvn_scale_tril(fn) -> torch.Tensor:
    """A MultivariateNormal's Cholesky factor, unbroadcast (shape ``batch' + (D, D)``)."""
    return getattr(fn, MVN_SCALE_TRIL_ATTR)


def mask_of(fn):
    """The mask that ``MaskedDistribution`` (``d.mask(m)``) holds: a bool tensor or a bool."""
    return fn._mask


def inner_categorical(fn):
    """The Categorical inside a torch ``OneHotCategorical`` or ``Multinomial``."""
    return getattr(fn, INNER_CATEGORICAL_ATTR)


def categorical_num_events(fn) -> int:
    """A Categorical's number of categories (``_num_events``: no tensor read)."""
    return int(fn._num_events)


def validate_args_flag(fn) -> bool | None:
    """A torch distribution's own ``validate_args`` (``_validate_args``; the class default
    when none was given), None for an object that has none."""
    return getattr(fn, "_validate_args", None)


# ------------------------------------------------------------------ torch
def tensor_version(t: torch.Tensor) -> int:
    """A tensor's in-place modification counter (``t._version``): input caches key on it."""
    return t._version


def einsum_equation(equation: str, operands: list) -> torch.Tensor:
    """``torch.einsum(equation, *operands)`` for one or two plain tensors, straight to ATen
    (``torch._VF.einsum``, which ``torch.einsum`` calls for at most two operands, after parsing
    its arguments in Python): the M-step's statistics call it on small tensors every
    iteration. Any other input goes through ``torch.einsum``."""
    if len(operands) <= 2 and all(type(o) is torch.Tensor for o in operands):
        return torch._VF.einsum(equation, operands)
    return torch.einsum(equation, *operands)


def view_base(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage ``t`` is a view of (``t._base``), or ``t`` itself: a view's
    values are its base's at the view's geometry (shape, strides, storage offset)."""
    base = t._base
    return t if base is None else base


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes(*shapes)`` (each a sequence of ints), by ATen's pairwise
    ``torch._C._infer_size``: torch's own is a Python reference implementation (``torch._refs``)
    at ~25 µs a call, which on small data is a visible share of an EM iteration (the rules and
    kernels call it several times per site). A mismatch is a RuntimeError, as there.

    Example::

        >>> broadcast_shapes((2, 1), (3,), torch.Size([1, 1]))
        torch.Size([2, 3])
    """
    out = _EMPTY_SIZE
    for s in shapes:
        out = torch._C._infer_size(out, s if type(s) is torch.Size else torch.Size(s))
    return out


_EMPTY_SIZE = torch.Size()


#: Runs torch functions inside a ``__torch_function__`` override without re-dispatching to the
#: subclass (the idiom of torch's own subclassing docs): track.Tracked computes its result so.
disable_torch_function_subclass = torch._C.DisableTorchFunctionSubclass


def function_mode_depth() -> int:
    """How many torch function modes (``TorchFunctionMode``) are active."""
    return torch._C._len_torch_function_stack()


def insert_function_mode(mode, depth: int) -> None:
    """Activate ``mode`` as if it had been entered when ``depth`` modes were active: the
    modes entered since then stay above it (each still exits first, as ``with`` nests them).
    validate.EnumerationBudget starts its watch at a model's first enumerated site so."""
    above = []
    while torch._C._len_torch_function_stack() > depth:
        above.append(torch._C._pop_torch_function_stack())
    torch._C._push_on_torch_function_stack(mode)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


def remove_function_mode(mode) -> None:
    """Deactivate ``mode`` where it is on the stack of torch function modes (the ones above
    it stay, in their order); nothing if it is not there."""
    n = torch._C._len_torch_function_stack()
    if not any(torch._C._get_function_stack_at(i) is mode for i in range(n)):
        return
    above = []
    while True:
        m = torch._C._pop_torch_function_stack()
        if m is mode:
            break
        above.append(m)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


# torch's constraint classes (private names; torch exposes instances and factories only):
# checkpoint stores a constraint by class and arguments, rules reads a param's support.
Real = _tc._Real
GreaterThan = _tc._GreaterThan
GreaterThanEq = _tc._GreaterThanEq
LessThan = _tc._LessThan
Interval = _tc._Interval
HalfOpenInterval = _tc._HalfOpenInterval
IntegerInterval = _tc._IntegerInterval
IntegerGreaterThan = _tc._IntegerGreaterThan
IntegerLessThan = _tc._IntegerLessThan
MultinomialConstraint = _tc._Multinomial
IndependentConstraint = _tc._IndependentConstraint
Cat = _tc._Cat
Stack = _tc._Stack
Simplex = _tc._Simplex
LowerCholesky = _tc._LowerCholesky
LowerTriangular = _tc._LowerTriangular
Square = _tc._Square
Symmetric = _tc._Symmetric
#: MixtureSameFamily's support (public, but new in torch 2.8): None on an older torch.
MixtureSameFamilyConstraint = getattr(_tc, "MixtureSameFamilyConstraint", None)
