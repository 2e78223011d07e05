"""Amortized against mean-field guides on the same ELBO: what an encoder buys as N grows.

Run from the repository root::

    python benchmarks/amortized.py                 # N in {1e3, 1e4, 1e5}, 5 epochs
    python benchmarks/amortized.py --quick         # N=1e3, 1 epoch

The model is PPCA (:mod:`models.ppca`: d=10, q=3, minibatches of 256, Adam lr 0.01), whose
maximum likelihood is known in closed form, so each fit is scored exactly: the decoder's
log-likelihood per datum against the maximum (Tipping & Bishop). Both guides climb the same
ELBO side by side from the same initial decoder:

* **AmortizedGuide** (a linear encoder: the exact posterior of PPCA is linear in x), a fixed
  number of parameters whatever N;
* **MeanFieldGuide**: a free mean and scale per latent per datum (2 N q parameters), each
  moved only when its datum is in the minibatch.

Printed per N: guide parameters, seconds per SVI step, and after the same number of epochs
the gap of the decoder's exact log-likelihood to the maximum (nats/datum) and the ELBO per
datum (10 draws per datum); for the encoder also the ELBO on as many held-out data (the
mean-field guide has no q for new data without a fit of its own).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ppca import init_params, ppca_log_likelihood, ppca_mle, ppca_model, sample_ppca
from pyro_emvae import AmortizedGuide, MeanFieldGuide, fit, log_marginal

D, Q, BATCH = 10, 3, 256


def run(kind: str, x: torch.Tensor, x_test: torch.Tensor, epochs: int) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    init_params(x, Q, seed=1)
    n = len(x)
    batch = min(BATCH, n)

    def model(x, q=Q):
        ppca_model(x, q, batch_size=batch)

    guide = AmortizedGuide(model, hidden=()) if kind == "amortized" else MeanFieldGuide(model)
    steps = max(1, epochs * math.ceil(n / batch))
    start = time.perf_counter()
    fit(
        model,
        guide,
        x,
        optim=pyro.optim.Adam({"lr": 0.01}),
        max_iter=steps,
        tol=0,
        loss=Trace_ELBO(),
        progress=False,
    )
    seconds = time.perf_counter() - start
    store = pyro.get_param_store()
    W, mu, sigma = (store[k].detach() for k in ("W", "mu", "sigma"))
    mle = ppca_mle(x, Q)
    gap = float(ppca_log_likelihood(x, **mle).mean() - ppca_log_likelihood(x, W, mu, sigma).mean())
    guide_params = sum(
        v.numel() for k, v in store.items() if k.startswith(("encoder", "MeanFieldGuide"))
    )
    elbo = log_marginal(model, guide, x, num_samples=10).elbo.mean().item()
    out = {
        "params": guide_params,
        "step": seconds / steps,
        "gap": gap,
        "elbo": elbo,
        "steps": steps,
    }
    if kind == "amortized":
        out["test"] = log_marginal(model, guide, x_test, num_samples=10).elbo.mean().item()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N=1e3, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.epochs = [1e3], 1
    torch.set_default_dtype(torch.float64)
    print("pyro_emvae: amortized vs mean-field guides on PPCA (d=10, q=3), float64")
    print(f"minibatch {BATCH}, Adam lr 0.01, {args.epochs} epochs per fit")
    header = (
        f"{'guide':<16}{'N':>9}{'guide params':>14}{'s/step':>10}"
        f"{'LL gap/datum':>14}{'ELBO/datum':>12}{'held-out':>11}"
    )
    print(header)
    results = {}
    for size in args.sizes:
        n = int(size)
        x, _ = sample_ppca(2 * n, d=D, q=Q, sigma=0.5, seed=0)
        x, x_test = x[:n], x[n:]
        for kind in ("amortized", "mean-field"):
            r = run(kind, x, x_test, args.epochs)
            results[(kind, n)] = r
            test = f"{r['test']:11.4f}" if "test" in r else f"{'-':>11}"
            print(
                f"{kind:<16}{n:>9}{r['params']:>14}{r['step']:>10.4f}"
                f"{r['gap']:>14.4f}{r['elbo']:>12.4f}{test}"
            )
    return results


if __name__ == "__main__":
    main()
