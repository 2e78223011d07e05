"""Benchmark of CTC's exact E-step: ``log p(y | x)`` and its alignment posterior, ours against
``torch.nn.functional.ctc_loss`` and its backward.

Run from the repository root::

    python benchmarks/ctc.py            # the digit strings' size and a speech-like size
    python benchmarks/ctc.py --quick    # small sizes, few repeats (a smoke test)

Each size is a batch of ``B`` random label sequences (lengths uniform in ``1..L``, labels
``1..C-1``, blank 0) and random logits ``(B, T, C)``, float64, side by side in one process
(interleaved, ``--repeat`` times, medians reported):

* **ours, kernel**: :func:`pyro_emvae.distributions.ctc.ctc_log_z` on ``CTC(logits).lattice(y)``
  and its backward to the logits: the lattice forward algorithm and the beta recursion, which
  also gives the occupancies of the lattice states (``ctc_loss`` does not);
* **ours, ExactEStep**: ``ExactEStep(model).posterior(...)`` on a model whose logits are a
  param: one model pass under Pyro, the kernel, the occupancies (what ``fit`` runs per step);
* **peer**: ``ctc_loss(log_softmax(logits), ..., reduction="none").sum()`` and its backward
  (PyTorch's C++ CPU kernel; its gradient in the logits is ``softmax - gamma``).

Checks before the table (``AssertionError`` on failure): the log-likelihoods agree to 1e-10
(relative) and the per-frame label posterior from our occupancies equals the one implied by
``ctc_loss``'s gradient (to 1e-10). Ratios are ``peer_time / our_time`` (>1: ours faster).
Because ``ctc_loss`` is the faster of the two for ``log p`` alone, ``CTC.log_prob`` calls it;
``ExactEStep`` runs the lattice kernel, whose backward gives the occupancies.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_emvae import ExactEStep
from pyro_emvae.distributions.ctc import CTC, ctc_lattice, ctc_log_z, frame_posterior

SIZES = {"digits": (256, 42, 11, 4), "speech": (32, 200, 30, 40)}
QUICK = {"digits": (16, 12, 5, 3), "speech": (4, 40, 8, 10)}


def _problem(b, t, c, ell, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, c, generator=g, dtype=torch.float64)
    labels = torch.randint(1, c, (b, t), generator=g)
    lengths = torch.randint(1, ell + 1, (b,), generator=g)
    labels = torch.where(torch.arange(t) < lengths[:, None], labels, -1)
    return logits, labels, torch.full((b,), t)


def _ours(logits, labels, lengths):
    x = logits.detach().requires_grad_()
    e, skip, lengths, n_states, _, _ = CTC(x, lengths, validate_args=False).lattice(labels)
    lp = ctc_log_z(e, skip, lengths, n_states)
    (g,) = torch.autograd.grad(lp.sum(), [x])
    return lp.detach(), g


def _peer(logits, labels, lengths):
    x = logits.detach().requires_grad_()
    nll = F.ctc_loss(
        x.log_softmax(-1).transpose(0, 1),
        labels.clamp_min(0),
        lengths,
        (labels >= 0).sum(-1),
        reduction="none",
    )
    (g,) = torch.autograd.grad(nll.sum(), [x])
    return -nll.detach(), g


def _estep(logits, labels, lengths):
    def model(lengths, labels):
        w = pyro.param("w", logits.clone())
        with pyro.plate("seqs", len(labels)):
            pyro.sample("y", CTC(w, lengths), obs=labels)

    guide = ExactEStep(model)

    def run():
        return guide.posterior(lengths, labels)

    return run


def _check(logits, labels, lengths) -> None:
    lp, _ = _ours(logits, labels, lengths)
    ref, g = _peer(logits, labels, lengths)
    assert torch.allclose(lp, ref, rtol=1e-10, atol=0), "log p differs from ctc_loss"
    pyro.clear_param_store()
    post = _estep(logits, labels, lengths)()
    assert torch.allclose(post.log_likelihood, ref.sum(), rtol=1e-10, atol=0)
    occ = post.marginals["y"]
    ext = ctc_lattice(labels)[0][:, : occ.size(-1)]
    gamma = frame_posterior(occ, ext, logits.size(-1))
    implied = logits.softmax(-1) - g  # d(-log p)/d logits = softmax - gamma
    assert float((gamma - implied).abs().max()) < 1e-10, "posterior differs from ctc_loss's"


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved rounds (def. 15)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else SIZES
    repeat = args.repeat or (3 if args.quick else 15)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float64, medians of {repeat}")
    print(f"{'size':34s} {'ours kernel':>12s} {'ours E-step':>12s} {'ctc_loss':>10s} {'ratio':>7s}")
    out = {}
    for name, (b, t, c, ell) in sizes.items():
        logits, labels, lengths = _problem(b, t, c, ell)
        _check(logits, labels, lengths)
        pyro.clear_param_store()
        estep = _estep(logits, labels, lengths)
        data = (logits, labels, lengths)
        runs = {
            "ours": functools.partial(_ours, *data),
            "estep": estep,
            "peer": functools.partial(_peer, *data),
        }
        for fn in runs.values():  # warm-up
            fn()
        med = {k: [] for k in runs}
        for _ in range(repeat):  # interleaved: the machine's load hits all alike
            for k, fn in runs.items():
                med[k].append(_time(fn, 1))
        res = {k: statistics.median(v) for k, v in med.items()}
        label = f"{name} B={b} T={t} C={c} L<={ell}"
        print(
            f"{label:34s} {res['ours'] * 1e3:10.2f}ms {res['estep'] * 1e3:10.2f}ms "
            f"{res['peer'] * 1e3:8.2f}ms {res['peer'] / res['ours']:7.2f}"
        )
        out[name] = res
    print("ratio = ctc_loss / ours kernel (> 1: ours faster); checks passed")
    return out


if __name__ == "__main__":
    main()
