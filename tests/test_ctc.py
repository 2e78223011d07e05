"""CTC as an implicit latent: the lattice kernel against brute force over every alignment and
against ``torch.nn.functional.ctc_loss``; ``ExactEStep`` on an observed CTC site (log p,
occupancies, best alignment, exact posterior draws); EG by ``fit`` (Fisher's identity)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_emvae import ExactEStep, GradientMStep, fit
from pyro_emvae.distributions.ctc import (
    CTC,
    collapse,
    ctc_lattice,
    ctc_log_z,
    ctc_occupancy,
    ctc_sample,
    ctc_viterbi,
    frame_posterior,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ctc import (
    FrameNet,
    greedy_decode,
    make_ctc_model,
    make_digit_strings,
    rescored_decode,
    sequence_metrics,
)

# repeated labels (1, 1: a blank must separate them), a single label, a label sequence that
# needs every frame, and one that no alignment fits in 3 frames
LABELS = torch.tensor([[1, 1, 2], [3, -1, -1], [2, 3, 2], [1, 1, 1], [2, 2, -1]])
LENGTHS = torch.tensor([6, 4, 5, 3, 6])
B, T, C = 5, 6, 4


def _collapse(pi) -> list[int]:
    """CTC's many-to-one map B in plain Python: merge repeats, drop blanks (0)."""
    out, prev = [], None
    for c in pi:
        if c != 0 and c != prev:
            out.append(c)
        prev = c
    return out


def _brute(lsm, labels, lengths):
    """Every alignment pi of length T_b over C labels: log p(y), the lattice occupancies
    (by mapping each alignment to its unique state path), the best alignment."""
    out = []
    table = lsm.tolist()
    for b in range(len(labels)):
        y = [v for v in labels[b].tolist() if v >= 0]
        t_len = int(lengths[b])
        scores, paths = [], []
        for pi in itertools.product(range(C), repeat=t_len):
            if _collapse(pi) != y:
                continue
            # the state path: label i of y occupies state 2i+1, a blank the state after the
            # last label emitted (0 before any)
            states, k, prev = [], -1, None
            for c in pi:
                if c == 0:
                    states.append(2 * (k + 1))
                else:
                    if c != prev:
                        k += 1
                    states.append(2 * k + 1)
                prev = c
            scores.append(sum(table[b][t][c] for t, c in enumerate(pi)))
            paths.append((pi, states))
        occ = torch.zeros(T, 2 * labels.size(1) + 1)
        best = None
        if scores:
            s = torch.tensor(scores)
            log_z = s.logsumexp(0)
            for w, (pi, states) in zip((s - log_z).exp().tolist(), paths):
                for t, st in enumerate(states):
                    occ[t, st] += w
            best = list(paths[int(s.argmax())][0]) + [-1] * (T - t_len)
        else:
            log_z = torch.tensor(float("-inf"))
        out.append((log_z, occ, best))
    return out


def _lattice(logits, labels=LABELS, lengths=LENGTHS):
    lsm = logits.log_softmax(-1)
    ext, skip, n_states, _ = ctc_lattice(labels)
    e = lsm.gather(-1, ext.unsqueeze(1).expand(-1, logits.size(1), -1))
    return lsm, ext, skip, n_states, e


