"""Benchmark of Baum-Welch (EM) iterations of a Gaussian HMM: ``pyro_emvae.fit`` with
``EMOptim`` against hmmlearn and a hand-written torch Baum-Welch.

Run from the repository root::

    python benchmarks/hmm.py                     # one sequence of T=1e5 steps
    python benchmarks/hmm.py --sizes 1e4 1e5     # several lengths
    python benchmarks/hmm.py --tuned-malloc      # the same, with glibc's malloc tuned
    python benchmarks/hmm.py --quick             # T=1e3, 3 iterations (a smoke test)

The model: :func:`models.hmm.gaussian_hmm` (the vectorized ``DiscreteHMM`` form), K=8 states,
D=4, diagonal Gaussian emissions, one sequence of T steps from
:func:`models.hmm.sample_gaussian_hmm` (seed 0), started by every method from the same params
:func:`models.hmm.init_params` ``(x, 8, "gaussian", seed=1)``. float64 throughout. The methods
run side by side in one process, ``--iters`` Baum-Welch iterations each (default 5):

* **ours**: ``fit(model, ExactEStep(model), x, optim=EMOptim(reg_covar=0), max_iter=n,
  tol=0)``;
* **hmmlearn**: ``GaussianHMM(8, covariance_type="diag", init_params="", params="stmc",
  min_covar=0, covars_prior=0, covars_weight=1, n_iter=n, tol=-inf)`` with ``startprob_``,
  ``transmat_``, ``means_``, ``covars_`` set to the initial params (hmmlearn's default
  ``covars_prior=1e-2`` is a prior: it is turned off for parity; ``tol=-inf`` runs all ``n``
  iterations), once with its default ``implementation="log"`` and once with ``"scaling"``;
* **hand-written torch Baum-Welch**: E-step :func:`benchmarks.reference.hmm_forward_backward`
  (scaled forward-backward, a Python loop over t) on
  :func:`benchmarks.reference.gaussian_log_emission`, closed-form M-step :func:`torch_bw_mstep`.

Checks (float64, before the table is printed; a failure raises ``AssertionError``): at the
initial params all methods give the same ``log p(x)``, and after the ``n`` iterations of the
timed runs they give the same ``log p(x)`` (relative difference < 1e-8, each by its own code
at its own final params).

Timing: each method's run records the end of every iteration (one E-step and one M-step); the
time per iteration is the median of the iteration durations after the first one, pooled over
``--repeat`` interleaved runs (default 1; the first iteration includes one-off work: our
M-step probes the model once). Ratios are ``peer_time /
our_time`` (>1: ours is faster). The issue's target: per iteration faster than hmmlearn.
``torch.set_num_threads(--threads)`` (default 2; numpy's BLAS gets the same number when
``threadpoolctl`` is importable). ``--tuned-malloc`` re-executes the script with glibc's malloc
tuned (see ``benchmarks/estep.py``).

Measured (2-core machine shared with other jobs, load ~14, ``--threads 1 --repeat 3``): ours
0.157 s per iteration, hmmlearn scaling 0.217 s (1.38x), log 0.806 s (5.12x); the same
``log p(x)`` to 2e-16. On cores already busy, ``--threads 2`` makes torch's thread pool stall
(8x8 ops taking milliseconds, all of torch alike): measure there with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import Tensor

from benchmarks._common import (
    Run,
    _check,
    _default_dtype,
    _fmt_size,
    _malloc_setting,
    _optional,
    _peer_blas_line,
    _print_table,
    _rel,
    _report_load,
    _size,
    _tuned_malloc_help,
    _versions_line,
    per_iter_median,
    reexec_with_peers_at_full_speed,
    reexec_with_tuned_malloc,
)
from benchmarks.reference import gaussian_log_emission, hmm_forward_backward
from models.hmm import gaussian_hmm, init_params, sample_gaussian_hmm
from pyro_emvae import EMOptim, ExactEStep, fit

__all__ = ["main", "torch_bw_mstep"]

K, D = 8, 4
DATA_SEED, INIT_SEED = 0, 1
LL_RTOL = 1e-8  # relative agreement of log p(x)
TARGET_T = 100_000  # the size

OURS = "fit(ExactEStep, EMOptim) (ours)"
TORCH = "hand-written torch Baum-Welch"
IMPLEMENTATIONS = ("log", "scaling")  # hmmlearn's; "log" is its default


def _hmmlearn_name(implementation: str) -> str:
    default = ", default" if implementation == "log" else ""
    return f"hmmlearn GaussianHMM ({implementation}{default})"


# ------------------------------------------------------------------------------------- setup
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/hmm.py",
        description="Seconds per Baum-Welch iteration of a Gaussian HMM (K=8, D=4, one "
        "sequence): pyro_emvae.fit vs hmmlearn and a hand-written torch Baum-Welch.",
    )
    p.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=[TARGET_T],
        metavar="T",
        help="sequence lengths (default: 1e5)",
    )
    p.add_argument("--iters", type=int, default=5, help="Baum-Welch iterations (default 5)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs per method, interleaved; the time per iteration is the median over "
        "all their iterations after the first (default 1)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch (and BLAS) threads")
    p.add_argument("--tuned-malloc", action="store_true", help=_tuned_malloc_help())
    p.add_argument("--quick", action="store_true", help="T=1e3, 3 iterations (a smoke test)")
    return p


# -------------------------------------------------------------------------------- the runs
def _model(data: Tensor, init: dict[str, Tensor]) -> None:
    gaussian_hmm(data, K, init=init)


def run_ours(x: Tensor, init: dict[str, Tensor], n_iter: int) -> Run:
    """``fit(model, ExactEStep(model), x, optim=EMOptim(reg_covar=0), max_iter, tol=0)``."""
    pyro.clear_param_store()

    def model(data: Tensor) -> None:
        _model(data, init)

    run = Run()
    t0 = time.perf_counter()

    def callback(i: int, info: dict[str, Any]) -> None:
        run.ends.append(time.perf_counter() - t0)
        run.lls.append(float(info["log_likelihood"]))

    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=EMOptim(reg_covar=0),
        max_iter=n_iter,
        tol=0,
        callback=callback,
        progress=False,
    )
    run.wall = time.perf_counter() - t0
    run.final_ll = float(result.log_likelihood)
    pyro.clear_param_store()
    return run


def _hmmlearn_model(hmm: Any, init: dict[str, Tensor], n_iter: int, implementation: str) -> Any:
    model = hmm.GaussianHMM(
        K,
        covariance_type="diag",
        init_params="",
        params="stmc",
        min_covar=0.0,
        covars_prior=0.0,
        covars_weight=1.0,
        n_iter=n_iter,
        tol=-np.inf,
        implementation=implementation,
    )
    model.n_features = D
    model.startprob_ = init["start"].numpy()
    model.transmat_ = init["trans"].numpy()
    model.means_ = init["locs"].numpy()
    model.covars_ = init["scales"].numpy() ** 2
    return model


def run_hmmlearn(
    hmm: Any, x: Tensor, init: dict[str, Tensor], n_iter: int, implementation: str
) -> Run:
    """``GaussianHMM(...).fit(x)``; iterations are timed by wrapping the instance's
    ``monitor_.report`` (called once at the end of each iteration with the iteration's
    ``log p(x)``)."""
    model = _hmmlearn_model(hmm, init, n_iter, implementation)
    xn = x[0].numpy()
    run = Run()
    report = model.monitor_.report

    def timed_report(log_prob: float) -> None:
        report(log_prob)
        run.ends.append(time.perf_counter() - t0)
        run.lls.append(float(log_prob))

    model.monitor_.report = timed_report
    t0 = time.perf_counter()
    model.fit(xn)
    run.wall = time.perf_counter() - t0
    del model.monitor_.report
    run.final_ll = float(model.score(xn))
    return run


def torch_bw_mstep(x: Tensor, gamma: Tensor, xi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Closed-form Baum-Welch M-step of a diagonal-Gaussian HMM (maximum likelihood, no
    priors), in :mod:`models.hmm`'s parameterization.

    .. math::

        \pi = \gamma_0,\quad A_{ij} \propto \sum_t \xi_t(i, j),\quad
        \mu_k = \frac{\sum_t \gamma_t(k) x_t}{\sum_t \gamma_t(k)},\quad
        s_k^2 = \frac{\sum_t \gamma_t(k) (x_t - \mu_k)^2}{\sum_t \gamma_t(k)}.

    Args:
        x: one sequence ``(T, D)``. gamma: state marginals ``(T, K)``. xi: pairwise marginals
            ``(T-1, K, K)``.

    Returns:
        ``(start (K,), trans (K, K), locs (K, D), scales (K, D))``.
    """
    start = gamma[0]
    counts = xi.sum(0)
    trans = counts / counts.sum(-1, keepdim=True)
    nk = gamma.sum(0).unsqueeze(-1)
    locs = (gamma.T @ x) / nk
    var = torch.einsum("tk,tkd->kd", gamma, (x.unsqueeze(-2) - locs) ** 2) / nk
    return start, trans, locs, var.sqrt()


