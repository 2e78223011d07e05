r"""A probabilistic context-free grammar (Chomsky normal form) as a plain Pyro model, a sampler of
sentences from a known grammar, and a small default grammar.

The model has one observed site ``"x"``, a :class:`~pyro_emvae.distributions.PCFG` over ``N``
padded sentences (``pyro.plate("sentences", N)``), whose parse trees are summed out, and three
simplex params:

=============  ==================  =============================================
name           shape               meaning
=============  ==================  =============================================
``root``       ``(NT,)``           ``p(root = A)``
``rules``      ``(NT, S * S)``     ``p(A -> B C)``, row ``A`` over ``(B, C)``
                                   flattened (``S = NT + PT`` symbols)
``emission``   ``(PT, V)``         ``p(word | preterminal)``
=============  ==================  =============================================

so ``fit(pcfg_model, ExactEStep(pcfg_model), words, lengths, NT, PT, V)`` runs inside-outside
EM (each table is its expected counts normalized per left-hand side).

Example::

    >>> import pyro
    >>> from pyro_emvae import ExactEStep, fit
    >>> g = default_grammar()
    >>> words, lengths = sample_sentences(g, 50, seed=0)
    >>> pyro.clear_param_store()
    >>> res = fit(pcfg_model, ExactEStep(pcfg_model), words, lengths, *grammar_sizes(g),
    ...           max_iter=3, tol=0.0, progress=False)
    >>> ll = res.history["log_likelihood"]
    >>> bool(ll[-1] > ll[0])
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyro
import torch
from torch import Tensor
from torch.distributions import constraints

from pyro_emvae.distributions import PCFG

__all__ = [
    "default_grammar",
    "grammar_log_likelihood",
    "grammar_sizes",
    "init_grammar",
    "pcfg_model",
    "sample_sentences",
]


def default_grammar(dtype: torch.dtype | None = None) -> dict:
    r"""A toy English grammar: ``NT = 3`` (S, NP, VP), ``PT = 4`` (Det, N, V, Adj), 15 words.

    ``S -> NP VP .8 | N VP .2``; ``NP -> Det N .6 | Adj N .2 | Adj NP .2``;
    ``VP -> V NP .6 | V N .3 | V S .1``; each preterminal emits its own words uniformly
    (with one shared word, "saw", a noun and a verb). Returns ``{"root" (NT,), "rules"
    (NT, S, S), "emission" (PT, V)}`` probabilities and ``"names"``, ``"words"``.

    Example::

        >>> g = default_grammar()
        >>> float(g["rules"].flatten(1).sum(-1).min()), tuple(g["emission"].shape)
        (1.0, (4, 15))
    """
    dtype = dtype or torch.get_default_dtype()
    names = ["S", "NP", "VP", "Det", "N", "V", "Adj"]
    idx = {n: i for i, n in enumerate(names)}
    rules = torch.zeros(3, 7, 7, dtype=dtype)
    for lhs, b, c, p in [
        ("S", "NP", "VP", 0.8),
        ("S", "N", "VP", 0.2),
        ("NP", "Det", "N", 0.6),
        ("NP", "Adj", "N", 0.2),
        ("NP", "Adj", "NP", 0.2),
        ("VP", "V", "NP", 0.6),
        ("VP", "V", "N", 0.3),
        ("VP", "V", "S", 0.1),
    ]:
        rules[idx[lhs], idx[b], idx[c]] = p
    words = ["the", "a", "dog", "cat", "man", "park", "saw", "telescope", "chased", "liked"]
    words += ["said", "big", "old", "red", "small"]
    emit = {
        "Det": ["the", "a"],
        "N": ["dog", "cat", "man", "park", "saw", "telescope"],
        "V": ["saw", "chased", "liked", "said"],
        "Adj": ["big", "old", "red", "small"],
    }
    emission = torch.zeros(4, len(words), dtype=dtype)
    for p, tag in enumerate(["Det", "N", "V", "Adj"]):
        for w in emit[tag]:
            emission[p, words.index(w)] = 1.0 / len(emit[tag])
    root = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    return {"root": root, "rules": rules, "emission": emission, "names": names, "words": words}


def grammar_sizes(grammar: Mapping) -> tuple[int, int, int]:
    """``(NT, PT, V)`` of a grammar dict: nonterminals (``root`` is ``(NT,)``), preterminals and
    words (``emission`` is ``(PT, V)``).

    Example::

        >>> grammar_sizes(default_grammar())
        (3, 4, 15)
    """
    nt = grammar["root"].shape[-1]
    pt, v = grammar["emission"].shape
    return nt, pt, v


def sample_sentences(grammar: Mapping, n: int, max_length: int = 20, seed: int = 0):
    """``n`` sentences drawn from ``grammar`` (top-down, depth first), those longer than
    ``max_length`` redrawn (so the sample is from :math:`p(x \\mid |x| \\le` ``max_length``
    :math:`)`). Returns ``(words (n, L) long, padded with 0, lengths (n,))``, ``L`` the longest
    drawn.

    Example::

        >>> words, lengths = sample_sentences(default_grammar(), 4, seed=1)
        >>> words.shape[0], bool((lengths >= 2).all())
        (4, True)
    """
    rng = np.random.default_rng(seed)
    root = np.asarray(grammar["root"], dtype=np.float64)
    rules = np.asarray(grammar["rules"], dtype=np.float64)
    emission = np.asarray(grammar["emission"], dtype=np.float64)
    nt = root.shape[0]
    s = nt + emission.shape[0]
    flat = rules.reshape(nt, s * s)
    flat = flat / flat.sum(-1, keepdims=True)
    emission = emission / emission.sum(-1, keepdims=True)
    sents: list[list[int]] = []
    while len(sents) < n:
        out: list[int] = []
        todo = [int(rng.choice(nt, p=root / root.sum()))]
        while todo and len(out) <= max_length:
            sym = todo.pop()
            if sym >= nt:
                out.append(int(rng.choice(emission.shape[1], p=emission[sym - nt])))
            else:
                bc = int(rng.choice(s * s, p=flat[sym]))
                todo += [bc % s, bc // s]  # the left child is expanded first
        if not todo and len(out) <= max_length:
            sents.append(out)
    length = max(len(x) for x in sents)
    words = torch.zeros(n, length, dtype=torch.long)
    for i, x in enumerate(sents):
        words[i, : len(x)] = torch.tensor(x)
    return words, torch.tensor([len(x) for x in sents])


def init_grammar(nt: int, pt: int, v: int, seed: int = 0, dtype=None) -> dict[str, Tensor]:
    """Random initial params for :func:`pcfg_model` (rows from a flat Dirichlet):
    ``{"root": (NT,), "rules": (NT, S * S), "emission": (PT, V)}``.

    Example::

        >>> {k: tuple(t.shape) for k, t in init_grammar(2, 3, 4).items()}
        {'root': (2,), 'rules': (2, 25), 'emission': (3, 4)}
    """
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    s = nt + pt

    def simplex(*shape):
        e = -torch.rand(*shape, generator=g, dtype=dtype).clamp_min(1e-12).log()
        return e / e.sum(-1, keepdim=True)

    return {"root": simplex(nt), "rules": simplex(nt, s * s), "emission": simplex(pt, v)}


def pcfg_model(
    words: Tensor,
    lengths: Tensor,
    nt: int,
    pt: int,
    v: int,
    init: Mapping[str, Tensor] | None = None,
) -> None:
    """The PCFG model: params ``root``, ``rules``, ``emission`` (see the module's docstring; first
    values from ``init`` or :func:`init_grammar`) and an observed :class:`PCFG` site ``"x"``
    over the padded sentences ``words (N, L)`` of ``lengths (N,)``.

    Example (the model's log-likelihood at the true grammar is the grammar's own)::

        >>> import pyro
        >>> from pyro_emvae import ExactEStep
        >>> g = default_grammar()
        >>> words, lengths = sample_sentences(g, 8, seed=0)
        >>> pyro.clear_param_store()
        >>> pcfg_model(words, lengths, *grammar_sizes(g), init=g)
        >>> sorted(pyro.get_param_store().keys())
        ['emission', 'root', 'rules']
        >>> ll = float(ExactEStep(pcfg_model).log_likelihood(words, lengths, *grammar_sizes(g)))
        >>> abs(ll - grammar_log_likelihood(g, words, lengths)) < 1e-6
        True
    """
    s = nt + pt
    first = dict(init) if init is not None else None

    def value(name):
        def f():
            src = first if first is not None else init_grammar(nt, pt, v)
            t = torch.as_tensor(src[name], dtype=torch.get_default_dtype())
            return t.reshape(nt, s * s).clone() if name == "rules" else t.clone()

        return f

    root = pyro.param("root", value("root"), constraint=constraints.simplex)
    rules = pyro.param("rules", value("rules"), constraint=constraints.simplex)
    emission = pyro.param("emission", value("emission"), constraint=constraints.simplex)
    with pyro.plate("sentences", len(lengths)):
        pyro.sample(
            "x",
            PCFG(
                root.log(),
                rules.log().reshape(nt, s, s),
                emission.log(),
                lengths,
                max_length=words.shape[-1],
            ),
            obs=words,
        )


def grammar_log_likelihood(grammar: Mapping, words: Tensor, lengths: Tensor) -> float:
    """Total :math:`\\log p(x)` (nats) of sentences under a grammar dict of probabilities.

    Example::

        >>> g = default_grammar()
        >>> grammar_log_likelihood(g, *sample_sentences(g, 5)) < 0
        True
    """
    nt, pt, _ = grammar_sizes(grammar)
    rules = torch.as_tensor(grammar["rules"]).reshape(nt, nt + pt, nt + pt)
    d = PCFG(
        torch.as_tensor(grammar["root"]).log(),
        rules.log(),
        torch.as_tensor(grammar["emission"]).log(),
        lengths,
        max_length=words.shape[-1],
    )
    return float(d.log_prob(words).sum())
