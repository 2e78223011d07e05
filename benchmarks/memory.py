"""Peak memory of an in-memory EM fit: GMM diag, K=8, D=8, float64, N=2e6 by default.

Run from the repository root (one fit per process: the peak RSS is the process's)::

    python benchmarks/memory.py                # N=2e6, 3 iterations
    python benchmarks/memory.py --size 2e5

Reports the data's size, the resident set before the data exist (the interpreter with torch,
Pyro and this package imported: the baseline), the peak resident set (``ru_maxrss``) and the
peak above the baseline as a multiple of the data's size. Target (issue 13): <= 4x. The
final ``log p(x)`` is printed so that runs of two versions can be compared (same data, same
initialization).
"""

from __future__ import annotations

import argparse
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
from pyro_emvae import EMOptim, ExactEStep, fit

K = D = 8
TARGET = 4.0


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
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_default_dtype(torch.float64)
    base = _rss_mib()
    g = torch.Generator().manual_seed(0)
    n = args.size
    x = torch.randn(n, D, generator=g) + torch.randint(0, K, (n, 1), generator=g) * 3.0
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
    print(f"GMM diag K={K} D={D} float64, N={n:.0e}, {args.iters} EM iterations")
    print(f"data {data:.0f} MiB; baseline {base:.0f} MiB; peak {peak:.0f} MiB")
    print(f"peak above baseline: {peak - base:.0f} MiB = {ratio:.1f}x the data")
    print(f"log p(x) = {float(result.log_likelihood):.12e}")
    print(f"target: <= {TARGET:g}x: {'MET' if ratio <= TARGET else 'NOT MET'}")
    return {"data": data, "base": base, "peak": peak, "ratio": ratio}


if __name__ == "__main__":
    main()