def _torch_estep(x: Tensor, p: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    start, trans, locs, scales = p
    return hmm_forward_backward(start.log(), trans.log(), gaussian_log_emission(x, locs, scales))


def run_torch_bw(x: Tensor, init: dict[str, Tensor], n_iter: int) -> Run:
    """The hand-written Baum-Welch, ``n_iter`` iterations."""
    p = tuple(init[k].clone() for k in ("start", "trans", "locs", "scales"))
    seq = x[0]
    run = Run()
    t0 = time.perf_counter()
    for _ in range(n_iter):
        ll, gamma, xi = _torch_estep(seq, p)
        p = torch_bw_mstep(seq, gamma, xi)
        run.ends.append(time.perf_counter() - t0)
        run.lls.append(float(ll))
    run.wall = time.perf_counter() - t0
    run.final_ll = float(_torch_estep(seq, p)[0])
    return run


def _init_log_likelihoods(x: Tensor, init: dict[str, Tensor], hmm: Any) -> dict[str, float]:
    """``log p(x)`` at the initial params by every method's own code."""
    p = tuple(init[k] for k in ("start", "trans", "locs", "scales"))
    out = {TORCH: float(_torch_estep(x[0], p)[0])}
    pyro.clear_param_store()

    def model(data: Tensor) -> None:
        _model(data, init)

    out[OURS] = float(ExactEStep(model).log_likelihood(x))
    pyro.clear_param_store()
    if hmm is not None:
        for impl in IMPLEMENTATIONS:
            out[_hmmlearn_name(impl)] = float(
                _hmmlearn_model(hmm, init, 1, impl).score(x[0].numpy())
            )
    return out


def _warm_up(hmm: Any) -> None:
    """Two iterations of every method on 200 steps, untimed, so that one-off library
    start-up costs land on no method's timings."""
    with _default_dtype(torch.float64):
        x, _ = sample_gaussian_hmm(1, 200, K, D, seed=DATA_SEED + 1)
        init = init_params(x, K, "gaussian", seed=INIT_SEED)
        run_ours(x, init, 2)
        if hmm is not None:
            for impl in IMPLEMENTATIONS:
                run_hmmlearn(hmm, x, init, 2, impl)
        run_torch_bw(x, init, 2)


# ------------------------------------------------------------------------------------ a size
def run_size(t_len: int, n_iter: int, repeat: int) -> dict[str, list[Run]]:
    """Checks, then ``repeat`` interleaved timed runs of every method: ``{method: runs}``."""
    hmm = _optional("hmmlearn.hmm")
    print(f" T={_fmt_size(t_len)}")
    with _default_dtype(torch.float64):
        x, _ = sample_gaussian_hmm(1, t_len, K, D, seed=DATA_SEED)
        init = init_params(x, K, "gaussian", seed=INIT_SEED)
        at_init = _init_log_likelihoods(x, init, hmm)
        print(f"  log p(x) at the initial params, vs the {TORCH}:")
        for name, ll in at_init.items():
            if name != TORCH:
                _check(name, "rel |d log p(x)|", _rel(ll, at_init[TORCH]), LL_RTOL)
        runs: dict[str, list[Run]] = {}
        for _ in range(repeat):
            runs.setdefault(OURS, []).append(run_ours(x, init, n_iter))
            if hmm is not None:
                for impl in IMPLEMENTATIONS:
                    run = run_hmmlearn(hmm, x, init, n_iter, impl)
                    runs.setdefault(_hmmlearn_name(impl), []).append(run)
            runs.setdefault(TORCH, []).append(run_torch_bw(x, init, n_iter))
    print(f"  log p(x) after the {n_iter} iterations of the timed runs, vs the {TORCH}:")
    ref = runs[TORCH][0].final_ll
    for name, rs in runs.items():
        if name != TORCH:
            diff = max(_rel(run.final_ll, ref) for run in rs)
            _check(name, "rel |d log p(x)|", diff, LL_RTOL)
    return runs


def _target_lines(per_iter: dict[int, dict[str, float]]) -> list[str]:
    head = f"target (issue): Gaussian HMM K={K} D={D} T={_fmt_size(TARGET_T)}: per iteration "
    if TARGET_T not in per_iter:
        return [head + "faster than hmmlearn: not run at this size"]
    times = per_iter[TARGET_T]
    lines = []
    for impl in IMPLEMENTATIONS:
        name = _hmmlearn_name(impl)
        if name not in times:
            lines.append(head + "faster than hmmlearn: hmmlearn is not importable")
            break
        ratio = times[name] / times[OURS]
        lines.append(
            head + f"faster than {name}: {ratio:.2f}x -> {'MET' if ratio > 1 else 'NOT MET'}"
        )
    return lines


# -------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
    """Run the benchmark; returns ``{T: {method: seconds per iteration}}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    reexec_with_peers_at_full_speed(str(Path(__file__).resolve()), argv)
    if args.tuned_malloc:
        reexec_with_tuned_malloc(str(Path(__file__).resolve()), argv)
    sizes, n_iter, repeat = sorted(set(args.sizes)), args.iters, args.repeat
    if args.quick:
        sizes, n_iter, repeat = [1_000], 3, 1
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if n_iter < 2:
        raise SystemExit("--iters must be >= 2 (the first iteration is not timed)")

    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    threadpoolctl = _optional("threadpoolctl")
    hmm = _optional("hmmlearn.hmm")
    print("pyro_emvae Gaussian HMM Baum-Welch benchmark")
    print(f"malloc: {_malloc_setting()}")
    print(_peer_blas_line())
    print(_versions_line())
    print(
        f"threads={args.threads}, dtype=float64, iterations={n_iter}, repeat={repeat}, "
        f"pyro validation "
        f"{'on' if is_validation_enabled() else 'off'}"
    )
    print(f"Gaussian HMM K={K}, D={D}, diagonal covariance, one sequence; sizes T={sizes}")
    _report_load("start")
    if hmm is None:
        print("hmmlearn is not importable: its rows are skipped")
    per_iter: dict[int, dict[str, float]] = {}
    rows: list[tuple[str, str, float, float]] = []
    notes: list[str] = []
    try:
        with (
            threadpoolctl.threadpool_limits(limits=args.threads)
            if threadpoolctl is not None
            else nullcontext()
        ):
            _warm_up(hmm)
            print()
            print(f"== Gaussian HMM, K={K}, D={D}, one sequence: correctness checks (float64) ==")
            for t_len in sizes:
                runs = run_size(t_len, n_iter, repeat)
                per_iter[t_len] = {name: per_iter_median(rs) for name, rs in runs.items()}
                ours = per_iter[t_len][OURS]
                for name, seconds in per_iter[t_len].items():
                    rows.append((name, f"T={_fmt_size(t_len)}", seconds, seconds / ours))
                notes.append(
                    f"whole call of {n_iter} iterations at T={_fmt_size(t_len)}, seconds"
                    + (f" (median of {repeat})" if repeat > 1 else "")
                    + ":"
                )
                notes += [
                    f"  {name:<44} {statistics.median(r.wall for r in rs):8.3f}"
                    for name, rs in runs.items()
                ]
    finally:
        torch.set_num_threads(old_threads)
        pyro.clear_param_store()
    _print_table(
        f"Gaussian HMM, K={K}, D={D}, one sequence, float64: seconds per Baum-Welch iteration "
        f"(median over iterations 2..{n_iter} of "
        f"{'one run' if repeat == 1 else f'{repeat} runs'})",
        rows,
        notes + _target_lines(per_iter),
    )
    print(f"(this run: malloc {_malloc_setting()})")
    _report_load("end")
    return per_iter


if __name__ == "__main__":
    main()
