"""A VAE and a mixture VAE on scikit-learn's 8x8 digits: held-out ELBO, IWAE, active units,
clustering accuracy and training time.

Run from the repository root::

    python benchmarks/vae_digits.py            # 500 epochs each, IWAE-1000 (~2 minutes)
    python benchmarks/vae_digits.py --quick    # 20 epochs each on 300 digits, IWAE-50 (~6 s)

The digits (:func:`models.vae.load_digits`, binarized at 0.5) are split at random into 1500
training and 297 test images. Both models (:mod:`models.vae`, :mod:`models.mixture_vae`) have
a Bernoulli likelihood, a decoder ``latent -> 256 -> 64`` and an
:class:`~pyro_emvae.amortized.AmortizedGuide` encoder ``64 -> 256 -> latent`` (diagonal
Gaussian q), trained by :func:`~pyro_emvae.fit` (SVI, Adam lr 1e-3, minibatches of 128; the
mixture's cluster ``c`` is summed out exactly by ``TraceEnum_ELBO``). Reported per model:

* the ELBO per datum on the training and the test split (the mean of ``log w`` over the IWAE
  draws, :func:`~pyro_emvae.log_marginal`), and IWAE-S on the test split with its standard
  error; IWAE - ELBO is how much the bound tightens with S draws;
* from :func:`~pyro_emvae.diagnostics` on the test split (100 draws): reconstruction, KL,
  active units (:math:`\\mathrm{Var}_x \\mathbb E_q[z_u] > 0.01`) and, for the plain VAE, KL per
  latent dimension (a mixture prior has none);
* for the mixture VAE, the clustering accuracy against the digit labels (clusters from
  :math:`p(c \\mid \\mathbb E_q[z])`, matched one-to-one to digits by the Hungarian algorithm);
* the training time (one thread by default: on a small shared machine two threads run slower).

500 epochs is about where the test ELBO stops improving (both models overfit the 1500 images
beyond it, the training ELBO still rising).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mixture_vae import cluster_accuracy, cluster_posterior, make_mixture_vae
from models.vae import load_digits, make_vae, train_test_split
from pyro_emvae import AmortizedGuide, diagnostics, fit, log_marginal


def train_and_score(kind: str, x_train, x_test, y_train, y_test, args) -> dict:
    """Train one model and score it; returns the numbers printed by :func:`report`."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    if kind == "vae":
        model, _ = make_vae(latent_dim=args.latent, hidden=(args.hidden,))
    else:
        model, _ = make_mixture_vae(
            latent_dim=args.latent, n_clusters=args.clusters, hidden=(args.hidden,)
        )
    batch = min(args.batch, len(x_test))  # evaluation walks x_test in batches of this size

    def train_model(x):
        model(x, batch_size=batch)

    guide = AmortizedGuide(train_model, hidden=(args.hidden,))
    steps = args.epochs * -(-len(x_train) // batch)
    start = time.perf_counter()
    result = fit(
        train_model,
        guide,
        x_train,
        optim=pyro.optim.Adam({"lr": args.lr}),
        max_iter=steps,
        tol=0,
        progress=False,
    )
    seconds = time.perf_counter() - start
    # the trained guide reads the plate sizes of whatever data it is given: x_test too
    test_guide = guide
    start = time.perf_counter()
    with torch.no_grad():
        train_lm = log_marginal(train_model, guide, x_train, num_samples=args.elbo_samples)
        test_lm = log_marginal(train_model, test_guide, x_test, num_samples=args.iwae)
        diag = diagnostics(train_model, test_guide, x_test, num_samples=args.elbo_samples)
    out = {
        "kind": kind,
        "steps": steps,
        "seconds": seconds,
        "svi_elbo": result.elbo / len(x_train),
        "train_elbo": float(train_lm.elbo.mean()),
        "test_elbo": float(test_lm.elbo.mean()),
        "test_iwae": test_lm.mean(),
        "test_iwae_se": test_lm.total_stderr / len(x_test),
        "reconstruction": diag.reconstruction / diag.n_data,
        "kl": diag.kl / diag.n_data,
        "kl_per_dim": diag.kl_per_dim.get("z"),
        "active": diag.active_units["z"],
        "eval_seconds": time.perf_counter() - start,
    }
    if kind == "mixture":
        out["train_acc"] = cluster_accuracy(cluster_posterior(guide, x_train).argmax(-1), y_train)
        out["test_acc"] = cluster_accuracy(cluster_posterior(guide, x_test).argmax(-1), y_test)
        out["weights"] = pyro.param("weights").detach().sort(descending=True).values
    return out


def report(r: dict, args, n_train: int, n_test: int) -> None:
    title = {
        "vae": "VAE",
        "mixture": f"mixture VAE (K={args.clusters}, c summed out exactly)",
    }[r["kind"]]
    print(f"\n{title}")
    print(
        f"  training        {args.epochs} epochs = {r['steps']} SVI steps in {r['seconds']:.1f} s "
        f"({1000 * r['seconds'] / r['steps']:.1f} ms/step); SVI ELBO/datum (last 20 steps) "
        f"{r['svi_elbo']:.3f}"
    )
    iwae = f"IWAE-{args.iwae}/datum"
    print(f"  {'ELBO/datum':<16}train {r['train_elbo']:9.3f}   test {r['test_elbo']:9.3f}")
    print(f"  {iwae:<16}{'':<21}test {r['test_iwae']:9.3f} (± {r['test_iwae_se']:.3f})")
    gap = r["test_iwae"] - r["test_elbo"]
    print(f"  {'IWAE - ELBO':<16}{'':<21}test {gap:9.3f}")
    print(f"  reconstruction  {r['reconstruction']:.3f}, KL {r['kl']:.3f} (test, per datum)")
    print(f"  active units    {r['active']} of {args.latent} (test)")
    if r["kl_per_dim"] is not None:
        kls = ", ".join(f"{v:.2f}" for v in r["kl_per_dim"].tolist())
        print(f"  KL per dim      {kls}")
    if "train_acc" in r:
        print(f"  cluster acc.    train {r['train_acc']:.3f}   test {r['test_acc']:.3f}")
        w = ", ".join(f"{v:.3f}" for v in r["weights"].tolist())
        print(f"  weights         {w}")
    print(f"  evaluation      {r['eval_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--iwae", type=int, default=1000, help="IWAE draws per test datum")
    parser.add_argument("--elbo-samples", type=int, default=100, help="draws for the ELBOs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["vae", "mixture"])
    parser.add_argument("--quick", action="store_true", help="300 digits, 20 epochs, IWAE-50")
    args = parser.parse_args(argv)
    n_data = None
    if args.quick:
        n_data, args.n_train, args.epochs, args.iwae, args.elbo_samples = 300, 200, 20, 50, 10
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    x, labels = load_digits(binarize=True, return_labels=True)
    if n_data is not None:
        x, labels = x[:n_data], labels[:n_data]
    train, test = train_test_split(len(x), args.n_train, seed=args.seed)
    print("pyro_emvae: VAEs on the sklearn digits (8x8, binarized at 0.5), float64")
    print(
        f"train {len(train)} / test {len(test)}; latent {args.latent}, hidden {args.hidden}, "
        f"Bernoulli likelihood, Adam lr {args.lr:g}, batch {min(args.batch, len(test))}, "
        f"{args.threads} thread(s), seed {args.seed}"
    )
    results = {}
    for kind in args.models:
        r = train_and_score(kind, x[train], x[test], labels[train], labels[test], args)
        report(r, args, len(train), len(test))
        results[kind] = r
    return results


if __name__ == "__main__":
    main()
