"""Which param elements reach which distribution arguments: provenance by probing.

A closed-form M-step applies when a distribution's argument is a param itself or a *selection* of
it: indexed by enumerated latents (``locs[z]``), expanded or broadcast (plates, shared scales),
reshaped, concatenated (``torch.cat([start, trans])``). To find this from the model's own code,
:func:`probe` runs the model once with every param replaced by a :class:`Tracked` tensor: the
param's value carrying ``ids``, the flat index of the param element at every position. Selection
ops apply to the values and the ids alike; a row normalization (``p / p.sum(-1, keepdim=True)``,
what ``Categorical(probs=...)`` does) and ``log`` keep the ids and record the form; any other op
returns a plain tensor, so an argument computed by arithmetic (a neural net, ``softplus``) is
simply not tracked and its param is left to gradient steps.

Example::

    >>> import torch
    >>> t = Tracked.wrap(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "locs")
    >>> z = torch.tensor([[1], [0]])
    >>> t[z].ids.tolist()
    [[[2, 3]], [[0, 1]]]
"""

from __future__ import annotations

import contextlib
import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyro_emvae import _compat

__all__ = ["IdSpace", "Tracked", "probe"]

# ops whose result is a rearrangement of the input's elements: applied to the ids alike
_SELECT = {
    "__getitem__", "expand", "expand_as", "broadcast_to", "reshape", "view", "view_as",
    "unsqueeze", "squeeze", "permute", "transpose", "t", "contiguous", "clone", "detach",
    "flatten", "unflatten", "movedim", "select", "narrow", "index_select", "unbind", "split",
    "chunk", "repeat", "T", "mT", "__get__", "flip",
}  # fmt: skip
_CONVERT = {"to", "type_as", "double", "float", "half", "cpu", "cuda"}
_MULTI = {"broadcast_tensors", "cat", "concat", "stack"}
# ops that only inspect (shapes, validation): a param passing through them is not "used"
_CHECKS = {
    "size", "dim", "numel", "__len__", "__bool__", "__eq__", "__ne__", "__gt__", "__ge__",
    "__lt__", "__le__", "eq", "ne", "gt", "ge", "lt", "le", "all", "any", "isnan", "isinf",
    "isfinite", *_compat.TORCH_CHECK_OPS, "__and__", "__or__", "shape", "dtype", "device", "__repr__",
    "__format__", "is_floating_point", "requires_grad", "__hash__", "data_ptr", "stride",
    "storage_offset", "is_contiguous", "__get__",
    # factorizations torch's MultivariateNormal runs on a covariance or precision argument it
    # also stores as given (the rule reads the stored one; a model that passes only the
    # factor gets no closed form: the param then reaches no handled argument)
    "linalg_cholesky", "cholesky", "linalg_cholesky_ex", "linalg_solve_triangular",
    "solve_triangular", "triangular_solve",
}  # fmt: skip
_OPAQUE: set | None = None  # while probing: params used by an op no rule can see through


# (torch.Tensor's own shape reads, for Tracked's: see Tracked.shape; read from the public
# class, whose attributes these are, before Tracked overrides them)
_BASE_SHAPE = torch.Tensor.shape.__get__
_BASE_DTYPE = torch.Tensor.dtype.__get__
_BASE_DEVICE = torch.Tensor.device.__get__
_BASE_DIM = torch.Tensor.dim
_BASE_SIZE = torch.Tensor.size


