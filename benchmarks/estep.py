"""Benchmark of one exact E-step: ``pyro_emvae.ExactEStep`` against hand-written and library peers.

Run from the repository root::

    python benchmarks/estep.py                    # GMM N in {1e4, 1e5}, HMM T in {1e3, 1e4}
    python benchmarks/estep.py --large            # also HMM T = 1e5
    python benchmarks/estep.py --tuned-malloc     # the same, with glibc's malloc tuned (below)
    python benchmarks/estep.py --quick            # smallest sizes, 2 repeats (used by the tests)

All peers run side by side in one process, on the same data and the same parameters:

* **GMM** (diagonal covariance, :mod:`models.gmm`, K=8, D=8, N points): ours,
  ``ExactEStep(model).posterior(x)`` (exact log p(x) and responsibilities); ours with
  ``param_grads=True`` (the same pass also returns the gradient of log p(x) in the params);
  the hand-written torch E-step :func:`benchmarks.reference.gmm_estep`; and scikit-learn's
  ``GaussianMixture._estimate_log_prob_resp`` (``covariance_type="diag"``, with ``weights_``,
  ``means_`` and ``precisions_cholesky_ = 1 / scales`` set to the same params).
* **Gaussian HMM** (:mod:`models.hmm`, K=8, D=4, one sequence of T steps): ours on the
  vectorized ``DiscreteHMM`` form (:func:`models.hmm.gaussian_hmm`); ours on the
  ``pyro.markov`` loop form (:func:`models.hmm.gaussian_hmm_markov`), only at T=1e3 because it
  traces one Pyro site per time step and is slow (about a second per E-step at T=1e3); the
  hand-written scaled forward-backward :func:`benchmarks.reference.hmm_forward_backward`
  (emission densities included); and hmmlearn's ``GaussianHMM(covariance_type="diag")
  .score_samples`` (log p(x) and state posteriors) with ``covars_ = scales**2``.

Before anything is timed, every method's log p(x) and posterior marginals are checked against
the hand-written reference, in float64: GMM max abs difference < 1e-8 (log p(x) and
responsibilities); HMM relative difference < 1e-6 on log p(x) and max abs difference < 1e-6
on the state marginals. A failed check raises ``AssertionError``.

Timing: ``time.perf_counter``, one warm-up call, then the median of ``--repeat`` calls
(default 5); ``torch.set_num_threads(--threads)`` (default 2; numpy's BLAS pool is limited to
the same number when ``threadpoolctl`` is importable); float64 unless ``--float32``. Our
``ExactEStep`` objects are built once, outside the timed calls (as ``fit`` does). The tables
give, per method and size, the median seconds and the ratio ``peer_time / our_time``, so a
ratio above 1 means ours is faster. The issue's targets: GMM N=1e5 E-step < 0.1 s; HMM
T=1e4 E-step < 1 s.

Note on malloc. Large float64 temporaries (the GMM's ``(N, K, D)`` array is 51 MB at N=1e5)
make glibc's malloc hand memory back to the OS after each call and page-fault it back in on
the next one. On the development machine (2 cores) setting ``MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824`` cut our GMM N=1e5 E-step from
~0.2-0.26 s to ~0.07-0.09 s (the peers benefit too). glibc reads these variables when the
process starts, so ``--tuned-malloc`` re-executes this script with them set; the header says
which setting is in effect.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
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

from benchmarks._common import (
    TUNED_MALLOC,
    _check,
    _default_dtype,
    _dtype_name,
    _fmt_size,
    _malloc_setting,
    _max_abs,
    _optional,
    _print_table,
    _report_load,
    _size,
    _tuned_malloc_help,
    _versions_line,
    bench,
    reexec_with_tuned_malloc,
)
from benchmarks.reference import gaussian_log_emission, gmm_estep, hmm_forward_backward
from models.gmm import gmm_model, sample_gmm
from models.hmm import gaussian_hmm, gaussian_hmm_markov, sample_gaussian_hmm
from pyro_emvae import ExactEStep

__all__ = ["TUNED_MALLOC", "main"]

GMM_K, GMM_D = 8, 8
HMM_K, HMM_D = 8, 4
MARKOV_MAX_T = 1000  # the pyro.markov form traces one site per step: only the smallest T

GMM_TOL = 1e-8  # abs, log p(x) and responsibilities
HMM_LOGP_RTOL = 1e-6  # relative, log p(x)
HMM_MARG_TOL = 1e-6  # abs, state marginals

GMM_TARGET = (100_000, 0.1)  # (N, seconds)
HMM_TARGET = (10_000, 1.0)  # (T, seconds)

NOTE = (
    "Note on malloc: large float64 temporaries make glibc's malloc return memory to the OS\n"
    "and page-fault it back on each call. On the development machine (2 cores)\n"
    "  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 "
    "MALLOC_TOP_PAD_=1073741824\n"
    "cut our GMM N=1e5 E-step from ~0.2-0.26 s to ~0.07-0.09 s (the peers benefit too).\n"
    "Compare both settings with `python benchmarks/estep.py` and "
    "`python benchmarks/estep.py --tuned-malloc`."
)

MARKOV_NOTE = (
    f"the pyro.markov form is timed at T={MARKOV_MAX_T} only: it traces one Pyro site per time "
    "step and is slow (use the DiscreteHMM form for long chains)"
)


# ------------------------------------------------------------------------------------- setup
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/estep.py",
        description="Seconds per exact E-step: pyro_emvae.ExactEStep vs hand-written torch, "
        "scikit-learn and hmmlearn (GMM and Gaussian HMM).",
    )
    p.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=[10_000, 100_000],
        metavar="N",
        help="GMM numbers of points (default: 1e4 1e5)",
    )
    p.add_argument(
        "--hmm-sizes",
        type=_size,
        nargs="+",
        default=[1_000, 10_000],
        metavar="T",
        help="HMM sequence lengths (default: 1e3 1e4)",
    )
    p.add_argument("--large", action="store_true", help="also run the HMM at T=1e5")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per method (median)")
    p.add_argument("--threads", type=int, default=2, help="torch (and BLAS) threads")
    p.add_argument("--float32", action="store_true", help="time in float32 (checks: float64)")
    p.add_argument(
        "--tuned-malloc",
        action="store_true",
        help=_tuned_malloc_help(),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smallest GMM and HMM sizes only, repeat=2 (a smoke test)",
    )
    p.add_argument("--skip-gmm", action="store_true", help="do not run the GMM table")
    p.add_argument("--skip-hmm", action="store_true", help="do not run the HMM table")
    return p


def _reexec_with_tuned_malloc(argv: Sequence[str]) -> None:
    """Replace this process by the same script with :data:`TUNED_MALLOC` in the environment
    (glibc reads the variables only at start-up). Does nothing if they are already set."""
    reexec_with_tuned_malloc(str(Path(__file__).resolve()), argv)


def _target_line(what: str, size: int, limit: float, ours: dict[int, float], unit: str) -> str:
    head = f"target (issue): {what} {unit}={_fmt_size(size)} E-step < {limit:g} s"
    if size not in ours:
        return f"{head}: not run at this size"
    seconds = ours[size]
    return f"{head}: ours {seconds:.4f} s -> {'MET' if seconds < limit else 'NOT MET'}"


# --------------------------------------------------------------------------------------- GMM
def _gmm_data(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with _default_dtype(torch.float64):
        x, params = sample_gmm(n, GMM_K, GMM_D, seed=0, covariance_type="diag")
    return x.to(dtype), {k: v.to(dtype) for k, v in params.items()}


def _gmm_methods(
    x: torch.Tensor, p: dict[str, torch.Tensor], sklearn_mixture: Any
) -> list[tuple[str, Callable[[], tuple[Any, Any]]]]:
    """``(name, fn)`` pairs; each ``fn()`` runs one E-step and returns ``(log p(x), resp)``.
    Ours run at the params in Pyro's param store, which is cleared and set here."""
    pyro.clear_param_store()
    guide = ExactEStep(lambda data: gmm_model(data, GMM_K, "diag", init=p), max_plate_nesting=1)

    def ours() -> tuple[Any, Any]:
        post = guide.posterior(x)
        return post.log_likelihood, post.marginals["z"]

    def ours_grads() -> tuple[Any, Any]:
        post = guide.posterior(x, param_grads=True)
        return post.log_likelihood, post.marginals["z"]

    def reference() -> tuple[Any, Any]:
        return gmm_estep(x, p["weights"], p["locs"], p["scales"], "diag")

    methods = [
        ("ExactEStep.posterior (ours)", ours),
        ("ExactEStep.posterior(param_grads=True)", ours_grads),
        ("reference.gmm_estep (torch)", reference),
    ]
    if sklearn_mixture is not None:
        gm = sklearn_mixture.GaussianMixture(GMM_K, covariance_type="diag")
        gm.weights_ = p["weights"].numpy()
        gm.means_ = p["locs"].numpy()
        gm.precisions_cholesky_ = 1.0 / p["scales"].numpy()
        xn = x.numpy()

        def sklearn() -> tuple[Any, Any]:
            log_norm, log_resp = gm._estimate_log_prob_resp(xn)
            return log_norm.sum(), np.exp(log_resp)

        methods.append(("sklearn GaussianMixture (diag)", sklearn))
    return methods


