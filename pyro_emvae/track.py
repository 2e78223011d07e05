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

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

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
    "isfinite", "_is_all_true", "__and__", "__or__", "shape", "dtype", "device", "__repr__",
    "__format__", "is_floating_point", "requires_grad", "__hash__", "data_ptr", "stride",
    "storage_offset", "is_contiguous", "__get__",
    # factorizations torch's MultivariateNormal runs on a covariance or precision argument it
    # also stores as given (the rule reads the stored one; a model that passes only the
    # factor gets no closed form: the param then reaches no handled argument)
    "linalg_cholesky", "cholesky", "linalg_cholesky_ex", "linalg_solve_triangular",
    "solve_triangular", "triangular_solve",
}  # fmt: skip
_OPAQUE: set | None = None  # while probing: params used by an op no rule can see through


class Tracked(torch.Tensor):
    """A tensor that remembers, for each element, which element of which param it is.

    Attributes:
        param: the name of the (first) param it comes from.
        ids: long tensor, the same shape: a global element id (each probed param owns the range
            ``offset .. offset + numel``, see :class:`IdSpace`), so a tensor concatenated from
            several params still knows each element's source.
        form: ``"value"`` (the param's constrained value), ``"log"`` (its log) or
            ``"normalized"`` (divided by its sum over the last dim).
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

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(func, "__self__", None) is not None:
            name = getattr(func.__self__, "__name__", name)
        plain_args, plain_kwargs = _strip(args), _strip(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*plain_args, **plain_kwargs)
        sources = [a for a in _flat(args) if isinstance(a, Tracked)]
        if not sources:
            return result
        src = sources[0]
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
        with torch._C.DisableTorchFunctionSubclass():
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
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flat(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flat(o)]
    return [obj]


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


def _strip(obj):
    def f(o):
        if isinstance(o, (Tracked, _RowSum)):
            with torch._C.DisableTorchFunctionSubclass():
                return o.as_subclass(torch.Tensor)
        return o

    return _map(obj, f)


def _swap(obj):
    return _map(obj, lambda o: o.ids if isinstance(o, Tracked) else o)


def _same(sources: list, src: Tracked) -> bool:
    return all(s.form == src.form for s in sources)


def _plain(result):
    def f(o):
        if isinstance(o, (Tracked, _RowSum)):
            with torch._C.DisableTorchFunctionSubclass():
                return o.as_subclass(torch.Tensor)
        return o

    return _map(result, f)


def _rewrap(result, src: Tracked, ids, form: str):
    if isinstance(result, (tuple, list)):
        return type(result)(_rewrap(r, src, i, form) for r, i in zip(result, ids))
    if not isinstance(result, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return _plain(result)
    with torch._C.DisableTorchFunctionSubclass():
        base = result.as_subclass(torch.Tensor)
    out = Tracked.wrap(base, src.param, ids, form)
    out.param_names = src.param_names
    return out


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
        ids = self.offsets[name] + torch.arange(value.numel(), device=value.device).reshape(
            value.shape
        )
        msg["value"] = Tracked.wrap(value.detach(), name, ids)
        msg["value"].param_names = frozenset([name])

    @property
    def size(self) -> int:
        return self._next


def probe(model, args: tuple, kwargs: dict, max_plate_nesting: int, replay=None):
    """Trace ``model`` under parallel enumeration (the E-step's layout: enumerated dims left of
    ``max_plate_nesting`` plate dims) with tracked params; validation is off, since the probe
    only reads which param elements reach each distribution argument."""
    global _OPAQUE
    model = poutine.enum(model, first_available_dim=-1 - max_plate_nesting)
    if replay is not None:  # the E-step's minibatch
        model = poutine.replay(model, trace=replay)
    space = IdSpace()
    _OPAQUE = space.opaque
    try:
        with pyro.validation_enabled(False), torch.no_grad(), poutine.block(), space:
            tr = poutine.trace(model, graph_type="flat").get_trace(*args, **kwargs)
    finally:
        _OPAQUE = None
    return tr, space