class Tracked(torch.Tensor):
    """A tensor that remembers, for each element, which element of which param it is.

    Attributes:
        param: the name of the (first) param it comes from.
        ids: long tensor, the same shape: a global element id (each probed param owns the range
            ``offset .. offset + numel``, see :class:`IdSpace`), so a tensor concatenated from
            several params still knows each element's source.
        form: ``"value"`` (the param's constrained value), ``"log"`` (its log),
            ``"normalized"`` (divided by its sum over the last dim) or ``"linear"``: a sum
            ``sum_p design[p] * θ[ids[p]] + const`` over param elements with data
            coefficients (``X @ W[z] + b[z]``), whose ``ids`` and ``design`` then lead with a
            dim of the P slots, and ``const`` is data or None.
    """

    param: str
    ids: torch.Tensor
    form: str

    @staticmethod
    def wrap(
        value: torch.Tensor, param: str, ids: torch.Tensor | None = None, form: str = "value"
    ) -> Tracked:
        out = value.as_subclass(Tracked)
        out.param = param
        if ids is None:
            ids = torch.arange(value.numel(), device=value.device).reshape(value.shape)
        out.ids = ids
        out.form = form
        out.param_names = frozenset([param])
        return out

    # The probe's most frequent calls are shape reads (a distribution's constructor reads
    # ``shape``, ``dim()``, ``device`` and ``dtype`` of each argument): read here, with torch's
    # subclass dispatch off, they skip a Python ``__torch_function__`` round trip each (~6 µs).
    # They return what that round trip returns (``_fast``'s inspections give back the plain
    # tensor's result as it is), and an inspection marks no param as used (``_CHECKS``). A
    # torch function mode still sees them (dispatch off for subclasses only).
    @property
    def shape(self) -> torch.Size:
        with _compat.disable_torch_function_subclass():
            return _BASE_SHAPE(self)

    @property
    def dtype(self) -> torch.dtype:
        with _compat.disable_torch_function_subclass():
            return _BASE_DTYPE(self)

    @property
    def device(self) -> torch.device:
        with _compat.disable_torch_function_subclass():
            return _BASE_DEVICE(self)

    def dim(self) -> int:
        with _compat.disable_torch_function_subclass():
            return _BASE_DIM(self)

    def size(self, *args, **kwargs):
        with _compat.disable_torch_function_subclass():
            return _BASE_SIZE(self, *args, **kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(func, "__self__", None) is not None:
            name = getattr(func.__self__, "__name__", name)
        if name in _FAST and type(args) is tuple:
            out = _fast(name, func, args, kwargs)
            if out is not _SLOW:
                return out
        elif name in _ROW_FAST and type(args) is tuple:
            out = _row_fast(name, func, args, kwargs)
            if out is not _SLOW:
                return out
        plain_args, plain_kwargs = _strip(args), _strip(kwargs)
        with _compat.disable_torch_function_subclass():
            result = func(*plain_args, **plain_kwargs)
        flat = _flat(args)
        sources = [a for a in flat if isinstance(a, Tracked)]
        if not sources:
            return result
        src = sources[0]
        if any(_is_linear(a) for a in flat) or (
            _OPAQUE is not None and name in _MUL | _MATMUL
        ):  # (an argument linear in params: ``X @ W[z]``, see ``_linear_op``)
            return _linear_or_plain(name, func, args, kwargs, result, sources)
        if name in _CONVERT:  # dtype/device conversions: same elements, same ids
            if isinstance(args[0], Tracked) and isinstance(result, torch.Tensor):
                return _rewrap(result, args[0], args[0].ids.to(result.device), args[0].form)
            return _plain(result)  # a tracked tensor only lent its dtype or device
        if name in _SELECT and len(sources) == 1:
            ids = func(*_swap(args), **_swap(kwargs))
            return _rewrap(result, src, ids, src.form)
        if name == "broadcast_tensors":  # each output keeps its own input's provenance
            return tuple(
                _rewrap(r, a, a.ids.expand(r.shape), a.form)
                if isinstance(a, Tracked)
                else _plain(r)
                for a, r in zip(_flat(args), result)
            )
        if (
            name in _MULTI
            and _same(sources, src)
            and all(isinstance(a, Tracked) for a in _flat(args) if isinstance(a, torch.Tensor))
        ):
            ids = func(*_swap(args), **_swap(kwargs))
            out = _rewrap(result, src, ids, src.form)
            out.param_names = frozenset().union(*(s.param_names for s in sources))
            return out
        if name == "log" and src.form == "value":
            return _rewrap(result, src, src.ids, "log")
        if _normalizes(name, args, ("div", "__truediv__"), "value"):
            return _rewrap(result, src, src.ids, "normalized")
        if name == "sum" and src.form == "value" and _is_last_dim_keepdim(args, kwargs):
            out = result.as_subclass(_RowSum)
            out.source = src
            return out
        if name == "logsumexp" and src.form == "log" and _is_last_dim_keepdim(args, kwargs):
            out = result.as_subclass(_RowSum)
            out.source = src
            return out
        if _normalizes(name, args, ("sub", "__sub__"), "log"):
            return _rewrap(result, src, src.ids, "log")
        if _OPAQUE is not None and name not in _CHECKS:
            for source in sources:
                _OPAQUE.update(source.param_names)
        return _plain(result)


# The probe's most frequent ops, on one tracked value among plain arguments (no container but
# a shape, no tensor keyword): shape inspections, whose result is not a tensor, and selections.
# They take a shorter road to the same result as the general path below (the same op on the same
# plain tensors; the ids by the same op on the ids), with torch's subclass dispatch off once
# instead of once per argument. Anything else goes the general way.
_INSPECT = frozenset({
    "dim", "size", "numel", "__len__", "shape", "dtype", "device", "is_floating_point",
    "requires_grad", "stride", "storage_offset", "is_contiguous",
})  # fmt: skip
_FAST_SELECT = frozenset(_SELECT - {"__get__", "unbind", "split", "chunk"})  # (one tensor out)
_FAST = _INSPECT | _FAST_SELECT
_SLOW = object()


def _is_shape(a) -> bool:
    """A ``torch.Size`` or a flat tuple of ints (``expand(loc_shape)``, ``reshape((6, 2))``: a
    distribution's ``expand`` passes its batch shape so): plain data, no tensor inside, which
    the op reads the same on the values as on the ids."""
    return type(a) is torch.Size or (type(a) is tuple and all(type(i) is int for i in a))


def _fast(name: str, func, args: tuple, kwargs: dict):
    """``Tracked.__torch_function__`` of an op in :data:`_FAST` when exactly one argument is
    a tracked value (not linear) and the others are plain (no tensor among the keywords): its
    result as the general path makes it, or :data:`_SLOW` where the general path must run."""
    src = None
    for a in args:
        if isinstance(a, (Tracked, _RowSum)):
            if src is not None or type(a) is not Tracked or a.form == "linear":
                return _SLOW
            src = a
        elif isinstance(a, _NESTED) and not _is_shape(a):
            return _SLOW
    if src is None or any(isinstance(v, (torch.Tensor, *_NESTED)) for v in kwargs.values()):
        return _SLOW
    with _compat.disable_torch_function_subclass():
        # (src itself: with subclass dispatch off the op runs on it as on a plain tensor, and
        # a new tensor it makes is a plain one; an op that gives back its input, such as
        # contiguous(), gives back src, rewrapped below as the general path rewraps it)
        result = func(*args, **kwargs)
        if name in _INSPECT:
            if isinstance(result, torch.Size) or not isinstance(result, (torch.Tensor, *_NESTED)):
                return result  # (what _plain gives back for a number, a dtype, a Size)
            return _SLOW
        if not isinstance(result, torch.Tensor):
            return _SLOW
        ids = func(*[src.ids if a is src else a for a in args], **kwargs)
        if not isinstance(ids, torch.Tensor):
            return _SLOW
        out = result.as_subclass(Tracked)
    out.param, out.ids, out.form, out.param_names = src.param, ids, src.form, src.param_names
    return out


# A row normalization, ``p / p.sum(-1, keepdim=True)`` (what ``Categorical(probs=p)`` does with a
# param's value): its two ops by a shorter road to the general path's results (the same ops on
# the same plain tensors, the same wrapping), where nothing else is among the arguments.
_ROW_FAST = frozenset({"sum", "div", "__truediv__"})


def _row_fast(name: str, func, args: tuple, kwargs: dict):
    """``Tracked.__torch_function__`` of a row sum of a value-form tracked tensor, or of its
    division by that sum, as the general path makes it; :data:`_SLOW` for anything else."""
    src = args[0] if args else None
    if type(src) is not Tracked or src.form != "value":
        return _SLOW
    if name == "sum":
        if any(isinstance(a, (torch.Tensor, *_NESTED)) for a in (*args[1:], *kwargs.values())):
            return _SLOW
        if not _is_last_dim_keepdim(args, kwargs):
            return _SLOW
        with _compat.disable_torch_function_subclass():
            result = func(*args, **kwargs)
        out = result.as_subclass(_RowSum)
        out.source = src
        return out
    if kwargs or len(args) != 2 or type(args[1]) is not _RowSum or args[1].source is not src:
        return _SLOW
    with _compat.disable_torch_function_subclass():
        result = func(*args)
    return _rewrap(result, src, src.ids, "normalized")


class _RowSum(torch.Tensor):
    """``p.sum(-1, keepdim=True)`` (or ``logsumexp``, for a log-form ``p``) of a tracked ``p``:
    normalizing ``p`` by it keeps the ids."""

    source: Tracked

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("div", "__truediv__", "sub", "__sub__") and any(
            isinstance(a, Tracked) for a in args
        ):
            return Tracked.__torch_function__(func, types, args, kwargs)
        with _compat.disable_torch_function_subclass():
            return _plain(func(*_strip(args), **_strip(kwargs)))


def _normalizes(name: str, args, ops: tuple[str, ...], form: str) -> bool:
    """``p / p.sum(-1, keepdim=True)`` (or ``p - p.logsumexp(-1, keepdim=True)`` in log form)."""
    return (
        name in ops
        and len(args) == 2
        and isinstance(args[1], _RowSum)
        and args[1].source is args[0]
        and args[0].form == form
    )


def _is_last_dim_keepdim(args, kwargs) -> bool:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    ndim = args[0].dim()
    return (
        keep and dim is not None and (dim == -1 or dim == ndim - 1 or dim in ((-1,), (ndim - 1,)))
    )


def _flat(obj) -> list:
    if type(obj) is tuple and not any(isinstance(o, _NESTED) for o in obj):
        return list(obj)  # (the usual arguments: no container among them)
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flat(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flat(o)]
    return [obj]


_NESTED = (list, tuple, dict)


def _map(obj, fn):
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj)


