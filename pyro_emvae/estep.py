"""The exact E-step: the posterior of every enumerated discrete site of a Pyro model.

How it works. The model is traced once under :func:`pyro.poutine.enum`, so every site marked
``infer={"enumerate": "parallel"}`` carries all its values along a tensor dimension of its own.
Each sample site then contributes a log-factor :math:`\\phi_f` over the enumerated variables it
depends on (and over its plates), and

.. math::

    \\log p_\\theta(x) = \\log \\sum_z \\prod_f \\exp \\phi_f(z)

is one sum-product contraction (Pyro's :func:`~pyro.ops.contract.contract_to_tensor`).
Because :math:`\\log p(x)` is the log-partition function of the factors,

.. math::

    \\frac{\\partial \\log p_\\theta(x)}{\\partial \\phi_f(z_f)} = p_\\theta(z_f \\mid x),

so **one backward pass gives the exact posterior marginal of every factor's scope**: the
marginal of each latent, the pairwise marginal of neighbours on a Markov chain, the joint of a
local latent with a global one. The same backward pass can also return the parameter gradient
:math:`\\nabla_\\theta \\log p_\\theta(x)`, which by Fisher's identity is the gradient of
:math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]` at the E-step's q (the first EG step comes free).

Long chains. A ``pyro.markov`` loop costs a Python-level site per time step (about 1.4 s for
one E-step at T=1000, K=8). For T in the thousands write the chain as an observed
:class:`pyro.distributions.DiscreteHMM` site: its hidden chain is treated as an implicit latent,
contracted by an exact forward-backward (:mod:`pyro_emvae.distributions.hmm`: ``log p`` and all
pairwise marginals as one autograd op, in batched matmuls over a tree of time spans), with marginals, pairwise marginals, MAP (Viterbi by max-product scan) and exact
samples (forward-filter backward-sample) reported under the site's name.

CTC. An observed :class:`~pyro_emvae.distributions.ctc.CTC` site (a label sequence given
per-frame label scores) is an implicit latent too: its alignment is summed out by the lattice
forward algorithm, the marginals under the site's name are the lattice occupancies
``(*batch, T, S)`` (the gradient of ``log p`` in the lattice emissions), ``map()`` gives the best
alignment and ``sample()`` exact posterior alignments, as per-frame labels ``(*batch, T)``.

PCFG. An observed :class:`~pyro_emvae.distributions.PCFG` site is treated alike: its parse tree
is summed out by the inside algorithm, its expected rule counts and span marginals come from the
same backward pass, ``map`` gives Viterbi trees (CKY) and ``sample`` exact posterior trees.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import opt_einsum
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import DiscreteHMM
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer.discrete import infer_discrete
from pyro.infer.util import is_validation_enabled
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_site_shape, warn_if_inf, warn_if_nan

from pyro_emvae import _compat
from pyro_emvae import kernels as _kernels
from pyro_emvae import params as _params
from pyro_emvae import validate as _validate
from pyro_emvae._compat import BackwardSampleMessenger, Subsample, find_ordinal, packed
from pyro_emvae.amortized import preserved_rng
from pyro_emvae.distributions.hmm import (
    ChainParts,
    ChainPosterior,
    HomogeneousHMM,
    chain_log_z,
    chain_posterior,
    hmm_log_z,
    hmm_pairwise,
    one_thread,
)
from pyro_emvae.errors import EnumerationError
from pyro_emvae.kernels import fused_log_prob

__all__ = ["EnumerationError", "ExactEStep", "Posterior"]


@dataclass
class Posterior:
    """The exact posterior of a model's enumerated discrete sites at the current params.

    Attributes:
        log_likelihood: 0-dim tensor, the exact :math:`\\log p_\\theta(x)` (total, nats; scaled
            by a common ``poutine.scale`` / subsampling factor if the model has one).
        marginals: site name -> tensor of shape ``batch_shape + (K,)``,
            :math:`p(z = k \\mid x)`, where ``batch_shape`` is the site's shape under its plates.
            A latent masked by ``poutine.mask`` keeps its prior (as in ``TraceEnum_ELBO``): where
            it is masked with everything that depends on it, its marginal is its prior given
            its parents.
            For an observed ``DiscreteHMM`` site ``name`` the hidden chain's marginals are
            ``(*batch_shape, T, K)``; for an observed ``CTC`` site, the occupancies of its lattice
            states ``(*batch_shape, T, S)`` (see :mod:`pyro_emvae.distributions.ctc`).
        pairwise: ``(parent, child)`` -> ``batch_shape + (K_parent, K_child)``, the joint
            posterior of a site with its single enumerated parent (neighbours on a chain, a local
            latent with a global one). For a ``DiscreteHMM`` site the key is ``(name, name)`` and the
            value is ``(*batch_shape, T, K, K)`` with ``[..., t, i, j] = p(z_{t-1}=i, z_t=j | x)``;
            ``t = 0`` is the transition out of Pyro's initial state :math:`z_{-1}`.
            For an observed :class:`~pyro_emvae.distributions.PCFG` site ``name`` (its parse tree
            an implicit latent) ``marginals[name]`` are the span marginals ``(B, L, L, S)``,
            width-major: ``[b, w - 1, i, A] = p(words i..i+w-1 form a constituent A | x)``.
        joints: site name -> ``(names, tensor)``: the joint posterior over the enumerated sites in
            that site's factor (``names``, in model order), shaped ``batch_shape + (K_1, ..., K_m)``.
            Observed sites are included: this is what expected sufficient statistics are built on.
        scale: the common scale applied to the enumerated factors (1 without subsampling).
        param_grads: when asked for, unconstrained param name -> gradient of ``log_likelihood``.

    For a mixture, :math:`\\log p(x) = \\sum_n \\log \\sum_k w_k\\, p(x_n \\mid k)` and the
    marginals are the responsibilities :math:`p(z_n = k \\mid x_n) \\propto w_k\\, p(x_n \\mid k)`:

    Example::

        >>> import math, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, fit
        >>> def model(x):
        ...     w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        ...     locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
        >>> x = torch.cat([torch.randn(100) - 3, torch.randn(100) + 3])

        >>> post = ExactEStep(model).posterior(x)
        >>> post.marginals["z"].shape  # batch_shape + (K,)
        torch.Size([200, 2])
        >>> w, locs = pyro.param("w"), pyro.param("locs")
        >>> log_joint = w.log() + dist.Normal(locs, 1.0).log_prob(x[:, None])  # (N, K)
        >>> torch.allclose(post.log_likelihood, log_joint.logsumexp(-1).sum())
        True
        >>> torch.allclose(post.marginals["z"], log_joint.softmax(-1))
        True
    """

    log_likelihood: torch.Tensor
    marginals: dict[str, torch.Tensor] = field(default_factory=dict)
    pairwise: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    joints: dict[str, tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=dict)
    scale: float = 1.0
    param_grads: dict[str, torch.Tensor] | None = None
    # packed posterior of every factor (site name -> tensor with ``_pyro_dims``) and the
    # minibatch the E-step saw: what an M-step needs to evaluate E_q[log p(x, z)] again. An
    # enumerated latent's entry is zero where it drops out of p(x) (masked with all that
    # depends on it, or replaced by obs_mask's observed value; see _dropped_rows), so that
    # EM on masked rows equals EM without them; joints keep the posterior there.
    factor_q: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    subsample: Any = field(default=None, repr=False)
    symbol_to_dim: dict[str, int] = field(default_factory=dict, repr=False)

    def log_likelihood_value(self) -> float:
        """``float(self.log_likelihood)``: the number the E-step read already (its finiteness
        test, see :class:`_SteadyMixture`) if the tensor is the one it read and unchanged
        since (its in-place version: a data-parallel sum writes it), else read now (a
        scalar copy from the tensor: a sync on an accelerator).

        Example::

            >>> Posterior(log_likelihood=torch.tensor(-3.5)).log_likelihood_value()
            -3.5
        """
        t = self.log_likelihood
        read = self.__dict__.get("_read")
        if read is not None and read[0] is t and read[1] == _compat.tensor_version(t):
            return read[2]
        return float(t)


def _hmm_parts(
    fn: DiscreteHMM,
    value: torch.Tensor,
    value_logits: torch.Tensor | None = None,
    mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-potentials of a DiscreteHMM: ``init (*batch, K)`` over :math:`z_{-1}` and
    ``M (*batch, T, K, K)`` with ``M[..., t, i, j] = log p(z_t=j | z_{t-1}=i) + log p(x_t | z_t=j)``
    (the emission term replaced by ``value_logits`` when given). Where ``mask`` (the site's
    ``poutine.mask``, broadcastable to ``batch``) is False the sequence is not observed: its
    emission term is dropped, so ``M`` there is the prior chain's (its MAP, draws and marginals
    are the prior's, as for an enumerated latent whose observations are all masked).
    """
    obs = fn.observation_dist
    if value_logits is None:
        value = value.unsqueeze(-1 - obs.event_dim)
        value_logits = obs.log_prob(value)  # (*batch, T, K)
    if mask is not None and mask is not True:
        keep = torch.as_tensor(mask, dtype=torch.bool, device=value_logits.device)
        keep = keep.reshape(keep.shape + (1, 1))
        value_logits = torch.where(keep, value_logits, value_logits.new_zeros(()))
    m = fn.transition_logits + value_logits.unsqueeze(-2)
    batch = torch.broadcast_shapes(fn.batch_shape, m.shape[:-3])
    m = m.expand(batch + m.shape[-3:])
    init = fn.initial_logits.expand(batch + fn.initial_logits.shape[-1:])
    return init, m


