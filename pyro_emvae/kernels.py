"""Fused kernels for Gaussian sites under the outer-product broadcast of a mixture.

Under parallel enumeration a mixture's observed site has parameters that vary only along the
enumerated dims (``locs[z]``: ``(K, 1, D)``) and a value that varies only along the plate dims
(``x``: ``(N, D)``). The generic ``log_prob`` then materializes the broadcast ``(K, N, D)``
(several times: the residual, the triangular solve, its square), and so do the M-step's
residual statistics. The kernels here compute the same numbers from the ``M`` distinct
parameter rows and the ``N`` distinct value rows, in row chunks of :data:`CHUNK`, so the
temporaries stay ``(CHUNK, M * D)`` whatever ``N`` is:

* :func:`fused_log_prob`: all ``M x N`` log-densities of a ``MultivariateNormal`` by one GEMM,
  :math:`Y = (X - c) P - (\\mu - c) P` with the stacked precision Cholesky factors
  :math:`P_m = L_m^{-\\top}` (``(D, M D)``), :math:`\\log p = -\\tfrac12\\lVert Y_m\\rVert^2 -
  \\log|L_m| - \\tfrac D2 \\log 2\\pi` (``c`` the mean of the locs, so that the two products are
  of the data's spread, not of its distance to the origin); and of a diagonal ``Normal`` under
  ``Independent`` by the residual per chunk.
* :func:`outer_scatter`: :math:`W_m = \\sum_n w_{mn}` and
  :math:`S_m = \\sum_n w_{mn} (x_n - \\mu_m)(x_n - \\mu_m)^\\top` (or its diagonal, elementwise
  along dims both vary along) from GEMMs over row chunks: with :math:`y_n = x_n - c` (``c`` the
  data's mean row) and :math:`\\nu_m = \\mu_m - c`, :math:`S_m = \\sum_n w_{mn} y_n y_n^\\top
  - s_m \\nu_m^\\top - \\nu_m s_m^\\top + W_m \\nu_m \\nu_m^\\top`, :math:`s_m = \\sum_n w_{mn}
  y_n`; all ``M`` second moments at once as :math:`Y^\\top (W^\\top \\otimes Y)`, the
  ``(c, M D)`` product in one GEMM (the shift keeps the uncentred sums of the data's spread).

Each returns None when the site does not have that structure (params and value varying along a
common batch dim, other families, wrappers it does not know): the caller then runs the generic
path. The structure is read from shapes and strides (a dim of size > 1 and nonzero stride
varies), never from names.

Example::

    >>> import torch, pyro.distributions as dist
    >>> locs, x = torch.randn(3, 1, 2), torch.randn(5, 2)
    >>> fn = dist.MultivariateNormal(locs, scale_tril=torch.eye(2).expand(3, 1, 2, 2))
    >>> torch.allclose(fused_log_prob(fn, x), fn.log_prob(x))
    True
"""

from __future__ import annotations

import functools
import math
import weakref

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from torch.distributions.utils import probs_to_logits

from pyro_emvae import _compat

__all__ = [
    "CHUNK",
    "categorical_log_prob",
    "diag_normal_rows",
    "fused_log_prob",
    "fused_log_prob_shape",
    "outer_scatter",
]

CHUNK = 2048  # rows per chunk: (CHUNK, M * D) temporaries stay in cache
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_MVN = (torch.distributions.MultivariateNormal,)
_NORMAL = (torch.distributions.Normal,)


def _varies(t: torch.Tensor, n: int) -> list[bool]:
    """Per dim of ``t``'s first ``n`` dims (left-padded to ``n``): size > 1 and stride != 0."""
    pad = n - t.dim()
    return [False] * pad + [s > 1 and st != 0 for s, st in zip(t.shape, t.stride())]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape((1,) * (n - t.dim()) + t.shape) if t.dim() < n else t


def _take(t: torch.Tensor, dims: list[int], batch, tail=()) -> torch.Tensor:
    """``t`` (batch dims broadcastable to ``batch``, then ``len(tail)`` dims broadcastable to
    ``tail``) reduced to the batch dims ``dims``, in that order: shape
    ``[batch[d] for d in dims] + tail``. Elsewhere it takes entry 0 (it does not vary there)."""
    pad, index, size, order, direct, src, out = _take_recipe(
        tuple(t.shape), tuple(dims), tuple(batch), tuple(tail)
    )
    if direct:  # (only size-1 dims to drop, nothing to expand or move: one view, or none)
        return t if t.shape == size else t.reshape(size)
    if not t.requires_grad and t.layout == torch.strided:
        # the same view in one op: entry 0 of the dims dropped (no offset), stride 0 where it
        # is expanded, the kept dims' strides in their new order
        n_pad = len(pad) - t.dim() if pad is not None else 0
        shape, stride = t.shape, t.stride()
        strides = [0 if j < n_pad or shape[j - n_pad] == 1 else stride[j - n_pad] for j in src]
        return t.as_strided(out, strides, t.storage_offset())
    if pad is not None:  # (autograd recording: the views it can differentiate)
        t = t.reshape(pad)
    return t[index].expand(size).permute(order)


@functools.lru_cache(maxsize=256)
def _take_recipe(shape: tuple, dims: tuple, batch: tuple, tail: tuple) -> tuple:
    """The view ops of :func:`_take` for a tensor of ``shape``: the padded shape (None if none
    is needed), the index, the expanded size, the permutation, and whether all of them
    amount to one reshape to that size (``direct``: ``shape`` is already ``batch`` on
    ``dims``, in order, 1 on the other batch dims and ``tail`` after them; the index then
    drops size-1 dims only, the expand and the permutation do nothing). They depend on shapes
    only, and the same few shapes recur at every EM iteration: made once per shape."""
    n = len(batch)
    full = n + len(tail)
    pad = (1,) * (full - len(shape)) + shape if len(shape) < full else None
    index = tuple(slice(None) if d in dims else 0 for d in range(n))
    srt = sorted(dims)
    size = tuple([batch[d] for d in srt] + list(tail))
    order = tuple([srt.index(d) for d in dims] + [len(dims) + i for i in range(len(tail))])
    padded = pad if pad is not None else shape
    direct = list(dims) == srt and padded == tuple(
        [batch[d] if d in dims else 1 for d in range(n)] + list(tail)
    )
    # (the result's dims as positions in the padded shape, and its shape: for as_strided)
    src = tuple(list(dims) + [n + i for i in range(len(tail))])
    out = tuple(size[i] for i in order)
    return pad, index, torch.Size(size), order, direct, src, out


def _flat(t: torch.Tensor, dims: list[int], batch, tail=()) -> torch.Tensor:
    """:func:`_take`, with ``dims`` flattened into one leading dim."""
    out = _take(t, dims, batch, tail)
    if out.dim() == len(tail) + 1 and out.shape[1:] == tuple(tail):
        return out  # (already flat: no view op)
    return out.reshape((-1,) + tuple(tail))


def _centre(x: torch.Tensor) -> torch.Tensor:
    """The mean row of ``x`` ``(N, E)`` (zeros when ``N = 0``): the common shift of the
    uncentred moments, so that they are of the data's spread, not of its distance to 0."""
    return x.mean(0) if x.shape[0] else x.new_zeros(x.shape[1:])


# one slot: the last data seen, centred at their mean row with a column of ones appended (the
# E-step folds the locs' shift into its GEMM with it; the M-step's scatter reads the centred
# rows): the data do not change between EM iterations, so neither does this copy. Keyed on the
# value tensor itself (a weak reference: the slot empties when the data are freed), its
# in-place version counter, and the layout of the rows read from it.
_SLOT: list = [None]


