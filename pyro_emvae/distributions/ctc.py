r"""Connectionist temporal classification (CTC) as a distribution with an implicit latent alignment.

A network emits per-frame label log-probabilities :math:`\ell_t(c) = \log p_t(c)` over ``C``
labels, one of them the *blank* (``T`` frames). A label sequence :math:`y = (y_1, \dots, y_L)`
(no blanks) is observed through a monotonic *alignment* :math:`\pi = (\pi_1, \dots, \pi_T)`, one
label per frame, that collapses to it (:math:`\mathcal B`: merge repeats, then drop blanks):

.. math::

    \log p(y \mid \text{frames}) = \log \sum_{\pi:\ \mathcal B(\pi) = y}\ \prod_{t=1}^{T} p_t(\pi_t).

The sum runs over paths on the *extended-state lattice*: the ``S = 2L + 1`` states
:math:`y' = (\varnothing, y_1, \varnothing, y_2, \dots, y_L, \varnothing)`; a path stays, moves
one state on, or skips a blank between two different labels; it starts in state 0 or 1 and
ends in state ``S-1`` or ``S-2``. With the lattice emissions :math:`E_t(s) = \ell_t(y'_s)`
``(B, T, S)`` the forward recursion

.. math::

    \alpha_t(s) = E_t(s) + \log\big(e^{\alpha_{t-1}(s)} + e^{\alpha_{t-1}(s-1)}
        + [\text{skip}_s]\, e^{\alpha_{t-1}(s-2)}\big)

gives :math:`\log p(y)`, and since :math:`\log p(y)` is the log-partition function of the
lattice, its gradient is the alignment posterior:

.. math::

    \frac{\partial \log p(y)}{\partial E_t(s)} = \gamma_t(s) = p(s_t = s \mid y),
    \qquad \frac{\partial \log p(y)}{\partial \ell_t(c)} = \sum_{s:\, y'_s = c} \gamma_t(s).

:func:`ctc_log_z` is that recursion as one autograd op whose backward pass is the exact
beta recursion (so the occupancies :math:`\gamma` cost one backward pass, in float32 or
float64, ragged batches included). :func:`ctc_viterbi` gives the best alignment (max-product on
the lattice) and :func:`ctc_sample` exact posterior alignments (forward-filter
backward-sample). :class:`CTC` wraps it as a Pyro distribution; ``ExactEStep`` treats an
observed ``CTC`` site as an implicit latent, as it does a ``DiscreteHMM``.

Example::

    >>> logits = torch.randn(2, 6, 4)                 # (B, T, C), blank = 0
    >>> labels = torch.tensor([[1, 1, 2], [3, -1, -1]])   # padded with -1
    >>> d = CTC(logits, blank=0)
    >>> d.log_prob(labels).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch.autograd.function import once_differentiable

__all__ = [
    "CTC",
    "collapse",
    "ctc_lattice",
    "ctc_log_z",
    "ctc_occupancy",
    "ctc_sample",
    "ctc_viterbi",
    "frame_posterior",
]

_NEG = float("-inf")


# ---------------------------------------------------------------------------- the lattice
def ctc_lattice(
    labels: torch.Tensor, blank: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The extended-state lattice of padded label sequences.

    Args:
        labels: ``(B, L)`` integer labels, padded at the end with negative values.
        blank: the blank label.

    Returns:
        ``(ext, skip, n_states, label_lengths)``: ``ext (B, S)`` the label of each extended
        state (``S = 2L + 1``; blank on even states and on the padding), ``skip (B, S)`` True where
        a path may jump from ``s - 2`` to ``s`` (``s`` a label different from the one two states
        back), ``n_states (B,)`` ``= 2 L_b + 1``, ``label_lengths (B,)``.

    Example::

        >>> ext, skip, n, lengths = ctc_lattice(torch.tensor([[1, 1, 2]]))
        >>> ext.tolist(), skip.tolist(), n.tolist()
        ([[0, 1, 0, 1, 0, 2, 0]], [[False, False, False, False, False, True, False]], [7])
    """
    labels = torch.as_tensor(labels)
    lengths = (labels >= 0).sum(-1)
    b, l_max = labels.shape
    ext = torch.full((b, 2 * l_max + 1), blank, dtype=torch.long, device=labels.device)
    ext[:, 1::2] = torch.where(labels >= 0, labels.long(), blank)
    skip = torch.zeros(ext.shape, dtype=torch.bool, device=labels.device)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    return ext, skip, 2 * lengths + 1, lengths