def _unwrap(o):
    if isinstance(o, (Tracked, _RowSum)):
        with _compat.disable_torch_function_subclass():
            return o.as_subclass(torch.Tensor)
    return o


def _strip(obj):
    # (every op of a probe passes here: the usual arguments, a flat tuple and no kwargs, are
    # mapped without _map's recursion)
    if type(obj) is tuple and not any(isinstance(o, _NESTED) for o in obj):
        return tuple([_unwrap(o) for o in obj])
    if type(obj) is dict and not obj:
        return {}
    return _map(obj, _unwrap)


def _swap(obj):
    return _map(obj, lambda o: o.ids if isinstance(o, Tracked) else o)


def _same(sources: list, src: Tracked) -> bool:
    return all(s.form == src.form for s in sources)


def _plain(result):
    if isinstance(result, torch.Tensor):
        return _unwrap(result)
    return _map(result, _unwrap)


def _rewrap(result, src: Tracked, ids, form: str):
    if isinstance(result, (tuple, list)):
        return type(result)(_rewrap(r, src, i, form) for r, i in zip(result, ids))
    if not isinstance(result, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return _plain(result)
    with _compat.disable_torch_function_subclass():
        base = result.as_subclass(torch.Tensor)
    out = Tracked.wrap(base, src.param, ids, form)
    out.param_names = src.param_names
    return out


# ---------------------------------------------------------------- the linear form
# ``X @ W[z] + b[z]``: an argument linear in param elements, ``sum_p design[p] * θ[ids[p]] +
# const`` (``design`` data, of shape (P, *value shape); ``ids`` the param elements, the same
# shape; ``const`` data or None). Made while probing only, by a product of a tracked param
# with data (``*``, ``@``), and kept through sums over the last dim, additions of tracked
# params and data, scaling, and the selection ops; any other op on it is an opaque use.
_MUL = {"mul", "__mul__", "__rmul__", "multiply"}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "mv"}
_ADD = {"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "subtract"}
_NEG = {"neg", "__neg__", "negative"}
_DIV = {"div", "__truediv__", "true_divide", "divide"}
# while probing: every linear tensor made, and the ids of those some op consumed (a linear
# tensor neither consumed nor stored in a distribution was computed and dropped: an opaque
# use, as any other arithmetic on a param)
_LINEAR: list | None = None
_CONSUMED: set | None = None


def _is_linear(a) -> bool:
    return isinstance(a, Tracked) and a.form == "linear"


def _is_data(a) -> bool:
    return not isinstance(a, (Tracked, _RowSum)) and (isinstance(a, (torch.Tensor, int, float)))


def _lead(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` of shape (P, *s) broadcast to (P, *shape) (the slot dim stays first: plain
    broadcasting would align it with a value dim)."""
    extra = len(shape) - (t.dim() - 1)
    if extra > 0:
        t = t.reshape((t.shape[0],) + (1,) * extra + t.shape[1:])
    return t.expand((t.shape[0], *shape))


def _make_linear(result, src: Tracked, design, ids, const, names) -> Tracked | None:
    if not isinstance(result, torch.Tensor):
        return None
    design, ids = _lead(design, result.shape), _lead(ids, result.shape)
    with _compat.disable_torch_function_subclass():
        base = result.as_subclass(torch.Tensor)
    out = Tracked.wrap(base, src.param, ids, "linear")
    out.design = design
    out.const = None if const is None else torch.as_tensor(const).expand(result.shape)
    out.param_names = names
    if _LINEAR is not None:
        _LINEAR.append(out)
    return out


def _terms(a, shape, sign: float):
    """``a`` (linear, a tracked param value, or data) as ``(design, ids, const)`` over ``shape``."""
    if _is_linear(a):
        const = None if a.const is None else sign * a.const
        return _lead(sign * a.design, shape), _lead(a.ids, shape), const
    if isinstance(a, Tracked):  # a param's value: one slot of design 1
        ones = torch.full((1,), sign, dtype=torch.get_default_dtype(), device=a.device)
        return (
            ones.reshape((1,) * (1 + len(shape))).expand((1, *shape)),
            a.ids.expand(shape).unsqueeze(0),
            None,
        )
    return None, None, sign * torch.as_tensor(a)


def _linear_op(name, func, args, kwargs, result, sources):
    """The linear-form result of ``func(*args)``, or None where it is not linear."""
    probing = _OPAQUE is not None
    linear = [a for a in _flat(args) if _is_linear(a)]
    src = sources[0]
    names = frozenset().union(*(s.param_names for s in sources))
    if name in _CONVERT and _is_linear(args[0]):
        a = args[0]
        design = a.design.to(dtype=result.dtype, device=result.device)
        const = None if a.const is None else a.const.to(dtype=result.dtype, device=result.device)
        return _make_linear(result, a, design, a.ids.to(result.device), const, a.param_names)
    if name == "broadcast_tensors":
        out = []
        for a, r in zip(_flat(args), result):
            if _is_linear(a):
                const = None if a.const is None else a.const.expand(r.shape)
                a = _make_linear(r, a, a.design, a.ids, const, a.param_names)
            elif isinstance(a, Tracked):
                a = _rewrap(r, a, a.ids.expand(r.shape), a.form)
            else:
                a = _plain(r)
            if a is None:
                return None
            out.append(a)
        return tuple(out)
    if name in _SELECT and len(sources) == 1 and linear:
        a = linear[0]

        def apply(t):
            return func(*_map(args, lambda o: t if o is a else o), **kwargs)

        design, ids = torch.vmap(apply)(a.design), torch.vmap(apply)(a.ids)
        const = None if a.const is None else apply(a.const)
        return _make_linear(result, a, design, ids, const, a.param_names)
    if name in _NEG:
        if len(args) != 1 or not linear:
            return None
        a = linear[0]
        const = None if a.const is None else -a.const
        return _make_linear(result, a, -a.design, a.ids, const, a.param_names)
    if name == "sum":
        if not linear or args[0] is not linear[0] or len(args) > 3:
            return None
        a = linear[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if not isinstance(dim, int) or set(kwargs) - {"dim", "keepdim"}:
            return None
        d = dim + 1 if dim >= 0 else dim  # (design and ids lead with the slot dim)
        p = a.design.shape[0]
        design, ids = a.design.movedim(d, 1), a.ids.expand(a.design.shape).movedim(d, 1)
        design = design.reshape((p * design.shape[1], *design.shape[2:]))
        ids = ids.reshape(design.shape)
        if keep:
            design, ids = design.unsqueeze(d), ids.unsqueeze(d)
        const = None if a.const is None else a.const.sum(dim, keepdim=keep)
        return _make_linear(result, a, design, ids, const, a.param_names)
    if len(args) != 2 or kwargs:
        return None
    x, y = args
    shape = result.shape
    if name in _MUL or (name in _DIV and _is_data(y)):
        tracked, data = (x, y) if isinstance(x, Tracked) else (y, x)
        if not _is_data(data) or not (_is_linear(tracked) or (probing and tracked.form == "value")):
            return None
        data = torch.as_tensor(data, dtype=result.dtype, device=result.device)
        if name in _DIV:
            data = 1.0 / data
        design, ids, _ = _terms(tracked, tracked.shape, 1.0)
        p = design.shape[0]
        # (the slots lead: expand to the result's shape before the data broadcasts in)
        design = _lead(design.to(result.dtype), shape) * data
        const = None if not _is_linear(tracked) or tracked.const is None else tracked.const * data
        return _make_linear(result, tracked, design, ids, const, names)
    if name in _MATMUL and probing and len(sources) == 1 and src.form == "value":
        a, b = (y, x) if name == "__rmatmul__" else (x, y)
        if not (_is_data(a) or _is_data(b)) or not all(isinstance(t, torch.Tensor) for t in (a, b)):
            return None
        a1 = a.unsqueeze(0) if a.dim() == 1 else a  # (..., I, D)
        b1 = b.unsqueeze(-1) if b.dim() == 1 else b  # (..., D, J)
        left, right = a1.unsqueeze(-1), b1.unsqueeze(-3)  # (..., I, D, 1), (..., 1, D, J)
        full = _compat.broadcast_shapes(left.shape, right.shape)
        if b is src:
            design, ids = left, src.ids.reshape(b1.shape).unsqueeze(-3)
        else:
            design, ids = right, src.ids.reshape(a1.shape).unsqueeze(-1)
        design = design.as_subclass(torch.Tensor).expand(full).movedim(-2, 0)
        ids = ids.expand(full).movedim(-2, 0)
        if b.dim() == 1:
            design, ids = design.squeeze(-1), ids.squeeze(-1)
        if a.dim() == 1:  # (torch.matmul drops the dims it added to a vector)
            i = -1 if b.dim() == 1 else -2
            design, ids = design.squeeze(i), ids.squeeze(i)
        return _make_linear(result, src, design.to(result.dtype), ids, None, names)
    if name in _ADD and linear:
        if not all(_is_linear(a) or _is_data(a) or a.form == "value" for a in (x, y)):
            return None
        signs = (1.0, -1.0) if name in ("sub", "__sub__", "subtract") else (1.0, 1.0)
        if name == "__rsub__":
            signs = (-1.0, 1.0)
        parts = [_terms(a, shape, s) for a, s in zip((x, y), signs)]
        designs = [d.to(result.dtype) for d, _, _ in parts if d is not None]
        ids = [i for _, i, _ in parts if i is not None]
        consts = [c for _, _, c in parts if c is not None]
        const = sum(consts) if consts else None
        return _make_linear(result, src, torch.cat(designs), torch.cat(ids), const, names)
    return None


def _linear_or_plain(name, func, args, kwargs, result, sources):
    """Ops on (or making) linear forms: the linear result, or the plain one (an opaque use of
    the params, unless the op only inspects)."""
    try:
        out = _linear_op(name, func, args, kwargs, result, sources)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
        out = None
    if _CONSUMED is not None and name not in _CHECKS:
        _CONSUMED.update(id(a) for a in _flat(args) if _is_linear(a))
    if out is not None:
        return out
    if _OPAQUE is not None and name not in _CHECKS:
        for source in sources:
            _OPAQUE.update(source.param_names)
    return _plain(result)


def _stored_linear(trace) -> set[int]:
    """The ids of the linear tensors some sample site's distribution holds."""
    found: set[int] = set()

    def walk(fn):
        for v in vars(fn).values():
            if _is_linear(v):
                found.add(id(v))
            elif isinstance(v, torch.distributions.Distribution):
                walk(v)

    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(
            site.get("fn"), torch.distributions.Distribution
        ):
            walk(site["fn"])
    return found


# (start, shape, device) -> (the ids start + arange(numel) in that shape, their in-place version)
_ID_RANGES: dict[tuple, tuple[torch.Tensor, int]] = {}
_SMALL_RANGE = 4096


def _id_range(start: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``torch.arange(start, start + numel).reshape(shape)`` on ``device``: a param's ids, a
    function of these three only. A small range (at most :data:`_SMALL_RANGE` ids: no memory
    held worth the name) is made once and given again while unchanged in place (its version
    is checked): every probe of a fit, and of the next fit, reads the same ranges."""
    n = math.prod(shape)
    key = (start, tuple(shape), device)
    hit = _ID_RANGES.get(key) if n <= _SMALL_RANGE else None
    if hit is not None and _compat.tensor_version(hit[0]) == hit[1]:
        return hit[0]
    # (the range from the offset: one op fewer than offset + arange, the same ids)
    ids = torch.arange(start, start + n, device=device).reshape(shape)
    if n > _SMALL_RANGE:
        return ids
    if len(_ID_RANGES) >= 256:  # (ranges of models long gone: start over)
        _ID_RANGES.clear()
    _ID_RANGES[key] = (ids, _compat.tensor_version(ids))
    return ids


class IdSpace(Messenger):
    """Replaces every param's value by a :class:`Tracked` copy (detached: a probe, no grads),
    giving each param a range of global element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.offsets: dict[str, int] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.opaque: set[str] = set()
        self._next = 0

    def _pyro_post_param(self, msg) -> None:
        value, name = msg["value"], msg["name"]
        if not isinstance(value, torch.Tensor) or isinstance(value, Tracked):
            return
        if name not in self.offsets:
            self.offsets[name], self.shapes[name] = self._next, value.shape
            self._next += value.numel()
        # (on the param's device: the rules gather and scatter with them beside the data)
        ids = _id_range(self.offsets[name], value.shape, value.device)
        msg["value"] = Tracked.wrap(value.detach(), name, ids)
        msg["value"].param_names = frozenset([name])

    @property
    def size(self) -> int:
        return self._next


def probe(
    model, args: tuple, kwargs: dict, max_plate_nesting: int, replay=None, guarded: bool = False
):
    """Trace ``model`` under parallel enumeration (the E-step's layout: enumerated dims left of
    ``max_plate_nesting`` plate dims) with tracked params; validation is off, since the probe
    only reads which param elements reach each distribution argument. ``guarded``: the caller
    runs it with validation off, under ``no_grad`` and ``poutine.block`` already (the E-step's
    structure check, :meth:`~pyro_emvae.estep.ExactEStep._shared_probe`), which are then not
    entered twice (a second block on the stack would see every message again)."""
    global _OPAQUE, _LINEAR, _CONSUMED
    model = poutine.enum(model, first_available_dim=-1 - max_plate_nesting)
    if replay is not None:  # the E-step's minibatch
        model = poutine.replay(model, trace=replay)
    space = IdSpace()
    _OPAQUE, _LINEAR, _CONSUMED = space.opaque, [], set()
    try:
        with contextlib.ExitStack() as scope:
            if not guarded:
                scope.enter_context(pyro.validation_enabled(False))
                scope.enter_context(torch.no_grad())
                scope.enter_context(poutine.block())
            with space:
                tr = poutine.trace(model, graph_type="flat").get_trace(*args, **kwargs)
        stored = _stored_linear(tr)
        for t in _LINEAR:  # computed and dropped (or only inspected): an opaque use
            if id(t) not in _CONSUMED and id(t) not in stored:
                space.opaque.update(t.param_names)
    finally:
        _OPAQUE = _LINEAR = _CONSUMED = None
    return tr, space