def test_log_z_and_occupancies_equal_brute_force_and_ctc_loss():
    logits = torch.randn(B, T, C)
    lsm, ext, skip, n_states, e = _lattice(logits)
    e = e.detach().requires_grad_()
    log_z = ctc_log_z(e, skip, LENGTHS, n_states)
    (occ,) = torch.autograd.grad(log_z.sum(), [e])
    brute = _brute(lsm, LABELS, LENGTHS)
    for b, (lz, o, _) in enumerate(brute):
        assert torch.isinf(lz) == torch.isinf(log_z[b])
        if torch.isfinite(lz):
            torch.testing.assert_close(log_z[b], lz, atol=1e-12, rtol=0)
        torch.testing.assert_close(occ[b], o, atol=1e-12, rtol=0)
    assert torch.isinf(log_z[3])  # 1 1 1 needs 5 frames, it has 3: no alignment, zero posterior
    # ctc_loss on the same batch (its "inf" for no alignment is our -inf)
    ref = -F.ctc_loss(
        lsm.transpose(0, 1),
        LABELS.clamp_min(0),
        LENGTHS,
        (LABELS >= 0).sum(-1),
        reduction="none",
        zero_infinity=False,
    )
    torch.testing.assert_close(log_z, ref, atol=1e-12, rtol=0)
    # the distribution's log_prob (ctc_loss inside) is the same number, -inf included
    torch.testing.assert_close(CTC(logits, LENGTHS).log_prob(_padded()), log_z, atol=1e-12, rtol=0)
    # occupancies without autograd are the same; the label posterior is ctc_loss's gradient
    torch.testing.assert_close(ctc_occupancy(e.detach(), skip, LENGTHS, n_states), occ)
    x = logits.clone().requires_grad_()
    finite = torch.isfinite(ref)
    nll = F.ctc_loss(
        x.log_softmax(-1).transpose(0, 1),
        LABELS.clamp_min(0),
        LENGTHS,
        (LABELS >= 0).sum(-1),
        reduction="none",
    )
    (g,) = torch.autograd.grad(nll[finite].sum(), [x])
    # d(-log p)/d logits = softmax - gamma on a sequence's frames (zero after them)
    frames = (torch.arange(T) < LENGTHS.unsqueeze(-1)).unsqueeze(-1)
    gamma = frame_posterior(occ, ext, C)
    want = (x.softmax(-1) * frames - gamma)[finite]
    torch.testing.assert_close(g[finite], want.detach(), atol=1e-12, rtol=0)


def test_padding_frames_cannot_turn_the_occupancies_into_nan():
    """After a sequence's last frame the forward and backward messages run on in the padding,
    where alpha + beta may exceed log Z by more than exp's range (here 1600 nats)."""
    logits = torch.zeros(1, 8, 3)
    logits[0, :3, 1] = 800.0  # the sequence's 3 frames say label 1; its labels are 1 2
    logits[0, 3:, 2] = 800.0  # the padding frames say label 2
    d = CTC(logits, torch.tensor([3]))
    e, skip, lengths, n_states, _, _ = d.lattice(torch.tensor([[1, 2]]))
    e = e.detach().requires_grad_()
    log_z = ctc_log_z(e, skip, lengths, n_states)
    (occ,) = torch.autograd.grad(log_z.sum(), [e])
    torch.testing.assert_close(log_z, torch.tensor([-800.0]), atol=1e-9, rtol=0)
    assert not occ.isnan().any()
    assert occ[0, 3:].abs().sum() == 0
    torch.testing.assert_close(occ[0, :3].sum(-1), torch.ones(3))


def test_log_prob_float32_equals_float64():
    logits = torch.randn(B, T, C) * 4
    lp64 = CTC(logits, LENGTHS).log_prob(LABELS)
    lp32 = CTC(logits.float(), LENGTHS).log_prob(LABELS)
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, atol=1e-4, rtol=1e-5)


def test_viterbi_is_the_brute_force_argmax_and_samples_are_exact():
    logits = torch.randn(B, T, C) * 2
    lsm, ext, skip, n_states, e = _lattice(logits)
    path, score = ctc_viterbi(e, skip, LENGTHS, n_states)
    for b, (lz, _, best) in enumerate(_brute(lsm, LABELS, LENGTHS)):
        if best is None:
            assert (path[b] == -1).all() and torch.isinf(score[b])
            continue
        labels = torch.where(path[b] >= 0, ext[b].gather(0, path[b].clamp_min(0)), -1)
        assert labels.tolist() == best
        on = path[b] >= 0
        torch.testing.assert_close(score[b], lsm[b, on].gather(-1, labels[on, None]).sum())
    # exact draws: their empirical occupancies approach the exact ones
    draws = ctc_sample(e, skip, LENGTHS, n_states, num_samples=4000)
    occ = ctc_occupancy(e, skip, LENGTHS, n_states)
    hits = F.one_hot(draws.clamp_min(0), e.size(-1)) * (draws >= 0).unsqueeze(-1)
    emp = hits.double().mean(0)
    ok = torch.isfinite(ctc_log_z(e, skip, LENGTHS, n_states))
    assert (emp[ok] - occ[ok]).abs().max() < 0.04  # 4000 draws: sd <= 0.008
    # every draw is a valid alignment of its labels
    for b in range(B):
        if not ok[b]:
            continue
        for pi in draws[:20, b]:
            lab = torch.where(pi >= 0, ext[b].gather(0, pi.clamp_min(0)), -1)
            assert collapse(lab, 0, LENGTHS[b])[: LABELS.size(1)].tolist() == LABELS[b].tolist()


