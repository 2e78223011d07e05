"""``python -m pyro_emvae demo``: fit a bundled model to bundled real data and report.

* ``--model gmm`` (default): a 2-component full-covariance Gaussian mixture on the Old Faithful
  eruptions (272 eruptions: duration and waiting time, standardized for the fit).
* ``--model hmm``: a Poisson hidden Markov model on yearly counts of major earthquakes
  (1900-2006), written with ``DiscreteHMM``, with its Viterbi path.

Both are fitted by EM: an exact E-step (:class:`~pyro_emvae.ExactEStep`) and closed-form
M-steps found from the model's own sites (:class:`~pyro_emvae.EMOptim`); they print a readable report (iterations, exact log-likelihood, params, timing) and write a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_emvae import ExactEStep, FitResult, fit
from pyro_emvae.datasets import load_earthquakes, load_old_faithful


def faithful_gmm(data: torch.Tensor, K: int = 2) -> None:
    """Full-covariance Gaussian mixture; initial locs are spread along the first coordinate."""
    D = data.size(-1)
    q = torch.linspace(0.2, 0.8, K, dtype=data.dtype)
    order = data[:, 0].argsort()
    init_locs = data[order[(q * (len(data) - 1)).long()]]
    weights = pyro.param("weights", torch.full((K,), 1.0 / K), constraint=constraints.simplex)
    locs = pyro.param("locs", init_locs)
    scale_tril = pyro.param(
        "scale_tril", torch.eye(D).expand(K, D, D).clone(), constraint=constraints.lower_cholesky
    )
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=data)


def earthquake_hmm(counts: torch.Tensor, K: int = 2) -> None:
    """Poisson HMM in the DiscreteHMM form (the chain's first state drawn from ``start``)."""
    lo, hi = counts.quantile(0.2), counts.quantile(0.8)
    start = pyro.param("start", torch.full((K,), 1.0 / K), constraint=constraints.simplex)
    trans = pyro.param(
        "trans", torch.full((K, K), 0.1 / K) + 0.9 * torch.eye(K), constraint=constraints.simplex
    )
    rates = pyro.param(
        "rates", torch.linspace(float(lo), float(hi), K), constraint=constraints.positive
    )
    T = len(counts)
    transition_logits = torch.cat([start.log().expand(1, K, K), trans.log().expand(T - 1, K, K)])
    pyro.sample(
        "counts",
        dist.DiscreteHMM(torch.zeros(K), transition_logits, dist.Poisson(rates)),
        obs=counts,
    )


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:8.3f}" for v in t.reshape(-1).tolist()) + "]"


def _report(title: str, result: FitResult, seconds: float, lines: list[str]) -> str:
    ll = result.log_likelihood
    out = [
        f"pyro_emvae demo: {title}",
        "=" * 72,
        f"algorithm        {result.algorithm}: exact E-step; closed-form M-step for "
        f"{', '.join(result.closed_form) or 'no param'}"
        + (f"; gradient steps for {', '.join(result.gradient)}" if result.gradient else ""),
        f"iterations       {result.n_iter} ({'converged' if result.converged else 'NOT converged'})",
        (
            f"log-likelihood   {ll:.4f} nats total, {ll / result.n_data:.5f} per datum "
            f"(n_data={result.n_data})"
        ),
        f"start -> end     {result.history['log_likelihood'][0]:.4f} -> {ll:.4f}",
        f"wall time        {seconds:.2f} s ({1000 * seconds / max(result.n_iter, 1):.1f} ms/iteration)",
        "-" * 72,
        *lines,
    ]
    return "\n".join(out)


