"""The PCFG distribution and its inside-outside EM against exact references: brute-force
enumeration of every binary tree (log p(x), expected rule counts, span marginals, the MAP tree,
posterior draws), torch-struct's ``SentCFG`` (partition and marginals), a hand-written
inside-outside EM, and float32 on long sentences."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math

import pyro
import pytest
import torch

from pyro_emvae import EMOptim, ExactEStep, fit
from pyro_emvae.distributions import PCFG, pcfg_marginals, pcfg_sample, pcfg_viterbi

HAVE_TORCH_STRUCT = importlib.util.find_spec("torch_struct") is not None


def _grammar(nt, pt, v, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    s = nt + pt
    root = (sharp * torch.randn(nt, generator=g)).log_softmax(-1)
    rules = (sharp * torch.randn(nt, s * s, generator=g)).log_softmax(-1).reshape(nt, s, s)
    emission = (sharp * torch.randn(pt, v, generator=g)).log_softmax(-1)
    return root, rules, emission


@functools.cache
def _bracketings(i, j):
    """Every binary bracketing of words i..j as a tuple of (i, k, j) splits."""
    if i == j:
        return [()]
    out = []
    for k in range(i, j):
        for left in _bracketings(i, k):
            for right in _bracketings(k + 1, j):
                out.append(((i, k, j),) + left + right)
    return out


def _brute(root, rules, emission, words):
    """Every labelled tree of ``words``: log p(x), root/rule counts, span marginals (L, L, S),
    tag marginals and the best tree (as {(i, j): label})."""
    nt, s = root.shape[0], rules.shape[-1]
    n = len(words)
    scores, trees = [], []
    for br in _bracketings(0, n - 1):
        spans = [(i, j) for i, _, j in br]  # internal nodes, the first is the root
        for labels in itertools.product(range(nt), repeat=len(spans)):
            for tags in itertools.product(range(s - nt), repeat=n):
                lab = dict(zip(spans, labels))
                for t in range(n):
                    lab[(t, t)] = nt + tags[t]
                score = root[lab[(0, n - 1)]]
                for i, k, j in br:
                    score = score + rules[lab[(i, j)], lab[(i, k)], lab[(k + 1, j)]]
                for t in range(n):
                    score = score + emission[tags[t], words[t]]
                scores.append(score)
                trees.append((br, lab))
    scores = torch.stack(scores)
    log_z = scores.logsumexp(0)
    post = (scores - log_z).exp()
    c_root, c_rules = torch.zeros_like(root), torch.zeros_like(rules)
    spans_m = torch.zeros(n, n, s)
    for p, (br, lab) in zip(post, trees):
        c_root[lab[(0, n - 1)]] += p
        for i, k, j in br:
            c_rules[lab[(i, j)], lab[(i, k)], lab[(k + 1, j)]] += p
        for (i, j), a in lab.items():
            spans_m[j - i, i, a] += p  # width-major
    best = trees[int(scores.argmax())][1]
    return log_z, c_root, c_rules, spans_m, best, scores, trees


def _batch(emission, sents):
    """Words (B, L) padded with 0 and lengths."""
    length = max(len(x) for x in sents)
    words = torch.zeros(len(sents), length, dtype=torch.long)
    for b, x in enumerate(sents):
        words[b, : len(x)] = torch.tensor(x)
    return words, torch.tensor([len(x) for x in sents])


SENTS = [[0, 1], [2, 0, 1], [1, 1, 2, 0], [2, 2, 0]]


def _dist(root, rules, emission, sents):
    words, lengths = _batch(emission, sents)
    return PCFG(root, rules, emission, lengths), words


def test_log_prob_counts_and_span_marginals_equal_brute_force():
    root, rules, emission = _grammar(2, 2, 3)
    d, words = _dist(root, rules, emission, SENTS)
    log_z, c_root, c_rules, spans = pcfg_marginals(
        *d.normalized()[:2], d.span_potentials(words), d.lengths
    )
    assert torch.allclose(d.log_prob(words), log_z)
    want_root, want_rules = torch.zeros_like(root), torch.zeros_like(rules)
    for b, x in enumerate(SENTS):
        lz, cr, cu, sp, *_ = _brute(root, rules, emission, x)
        assert torch.allclose(log_z[b], lz, atol=1e-10)
        n = len(x)
        assert torch.allclose(spans[b, :n, :n], sp, atol=1e-10)
        assert spans[b, n:].abs().sum() == 0 and spans[b, :, n:].abs().sum() == 0  # padding
        want_root += cr
        want_rules += cu
    assert torch.allclose(c_root, want_root, atol=1e-10)
    assert torch.allclose(c_rules, want_rules, atol=1e-10)


def test_length_one_has_no_tree_and_nonnormalized_logits_are_normalized():
    root, rules, emission = _grammar(2, 2, 3)
    d = PCFG(root + 3.0, rules + 1.0, emission - 2.0, torch.tensor([1, 2]))
    lp = d.log_prob(torch.tensor([[0, 0], [0, 1]]))
    assert lp[0] == -math.inf
    assert torch.allclose(lp[1], _brute(root, rules, emission, [0, 1])[0])


def test_viterbi_equals_brute_force_map_tree():
    root, rules, emission = _grammar(2, 3, 3, seed=1, sharp=2.0)
    d, words = _dist(root, rules, emission, SENTS)
    tree, score = pcfg_viterbi(*d._parts(words))
    for b, x in enumerate(SENTS):
        *_, best, scores, _ = _brute(root, rules, emission, x)
        assert torch.allclose(score[b], scores.max())
        got = {(i, j): int(tree[b, i, j]) for i in range(len(x)) for j in range(len(x))}
        assert {k: v for k, v in got.items() if v >= 0} == best
    assert (tree[0, 2:, :] == -1).all() and (tree[0, :, 2:] == -1).all()


def test_posterior_samples_follow_the_brute_force_posterior():
    root, rules, emission = _grammar(1, 2, 2, seed=2, sharp=1.5)
    x = [0, 1, 1]
    d, words = _dist(root, rules, emission, [x])
    draws = pcfg_sample(
        *d._parts(words), num_samples=4000, generator=torch.Generator().manual_seed(0)
    )
    _, _, _, _, _, scores, trees = _brute(root, rules, emission, x)
    post = (scores - scores.logsumexp(0)).exp()
    key = lambda lab: tuple(sorted(lab.items()))
    want = {key(lab): float(p) for p, (_, lab) in zip(post, trees)}
    counts: dict = {}
    for t in draws[:, 0]:
        lab = {(i, j): int(t[i, j]) for i in range(3) for j in range(3) if t[i, j] >= 0}
        counts[key(lab)] = counts.get(key(lab), 0) + 1
    assert set(counts) <= set(want)
    for k, p in want.items():
        freq = counts.get(k, 0) / 4000
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1e-3, (k, freq, p)


def test_sample_gives_sentences_of_the_given_lengths():
    root, rules, emission = _grammar(2, 2, 5)
    d = PCFG(root, rules, emission, torch.tensor([4, 2, 3]))
    x = d.sample((7,))
    assert x.shape == (7, 3, 4)
    assert (x[:, 1, 2:] == 0).all() and (x[:, 2, 3:] == 0).all()
    assert torch.isfinite(d.log_prob(x)).all()


def test_float32_long_sentences_match_float64():
    root, rules, emission = _grammar(4, 6, 50, seed=3, sharp=2.0)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 50, (3, 30), generator=g)
    lengths = torch.tensor([30, 25, 17])
    d64 = PCFG(root, rules, emission, lengths)
    d32 = PCFG(root.float(), rules.float(), emission.float(), lengths)
    lp64, lp32 = d64.log_prob(words), d32.log_prob(words)
    assert lp32.dtype == torch.float32 and torch.isfinite(lp32).all()
    assert lp64.min() < -104  # p(x) below float32's smallest subnormal (exp(-103.3))
    assert torch.allclose(lp32.double(), lp64, rtol=1e-5)
    m64 = pcfg_marginals(*d64._parts(words))
    m32 = pcfg_marginals(*d32._parts(words))
    for a, b in zip(m64[1:], m32[1:]):
        assert torch.isfinite(b).all()
        assert torch.allclose(b.double(), a, atol=2e-4)


@pytest.mark.skipif(not HAVE_TORCH_STRUCT, reason="torch-struct is not installed")
def test_partition_and_marginals_equal_torch_struct_sentcfg():
    try:
        from torch_struct import SentCFG
    except (ImportError, AttributeError, RuntimeError) as e:  # (fails on this torch)
        pytest.skip(f"torch_struct does not import: {e}")
    nt, pt, v = 3, 4, 6
    root, rules, emission = _grammar(nt, pt, v, seed=4)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 5, 2, 6])
    words = torch.randint(0, v, (4, 7), generator=g)
    d = PCFG(root, rules, emission, lengths)
    log_z, c_root, c_rules, spans = pcfg_marginals(*d._parts(words))
    terms = emission.T[words]  # (B, N, T)
    b = words.shape[0]
    ts = SentCFG((terms, rules.expand(b, -1, -1, -1), root.expand(b, -1)), lengths=lengths)
    assert torch.allclose(ts.partition, log_z)
    t_term, t_rule, t_root, t_span = ts.marginals
    assert torch.allclose(t_rule.sum(0), c_rules, atol=1e-8)
    assert torch.allclose(t_root.sum(0), c_root, atol=1e-8)
    assert torch.allclose(t_term, spans[:, 0, :, nt:], atol=1e-8)
    # torch-struct's spans (B, w - 2, i, NT) start at width 2
    for w in range(2, 8):
        assert torch.allclose(t_span[:, w - 2, : 8 - w], spans[:, w - 1, : 8 - w, :nt], atol=1e-8)


# ---------------------------------------------------------------- the model and EM
def _model(words, lengths, nt, pt, v):
    s = nt + pt
    simplex = torch.distributions.constraints.simplex
    root = pyro.param("root", torch.full((nt,), 1.0 / nt), constraint=simplex)
    rules = pyro.param("rules", torch.full((nt, s * s), 1.0 / s**2), constraint=simplex)
    emission = pyro.param("emission", torch.full((pt, v), 1.0 / v), constraint=simplex)
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


def _init(nt, pt, v, seed=0):
    root, rules, emission = _grammar(nt, pt, v, seed=seed)
    pyro.clear_param_store()
    simplex = torch.distributions.constraints.simplex
    pyro.param("root", root.exp(), constraint=simplex)
    pyro.param("rules", rules.exp().reshape(nt, -1), constraint=simplex)
    pyro.param("emission", emission.exp(), constraint=simplex)


def _hand_em(root, rules, emission, words, lengths, iters):
    """Inside-outside EM written out: counts by brute force over every tree, normalized."""
    out = []
    for _ in range(iters):
        cr, cu, ce, ll = (
            torch.zeros_like(root),
            torch.zeros_like(rules),
            torch.zeros_like(emission),
            0.0,
        )
        for b in range(len(lengths)):
            x = words[b, : lengths[b]].tolist()
            lz, r, u, sp, *_ = _brute(root, rules, emission, x)
            ll += float(lz)
            cr += r
            cu += u
            nt = root.shape[0]
            for t, w in enumerate(x):
                ce[:, w] += sp[0, t, nt:]
        out.append(ll)
        root = (cr / cr.sum()).log()
        rules = (cu / cu.flatten(1).sum(-1)[:, None, None]).log()
        emission = (ce / ce.sum(-1, keepdim=True)).log()
    return out, (root, rules, emission)


def test_estep_posterior_map_and_sample_under_the_model():
    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    _init(nt, pt, v)
    guide = ExactEStep(_model)
    post = guide.posterior(words, lengths, nt, pt, v)
    root, rules, emission = (pyro.param(n).detach() for n in ("root", "rules", "emission"))
    rules = rules.reshape(nt, nt + pt, nt + pt)
    want = sum(float(_brute(root.log(), rules.log(), emission.log(), x)[0]) for x in SENTS)
    assert abs(float(post.log_likelihood) - want) < 1e-9
    for b, x in enumerate(SENTS):
        sp = _brute(root.log(), rules.log(), emission.log(), x)[3]
        assert torch.allclose(post.marginals["x"][b, : len(x), : len(x)], sp, atol=1e-10)
    tree = guide.map(words, lengths, nt, pt, v)["x"]
    assert tree.shape == (4, 4, 4)
    for b, x in enumerate(SENTS):
        best = _brute(root.log(), rules.log(), emission.log(), x)[4]
        got = {(i, j): int(tree[b, i, j]) for i in range(4) for j in range(4) if tree[b, i, j] >= 0}
        assert got == best
    draws = guide.sample(words, lengths, nt, pt, v, num_samples=5)["x"]
    assert draws.shape == (5, 4, 4, 4)
    assert (draws[:, 0, 0, 1] >= 0).all() and (draws[:, 0, 0, 1] < nt).all()


def test_em_is_monotone_and_equals_hand_written_inside_outside():
    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    _init(nt, pt, v, seed=5)
    root, rules, emission = _grammar(nt, pt, v, seed=5)
    want, (r_end, u_end, e_end) = _hand_em(root, rules, emission, words, lengths, 4)
    res = fit(
        _model, ExactEStep(_model), words, lengths, nt, pt, v, optim=EMOptim(), max_iter=4, tol=0.0
    )
    ll = [float(x) for x in res.history["log_likelihood"]][:4]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(ll))
    assert ll == pytest.approx(want, abs=1e-8)
    assert torch.allclose(pyro.param("root").detach(), r_end.exp(), atol=1e-8)
    assert torch.allclose(pyro.param("rules").detach(), u_end.exp().reshape(nt, -1), atol=1e-8)
    assert torch.allclose(pyro.param("emission").detach(), e_end.exp(), atol=1e-8)


def test_eg_param_grads_equal_autograd_and_masked_sentences_drop_out():
    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    _init(nt, pt, v, seed=6)
    post = ExactEStep(_model).posterior(words, lengths, nt, pt, v, param_grads=True)
    tr = pyro.poutine.trace(_model).get_trace(words, lengths, nt, pt, v)
    store = pyro.get_param_store()
    names = ["root", "rules", "emission"]
    unc = [store._params[n] for n in names]
    want = torch.autograd.grad(tr.log_prob_sum(), unc)
    for n, g in zip(names, want):
        assert torch.allclose(post.param_grads[n], g, atol=1e-10)

    # EM with sentences 1 and 3 masked equals EM on sentences 0 and 2 alone
    def masked(words, lengths, keep):
        with pyro.poutine.mask(mask=keep):
            _model(words, lengths, nt, pt, v)

    keep = torch.tensor([True, False, True, False])
    _init(nt, pt, v, seed=6)
    fit(masked, ExactEStep(masked), words, lengths, keep, max_iter=2, tol=0.0, progress=False)
    got = {n: pyro.param(n).detach().clone() for n in names}
    _init(nt, pt, v, seed=6)
    sub = words[keep]
    fit(
        _model,
        ExactEStep(_model),
        sub,
        lengths[keep],
        nt,
        pt,
        v,
        max_iter=2,
        tol=0.0,
        progress=False,
    )
    for n in names:
        assert torch.allclose(got[n], pyro.param(n).detach(), atol=1e-10), n


def test_score_and_sample_dims_broadcast_against_the_lengths():
    from pyro_emvae.evaluate import score

    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    _init(nt, pt, v, seed=7)
    exact = float(ExactEStep(_model).log_likelihood(words, lengths, nt, pt, v))
    assert score(_model, ExactEStep(_model), words, lengths, nt, pt, v) == pytest.approx(exact / 4)
    root, rules, emission = _grammar(nt, pt, v)
    d = PCFG(root, rules, emission, lengths).expand((3, 4))
    lp = d.log_prob(words)  # (4, L) words against (3, 4) lengths
    assert lp.shape == (3, 4) and torch.equal(lp[0], lp[2])
    assert torch.allclose(lp[1], PCFG(root, rules, emission, lengths).log_prob(words))


def test_random_init_breaks_the_uniform_grammars_symmetry():
    """``init="random"`` draws random tag potentials for a PCFG site (its words are labels):
    from a uniform grammar, whose exchangeable preterminals EM can never tell apart, each seed
    starts EM somewhere else and climbs above the symmetric fixed point."""
    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    fits = {}
    for init, seed in (("model", 0), ("random", 0), ("random", 1)):
        pyro.clear_param_store()
        res = fit(
            _model,
            ExactEStep(_model),
            words,
            lengths,
            nt,
            pt,
            v,
            init=init,
            seed=seed,
            max_iter=30,
            tol=0.0,
        )
        hist = [float(x) for x in res.history["log_likelihood"]]
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(hist))  # EM from there on
        fits[init, seed] = (res.log_likelihood, pyro.param("emission").detach().clone())
    ll_sym, em_sym = fits["model", 0]
    assert torch.allclose(em_sym[0], em_sym[1])  # the symmetric fixed point
    for seed in (0, 1):
        ll, em = fits["random", seed]
        assert not torch.allclose(em[0], em[1], atol=1e-3)  # the two tags now differ
        assert ll > ll_sym + 1e-3
    assert not torch.allclose(fits["random", 0][1], fits["random", 1][1], atol=1e-6)


def test_a_dot_masked_pcfg_reads_as_poutine_mask():
    """``PCFG(...).mask(keep)`` is ``poutine.mask(mask=keep)`` around it: the E-step read the
    MaskedDistribution as an opaque observed site and crashed (split_with_sizes); now log p(x)
    and EM's params equal poutine.mask's."""
    nt, pt, v = 2, 2, 3
    words, lengths = _batch(None, SENTS)
    keep = torch.tensor([True, False, True, False])
    s = nt + pt

    def dot_masked(words, lengths, keep):
        simplex = torch.distributions.constraints.simplex
        root = pyro.param("root", torch.full((nt,), 1.0 / nt), constraint=simplex)
        rules = pyro.param("rules", torch.full((nt, s * s), 1.0 / s**2), constraint=simplex)
        emission = pyro.param("emission", torch.full((pt, v), 1.0 / v), constraint=simplex)
        pcfg = PCFG(
            root.log(),
            rules.log().reshape(nt, s, s),
            emission.log(),
            lengths,
            max_length=words.shape[-1],
        )
        with pyro.plate("sentences", len(lengths)):
            pyro.sample("x", pcfg.mask(keep), obs=words)

    def masked(words, lengths, keep):
        with pyro.poutine.mask(mask=keep):
            _model(words, lengths, nt, pt, v)

    out = []
    for model in (dot_masked, masked):
        _init(nt, pt, v, seed=6)
        ll = ExactEStep(model).posterior(words, lengths, keep).log_likelihood
        fit(model, ExactEStep(model), words, lengths, keep, max_iter=2, tol=0.0, progress=False)
        out.append((ll, {n: pyro.param(n).detach().clone() for n in ("root", "rules", "emission")}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], rtol=1e-10, atol=1e-10)