def test_distribution_sample_collapse_and_validation():
    d = CTC(torch.randn(3, 8, 5), input_lengths=torch.tensor([8, 6, 4]))
    y = d.sample()
    assert y.shape == (3, 8) and (y[:, 4:][2] == -1).all()
    assert torch.isfinite(d.log_prob(y)).all()
    assert collapse(torch.tensor([0, 1, 1, 0, 1, 2, 2])).tolist() == [1, 1, 2, -1, -1, -1, -1]
    frames = torch.randint(0, 4, (200, 7))
    for f, got in zip(frames.tolist(), collapse(frames).tolist()):
        assert [v for v in got if v >= 0] == _collapse(f)
    # a particle dim on the left (arviz's draws, a sample plate) broadcasts with the value
    wide = d.expand((2, 3)).log_prob(y)
    assert wide.shape == (2, 3)
    torch.testing.assert_close(wide, d.log_prob(y).expand(2, 3))
    with pytest.raises(ValueError, match="blank"):
        d.log_prob(torch.tensor([[1, 0, 2], [1, -1, -1], [2, -1, -1]]))
    with pytest.raises(ValueError, match="padded at the end"):
        d.log_prob(torch.tensor([[1, -1, 2], [1, -1, -1], [2, -1, -1]]))


# ---------------------------------------------------------------------------- ExactEStep
def _ctc_model(logits):
    def model(lengths, targets):
        w = pyro.param("w", logits.clone())
        with pyro.plate("seqs", len(targets)):
            pyro.sample("y", CTC(w, lengths), obs=targets)

    return model


def _padded(labels=LABELS):
    return F.pad(labels, (0, T - labels.size(1)), value=-1)


def test_exact_estep_on_a_ctc_site():
    ok = torch.tensor([0, 1, 2, 4])  # drop the sequence with no alignment (log p = -inf)
    logits = torch.randn(len(ok), T, C)
    labels, lengths = LABELS[ok], LENGTHS[ok]
    model = _ctc_model(logits)
    guide = ExactEStep(model)
    post = guide.posterior(lengths, _padded(labels))
    lsm = logits.log_softmax(-1)
    brute = _brute(lsm, labels, lengths)
    torch.testing.assert_close(post.log_likelihood, sum(b[0] for b in brute), atol=1e-12, rtol=0)
    occ = post.marginals["y"]
    assert occ.shape == (len(ok), T, 2 * LABELS.size(1) + 1)
    for b, (_, o, _) in enumerate(brute):
        torch.testing.assert_close(occ[b], o, atol=1e-12, rtol=0)
    torch.testing.assert_close(guide.log_likelihood(lengths, _padded(labels)), post.log_likelihood)
    best = guide.map(lengths, _padded(labels))["y"]
    assert best.tolist() == [b[2] for b in brute]
    draws = guide.sample(lengths, _padded(labels), num_samples=5)["y"]
    assert draws.shape == (5, len(ok), T)
    for s in draws:
        assert (collapse(s, 0, lengths)[:, : labels.size(1)] == labels).all()
    # E_q[log p(y, pi)] at q = the posterior is log p(y) - H(q): below log p, and by
    # Fisher's identity its gradient is that of log p(y)
    store = pyro.get_param_store()
    w = store.get_param("w").unconstrained()
    q = guide.expected_log_joint(post, lengths, _padded(labels))
    assert float(q.detach()) < float(post.log_likelihood)
    (g_q,) = torch.autograd.grad(q, [w])
    ref = -F.ctc_loss(
        w.log_softmax(-1).transpose(0, 1),
        labels.clamp_min(0),
        lengths,
        (labels >= 0).sum(-1),
        reduction="sum",
    )
    (g_ref,) = torch.autograd.grad(ref, [w])
    torch.testing.assert_close(g_q, g_ref, atol=1e-12, rtol=0)


