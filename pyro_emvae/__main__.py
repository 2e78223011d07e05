"""``python -m pyro_emvae demo``: fit a bundled model to bundled real data and report.

* ``--model gmm`` (default): a 2-component full-covariance Gaussian mixture on the Old Faithful
  eruptions (272 eruptions: duration and waiting time, standardized for the fit).
* ``--model hmm``: a Poisson hidden Markov model on yearly counts of major earthquakes
  (1900-2006), written with ``DiscreteHMM``, with its Viterbi path.
* ``--model vae``: a variational autoencoder on the bundled 8x8 handwritten digits (1500 to
  train, 297 held out), with an :class:`~pyro_emvae.AmortizedGuide` encoder, reporting the
  held-out ELBO, the IWAE estimate of log p(x), KL per latent dimension and active units.

The first two are fitted by EM: an exact E-step (:class:`~pyro_emvae.ExactEStep`) and
closed-form M-steps found from the model's own sites (:class:`~pyro_emvae.EMOptim`); the VAE
by SVI on the same ELBO. Each prints a readable report (iterations, objective, params, timing)
and writes a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_emvae import AmortizedGuide, ExactEStep, FitResult, diagnostics, fit, log_marginal
from pyro_emvae.datasets import load_digits, load_earthquakes, load_old_faithful


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


def make_digits_vae(latent_dim: int = 8, hidden: int = 256):
    """``(model, decoder)``: z ~ N(0, I), x | z ~ Bernoulli(logits = decoder(z)) per pixel,
    the data plate subsampled in minibatches of ``batch_size``."""
    decoder = torch.nn.Sequential(
        torch.nn.Linear(latent_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 64)
    )

    def model(x: torch.Tensor, batch_size: int | None = 128) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[idx])

    return model, decoder


def run_vae(max_iter: int, plot: str | None, iwae: int = 1000) -> str:
    x, _ = load_digits(binarize=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x_train, x_test = x[perm[:1500]], x[perm[1500:]]
    model, decoder = make_digits_vae()
    guide = AmortizedGuide(model, hidden=(256,))
    t0 = time.perf_counter()
    result = fit(
        model, guide, x_train, optim=pyro.optim.Adam({"lr": 1e-3}), max_iter=max_iter, tol=0
    )
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        train = log_marginal(model, guide, x_train, num_samples=10)
        test = log_marginal(model, guide, x_test, num_samples=iwae, chunk_size=100)
        diag = diagnostics(model, guide, x_test, num_samples=100)
    evaluation = time.perf_counter() - t1
    n = len(x_test)
    kl = diag.kl_per_dim["z"]
    lines = [
        (
            f"ELBO per image   train {float(train.elbo.mean()):9.4f}   held-out "
            f"{float(test.elbo.mean()):9.4f} nats"
        ),
        (
            f"IWAE-{iwae:<11d} held-out {test.mean():9.4f} ± {test.total_stderr / n:.3f} nats "
            "(importance-sampled log p(x), a tighter bound)"
        ),
        f"ELBO = rec - KL  {diag.reconstruction / n:9.4f} - {diag.kl / n:.4f} (held-out, per image)",
        f"KL per latent    {', '.join(f'{v:.2f}' for v in kl.tolist())} nats",
        (
            f"active units     {diag.active_units['z']} of {kl.numel()} "
            "(Var_x E_q[z_u] > 0.01; inactive = posterior collapse)"
        ),
        f"evaluation       {evaluation:.1f} s",
    ]
    if plot:
        with torch.no_grad():
            mean = guide.local_params(x_test)["z"]["loc"]
            recon = torch.sigmoid(decoder(mean[:10]))
            samples = torch.sigmoid(decoder(torch.randn(10, kl.numel())))
        _plot_vae(plot, x_test[:10], recon, samples, result)
        lines.append(f"plot written to {plot}")
    h = result.history["elbo"]
    head = [
        "pyro_emvae demo: VAE (latent 8, MLP 256) on 8x8 handwritten digits (binarized)",
        "=" * 72,
        (
            "algorithm        SVI: amortized encoder q(z|x), reparameterized draws, Adam lr 1e-3, "
            "minibatches of 128"
        ),
        f"iterations       {result.n_iter} SVI steps ({result.n_iter * 128 / 1500:.0f} epochs)",
        (
            f"ELBO estimate    {h[0] / 1500:.3f} -> {result.elbo / 1500:.3f} nats per image "
            "(minibatch estimates, first step -> mean of the last 20)"
        ),
        f"wall time        {seconds:.2f} s ({1000 * seconds / result.n_iter:.1f} ms/step)",
        "-" * 72,
    ]
    return "\n".join(head + lines)


def _plot_vae(path, originals, recon, samples, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 4.5))
    grid = fig.add_gridspec(3, 11, width_ratios=[6] + [1] * 10)
    ax = fig.add_subplot(grid[:, 0])
    h = torch.tensor(result.history["elbo"]) / 1500
    window = max(1, len(h) // 50)
    smooth = h.unfold(0, window, window).mean(-1) if len(h) >= window else h
    ax.plot(torch.arange(len(smooth)) * window, smooth)
    ax.set(xlabel="SVI step", ylabel="ELBO per image (nats)", title="training ELBO")
    rows = [("data", originals), ("reconstruction", recon), ("prior sample", samples)]
    for r, (name, images) in enumerate(rows):
        for c in range(10):
            a = fig.add_subplot(grid[r, c + 1])
            a.imshow(images[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (an error, exit code 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _plot_path(parser: argparse.ArgumentParser, plot: str) -> str:
    """The plot's path, checked before any fit: its directory must exist and be writable (it is
    not created: a mistyped directory is an error, not a new folder) and its extension be one
    matplotlib writes (none: PNG)."""
    path = Path(plot).expanduser()
    folder = path.parent
    if not folder.is_dir():
        parser.error(
            f"--plot {plot}: the directory {str(folder)!r} does not exist; create it first "
            "(mkdir -p), or pass --plot none"
        )
    if not os.access(folder, os.W_OK):
        parser.error(f"--plot {plot}: the directory {str(folder)!r} is not writable")
    if path.is_dir():
        parser.error(f"--plot {plot} is a directory; give a file name such as {plot}/demo.png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # pragma: no cover - (the plot itself will say)
        return str(path)
    if path.suffix:
        formats = FigureCanvasBase.get_supported_filetypes()
        if path.suffix[1:].lower() not in formats:
            parser.error(
                f"--plot {plot}: matplotlib cannot write {path.suffix!r} files; use one of "
                f"{', '.join('.' + f for f in sorted(formats))}"
            )
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Arguments are checked before any fit: a value out of range or a plot
    path that cannot be written is an argparse error (exit code 2, the message on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m pyro_emvae", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit a bundled model to bundled real data")
    demo.add_argument("--model", choices=["gmm", "hmm", "vae"], default="gmm")
    demo.add_argument(
        "--max-iter",
        type=_positive_int,
        default=None,
        help="EM iterations (default 500) or SVI steps (default 6000); >= 1",
    )
    demo.add_argument(
        "--iwae-samples", type=_positive_int, default=1000, help="for --model vae; >= 1"
    )
    demo.add_argument(
        "--plot",
        default=None,
        help="PNG to write, into an existing directory (default: pyro_emvae_demo_<model>.png; "
        "'none' to skip)",
    )
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plot = args.plot or f"pyro_emvae_demo_{args.model}.png"
    plot = None if plot.lower() == "none" else _plot_path(demo, plot)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    if args.model == "vae":
        print(run_vae(args.max_iter or 6000, plot, args.iwae_samples))
    else:
        runner = run_gmm if args.model == "gmm" else run_hmm
        print(runner(args.max_iter or 500, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
