"""Additive expected sufficient statistics: one vector per kind of statistic over the plan's
global id space, filled by ``index_add_`` at the ids of the param element each position uses.

A rule (:mod:`pyro_emvae.rules`) adds into a :class:`Stats`; the M-step reads it. Statistics are
additive — ``summarize(A) + summarize(B) = summarize(A ∪ B)`` — which is what makes chunked,
streamed, minibatch (online EM blends them) and data-parallel EM (summed over the ranks by
:mod:`pyro_emvae.distributed`) exact. The shape-only work of an ``add`` (which ids, how the
factors broadcast, the einsum that contracts them) depends on the plan, not on the params: it is
made once per plan and kept in a bounded memo (:class:`_AddRecipe`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_emvae import _compat

__all__ = ["Stats"]


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

    # structure-only work of ``add`` kept between calls (see :meth:`add`): EMOptim gives each
    # plan one, so that an iteration does not redo it; None: no memo (every call plans anew)
    memo: dict | None = field(default=None, repr=False, compare=False)
    # nothing writes these sums after the maximizers read them (EMOptim's own statistics of
    # one iteration, dropped after its update): a maximizer's deferred cost may then keep a
    # view of them instead of a copy. False: they may be updated in place later (online EM's
    # running average, a caller's statistics)
    transient: bool = field(default=False, repr=False, compare=False)
    # kind -> (a constant vector, the copy of it in sums, the copy's version): see constant_of
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    def add(self, kind: str, ids: torch.Tensor, *factors: torch.Tensor) -> None:
        """``sums[kind][ids] += prod(factors)``, summed over positions sharing an id.

        The dims along which ``ids`` is broadcast (stride 0: every position there uses the same
        param entry, e.g. the data plate for a component's mean) are contracted by ``einsum``
        before the scatter, so the full product is never materialized (a (K, N, D, D)
        covariance statistic is computed as ``einsum('kn,kni,knj->kij')``). Only the dims
        some factor varies along get a subscript, in einsum's integer (sublist) form: a site
        under any number of enumerated dims (30 global latents) is fine.

        How the product is contracted and where it lands depend only on ``kind``, the ``ids``
        tensor and the factors' shapes, dtypes and devices; with a ``memo`` (a dict that
        outlives this ``Stats``: EMOptim keeps one per plan, whose trace holds the ids) that
        recipe is made once and reused, keyed on the ids' values (the tensor they are a view
        of, held by the memo so that its ``id`` cannot be reused, its in-place version, and the
        view's geometry) and the factors' shapes. The sums are the same either way.
        """
        memo = self.memo if _FAST_ADD else None
        if memo is not None:
            # one lookup, keyed on the ids' values (the tensor they are a view of, held by the
            # memo so that its id cannot be reused, its in-place version, the view's geometry)
            # and the factors' shapes, dtypes and devices; the entry holds the recipe and the
            # dtype the factors are promoted to (the size in the key: it and the kind fix the
            # statistic's length)
            base = _compat.view_base(ids)
            where = (
                id(base),
                _compat.tensor_version(base),
                tuple(ids.shape),
                ids.stride(),
                ids.storage_offset(),
            )
            key = (kind, self.size, where, tuple([(f.shape, f.dtype, f.device) for f in factors]))
            hit = memo.get(key)
            if hit is not None and hit[0] is base:
                recipe, dtype = hit[1], hit[2]
                if dtype is not None:
                    factors = tuple(f if f.dtype == dtype else f.to(dtype) for f in factors)
                self._scatter(kind, recipe, factors)
                return
        # integer observations (Long counts) enter the sums in the weights' floating dtype, and
        # mixed floating dtypes (float32 data, float64 params and weights) in the wider one,
        # as Pyro's log-probs promote them (einsum and bmm refuse mixed dtypes)
        dtype = factors[0].dtype if factors else None
        promote = None
        if any(f.dtype != dtype for f in factors):
            floats = [f.dtype for f in factors if f.is_floating_point()]
            if floats:
                promote = functools.reduce(torch.promote_types, floats)
                factors = tuple(f if f.dtype == promote else f.to(promote) for f in factors)
        recipe = _AddRecipe(self.length(kind), ids, factors)
        if memo is not None:
            _remember(memo, key, (base, recipe, promote))
        self._scatter(kind, recipe, factors)

    def _scatter(self, kind: str, recipe: _AddRecipe, factors: tuple) -> None:
        """``sums[kind][recipe.ids] += `` the contraction of ``factors`` (see :meth:`add`)."""
        # scalar factors only (a row mark's 1): the scattered values are the same at every
        # call with the same scalars, unmodified; kept on the recipe (a scalar, so that no
        # posterior outlives its iteration)
        const = recipe.constant
        if (
            const is not None
            and len(const[0]) == len(factors)
            and all(a is b for a, b in zip(const[0], factors))
            and const[1] == tuple(_compat.tensor_version(f) for f in factors)
        ):
            values = const[2]
            if kind not in self.sums:
                # (the first add of the kind: the vector it makes is the same each time too;
                # a copy of it, as the sums are written in place by what reads them)
                if len(const) == 3:
                    made = torch.zeros(recipe.length, dtype=values.dtype, device=values.device)
                    made.index_add_(0, recipe.ids, values)
                    # (with a dict for what readers work out from it: see constant_of)
                    recipe.constant = const = (*const, made, {})
                copy = self.sums[kind] = const[3].clone()
                self.copies[kind] = (const[3], const[4], copy, _compat.tensor_version(copy))
                seen = self.touched.get(kind)
                self.touched[kind] = recipe.seen if seen is None else seen | recipe.seen
                return
        else:
            if recipe.sum_dims == [] and (recipe.expands or factors[0].dim() != 1):
                # (one factor, nothing to sum: it is flattened, or viewed to be expanded,
                # below; the view to its non-singleton dims would only be viewed again)
                values = factors[0]
            else:
                values = recipe.contract(factors)
            if recipe.repeats != 1:
                values = values * recipe.repeats
            if recipe.expands:
                values = values.reshape(recipe.values_shape).expand(recipe.kept_shape)
            if values.dim() != 1:  # (a vector already: no view op)
                values = values.reshape(-1)
            if recipe.scalars:
                versions = tuple(_compat.tensor_version(f) for f in factors)
                recipe.constant = (factors, versions, values)
        vec = self.sums.get(kind)
        if vec is None:
            # (out of place from a shared zero vector: one op where zeros + index_add_ are two,
            # the same kernel on a new copy of zeros)
            zero = _zeros(recipe.length, values.dtype, values.device)
            self.sums[kind] = torch.index_add(zero, 0, recipe.ids, values)
        else:
            vec.index_add_(0, recipe.ids, values)
        # (the recipe's marks themselves until a second add meets them: never written in place)
        seen = self.touched.get(kind)
        self.touched[kind] = recipe.seen if seen is None else seen | recipe.seen

    def constant_of(self, kind: str) -> tuple | None:
        """``(vector, notes)``: the vector ``sums[kind]`` is an unmodified copy of, where it is
        one (a statistic of scalar factors only, a row mark, added once; never written, kept
        by the add's recipe while its scalars are unchanged, so that what is worked out from it
        holds for the sums too), and a dict kept with it for what readers work out from it.
        None where the sums were added to, written in place, or replaced."""
        hit = self.copies.get(kind)
        if hit is None:
            return None
        const, notes, copy, version = hit
        if self.sums.get(kind) is not copy or _compat.tensor_version(copy) != version:
            return None
        return const, notes

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


_MEMO_SIZE = 512  # entries a memo holds before it starts over (ids made anew at every call)

# Stats.add's recipes kept in the memo (one lookup for ids and factor shapes met before);
# False: every recipe made anew (the tests compare the two)
_FAST_ADD = True


_ZEROS: dict = {}  # (length, dtype, device) -> zeros: only ever read (out-of-place ops' input)


def _zeros(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A vector of zeros shared by every caller: the input of an out-of-place op only."""
    key = (length, dtype, device)
    zero = _ZEROS.get(key)
    if zero is None:
        if len(_ZEROS) >= 64:  # (lengths of id spaces long gone: start over)
            _ZEROS.clear()
        zero = _ZEROS[key] = torch.zeros(length, dtype=dtype, device=device)
    return zero