def _hmm_log_prob(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """:math:`\\log \\sum_{z} \\exp(\\text{init}(z_{-1}) + \\sum_t M_t(z_{t-1}, z_t))` ``(*batch)``, by
    :func:`~pyro_emvae.distributions.hmm.hmm_log_z`: its gradient in ``M`` is the chain's pairwise
    posterior marginals (one exact forward-backward)."""
    return hmm_log_z(init, m)


def _chain_parts(
    fn: HomogeneousHMM,
    value: torch.Tensor,
    value_logits: torch.Tensor | None = None,
    mask: Any = None,
) -> ChainParts:
    """:class:`~pyro_emvae.distributions.hmm.ChainParts` of a homogeneous chain, each expanded
    to the site's batch shape: ``_hmm_parts``'s potentials without the ``(*batch, T, K, K)``
    ``M`` (the emissions by the fused Gaussian kernel where it applies; a sequence that
    ``mask`` drops keeps no emissions, as in ``_hmm_parts``)."""
    if value_logits is None:
        obs = fn.observation_dist
        obs_value = value.unsqueeze(-1 - obs.event_dim)
        try:
            # (all K states' emissions at every step: two thin GEMMs for a diagonal Gaussian)
            with one_thread():
                value_logits = _kernels.diag_normal_rows(obs, value)
            if value_logits is None:
                value_logits = fused_log_prob(obs, obs_value)
        except (ValueError, RuntimeError):  # (the generic log_prob raises it, with its words)
            value_logits = None
        if value_logits is None:
            value_logits = obs.log_prob(obs_value)  # (*batch, T, K)
    if mask is not None and mask is not True:
        keep = torch.as_tensor(mask, dtype=torch.bool, device=value_logits.device)
        keep = keep.reshape(keep.shape + (1, 1))
        value_logits = torch.where(keep, value_logits, value_logits.new_zeros(()))
    parts = fn.parts(value, value_logits)
    k = value_logits.size(-1)
    batch = torch.broadcast_shapes(
        fn.batch_shape,
        parts.init.shape[:-1],
        parts.first.shape[:-2],
        parts.trans.shape[:-2],
        value_logits.shape[:-2],
    )
    return ChainParts(
        parts.init.expand(batch + (k,)),
        parts.first.expand(batch + (k, k)),
        parts.trans.expand(batch + (k, k)),
        value_logits.expand(batch + value_logits.shape[-2:]),
    )


def _dense_parts(parts: ChainParts) -> tuple[torch.Tensor, torch.Tensor]:
    """``(init (*batch, K), M (*batch, T, K, K))`` of batch-shaped ``parts`` (detached)."""
    batch, k = parts.emit.shape[:-2], parts.emit.size(-1)
    flat = ChainParts(*(t.detach().reshape((-1,) + t.shape[len(batch) :]) for t in parts))
    init, m = flat.dense()
    return init.reshape(batch + (k,)), m.reshape(batch + m.shape[-3:])


class _LazyPairs(dict):
    """``Posterior.pairwise``: a dict whose homogeneous chains' ``(*batch, T, K, K)`` entries
    are computed when first read (Baum–Welch does not need them; see ``ChainPosterior``)."""

    def __init__(self):
        super().__init__()
        self._lazy: dict = {}

    def defer(self, key, thunk) -> None:
        self._lazy[key] = thunk

    def _fill(self, key=None) -> None:
        for k in [key] if key is not None else list(self._lazy):
            if k in self._lazy:
                super().__setitem__(k, self._lazy.pop(k)())

    def __getitem__(self, key):
        self._fill(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._fill(key)
        return super().get(key, default)

    def __contains__(self, key):
        return key in self._lazy or super().__contains__(key)

    def __len__(self):
        return len(self._lazy) + super().__len__()

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def keys(self):
        self._fill()
        return super().keys()

    def items(self):
        self._fill()
        return super().items()

    def values(self):
        self._fill()
        return super().values()

    def __eq__(self, other):
        self._fill()
        return super().__eq__(other)

    def __repr__(self):
        self._fill()
        return super().__repr__()

    def __reduce__(self):  # (pickled, copied: a plain dict of every entry)
        self._fill()
        return (dict, (dict.copy(self),))

    __hash__ = None


def _sequential_maxmatmul(m: torch.Tensor) -> torch.Tensor:
    """Max-plus analogue of Pyro's parallel-scan ``_sequential_logmatmulexp`` (time dim -3)."""
    batch_shape, k = m.shape[:-3], m.size(-1)
    while m.size(-3) > 1:
        time = m.size(-3)
        even = time // 2 * 2
        x, y = m[..., :even, :, :].reshape(batch_shape + (even // 2, 2, k, k)).unbind(-3)
        contracted = (x.unsqueeze(-1) + y.unsqueeze(-3)).max(-2).values
        if time > even:
            contracted = torch.cat((contracted, m[..., -1:, :, :]), dim=-3)
        m = contracted
    return m.squeeze(-3)


def _hmm_map(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Viterbi path ``(*batch, T)`` of a chain: the gradient of the max-product value with respect
    to the pairwise potentials is the indicator of the maximizing path."""
    m = m.detach().requires_grad_()
    with torch.enable_grad():
        best = init.detach().unsqueeze(-1) + _sequential_maxmatmul(m)
        best = best.flatten(-2).max(-1).values
        (g,) = torch.autograd.grad(best.sum(), [m])
    return g.sum(-2).argmax(-1)  # indicator of (z_{t-1}, z_t) summed over z_{t-1}


def _hmm_sample(
    pair: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exact draws ``(num_samples, *batch, T)`` from a chain posterior given its pairwise
    marginals ``pair[..., t, i, j] = p(z_{t-1}=i, z_t=j | x)`` (the posterior is Markov)."""
    batch, t_len, k = pair.shape[:-3], pair.size(-3), pair.size(-1)
    prev = torch.multinomial(
        pair[..., 0, :, :].sum(-1).reshape(-1, k).clamp_min(0),
        num_samples,
        True,
        generator=generator,
    ).T  # z_{-1}: (S, B)
    pair = pair.reshape((-1, t_len, k, k))
    out = torch.empty((num_samples, pair.size(0), t_len), dtype=torch.long, device=pair.device)
    rows = torch.arange(pair.size(0), device=pair.device)
    for t in range(t_len):
        cond = pair[rows, t][rows.expand(num_samples, -1), prev].clamp_min(0)  # (S, B, K)
        prev = torch.multinomial(cond.reshape(-1, k), 1, generator=generator).reshape(prev.shape)
        out[..., t] = prev
    return out.reshape((num_samples,) + batch + (t_len,))


# (log-prob shape, plate frames, max_plate_nesting, enumeration dim, batch shape) that passed
# Pyro's check_site_shape: all it reads (and the site's name, for its messages only), which an
# EM iteration repeats unchanged (bounded: cleared when full)
_SHAPES_PASSED: set = set()


def _check_site_shape(site: dict, depth: int) -> None:
    """``pyro.util.check_site_shape(site, depth)``, once per shape, plates and depth.

    A pass reads the plates' dims and sizes only (the names appear in its errors, which are
    not kept): the key holds those, as plain tuples (hashing Pyro's frames runs Python per
    frame); a frame whose size is not an int is checked every time."""
    stack = tuple((f.dim, f.size) for f in site["cond_indep_stack"])
    key = (
        tuple(site["log_prob"].shape),
        stack,
        depth,
        _compat.enum_dim(site),
        tuple(getattr(site["fn"], "batch_shape", ())),
    )
    if any(type(size) is not int for _, size in stack):
        check_site_shape(site, depth)
        return
    if key in _SHAPES_PASSED:
        return
    check_site_shape(site, depth)  # (raises on a mismatch: nothing is kept)
    if len(_SHAPES_PASSED) > 1024:
        _SHAPES_PASSED.clear()
    _SHAPES_PASSED.add(key)


def _pack_tensors(tr) -> None:
    """``tr.pack_tensors()``: the same packed masks and log-probs, but a site's log-prob that is
    its own unscaled log-prob (no scale, no mask: ``scale_and_mask`` returned it) is packed
    once, one packed tensor under both keys, as it is one tensor unpacked."""
    sites = [s for s in tr.nodes.values() if s["type"] == "sample"]
    if any("score_parts" in s for s in sites):
        tr.pack_tensors()
        return
    tr.symbolize_dims()
    for site in sites:
        dim_to_symbol = _compat.dim_to_symbol(site)
        out = site.setdefault("packed", {})
        try:  # (Pyro's error, with the trace's shapes)
            out["mask"] = packed.pack(site["mask"], dim_to_symbol)
            if "log_prob" in site:
                lp, unscaled = site["log_prob"], site["unscaled_log_prob"]
                out["log_prob"] = (
                    _pack_own(lp, dim_to_symbol)
                    if "_emvae_scratch" in site
                    else packed.pack(lp, dim_to_symbol)
                )
                out["unscaled_log_prob"] = (
                    out["log_prob"] if unscaled is lp else packed.pack(unscaled, dim_to_symbol)
                )
        except ValueError as e:
            raise ValueError(
                f"Error while packing tensors at site '{site['name']}':\n  {e}\n"
                f"{tr.format_shapes(last_site=site['name'])}"
            ).with_traceback(e.__traceback__) from e


# the families an observed site's fused log-prob most often has, by exact type (neither an
# implicit latent nor a chain, whose tests _enum_trace then skips)
_PLAIN_GAUSSIAN = (dist.MultivariateNormal, torch.distributions.MultivariateNormal)


_UNNAMED = "\x00"  # (not a dims string: the name of a tensor without one, for _pack_own)


def _pack_own(t: torch.Tensor, dim_to_symbol: dict) -> torch.Tensor:
    """``packed.pack(t, dim_to_symbol)`` for a log-prob a fused kernel made for this E-step
    (nothing else holds it): with no size-1 dim to squeeze, ``t`` itself is named (the
    squeeze would return a view of it with the same shape and strides: one op fewer);
    otherwise, or if it is named already, Pyro's ``pack`` (and its errors)."""
    shape = t.shape
    if 1 in shape or _compat.pyro_dims(t, _UNNAMED) is not _UNNAMED:
        return packed.pack(t, dim_to_symbol)
    n = len(shape)
    try:
        dims = "".join(dim_to_symbol[d - n] for d in range(n))
    except KeyError:
        return packed.pack(t, dim_to_symbol)  # (Pyro's error)
    return _named(t, dims)


def _potential(site: dict) -> torch.Tensor | None:
    """The tensor whose gradient is an implicit latent's posterior (a DiscreteHMM's pairwise
    potentials, a CTC lattice's emissions, a PCFG's rule log-potentials), or None for another
    site."""
    if "_hmm" in site:
        return site["_hmm"][1]
    if "_implicit" in site:  # (a PCFG's flat log-potentials, a CTC lattice's emissions)
        return site["_implicit"][0]
    return None


def _arrange(
    t: torch.Tensor, dims_out: list[str | None], shape_out: tuple[int, ...]
) -> torch.Tensor:
    """Permute a packed tensor (dims named by ``_compat.pyro_dims(t)``) into the positions ``dims_out``
    (``None`` = a broadcast position) and expand it to ``shape_out``."""
    view, shape = _arrangement(
        _compat.pyro_dims(t), tuple(dims_out), tuple(t.shape), tuple(shape_out)
    )
    # (the view ops that change something only: a mixture's (K, N) posterior is one permute)
    x = t.reshape(()) if view == () else t if view is None else t.permute(view)
    return x if shape is None else x.reshape(shape).expand(shape_out)


@functools.lru_cache(maxsize=256)
def _arrangement(src: str, dims_out: tuple, shape: tuple, shape_out: tuple) -> tuple:
    """:func:`_arrange`'s view ops, from the names and shapes only (a mixture's posterior is
    arranged the same way at every E-step): the permutation (``()``: to a scalar, None: none)
    and the shape to reshape to before the expand (None: none)."""
    missing = set(src) - {d for d in dims_out if d is not None}
    if missing:
        raise AssertionError(f"dims {missing} of a packed tensor were not placed")  # internal bug
    present = [d for d in dims_out if d is not None and d in src]
    order = [src.index(d) for d in present]
    if not present:
        view, after = (), ()
    elif order != list(range(len(shape))):
        view, after = tuple(order), tuple(shape[i] for i in order)
    else:
        view, after = None, tuple(shape)
    if after == tuple(shape_out):
        return view, None
    return view, [shape[src.index(d)] if d is not None and d in src else 1 for d in dims_out]


def _plate_layout(
    stack: list, plate_to_symbol: dict[str, str] | None = None
) -> tuple[list[str | None], tuple[int, ...]]:
    """Symbols (if ``plate_to_symbol`` is given) and sizes of the plate dims of a site with
    ``cond_indep_stack`` ``stack``, right-aligned as in its value's shape."""
    frames = {f.dim: f for f in stack if f.vectorized}
    if not frames:
        return [], ()
    dims: list[str | None] = []
    sizes: list[int] = []
    for d in range(min(frames), 0):
        f = frames.get(d)
        dims.append(plate_to_symbol[f.name] if f is not None and plate_to_symbol else None)
        sizes.append(f.size if f is not None else 1)
    return dims, tuple(sizes)


def _site_dims(site: dict) -> str:
    """The dims a site's factor spans: its log-prob's and its mask's (a mask may read an
    enumerated value, ``poutine.mask(mask=(which == k))``: the site then depends on it)."""
    dims = _compat.pyro_dims(site["packed"]["unscaled_log_prob"])
    mask = site["packed"].get("mask")
    if torch.is_tensor(mask):
        dims += "".join(d for d in _compat.pyro_dims(mask) if d not in dims)
    return dims


def _factor(site: dict) -> torch.Tensor:
    """A site's factor in :math:`\\log p(x)`, as ``TraceEnum_ELBO`` forms it: an enumerated
    latent's unmasked log-prob (a masked latent keeps its prior), any other site's log-prob
    with its mask (inside the sum over the latents; the common scale goes outside)."""
    lp = site["packed"]["unscaled_log_prob"]
    if _validate.is_enumerated(site):
        return lp
    return packed.scale_and_mask(lp, mask=site["packed"]["mask"])


def _named(t: torch.Tensor, dims: str) -> torch.Tensor:
    _compat.set_pyro_dims(t, dims)
    return t


def _all_but(t: torch.Tensor, keep) -> torch.Tensor:
    """``all()`` of a packed bool tensor over its dims not in ``keep``."""
    dims = _compat.pyro_dims(t)
    for i in reversed(range(len(dims))):
        if dims[i] not in keep:
            t = t.all(i)
    return _named(t, "".join(d for d in dims if d in keep))


def _and(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = packed.broadcast_all(a, b)
    return _named(a & b, _compat.pyro_dims(a))


def _device_of(site: dict) -> torch.device:
    """The device of a site's factor (where flags about it must live)."""
    return site["packed"]["unscaled_log_prob"].device


def _packed_bool(mask, site: dict) -> torch.Tensor | None:
    """A site-level mask (None, a bool, or a tensor in the site's layout) packed; None when it
    holds everywhere or cannot be laid out in the site's dims (then nothing is claimed)."""
    if mask is None or mask is True:
        return None
    if mask is False:
        return _named(torch.tensor(False, device=_device_of(site)), "")
    try:
        return packed.pack(torch.as_tensor(mask, dtype=torch.bool), _compat.dim_to_symbol(site))
    except (ValueError, KeyError):
        return None


def _dropped_rows(tr) -> dict[str, torch.Tensor]:
    """Where an enumerated latent drops out of :math:`p(x)` for every value of the params:
    ``{site: packed bool over its plate dims}``, for the sites where it does somewhere.

    A latent drops out at a position where (a) the model masks it (``poutine.mask``; its mask
    is kept under ``site["_emvae_mask"]`` by :class:`_ExactView`) and every site whose factor
    spans it is masked there too, for every value of the other enumerated sites, or is itself
    an enumerated latent that drops out there (a padded tail of a ``pyro.markov`` chain); or
    (b) ``obs_mask=`` replaced its value by the observed one (``site["_emvae_replaced"]``).
    Its factor then sums to one over its values whatever the params, so the M-step gives it
    zero weight there: EM on the masked model equals EM on the model with those rows removed.
    Elsewhere its factor keeps its full weight, mask or not (as in ``TraceEnum_ELBO``).
    """
    sites = [(n, s) for n, s in tr.nodes.items() if s["type"] == "sample"]
    if not any(
        _validate.is_enumerated(s) and ("_emvae_replaced" in s or s.get("_emvae_mask") is not None)
        for _, s in sites
    ):
        return {}
    users: dict[str, list[str]] = {}  # enumeration symbol -> sites whose factor spans it
    for name, site in sites:
        for d in _site_dims(site):
            users.setdefault(d, []).append(name)
    # site -> packed bool: True where its factor is identically one (masked, or dropped out)
    dropped: dict[str, torch.Tensor] = {}
    for name, site in reversed(sites):
        if not _validate.is_enumerated(site):
            if _compat.is_deterministic(site):  # a Delta masked to zero log-density
                dropped[name] = _named(torch.tensor(True, device=_device_of(site)), "")
            elif site["is_observed"] and _potential(site) is None:
                mask = site["packed"]["mask"]
                if mask is False:
                    dropped[name] = _named(torch.tensor(True, device=_device_of(site)), "")
                elif torch.is_tensor(mask):
                    dropped[name] = _named(~mask, _compat.pyro_dims(mask))
            continue
        keep = find_ordinal(tr, site)
        symbol = _compat.enum_symbol(site)
        out = None
        unmasked = _packed_bool(site.get("_emvae_mask"), site)
        if unmasked is not None:
            out = _all_but(_named(~unmasked, _compat.pyro_dims(unmasked)), keep)
            for other in users.get(symbol, ()):
                if other == name:
                    continue
                if other not in dropped:
                    out = None
                    break
                out = _and(out, _all_but(dropped[other], keep))
        replaced = _packed_bool(site.get("_emvae_replaced"), site)
        if replaced is not None:
            replaced = _all_but(replaced, keep)
            if out is not None:
                a, b = packed.broadcast_all(out, replaced)
                replaced = _named(a | b, _compat.pyro_dims(a))
            out = replaced
        if out is not None and bool(out.any()):
            dropped[name] = out
    return {n: t for n, t in dropped.items() if _validate.is_enumerated(tr.nodes[n])}


def _weigh(q: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``q`` (packed) with zero weight where ``drop`` (packed bool) holds."""
    drop = _all_but(drop, _compat.pyro_dims(q))
    keep = _named((~drop).to(q.dtype), _compat.pyro_dims(drop))
    q2, keep = packed.broadcast_all(q, keep, dims=_compat.pyro_dims(q))
    return _named(q2 * keep, _compat.pyro_dims(q))


def _plates_named(tr, symbols) -> str:
    names = {v: k for k, v in tr.plate_to_symbol.items()}
    return ", ".join(f"'{names.get(s, s)}'" for s in sorted(symbols, key=lambda s: names.get(s, s)))


def _common_scale(tr, scaled: list[tuple[str, Any]]):
    """The one ``poutine.scale`` of the sites that depend on enumerated latents (``scaled``:
    ``[(site, scale)]``), as Pyro's ``_get_common_scale``, with an error naming the sites."""
    groups: dict[float, list[str]] = {}
    for name, scale in scaled:
        if torch.is_tensor(scale) and scale.dim():
            raise EnumerationError(
                f"site '{name}' has a poutine.scale tensor of shape {tuple(scale.shape)}; a "
                "site that depends on an enumerated latent needs a scalar scale (its log-prob "
                "is scaled after the sum over the latent). Weight the data with one number "
                "per model (poutine.scale around the whole model), or mask rows out with "
                "poutine.mask instead of a zero weight."
            )
        groups.setdefault(float(scale), []).append(name)
    if len(groups) > 1:
        found = "; ".join(
            f"scale {value:g} on {', '.join(repr(n) for n in names[:4])}"
            + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            for value, names in groups.items()
        )
        raise EnumerationError(
            "the sites that depend on an enumerated latent must share one poutine.scale (the "
            "scale multiplies log p(x) after the sum over the latents, as in Pyro's "
            f"TraceEnum_ELBO), but found {found}. Put one poutine.scale around the whole model "
            "(or let a subsampled plate scale it), or move the scale to sites that no "
            "enumerated latent reaches."
        )
    return scaled[0][1] if scaled else 1.0


def _one_latent(
    factors: OrderedDict,
    sum_dims: set,
    inputs: list,
    extra_inputs,
    scratch: frozenset = frozenset(),
):
    r"""The sum-product of one enumerated site's factors, all in the same plates (a mixture):
    :math:`\log Z = \sum_{n} \log \sum_k \exp \sum_f \phi_f(k, n)` and its gradient in
    each factor, the posterior :math:`q(k, n)` summed over the dims the factor lacks, without
    autograd: one ``(K, N)`` buffer (the generic contraction and its backward pass keep
    several). None where the factor graph is any other (the generic path then runs).

    The data plate is walked in chunks of :data:`~pyro_emvae.kernels.CHUNK` rows: each chunk
    is summed, normalized and exponentiated on its own (the rows are conditionally
    independent given the params: one latent, every factor in the same plates), so beyond
    the ``(K, N)`` posterior nothing larger than a ``(K, CHUNK)`` block is allocated. The
    posterior is written over a factor that is a scratch buffer of this E-step (``scratch``:
    ids of factors that a fused kernel made and nothing reads again, see
    :func:`_fused_log_prob`), so the E-step holds one ``(K, N)`` tensor, not two: the same
    operations, equal to round-off to a buffer of its own (the buffer's layout may order the
    sum over ``K`` differently). The chunks' :math:`\log Z` are summed in order."""
    if len(sum_dims) != 1 or len(factors) != 1 or extra_inputs:
        return None
    (terms,) = factors.values()
    if len(terms) != len(inputs):  # (other inputs: a chain's factors, which need autograd)
        return None
    (symbol,) = sum_dims
    if len(terms) == 2:
        fast = _two_factors(terms, symbol, scratch)
        if fast is not None:
            return fast
    # (no autograd here: factors that record none need no no_grad, whose switch costs more
    # than this function's arithmetic on small data)
    quiet = torch.no_grad() if any(t.requires_grad for t in terms) else contextlib.nullcontext()
    with quiet:
        values = _same_layout(terms)
        dims = _compat.pyro_dims(values[0])
        i = dims.index(symbol)
        shape = values[0].shape
        # along the longest other dim (the data plate) in row chunks, so that the passes over
        # each chunk (sum, max, exp, normalize) run in cache; the same operations per element
        if len(shape) == 2:
            j = 1 - i
        else:
            j = max((d for d in range(len(shape)) if d != i), key=lambda d: shape[d], default=None)
        step = _kernels.CHUNK if j is not None and shape[j] > _kernels.CHUNK else None
        own = next(
            (
                i
                for i in range(min(2, len(values)))
                if id(terms[i]) in scratch and _exclusive(values[i], values)
            ),
            None,
        )
        if own is None:
            q = _empty_sorted(values[0])
        else:  # (the factor's own buffer, overwritten chunk by chunk: see the docstring)
            q = values[own]
            if q.requires_grad:  # (a leaf made for autograd, which reads no gradient here)
                q = q.detach()
        parts = []
        for a in range(0, shape[j], step) if step else [None]:
            # (one chunk: the whole tensors, no views of them)
            at = (slice(None),) * j + (slice(a, a + step),) if step else None
            total = _rows(q, at)
            if own is not None:
                if len(values) > 1:
                    total += _rows(values[1 - own], at)
            elif len(values) > 1:
                torch.add(_rows(values[0], at), _rows(values[1], at), out=total)
            else:
                total.copy_(_rows(values[0], at))
            for v in values[2:]:
                total += _rows(v, at)
            top = total.amax(i, keepdim=True)
            # (a row of -inf: its sum is 0; NaN and +inf likewise: what masking every
            # non-finite max with 0 gives, in one op)
            top = torch.nan_to_num(top, nan=0.0, posinf=0.0, neginf=0.0)
            total.sub_(top).exp_()
            norm = total.sum(i, keepdim=True)
            parts.append((norm.log() + top).sum())
            total.div_(norm)
        log_z = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        # each factor's gradient, in the factor's own layout; factors of one layout share one
        # tensor, and the factor whose buffer holds q is that tensor already (a view of q
        # with the factor's geometry: no op)
        made: dict[tuple, torch.Tensor] = {}
        if own is not None and not terms[own].requires_grad and values[own] is not terms[own]:
            t = terms[own]
            if set(_compat.pyro_dims(t)) == set(dims):
                made[_compat.pyro_dims(t), t.shape] = t
        qs = []
        for t in terms:
            layout = (_compat.pyro_dims(t), t.shape)
            g = made.get(layout)
            if g is None:
                g = made[layout] = _gradient_of(q, dims, layout[0])
            qs.append(g)
    return log_z, qs


def _two_factors(terms: list, symbol: str, scratch: frozenset):
    """:func:`_one_latent` for its common case, a mixture's two factors (its latent's and its
    observation's) over the same two dims, neither recording autograd, one chunk of rows:
    the same operations in the same order on the same tensors (the sum written over a
    scratch buffer of this E-step if one is, else into a buffer of its own), without the
    general case's Python (the loop over chunks, the layouts of the factors' gradients,
    which here are the buffer itself). None otherwise."""
    a, b = terms
    dims = _compat.pyro_dims(a)
    shape = a.shape
    if (
        len(shape) != 2
        or a.requires_grad
        or b.requires_grad
        or _compat.pyro_dims(b) != dims
        or b.shape != shape
    ):
        return None
    i = dims.index(symbol)
    if shape[1 - i] > _kernels.CHUNK:
        return None
    if id(a) in scratch and _exclusive(a, terms):
        total = a
        total += b
    elif id(b) in scratch and _exclusive(b, terms):
        total = b
        total += a
    else:  # (a buffer of its own, laid out as _one_latent's)
        total = _empty_sorted(a)
        torch.add(a, b, out=total)
    top = total.amax(i, keepdim=True)
    # (as in _one_latent: a row of -inf, NaN or +inf sums to 0 there)
    top = torch.nan_to_num(top, nan=0.0, posinf=0.0, neginf=0.0)
    total.sub_(top).exp_()
    norm = total.sum(i, keepdim=True)
    log_z = (norm.log() + top).sum()
    total.div_(norm)
    return log_z, [total, total]


def _bare_posterior(log_z, scale: float, symbol_to_dim: dict, subsample_sites: dict) -> Posterior:
    """A :class:`Posterior` with ``log p(x)``, the common scale, the trace's dims and the
    minibatch it saw (its subsample sites); the posteriors are filled in after."""
    post = Posterior(log_likelihood=log_z, scale=scale)
    post.symbol_to_dim = dict(symbol_to_dim)
    post.subsample = poutine.Trace()
    for name, site in subsample_sites.items():
        post.subsample.add_node(name, **site)
    return post


def _lean_posterior(tr) -> Posterior | None:
    r"""The posterior of a trace with one enumerated latent and one observed site whose
    factors span the same two dims (a mixture: :math:`z_n`, :math:`x_n \mid z_n` under one
    plate), unmasked (or masked by ``True``), unscaled, no implicit latent: what
    :meth:`ExactEStep._contract` and :meth:`ExactEStep._fill` give it (:func:`_two_factors`'s
    sums, one ``(K, N)`` posterior as both sites' factor posterior, one ``(N, K)`` view of it
    as their joint and the latent's marginals), without their general bookkeeping (ordinals,
    scales, dropped rows, chains, pairwise marginals: none here). None for any other trace,
    or where :func:`_two_factors` does not apply (it then has changed nothing): the general
    path runs.
    """
    sites = []
    latent = dims = shape = None
    for name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        scale = site["scale"]
        mask = site["mask"]
        if (
            (mask is not None and mask is not True)
            or type(scale) not in (float, int)
            or scale != 1
            or "_hmm" in site
            or "_implicit" in site
        ):
            return None
        lp = site["packed"]["unscaled_log_prob"]
        if dims is None:
            dims, shape = _compat.pyro_dims(lp), lp.shape
        elif _compat.pyro_dims(lp) != dims or lp.shape != shape:
            return None
        if _validate.is_enumerated(site):
            if latent is not None or "_emvae_replaced" in site:
                return None
            latent_mask = site.get("_emvae_mask")
            if latent_mask is not None and latent_mask is not True:
                return None
            latent = name
        sites.append((name, site, lp))
    if latent is None or len(sites) != 2:
        return None
    symbol = _compat.enum_symbol(tr.nodes[latent])
    if symbol not in dims:  # (one value: packing squeezed its dim)
        return None
    scratch = frozenset(
        id(lp)
        for _, site, lp in sites
        if site.get("_emvae_scratch") == lp.untyped_storage().data_ptr()
    )
    layouts = [_plate_layout(site["cond_indep_stack"], tr.plate_to_symbol) for _, site, _ in sites]
    return _mixture_posterior(
        [name for name, _, _ in sites],
        [lp for _, _, lp in sites],
        layouts,
        latent,
        symbol,
        scratch,
        float(scale),
        tr.symbol_to_dim,
        tr._subsample_sites,
    )


def _mixture_posterior(
    names, lps, layouts, latent, symbol, scratch, scale, symbol_to_dim, subsample_sites
) -> Posterior | None:
    """The end of :func:`_lean_posterior` (and of :class:`_SteadyMixture`): the two factors
    ``lps`` (packed, over the same dims) of the sites ``names`` summed and normalized by
    :func:`_two_factors`, the posterior named and arranged per site (``layouts``: each
    site's :func:`_plate_layout`). None where :func:`_two_factors` declines."""
    done = _two_factors(lps, symbol, scratch)
    if done is None:
        return None
    log_z, (q, _) = done
    dims = _compat.pyro_dims(lps[0])
    _compat.set_pyro_dims(q, dims)  # (as _fill names it: a buffer of its own has no name)
    post = _bare_posterior(log_z, scale, symbol_to_dim, subsample_sites)
    size = lps[0].shape[dims.index(symbol)]
    arranged: dict[tuple, torch.Tensor] = {}
    for name, (plate_dims, plate_shape) in zip(names, layouts):
        post.factor_q[name] = q
        key = (tuple(plate_dims), plate_shape)
        joint = arranged.get(key)
        if joint is None:
            joint = arranged[key] = _arrange(q, plate_dims + [symbol], plate_shape + (size,))
        post.joints[name] = ((latent,), joint)
        if name == latent:
            post.marginals[name] = joint
    return post


# (the keys the trace's symbolize_dims adds to an enumerated site's infer: not the model's)
_SYMBOLIZED = _compat.PACKED_INFER_KEYS
_PLAIN = (str, int, float, bool, type(None))


def _plain_infer(infer: dict) -> dict | None:
    """A site's ``infer`` as the model pass left it (without the trace's symbols), or None
    if a value is neither a plain number or string nor a dict of them (compared by ``==``)."""
    out = {}
    for k, v in infer.items():
        if k in _SYMBOLIZED:
            continue
        if isinstance(v, dict):
            if not all(type(a) in _PLAIN and type(b) in _PLAIN for a, b in v.items()):
                return None
        elif type(v) not in _PLAIN:
            return None
        out[k] = v
    return out


def _frames(stack) -> list:
    """A site's plates as plain tuples (name, dim, size, counter, full_size, the size's type)
    for ``==``: Pyro's frames compare without ``full_size`` and by a slower ``__eq__``."""
    return [(*f, type(f.size)) for f in stack]


class _SteadyMixture:
    r"""The steady E-step of a mixture, once :func:`_lean_posterior` took its trace: what
    :meth:`ExactEStep._enum_trace` and :func:`_lean_posterior` do after the model pass, for a
    trace with the same structure, without their general Python (the loop over the sites'
    kinds, Pyro's ``compute_log_prob``, the site-shape checks, ``symbolize_dims`` and the
    packing, the detection of the mixture): the two sites' fused log-probs
    (:func:`~pyro_emvae.kernels.fused_log_prob`), named with the template's symbols, and
    :func:`_mixture_posterior`: the same operations on the same tensors, bit for bit.

    Made from the first trace the general path finished (``of``) and read at every later
    E-step (``__call__``), which checks that the new trace is one the template's steps
    apply to unchanged, else returns None (nothing written: the general path runs):

    * the same nodes in the same order; each sample site with the same distribution type,
      observed or not, its ``infer`` (enumeration dim and ids) and plates (name, dim, size),
      value and batch shapes and value dtype, no mask, a scale of 1, no ``args``; so that its
      site-shape check (a function of these, see :func:`_check_site_shape`), its packed dims
      and the trace's symbols are the template's;
    * the same ``max_plate_nesting``, and Pyro's validation on only if it was for the template
      (whose site-shape checks then ran);
    * the fused kernels apply (their own checks: the value's support, the plan, the
      conditioning bound) and give the template's shapes, recording no autograd.

    Pyro's non-finite log-prob warnings: the general path sums each site's log-prob and warns
    on a NaN or a :math:`+\infty` sum. Either one in a factor makes :math:`\log p(x)` NaN or
    :math:`+\infty` (it reaches every row's max, sum and log), and a finite sum of these
    log-densities cannot overflow to :math:`+\infty` (a Gaussian's is below
    :math:`745 D` per entry, a Categorical's at most 0); so with validation on a finite
    :math:`\log p(x)` is the proof that neither sum warns, and a non-finite one returns None
    (the general path then recomputes the factors, warns as it does and goes on).
    """

    __slots__ = (
        "depth",
        "dim_to_symbol",
        "latent",
        "layouts",
        "names",
        "nodes",
        "packed",
        "shape",
        "sites",
        "symbol",
        "symbol_to_dim",
        "validated",
    )

    @classmethod
    def of(cls, tr, depth: int) -> _SteadyMixture | None:
        """The recipe of ``tr`` (a trace :func:`_lean_posterior` took, finished by the general
        path), or None if it is not one the recipe covers (a mask of True, a site whose
        log-prob is not a fused kernel's, an ``infer`` not compared by ``==``)."""
        sites = [(n, s) for n, s in tr.nodes.items() if s["type"] == "sample"]
        if len(sites) != 2:
            return None
        out = cls()
        out.sites, out.dim_to_symbol, out.packed = [], [], []
        for name, site in sites:
            lp = site["packed"]["unscaled_log_prob"]
            infer = _plain_infer(site["infer"])
            if (
                infer is None
                or site["mask"] is not None
                or type(site["scale"]) not in (float, int)
                or site["scale"] != 1
                or site["args"]
                or site["kwargs"]
                or site.get("_emvae_scratch") != lp.untyped_storage().data_ptr()
                or site["unscaled_log_prob"] is not site["log_prob"]
                or not torch.is_tensor(site["value"])
            ):
                return None
            if _validate.is_enumerated(site):
                out.latent = name
            out.sites.append(
                (
                    name,
                    type(site["fn"]),
                    site["is_observed"],
                    infer,
                    _frames(site["cond_indep_stack"]),
                    site["value"].shape,
                    site["value"].dtype,
                    site["fn"].batch_shape,
                )
            )
            to_symbol = dict(_compat.dim_to_symbol(site))
            out.dim_to_symbol.append(to_symbol)
            # (the names _pack_own gives an unnamed log-prob without a size-1 dim, or None)
            n = lp.dim()
            named = 1 not in lp.shape and all(d - n in to_symbol for d in range(n))
            out.packed.append("".join(to_symbol[d - n] for d in range(n)) if named else None)
        lp = sites[0][1]["packed"]["unscaled_log_prob"]
        out.shape = lp.shape
        out.names = [name for name, _ in sites]
        out.nodes = tuple(tr.nodes)
        out.symbol = _compat.enum_symbol(tr.nodes[out.latent])
        out.layouts = [_plate_layout(s["cond_indep_stack"], tr.plate_to_symbol) for _, s in sites]
        out.symbol_to_dim = dict(tr.symbol_to_dim)
        out.depth = depth
        out.validated = is_validation_enabled()
        return out

    def __call__(self, tr, depth: int) -> Posterior | None:
        nodes = tr.nodes
        validating = is_validation_enabled()
        if depth != self.depth or (validating and not self.validated) or tuple(nodes) != self.nodes:
            return None
        lps = []
        for (name, kind, observed, infer, stack, vshape, vdtype, bshape), to_symbol, dims in zip(
            self.sites, self.dim_to_symbol, self.packed
        ):
            site = nodes[name]
            fn, value, scale = site["fn"], site["value"], site["scale"]
            if (
                type(fn) is not kind
                or site["is_observed"] is not observed
                or site["mask"] is not None
                or type(scale) not in (float, int)
                or scale != 1
                or site["args"]
                or site["kwargs"]
                or "_emvae_replaced" in site
                or site.get("_emvae_mask") is not None
                or not torch.is_tensor(value)
                or value.shape != vshape
                or value.dtype != vdtype
                or fn.batch_shape != bshape
                or _frames(site["cond_indep_stack"]) != stack
            ):
                return None
            try:  # (a value of the new infer that == cannot compare: not the template's)
                if site["infer"] != infer:
                    return None
            except (RuntimeError, TypeError, ValueError):
                return None
            try:  # (an error: the general path raises it, with the trace's shapes)
                lp = _kernels.fused_log_prob(fn, value)
            except (ValueError, RuntimeError):
                return None
            if lp is None or lp.shape != self.shape or lp.requires_grad:
                return None
            if dims is not None and _compat.pyro_dims(lp, _UNNAMED) is _UNNAMED:
                lps.append(_named(lp, dims))  # (_pack_own's names, read from the template)
                continue
            try:
                lps.append(_pack_own(lp, to_symbol))
            except ValueError:
                return None
        post = _mixture_posterior(
            self.names,
            lps,
            self.layouts,
            self.latent,
            self.symbol,
            frozenset(map(id, lps)),
            1.0,
            self.symbol_to_dim,
            tr._subsample_sites,
        )
        if post is not None and validating:
            log_z = post.log_likelihood
            value = log_z.tolist()
            if not math.isfinite(value):
                return None  # (see the class docstring: the general path warns)
            post._read = (log_z, _compat.tensor_version(log_z), value)  # (the loop's read)
        return post


def _rows(t: torch.Tensor, at: tuple | None) -> torch.Tensor:
    """``t[at]``, or ``t`` itself for ``at=None`` (the whole tensor: no view op)."""
    return t if at is None else t[at]


def _gradient_of(q: torch.Tensor, dims: str, own: str) -> torch.Tensor:
    """``q`` (packed over ``dims``) summed over the dims a factor over ``own`` lacks, in the
    order of ``own``."""
    lacks = [j for j, d in enumerate(dims) if d not in own]
    g = q.sum(lacks) if lacks else q  # (sum([]) would sum every dim)
    rest = [d for d in dims if d in own]
    if rest != list(own):
        g = g.permute([rest.index(d) for d in own])
    return g


def _broadcast_all(terms) -> tuple:
    """``pyro.ops.packed.broadcast_all(*terms)``: each term with its dims in sorted order and
    expanded to the common shape. Terms with the same dims and shape (a mixture's factors) are
    only permuted (or returned as they are), by the same view ops less the no-op reshape and
    expand."""
    dims = _compat.pyro_dims(terms[0])
    shape = terms[0].shape
    if any(_compat.pyro_dims(t) != dims or t.shape != shape for t in terms[1:]):
        return packed.broadcast_all(*terms)
    out = "".join(sorted(dims))
    if out == dims:
        return tuple(terms)
    order = tuple(dims.index(d) for d in out)
    return tuple(_named(t.permute(order), out) for t in terms)


def _same_layout(terms) -> tuple:
    """The terms of :func:`_one_latent`, as they are where they share dims and shape (a
    mixture's two factors): the arithmetic there is elementwise or reduces along named dims,
    and torch orders its loops by the strides, not by the dims' logical order, so the
    permutation into sorted dims that :func:`_broadcast_all` makes gives the same numbers
    (two view ops fewer, and none back). Otherwise :func:`_broadcast_all`."""
    dims = _compat.pyro_dims(terms[0])
    shape = terms[0].shape
    for t in terms[1:]:
        if _compat.pyro_dims(t) != dims or t.shape != shape:
            return _broadcast_all(terms)
    return tuple(terms)


def _empty_sorted(t: torch.Tensor) -> torch.Tensor:
    """An empty buffer shaped as ``t`` (packed), laid out in memory as one made in the
    sorted order of its dims (as :func:`_broadcast_all`'s layout made it): the reductions over
    it then run in the same order as there."""
    dims = _compat.pyro_dims(t)
    out = "".join(sorted(dims))
    if out == dims:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    order = [out.index(d) for d in dims]  # (sorted position of each of t's dims)
    buf = torch.empty([t.shape[dims.index(d)] for d in out], dtype=t.dtype, device=t.device)
    return buf.permute(order)


def _exclusive(t: torch.Tensor, values) -> bool:
    """Whether ``t`` covers its storage one element per entry (no broadcast, no other view's
    room) in the dtype of every value: a buffer the posterior may be written over."""
    return (
        all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape))
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        and t.grad_fn is None
        and all(v.dtype == t.dtype for v in values)
    )


def _tree_error(tr, err: Exception) -> EnumerationError:
    """Pyro's ``Expected tree-structured plate nesting`` as an error naming the sites: a site
    that reads enumerated latents of two independent plates, whose sum does not factor."""
    match = re.search(r"plates \[([^\]]*)\]", str(err))
    leaf = frozenset(s.strip() for s in match.group(1).split(",")) if match else None
    latents = {
        _compat.enum_symbol(s): (n, find_ordinal(tr, s))
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and _validate.is_enumerated(s)
    }
    for name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        ordinal = find_ordinal(tr, site)
        if leaf is not None and ordinal != leaf:
            continue
        dims = _site_dims(site)
        reads = [v for d, v in latents.items() if d in dims and v[1] < ordinal]  # model order
        apart = [
            (a, b)
            for i, a in enumerate(reads)
            for b in reads[i + 1 :]
            if not (a[1] <= b[1] or b[1] <= a[1])
        ]
        if apart:
            (a, pa), (b, pb) = apart[0]
            return EnumerationError(
                f"site '{name}' (plates {_plates_named(tr, ordinal)}) depends on enumerated "
                f"site '{a}' (plates {_plates_named(tr, pa) or 'none'}) and on enumerated site "
                f"'{b}' (plates {_plates_named(tr, pb) or 'none'}), which lie in independent "
                "plates: the sum over them does not factor along the plates (exact "
                "enumeration, as Pyro's TraceEnum_ELBO, needs tree-structured plate nesting). "
                "Make one of the plates sequential (for i in pyro.plate(...): at a cost "
                "exponential in its size), or nest one plate inside the other."
            )
    plates = _plates_named(tr, leaf) if leaf else "(unknown)"
    return EnumerationError(
        f"enumerated sites depend on each other across the independent plates {plates}: the "
        "sum over them does not factor along the plates (exact enumeration, as Pyro's "
        "TraceEnum_ELBO, needs tree-structured plate nesting). Make one of the plates "
        "sequential (for i in pyro.plate(...): at a cost exponential in its size), or nest "
        "one plate inside the other."
    )


def _is_tree_error(err: Exception) -> bool:
    return isinstance(err, NotImplementedError) and "tree-structured plate" in str(err)


class _Drawn(dist.TorchDistribution):
    """A guide site's distribution: it returns the value drawn beforehand from the exact joint
    posterior, and its log-density at a value is the exact conditional of that value given the
    earlier draws: ``log_softmax(logits)`` at the value (per element) plus ``extra`` (per
    element; the coupling of a site's elements, see :class:`_ExactConditionals`).

    ``kind`` is the model site's family, so that the value keeps its form: ``"bernoulli"``
    (floats 0/1), ``"onehot"`` (one-hot vectors, event_dim 1) or ``"categorical"`` (integers).
    """

    arg_constraints: ClassVar[dict] = {}
    has_enumerate_support = False

    def __init__(self, logits, value, extra, kind: str, support) -> None:
        self.logits = logits.log_softmax(-1)
        self._value, self._extra, self._kind, self._support = value, extra, kind, support
        event_shape = logits.shape[-1:] if kind == "onehot" else torch.Size()
        super().__init__(logits.shape[:-1], event_shape, validate_args=False)

    @property
    def support(self):
        return self._support

    def sample(self, sample_shape=()):
        return self._value.expand(torch.Size(sample_shape) + self._value.shape)

    def log_prob(self, value):
        if self._kind == "onehot":
            lp = (value * self.logits).sum(-1)
        else:
            idx = value.long().unsqueeze(-1)
            logits = self.logits.expand(idx.shape[:-1] + self.logits.shape[-1:])
            lp = logits.gather(-1, idx).squeeze(-1)
        return lp + self._extra


class _ExactConditionals(BackwardSampleMessenger):
    """Turns the model's enumerated sites into guide sites that return a joint draw ``values``
    (made beforehand from the exact posterior, by :meth:`ExactEStep.sample`'s backward
    sampling) with log-density the exact conditional :math:`\\log q(z_s \\mid z_{<s}, x)`, so
    that the log-densities of a run sum to :math:`\\log p(z \\mid x)` of the draw.

    Each site's factors are contracted onto ``z_s`` with the earlier draws gathered in (as
    Pyro's backward-sample messenger does): the per-element conditional of ``z_s``. The
    elements of a vectorized site are independent given the earlier draws unless a later
    enumerated site outside the site's plates reaches it through the factors (a global latent
    drawn after a plate of local ones): then the site's total conditional is computed as the
    difference of two contractions, :math:`\\log p(z_{\\le s}, x) - \\log p(z_{<s}, x)`, and
    what the product of the elements' marginals misses is spread over its unmasked elements.
    No intermediate cache is shared between sites: gathered factors are new tensors whose ids
    may repeat those of freed ones, which an id-keyed cache would confuse.
    """

    def __init__(self, enum_trace, guide_trace, values: dict[str, torch.Tensor]) -> None:
        super().__init__(enum_trace, guide_trace)
        self.values = values
        self.symbol_ordinal = {
            _compat.enum_symbol(s): find_ordinal(enum_trace, s)
            for s in enum_trace.nodes.values()
            if s["type"] == "sample" and _compat.enum_symbol(s) is not None
        }

    def _ring(self) -> LogRing:
        # plates of size 1 are squeezed out of packed factors: the ring must know their
        # sizes to broadcast them back
        sizes = {
            self.enum_trace.plate_to_symbol[f.name]: f.size
            for s in self.enum_trace.nodes.values()
            if s["type"] == "sample"
            for f in s["cond_indep_stack"]
            if f.vectorized
        }
        for ts in self.log_factors.values():
            for t in ts:
                sizes.update(zip(_compat.pyro_dims(t), t.shape))
        return LogRing(dim_to_size=sizes)

    def _coupled(self, symbol: str) -> bool:
        """Whether a later enumerated site outside ``symbol``'s plates reaches it through the
        factors (with the earlier draws gathered in): its elements are then dependent."""
        own = self.symbol_ordinal[symbol]
        seen, todo = {symbol}, [symbol]
        while todo:
            d = todo.pop()
            for ts in self.log_factors.values():
                for t in ts:
                    if d in _compat.pyro_dims(t):
                        for e in _compat.pyro_dims(t):
                            if e in self.sum_dims and e not in seen:
                                if not own <= self.symbol_ordinal.get(e, own):
                                    return True
                                seen.add(e)
                                todo.append(e)
        return False

    def _total(self) -> torch.Tensor:
        return contract_to_tensor(
            self.log_factors, self.sum_dims, target_ordinal=frozenset(), ring=self._ring()
        )

    def _pyro_sample(self, msg):
        enum_msg = self.enum_trace.nodes.get(msg["name"])
        if enum_msg is None or _compat.enum_symbol(enum_msg) is None:
            return
        symbol = _compat.enum_symbol(enum_msg)
        fn = msg["fn"]
        value = self.values[msg["name"]]
        kind = (
            "bernoulli"
            if isinstance(fn, dist.Bernoulli)
            else "onehot"
            if isinstance(fn, dist.OneHotCategorical)
            else "categorical"
        )
        extra = torch.zeros(())
        if symbol not in self.sum_dims:  # one value only (K=1): packing squeezed its dim away
            logits = torch.zeros(fn.batch_shape + (1,))
        else:
            logits = contract_to_tensor(
                self.log_factors,
                self.sum_dims,
                target_ordinal=find_ordinal(self.enum_trace, msg),
                target_dims={symbol},
                ring=self._ring(),
            )
            logits = packed.unpack(logits, self.enum_trace.symbol_to_dim)
            logits = logits.unsqueeze(-1).transpose(-1, _compat.enum_dim(enum_msg) - 1)
            while logits.dim() > 1 and logits.shape[0] == 1:
                logits = logits.squeeze(0)
            if self._coupled(symbol):
                before = self._total()
                self._gather(enum_msg, value)
                exact = self._total() - before  # log p(z_s | z_<s, x), the whole site
                parts = _Drawn(logits, value, torch.zeros(()), kind, fn.support)
                elements = parts.log_prob(value)
                mask = msg["mask"]
                keep = torch.ones_like(elements, dtype=torch.bool)
                if mask is not None and mask is not True:
                    m = torch.as_tensor(mask, dtype=torch.bool, device=elements.device)
                    while m.dim() > elements.dim() and m.shape[0] == 1:  # (as the logits)
                        m = m.squeeze(0)
                    keep = m.expand(elements.shape)
                if not bool(keep.any()):
                    keep = torch.ones_like(elements, dtype=torch.bool)
                extra = (exact - elements.sum()) / keep.sum() * keep
        msg["fn"] = _Drawn(logits, value, extra, kind, fn.support)
        # drawn, not enumerated: an outer enumerator must neither enumerate it nor track
        # its markov scope (which names observed sites this guide hides)
        drop = ("enumerate", *_compat.MARKOV_KEYS)
        msg["infer"] = {k: v for k, v in msg["infer"].items() if k not in drop}

    def _gather(self, enum_msg, value) -> None:
        symbol = _compat.enum_symbol(enum_msg)
        if symbol not in self.sum_dims:
            return
        if isinstance(enum_msg["fn"], dist.OneHotCategorical):
            value = value.argmax(-1)
        value = packed.pack(value.long(), _compat.dim_to_symbol(enum_msg))
        for terms in self.log_factors.values():
            for i, term in enumerate(terms):
                if symbol in _compat.pyro_dims(term):
                    terms[i] = packed.gather(term, value, symbol)
        self.sum_dims.remove(symbol)

    def _pyro_post_sample(self, msg):
        enum_msg = self.enum_trace.nodes.get(msg["name"])
        if enum_msg is not None and _compat.enum_symbol(enum_msg) is not None:
            self._gather(enum_msg, msg["value"])


class _OneHotAsIndex(Messenger):
    """Runs an enumerated ``OneHotCategorical`` site as a ``Categorical`` (Pyro's
    ``infer_discrete`` packs and gathers a site's value as an index, which a one-hot vector is
    not) and hands the model the one-hot vector of the drawn index. The traces record the
    index; ``sizes`` names the sites and their sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if (
            not msg["is_observed"]
            and isinstance(fn, dist.OneHotCategorical)
            and msg["infer"].get("enumerate") == "parallel"
        ):
            msg["fn"] = dist.Categorical(logits=fn.logits)
            self.sizes[msg["name"]] = fn.event_shape[-1]
            msg["_emvae_onehot_dtype"] = fn.probs.dtype

    def _pyro_post_sample(self, msg) -> None:
        k = self.sizes.get(msg["name"])
        if k is not None and "_emvae_onehot_dtype" in msg and msg["value"] is not None:
            value = torch.nn.functional.one_hot(msg["value"].long(), k)
            msg["value"] = value.to(msg["_emvae_onehot_dtype"])


class _Unrecycled(Messenger):
    """For :meth:`ExactEStep._check_dims`: gives every enumerated site a dim of its own (no
    ``pyro.markov`` recycling) and leaves an unused dim before each one (``gaps``: that dim's
    allocation id -> the site after it), so that a dim that moved (an enumerated value reduced
    over a dim) lands on no site's dim instead of on a neighbour's."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: dict[int, str] = {}

    def _pyro_sample(self, msg) -> None:
        infer = msg["infer"]
        if _compat.MARKOV_KEYS[0] in infer:
            drop = _compat.MARKOV_KEYS
            msg["infer"] = infer = {k: v for k, v in infer.items() if k not in drop}
        if not msg["is_observed"] and infer.get("enumerate") == "parallel" and not msg["done"]:
            _, id_ = _compat.ENUM_ALLOCATOR.allocate(None)
            self.gaps[id_] = msg["name"]


class _FirstPass(Messenger):
    """For :meth:`ExactEStep._first_trace`: the first E-step's enumerated pass run as ``fit``'s
    prior trace too. Installed between ``poutine.enum`` (``enum``) and the model, it

    * draws the model's one latent from its prior, as the prior trace drew it (Pyro's own
      sampling, ``fn(*args, **kwargs)``, then dropped), so that the RNG is left as the prior
      trace left it;
    * with ``depth`` None, sets the enumeration's first dim at the first enumerated site from
      the plates its sample sites met so far (the caller checks that no later site lies
      deeper: then the trace is the one ``poutine.enum(first_available_dim=-1 - depth)``
      makes, whose allocator nothing read before that site);
    * stops the pass (:class:`_Refused`, at the site that shows it) where it cannot stand for
      the prior trace: a second latent (its prior draw would read the first's drawn value), a
      latent that is not enumerated or that a handler gave a value, or an observed site that
      a ``poutine.condition`` holds (the prior trace marks those, see
      :class:`~pyro_emvae.validate.MarkConditioned`). (Stopped, not run to its end: a model
      with two latents, every pyro.markov chain, then costs no whole pass more than before.)"""

    def __init__(self, enum, depth: int | None) -> None:
        super().__init__()
        self.enum, self.depth = enum, depth
        self.deepest = 0  # the deepest vectorized plate dim of the sample sites so far (> 0)
        self.latents = 0

    def _pyro_sample(self, msg) -> None:
        if isinstance(msg["fn"], Subsample):
            return
        for f in msg["cond_indep_stack"]:
            if f.vectorized and -f.dim > self.deepest:
                self.deepest = -f.dim
        if msg["done"] or msg["is_observed"]:
            return
        enumerated = msg["infer"].get("enumerate") == "parallel"
        if enumerated and self.depth is None:  # (the site enum allocates a dim for first)
            self.depth = self.deepest
            self.enum.first_available_dim = -1 - self.depth
            _compat.ENUM_ALLOCATOR.set_first_available_dim(-1 - self.depth)
        self.latents += 1
        if msg["value"] is not None or self.latents > 1 or not enumerated:
            raise _Refused("a latent given a value, a second latent, or one not enumerated")
        msg["fn"](*msg["args"], **msg["kwargs"])  # (the prior trace's draw, see above)

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] and any(
            isinstance(f, ConditionMessenger) for f in _compat.handler_stack()
        ):
            raise _Refused("a site held by poutine.condition")


class _Refused(Exception):
    """:class:`_FirstPass` stops its pass: it cannot stand for fit's prior trace (not an
    error of the model's: none of the errors the model's own run is explained by)."""


@dataclass
class _FirstTrace:
    """A trace made by :meth:`ExactEStep._first_trace` for the guide's next E-step, with what
    it was made from: the E-step takes it instead of tracing only for the same model, depth,
    argument objects (same in-place versions) and param leaves (same in-place versions)."""

    trace: Any
    depth: int
    model: Any
    args: tuple
    versions: tuple
    params: tuple
    # the plate dims fit's checks (validate_fit_inputs) read once they passed on this trace
    # (its plate nesting), None before: the E-step does not run the same checks again
    checked: int | None = None

    @staticmethod
    def state(args: tuple, kwargs: dict) -> tuple[tuple, tuple, tuple]:
        objects = (*args, *(v for _, v in sorted(kwargs.items())))
        versions = (
            tuple(sorted(kwargs)),
            *(_compat.tensor_version(a) if isinstance(a, torch.Tensor) else None for a in objects),
        )
        # (the leaves themselves, held: compared by identity, then by version)
        leaves = tuple(
            (n, u, _compat.tensor_version(u)) for n, u in _params.unconstrained().items()
        )
        return objects, versions, leaves

    def matches(self, depth: int, model: Any, args: tuple, kwargs: dict) -> bool:
        if depth != self.depth or model is not self.model:
            return False
        objects, versions, leaves = self.state(args, kwargs)
        return (
            len(objects) == len(self.args)
            and all(a is b for a, b in zip(objects, self.args))
            and versions == self.versions
            and len(leaves) == len(self.params)
            and all(
                n == m and u is w and v == x for (n, u, v), (m, w, x) in zip(leaves, self.params)
            )
        )


def _copied(trace):
    """A copy of ``trace`` whose sites (and their ``infer`` dicts) are its own: what is written
    into it stays out of ``trace``."""
    out = poutine.Trace(graph_type="flat")
    for name, site in trace.nodes.items():
        node = dict(site)
        if node.get("infer") is not None:
            node["infer"] = dict(node["infer"])
        out.add_node(name, **node)
    return out


def _named_dims(shape, dim_to_symbol: dict) -> str | None:
    """The dims string ``pyro.ops.packed.pack`` gives a tensor of ``shape`` (its dims of size
    > 1, by symbol), or None where one has no symbol (where ``pack`` raises)."""
    n = len(shape)
    out = []
    for i, size in enumerate(shape):
        if size > 1:
            symbol = dim_to_symbol.get(i - n)
            if symbol is None:
                return None
            out.append(symbol)
    return "".join(out)


def _shape_reads(trace) -> tuple[dict[str, set[str]], dict[str, set[str]]] | None:
    """:func:`_reads` of the structure check's trace as :meth:`ExactEStep._long_reads` finds
    it, read from shapes alone and writing nothing, where every sample site (subsample sites
    aside) is of a family whose log-prob shape
    :func:`~pyro_emvae.kernels.fused_log_prob_shape` knows (the long way packs zeros of that
    shape, scaled and masked). Symbols as ``Trace.symbolize_dims`` gives them: plates even, in
    order of appearance; enumeration dims odd, by allocation id. None, for the long way to
    run (and raise, or stay silent, as it does), wherever the two could differ: another
    family, a site with args, a mask packed already, shapes that do not broadcast, or a dim
    of the log-prob, its mask or the scaled log-prob without a symbol (``pack`` raises).

    Example: a mixture's ``z`` (enumerated on its own dim, id 1) and ``x`` in one plate::

        reads == {"z": {"z"}, "x": {"z"}}, stray == {"z": set(), "x": set()}
    """
    plate_to_symbol: dict[str, str] = {}
    factors = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        infer = site["infer"]
        if infer is None or site["args"] or site["kwargs"]:
            return None
        shape = _kernels.fused_log_prob_shape(site["fn"], site["value"])
        if shape is None:
            return None
        dim_to_symbol: dict[int, str] = {}
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                if frame.dim is None:
                    return None
                symbol = plate_to_symbol.get(frame.name)
                if symbol is None:
                    symbol = opt_einsum.get_symbol(2 * len(plate_to_symbol))
                    plate_to_symbol[frame.name] = symbol
                dim_to_symbol[frame.dim] = symbol
        for dim, id_ in _compat.enum_dim_ids(site).items():
            dim_to_symbol[dim] = opt_einsum.get_symbol(1 + 2 * id_)
        enum_dim = _compat.enum_dim(site)
        if enum_dim is not None and enum_dim not in dim_to_symbol:
            return None
        mask, scale = site["mask"], site["scale"]
        shapes = [shape]
        if torch.is_tensor(mask):
            if _compat.pyro_dims(mask, _UNNAMED) is not _UNNAMED:  # (packed: pack asserts)
                return None
            shapes.append(mask.shape)
        if torch.is_tensor(scale):
            shapes.append(scale.shape)
        try:
            scaled = _compat.broadcast_shapes(*shapes)
        except RuntimeError:
            return None
        dims = _named_dims(shape, dim_to_symbol)
        mask_dims = _named_dims(mask.shape, dim_to_symbol) if torch.is_tensor(mask) else ""
        if dims is None or mask_dims is None or _named_dims(scaled, dim_to_symbol) is None:
            return None
        owner = dim_to_symbol[enum_dim] if enum_dim is not None else None
        factors.append((name, dims + "".join(d for d in mask_dims if d not in dims), owner))
    owners = {owner: name for name, _, owner in factors if owner is not None}
    plates = set(plate_to_symbol.values())
    reads, stray = {}, {}
    for name, dims, _ in factors:
        reads[name] = {owners[d] for d in dims if d in owners}
        stray[name] = {d for d in dims if d not in owners and d not in plates}
    return reads, stray


def _reads(tr) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each sample site's enumerated parents by name (from its factor's dims), and the dims
    of its factor that are neither a plate's nor an enumerated site's."""
    owner = {
        _compat.enum_symbol(s): n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and _compat.enum_symbol(s) is not None
    }
    plates = set(tr.plate_to_symbol.values())
    reads, stray = {}, {}
    for name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        dims = _site_dims(site)
        reads[name] = {owner[d] for d in dims if d in owner}
        stray[name] = {d for d in dims if d not in owner and d not in plates}
    return reads, stray


class _NoVectorize(Exception):
    pass


class _ExactView(Messenger):
    """The model as the exact E-step reads it: Pyro's ``TraceEnum_ELBO`` semantics for masks
    on enumerated sites, and ``obs_mask=``'s missing events summed out exactly.

    * A mask (``poutine.mask``) on an enumerated latent does not enter :math:`p(x)`: as in
      ``TraceEnum_ELBO``'s ``_compute_model_factors``, the latent's factor is its *unmasked*
      log-prob, and the masks act only on the sites that depend on it. A latent masked together
      with everything that depends on it then sums to one and its rows drop out exactly (not
      as a uniform sum, which would add :math:`\\log K` per row). The site's mask is removed
      here (so every trace of the E-step, its MAP and samples, and the M-step's plan read the
      latent's factor unmasked) and kept under ``site["_emvae_mask"]``: where the latent is
      masked and nothing unmasked depends on it, :class:`ExactEStep` gives its factor zero
      weight in the M-step (see :func:`_dropped_rows`).
    * ``pyro.sample(name, fn, obs=x, obs_mask=m)`` splits into an observed site
      ``name_observed`` (masked by ``m``) and a latent ``name_unobserved`` (masked by ``~m``)
      for the missing events. A discrete, enumerable ``name_unobserved`` stays a latent and is
      enumerated (Pyro passes no ``infer=`` on to it, so it is marked here): the missing labels
      of a semi-supervised model are summed over, whatever their fill values. Where ``m`` holds
      the returned value is the observed one, so the latent's factor there gets zero M-step
      weight (``site["_emvae_replaced"]``). Any other ``name_unobserved`` is integrated out:
      ``m`` masks whole events and an event's density integrates to one, so the missing events
      drop out of :math:`p(x)` exactly and the latent becomes a fully masked observed copy
      (zero log-density, zero weight in every M-step sum). Missing floating-point values
      (NaN, say) are replaced by zeros, so that ``0 * nan`` cannot reach the sums; exact when
      nothing downstream reads the returned value's missing events.

    With ``latent_masks=True`` the masks of enumerated latents are left as the model sets them
    (the guide's own run under SVI, whose model side applies them).
    """

    def __init__(self, latent_masks: bool = False) -> None:
        super().__init__()
        self._latent_masks = latent_masks
        self._filled: dict[str, torch.Tensor] = {}
        self._masks: dict[str, Any] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] and name.endswith("_observed") and torch.is_tensor(msg["mask"]):
            value = msg["value"]
            if torch.is_tensor(value) and value.is_floating_point():
                event = msg["fn"].event_dim
                mask = msg["mask"].reshape(msg["mask"].shape + (1,) * event)
                if not bool(torch.isfinite(value).all()):
                    value = torch.where(mask, value, value.new_zeros(()))
                    msg["value"] = value
            self._filled[name[: -len("_observed")]] = msg["value"]
            self._masks[name[: -len("_observed")]] = msg["mask"]
            return
        if msg["is_observed"]:
            # a chain or an implicit latent masked by .mask(m): as poutine.mask(mask=m) (the
            # same log-prob, where(m, lp, 0)), so that the E-step reads it as a chain (its
            # posterior, not an opaque observed factor) and the M-step gets its weights
            fn = msg["fn"]
            if isinstance(fn, MaskedDistribution):
                inner, masks = fn, []
                while isinstance(inner, MaskedDistribution):
                    masks.append(_compat.mask_of(inner))
                    inner = inner.base_dist
                if isinstance(inner, DiscreteHMM) or is_implicit(inner):
                    for m in masks:
                        msg["mask"] = m if msg["mask"] is None else msg["mask"] & m
                    msg["fn"] = inner
            return
        base = name[: -len("_unobserved")] if name.endswith("_unobserved") else None
        if base is not None and base in self._filled:
            value = self._filled.pop(base)
            replaced = self._masks.pop(base)
            if getattr(msg["fn"], "has_enumerate_support", False):
                if "enumerate" not in msg["infer"]:
                    msg["infer"] = {**msg["infer"], "enumerate": "parallel"}
                msg["_emvae_replaced"] = replaced
                # the missing events are summed over their values, which a normalized density
                # does (to one, where nothing reads them); a .mask() on the distribution would
                # turn a masked event's factor into a uniform sum (log K per event: a discrete
                # observation's log p(x) above 0). As for poutine.mask, the mask leaves it.
                while isinstance(msg["fn"], MaskedDistribution):
                    msg["fn"] = msg["fn"].base_dist
            else:
                msg["value"] = value
                msg["is_observed"] = True
                msg["mask"] = False
                return
        if not self._latent_masks and msg["infer"].get("enumerate") == "parallel":
            msg["_emvae_mask"] = msg["mask"]
            msg["mask"] = None


class _ExactViewModel:
    """``model`` run under :class:`_ExactView` (a class, so that it pickles)."""

    def __init__(self, model: Callable, latent_masks: bool = False) -> None:
        self.__wrapped__ = model
        self._latent_masks = latent_masks

    def __call__(self, *args, **kwargs):
        with _ExactView(self._latent_masks):
            return self.__wrapped__(*args, **kwargs)


class _ExactEnum(EnumMessenger):
    """``poutine.enum`` over a model run under :class:`_ExactView`, as one handler: each sample
    message goes through :class:`_ExactView`'s step then the enumeration's, in the order of
    the two handlers stacked (``enum(_ExactViewModel(model))``), with one messenger fewer
    on the stack (Pyro calls every messenger for every message: a few microseconds per
    model pass). A fresh view at every run, as :class:`_ExactViewModel` makes one."""

    def __init__(self, first_available_dim: int, latent_masks: bool = False) -> None:
        super().__init__(first_available_dim)
        self._latent_masks = latent_masks
        self._view: _ExactView | None = None  # (a fresh one per run: __enter__)

    def __enter__(self):
        self._view = _ExactView(self._latent_masks)
        return super().__enter__()

    def _pyro_sample(self, msg) -> None:
        self._view._pyro_sample(msg)
        super()._pyro_sample(msg)


def plate_nesting(trace) -> int:
    """How many plate dims a model uses (``max_plate_nesting``), from one trace of it: the
    deepest vectorized plate dim of its sample sites (0 without plates)."""
    tr = prune_subsample_sites(trace)
    dims = [
        f.dim
        for s in tr.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized
    ]
    return -min(dims) if dims else 0


class ExactEStep:
    """A Pyro guide whose distribution is the exact posterior :math:`p_\\theta(z \\mid x)` of every
    discrete site the model marks with ``infer={"enumerate": "parallel"}``.

    Calling it (as ``guide(*args)`` inside SVI) draws every enumerated site from its exact
    conditional :math:`q(z_s \\mid z_{<s}, x)`, so :math:`\\log p(x, z) - \\log q(z) = \\log p(x)`
    for every draw: any ELBO estimator with this guide returns the exact log-likelihood.
    The methods give the posterior in closed form: :meth:`posterior` (log p(x), marginals,
    pairwise marginals along chains, factor joints; one model pass and one backward pass),
    :meth:`sample` (exact joint draws) and :meth:`map` (joint MAP; Viterbi on chains).
    ``poutine.mask`` and ``obs_mask=`` are read as Pyro's ``TraceEnum_ELBO`` reads them: a masked
    latent keeps its prior, so rows masked together with their latents drop out exactly, and
    the missing entries of an enumerable ``obs_mask=`` site are summed over (see
    :class:`_ExactView`).

    Args:
        model: a Pyro model whose every latent site is discrete and enumerated in parallel
            (observed :class:`~pyro.distributions.DiscreteHMM` sites count as implicit chains,
            observed :class:`~pyro_emvae.distributions.ctc.CTC` sites as implicit alignments).
        max_plate_nesting: optional; guessed from one trace of the model if omitted.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(torch.tensor([-2.0, 2.0])[z], 1.0), obs=x)
        >>> post = ExactEStep(model).posterior(torch.tensor([-2.0, 0.0, 2.5]))
        >>> post.marginals["z"].shape
        torch.Size([3, 2])
    """

    # whether posterior may reuse what it kept of the data's values from the last call: only
    # between the E-steps of one fit's loop, which sets it (see posterior)
    _keep_data = False

    def __init__(self, model: Callable, *, max_plate_nesting: int | None = None) -> None:
        self.model = _ExactViewModel(model)  # masks as TraceEnum_ELBO reads them; obs_mask
        self.user_model = model
        self.max_plate_nesting = max_plate_nesting
        # which arguments the input checks (pyro_emvae.validate) have passed for
        self._validation = _validate.ValidationState()

    def forget_data(self) -> None:
        """Read the data's values afresh at the next call. What is kept of them (checked
        finite and in support, the Gaussian kernels' centred rows) is keyed on the tensors and
        their in-place versions, which a write through a numpy alias does not move: kept only
        between the E-steps of one fit's loop (which sets ``_keep_data``; ``fit`` calls this
        when it starts), forgotten at any other call; so is a first pass that ``fit`` kept for
        its first E-step and did not reach (a fit that failed after it)."""
        _kernels.forget_data()
        self._validation.forget_values()
        self.__dict__.pop("_first", None)

    def __getstate__(self) -> dict:  # (the cached handlers of _enum_trace are not state)
        state = dict(self.__dict__)
        state.pop("_tracer", None)
        state.pop("_probe", None)  # (a probe's trace for the next M-step: not state)
        state.pop("_first", None)  # (fit's first pass, for the next E-step: not state)
        state.pop("_steady", None)  # (the steady E-step's recipe: a cache)
        return state

    # ------------------------------------------------------------------ tracing
    def _plate_nesting(self, args: tuple, kwargs: dict) -> int:
        if self.max_plate_nesting is None:
            tracer = poutine.trace(self.model)
            # (a prior trace draws; a setup step leaves a seeded run's draws as they were)
            with (
                preserved_rng(),
                poutine.block(),
                torch.no_grad(),
                _validate.explain_model_errors(tracer),
            ):
                tr = tracer.get_trace(*args, **kwargs)
            self.max_plate_nesting = plate_nesting(tr)
        return self.max_plate_nesting

    def _first_trace(self, args: tuple, kwargs: dict):
        """The first E-step's model pass, run by ``fit`` before its first iteration so that
        the same pass serves as fit's prior trace (its input checks, the count of observed
        values, the params, ``max_plate_nesting``): one model pass per fit fewer. Returns
        ``(trace, depth)`` (the trace untouched: the E-step computes nothing on it until its
        next call) and keeps the trace for that call (:class:`_FirstTrace`: taken only for the
        same arguments and params), or None where the pass cannot stand for a prior trace
        (see :class:`_FirstPass`; the caller then undoes its draws and params and takes the
        separate passes). The pass is the E-step's own: parallel enumeration at ``depth`` (read
        from the plates met before the first enumerated site when ``max_plate_nesting`` is
        None, and checked against every site's after), under ``no_grad`` as the E-step runs
        it, with the enumeration budget watching; it draws the model's one latent as the
        prior trace did, so the RNG is left as that trace left it."""
        depth = self.max_plate_nesting
        enum = EnumMessenger(None if depth is None else -1 - depth)
        first = _FirstPass(enum, depth)
        tracer = poutine.trace(enum(first(self.model)), graph_type="flat")
        try:
            with torch.no_grad(), _validate.explain_model_errors(tracer, depth, budget=True):
                tr = tracer.get_trace(*args, **kwargs)
        except _Refused:
            return None
        found = plate_nesting(tr)
        if first.depth is None:  # (nothing enumerated: any depth gives this trace)
            first.depth = found if depth is None else depth
        elif depth is None and found != first.depth:
            return None  # (a plate deeper than the enumeration's dims: they would overlap)
        self._first = _FirstTrace(tr, first.depth, self.model, *_FirstTrace.state(args, kwargs))
        return tr, first.depth

    def _enum_trace(
        self, args: tuple, kwargs: dict, replay: Any = None, potentials=None, lean: bool = False
    ):
        """Trace the model with every annotated discrete site enumerated, validate the sites,
        and compute and pack their log-probs. ``potentials(name, site)``, if given, may return
        a tensor that replaces an observed site's log-likelihood (for a DiscreteHMM site, its
        per-step emission log-likelihoods ``(*batch, T, K)``): used by initializations.
        ``lean`` (:meth:`posterior`'s call): at arguments validated before, the steady recipe
        of a mixture (:class:`_SteadyMixture`) may take the trace and return its
        :class:`Posterior` instead."""
        depth = self._plate_nesting(args, kwargs)
        # fit's first pass (_first_trace), made for this call: the pass this call would make
        first = self.__dict__.pop("_first", None)
        if (
            first is not None
            and replay is None
            and potentials is None
            and not torch.is_grad_enabled()
            and first.matches(depth, self.model, args, kwargs)
        ):
            arg_key = self._validation.key(args, kwargs)
            tr = first.trace
            prechecked = first.checked  # (fit's checks of this very trace)
        else:
            arg_key, tr = self._traced(args, kwargs, depth, replay)
            prechecked = None
        subsample_sites = {
            n: s
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and isinstance(s["fn"], Subsample)
        }
        # (prune_subsample_sites, without its copy: this trace is the E-step's own)
        for name in subsample_sites:
            tr.remove_node(name)
        tr._subsample_sites = subsample_sites
        # input checks, before any log-prob: once per set of arguments (see validate.py)
        checked = _validate.validate_estep_trace(
            self._validation, self.model, args, kwargs, tr, depth, key=arg_key,
            prechecked=prechecked,
        )  # fmt: skip
        steady = getattr(self, "_steady", None) if lean else None
        if steady is not None and checked is None and potentials is None and replay is None:
            post = steady(tr, depth)
            if post is not None:
                return post
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                override = potentials(name, site) if potentials is not None else None
                if override is None and type(site["fn"]) in _PLAIN_GAUSSIAN:
                    _fused_log_prob(name, site)  # (no implicit latent, no chain: not asked)
                    continue
                if is_implicit(site["fn"]):  # a PCFG, a CTC: one leaf, its gradient the posterior
                    _implicit_log_prob(site, override)
                elif isinstance(site["fn"], HomogeneousHMM):
                    # one (K, K) transition: the chain's own forward-backward, whose
                    # gradients are Baum-Welch's sums (no (T, K, K) tensor anywhere)
                    parts = _chain_parts(site["fn"], site["value"], override, site["mask"])
                    parts = ChainParts(
                        *(t if t.requires_grad else t.detach().requires_grad_() for t in parts)
                    )
                    with torch.enable_grad():
                        lp = chain_log_z(*parts)
                        scaled = scale_and_mask(lp, site["scale"], site["mask"])
                    site["_hmm"] = parts
                    site["unscaled_log_prob"] = lp
                    site["log_prob"] = scaled
                    site["log_prob_sum"] = site["log_prob"].sum()
                elif isinstance(site["fn"], DiscreteHMM):
                    init, m = _hmm_parts(site["fn"], site["value"], override, site["mask"])
                    if not m.requires_grad:  # a leaf, so that its gradient can be asked for
                        m = m.detach().requires_grad_()
                    with torch.enable_grad():  # (a scaled chain too: subsampled, online EM)
                        lp = _hmm_log_prob(init, m)
                        scaled = scale_and_mask(lp, site["scale"], site["mask"])
                    site["_hmm"] = (init, m)
                    site["unscaled_log_prob"] = lp
                    site["log_prob"] = scaled
                    site["log_prob_sum"] = site["log_prob"].sum()
                elif override is not None:
                    lp = override.expand(site["fn"].log_prob(site["value"]).shape)
                    site["unscaled_log_prob"] = lp
                    site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
                    site["log_prob_sum"] = site["log_prob"].sum()
                else:
                    _fused_log_prob(name, site)
                continue
            if not _validate.is_enumerated(site):
                raise EnumerationError(_not_enumerable_message(name, site))
            # a mixture's weights broadcast along the plate: the log-probs of the K values
            # without the (K, N, K) broadcast (kernels.categorical_log_prob)
            _fused_log_prob(name, site)
        tr.compute_log_prob()
        if is_validation_enabled():
            for site in tr.nodes.values():
                if site["type"] == "sample":
                    _check_site_shape(site, depth)
        if checked is not None:
            _validate.check_precision(tr, depth)
        _pack_tensors(tr)
        if checked is not None:
            if not self._validation.same_shapes(checked[1]):  # (structure follows shapes)
                self._check_dims(tr, args, kwargs, depth)
            self._validation.remember(*checked)
        return tr

    def _traced(self, args: tuple, kwargs: dict, depth: int, replay: Any):
        """The E-step's model pass: ``(the arguments' key, the enumerated trace)``."""
        # the handlers (enum, trace) of the last call without replay, reused: they start
        # afresh at each run (a new Trace, new enumeration dims), and making them costs more
        # than the E-step's own arithmetic on small data. Taken out while they run (a model
        # that asks its own guide for a posterior gets handlers of its own).
        cached = getattr(self, "_tracer", None)
        if replay is None and cached is not None and cached[:2] == (depth, self.model):
            tracer = cached[2]
            self._tracer = None
        elif replay is None and type(self.model) is _ExactViewModel:
            # (enum and _ExactView as one handler: see _ExactEnum)
            enum = _ExactEnum(-1 - depth, self.model._latent_masks)
            tracer = poutine.trace(enum(self.model.__wrapped__), graph_type="flat")
        else:
            model = poutine.enum(self.model, first_available_dim=-1 - depth)
            if replay is not None:
                model = poutine.replay(model, trace=replay)
            tracer = poutine.trace(model, graph_type="flat")
        # (the enumeration's sizes follow the arguments' shapes: watched once per set of shapes,
        # not at every minibatch of a stream)
        # (the arguments' key, read once, before the model runs: a model that changes its
        # arguments in place has them checked again at the next call, as it had before)
        arg_key = self._validation.key(args, kwargs)
        fresh = not self._validation.same_shapes(arg_key[1])
        with _validate.explain_model_errors(tracer, depth, budget=fresh):
            tr = tracer.get_trace(*args, **kwargs)
        if replay is None:
            self._tracer = (depth, self.model, tracer)
        return arg_key, tr

    def _check_dims(self, tr, args, kwargs, depth: int) -> None:
        """Refuse a model whose factor graph under enumeration is not the one it describes,
        where Pyro's ``TraceEnum_ELBO`` returns a wrong number without a word: the model is
        traced once more with every enumerated site on a dim of its own and an unused dim
        before each, and every site must read the same enumerated sites as in ``tr``.

        * A site whose factor carries an unused dim computed its parameters by reducing over
          a dim of an enumerated value (``y ~ Bernoulli(x.float().mean(-1))`` with ``x``
          enumerated inside a plate: the reduction runs over the plate's size-1 dim and moves
          ``x``'s enumeration dim onto another site's).
        * A site that reads other sites than with recycled dims was given a dim that a
          ``pyro.markov`` window recycled while it was still read (``keep=True`` grids).

        Models with too many enumerated sites for one dim each are not checked.
        """
        enumerated = [
            n for n, s in tr.nodes.items() if s["type"] == "sample" and _validate.is_enumerated(s)
        ]
        if not enumerated or depth + 2 * len(enumerated) + 1 > 56:
            return
        spread = _Unrecycled()
        model = poutine.enum(spread(self.model), first_available_dim=-1 - depth)
        sub = poutine.Trace()
        for name, site in tr._subsample_sites.items():
            sub.add_node(name, **site)
        self._probe = None
        try:
            # (validation off, as in the plan's probe: the E-step's own pass validated these
            # params and values just now; this pass reads dims only, and what validation would
            # raise here is swallowed below anyway)
            with pyro.validation_enabled(False), torch.no_grad(), poutine.block():
                check = self._shared_probe(tr, spread, sub, args, kwargs, depth)
                shared = check is not None
                if check is None:
                    check = poutine.trace(poutine.replay(model, trace=sub)).get_trace(
                        *args, **kwargs
                    )
                # (each factor's dims from the shapes alone, where every site's is known so:
                # the trace is read, not written, so a shared probe's needs no copy)
                found = _shape_reads(check)
                if found is None and shared:
                    # (the probe's copy, this check's own: the check's log-probs stay out of
                    # the probe's trace; pruned in place, not copied again)
                    check = _copied(check)
                    for name, site in list(check.nodes.items()):
                        if site_is_subsample(site):
                            check.remove_node(name)
                elif found is None:
                    check = prune_subsample_sites(check)
                if found is None:
                    found = self._long_reads(check)
        # the model ran once with its own dims; extra ones may upset it (then nothing is said)
        except (ValueError, RuntimeError, IndexError, TypeError, AssertionError):
            return
        want, _ = _reads(tr)
        got, stray = found
        gap = {opt_einsum.get_symbol(1 + 2 * i): n for i, n in spread.gaps.items()}
        for name in want:
            moved = sorted(gap[d] for d in stray.get(name, ()) if d in gap)
            if moved:
                raise EnumerationError(
                    f"site '{name}' reads an enumerated value through a reduction over one of "
                    f"its dims (the values of {', '.join(repr(m) for m in moved)} or what is "
                    "computed from them, e.g. x.float().mean(-1) of a site enumerated inside a "
                    "plate): under enumeration that dim has size 1, so the reduction moves the "
                    "enumeration dim onto another site's and the factor graph is wrong (Pyro's "
                    "TraceEnum_ELBO returns a wrong log p(x) here). Sample the site that reads "
                    "the reduction inside the plate, or make the plate sequential "
                    "(for i in pyro.plate(...)) and combine the per-element values explicitly."
                )
            if name in got and got[name] != want[name]:
                fmt = ", ".join(f"'{n}'" for n in sorted(got[name])) or "none"
                was = ", ".join(f"'{n}'" for n in sorted(want[name])) or "none"
                raise EnumerationError(
                    f"site '{name}' reads the enumerated sites {fmt}, but with pyro.markov's "
                    f"recycled dims its factor reads {was}: a dim was recycled while a later "
                    "site still read it (a pyro.markov(..., keep=True) loop reused across "
                    "another markov loop, as in a 2-D grid, or a site that reads outside its "
                    "markov window), so the factor graph is not the model's (Pyro's "
                    "TraceEnum_ELBO returns a wrong log p(x) here). Use pyro.markov without "
                    "keep=True, or widen the window (pyro.markov(history=k)) to cover every "
                    "site that is read."
                )

    @staticmethod
    def _long_reads(check) -> tuple[dict, dict]:
        """:func:`_reads` of the structure check's trace (pruned of subsample sites, its own to
        write) with its log-probs computed and packed: the way for any trace, where
        :func:`_shape_reads` reads the same from shapes for the families it knows."""
        for site in check.nodes.values():
            if site["type"] != "sample" or site["args"] or site["kwargs"]:
                continue
            # only the dims a factor spans are read: where its shape is known without computing
            # it, a zero of that shape stands in for it (pack_tensors reads the same dims; the
            # values never were read)
            shape = _kernels.fused_log_prob_shape(site["fn"], site["value"])
            if shape is not None:
                lp = torch.zeros((), device=site["value"].device).expand(shape)
                site["unscaled_log_prob"] = lp
                site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
        check.compute_log_prob()  # (the other families, DiscreteHMM, implicit latents)
        check.pack_tensors()
        return _reads(check)

    def _shared_probe(self, tr, spread, sub, args, kwargs, depth: int):
        """This structure check's pass, run as the M-step's provenance probe too (one model
        pass instead of two, :func:`pyro_emvae.track.probe`: params as tracked values), when
        a closed-form M-step will ask for it (``self.share_probe``, set by ``fit`` for an
        :class:`~pyro_emvae.optim.EMOptim`) and the two layouts differ only by the unused
        dims: no ``pyro.markov`` site (whose dims the check does not recycle) and no chain
        or implicit latent (whose M-step weights are not unpacked by dim). The probe's trace
        is kept in ``self._probe`` with what :meth:`EMOptim.plan
        <pyro_emvae.optim.EMOptim.plan>` checks it against (the arguments and params it
        saw) and where its enumerated dims lie (E-step dim -> probe dim); returns the trace
        for the check (its sites copied: the check's log-probs stay out of the probe's
        trace), or None to run the check's own pass. A pass that fails under tracking is
        run again untracked, so the check says what it said before."""
        if not getattr(self, "share_probe", False):
            return None
        for site in tr.nodes.values():
            if site["type"] != "sample":
                continue
            if _compat.MARKOV_KEYS[0] in site["infer"] or _compat.markov_depth(site) is not None:
                return None
            fn = site["fn"]
            if isinstance(fn, DiscreteHMM) or is_implicit(fn) or "_hmm" in site:
                return None
        from pyro_emvae import track as _track  # (the probe's module: a leaf, no cycle)
        from pyro_emvae.plan import PlanKey

        try:
            # (_check_dims runs this with validation off, under no_grad and poutine.block)
            probed, space = _track.probe(
                spread(self.model), args, kwargs, depth, replay=sub, guarded=True
            )
        except (ValueError, RuntimeError, IndexError, TypeError, AssertionError):
            spread.gaps.clear()  # (the untracked pass allocates its own)
            return None
        dims = {}
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and _validate.is_enumerated(site):
                other = probed.nodes.get(name)
                if other is None or not _validate.is_enumerated(other):
                    spread.gaps.clear()  # (the check's own pass allocates its own)
                    return None
                dims[_compat.enum_dim(site)] = _compat.enum_dim(other)
        self._probe = (probed, space, dims, PlanKey(args, kwargs))
        return probed

    def _contract(
        self,
        tr,
        extra_inputs: list[torch.Tensor] | None = None,
        grads: bool = True,
        grad_mode: bool = False,
    ):
        """Sum-product over the trace's factors.

        Returns ``(log p(x), [(site, factor tensor)], d log p / d factor, d log p / d extra,
        common scale)``; with ``grads=False`` only the first entry is meaningful. The trace's
        log-probs are read once: a fused kernel's factor may hold the posterior afterwards
        (see :func:`_one_latent`). ``grad_mode``: the generic contraction runs under
        ``torch.enable_grad()`` (the posterior is a gradient, even under no_grad), switched
        only where it is off.
        """
        if grad_mode and not torch.is_grad_enabled():
            with torch.enable_grad():
                return self._contract(tr, extra_inputs, grads)
        sum_dims = {
            _compat.enum_symbol(s)
            for s in tr.nodes.values()
            if s["type"] == "sample" and _validate.is_enumerated(s)
        }
        factors: OrderedDict = OrderedDict()
        inputs: list[tuple[str, torch.Tensor]] = []
        scales = []
        scratch: set[int] = set()  # factors made by a fused kernel for this E-step only
        log_z = None  # (the sum of the factors outside the enumeration, if any)
        slots = []  # (position in inputs, ordinal, position in factors[ordinal]) of each factor
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            if sum_dims.isdisjoint(_site_dims(site)):
                if log_z is None:
                    log_z = torch.zeros(())
                if _potential(site) is not None:
                    # the unpacked log-prob: packing ran under no_grad and cut the graph to M
                    log_z = log_z + site["log_prob"].sum()
                    if isinstance(site.get("_hmm"), ChainParts):
                        inputs.extend((name, t) for t in site["_hmm"])  # (in _fill's order)
                    else:
                        inputs.append((name, _potential(site)))
                else:
                    log_z = log_z + site["packed"]["log_prob"].sum()
                continue
            if _potential(site) is not None:
                raise EnumerationError(
                    f"site '{name}': a {type(site['fn']).__name__} whose parameters depend on an enumerated "
                    "site is not supported; enumerate inside the chain or lift the choice out."
                )
            # the mask goes inside the sum over z, the (common) scale outside, as in Pyro
            lp = _factor(site)
            scales.append((name, site["scale"]))
            if site.get("_emvae_scratch") == lp.untyped_storage().data_ptr():
                scratch.add(id(lp))
            ordinal = find_ordinal(tr, site)
            factors.setdefault(ordinal, []).append(lp)
            slots.append((len(inputs), ordinal, len(factors[ordinal]) - 1))
            inputs.append((name, lp))
        scale = 1.0
        if factors:
            scale = _common_scale(tr, scales)
            # (no autograd there: the factors as they are)
            one = _one_latent(factors, sum_dims, inputs, extra_inputs, frozenset(scratch))
            if one is not None:
                part, qs = one
                out = tuple(q * scale if scale != 1 else q for q in qs) if grads else ()
                if log_z is None and scale == 1:  # (0 + part: part is never -0.0)
                    return part, inputs, out, (), float(scale)
                if log_z is None:
                    log_z = torch.zeros(())
                return log_z + scale * part, inputs, out, (), float(scale)
            if grads:  # each factor a leaf of its own, whose gradient is the posterior
                for i, ordinal, j in slots:
                    name, lp = inputs[i]
                    if not lp.requires_grad:
                        leaf = _named(lp.detach().requires_grad_(), _compat.pyro_dims(lp))
                        inputs[i] = (name, leaf)
                        factors[ordinal][j] = leaf
        return self._generic(tr, log_z, factors, sum_dims, scale, inputs, extra_inputs, grads)

    def _generic(self, tr, log_z, factors, sum_dims, scale, inputs, extra_inputs, grads):
        """:meth:`_contract` by Pyro's contraction and autograd's backward pass."""
        if log_z is None:
            log_z = torch.zeros(())
        if factors:
            try:
                log_z = log_z + scale * contract_to_tensor(
                    factors, sum_dims, target_ordinal=frozenset()
                )
            except NotImplementedError as e:
                if _is_tree_error(e):
                    raise _tree_error(tr, e) from e
                raise
        wanted = [t for _, t in inputs] + list(extra_inputs or [])
        out: tuple = ()
        if grads and wanted:
            if log_z.requires_grad:
                with torch.enable_grad():
                    out = torch.autograd.grad(log_z, wanted, allow_unused=True)
            else:  # (every factor masked out, poutine.mask(mask=False): none reaches log p)
                out = (None,) * len(wanted)
        return log_z, inputs, out[: len(inputs)], out[len(inputs) :], float(scale)

    # ------------------------------------------------------------------ the posterior
    def posterior(
        self, *args: Any, param_grads: bool = False, potentials=None, **kwargs: Any
    ) -> Posterior:
        """Exact posterior at the current params: one model pass and one backward pass.

        With ``param_grads=True`` the same backward pass also returns the gradient of
        :math:`\\log p_\\theta(x)` with respect to each param's unconstrained value (keys are
        param names), which equals the gradient of :math:`\\mathbb{E}_q[\\log p_\\theta(x,z)]`
        at this q. ``potentials`` replaces observed sites' log-likelihoods (see ``_enum_trace``);
        the initializations of :func:`~pyro_emvae.fit.fit` use it.
        """
        if not self._keep_data:
            self.forget_data()
        if param_grads:
            with poutine.trace(param_only=True) as pcap:
                tr = self._enum_trace(args, kwargs, potentials=potentials)
            params = {
                n: s["value"].unconstrained()
                for n, s in pcap.trace.nodes.items()
                if s["type"] == "param"
            }
            with torch.enable_grad():  # the posterior is a gradient, even under no_grad
                log_z, inputs, grads, pgrads, scale = self._contract(tr, list(params.values()))
        else:
            with torch.no_grad():
                tr = self._enum_trace(args, kwargs, potentials=potentials, lean=True)
            if isinstance(tr, Posterior):  # (the steady recipe took the trace)
                return tr
            lean = _lean_posterior(tr)
            if potentials is None:  # (the recipe for the next E-steps, or none)
                # (only where the next E-steps may take it: between the E-steps of a fit's
                # loop, which keep the arguments' checks; a direct call checks them again)
                keep = lean is not None and self._keep_data
                self._steady = _SteadyMixture.of(tr, self.max_plate_nesting) if keep else None
            if lean is not None:
                return lean
            # (the posterior is a gradient, even under no_grad: see grad_mode)
            log_z, inputs, grads, pgrads, scale = self._contract(tr, grad_mode=True)
        log_z = log_z.detach() if log_z.requires_grad else log_z
        post = _bare_posterior(log_z, scale, tr.symbol_to_dim, tr._subsample_sites)
        if param_grads:
            post.param_grads = {
                n: (g if g is not None else torch.zeros_like(p))
                for (n, p), g in zip(params.items(), pgrads)
            }
        self._fill(post, tr, inputs, grads, scale)
        return post

    def _fill(self, post: Posterior, tr, inputs, grads, scale: float) -> None:
        symbol_to_name = {
            _compat.enum_symbol(s): n
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and _validate.is_enumerated(s)
        }
        order = {n: i for i, n in enumerate(tr.nodes)}
        dropped = _dropped_rows(tr)
        arranged: dict[tuple, torch.Tensor] = {}
        chains: dict[str, list] = {}
        for (name, t), g in zip(inputs, grads):
            site = tr.nodes[name]
            if g is None:
                g = torch.zeros_like(t)
            if isinstance(site.get("_hmm"), ChainParts):
                got = chains.setdefault(name, [])
                got.append(g)
                if len(got) == len(ChainParts._fields):
                    self._fill_chain(post, name, site, ChainPosterior(*got))
                continue
            if "_implicit" in site:  # (counts, occupancies: zero on a masked row)
                post.factor_q[name] = g / site["scale"] if site["scale"] != 1 else g
                post.marginals[name] = site["fn"].implicit_marginals(
                    post.factor_q[name], site["_implicit"][1]
                )
                continue
            if "_hmm" in site:
                pair = g / site["scale"] if site["scale"] != 1 else g
                # the M-step's weight: zero on a masked sequence (the mask cuts its gradient)
                post.factor_q[name] = pair
                mask = site["mask"]
                if mask is not None and mask is not True:
                    # a masked sequence is not observed: its chain's posterior is the prior
                    # chain's (``_hmm_parts`` dropped its emissions from M)
                    prior = self._hmm_pairwise(*site["_hmm"])
                    keep = torch.as_tensor(mask, dtype=torch.bool, device=pair.device)
                    pair = torch.where(keep.reshape(keep.shape + (1, 1, 1)), pair, prior)
                post.pairwise[(name, name)] = pair
                post.marginals[name] = pair.sum(-2)
                continue
            q = g / scale if scale != 1 else g  # (no copy of a (K, N) factor)
            _compat.set_pyro_dims(q, _compat.pyro_dims(t))
            # the M-step's weight: none where a masked latent drops out of p(x)
            post.factor_q[name] = _weigh(q, dropped[name]) if name in dropped else q
            plate_dims, plate_shape = _plate_layout(site["cond_indep_stack"], tr.plate_to_symbol)
            enum_syms = sorted(
                (d for d in _compat.pyro_dims(t) if d in symbol_to_name),
                key=lambda d: order[symbol_to_name[d]],
            )
            names = tuple(symbol_to_name[d] for d in enum_syms)
            sizes = tuple(t.shape[_compat.pyro_dims(t).index(d)] for d in enum_syms)
            # sites whose factors share one posterior tensor (a mixture's latent and its
            # observation: one (K, N) buffer, see _one_latent) share its arrangement too
            key = (id(q), tuple(plate_dims + enum_syms), plate_shape + sizes)
            joint = arranged.get(key)
            if joint is None:
                joint = arranged[key] = _arrange(q, plate_dims + enum_syms, plate_shape + sizes)
            post.joints[name] = (names, joint)
            own = _compat.enum_symbol(site)
            if _validate.is_enumerated(site) and own in enum_syms:
                k = len(enum_syms)
                i = enum_syms.index(own)
                other = tuple(len(plate_dims) + j for j in range(k) if j != i)
                post.marginals[name] = joint.sum(other) if other else joint
                if k == 2:
                    post.pairwise[(names[1 - i], name)] = (
                        joint if i == 1 else joint.transpose(-1, -2)
                    )
        for name, site in tr.nodes.items():
            if (
                site["type"] == "sample"
                and _validate.is_enumerated(site)
                and name not in post.marginals
            ):
                # a site with one value: packing squeezed its dim, so no factor carries it
                _, plate_shape = _plate_layout(site["cond_indep_stack"])
                post.marginals[name] = torch.ones(plate_shape + (1,))

    @staticmethod
    def _fill_chain(post: Posterior, name: str, site, q: ChainPosterior) -> None:
        """A homogeneous chain's posterior: Baum-Welch's sums as the M-step's weight (zero on a
        sequence the mask drops), ``gamma`` as the marginals (the prior chain's where masked),
        the pairwise marginals on demand."""
        if site["scale"] != 1:
            q = q.scaled(1.0 / site["scale"])
        post.factor_q[name] = q
        parts = site["_hmm"]
        gamma = q.gamma
        mask = site["mask"]
        if mask is not None and mask is not True:
            # a masked sequence is not observed: its chain's posterior is the prior chain's
            # (``_chain_parts`` dropped its emissions)
            prior = chain_posterior(parts).gamma
            keep = torch.as_tensor(mask, dtype=torch.bool, device=gamma.device)
            gamma = torch.where(keep.reshape(keep.shape + (1, 1)), gamma, prior)
        post.marginals[name] = gamma
        if not isinstance(post.pairwise, _LazyPairs):
            lazy = _LazyPairs()
            lazy.update(post.pairwise)
            post.pairwise = lazy
        # (the dense chain's pairwise marginals: the posterior, the prior where masked)
        post.pairwise.defer((name, name), lambda: hmm_pairwise(*_dense_parts(parts)))

    def expected_log_joint(self, posterior: Posterior, *args: Any, **kwargs: Any) -> torch.Tensor:
        """:math:`\\mathbb{E}_q[\\log p_\\theta(x, z)]` at the current params with ``q`` held at
        ``posterior`` (computed at earlier params): the M-step objective, differentiable in the
        params. The model is replayed on the E-step's minibatch.

        At the params where ``posterior`` was computed its gradient equals that of
        :math:`\\log p_\\theta(x)` (Fisher's identity) and its value is
        :math:`\\log p_\\theta(x) - H(q)` (the ELBO's first term; the
        ELBO itself adds :math:`H(q)` back).
        """
        tr = self._enum_trace(args, kwargs, replay=posterior.subsample)
        total = torch.zeros(())
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            q = posterior.factor_q.get(name)
            if "_implicit" in site:  # E_q[log p(x, t)]: log p(x, t) is linear in the leaf
                total = total + site["scale"] * (q * site["_implicit"][0]).sum()
            elif isinstance(site.get("_hmm"), ChainParts):
                pot = sum(
                    (w * p).flatten(start_dim=p.dim() - (1 if f == "init" else 2)).sum(-1)
                    for f, w, p in zip(ChainParts._fields, q, site["_hmm"])
                )
                total = total + scale_and_mask(pot, site["scale"], site["mask"]).sum()
            elif "_hmm" in site:
                init, m = site["_hmm"]
                pot = (q * m).flatten(-3).sum(-1) + (q[..., 0, :, :].sum(-1) * init).sum(-1)
                total = total + scale_and_mask(pot, site["scale"], site["mask"]).sum()
            elif q is None:
                total = total + site["packed"]["log_prob"].sum()
            else:
                lp = _factor(site)
                if _compat.pyro_dims(lp) != _compat.pyro_dims(q):
                    raise RuntimeError(
                        f"site '{name}' changed its enumerated dims between the E-step and the "
                        f"M-step ({_compat.pyro_dims(q)!r} -> {_compat.pyro_dims(lp)!r}); the model's structure "
                        "must not depend on its params."
                    )
                total = total + posterior.scale * (q * lp).sum()
        return total

    # ------------------------------------------------------------------ conveniences
    def log_likelihood(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Exact :math:`\\log p_\\theta(x)` (0-dim tensor, total over the data)."""
        with torch.no_grad():
            tr = self._enum_trace(args, kwargs)
            return self._contract(tr, grads=False)[0]

    def marginals(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Posterior marginals ``{site: (*batch, K)}``; see :class:`Posterior`."""
        return self.posterior(*args, **kwargs).marginals

    def pairwise_marginals(self, *args: Any, **kwargs: Any) -> dict[tuple[str, str], torch.Tensor]:
        """Pairwise posterior marginals ``{(parent, child): (*batch, K_parent, K_child)}``."""
        return self.posterior(*args, **kwargs).pairwise

    def _subsample(self, args, kwargs) -> poutine.Trace:
        """The minibatch of every subsampled plate, drawn once (a plain trace of the model):
        replayed by every internal pass of one call, as ``infer_discrete`` replays its own."""
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(self.model).get_trace(*args, **kwargs)
        sub = poutine.Trace()
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and isinstance(site["fn"], Subsample):
                sub.add_node(name, **site)
        return sub

    def _discrete(
        self,
        args,
        kwargs,
        temperature: int,
        num_samples: int | None = None,
        shapes=None,
        subsample: poutine.Trace | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """One pass of Pyro's ``infer_discrete`` (MAP at temperature 0, an exact joint draw at
        temperature 1; ``num_samples`` draws at once under a particle plate) on the minibatch
        ``subsample`` (drawn here if not given). Returns the values of the enumerated sites and
        the potentials ``(init, M)`` of DiscreteHMM chains."""
        depth = self._plate_nesting(args, kwargs)
        if subsample is None:
            subsample = self._subsample(args, kwargs)
        # infer_discrete runs the model twice (enumerated, then sampled): both passes, and the
        # shapes' trace, must see the same minibatch (a sequential subsampled plate names its
        # sites by index: another minibatch is a KeyError, a vectorized one the wrong rows)
        onehot = _OneHotAsIndex()
        base = poutine.replay(onehot(self.model), trace=subsample)
        model, first = base, -1 - depth
        if num_samples is not None:

            def model(*a, **k):
                with pyro.plate("_num_samples", num_samples, dim=-1 - depth):
                    return base(*a, **k)

            first -= 1
        with torch.no_grad(), poutine.block(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "infer_discrete found no sample sites")
            fn = infer_discrete(model, first_available_dim=first, temperature=temperature)
            try:
                tr = poutine.trace(fn).get_trace(*args, **kwargs)
            except NotImplementedError as e:
                if _is_tree_error(e):
                    raise _tree_error(self._enum_trace(args, kwargs), e) from e
                raise
        if shapes is None:  # each latent site's own shape (infer_discrete squeezes size-1 dims)
            shapes = self._latent_shapes(args, kwargs, subsample)
        values, chains = {}, {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"] and is_implicit(site["fn"]):
                if num_samples is None:
                    chains[name] = (site["fn"], site["value"])
            elif site["is_observed"] and isinstance(site["fn"], DiscreteHMM):
                if num_samples is None:
                    chains[name] = _hmm_parts(site["fn"], site["value"], mask=site["mask"])
            elif site["is_observed"] or isinstance(site["fn"], Subsample):
                continue
            elif site["infer"].get("enumerate") != "parallel":
                raise EnumerationError(_not_enumerable_message(name, site))
            else:
                # infer_discrete squeezes leading size-1 dims: restore the site's own shape
                lead = () if num_samples is None else (num_samples,)
                v, shape = site["value"], lead + shapes[name]
                if name in onehot.sizes:  # the trace holds the index: the model saw one-hot
                    v = torch.nn.functional.one_hot(v.long(), onehot.sizes[name])
                    v = v.to(site["_emvae_onehot_dtype"])
                # (a site with one value comes back unbatched: it holds everywhere)
                if v.numel() != shape.numel():
                    while v.dim() > len(shape) and v.shape[0] == 1:
                        v = v.squeeze(0)
                    values[name] = v.expand(shape)
                else:
                    values[name] = v.reshape(shape)
        return values, chains

    def _latent_shapes(self, args, kwargs, subsample=None) -> dict[str, torch.Size]:
        """Each latent site's shape under its plates, from one plain (prior) trace."""
        model = self.model if subsample is None else poutine.replay(self.model, trace=subsample)
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(model).get_trace(*args, **kwargs)
        return {
            n: s["value"].shape
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"]
        }

    def map(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Joint MAP assignment :math:`\\arg\\max_z p(z \\mid x)` of every enumerated site
        (Viterbi on chains), ``{site: (*batch,)}``; ``(*batch, T)`` for a DiscreteHMM site (its
        states) and for a CTC site (its best alignment's per-frame labels); ``(B, L, L)`` trees
        for a PCFG site (``tree[b, i, j]`` the symbol over words ``i..j``)."""
        values, chains = self._discrete(args, kwargs, temperature=0)  # one minibatch
        for name, (init, m) in chains.items():
            if is_implicit(init):  # (init is the distribution, m its value)
                values[name] = init.implicit_map(m)
            else:
                values[name] = _hmm_map(init, m)
        return values

    def sample(
        self, *args: Any, num_samples: int = 1, vectorize: bool = True, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Exact joint draws from :math:`p(z \\mid x)`: ``{site: (num_samples, *batch)}``, by
        forward-filter backward-sample (Pyro's ``infer_discrete``).

        All draws come from one model pass under a particle plate; a model that cannot run
        with that extra batch dim (``vectorize=False``, or on failure, with a warning) is run
        once per draw. DiscreteHMM chains are sampled from their pairwise marginals in one pass.
        """
        sub = self._subsample(args, kwargs)  # one minibatch for every pass of this call
        values, chains = self._discrete(args, kwargs, temperature=1, subsample=sub)
        draws = {}
        if values:
            try:
                if not vectorize:
                    raise _NoVectorize
                shapes = {n: v.shape for n, v in values.items()}  # from the first pass
                draws, _ = self._discrete(
                    args,
                    kwargs,
                    temperature=1,
                    num_samples=num_samples,
                    shapes=shapes,
                    subsample=sub,
                )
            except (_NoVectorize, ValueError, RuntimeError, IndexError) as e:
                if not isinstance(e, _NoVectorize):
                    warnings.warn(
                        f"the model failed under a particle plate ({e}); sampling one model "
                        "pass per draw (pass vectorize=False to skip the attempt)",
                        stacklevel=2,
                    )
                runs = [values] + [
                    self._discrete(args, kwargs, temperature=1, subsample=sub)[0]
                    for _ in range(num_samples - 1)
                ]
                draws = {n: torch.stack([r[n] for r in runs]) for n in values}
        for name, (init, m) in chains.items():
            if is_implicit(init):  # (init is the distribution, m its value)
                draws[name] = init.implicit_sample(m, num_samples)
            else:
                draws[name] = _hmm_sample(self._hmm_pairwise(init, m), num_samples)
        return draws

    @staticmethod
    def _hmm_pairwise(init: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return hmm_pairwise(init, m)

    # ------------------------------------------------------------------ the guide
    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Run as a guide: the enumerated sites are one exact draw from :math:`p(z \\mid x)`, each
        site scored by its exact conditional :math:`\\log q(z_s \\mid z_{<s}, x)`, so that
        :math:`\\log p(x, z) - \\log q(z) = \\log p(x)` for every draw.

        The model itself is re-run under a handler that swaps each enumerated site's prior for
        that conditional (params and observed sites hidden), so plates, subsampling and
        ``pyro.markov`` structure are the model's own; the values keep the site's form (a
        ``OneHotCategorical`` site gets one-hot vectors, event_dim 1). The model's minibatch
        indices are replayed.
        """
        with poutine.block(), torch.no_grad():
            tr = self._enum_trace(args, kwargs)
            sum_dims = {
                _compat.enum_symbol(s)
                for s in tr.nodes.values()
                if s["type"] == "sample" and _validate.is_enumerated(s)
            }
            _common_scale(
                tr,
                [
                    (n, s["scale"])
                    for n, s in tr.nodes.items()
                    if s["type"] == "sample" and not sum_dims.isdisjoint(_site_dims(s))
                ],
            )
        subsample = poutine.Trace()
        for name, site in tr._subsample_sites.items():
            subsample.add_node(name, **site)
        # one exact joint draw (backward sampling over the whole factor graph, as sample()),
        # then each site is emitted with its exact conditional log-density given the earlier
        # ones: drawing site by site from per-element conditionals would draw the elements of
        # a plate independently where a later global latent couples them
        values, _ = self._discrete(args, kwargs, temperature=1, subsample=subsample)
        with poutine.block(), torch.no_grad():
            messenger = _ExactConditionals(tr, poutine.Trace(), values)

        def hide(msg: dict) -> bool:
            return msg["type"] == "param" or (msg["type"] == "sample" and msg["is_observed"])

        # the latents' own masks stay: SVI's model side masks their log-probs, so the guide's
        # must be masked alike (a masked row then adds nothing to log p - log q)
        model = _ExactViewModel(self.user_model, latent_masks=True)
        model = poutine.replay(poutine.block(model, hide_fn=hide), trace=subsample)
        try:
            with torch.no_grad(), messenger:
                model(*args, **kwargs)
        except NotImplementedError as e:
            if _is_tree_error(e):
                raise _tree_error(tr, e) from e
            raise


def is_implicit(fn) -> bool:
    """Whether ``fn`` is an implicit-latent distribution (a
    :class:`~pyro_emvae.distributions.PCFG`, a :class:`~pyro_emvae.distributions.CTC`, or any
    distribution with the same methods): ``implicit_potentials(value, override) -> (leaf,
    ctx)``, ``implicit_log_z(leaf, ctx)`` (``log p``, differentiable, linear-in-the-leaf joint
    ``log p(x, t)`` so that its gradient is the posterior), ``implicit_marginals(weight, ctx)``,
    ``implicit_map(value)`` and ``implicit_sample(value, num_samples)``; and its own
    ``expand`` (a plate expands its site's distribution, and Pyro's generic
    ``ExpandedDistribution`` hides these methods). Optional: ``implicit_override_shape(value)
    -> (shape, like)``, the shape of the ``override`` it takes (and a tensor of its dtype and
    device), for which ``fit(init="random" | "kmeans++")`` draws random potentials."""
    return callable(getattr(fn, "implicit_log_z", None))


def _implicit_log_prob(site: dict, override: torch.Tensor | None = None) -> None:
    """An observed implicit-latent site (see :func:`is_implicit`): its log-potentials as one
    leaf (connected to the params when their gradients are asked for), whose gradient of
    :math:`\\log p(x)` is the site's posterior (expected counts, occupancies). ``override``
    replaces the observation's potentials (those of ``fit(init=...)``)."""
    fn = site["fn"]
    with torch.enable_grad():
        leaf, ctx = fn.implicit_potentials(site["value"], override)
        if not leaf.requires_grad:
            leaf = leaf.detach().requires_grad_()
        lp = fn.implicit_log_z(leaf, ctx)
        scaled = scale_and_mask(lp, site["scale"], site["mask"])
    site["_implicit"] = (leaf, ctx)
    site["unscaled_log_prob"] = lp
    site["log_prob"] = scaled
    site["log_prob_sum"] = scaled.sum()


def _fused_log_prob(name: str, site: dict) -> None:
    """Fill a Gaussian (or Categorical) site's log-probs by the fused kernels (see
    :mod:`pyro_emvae.kernels`), as ``Trace.compute_log_prob`` would, which then skips it; a
    site they do not cover (or whose value the distribution refuses: the generic path then
    raises with the trace's shapes) is left to it."""
    if site["args"] or site["kwargs"]:
        return
    try:
        lp = fused_log_prob(site["fn"], site["value"])
    except (ValueError, RuntimeError):  # (the generic path raises it, with the trace's shapes)
        return
    if lp is None:
        return
    site["unscaled_log_prob"] = lp
    scale, mask = site["scale"], site["mask"]
    if mask is None and type(scale) in (float, int) and scale == 1:
        site["log_prob"] = lp  # (what scale_and_mask returns, without its tests)
    else:
        site["log_prob"] = scale_and_mask(lp, scale, mask)
    site["log_prob_sum"] = site["log_prob"].sum()
    # the kernels return a new buffer: the E-step may write the posterior over it
    site["_emvae_scratch"] = lp.untyped_storage().data_ptr()
    # (Pyro's checks, which warn only on a non-finite sum, or hook a gradient: one test first)
    total = site["log_prob_sum"]
    # (tolist(): the number without an aten op; a tensor that records autograd is hooked)
    if is_validation_enabled() and (total.requires_grad or not math.isfinite(total.tolist())):
        warn_if_nan(site["log_prob_sum"], f"log_prob_sum at site '{name}'")
        warn_if_inf(site["log_prob_sum"], f"log_prob_sum at site '{name}'", allow_neginf=True)


def _not_enumerable_message(name: str, site: dict) -> str:
    fn = site["fn"]
    kind = type(fn).__name__
    if getattr(fn, "has_enumerate_support", False):
        how = site["infer"].get("enumerate")
        if how == "sequential":
            return (
                f"site '{name}' ({kind}) is marked enumerate='sequential'; ExactEStep needs "
                "infer={'enumerate': 'parallel'}."
            )
        return (
            f"site '{name}' ({kind}) is a discrete latent without an enumeration annotation: "
            "add infer={'enumerate': 'parallel'} to the site, or wrap the model in "
            "pyro.infer.config_enumerate."
        )
    return (
        f"site '{name}' ({kind}) is a continuous latent variable: ExactEStep can only "
        "enumerate discrete sites. Give this site a guide of its own (for example an "
        "AutoNormal or an amortized encoder) and enumerate the discrete sites in the model."
    )