def run_gmm(max_iter: int, plot: str | None) -> str:
    raw = load_old_faithful()
    mean, std = raw.mean(0), raw.std(0)
    data = (raw - mean) / std
    guide = ExactEStep(faithful_gmm)
    t0 = time.perf_counter()
    result = fit(faithful_gmm, guide, data, max_iter=max_iter, tol=1e-9)
    seconds = time.perf_counter() - t0
    post = guide.posterior(data)
    resp = post.marginals["z"]
    labels = resp.argmax(-1)
    p = result.params
    locs = p["locs"] * std + mean
    cov = p["scale_tril"] @ p["scale_tril"].transpose(-1, -2) * (std[:, None] * std[None, :])
    # the fit is on standardized data: log p(raw) = log p(standardized) - N * sum(log std)
    ll_raw = result.log_likelihood - len(raw) * float(std.log().sum())
    lines = [
        f"in data units    log p(x) = {ll_raw:.4f} nats ({ll_raw / len(raw):.5f} per eruption)",
        "component  weight   eruptions(min)  waiting(min)   sd(erupt)  sd(wait)  corr",
    ]
    for k in range(len(locs)):
        sd = cov[k].diagonal().sqrt()
        corr = cov[k, 0, 1] / (sd[0] * sd[1])
        lines.append(
            f"{k:9d}  {float(p['weights'][k]):6.3f}   {float(locs[k, 0]):14.3f}  "
            f"{float(locs[k, 1]):12.3f}   {float(sd[0]):9.3f}  {float(sd[1]):8.3f}  {float(corr):5.2f}"
        )
    lines.append(
        f"hard assignments (MAP): {torch.bincount(labels, minlength=len(locs)).tolist()}; "
        f"uncertain points (max p < 0.9): {int((resp.max(-1).values < 0.9).sum())}"
    )
    if plot:
        _plot_gmm(plot, raw, resp, locs, cov, result)
        lines.append(f"plot written to {plot}")
    return _report(
        "Gaussian mixture (K=2, full covariance) on Old Faithful", result, seconds, lines
    )


def run_hmm(max_iter: int, plot: str | None) -> str:
    years, counts = load_earthquakes()
    guide = ExactEStep(earthquake_hmm)
    t0 = time.perf_counter()
    result = fit(earthquake_hmm, guide, counts, max_iter=max_iter, tol=1e-9)
    seconds = time.perf_counter() - t0
    path = guide.map(counts)["counts"]
    marg = guide.marginals(counts)["counts"]
    p = result.params
    lines = [
        f"state rates      {_fmt(p['rates'])} earthquakes/year",
        f"start            {_fmt(p['start'])}",
    ]
    lines += [f"trans[{k}]         {_fmt(row)}" for k, row in enumerate(p["trans"])]
    switches = [int(years[t]) for t in range(1, len(path)) if path[t] != path[t - 1]]
    lines.append(f"Viterbi path     {len(switches)} regime switches, in {switches}")
    if plot:
        _plot_hmm(plot, years, counts, p["rates"], path, marg, result)
        lines.append(f"plot written to {plot}")
    return _report(
        "Poisson HMM (K=2) on yearly major-earthquake counts, 1900-2006", result, seconds, lines
    )


def _plot_gmm(path, raw, resp, locs, cov, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.scatter(raw[:, 0], raw[:, 1], c=resp[:, 1], cmap="coolwarm", s=14, vmin=0, vmax=1)
    theta = torch.linspace(0, 2 * torch.pi, 100)
    circle = torch.stack([theta.cos(), theta.sin()], -1)
    for k in range(len(locs)):
        chol = torch.linalg.cholesky(cov[k])
        for r in (1.0, 2.0):
            ell = locs[k] + r * circle @ chol.T
            ax.plot(ell[:, 0], ell[:, 1], "k-", lw=1, alpha=0.7)
    ax.set(
        xlabel="eruption duration (min)",
        ylabel="waiting time (min)",
        title="Old Faithful: posterior p(z=1|x) and 1, 2 sd ellipses",
    )
    h = result.history["log_likelihood"]
    ax2.plot(range(len(h)), [v / result.n_data for v in h])
    ax2.set(
        xlabel="iteration",
        ylabel="log p(x) per datum (nats)",
        title="exact log-likelihood at each E-step",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_hmm(path, years, counts, rates, states, marg, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    ax.bar(years, counts, color="0.7", label="major earthquakes")
    ax.step(years, rates[states], where="mid", color="C3", lw=2, label="Viterbi state's rate")
    ax.plot(years, marg @ rates, color="C0", lw=1, label="posterior mean rate")
    ax.set(xlabel="year", ylabel="count", title="Poisson HMM on earthquake counts")
    ax.legend(loc="upper left", fontsize=8)
    h = result.history["log_likelihood"]
    ax2.plot(range(len(h)), h)
    ax2.set(xlabel="iteration", ylabel="log p(x) (nats)", title="exact log-likelihood")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_emvae", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit a bundled model to bundled real data")
    demo.add_argument("--model", choices=["gmm", "hmm"], default="gmm")
    demo.add_argument("--max-iter", type=int, default=500)
    demo.add_argument(
        "--plot",
        default=None,
        help="PNG to write (default: pyro_emvae_demo_<model>.png; 'none' to skip)",
    )
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    plot = args.plot or f"pyro_emvae_demo_{args.model}.png"
    plot = None if plot.lower() == "none" else plot
    runner = run_gmm if args.model == "gmm" else run_hmm
    print(runner(args.max_iter, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
