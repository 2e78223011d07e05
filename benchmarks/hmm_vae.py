"""HMM-VAE: the chain summed inside ``DiscreteHMM.log_prob`` against Pyro's ``pyro.markov`` +
``TraceEnum_ELBO`` (variable elimination over one enumerated site per step), on one ELBO.

Run from the repository root::

    python benchmarks/hmm_vae.py            # N=200 sequences, T in {10, 20, 50}, K=4
    python benchmarks/hmm_vae.py --quick    # N=20, T=5

Both forms of :mod:`models.hmm_vae` (same decoder, encoder and params) are timed side by side
in one process, interleaved, for one SVI step (loss, gradients, Adam update) on the whole
batch; medians of ``--repeat`` steps. The check: at the same u (a point guide, so that
log q = 0), ``Trace_ELBO`` on the DiscreteHMM form and ``TraceEnum_ELBO`` on the markov form
give the same ELBO (K^T paths, summed two ways).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.hmm_vae import StepEncoderGuide, make_hmm_vae

K, Q, D = 4, 2, 64


def _pair(form: str, x: torch.Tensor):
    torch.manual_seed(0)  # the same decoder and encoder weights for both forms
    model, _ = make_hmm_vae(K, latent_dim=Q, data_dim=D, hidden=(128,), form=form, seed=0)
    guide = StepEncoderGuide(Q, data_dim=D, hidden=(128,), form=form)
    loss = Trace_ELBO() if form == "hmm" else TraceEnum_ELBO(max_plate_nesting=1)
    return model, guide, loss


def _point_guide(form: str, u: torch.Tensor):
    def guide(x):
        with pyro.plate("sequences", x.shape[0], dim=-1):
            if form == "hmm":
                pyro.sample("u", dist.Delta(u, event_dim=2))
            else:
                for t in range(x.shape[1]):
                    pyro.sample(f"u_{t}", dist.Delta(u[:, t], event_dim=1))

    return guide


def run(N: int, T: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(T)
    x = (torch.rand(N, T, D, generator=g) < 0.3).double()
    u = torch.randn(N, T, Q, generator=g)
    stores, svis, elbos = {}, {}, {}
    for form in ("hmm", "markov"):
        pyro.clear_param_store()
        model, guide, loss = _pair(form, x)
        with torch.no_grad():
            elbos[form] = -loss.loss(model, _point_guide(form, u), x)
        svis[form] = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
        svis[form].step(x)  # warm up (params made)
        stores[form] = pyro.get_param_store().get_state()
    times: dict[str, list[float]] = {"hmm": [], "markov": []}
    for _ in range(repeat):
        for form in ("hmm", "markov"):  # interleaved: load changes hit both alike
            pyro.get_param_store().set_state(stores[form])
            start = time.perf_counter()
            svis[form].step(x)
            times[form].append(time.perf_counter() - start)
            stores[form] = pyro.get_param_store().get_state()
    diff = abs(elbos["hmm"] - elbos["markov"]) / abs(elbos["hmm"])
    return {
        "hmm": statistics.median(times["hmm"]),
        "markov": statistics.median(times["markov"]),
        "elbo": elbos["hmm"],
        "rel_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    # one thread: the per-step tensors are small, and on a loaded 2-core machine a second
    # thread's parallel regions made the DiscreteHMM step ~20x slower
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    N, Ts = (20, [5]) if args.quick else (200, [10, 20, 50])
    repeat = args.repeat or (3 if args.quick else 15)
    print(
        f"HMM-VAE SVI step, N={N} sequences, K={K}, q={Q}, D={D}, float64, "
        f"{torch.get_num_threads()} threads, median of {repeat}"
    )
    print(
        f"{'T':>4s} {'DiscreteHMM (s)':>16s} {'markov+TraceEnum (s)':>21s} {'ratio':>7s} "
        f"{'ELBO rel. diff':>15s}"
    )
    results = {}
    for T in Ts:
        r = run(N, T, repeat)
        results[T] = r
        print(
            f"{T:4d} {r['hmm']:16.4f} {r['markov']:21.4f} {r['markov'] / r['hmm']:7.1f} "
            f"{r['rel_diff']:15.1e}"
        )
        if not r["rel_diff"] < 1e-10:
            raise AssertionError(f"T={T}: the two forms' ELBOs differ by {r['rel_diff']:.2e}")
    return results


if __name__ == "__main__":
    main()