def run_gmm(sizes: Sequence[int], repeat: int, dtype: torch.dtype) -> dict[int, float]:
    sklearn_mixture = _optional("sklearn.mixture")
    rows: list[tuple[str, str, float, float]] = []
    ours_time: dict[int, float] = {}
    print()
    print(f"== GMM (diag), K={GMM_K}, D={GMM_D}: correctness checks (float64) ==")
    for n in sizes:
        print(f" N={_fmt_size(n)}")
        x, p = _gmm_data(n, torch.float64)
        with _default_dtype(torch.float64):
            methods = _gmm_methods(x, p, sklearn_mixture)
            ll_ref, r_ref = dict(methods)["reference.gmm_estep (torch)"]()
            for name, fn in methods:
                if name.startswith("reference"):
                    continue
                ll, r = fn()
                _check(name, "|d log p(x)|", abs(float(ll) - float(ll_ref)), GMM_TOL)
                _check(name, "max |d resp|", _max_abs(r, r_ref), GMM_TOL)
        del methods, x, p, ll_ref, r_ref
    for n in sizes:
        x, p = _gmm_data(n, dtype)
        with _default_dtype(dtype):
            methods = _gmm_methods(x, p, sklearn_mixture)
            times = [(name, bench(fn, repeat)) for name, fn in methods]
        ours_time[n] = times[0][1]
        for name, seconds in times:
            rows.append((name, f"N={_fmt_size(n)}", seconds, seconds / ours_time[n]))
        del methods, x, p
    notes = [_target_line("GMM", GMM_TARGET[0], GMM_TARGET[1], ours_time, "N")]
    if sklearn_mixture is None:
        notes.append("scikit-learn is not importable: its row is skipped")
    _print_table(
        f"GMM (diag covariance), K={GMM_K}, D={GMM_D}, {_dtype_name(dtype)}: "
        f"seconds per E-step (median of {repeat})",
        rows,
        notes,
    )
    return ours_time


