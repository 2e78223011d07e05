"""Peak memory of an in-memory EM fit: GMM diag, K=8, D=8, float64, N=2e6 by default.

Run from the repository root (one fit per process: the peak RSS is the process's)::

    python benchmarks/memory.py                # N=2e6, 3 iterations
    python benchmarks/memory.py --size 2e5

Reports the data's size, the resident set before the data exist (the interpreter with torch,
Pyro and this package imported: the baseline), the peak resident set (``ru_maxrss``) and the
peak above the baseline as a multiple of the data's size, and the median seconds per EM
iteration. Target (issue 13): <= 4x. The final ``log p(x)`` is printed so that runs of two
versions can be compared (same data, same initialization).

``--unchunked`` runs the E-step's generic contraction (Pyro's ``contract_to_tensor`` and its
backward pass over whole ``(K, N)`` tensors) instead of the chunked one-latent path, for
comparison. Measured on the 2-core machine of issue 13 at N=2e6 (one fit per process):
before the chunked E-step (commit 2a73132) 8.1x the data; after it, 3.8-4.0x; with the
input checks read from sums (no bool or float copy of the data), 3.6x. The peak is now the
fit's prior trace of the model (a mixture's ``locs[z]`` and ``s[z]`` at a drawn ``z``: two
``(N, D)`` tensors); each iteration holds the data and one (K, N) posterior, ~3x.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyro
import torch

from benchmarks._common import _size
from models.gmm import gmm_model, init_params
from pyro_emvae import EMOptim, ExactEStep, estep, fit

K = D = 8
TARGET = 4.0
BEFORE = 8.1  # peak above baseline / data, N=2e6, before the chunked E-step (commit 2a73132)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python benchmarks/memory.py", description=__doc__)
    p.add_argument("--size", type=_size, default=2_000_000, help="N (default 2e6)")
    p.add_argument("--iters", type=int, default=3, help="EM iterations")
    p.add_argument(
        "--unchunked", action="store_true", help="the generic whole-tensor E-step, to compare"
    )
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    one_latent = estep._one_latent
    if args.unchunked:
        estep._one_latent = lambda *a, **k: None  # (the generic contraction runs instead)
    try:
        return _run(args)
    finally:
        estep._one_latent = one_latent


def _run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_default_dtype(torch.float64)
    base = _rss_mib()
    g = torch.Generator().manual_seed(0)
    n = args.size
    x = torch.randn(n, D, generator=g)  # (in place: no second copy of the data at the start)
    x += torch.randint(0, K, (n, 1), generator=g) * 3.0
    data = x.numel() * x.element_size() / 2**20
    init = init_params(x, K, "diag", seed=1)

    def model(data):
        return gmm_model(data, K, "diag", init=init)

    pyro.clear_param_store()
    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=EMOptim(reg_covar=0),
        max_iter=args.iters,
        tol=0,
        progress=False,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratio = (peak - base) / data
    times = result.history["time"]
    steps = sorted(b - a for a, b in itertools.pairwise(times))
    per_iter = steps[len(steps) // 2] if steps else float("nan")
    path = "unchunked (generic) E-step" if args.unchunked else "chunked E-step"
    print(f"GMM diag K={K} D={D} float64, N={n:.0e}, {args.iters} EM iterations, {path}")
    print(f"data {data:.0f} MiB; baseline {base:.0f} MiB; peak {peak:.0f} MiB")
    print(f"peak above baseline: {peak - base:.0f} MiB = {ratio:.1f}x the data")
    print(f"  (before the chunked E-step, commit 2a73132: {BEFORE:g}x the data)")
    print(f"seconds per EM iteration (median): {per_iter:.3f}")
    print(f"log p(x) = {float(result.log_likelihood):.12e}")
    print(f"target: <= {TARGET:g}x: {'MET' if ratio <= TARGET else 'NOT MET'}")
    return {"data": data, "base": base, "peak": peak, "ratio": ratio, "per_iter": per_iter}


if __name__ == "__main__":
    main()
