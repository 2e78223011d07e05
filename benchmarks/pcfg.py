"""PCFG inside-outside: our E-step against torch-struct's ``SentCFG`` on the same batch.

    python benchmarks/pcfg.py            # 256 sentences of length 20, NT=10, PT=20, V=100
    python benchmarks/pcfg.py --quick    # 16 sentences of length 8 (a smoke test)

Rows (seconds, median of ``--repeat`` runs, one process, float32 and float64):

* ``pcfg_marginals (ours)``: log Z, expected root / rule counts and span marginals (one scaled
  inside pass + one backward pass);
* ``torch-struct logpartition + grad``: its log-semiring CKY and one ``autograd.grad`` for the
  same counts (the fair peer);
* ``torch-struct SentCFG.marginals``: its public marginals (``create_graph=True``);
* ``ExactEStep.posterior (ours)``: the whole E-step on the Pyro model;
* ``EM iteration (ours)``: one E-step plus the closed-form M-step (``EMOptim``).

The ratio column is each row's time over ours. The checks compare log Z and the counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pcfg import init_grammar, pcfg_model
from pyro_emvae import EMOptim, ExactEStep
from pyro_emvae.distributions import PCFG, pcfg_marginals

OURS = "pcfg_marginals (ours)"
PEER = "torch-struct logpartition + grad"
PEER_PUBLIC = "torch-struct SentCFG.marginals"
ESTEP = "ExactEStep.posterior (ours)"
EM = "EM iteration (ours)"


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _problem(b, length, nt, pt, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = init_grammar(nt, pt, v, seed=seed, dtype=dtype)
    words = torch.randint(0, v, (b, length), generator=g)
    lengths = torch.full((b,), length)
    lengths[: b // 4] = torch.randint(2, length + 1, (b // 4,), generator=g)  # some shorter
    s = nt + pt
    d = PCFG(p["root"].log(), p["rules"].log().reshape(nt, s, s), p["emission"].log(), lengths)
    return p, words, lengths, d


def run(b, length, nt, pt, v, dtype, repeat) -> dict[str, float]:
    p, words, lengths, d = _problem(b, length, nt, pt, v, dtype)
    root, rules, em = (t.detach() for t in d.normalized())
    spans = d.span_potentials(words, em)
    times = {OURS: _time(lambda: pcfg_marginals(root, rules, spans, lengths), repeat)}
    ours = pcfg_marginals(root, rules, spans, lengths)
    checks = []
    if importlib.util.find_spec("torch_struct") is not None:
        from torch_struct import CKY, LogSemiring, SentCFG

        terms = em.T[words]
        rules_b = rules.expand(b, -1, -1, -1)
        root_b = root.expand(b, -1)

        def peer():
            leaves = [t.detach().clone().requires_grad_() for t in (terms, rules_b, root_b)]
            log_z, _ = CKY(LogSemiring).logpartition(tuple(leaves), lengths=lengths)
            return log_z, torch.autograd.grad(log_z.sum(), leaves)

        def public():
            dist = SentCFG((terms, rules_b, root_b), lengths=lengths)
            return dist.marginals

        times[PEER] = _time(peer, repeat)
        times[PEER_PUBLIC] = _time(public, max(1, repeat // 2))
        log_z, (g_terms, g_rules, g_root) = peer()
        tol = 1e-3 if dtype == torch.float32 else 1e-8
        checks = [
            ("log Z", torch.allclose(log_z.squeeze(0), ours[0], rtol=tol, atol=tol)),
            ("rule counts", torch.allclose(g_rules.sum(0).squeeze(0), ours[2], atol=tol * 10)),
            ("root counts", torch.allclose(g_root.sum(0), ours[1], atol=tol * 10)),
            ("tag marginals", torch.allclose(g_terms, ours[3][:, 0, :, nt:], atol=tol * 10)),
        ]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        args = (words, lengths, nt, pt, v, p)
        pyro.clear_param_store()
        guide = ExactEStep(pcfg_model)
        times[ESTEP] = _time(lambda: guide.posterior(*args), repeat)
        optim = EMOptim()

        def em_iteration():
            post = guide.posterior(*args)
            optim(guide, post, args, {})

        times[EM] = _time(em_iteration, repeat)
    finally:
        torch.set_default_dtype(old)
    name = str(dtype).replace("torch.", "")
    print(f"\nPCFG B={b} L={length} NT={nt} PT={pt} V={v}, {name}: seconds (median of {repeat})")
    print(f"{'method':<36} {'seconds':>10} {'ratio to ours':>14}")
    for k, t in times.items():
        print(f"{k:<36} {t:>10.4f} {t / times[OURS]:>14.2f}")
    for what, ok in checks:
        print(f"check vs torch-struct: {what}: {'ok' if ok else 'FAIL'}")
    return times


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 sentences of length 8")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    b, length, repeat = (16, 8, 2) if a.quick else (256, 20, 5)
    repeat = a.repeat or repeat
    print("pyro_emvae PCFG inside-outside benchmark")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    out = {}
    for dtype in (torch.float32, torch.float64):
        out[str(dtype)] = run(b, length, 10, 20, 100, dtype, repeat)
    print("target (issue): E-step (log Z + expected counts) at least as fast as torch-struct")
    return out


if __name__ == "__main__":
    main()