def _centred_rows(value: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([x - c, 1], c)`` with ``c`` the mean row of ``x`` ``(N, D)`` (``x`` read from
    ``value``): ``(N, D + 1)`` and ``(D,)``, computed once per data (see ``_SLOT``)."""
    key = (
        _compat.tensor_version(value),
        x.data_ptr(),
        tuple(x.shape),
        tuple(x.stride()),
        x.dtype,
        x.device,
    )
    hit = _SLOT[0]
    if hit is not None and hit[0]() is value and hit[1] == key:
        return hit[2], hit[3]
    centre = _centre(x)
    xa = torch.ones(x.shape[0], x.shape[1] + 1, dtype=x.dtype, device=x.device)
    torch.sub(x, centre, out=xa[:, :-1])
    try:
        ref = weakref.ref(value, lambda _: _SLOT.__setitem__(0, None))
    except TypeError:  # (not weak-referenceable: no cache)
        return xa, centre
    _SLOT[0] = (ref, key, xa, centre)
    return xa, centre


def forget_data() -> None:
    """Drop what the kernels keep of data values between calls (the centred rows of
    ``_SLOT`` and ``_STEADY_ROWS``, the support checks of ``_CHECKED``). They are keyed on the
    value tensor and its in-place version, which a write through another alias (a numpy
    array sharing the memory, ``.data``) does not move: kept for the iterations of one fit
    only (``ExactEStep.posterior``), so that data changed between fits or between direct
    calls are read again."""
    _SLOT[0] = None
    _STEADY_ROWS[0] = None
    _CHECKED.clear()


def _row_spread(value: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`_centred_rows` and the largest ``|x - c|`` entry (0 for no rows), kept with them."""
    xa, centre = _centred_rows(value, x)
    hit = _SLOT[0]
    if hit is not None and hit[2] is xa and len(hit) == 5:
        return xa, centre, hit[4]
    spread = float(xa[:, :-1].abs().amax()) if xa.numel() > xa.shape[0] else 0.0
    if hit is not None and hit[2] is xa:
        _SLOT[0] = (*hit[:4], spread)
    return xa, centre, spread


# how much the GEMM form may amplify rounding (see _mvn_conditioned) before the kernel leaves
# the site to Pyro's own log_prob: at 1e8 its error in a Mahalanobis distance z is below
# 2.2e-8 in float64 by the bound, and measured below 1e-11 relative in the log-densities
# (tests/test_fast_paths.py); a component must be ~1e7 times thinner than the data's spread
# (a covariance collapsing onto a line) to reach it, so ordinary fits stay fused
_AMPLIFICATION_LIMIT = 1e8


def _mvn_conditioned(prec: torch.Tensor, spread: float, offsets: torch.Tensor) -> bool:
    """Whether the GEMM form ``(x - c) P - (mu - c) P`` of the Mahalanobis rows is as exact as
    Pyro's ``(x - mu)`` then a triangular solve. Each of its two products is as large as
    ``|x - c| |P|`` and ``|mu - c| |P|``, and they cancel to ``|x - mu| |P|``: the rounding
    of the products, relative to the distance, is amplified by
    ``D (max|x - c| + max|mu - c|) max|P|`` (``P = L^{-T}``; ``offsets`` ``mu - c``). A
    covariance collapsing onto a line (condition number ~1e24) far from the origin makes it
    1e13 and log-densities up to 1e-5 off (tests/test_fast_paths.py); beyond the limit the site goes
    to the generic path, which computes the difference first."""
    # (max |t| as one op, linalg.vector_norm(t, inf): the same number as t.abs().amax(), a
    # NaN included; read by tolist(), which copies the number out without an aten op)
    top = torch.linalg.vector_norm(offsets, math.inf)
    scale = torch.linalg.vector_norm(prec, math.inf)
    if top.dtype == scale.dtype == torch.float64:
        # (float64: the tensor arithmetic is Python's, IEEE double add then multiply)
        amp = (top.tolist() + spread) * scale.tolist()
    else:  # (in the tensors' own precision, as before)
        amp = top.add_(spread).mul_(scale).tolist()
    # (NaN params: fused as before, the NaN propagates and the E-step warns on it)
    return not amp * prec.shape[-1] > _AMPLIFICATION_LIMIT


@functools.lru_cache(maxsize=8)
def _cancel_ratio(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** -0.25


_ZEROS: dict = {}  # (shape, dtype, device) -> zeros: only ever read (out-of-place ops' input)


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of ``shape`` shared by every caller: the input of an out-of-place op only."""
    key = (shape, dtype, device)
    zero = _ZEROS.get(key)
    if zero is None:
        if len(_ZEROS) >= 64:
            _ZEROS.clear()
        zero = _ZEROS[key] = torch.zeros(shape, dtype=dtype, device=device)
    return zero


def _cancelled(raw: torch.Tensor, centred: torch.Tensor) -> list[int]:
    """Rows ``m`` of the ``(M, E)`` diagonals where the uncentred sums ``raw`` exceed the
    centred result by more than ``eps ** -1/4`` (rounding then costs more than a quarter of
    the digits: ~4 of float64's 16; e.g. a collapsing component): summed again about their
    own loc by the caller."""
    bad = raw > _cancel_ratio(raw.dtype) * centred.abs()
    # (tolist(): the bool without an aten op)
    return bad.any(-1).nonzero().flatten().tolist() if bad.any().tolist() else []


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


# ------------------------------------------------------------------------------ log-likelihood
def categorical_log_prob(fn, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value)`` of a ``Categorical`` whose params are broadcast along some batch
    dims (mixture weights ``(K,)`` expanded along a plate: ``(N, K)`` with stride 0), without
    the ``(K, N, K)`` broadcast the generic ``log_prob`` gathers from: the same elementwise
    ops (``log`` of the clamped probs, then ``gather``) on the compact params, expanded to the
    result's shape. None for other distributions.

    Example::

        >>> fn = dist.Categorical(torch.tensor([0.2, 0.8])).expand([5])
        >>> z = torch.arange(2).reshape(2, 1)  # an enumerated value
        >>> torch.equal(categorical_log_prob(fn, z), fn.log_prob(z))
        True
    """
    if type(fn) not in (dist.Categorical, torch.distributions.Categorical):
        return None
    if _compat.validate_args_flag(fn):
        fn._validate_sample(value)
    return _categorical(fn, value)


def _categorical(fn, value: torch.Tensor, enumerated: bool | None = None) -> torch.Tensor:
    """:func:`categorical_log_prob` of a ``Categorical`` whose sample was validated (by
    :func:`fused_log_prob`, which checks every family's value once, first). ``enumerated``:
    :func:`_enumerated` if the caller knows it."""
    own = fn.__dict__
    param = own["logits"] if "logits" in own else own["probs"]
    if enumerated is None:
        enumerated = _enumerated(fn, value)
    k = value.dim()
    if "logits" not in own and enumerated and param.dim() <= k:
        pad = _weights_view(param.shape, param.stride(), k)
        if pad is not None:
            # weights broadcast along every batch dim (a mixture's): entry k of their log
            # in the value's layout, read by one view of the (K,) weights (the same numbers
            # as the gather, or Pyro's own log_prob, reads), expanded
            size, stride = pad
            compact = param.as_strided(size, (param.stride(-1),) + stride, param.storage_offset())
            lp = probs_to_logits(compact)
            shape = _compat.broadcast_shapes(value.shape, fn.batch_shape)
            return lp if lp.shape == shape else lp.expand(shape)
    index = _compact_index(param.shape, param.stride())
    compact = param[index] if index is not None else param
    logits = compact if "logits" in own else probs_to_logits(compact)
    if "logits" not in own and enumerated and logits.dim() <= value.dim():
        # value[k] = k (Pyro's enumeration): entry k of the log-probs, as Pyro's own
        # Categorical.log_prob reads it (views of them, in the value's layout, not a gather:
        # the same numbers). (Not for a logits param: a view of the user's tensor then, which
        # the E-step may write the posterior over; here a buffer of its own, probs' log.)
        k = value.dim()  # (the enumerated dim lies left of every batch dim of the params)
        logits = logits.reshape((1,) * (1 + k - logits.dim()) + logits.shape)
        lp = logits.transpose(-1 - k, -1).squeeze(-1)
        shape = _compat.broadcast_shapes(value.shape, fn.batch_shape)
        return lp if lp.shape == shape else lp.expand(shape)
    idx = value.long().unsqueeze(-1)
    idx, logits = torch.broadcast_tensors(idx, logits)
    lp = logits.gather(-1, idx[..., :1]).squeeze(-1)
    return lp.expand(_compat.broadcast_shapes(value.shape, fn.batch_shape))


@functools.lru_cache(maxsize=256)
def _weights_view(shape: tuple, stride: tuple, k: int) -> tuple | None:
    """For a Categorical's param broadcast along all its batch dims (stride 0 or size 1): the
    size and the strides after the first of its ``(K, 1, ..., 1)`` view (``k`` dims, the
    enumerated value's); None for a param that varies along a batch dim."""
    if any(st != 0 and n > 1 for st, n in zip(stride[:-1], shape[:-1])):
        return None
    return (shape[-1],) + (1,) * (k - 1), (0,) * (k - 1)


@functools.lru_cache(maxsize=256)
def _compact_index(shape: tuple, stride: tuple) -> tuple | None:
    """The index that takes entry 0 along every broadcast (stride-0) batch dim of a
    Categorical's param, None where there is none (shapes only: cached)."""
    index = tuple(
        slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(stride[:-1], shape[:-1])
    )
    return index if any(i != slice(None) for i in index) else None


def _enumerated(fn, value: torch.Tensor) -> bool:
    """Whether ``value`` is Pyro's enumeration of ``fn``'s support, ``arange(K)`` along its
    first dim, as ``pyro.distributions.Categorical.enumerate_support`` marks it (the mark Pyro's
    own ``log_prob`` trusts) and untouched since (in-place version 0): within the support
    whatever the params, so that its check can be skipped."""
    own = fn.__dict__
    param = own["logits"] if "logits" in own else own["probs"]
    return (
        getattr(value, "_pyro_categorical_support", None) == id(fn)
        and _compat.tensor_version(value) == 0
        and not value.is_floating_point()
        and value.dim() >= 1
        and value.shape[0] == param.shape[-1] == value.numel()
    )


# (id(value), type(fn), shapes) -> (weak reference to value, its version): data found in the
# support of a Gaussian (real numbers: not NaN), which EM reads unchanged every iteration
_CHECKED: dict = {}
_CATEGORICAL = (dist.Categorical, torch.distributions.Categorical)
_MVN_TYPES = (dist.MultivariateNormal, torch.distributions.MultivariateNormal)
_REAL_SUPPORT = (
    dist.MultivariateNormal,
    torch.distributions.MultivariateNormal,
    dist.Normal,
    torch.distributions.Normal,
)


def _validate_sample(fn, value: torch.Tensor) -> None:
    """``fn._validate_sample(value)``, skipped for a Gaussian (support: the reals, whatever
    the params) that already accepted this very tensor, unmodified, with the same shapes."""
    base = fn
    while isinstance(
        base, (MaskedDistribution, dist.ExpandedDistribution, torch.distributions.Independent)
    ):
        base = base.base_dist
    if type(fn) in _CATEGORICAL and _enumerated(fn, value):
        return  # (Pyro's enumeration of this very distribution's support)
    if type(base) not in _REAL_SUPPORT:
        fn._validate_sample(value)
        return
    key = (id(value), type(fn), fn.batch_shape, fn.event_shape, value.shape)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0]() is value and hit[1] == _compat.tensor_version(value):
        return
    fn._validate_sample(value)  # (raises on a value outside the support: nothing is kept)
    try:
        ref = weakref.ref(value, lambda _, k=key: _CHECKED.pop(k, None))
    except TypeError:
        return
    _CHECKED[key] = (ref, _compat.tensor_version(value))


def fused_log_prob(fn, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value)`` by the fused kernels, or None where they do not apply.

    Handles ``MultivariateNormal``, ``Independent(Normal)`` (a diagonal Gaussian) and
    ``Categorical`` (:func:`categorical_log_prob`: a mixture's weights), also under
    ``MaskedDistribution`` (``fn.mask(m)``), ``ExpandedDistribution`` and, for the
    multivariate normal, ``Independent``; batch dims of the params anywhere, as long as no
    batch dim is one that both the params and the value vary along.
    """
    kind = type(fn)
    if kind in _CATEGORICAL:  # (the common families first: no wrappers to look through)
        enumerated = _enumerated(fn, value)
        if not enumerated and _compat.validate_args_flag(fn):
            fn._validate_sample(value)  # (Pyro's enumeration is within the support)
        return _categorical(fn, value, enumerated)
    if _compat.validate_args_flag(fn):  # what the generic log_prob checks first (support, shapes)
        _validate_sample(fn, value)
    if kind in _MVN_TYPES:
        return _mvn(fn, value)
    if isinstance(fn, MaskedDistribution):
        if _compat.mask_of(fn) is False:
            return None
        lp = fused_log_prob(fn.base_dist, value)
        if lp is None or _compat.mask_of(fn) is True:
            return lp
        return scale_and_mask(lp, mask=_compat.mask_of(fn))
    if isinstance(fn, dist.ExpandedDistribution):
        lp = fused_log_prob(fn.base_dist, value)
        if lp is None:
            return None
        return lp.expand(
            _compat.broadcast_shapes(fn.batch_shape, value.shape[: -fn.event_dim or None])
        )
    if isinstance(fn, torch.distributions.Independent):
        base, n = fn.base_dist, fn.reinterpreted_batch_ndims
        if type(base) in (dist.Normal, torch.distributions.Normal):
            return _diag_normal(base.loc, base.scale, value, n)
        if type(base) in (dist.MultivariateNormal, torch.distributions.MultivariateNormal):
            lp = _mvn(base, value)
            return None if lp is None else sum_rightmost(lp, n)
        return None
    if type(fn) in (dist.MultivariateNormal, torch.distributions.MultivariateNormal):
        return _mvn(fn, value)
    if type(fn) not in (dist.Categorical, torch.distributions.Categorical):
        return None
    return _categorical(fn, value)  # (its value checked above)


def fused_log_prob_shape(fn, value) -> torch.Size | None:
    """The shape of ``fn.log_prob(value)``, without computing it, for the families the fused
    kernels cover (:func:`fused_log_prob`: ``Categorical``,
    ``MultivariateNormal``, ``Independent`` of a ``Normal`` or ``MultivariateNormal``, under
    ``MaskedDistribution`` and ``ExpandedDistribution``): ``batch_shape`` broadcast with the
    value's batch dims (its shape less ``fn.event_shape``'s dims),
    which is what their ``log_prob`` (and the kernels) return. None for any other family, for
    a mask of False (``log_prob`` then reads only the base's batch shape) and for shapes that
    do not broadcast (the generic ``log_prob`` then raises, with the trace's shapes).

    :meth:`ExactEStep._check_dims` reads only which dims a factor spans, not its values.

    Example: a mixture's ``MultivariateNormal(locs[z], ...)`` with ``locs[z]`` of shape
    ``(K, 1, D)`` and data ``(N, D)``::

        >>> fn = dist.MultivariateNormal(torch.zeros(3, 1, 2), scale_tril=torch.eye(2))
        >>> fused_log_prob_shape(fn, torch.zeros(5, 2))
        torch.Size([3, 5])
    """
    if not isinstance(value, torch.Tensor):
        return None
    base = fn
    while True:
        if isinstance(base, MaskedDistribution):
            if _compat.mask_of(base) is False:
                return None
        elif not isinstance(base, dist.ExpandedDistribution):
            break
        base = base.base_dist
    if isinstance(base, torch.distributions.Independent):
        base = base.base_dist
        if type(base) not in _REAL_SUPPORT:
            return None
    elif type(base) not in _REAL_SUPPORT + _CATEGORICAL:
        return None
    try:
        batch = value.shape[: value.dim() - len(fn.event_shape)]
        return _compat.broadcast_shapes(fn.batch_shape, batch)
    except RuntimeError:
        return None


def _geometry(t: torch.Tensor, event: int) -> tuple:
    """``t``'s batch shape and strides (its last ``event`` dims dropped): all that
    :func:`_varies` reads of it."""
    k = t.dim() - event
    return tuple(t.shape[:k]), tuple(t.stride()[:k])


def _layout(params: list[tuple[torch.Tensor, int]], value: torch.Tensor, event: int):
    """Split the broadcast batch dims: those some param varies along (``pd``), those the value
    varies along (``vd``); None if a dim is both. ``params`` are ``(tensor, its event dims)``.
    (A function of the shapes and strides only, which recur at every iteration: cached.)"""
    return _layout_of(tuple(_geometry(t, e) for t, e in params), _geometry(value, event))


@functools.lru_cache(maxsize=256)
def _layout_of(params: tuple, value: tuple):
    batch = _compat.broadcast_shapes(*(shape for shape, _ in params), value[0])
    n = len(batch)
    pv = [False] * n
    for shape, stride in params:
        pv = [a or b for a, b in zip(pv, _varies_geometry(shape, stride, n))]
    vv = _varies_geometry(*value, n)
    if any(a and b for a, b in zip(pv, vv)):
        return None
    pd = tuple(d for d in range(n) if pv[d])
    vd = tuple(d for d in range(n) if vv[d])
    return batch, pd, vd


def _varies_geometry(shape: tuple, stride: tuple, n: int) -> list[bool]:
    """:func:`_varies` from a shape and strides."""
    return [False] * (n - len(shape)) + [s > 1 and st != 0 for s, st in zip(shape, stride)]


def _place(out: torch.Tensor, batch, pd: list[int], vd: list[int]) -> torch.Tensor:
    """``out`` ``(M, N)`` over (the param dims, the value dims) back into ``batch``'s layout."""
    sizes, order, shape = _place_recipe(tuple(batch), tuple(pd), tuple(vd))
    if out.shape == batch and order is None:  # (a mixture's (K, N): already in place)
        return out
    out = out.reshape(sizes)
    if order is not None:
        out = out.permute(order)
    return out.reshape(shape).expand(batch)


@functools.lru_cache(maxsize=256)
def _place_recipe(batch: tuple, pd: tuple, vd: tuple) -> tuple:
    """:func:`_place`'s view ops, from shapes only (recurring at every iteration): the sizes
    of ``(M, N)`` split into the param and value dims, their permutation into ``batch``'s
    order (None: the identity) and the shape with the broadcast dims as 1."""
    n = len(batch)
    sizes = [batch[d] for d in pd] + [batch[d] for d in vd]
    order = sorted(range(len(pd) + len(vd)), key=lambda i: (pd + vd)[i])
    shape = [batch[d] if d in pd or d in vd else 1 for d in range(n)]
    return sizes, (None if order == sorted(order) else order), shape


def _mvn(fn, value: torch.Tensor) -> torch.Tensor | None:
    """``fn.log_prob(value)`` of a ``MultivariateNormal`` by the GEMM form (module docstring),
    None where it does not apply. Without autograd, by the plan of the three tensors'
    geometry (:func:`_mvn_plan`, made once per geometry: an EM fit calls this with the same
    shapes every iteration); else, or where no plan applies, by :func:`_mvn_general`."""
    loc, tril = fn.loc, _compat.mvn_scale_tril(fn)
    if not torch.is_grad_enabled() or not (
        loc.requires_grad or tril.requires_grad or value.requires_grad
    ):
        key = (
            loc.shape,
            loc.stride(),
            tril.shape,
            tril.stride(),
            value.shape,
            value.stride(),
            loc.dtype,
            tril.dtype,
            value.dtype,
            loc.device,
            tril.device,
            value.device,
        )
        plan = _MVN_PLANS.get(key, _MISSING)
        if plan is _MISSING:
            plan = _mvn_plan(key)
            if len(_MVN_PLANS) >= 64:
                _MVN_PLANS.clear()
            _MVN_PLANS[key] = plan
        if plan is None:  # (params and value vary along a common dim: not fused)
            return None
        if plan is not _GENERAL:
            return _mvn_planned(plan, loc, tril, value)
    return _mvn_general(fn, value)


_MISSING = object()
_GENERAL = object()  # (a plan's answer: the general code, e.g. a copy needed, mixed dtypes)
# (loc, tril, value geometries, dtypes, devices) -> _MvnPlan, None (not fused) or _GENERAL
_MVN_PLANS: dict = {}


class _MvnPlan:
    """What :func:`_mvn_planned` reads, from the three tensors' geometry only: each tensor's
    flat rows as one view op (``(size, stride, offset delta)`` for ``as_strided``, None for
    the tensor as it is), the sizes, the identity and block-sum matrix, the constant
    ``-D/2 log 2 pi``, and the placing of the ``(M, N)`` result into the batch shape
    (None: its transpose is in place already)."""

    __slots__ = ("blocks", "d", "eye", "half", "loc", "m", "n", "place", "tril", "x")

    def __init__(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


def _flat_view(shape, stride, dtype, dims, batch, tail):
    """The view :func:`_flat` makes of a tensor of ``shape`` and ``stride`` (found on a meta
    tensor of that geometry), as one ``as_strided``: ``(size, stride, offset delta)``, None
    for the tensor itself, or :data:`_GENERAL` where it is a copy (the general code makes it)."""
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    out = _flat(t, list(dims), batch, tail)
    if out is t:
        return None
    if not out._is_view():
        return _GENERAL
    geometry = (tuple(out.shape), tuple(out.stride()), out.storage_offset() - t.storage_offset())
    if geometry == (tuple(shape), tuple(stride), 0):
        return None
    return geometry


def _rows_view(view, shape, stride):
    """A :func:`_flat_view` of the locs ``(M, D)`` as ``(M, 1, D)`` (the left operand of the
    shift's batched product, which otherwise takes an ``unsqueeze``)."""
    if view is _GENERAL:
        return view
    if view is None:
        if len(shape) != 2:
            return _GENERAL
        view = (tuple(shape), tuple(stride), 0)
    (m, d), (sm, sd), delta = view
    return (m, 1, d), (sm, d * sd, sd), delta


def _mvn_plan(key: tuple):
    """The :class:`_MvnPlan` of :func:`_mvn`'s ``key`` (geometries, dtypes, devices of loc,
    scale_tril and value); None where the layout is not fused, :data:`_GENERAL` where the
    general code must run (mixed dtypes or devices, a view that is a copy, chunked rows)."""
    ls, lst, ts, tst, vs, vst, ldt, tdt, vdt, ldev, tdev, vdev = key
    if len(vs) < 1 or len(ls) < 1:
        return _GENERAL
    if not (ldt == tdt == vdt) or not (ldev == tdev == vdev):
        return _GENERAL
    layout = _layout_of(
        (_geometry_of(ls, lst, 1), _geometry_of(ts, tst, 2)), _geometry_of(vs, vst, 1)
    )
    if layout is None:
        return None
    batch, pd, vd = layout
    d = vs[-1]
    views = [
        _rows_view(_flat_view(ls, lst, ldt, pd, batch, (d,)), ls, lst),
        _flat_view(ts, tst, ldt, pd, batch, (d, d)),
        _flat_view(vs, vst, ldt, vd, batch, (d,)),
    ]
    if any(v is _GENERAL for v in views):
        return _GENERAL
    m = max(math.prod(batch[i] for i in pd), 1)
    n = math.prod(batch[i] for i in vd)
    if n > CHUNK:  # (chunked rows: the general code's buffers)
        return _GENERAL
    _, order, _ = _place_recipe(tuple(batch), tuple(pd), tuple(vd))
    place = None if (tuple(batch) == (m, n) and order is None) else (batch, pd, vd)
    return _MvnPlan(
        loc=views[0],
        tril=views[1],
        x=views[2],
        d=d,
        m=m,
        n=n,
        eye=torch.eye(d, dtype=ldt, device=ldev),
        blocks=torch.eye(m, dtype=ldt, device=ldev).repeat_interleave(d, 0),
        half=-d * _HALF_LOG_2PI,
        place=place,
    )


def _geometry_of(shape: tuple, stride: tuple, event: int) -> tuple:
    """:func:`_geometry` from a shape and strides."""
    k = len(shape) - event
    return tuple(shape[:k]), tuple(stride[:k])


def _as_view(t: torch.Tensor, view) -> torch.Tensor:
    """``t`` seen through ``view`` = (shape, strides, offset from t's own), or ``t`` if None."""
    return t if view is None else t.as_strided(view[0], view[1], t.storage_offset() + view[2])


def _mvn_planned(plan: _MvnPlan, loc, tril, value) -> torch.Tensor | None:
    """:func:`_mvn_general`'s no-autograd path, one chunk of rows, by ``plan``: the same
    operations on the same operands (bit for bit; tests/test_estep_cost.py), with the view ops
    and the Python around them read from the plan, the flat precision factors and the shift
    written into the GEMM's right operand by one ``cat`` (no copy of the factors of their own)
    and the conditioning bound from two max-norms."""
    d, m = plan.d, plan.m
    loc = _as_view(loc, plan.loc)  # (M, 1, D)
    tril = _as_view(tril, plan.tril)  # (M, D, D)
    x = _as_view(value, plan.x)  # (N, D)
    prec = torch.linalg.solve_triangular(tril, plan.eye, upper=False).mT
    # -log|L| - D/2 log 2 pi, as in _mvn_general (M,)
    const = torch.rsub(tril.diagonal(dim1=-2, dim2=-1).log().sum(-1), plan.half)
    xa, centre, spread = _row_spread(value, x)
    offsets = centre - loc
    if not _mvn_conditioned(prec, spread, offsets):
        return None
    # [P_1 .. P_M; -shift]: (D + 1, M, D) by one cat of the factors' (D, M, D) view and the
    # shift's rows, viewed as (D + 1, M D): the matrix _mvn_general builds in two copies
    shift = torch.bmm(offsets, prec).view(1, m, d)
    pa = torch.cat([prec.permute(1, 0, 2), shift]).view(d + 1, m * d)
    out = torch.addmm(const, torch.mm(xa, pa).square_(), plan.blocks, alpha=-0.5)
    if plan.place is None:
        return out.T
    return _place(out.T, *plan.place)


def _mvn_general(fn, value: torch.Tensor) -> torch.Tensor | None:
    """:func:`_mvn` by the general code: autograd, chunked rows, any geometry."""
    tril = _compat.mvn_scale_tril(fn)
    layout = _layout([(fn.loc, 1), (tril, 2)], value, 1)
    if layout is None:
        return None
    batch, pd, vd = layout
    d = value.shape[-1]
    dtype = fn.loc.dtype
    if value.dtype != dtype:  # (promote_types is a dispatched op: only when it can matter)
        dtype = torch.promote_types(dtype, value.dtype)
    sizes = [batch[i] for i in pd]
    loc = _flat(fn.loc, pd, batch, (d,)).to(dtype)  # (M, D)
    tril = _flat(tril, pd, batch, (d, d)).to(dtype)  # (M, D, D)
    x = _flat(value, vd, batch, (d,)).to(dtype)  # (N, D)
    m = max(math.prod(sizes), 1)
    # (the identity broadcast over the M blocks by the solve itself: the same solve as with
    # an expanded right-hand side, which it copies into a batch of its own either way)
    prec = torch.linalg.solve_triangular(tril, _eye(d, dtype, tril.device), upper=False).mT
    # row-vector form: ((x - c) - (mu - c))^T L^{-T}, all M blocks side by side
    stacked = prec.permute(1, 0, 2).reshape(d, m * d)
    # -log|L| - D/2 log 2 pi, as (-D/2 log 2 pi) - log|L| in one op: the same rounding
    # (a - b = -(b - a) exactly, and -x - y = -(x + y)) (M,)
    const = torch.rsub(tril.diagonal(dim1=-2, dim2=-1).log().sum(-1), -d * _HALF_LOG_2PI)
    grad = torch.is_grad_enabled() and (fn.loc.requires_grad or tril.requires_grad)
    if grad:
        centre = loc.mean(0)
        with torch.no_grad():  # (rows centred at the locs' mean: |x - c| <= spread + |c' - c|)
            _, data_centre, spread = _row_spread(value, x.detach())
            spread += float((data_centre - centre).abs().amax()) if x.shape[0] else 0.0
            if not _mvn_conditioned(prec.detach(), spread, (loc - centre).detach()):
                return None
        shift = torch.einsum("md,mde->me", loc - centre, prec).reshape(m * d)

        def block(a: int, b: int) -> torch.Tensor:
            y = torch.addmm(shift, x[a:b] - centre, stacked, beta=-1).square()
            return y.view(b - a, m, d).sum(-1).T  # (M, c)

        return _place(_assemble(block, x.shape[0], const, grad), batch, pd, vd)
    # no autograd: one GEMM per chunk with the shift folded in ([x - c', 1] @ [P; -shift'],
    # c' the data's mean row, the centred rows kept between calls), the block sums of the
    # squares by a GEMM with a (M D, M) 0/1 matrix, written with the constant straight into
    # rows of an (N, M) output (returned as its (M, N) transpose)
    n = x.shape[0]
    rows = min(CHUNK, n)
    xa, centre, spread = _row_spread(value, x)
    offsets = centre - loc
    if not _mvn_conditioned(prec, spread, offsets):
        return None
    # -shift: the product torch.einsum("md,mde->me") makes (the same bmm on the same
    # operands), of c' - mu rather than mu - c', which negates it exactly (the sign of a zero
    # may differ, which the square below does not see)
    shift = torch.bmm(offsets.unsqueeze(1), prec).view(1, m * d)
    pa = torch.cat([stacked, shift])  # (D + 1, M D)
    blocks = _blocks(m, d, dtype, x.device)  # (M D, M)
    if n <= CHUNK:  # one chunk: the same two GEMMs, into buffers of their own (no slicing)
        out = torch.addmm(const, torch.mm(xa, pa).square_(), blocks, alpha=-0.5)
        return _place(out.T, batch, pd, vd)
    y = torch.empty(rows, m * d, dtype=dtype, device=x.device)
    out = torch.empty(n, m, dtype=dtype, device=x.device)
    for a, b in _chunks(n):
        yc = torch.mm(xa[a:b], pa, out=y[: b - a]).square_()
        torch.addmm(const, yc, blocks, alpha=-0.5, out=out[a:b])
    return _place(out.T, batch, pd, vd)


_BLOCKS: dict = {}  # (M, D, dtype, device) -> the 0/1 block-sum matrix, made once
_EYES: dict = {}  # (D, dtype, device) -> the identity, the right-hand side of the solve


def _eye(d: int, dtype, device) -> torch.Tensor:
    """``torch.eye(d)``, made once per size (read only: the solve copies its right-hand
    side)."""
    key = (d, dtype, device)
    out = _EYES.get(key)
    if out is None:
        if len(_EYES) > 64:
            _EYES.clear()
        out = _EYES[key] = torch.eye(d, dtype=dtype, device=device)
    return out


def _blocks(m: int, d: int, dtype, device) -> torch.Tensor:
    """``(M D, M)``: column ``j`` is 1 on rows ``j D .. (j + 1) D - 1`` (sums each block of
    ``D`` columns by a GEMM); read only, so kept between calls (a few sizes per fit)."""
    key = (m, d, dtype, device)
    out = _BLOCKS.get(key)
    if out is None:
        if len(_BLOCKS) > 64:
            _BLOCKS.clear()
        out = _BLOCKS[key] = torch.eye(m, dtype=dtype, device=device).repeat_interleave(d, 0)
    return out


def _diag_normal(loc, scale, value, event: int) -> torch.Tensor | None:
    if event < 1:
        return None
    layout = _layout([(loc, event), (scale, event)], value, event)
    if layout is None:
        return None
    batch, pd, vd = layout
    ev = _compat.broadcast_shapes(
        loc.shape[loc.dim() - event :],
        scale.shape[scale.dim() - event :],
        value.shape[value.dim() - event :],
    )
    dtype = torch.promote_types(torch.promote_types(loc.dtype, scale.dtype), value.dtype)
    loc = _flat(loc, pd, batch, ev).reshape(-1, math.prod(ev))
    scale = _flat(scale, pd, batch, ev).reshape(-1, math.prod(ev))
    x = _flat(value, vd, batch, ev).reshape(-1, math.prod(ev)).to(dtype)
    loc, scale = loc.to(dtype), scale.to(dtype)
    inv = scale.reciprocal()
    const = -scale.log().sum(-1) - loc.shape[-1] * _HALF_LOG_2PI  # (M,)
    grad = torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad)

    def block(a: int, b: int) -> torch.Tensor:
        z = (x[a:b].unsqueeze(0) - loc.unsqueeze(1)) * inv.unsqueeze(1)  # (M, c, E)
        z = z.square() if grad else z.square_()
        return z.sum(-1)  # (M, c)

    return _place(_assemble(block, x.shape[0], const, grad), batch, pd, vd)


def diag_normal_rows(fn, value: torch.Tensor) -> torch.Tensor | None:
    r"""``fn.log_prob(value.unsqueeze(-2))`` ``(*batch, M)`` of a diagonal Gaussian
    ``Independent(Normal(loc (M, E), scale (M, E)), 1)`` (the emission of every state of an HMM
    at every step), row chunk by row chunk: :math:`z = (x - \mu_m) / \sigma_m` as Pyro
    computes it (the difference first), squared and summed over the event, plus
    :math:`-\sum \log \sigma_m - \tfrac E2 \log 2\pi`. The expanded quadratic form
    :math:`x^2\lambda - 2 x (\mu\lambda) + \mu^2\lambda` (two GEMMs, as scikit-learn's and
    hmmlearn's diagonal Gaussians) is not used: with a state whose scale collapsed onto one
    point its terms are ~1e24 and cancel to a wrong log-density, and the chain's log p(x) with
    it. Temporaries are one ``(CHUNK, M, E)`` block. None where the structure is not that
    (other families, batched params, autograd recording), so the caller runs the generic path.

    Example::

        >>> fn = dist.Normal(torch.randn(3, 2), torch.ones(3, 2)).to_event(1)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(diag_normal_rows(fn, x), fn.log_prob(x.unsqueeze(-2)))
        True
    """
    if not isinstance(fn, torch.distributions.Independent) or fn.reinterpreted_batch_ndims != 1:
        return None
    base = fn.base_dist
    if type(base) not in (dist.Normal, torch.distributions.Normal):
        return None
    loc, scale = base.loc, base.scale
    if loc.dim() != 2 or scale.shape != loc.shape or value.shape[-1] != loc.shape[-1]:
        return None
    if torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad):
        return None
    if _compat.validate_args_flag(fn):
        _validate_sample(fn, value.unsqueeze(-2))
    dtype = torch.promote_types(torch.promote_types(loc.dtype, scale.dtype), value.dtype)
    loc, scale = loc.to(dtype), scale.to(dtype)
    x = value.reshape(-1, value.shape[-1]).to(dtype)
    const = -scale.log().sum(-1) - loc.shape[-1] * _HALF_LOG_2PI  # (M,)
    out = torch.empty(x.shape[0], loc.shape[0], dtype=dtype, device=x.device)
    for a, b in _chunks(x.shape[0]):
        z = x[a:b].unsqueeze(-2) - loc  # (c, M, E)
        torch.add(const, z.div_(scale).square_().sum(-1), alpha=-0.5, out=out[a:b])
    return out.reshape(value.shape[:-1] + (loc.shape[0],))


def _assemble(block, rows: int, const: torch.Tensor, grad: bool) -> torch.Tensor:
    """``const - maha / 2`` as ``(M, rows)`` from the chunks ``block(a, b)`` of the squared
    distances: written into one output (no ``(M, N)`` temporaries) unless autograd records it
    (then concatenated, which it can differentiate)."""
    if grad:
        parts = [block(a, b) for a, b in _chunks(rows)]
        maha = torch.cat(parts, 1) if len(parts) != 1 else parts[0]
        return const.unsqueeze(-1) - 0.5 * maha
    out = torch.empty(const.shape[0], rows, dtype=const.dtype, device=const.device)
    for a, b in _chunks(rows):
        out[:, a:b] = const.unsqueeze(-1) - 0.5 * block(a, b)
    return out


# ------------------------------------------------------------------------------ statistics
@functools.lru_cache(maxsize=256)
def _scatter_layout(weight: tuple, loc: tuple, value: tuple, param_batch: tuple, outer: bool):
    """:func:`outer_scatter`'s split of the broadcast batch dims, from the (shape, strides)
    of the weight, of the loc and of the value (their event dims dropped) and the param
    batch shape: ``(batch, pd, vd, both, spare, repeats)``, or None where it does not apply."""
    batch = _compat.broadcast_shapes(weight[0], loc[0], value[0], param_batch)
    n = len(batch)
    lv = _varies_geometry(*loc, n)
    iv = [False] * (n - len(param_batch)) + [s > 1 for s in param_batch]
    pv = [a or b for a, b in zip(lv, iv)]
    vv = _varies_geometry(*value, n)
    wv = _varies_geometry(*weight, n)
    both = tuple(d for d in range(n) if pv[d] and vv[d])
    if outer and both:
        return None
    if any(wv[d] for d in both):
        return None
    pd = tuple(d for d in range(n) if pv[d] and d not in both)
    vd = tuple(d for d in range(n) if vv[d] and d not in both)
    # a dim only the weight varies along: nothing else depends on it, so sum it out first
    spare = tuple(d for d in range(n) if wv[d] and not pv[d] and not vv[d])
    # a dim nothing varies along (all broadcast) repeats every term, as the generic sums count
    repeats = math.prod(
        batch[d] for d in range(n) if batch[d] > 1 and not (pv[d] or vv[d] or wv[d])
    )
    return batch, pd, vd, both, spare, repeats


# outer_scatter's steady path (see _outer_steady); False: the general path only (the tests
# compare the two bit for bit)
_STEADY_SCATTER = True
# one slot: the geometry of the last outer_scatter call and what it fixes (see _Steady)
_STEADY: list = [None]
# one slot: the centred rows of the last data and their views the scatter reads: (xa, y, y^T,
# y unsqueezed), emptied when the data are freed (as _SLOT is)
_STEADY_ROWS: list = [None]


class _Steady:
    """What the geometry of an outer_scatter call fixes (one chunk of whole rows, one dtype,
    no grad, nothing summed out or repeated): the number of param rows ``m``, the vector size
    ``d``, the views of the weight as ``(M, N)`` and ``(N, M, 1)`` and of the loc as
    ``(M, D)`` as (shape, strides, offset from the tensor's), None where the tensor is that
    view already, and the output shapes."""

    __slots__ = ("big", "d", "loc_view", "m", "w_view", "wt_view")

    def __init__(self, m, d, w_view, wt_view, loc_view, big) -> None:
        self.m, self.d, self.big = m, d, big
        self.w_view, self.wt_view, self.loc_view = w_view, wt_view, loc_view


def _relative_view(view: torch.Tensor, base: torch.Tensor):
    """``view``'s geometry relative to ``base``'s storage offset (None: ``view`` is ``base``
    as it is); False where it is not a view of ``base``'s storage."""
    if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return False
    geometry = (tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset())
    if geometry == (tuple(base.shape), base.stride(), 0):
        return None
    return geometry


def _outer_steady(weight, value, loc, param_batch):
    """:func:`outer_scatter` (``outer=True``) for a call of the same geometry as the last
    one (the shapes, strides and dtypes of the weight, value and loc, and ``param_batch``):
    the same ops on the same values as the general path, with the views it takes made in
    one op each (or kept with the data's centred rows), and its layout not worked out again.
    None where it does not apply (the general path then runs)."""
    key = (
        weight.shape,
        weight.stride(),
        loc.shape,
        loc.stride(),
        value.shape,
        value.stride(),
        tuple(param_batch),
        weight.dtype,
        value.dtype,
        loc.dtype,
    )
    hit = _STEADY[0]
    if hit is None or hit[0] != key:
        hit = _STEADY[0] = (key, _prepare_steady(weight, value, loc, param_batch))
    prep = hit[1]
    if prep is None or weight.requires_grad or loc.requires_grad or value.requires_grad:
        return None
    wfull = _as_view(weight, prep.w_view)  # (M, N)
    mu = _as_view(loc, prep.loc_view)  # (M, D)
    s, den = outer_rows(wfull, _as_view(weight, prep.wt_view), value, mu)
    big = prep.big
    return den.reshape(big), s.reshape(big + [prep.d, prep.d])


def steady_rows(value: torch.Tensor) -> tuple:
    """``(y, y^T, y unsqueezed (N, 1, D), c)``: the data's rows centred at their mean row
    ``c`` (the E-step's copy, :func:`_centred_rows`) and the views of them the scatter reads,
    kept with them (one slot, emptied when the data are freed)."""
    xa, centre = _centred_rows(value, value)
    rows = _STEADY_ROWS[0]
    if rows is None or rows[0] is not xa:
        y = xa[:, :-1]
        try:  # (the reference kept with them: its callback empties the slot)
            ref = weakref.ref(value, lambda _: _STEADY_ROWS.__setitem__(0, None))
        except TypeError:  # (not weak-referenceable: not kept)
            ref = None
        rows = (xa, y, y.T, y.unsqueeze(1), ref)
        if ref is not None:
            _STEADY_ROWS[0] = rows
    return rows[1], rows[2], rows[3], centre


def outer_rows(wfull, wt, value, mu, den=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`S_m = \\sum_n w_{mn} (x_n - \\mu_m)(x_n - \\mu_m)^\\top` ``(M, D, D)`` and
    :math:`W_m = \\sum_n w_{mn}` ``(M,)`` of one chunk of whole rows (``value`` ``(N, D)``,
    ``N <= CHUNK``), from ``wfull`` ``(M, N)``, the same weights viewed ``(N, M, 1)`` (``wt``)
    and the locs ``mu`` ``(M, D)``, all of one dtype, without grad: the general path's ops
    (uncentred GEMM sums about the data's mean row, then the correction to each loc, rows that
    lost digits summed again about their loc). ``den``: ``wfull.sum(1)`` computed already (the
    same op on the same tensor: the same bits).

    Example::

        >>> w, x, mu = torch.rand(2, 5).double(), torch.randn(5, 3).double(), torch.zeros(2, 3)
        >>> s, n = outer_rows(w, w.T.unsqueeze(-1), x, mu.double())
        >>> torch.allclose(s[0], (w[0, :, None] * x).T @ x)
        True
    """
    m, d_ = mu.shape
    y, yt, yu, centre = steady_rows(value)
    n_rows = y.shape[0]
    nu = mu - centre
    s1 = torch.addmm(_zeros((m, d_), wfull.dtype, wfull.device), wfull, y)
    # (the same products as the general path's, which writes them into a new (N, M, D)
    # buffer; a copy only where the product's own layout is not that one)
    wy = torch.mul(wt, yu).reshape(n_rows, m * d_)
    s2 = torch.addmm(_zeros((d_, m * d_), wfull.dtype, wfull.device), yt, wy)
    if den is None:
        den = wfull.sum(1)
    nu_row = nu.unsqueeze(-2)
    cross = s1.unsqueeze(-1) * nu_row  # (M, D, D)
    # (s2 (D, M D) read as (M, D, D): the general path's view and transpose, in one op)
    s = s2.as_strided((m, d_, d_), (d_, m * d_, 1)) - cross - cross.mT
    s += den.view(m, 1, 1) * nu.unsqueeze(-1) * nu_row
    raw = s2.as_strided((m, d_), (d_, m * d_ + 1))  # (M, D): sum_n w y_d^2
    for i in _cancelled(raw, s.diagonal(dim1=-2, dim2=-1)):
        s[i] = 0.0
        diff = value - mu[i]
        s[i] += (wfull[i].unsqueeze(-1) * diff).T @ diff
    return s, den


def _prepare_steady(weight, value, loc, param_batch):
    """The :class:`_Steady` of a geometry, from the general path's layout and views; None
    where the steady path does not apply to it."""
    if not (weight.dtype == value.dtype == loc.dtype) or weight.layout != torch.strided:
        return None
    layout = _scatter_layout(
        _geometry(weight, 0), _geometry(loc, 1), _geometry(value, 1), tuple(param_batch), True
    )
    if layout is None:
        return None
    batch, pd, vd, _, spare, repeats = layout
    n = len(batch)
    d_ = value.shape[-1]
    if spare or repeats != 1 or loc.layout != torch.strided:
        return None
    m = max(math.prod(batch[d] for d in pd), 1)
    with torch.no_grad():
        wfull = _take(_pad(weight, n), list(pd + vd), batch).reshape(m, -1)
        x = _flat(value, list(vd), batch, (d_,))
        mu = _flat(loc, list(pd), batch, (d_,))
        wt = wfull.T.unsqueeze(-1)
    if x is not value or not 0 < x.shape[0] <= CHUNK or x.dim() != 2:
        return None
    views = [_relative_view(wfull, weight), _relative_view(wt, weight), _relative_view(mu, loc)]
    if any(v is False for v in views):
        return None
    big = [batch[d] if d in pd else 1 for d in range(n)]
    return _Steady(m, d_, views[0], views[1], views[2], big)


def outer_scatter(
    weight: torch.Tensor,
    value: torch.Tensor,
    loc: torch.Tensor,
    param_batch: torch.Size,
    event: int,
    outer: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Weighted residual statistics without the ``(M, N, ...)`` broadcast.

    With ``outer=True`` (a multivariate normal: ``event`` = 1, the loc's last dim the vector):
    :math:`W_m = \\sum_n w_{mn}` and :math:`S_m = \\sum_n w_{mn} (x_n - \\mu_m)(x_n - \\mu_m)^\\top`;
    with ``outer=False`` (elementwise; ``event`` = 0): :math:`W_m = \\sum_n w_{mn}` and
    :math:`S_{m} = \\sum_n w_{mn} (x_{n} - \\mu_{m})^2` at every element, with the dims both
    the loc and the value vary along (the coordinates of a diagonal Gaussian) kept
    elementwise. Computed from uncentred GEMM sums about the data's mean row (see the
    module's docstring): exact algebra, and the shift keeps the sums of the data's spread.

    Args:
        weight: broadcastable to the batch shape (for ``outer=False``, the whole shape).
        value: the site's value; loc: the current locs (compact: size 1 where not varying).
        param_batch: the batch shape of whatever else the statistics are indexed by (the
            covariance or scale ids, compact), whose varying dims count as param dims.

    Returns:
        ``(W, S)`` in the broadcast batch layout (size 1 along the value's dims): ``W`` of
        shape ``batch``, ``S`` of shape ``batch + (D, D)`` (``outer``), or ``S`` the same shape
        as ``W`` (elementwise); None if the layout is not an outer product (the weight varies
        along an elementwise dim, or a param batch dim is also a value dim).
    """
    if outer and _STEADY_SCATTER:
        # (the same geometry as the last call: its views and layout at hand, fewer ops)
        got = _outer_steady(weight, value, loc, param_batch)
        if got is not None:
            return got
    dtype = weight.dtype
    if not (dtype == value.dtype == loc.dtype):  # (promote_types is a dispatched op)
        dtype = torch.promote_types(torch.promote_types(dtype, value.dtype), loc.dtype)
    # (the layout is a function of the shapes and strides only, which recur at every
    # iteration: made once per geometry)
    layout = _scatter_layout(
        _geometry(weight, 0),
        _geometry(loc, event),
        _geometry(value, event),
        tuple(param_batch),
        outer,
    )
    if layout is None:
        return None
    batch, pd, vd, both, spare, repeats = layout
    n = len(batch)
    w = _pad(weight, n)
    if spare:
        w = w.sum(spare, keepdim=True)
    if repeats != 1:
        w = w * repeats
    sizes_p = [batch[d] for d in pd]
    m = max(math.prod(sizes_p), 1)
    # weight as (M, N): param dims first, then value dims
    wfull = _take(w, pd + vd, batch).reshape(m, -1).to(dtype)
    if outer:
        d_ = value.shape[-1]
        x = _flat(value, vd, batch, (d_,)).to(dtype)  # (N, D)
        mu = _flat(loc, pd, batch, (d_,)).to(dtype)  # (M, D)
        xa, centre = _centred_rows(value, x)  # (the E-step's copy, when it ran on these data)
        nu = mu - centre
        whole = x.shape[0] <= CHUNK  # (one chunk: the whole rows, without slicing them)
        if whole:  # (out-of-place GEMMs from shared zeros: addmm_ on new zeros, one op each)
            s1 = s2 = None
        else:
            s1 = torch.zeros(m, d_, dtype=dtype, device=x.device)
            s2 = torch.zeros(d_, m * d_, dtype=dtype, device=x.device)
        rx = torch.empty(min(CHUNK, x.shape[0]), m, d_, dtype=dtype, device=x.device)
        for a, b in _chunks(x.shape[0]):
            y = xa[a:b, :-1]  # (c, D), centred
            wc = wfull if whole else wfull[:, a:b]  # (M, c)
            if whole:
                s1 = torch.addmm(_zeros((m, d_), dtype, x.device), wc, y)
            else:
                s1.addmm_(wc, y)
            # (w ⊗ y) viewed (c, M D): one GEMM gives all M second moments side by side
            out = rx if whole else rx[: b - a]
            wy = torch.mul(wc.T.unsqueeze(-1), y.unsqueeze(1), out=out)
            if whole:
                s2 = torch.addmm(_zeros((d_, m * d_), dtype, x.device), y.T, wy.view(b - a, m * d_))
            else:
                s2.addmm_(y.T, wy.view(b - a, m * d_))
        if s1 is None:  # (no rows)
            s1 = torch.zeros(m, d_, dtype=dtype, device=x.device)
            s2 = torch.zeros(d_, m * d_, dtype=dtype, device=x.device)
        den = wfull.sum(1)
        # sum_n w (y - nu)(y - nu)^T = sum_n w y y^T - s1 nu^T - nu s1^T + W nu nu^T
        nu_row = nu.unsqueeze(-2)  # (each view once)
        cross = s1.unsqueeze(-1) * nu_row  # (M, D, D)
        s2_ = s2.view(d_, m, d_)
        s = s2_.transpose(0, 1) - cross - cross.mT
        s += den.view(m, 1, 1) * nu.unsqueeze(-1) * nu_row
        # the uncentred sums lose digits in proportion to how far they exceed the result (a
        # component collapsing onto a few points): such rows are summed again, centred
        raw = s2_.diagonal(dim1=0, dim2=2)  # (M, D): sum_n w y_d^2
        for i in _cancelled(raw, s.diagonal(dim1=-2, dim2=-1)):
            s[i] = 0.0
            for a, b in _chunks(x.shape[0]):
                diff = x[a:b] - mu[i]
                s[i] += (wfull[i, a:b].unsqueeze(-1) * diff).T @ diff
        big = [batch[d] if d in pd else 1 for d in range(n)]
        return den.reshape(big), s.reshape(big + [d_, d_])
    # elementwise: the dims both vary along are the coordinates E
    ev = [batch[d] for d in both]
    e = max(math.prod(ev), 1)
    mu = _take(loc, pd + both, batch).reshape(m, e).to(dtype)
    x = _take(value, vd + both, batch).reshape(-1, e).to(dtype)
    centre = _centre(x)
    nu = mu - centre
    s1 = torch.zeros(m, e, dtype=dtype, device=x.device)
    s2 = torch.zeros(m, e, dtype=dtype, device=x.device)
    for a, b in _chunks(x.shape[0]):
        y = x[a:b] - centre  # (c, E)
        wc = wfull[:, a:b]
        s1.addmm_(wc, y)
        s2.addmm_(wc, y.square_())
    den1 = wfull.sum(1)
    # sum_n w (y - nu)^2 = sum_n w y^2 - 2 nu s1 + W nu^2
    s = s2 - 2 * nu * s1 + den1.unsqueeze(-1) * nu.square()
    for i in _cancelled(s2, s):  # (see the outer case)
        s[i] = 0.0
        for a, b in _chunks(x.shape[0]):
            s[i] += wfull[i, a:b] @ (x[a:b] - mu[i]).square_()
    big = [batch[d] if d in pd else 1 for d in range(n)]
    keep = sorted(pd + both)
    order = [(pd + both).index(d) for d in keep]
    out_s = s.reshape(sizes_p + ev).permute(order)
    out_s = out_s.reshape([batch[d] if d in keep else 1 for d in range(n)])
    # the weight counts once per coordinate (as each coordinate's statistic does)
    den = wfull.sum(1).reshape(big).expand(out_s.shape)
    return den, out_s