def _lattice_masks(e, n_states):
    """Bool masks on the lattice ``(B, S)``: real states, final states, start states."""
    s_idx = torch.arange(e.size(-1), device=e.device)
    real = s_idx < n_states.unsqueeze(-1)
    final = (s_idx == (n_states - 1).unsqueeze(-1)) | (
        (s_idx == (n_states - 2).unsqueeze(-1)) & (n_states > 1).unsqueeze(-1)
    )
    start = (s_idx < 2) & real
    return real, final, start


def _neg(skip: torch.Tensor, dtype) -> torch.Tensor:
    """``0`` where ``skip`` holds, ``-inf`` elsewhere (an additive mask)."""
    return torch.zeros(skip.shape, dtype=dtype, device=skip.device).masked_fill_(~skip, _NEG)


def _lse3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``log(e^x + e^y + e^z)`` into ``out`` by one max shift (about 3x faster on CPU than two
    ``logaddexp``; the loops below are bound by this). All ``-inf`` gives ``-inf``."""
    m = torch.maximum(torch.maximum(x, y), z).clamp_min_(torch.finfo(x.dtype).min)
    acc = (x - m).exp_()
    acc += (y - m).exp_()
    acc += (z - m).exp_()
    return torch.add(acc.log_(), m, out=out)


def _forward(e, skip, n_states, semiring: str = "log"):
    """Forward messages ``alpha (T, B, S)`` over all ``T`` frames (a sequence's own value is
    read at its last frame; later frames are not used). With ``semiring="max"`` the
    max-product messages and back-pointers ``(T, B, S)`` (0, 1 or 2 states back).

    Each step is one three-way log-sum-exp (:func:`_lse3`) of shifted views of one padded
    buffer (the shifts cost no copy): the loop runs in Python over T, so few ops per step is
    what makes it fast."""
    real, _, start = _lattice_masks(e, n_states)
    e = e.masked_fill(~real.unsqueeze(1), _NEG)  # (B, T, S)
    b, t_len, n_s = e.shape
    skip_add = _neg(skip, e.dtype)
    alphas = e.new_empty((t_len, b, n_s))
    buf = e.new_full((b, n_s + 2), _NEG)  # two -inf states on the left: the shifts are views
    a, a1, a2 = buf[:, 2:], buf[:, 1:-1], buf[:, :-2]
    alphas[0] = e[:, 0].masked_fill(~start, _NEG)
    ptrs = None
    if semiring == "max":
        ptrs = torch.zeros((t_len, b, n_s), dtype=torch.uint8, device=e.device)
    for t in range(1, t_len):
        a.copy_(alphas[t - 1])
        if semiring == "max":
            best, arg = torch.stack((a, a1, a2 + skip_add)).max(0)
            ptrs[t] = arg
        else:
            best = _lse3(a, a1, a2 + skip_add, alphas[t])
        alphas[t] = best + e[:, t]
    return alphas, ptrs


def _final_value(alphas, final, input_lengths):
    """``log sum_{s final} alpha_{T_b - 1}(s)`` ``(B,)``."""
    last = alphas[input_lengths - 1, torch.arange(alphas.size(1), device=alphas.device)]
    return last.masked_fill(~final, _NEG).logsumexp(-1)


class _CTCLogZ(torch.autograd.Function):
    """``log p(y)`` of the lattice emissions; backward = occupancies by the beta recursion."""

    @staticmethod
    def forward(ctx, e, skip, input_lengths, n_states):
        alphas, _ = _forward(e, skip, n_states)
        _, final, _ = _lattice_masks(e, n_states)
        log_z = _final_value(alphas, final, input_lengths)
        ctx.save_for_backward(e, skip, input_lengths, n_states, alphas, log_z)
        return log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        e, skip, input_lengths, n_states, alphas, log_z = ctx.saved_tensors
        occ = _occupancy(e, skip, input_lengths, n_states, alphas, log_z)
        return g.unsqueeze(-1).unsqueeze(-1) * occ, None, None, None


def _occupancy(e, skip, input_lengths, n_states, alphas, log_z):
    """``gamma (B, T, S) = exp(alpha + beta - log Z)``, with ``beta`` by the backward recursion
    (started at each sequence's own last frame; zero after it and where ``log Z = -inf``)."""
    real, final, _ = _lattice_masks(e, n_states)
    e = e.masked_fill(~real.unsqueeze(1), _NEG)
    b, t_len, n_s = e.shape
    skip_add = _neg(F.pad(skip[:, 2:], (0, 2), value=False), e.dtype)  # s -> s + 2 allowed
    beta_final = torch.zeros((b, n_s), dtype=e.dtype, device=e.device).masked_fill_(~final, _NEG)
    ends = input_lengths - 1
    betas = e.new_empty((t_len, b, n_s))
    betas[-1] = beta_final
    buf = e.new_full((b, n_s + 2), _NEG)  # two -inf states on the right
    n0, n1, n2 = buf[:, :-2], buf[:, 1:-1], buf[:, 2:]
    end_steps = set(ends.tolist())
    for t in range(t_len - 2, -1, -1):
        torch.add(betas[t + 1], e[:, t + 1], out=n0)
        _lse3(n0, n1, n2 + skip_add, betas[t])
        if t in end_steps:  # (a sequence that ends here starts its recursion here)
            ended = (ends == t).unsqueeze(-1)
            betas[t] = torch.where(ended, beta_final, betas[t])
    frames = torch.arange(t_len, device=e.device).unsqueeze(-1)
    on = (frames <= ends) & torch.isfinite(log_z)  # (T, B)
    safe_z = torch.where(torch.isfinite(log_z), log_z, 0.0)
    # (where, not a product: after a sequence's end alpha + beta may exceed its log Z by any
    # amount, and exp overflows to inf, whose product with 0 is nan)
    occ = torch.where(on.unsqueeze(-1), (alphas + betas - safe_z.unsqueeze(-1)).exp(), 0.0)
    return occ.transpose(0, 1)


def _prepare(e, skip, input_lengths, n_states):
    b, t_len = e.shape[:2]
    if input_lengths is None:
        input_lengths = torch.full((b,), t_len, dtype=torch.long, device=e.device)
    input_lengths = torch.as_tensor(input_lengths, device=e.device).long()
    if n_states is None:
        n_states = torch.full((b,), e.size(-1), dtype=torch.long, device=e.device)
    return input_lengths, torch.as_tensor(n_states, device=e.device).long()


def ctc_log_z(
    e: torch.Tensor,
    skip: torch.Tensor,
    input_lengths: torch.Tensor | None = None,
    n_states: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\log p(y)` ``(B,)`` from the lattice emissions ``e (B, T, S)`` (``e[b, t, s] =
    log p_t(ext[b, s])``), the skip mask ``(B, S)`` of :func:`ctc_lattice`, the frames per
    sequence ``input_lengths (B,)`` (default ``T``) and the lattice size ``n_states (B,)``
    (default ``S``). Differentiable: the gradient in ``e`` is the occupancy
    :math:`\gamma_t(s) = p(s_t = s \mid y)` (zero on padding), computed by the exact beta
    recursion. ``-inf`` where no alignment fits (too few frames).

    Example::

        >>> ext, skip, n, _ = ctc_lattice(torch.tensor([[1, 2]]))
        >>> lp = torch.randn(1, 4, 3).log_softmax(-1)
        >>> e = lp.gather(-1, ext.unsqueeze(1).expand(1, 4, -1)).requires_grad_()
        >>> (occ,) = torch.autograd.grad(ctc_log_z(e, skip, None, n).sum(), [e])
        >>> torch.allclose(occ.sum(-1), torch.ones(1, 4, dtype=occ.dtype))
        True
    """
    input_lengths, n_states = _prepare(e, skip, input_lengths, n_states)
    return _CTCLogZ.apply(e, skip, input_lengths, n_states)


def ctc_occupancy(e, skip, input_lengths=None, n_states=None) -> torch.Tensor:
    """The alignment posterior ``gamma (B, T, S)`` of :func:`ctc_log_z` (without autograd)."""
    input_lengths, n_states = _prepare(e, skip, input_lengths, n_states)
    with torch.no_grad():
        alphas, _ = _forward(e, skip, n_states)
        _, final, _ = _lattice_masks(e, n_states)
        log_z = _final_value(alphas, final, input_lengths)
        return _occupancy(e, skip, input_lengths, n_states, alphas, log_z)


def frame_posterior(occ: torch.Tensor, ext: torch.Tensor, num_classes: int) -> torch.Tensor:
    r"""Per-frame label posterior :math:`p(\pi_t = c \mid y) = \sum_{s: y'_s = c} \gamma_t(s)`
    ``(B, T, C)`` from occupancies ``(B, T, S)`` and the lattice's labels ``ext (B, S)``."""
    out = occ.new_zeros(occ.shape[:2] + (num_classes,))
    return out.scatter_add_(-1, ext.unsqueeze(1).expand(occ.shape), occ)


def ctc_viterbi(e, skip, input_lengths=None, n_states=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The best alignment :math:`\arg\max_{\pi:\,\mathcal B(\pi)=y} \prod_t p_t(\pi_t)` as a path
    of extended states ``(B, T)`` (``-1`` after a sequence's last frame and where no alignment
    fits), and its log-probability ``(B,)`` (max-product forward, back-pointers traced back).

    Example::

        >>> ext, skip, n, _ = ctc_lattice(torch.tensor([[1]]))
        >>> e = torch.log(torch.tensor([[[0.9, 0.1, 0.9], [0.2, 0.8, 0.2], [0.9, 0.1, 0.9]]]))
        >>> ctc_viterbi(e, skip, None, n)[0].tolist()   # blank, 1, blank
        [[0, 1, 2]]
    """
    input_lengths, n_states = _prepare(e, skip, input_lengths, n_states)
    with torch.no_grad():
        alphas, ptrs = _forward(e, skip, n_states, semiring="max")
        _, final, _ = _lattice_masks(e, n_states)
        rows = torch.arange(e.size(0), device=e.device)
        last = alphas[input_lengths - 1, rows].masked_fill(~final, _NEG)
        score, s = last.max(-1)
        b, t_len = e.shape[:2]
        path = torch.full((b, t_len), -1, dtype=torch.long, device=e.device)
        for t in range(t_len - 1, -1, -1):
            on = t < input_lengths
            path[:, t] = torch.where(on, s, -1)
            if t > 0:
                s = torch.where(on, s - ptrs[t, rows, s].long(), s)
        path = torch.where(torch.isfinite(score).unsqueeze(-1), path, -1)
    return path, score


def ctc_sample(
    e, skip, input_lengths=None, n_states=None, num_samples: int = 1, generator=None
) -> torch.Tensor:
    r"""Exact draws of alignments from :math:`p(\pi \mid y)`, as paths of extended states
    ``(num_samples, B, T)`` (``-1`` after a sequence's last frame): forward filter, then
    backward sample :math:`s_t \sim p(s_t \mid s_{t+1}, y) \propto e^{\alpha_t(s_t)}` over the
    (up to three) states that lead to :math:`s_{t+1}`.

    Example::

        >>> ext, skip, n, _ = ctc_lattice(torch.tensor([[1, 2]]))
        >>> ctc_sample(torch.zeros(1, 5, 5), skip, None, n, num_samples=3).shape
        torch.Size([3, 1, 5])
    """
    input_lengths, n_states = _prepare(e, skip, input_lengths, n_states)
    with torch.no_grad():
        alphas, _ = _forward(e, skip, n_states)
        _, final, _ = _lattice_masks(e, n_states)
        b, t_len, _ = e.shape
        a_last = alphas[input_lengths - 1, torch.arange(b, device=e.device)]
        a_last = a_last.masked_fill(~final, _NEG)
        w = (a_last - a_last.max(-1, keepdim=True).values).exp().nan_to_num(0.0)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, final.to(w.dtype))  # (no alignment)
        s = torch.multinomial(w, num_samples, replacement=True, generator=generator).T  # (N, B)
        path = torch.full((num_samples, b, t_len), -1, dtype=torch.long, device=e.device)
        rows = torch.arange(b, device=e.device).expand(num_samples, -1)
        offsets = torch.arange(3, device=e.device)
        for t in range(t_len - 1, -1, -1):
            on = t < input_lengths  # (B,)
            path[:, :, t] = torch.where(on, s, -1)
            if t == 0:
                break
            cand = s.unsqueeze(-1) - offsets  # (N, B, 3): stay, one back, two back
            ok = cand >= 0
            ok[..., 2] &= skip[rows, s]
            a = alphas[t - 1][rows.unsqueeze(-1), cand.clamp_min(0)].masked_fill(~ok, _NEG)
            w = (a - a.max(-1, keepdim=True).values).exp().nan_to_num(0.0)
            # (a row with no finite weight: a sequence no alignment fits; any allowed move)
            w = w.clamp_min(torch.finfo(w.dtype).tiny) * ok
            pick = torch.multinomial(w.reshape(-1, 3), 1, generator=generator)
            prev = cand.gather(-1, pick.reshape(num_samples, b, 1)).squeeze(-1)
            s = torch.where(on, prev, s)
    return path


# ---------------------------------------------------------------------------- the distribution
class CTC(TorchDistribution):
    r"""Label sequences given per-frame label scores, through CTC's monotonic alignments.

    .. math::

        p(y \mid \text{logits}) = \sum_{\pi:\ \mathcal B(\pi) = y}\ \prod_{t < T_b}
            \mathrm{softmax}(\text{logits}_t)_{\pi_t}

    A value is a label sequence padded at the end with ``-1`` to the event shape ``(*batch, T)``
    (no blanks; ``log_prob`` takes any padded length ``L``, but Pyro's and ``fit``'s shape checks
    want ``T``); :meth:`log_prob` is CTC's forward algorithm:
    ``-torch.nn.functional.ctc_loss(..., reduction="none")``, the faster of it and the lattice
    kernel :func:`ctc_log_z`, which gives the same number and also the lattice occupancies.
    :meth:`sample` draws an alignment frame by frame and collapses it (``(*batch, T)``, padded
    with ``-1``). Under :class:`~pyro_emvae.ExactEStep` an observed ``CTC`` site is an implicit
    latent: its posterior marginals are the occupancies ``(*batch, T, S)`` of the lattice
    states, ``map()`` the best alignment and ``sample()`` exact posterior alignments, both as
    per-frame labels ``(*batch, T)``.

    Args:
        logits: ``(*batch, T, C)`` unnormalized per-frame label scores (log-softmax is applied).
        input_lengths: ``(*batch)`` frames per sequence (default ``T``): frames from there on
            are padding.
        blank: the blank label (default 0).

    Example::

        >>> d = CTC(torch.randn(3, 8, 5), input_lengths=torch.tensor([8, 6, 4]))
        >>> y = d.sample()            # (3, 8), padded with -1
        >>> d.log_prob(y).shape
        torch.Size([3])
    """

    arg_constraints: ClassVar[dict] = {"logits": constraints.real}
    support = constraints.integer
    has_enumerate_support = False

    def __init__(self, logits, input_lengths=None, blank: int = 0, validate_args=None):
        if logits.dim() < 2:
            raise ValueError(f"logits must be (*batch, T, C), got shape {tuple(logits.shape)}")
        self.logits = logits
        self.blank = int(blank)
        t_len = logits.size(-2)
        batch = logits.shape[:-2]
        if input_lengths is None:
            input_lengths = torch.full(batch, t_len, dtype=torch.long, device=logits.device)
        self.input_lengths = (
            torch.as_tensor(input_lengths, device=logits.device).long().expand(batch)
        )
        super().__init__(batch, torch.Size((t_len,)), validate_args=validate_args)

    @property
    def num_classes(self) -> int:
        return self.logits.size(-1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        logits = self.logits.expand(batch_shape + self.logits.shape[-2:])
        return CTC(logits, self.input_lengths.expand(batch_shape), self.blank)

    def _validate_sample(self, value):
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
            ok = value.dim() >= 1
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                "a CTC value is a padded label sequence (*batch, L) whose batch broadcasts "
                f"with {tuple(self.batch_shape)}; got shape {tuple(value.shape)}"
            )
        if value.is_floating_point() and not torch.equal(value, value.round()):
            raise ValueError("CTC labels must be integers")
        v = value.long()
        if ((v == self.blank) | (v >= self.num_classes)).any():
            raise ValueError(
                f"CTC labels must lie in [0, {self.num_classes}) without the blank {self.blank}"
            )
        pad = v < 0
        if (pad[..., :-1] & ~pad[..., 1:]).any():
            raise ValueError("CTC label sequences must be padded at the end (negative values)")

    # -- the lattice, shared with ExactEStep
    def lattice(self, value: torch.Tensor):
        """``(e, skip, input_lengths, n_states, ext)`` flattened to one batch dim: the lattice
        emissions ``e (B, T, S)`` (differentiable in ``logits``), as in :func:`ctc_log_z`."""
        batch = torch.broadcast_shapes(self.batch_shape, value.shape[:-1])
        lp = (
            self.logits.log_softmax(-1)
            .expand(batch + self.logits.shape[-2:])
            .reshape((-1,) + self.logits.shape[-2:])
        )
        labels = value.long().expand(batch + value.shape[-1:]).reshape(-1, value.size(-1))
        # (a value is padded to T labels: the lattice needs only the longest sequence's)
        labels = labels[:, : int((labels >= 0).sum(-1).max()) if labels.numel() else 0]
        ext, skip, n_states, _ = ctc_lattice(labels, self.blank)
        e = lp.gather(-1, ext.unsqueeze(1).expand(-1, lp.size(1), -1))
        lengths = self.input_lengths.expand(batch).reshape(-1)
        return e, skip, lengths, n_states, ext, batch

    # -- the implicit-latent protocol ExactEStep reads (shared with PCFG)
    def implicit_potentials(self, value: torch.Tensor, override=None):
        """``(leaf, ctx)``: the lattice emissions ``e (B, T, S)`` — :math:`\\log p(y, a)` of an
        alignment ``a`` is the sum of ``e`` along its path, so the gradient of :math:`\\log p(y)`
        in ``e`` is the occupancies — and the rest of the lattice. (No init potentials: the
        network's frames decide; ``override`` must be None.)"""
        if override is not None:
            raise ValueError("a CTC site takes no init potentials")
        e, *ctx = self.lattice(value)
        return e, tuple(ctx)

    def implicit_log_z(self, leaf: torch.Tensor, ctx) -> torch.Tensor:
        """:math:`\\log p(y)` ``(*batch)`` from :meth:`implicit_potentials`' leaf."""
        skip, lengths, n_states, _, batch = ctx
        return ctc_log_z(leaf, skip, lengths, n_states).reshape(batch)

    def implicit_marginals(self, weight: torch.Tensor, ctx) -> torch.Tensor:
        """The lattice occupancies ``(*batch, T, S)`` from the leaf's gradient ``(B, T, S)``."""
        return weight.reshape(ctx[-1] + weight.shape[-2:])

    def implicit_map(self, value: torch.Tensor) -> torch.Tensor:
        """The best alignment's per-frame labels ``(*batch, T)`` (``-1`` after the last frame)."""
        return self._decode(value, None)

    def implicit_sample(self, value: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Exact posterior alignments ``(num_samples, *batch, T)`` as per-frame labels."""
        return self._decode(value, num_samples)

    def _decode(self, value: torch.Tensor, num_samples: int | None) -> torch.Tensor:
        with torch.no_grad():
            e, skip, lengths, n_states, ext, batch = self.lattice(value)
            if num_samples is None:
                path = ctc_viterbi(e, skip, lengths, n_states)[0]
            else:
                path = ctc_sample(e, skip, lengths, n_states, num_samples)
            labels = ext.expand(path.shape[:-1] + ext.shape[-1:]).gather(-1, path.clamp_min(0))
            labels = torch.where(path >= 0, labels, -1)
            return labels.reshape(path.shape[:-2] + batch + path.shape[-1:])

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        # PyTorch's C++ kernel: the same number as ctc_log_z (tested to 1e-12) in 0.4-0.6 of
        # its time (benchmarks/ctc.py), and its gradient in the logits is exact because the
        # log-softmax is taken here. ExactEStep uses the lattice kernel instead: it needs the
        # occupancies of the lattice states, which ctc_loss does not give.
        batch = torch.broadcast_shapes(self.batch_shape, value.shape[:-1])
        t_len, c = self.logits.shape[-2:]
        lp = self.logits.log_softmax(-1).expand(batch + (t_len, c)).reshape(-1, t_len, c)
        labels = value.long().expand(batch + value.shape[-1:]).reshape(-1, value.size(-1))
        nll = F.ctc_loss(
            lp.transpose(0, 1),
            labels.clamp_min(0),
            self.input_lengths.expand(batch).reshape(-1),
            (labels >= 0).sum(-1),
            blank=self.blank,
            reduction="none",
        )
        return -nll.reshape(batch)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            probs = self.logits.softmax(-1).expand(shape + self.logits.shape[-2:])
            frames = torch.distributions.Categorical(probs=probs).sample()  # (*shape, T)
            return collapse(frames, self.blank, self.input_lengths.expand(shape))


def collapse(frames: torch.Tensor, blank: int = 0, input_lengths=None) -> torch.Tensor:
    r""":math:`\mathcal B`: per-frame labels ``(*batch, T)`` to label sequences ``(*batch, T)``
    (repeats merged, blanks dropped, padded with ``-1``); frames from ``input_lengths`` on (and
    negative frames) are ignored. Greedy (best-path) decoding is ``collapse(logits.argmax(-1))``.

    Example::

        >>> collapse(torch.tensor([0, 1, 1, 0, 1, 2, 2]))
        tensor([ 1,  1,  2, -1, -1, -1, -1])
    """
    frames = frames.long()
    t_len = frames.size(-1)
    if input_lengths is not None:
        t = torch.arange(t_len, device=frames.device)
        frames = torch.where(t < torch.as_tensor(input_lengths).unsqueeze(-1), frames, -1)
    prev = F.pad(frames[..., :-1], (1, 0), value=-1)
    keep = (frames != blank) & (frames >= 0) & (frames != prev)
    # stable sort: kept labels first, in order
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    out = torch.where(keep, frames, -1).gather(-1, order)
    return out