def test_eg_fit_takes_the_exact_log_likelihood_gradient():
    """Fisher's identity for a network: the E-step's param gradients equal autograd on the
    exact log-likelihood (ctc_loss, independent code), and fit's first EG step is exactly an
    SGD step along them."""
    frames, lengths, targets, _ = make_digit_strings(12, max_len=3, seed=1)
    frames = frames.double()
    pyro.set_rng_seed(0)
    net = FrameNet(hidden=8).double()
    model = make_ctc_model(net)
    guide = ExactEStep(model)
    post = guide.posterior(frames, lengths, targets, param_grads=True)
    params = dict(net.named_parameters())
    assert set(post.param_grads) == {"net$$$" + n for n in params}
    logits = net(frames)
    ll = -F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        targets.clamp_min(0),
        lengths,
        (targets >= 0).sum(-1),
        reduction="sum",
    )
    torch.testing.assert_close(post.log_likelihood, ll.detach(), atol=1e-9, rtol=0)
    ref = torch.autograd.grad(ll, list(params.values()))
    for (n, _), r in zip(params.items(), ref):
        assert float(r.abs().max()) > 1e-4  # not at a stationary point
        torch.testing.assert_close(post.param_grads["net$$$" + n], r, atol=1e-9, rtol=1e-9)
    before = {n: p.detach().clone() for n, p in params.items()}
    lr = 1e-3
    GradientMStep(pyro.optim.SGD({"lr": lr}))(guide, post, (frames, lengths, targets), {})
    for n, p in params.items():
        torch.testing.assert_close(
            p.detach(), before[n] + lr * post.param_grads["net$$$" + n], atol=1e-12, rtol=0
        )
    # fit runs EG from the same start: its first log-likelihood is the E-step's
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(before[n])
    result = fit(
        model,
        ExactEStep(model),
        frames,
        lengths,
        targets,
        optim=pyro.optim.Adam({"lr": 0.01}),
        max_iter=5,
        tol=0,
        progress=False,
    )
    h = result.history["log_likelihood"]
    assert h[0] == pytest.approx(float(ll.detach()), abs=1e-9)
    assert h[-1] > h[0] + 1.0  # EG climbs the exact log-likelihood


def test_digit_strings_and_decoders():
    frames, lengths, targets, strings = make_digit_strings(10, min_len=1, max_len=4, seed=2)
    assert frames.shape[1] == targets.shape[1] == 4 * 8 + 5 * 2
    for t, s, n in zip(targets, strings, lengths):
        assert [v - 1 for v in t.tolist() if v >= 0] == [int(c) for c in s]
        assert 8 * len(s) <= n <= 8 * len(s) + 2 * (len(s) + 1)
    # a perfect frame scorer: greedy and rescored decoding both recover the strings
    logits = torch.full(frames.shape[:2] + (11,), -20.0)
    for b, (t, n) in enumerate(zip(targets, lengths)):
        lab = [v for v in t.tolist() if v >= 0]
        pi = [0] * int(n)
        for i, v in enumerate(lab):
            pi[2 * i + 1] = v  # label, blank, label, ... : always a valid alignment
        logits[b, torch.arange(int(n)), torch.tensor(pi)] = 0.0
    for dec in (greedy_decode(logits, lengths), rescored_decode(logits, lengths)):
        m = sequence_metrics(dec, targets)
        assert m == {"sequence_accuracy": 1.0, "label_error_rate": 0.0}
    wrong = targets.clone()
    wrong[0, 0] = 1 + (wrong[0, 0] % 10)  # one substituted label
    m = sequence_metrics(wrong, targets)
    assert m["sequence_accuracy"] == 0.9
    assert m["label_error_rate"] == pytest.approx(1 / int((targets >= 0).sum()))


def test_benchmark_quick_run_passes_its_checks(capsys):
    from benchmarks import ctc as ctc_bench

    result = ctc_bench.main(["--quick", "--repeat", "1"])
    assert set(result) == {"digits", "speech"}
    assert all(set(r) == {"ours", "estep", "peer"} for r in result.values())
    assert "checks passed" in capsys.readouterr().out