# --------------------------------------------------------------------------------------- HMM
def _hmm_data(t_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with _default_dtype(torch.float64):
        x, params = sample_gaussian_hmm(1, t_len, HMM_K, HMM_D, seed=0)
    return x.to(dtype), {k: v.to(dtype) for k, v in params.items()}


def _hmm_methods(
    x: torch.Tensor, p: dict[str, torch.Tensor], hmmlearn_hmm: Any, markov: bool
) -> list[tuple[str, Callable[[], tuple[Any, Any]]]]:
    """``(name, fn)`` pairs; each ``fn()`` runs one E-step and returns
    ``(log p(x), (T, K) state marginals)``."""
    t_len = x.shape[1]
    pyro.clear_param_store()  # both of our forms read the same params start/trans/locs/scales
    guide = ExactEStep(lambda data: gaussian_hmm(data, HMM_K, init=p), max_plate_nesting=1)
    guide_markov = ExactEStep(
        lambda data: gaussian_hmm_markov(data, HMM_K, init=p), max_plate_nesting=1
    )

    def ours() -> tuple[Any, Any]:
        post = guide.posterior(x)
        return post.log_likelihood, post.marginals["x"][0]

    def ours_markov() -> tuple[Any, Any]:
        post = guide_markov.posterior(x)
        return post.log_likelihood, torch.cat([post.marginals[f"z_{t}"] for t in range(t_len)])

    def reference() -> tuple[Any, Any]:
        log_e = gaussian_log_emission(x[0], p["locs"], p["scales"])
        ll, gamma, _ = hmm_forward_backward(p["start"].log(), p["trans"].log(), log_e)
        return ll, gamma

    methods = [("ExactEStep.posterior, DiscreteHMM (ours)", ours)]
    if markov:
        methods.append(("ExactEStep.posterior, pyro.markov (ours)", ours_markov))
    methods.append(("reference.hmm_forward_backward (torch)", reference))
    if hmmlearn_hmm is not None:
        hm = hmmlearn_hmm.GaussianHMM(HMM_K, covariance_type="diag")
        hm.n_features = HMM_D
        hm.startprob_ = p["start"].double().numpy()
        hm.transmat_ = p["trans"].double().numpy()
        hm.means_ = p["locs"].double().numpy()
        hm.covars_ = p["scales"].double().numpy() ** 2
        xn = x[0].numpy()

        def hmmlearn() -> tuple[Any, Any]:
            return hm.score_samples(xn)

        methods.append((f"hmmlearn GaussianHMM.score_samples ({hm.implementation})", hmmlearn))
    return methods


def run_hmm(sizes: Sequence[int], repeat: int, dtype: torch.dtype) -> dict[int, float]:
    hmmlearn_hmm = _optional("hmmlearn.hmm")
    rows: list[tuple[str, str, float, float]] = []
    ours_time: dict[int, float] = {}
    print()
    print(f"== Gaussian HMM, K={HMM_K}, D={HMM_D}, one sequence: correctness checks (float64) ==")
    for t_len in sizes:
        print(f" T={_fmt_size(t_len)}")
        x, p = _hmm_data(t_len, torch.float64)
        with _default_dtype(torch.float64):
            methods = _hmm_methods(x, p, hmmlearn_hmm, markov=t_len <= MARKOV_MAX_T)
            ll_ref, g_ref = dict(methods)["reference.hmm_forward_backward (torch)"]()
            for name, fn in methods:
                if name.startswith("reference"):
                    continue
                ll, g = fn()
                rel = abs(float(ll) - float(ll_ref)) / abs(float(ll_ref))
                _check(name, "rel |d log p(x)|", rel, HMM_LOGP_RTOL)
                _check(name, "max |d marginal|", _max_abs(g, g_ref), HMM_MARG_TOL)
        del methods, x, p, ll_ref, g_ref
    for t_len in sizes:
        x, p = _hmm_data(t_len, dtype)
        with _default_dtype(dtype):
            methods = _hmm_methods(x, p, hmmlearn_hmm, markov=t_len <= MARKOV_MAX_T)
            times = [(name, bench(fn, repeat)) for name, fn in methods]
        ours_time[t_len] = times[0][1]
        for name, seconds in times:
            rows.append((name, f"T={_fmt_size(t_len)}", seconds, seconds / ours_time[t_len]))
        del methods, x, p
    notes = [_target_line("HMM", HMM_TARGET[0], HMM_TARGET[1], ours_time, "T")]
    notes.append(MARKOV_NOTE if min(sizes) <= MARKOV_MAX_T else f"not timed: {MARKOV_NOTE}")
    if hmmlearn_hmm is None:
        notes.append("hmmlearn is not importable: its row is skipped")
    _print_table(
        f"Gaussian HMM, K={HMM_K}, D={HMM_D}, one sequence, {_dtype_name(dtype)}: "
        f"seconds per E-step (median of {repeat})",
        rows,
        notes,
    )
    return ours_time


# -------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, dict[int, float]]:
    """Run the benchmark; returns ``{"gmm": {N: our seconds}, "hmm": {T: our seconds}}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.tuned_malloc:
        _reexec_with_tuned_malloc(argv)
    gmm_sizes = sorted(set(args.sizes))
    hmm_sizes = sorted(set(args.hmm_sizes) | ({100_000} if args.large else set()))
    repeat = args.repeat
    if args.quick:
        gmm_sizes, hmm_sizes, repeat = gmm_sizes[:1], hmm_sizes[:1], 2
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    dtype = torch.float32 if args.float32 else torch.float64

    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    threadpoolctl = _optional("threadpoolctl")
    print("pyro_emvae E-step benchmark")
    print(f"malloc: {_malloc_setting()}")
    print(_versions_line())
    print(
        f"threads={args.threads}, dtype={_dtype_name(dtype)}, repeat={repeat} "
        f"(median after 1 warm-up), pyro validation "
        f"{'on' if is_validation_enabled() else 'off'}"
    )
    print(f"GMM sizes N={gmm_sizes}; HMM sizes T={hmm_sizes}")
    _report_load("start")
    out: dict[str, dict[int, float]] = {}
    try:
        # numpy's BLAS (scikit-learn, hmmlearn) gets as many threads as torch
        with (
            threadpoolctl.threadpool_limits(limits=args.threads)
            if threadpoolctl is not None
            else nullcontext()
        ):
            if not args.skip_gmm:
                out["gmm"] = run_gmm(gmm_sizes, repeat, dtype)
            if not args.skip_hmm:
                out["hmm"] = run_hmm(hmm_sizes, repeat, dtype)
    finally:
        torch.set_num_threads(old_threads)
        pyro.clear_param_store()
    print()
    print(NOTE)
    print(f"(this run: malloc {_malloc_setting()})")
    _report_load("end")
    return out


if __name__ == "__main__":
    main()
