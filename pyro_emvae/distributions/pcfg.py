r"""A probabilistic context-free grammar in Chomsky normal form, with its parse tree summed out.

Symbols: ``NT`` nonterminals ``0 .. NT-1`` and ``PT`` preterminals ``NT .. NT+PT-1`` (``S = NT +
PT``); a sentence is a string of ``L >= 2`` words over a vocabulary of ``V``. A tree picks a root
nonterminal :math:`A \sim \text{root}`, expands every nonterminal by a binary rule
:math:`A \to B\,C` (:math:`B, C` any symbols) with probability ``rules[A, B, C]`` (each
``rules[A]`` sums to 1 over ``(B, C)``), and every preterminal emits one word,
``emission[P, v]``. A sentence's probability sums over its trees,

.. math::

    p(x) = \sum_{\text{trees } t \text{ of } x} \text{root}(A_t)
        \prod_{A \to B C \in t} \text{rules}[A, B, C] \prod_{(P, x_i) \in t} \text{emission}[P, x_i],

computed by the **inside algorithm**: :math:`\beta(i, j, A) = \sum_{k, B, C}` ``rules[A, B, C]``
:math:`\beta(i, k, B)\,\beta(k+1, j, C)` over the spans of each width in turn, all spans of a
width and all sentences at once (batched matmuls: the outer products of left and right children
summed over split points, then one matmul with the rule matrix). Each cell is kept as a vector
rescaled to max 1 with its log scale carried, so float32 holds any sentence length (no
log-space broadcasts over ``(NT, S, S)``).

**Inside-outside is backprop.** :func:`pcfg_log_z` is differentiable in its log-potentials:
the gradient in ``log root`` is the expected root counts, in ``log rules`` the expected rule
counts, and in the span potentials the span marginals :math:`p(\text{span } (i, j) \text{ has
label } A \mid x)` (width 1: the preterminal tags, whose potentials are the emission
log-probabilities). Those counts, normalized per left-hand side, are the EM update
(:class:`~pyro_emvae.rules.PCFGRule`). The max-product version (CKY) gives the Viterbi tree,
and :func:`pcfg_sample` draws exact posterior trees top-down from the inside chart.

Layouts: span potentials and marginals are **width-major** ``(B, L, L, S)``: entry
``[b, w - 1, i, A]`` is the span of width ``w`` starting at word ``i``. A tree is ``(B, L, L)``
long, ``tree[b, i, j]`` the symbol spanning words ``i..j`` (inclusive), ``-1`` off the tree.

Example::

    >>> import torch
    >>> from pyro_emvae.distributions import PCFG
    >>> root = torch.tensor([1.0]).log()                  # NT = 1
    >>> rules = torch.full((1, 3, 3), 1 / 9).log()        # PT = 2
    >>> emission = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
    >>> d = PCFG(root, rules, emission, lengths=torch.tensor([2]))
    >>> d.log_prob(torch.tensor([[0, 1]])).exp()          # 1/9 * (.9+.2) * (.1+.8)
    tensor([0.1100])
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution, constraints

__all__ = ["PCFG", "pcfg_log_z", "pcfg_marginals", "pcfg_sample", "pcfg_viterbi"]


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _inside(root, rules, spans, lengths):
    """The scaled inside chart: ``(log Z (B,), P, s)`` with ``P[w] (B, L-w+1, NT or PT)`` the
    cells of width ``w`` rescaled to max 1 and ``s[w] (B, L-w+1)`` their log scales (detached:
    :math:`\\log Z` does not depend on them, so autograd through ``P`` alone is exact)."""
    b, length = spans.shape[0], spans.shape[1]
    nt = root.shape[-1]
    s_all = rules.shape[-1]
    pt = s_all - nt
    c_root = _finite(root.detach().amax())
    c_rule = _finite(rules.detach().amax())
    rp = (root - c_root).exp()
    r = (rules - c_rule).exp()
    r_nn = r[:, :nt, :nt].reshape(nt, nt * nt).T
    r_np = r[:, :nt, nt:].reshape(nt, nt * pt).T
    r_pn = r[:, nt:, :nt].reshape(nt, pt * nt).T
    r_pp = r[:, nt:, nt:].reshape(nt, pt * pt).T
    pots = spans.unbind(1)  # one (B, L, S) per width: one backward stack, not L full copies
    t = pots[0][..., nt:]
    m = _finite(t.detach().amax(-1, keepdim=True))
    p_: list = [None, (t - m).exp()]
    s_: list = [None, m.squeeze(-1)]
    neg_inf = torch.tensor(-torch.inf, dtype=spans.dtype, device=spans.device)
    tops = [torch.full((b,), -torch.inf, dtype=spans.dtype, device=spans.device)]
    for w in range(2, length + 1):
        n = length - w + 1
        sc = torch.stack([s_[k][:, :n] + s_[w - k][:, k : k + n] for k in range(1, w)], -1)
        mx = _finite(sc.amax(-1, keepdim=True))
        wt = (sc - mx).exp()  # (B, n, w-1): each split's scale relative to the best
        left1 = p_[1][:, :n] * wt[..., :1]
        if w == 2:
            y = left1.unsqueeze(-1) * p_[1][:, 1 : 1 + n].unsqueeze(-2)
            acc = y.reshape(-1, pt * pt) @ r_pp
        else:
            y = left1.unsqueeze(-1) * p_[w - 1][:, 1 : 1 + n].unsqueeze(-2)  # P | NT
            acc = y.reshape(-1, pt * nt) @ r_pn
            y = (p_[w - 1][:, :n] * wt[..., -1:]).unsqueeze(-1) * p_[1][
                :, w - 1 : w - 1 + n
            ].unsqueeze(-2)  # NT | P
            acc = acc + y.reshape(-1, nt * pt) @ r_np
            if w >= 4:  # NT | NT over the inner split points, one batched matmul
                ks = range(2, w - 1)
                left = torch.stack([p_[k][:, :n] * wt[..., k - 1 : k] for k in ks], -1)
                right = torch.stack([p_[w - k][:, k : k + n] for k in ks], -2)
                acc = acc + (left @ right).reshape(-1, nt * nt) @ r_nn
        v = acc.reshape(b, n, nt)
        pot = pots[w - 1][:, :n, :nt]
        pm = _finite(pot.detach().amax(-1, keepdim=True))
        v = v * (pot - pm).exp()
        vm = v.detach().amax(-1, keepdim=True)
        pos = vm > 0
        p_.append(v / torch.where(pos, vm, torch.ones_like(vm)))
        s_.append(torch.where(pos, mx + vm.log() + pm + c_rule, neg_inf).squeeze(-1))
        tops.append(((p_[w][:, 0] * rp).sum(-1)).log() + s_[w][:, 0] + c_root)
    top = torch.stack(tops, -1)  # (B, L): log Z of the first w words
    idx = (lengths.to(top.device).long() - 1).clamp(0, length - 1).reshape(-1, 1)
    return top.gather(-1, idx).squeeze(-1), p_, s_


def _check(root, rules, spans):
    if root.dim() != 1 or rules.dim() != 3 or spans.dim() != 4:
        raise ValueError(
            "pcfg: root (NT,), rules (NT, S, S) and spans (B, L, L, S) (a grammar shared by the "
            f"batch); got {tuple(root.shape)}, {tuple(rules.shape)}, {tuple(spans.shape)}"
        )
    nt, s = root.shape[0], rules.shape[-1]
    if rules.shape != (nt, s, s) or spans.shape[-1] != s or spans.shape[1] != spans.shape[2]:
        raise ValueError(
            f"pcfg: shapes disagree: root {tuple(root.shape)}, rules {tuple(rules.shape)}, "
            f"spans {tuple(spans.shape)}"
        )


def pcfg_log_z(root, rules, spans, lengths) -> torch.Tensor:
    r""":math:`\log p(x)` ``(B,)`` of each sentence by the inside algorithm, differentiable.

    Args:
        root: ``(NT,)`` log root probabilities.
        rules: ``(NT, S, S)`` log rule probabilities (``S = NT + PT``).
        spans: ``(B, L, L, S)`` width-major log span potentials: ``spans[b, 0, i, NT + p]`` is
            ``log emission[p, x_bi]``; zero elsewhere for a plain PCFG (any value adds a
            factor per labelled span).
        lengths: ``(B,)`` sentence lengths (``2 <= length <= L``; a length-1 sentence has no
            tree in CNF with nonterminal roots: ``-inf``).

    The gradients are the expected counts: ``root`` (summed over sentences), ``rules``
    (summed), ``spans`` (span marginals per sentence). Any float dtype; ``-inf`` entries
    (forbidden rules) are fine.

    Example::

        >>> rules = torch.full((1, 2, 2), 0.25).log()      # NT = PT = 1
        >>> pcfg_log_z(torch.zeros(1), rules, torch.zeros(1, 2, 2, 2), torch.tensor([2]))
        tensor([-1.3863])
    """
    _check(root, rules, spans)
    return _inside(root, rules, spans, lengths)[0]


def pcfg_marginals(root, rules, spans, lengths):
    r"""``(log Z (B,), root counts (NT,), rule counts (NT, S, S), span marginals (B, L, L, S))``:
    one inside pass and one backward pass (inside-outside), no gradient tracked.

    Example::

        >>> _, r, c, sp = pcfg_marginals(torch.zeros(1), torch.log(torch.full((1, 2, 2), .25)),
        ...                              torch.zeros(1, 3, 3, 2), torch.tensor([3]))
        >>> float(c.sum()), float(sp[0, 1, :2].sum())       # 2 rules; one width-2 span
        (2.0, 1.0)
    """
    leaves = [t.detach().requires_grad_() for t in (root, rules, spans)]
    with torch.enable_grad():
        log_z = pcfg_log_z(*leaves, lengths)
        grads = torch.autograd.grad(log_z.sum(), leaves)
    return (log_z.detach(), *grads)


def _tree_from_spans(ind: torch.Tensor) -> torch.Tensor:
    """``(B, L, L)`` labels from a width-major ``(..., L, L, S)`` 0/1 span indicator."""
    *batch, length, _, _s = ind.shape
    on = ind > 0.5
    label = torch.where(on.any(-1), on.float().argmax(-1), -1)  # (..., w, i)
    out = torch.full((*batch, length, length), -1, dtype=torch.long, device=ind.device)
    for w in range(length):
        n = length - w
        i = torch.arange(n, device=ind.device)
        out[..., i, i + w] = label[..., w, :n]
    return out


def pcfg_viterbi(root, rules, spans, lengths):
    r"""The most probable tree of each sentence (CKY, max-product in log space) and its log
    probability: ``(tree (B, L, L) long, score (B,))``; the tree is the gradient of the max
    score in the span potentials (the indicator of the maximizing spans).

    Example::

        >>> rules = torch.log(torch.tensor([[[0.0, 0.5], [0.0, 0.5]]]).expand(1, 2, 2))
        >>> tree, _ = pcfg_viterbi(torch.zeros(1), rules, torch.zeros(1, 2, 2, 2), torch.tensor([2]))
        >>> tree[0].tolist()                                 # root 0 over (0, 1), tags 1
        [[1, 0], [-1, 1]]
    """
    _check(root, rules, spans)
    b, length = spans.shape[0], spans.shape[1]
    nt, s = root.shape[-1], rules.shape[-1]
    sp = spans.detach().requires_grad_()
    flat_rules = rules.detach().reshape(nt, s * s)
    with torch.enable_grad():
        pots = sp.unbind(1)
        ninf = torch.full((b, length, nt), -torch.inf, dtype=sp.dtype, device=sp.device)
        ninf_pt = ninf.new_full((b, length, s - nt), -torch.inf)
        v: list = [None, torch.cat((ninf, pots[0][..., nt:]), -1)]
        tops = [torch.full((b,), -torch.inf, dtype=sp.dtype, device=sp.device)]
        for w in range(2, length + 1):
            n = length - w + 1
            left = torch.stack([v[k][:, :n] for k in range(1, w)], 2)  # (B, n, K, S)
            right = torch.stack([v[w - k][:, k : k + n] for k in range(1, w)], 2)
            best = (left.unsqueeze(-1) + right.unsqueeze(-2)).flatten(-2).max(2).values
            cell = (best.unsqueeze(-2) + flat_rules).max(-1).values + pots[w - 1][:, :n, :nt]
            v.append(torch.cat((cell, ninf_pt[:, :n]), -1))
            tops.append((v[w][:, 0, :nt] + root.detach()).max(-1).values)
        top = torch.stack(tops, -1)
        idx = (lengths.to(top.device).long() - 1).clamp(0, length - 1).reshape(-1, 1)
        score = top.gather(-1, idx).squeeze(-1)
        ok = torch.isfinite(score)
        (g,) = torch.autograd.grad(torch.where(ok, score, 0.0).sum(), [sp])
    tree = _tree_from_spans(g)
    tree[~ok] = -1
    return tree, score.detach()


def pcfg_sample(root, rules, spans, lengths, num_samples: int = 1, generator=None):
    r"""Exact draws ``(num_samples, B, L, L)`` of trees from :math:`p(t \mid x)` (top-down: the
    root label, then each span's split point and child labels in proportion to the rule times
    the children's inside values), all draws and sentences of a tree level at once.

    Example::

        >>> t = pcfg_sample(torch.zeros(1), torch.log(torch.full((1, 2, 2), .25)),
        ...                 torch.zeros(2, 3, 3, 2), torch.tensor([3, 2]), num_samples=4)
        >>> t.shape, bool((t[:, 1, 0, 1] == 0).all())        # sentence 1: its root spans 0..1
        (torch.Size([4, 2, 3, 3]), True)
    """
    _check(root, rules, spans)
    with torch.no_grad():
        _, p_, s_ = _inside(root.detach(), rules.detach(), spans.detach(), lengths)
    b, length = spans.shape[0], spans.shape[1]
    nt, s = root.shape[-1], rules.shape[-1]
    dev, dt = spans.device, spans.dtype
    # the dense log chart: chart[b, w, i, A] = log inside(i, i+w-1, A), -inf off the chart
    chart = torch.full((b, length + 1, length + 1, s), -torch.inf, dtype=dt, device=dev)
    chart[:, 1, :length, nt:] = p_[1].log() + s_[1].unsqueeze(-1)
    for w in range(2, length + 1):
        chart[:, w, : length - w + 1, :nt] = p_[w].log() + s_[w].unsqueeze(-1)
    lengths = lengths.to(dev).long()
    tree = torch.full((num_samples, b, length, length), -1, dtype=torch.long, device=dev)
    # the root label of every (draw, sentence)
    top = chart[torch.arange(b, device=dev), lengths, 0, :nt] + root.detach()  # (B, NT)
    sid = torch.arange(num_samples, device=dev).repeat_interleave(b)
    bid = torch.arange(b, device=dev).repeat(num_samples)
    good = torch.isfinite(top.amax(-1))[bid]
    sid, bid = sid[good], bid[good]
    lab = _draw(top[bid], generator)
    start = torch.zeros_like(bid)
    width = lengths[bid]
    flat_rules = rules.detach().reshape(nt, s * s)
    ks = torch.arange(1, length, device=dev)
    while sid.numel():
        tree[sid, bid, start, start + width - 1] = lab
        inner = width > 1
        sid, bid, start, width, lab = sid[inner], bid[inner], start[inner], width[inner], lab[inner]
        if not sid.numel():
            break
        k = ks.expand(sid.numel(), -1)  # (n, L-1) split widths of the left child
        valid = k < width.unsqueeze(-1)
        kc = torch.where(valid, k, 1)
        left = chart[bid.unsqueeze(-1), kc, start.unsqueeze(-1)]  # (n, L-1, S)
        rw = torch.where(valid, width.unsqueeze(-1) - k, 1)
        right = chart[bid.unsqueeze(-1), rw, (start.unsqueeze(-1) + kc).clamp(max=length)]
        sc = left.unsqueeze(-1) + right.unsqueeze(-2) + flat_rules[lab].reshape(-1, 1, s, s)
        sc = torch.where(valid[..., None, None], sc, -torch.inf)
        pick = _draw(sc.flatten(1), generator)
        kk, bc = pick // (s * s) + 1, pick % (s * s)
        lb, lc = bc // s, bc % s
        sid, bid = torch.cat((sid, sid)), torch.cat((bid, bid))
        start = torch.cat((start, start + kk))
        width = torch.cat((kk, width - kk))
        lab = torch.cat((lb, lc))
    return tree


def _draw(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of ``logits (n, K)``, in proportion to ``exp(logits)``."""
    p = (logits - logits.amax(-1, keepdim=True)).exp()
    return torch.multinomial(p, 1, generator=generator).squeeze(-1)


class PCFG(TorchDistribution):
    r"""Sentences under a PCFG in Chomsky normal form, the parse tree summed out (an implicit
    latent, like :class:`~pyro.distributions.DiscreteHMM`'s chain).

    Args:
        root_logits: ``(NT,)`` log root probabilities (normalized here).
        rule_logits: ``(NT, S, S)`` log rule probabilities, normalized per left-hand side over
            ``(S, S)`` (for closed-form EM pass ``probs.log().reshape(NT, S, S)`` of a
            ``(NT, S * S)`` simplex param).
        emission_logits: ``(PT, V)`` log word probabilities per preterminal.
        lengths: ``(B,)`` sentence lengths (the batch shape).
        max_length: the padded width ``L`` of the values (default ``max(lengths)``).

    ``log_prob(x)`` of words ``x (B, L)`` (padding: any valid word) is :math:`\log p(x)`
    ``(B,)`` (:func:`pcfg_log_z`). ``sample()`` draws sentences of the given lengths from
    :math:`p(x \mid |x|)` (a tree given its yield length, then its words). Under
    :class:`~pyro_emvae.ExactEStep` an observed PCFG site is an implicit latent: its
    posterior's ``marginals[name]`` are the span marginals ``(B, L, L, S)`` (width-major),
    ``map()`` gives Viterbi trees and ``sample()`` posterior trees ``(B, L, L)``, and
    :class:`~pyro_emvae.EMOptim` updates the three tables by inside-outside.

    Example::

        >>> d = PCFG(torch.zeros(2), torch.zeros(2, 5, 5), torch.zeros(3, 4), torch.tensor([3, 2]))
        >>> d.batch_shape, d.event_shape
        (torch.Size([2]), torch.Size([3]))
    """

    arg_constraints: ClassVar[dict] = {}
    has_enumerate_support = False

    def __init__(
        self,
        root_logits: torch.Tensor,
        rule_logits: torch.Tensor,
        emission_logits: torch.Tensor,
        lengths: torch.Tensor,
        max_length: int | None = None,
        validate_args=None,
    ) -> None:
        # stored as given: the M-step's probe reads which param elements they are
        self.root_logits = root_logits
        self.rule_logits = rule_logits
        self.emission_logits = emission_logits
        self.lengths = torch.as_tensor(lengths).long()
        nt, s = root_logits.shape[-1], rule_logits.shape[-1]
        if (
            root_logits.dim() != 1
            or rule_logits.shape != (nt, s, s)
            or emission_logits.dim() != 2
            or emission_logits.shape[0] != s - nt
        ):
            raise ValueError(
                "PCFG: root_logits (NT,), rule_logits (NT, S, S) and emission_logits (S - NT, "
                f"V); got {tuple(root_logits.shape)}, {tuple(rule_logits.shape)}, "
                f"{tuple(emission_logits.shape)}"
            )
        longest = int(self.lengths.max()) if self.lengths.numel() else 1
        if max_length is None:
            max_length = longest
        if longest > max_length:
            raise ValueError(f"PCFG: a length {longest} exceeds max_length={max_length}")
        super().__init__(self.lengths.shape, torch.Size((max_length,)), validate_args)

    @property
    def num_nonterminals(self) -> int:
        return self.root_logits.shape[-1]

    @constraints.dependent_property
    def support(self):
        return constraints.independent(
            constraints.integer_interval(0, self.emission_logits.shape[-1] - 1), 1
        )

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return type(self)(
            self.root_logits,
            self.rule_logits,
            self.emission_logits,
            self.lengths.expand(batch_shape),
            max_length=self.event_shape[0],
            validate_args=False,
        )

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log root (NT,), log rules (NT, S, S), log emission (PT, V))``, each normalized."""
        root = self.root_logits - self.root_logits.logsumexp(-1, keepdim=True)
        r = self.rule_logits
        rules = r - r.flatten(-2).logsumexp(-1)[..., None, None]
        em = self.emission_logits - self.emission_logits.logsumexp(-1, keepdim=True)
        return root, rules, em

    def span_potentials(
        self,
        value: torch.Tensor,
        emission: torch.Tensor | None = None,
        term: torch.Tensor | None = None,
    ):
        """``(B, L, L, S)`` width-major span log-potentials of words ``value (B, L)``: the
        emission log-probabilities of the words at width 1 (or ``term (B, L, PT)``, potentials
        that replace them: ``fit(init="random")`` draws them), zero elsewhere."""
        value = value.reshape((-1, value.shape[-1])).long()
        b, length = value.shape
        nt = self.num_nonterminals
        if term is None:
            if emission is None:
                emission = self.normalized()[2]
            words = value.clamp(0, emission.shape[-1] - 1)
            # (indexed along the vocabulary: the gradient keeps the emission's own layout)
            term = emission[:, words].permute(1, 2, 0)  # (B, L, PT)
        else:
            term = term.reshape(b, length, -1)
        zero = term.new_zeros(())
        first = torch.cat((zero.expand(b, length, nt), term), -1).unsqueeze(1)
        rest = zero.expand(b, length - 1, length, nt + emission.shape[0])
        return torch.cat((first, rest), 1)

    # -- the implicit-latent protocol ExactEStep reads (shared with CTC)
    def implicit_potentials(self, value: torch.Tensor, override: torch.Tensor | None = None):
        """``(leaf, ctx)``: the E-step's one leaf ``cat(log root, log rules, spans)`` flattened
        (1-D) — a tree's log-probability is the sum of the potentials it uses, so the gradient
        of :math:`\\log p(x)` in it is ``cat(root counts, rule counts, span marginals)`` (see
        :meth:`split`) — and no context. ``override`` ``(*batch, L, PT)`` replaces the words'
        emission log-probabilities (an initialization's potentials)."""
        root, rules, em = self.normalized()
        value = value.expand(self.batch_shape + self.event_shape)
        spans = self.span_potentials(value, em, override)
        return torch.cat((root.reshape(-1), rules.reshape(-1), spans.reshape(-1))), None

    def implicit_override_shape(self, value: torch.Tensor) -> tuple[torch.Size, torch.Tensor]:
        """The shape of the ``override`` :meth:`implicit_potentials` takes for ``value``
        (``(*batch, L, PT)``: a tag potential per word) and a tensor of the dtype and device it
        is read in: what ``fit(init="random" | "kmeans++")`` draws random potentials for (the
        words are labels; the first E-step's parse posterior is then random)."""
        shape = self.batch_shape + (value.shape[-1], self.emission_logits.shape[-2])
        return shape, self.emission_logits

    def split(self, flat: torch.Tensor):
        """``(root (NT,), rules (NT, S, S), spans (B, L, L, S))`` views of a flat leaf or of
        its gradient."""
        nt, s = self.num_nonterminals, self.rule_logits.shape[-1]
        length = self.event_shape[0]
        root, rules, spans = flat.split((nt, nt * s * s, flat.numel() - nt - nt * s * s))
        return root, rules.reshape(nt, s, s), spans.reshape(-1, length, length, s)

    def implicit_log_z(self, flat: torch.Tensor, ctx=None) -> torch.Tensor:
        """:math:`\\log p(x)` ``batch_shape`` from :meth:`implicit_potentials`' leaf."""
        root, rules, spans = self.split(flat)
        return pcfg_log_z(root, rules, spans, self.lengths.reshape(-1)).reshape(self.batch_shape)

    def implicit_marginals(self, weight: torch.Tensor, ctx=None) -> torch.Tensor:
        """The span marginals ``(B, L, L, S)`` from the leaf's gradient (the flat counts)."""
        return self.split(weight)[2]

    def implicit_map(self, value: torch.Tensor) -> torch.Tensor:
        """Viterbi trees (CKY), see :meth:`viterbi`."""
        return self.viterbi(value)

    def implicit_sample(self, value: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Exact posterior trees, see :meth:`posterior_sample`."""
        return self.posterior_sample(value, num_samples)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        batch = torch.broadcast_shapes(self.lengths.shape, value.shape[:-1])  # (sample dims)
        root, rules, em = self.normalized()
        spans = self.span_potentials(value.expand(batch + value.shape[-1:]), em)
        lengths = self.lengths.expand(batch).reshape(-1)
        return pcfg_log_z(root, rules, spans, lengths).reshape(batch)

    def _parts(self, value):
        root, rules, em = (t.detach() for t in self.normalized())
        return root, rules, self.span_potentials(value, em), self.lengths.reshape(-1)

    def viterbi(self, value: torch.Tensor) -> torch.Tensor:
        """The most probable tree ``(B, L, L)`` of each sentence (see :func:`pcfg_viterbi`)."""
        return pcfg_viterbi(*self._parts(value))[0]

    def posterior_sample(self, value: torch.Tensor, num_samples: int = 1, generator=None):
        """Exact posterior trees ``(num_samples, B, L, L)`` (see :func:`pcfg_sample`)."""
        return pcfg_sample(*self._parts(value), num_samples=num_samples, generator=generator)

    def sample(self, sample_shape=()):
        """Sentences ``sample_shape + (B, L)`` of the given lengths, from :math:`p(x \\mid |x|)`:
        a tree drawn given its yield length (words summed out), then a word per preterminal
        (padding: word 0)."""
        n = int(torch.Size(sample_shape).numel())
        root, rules, em = (t.detach() for t in self.normalized())
        b, length = self.lengths.numel(), self.event_shape[0]
        spans = em.new_zeros((b, length, length, rules.shape[-1]))  # every word: log 1
        trees = pcfg_sample(root, rules, spans, self.lengths.reshape(-1), num_samples=n)
        tags = trees.diagonal(dim1=-2, dim2=-1) - self.num_nonterminals  # (n, B, L)
        words = torch.multinomial(em.exp()[tags.clamp(min=0).reshape(-1)], 1).reshape(tags.shape)
        words = torch.where(tags >= 0, words, 0)
        return words.reshape(torch.Size(sample_shape) + self.batch_shape + self.event_shape)