def _remember(memo: dict, key, entry) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = entry


def _memoized(stats: Stats, objs: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per plan for the tensors ``objs`` (a rule's structure-only
    work: ids gathered at an enumerated value), held in ``stats.memo`` (keyed on the objects
    themselves, which the memo holds); ``make()`` each time when ``stats`` has no memo."""
    memo = stats.memo
    if memo is None:
        return make()
    key = ("rule", make.__code__, *map(id, objs))
    hit = memo.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], objs, strict=True)):
        return hit[1]
    value = make()
    _remember(memo, key, (objs, value))
    return value


class _AddRecipe:
    """How :meth:`Stats.add` contracts factors of given shapes and scatters them at ``ids``:
    the einsum subscripts of each factor (its non-singleton dims), the output's, the count a
    pooled dim no factor carries repeats each term, the shapes the result is read in, the
    flat ids it lands at, and the ids it marks as touched (a statistic of ``length``)."""

    __slots__ = (
        "constant",
        "equation",
        "expands",
        "ids",
        "kept_shape",
        "length",
        "matmul",
        "out",
        "repeats",
        "reshape",
        "scalars",
        "seen",
        "shapes",
        "subs",
        "sum_dims",
        "values_shape",
    )

    def __init__(self, length: int, ids: torch.Tensor, factors: tuple) -> None:
        shape = _compat.broadcast_shapes(ids.shape, *(f.shape for f in factors))
        n = len(shape)
        # the strides ids.expand(shape) would have (a new or a size-1 dim broadcast: 0), read
        # without the view: a dim is pooled where every position along it uses one id
        lead = n - ids.dim()
        istride = ids.stride()
        strides = [
            0 if d < lead or (ids.shape[d - lead] == 1 and shape[d] > 1) else istride[d - lead]
            for d in range(n)
        ]
        pooled = [d for d in range(n) if strides[d] == 0 and shape[d] > 1]
        kept = [d for d in range(n) if d not in pooled]
        sub: dict[int, int] = {}  # tensor dim -> einsum subscript
        self.shapes, self.subs = [], []
        fshapes = []
        for f in factors:
            fshape = (1,) * (n - f.dim()) + tuple(f.shape)
            fshapes.append(fshape)
            dims = [d for d in range(n) if fshape[d] > 1]
            for d in dims:
                sub.setdefault(d, len(sub))
            self.shapes.append([fshape[d] for d in dims])
            self.subs.append([sub[d] for d in dims])
        out_dims = [d for d in kept if d in sub]
        self.out = [sub[d] for d in out_dims]
        # (whether each factor is viewed in another shape: the recipe is kept per factor shape)
        self.reshape = [list(f.shape) != fshape for f, fshape in zip(factors, self.shapes)]
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        self.equation = None
        if len(factors) <= 2 and len(sub) <= len(letters):
            self.equation = (
                ",".join("".join(letters[i] for i in fsub) for fsub in self.subs)
                + "->"
                + "".join(letters[i] for i in self.out)
            )
        # a matrix product ("ab,bc->ac", every dim > 1: the weighted sums of a value's rows):
        # einsum reduces it to a bmm of the two as one batch, which is called directly
        self.matmul = self.equation == "ab,bc->ac"
        # one floating factor: the einsum is a sum over the dims the output drops (the
        # output keeps the factor's dim order), or the factor itself; None: einsum
        self.sum_dims = None
        if len(factors) == 1 and factors[0].is_floating_point():
            self.sum_dims = [i for i, s in enumerate(self.subs[0]) if s not in self.out]
        # a pooled dim no factor carries repeats the same value shape[d] times
        self.repeats = math.prod(shape[d] for d in pooled if d not in sub)
        self.values_shape = [shape[d] if d in out_dims else 1 for d in kept]
        self.kept_shape = [shape[d] for d in kept]
        self.expands = self.values_shape != self.kept_shape
        device = factors[0].device if factors else ids.device
        # the ids at the first position of every pooled dim, over the kept dims: one view of
        # the ids (what ids.expand(shape)[index 0 of each pooled dim] views, without the
        # expand and the slices), flattened (a copy where that view is not one run)
        self.ids = (
            ids.as_strided(self.kept_shape, [strides[d] for d in kept], ids.storage_offset())
            .to(device)
            .reshape(-1)
        )
        self.length = length
        # (one op where seen[ids] = True is three: the same marks)
        self.seen = torch.zeros(length, dtype=torch.bool, device=device).index_fill_(
            0, self.ids, True
        )
        # (scalar factors, their versions, the values they scatter): see Stats.add
        self.constant: tuple | None = None
        self.scalars = bool(factors) and all(f.dim() == 0 for f in factors)

    def contract(self, factors: tuple) -> torch.Tensor:
        """The einsum of ``factors`` over the pooled dims (one or two factors: the equation
        straight to ATen, as ``torch.einsum`` passes it without a contraction path)."""
        if self.sum_dims is not None:
            # (what einsum does for one operand, without parsing the equation: the same sum;
            # no view op where the factor has that shape already)
            op = factors[0]
            if self.reshape[0]:
                op = op.reshape(self.shapes[0])
            return op.sum(self.sum_dims) if self.sum_dims else op
        ops = [
            f.reshape(fshape) if again else f
            for f, fshape, again in zip(factors, self.shapes, self.reshape, strict=True)
        ]
        a, b = ops if self.matmul else (None, None)
        if self.matmul and a.device.type == "cpu" == b.device.type and a.dtype == b.dtype:
            # (on the CPU: the same bits as einsum, tested, with 4 ops where it takes 12)
            return torch.bmm(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
        if self.equation is not None:
            return _compat.einsum_equation(self.equation, ops)
        sublists: list = []
        for op, fsub in zip(ops, self.subs, strict=True):
            sublists += [op, fsub]
        return torch.einsum(*sublists, self.out)
