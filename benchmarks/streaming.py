"""EM on data that does not fit in memory: exact streaming EM, online EM, full-batch EM.

Run from the repository root::

    python benchmarks/streaming.py                 # memory at N=1e7; times at N=1e6 and 1e7
    python benchmarks/streaming.py --parts memory  # part 1 only (--parts online: part 2)
    python benchmarks/streaming.py --quick         # N=1e5 for both parts (a smoke run)

The model is a K=4 Gaussian mixture with full covariances in D=2 (:mod:`models.gmm`), float64.

1. **Memory.** N rows are written to a ``.npy`` file. Each way of fitting runs in a fresh
   process (so that its peak resident memory is its own) for the same few EM iterations from
   the same start: *in memory* (the file read into one tensor, full-batch EM) and *streamed*
   (a ``DataLoader`` over :class:`~pyro_emvae.stream.NpyChunks`, which reads blocks of B rows
   from the file: exact streaming EM, which holds one block at a time). Printed: peak RSS
   (``VmHWM``) and its growth over the process after imports, seconds per iteration, and
   checks that the two fits agree (log-likelihoods and params to 1e-10).
2. **Time to a log-likelihood.** In one process, on N rows in memory: full-batch EM run to
   convergence gives the optimum ``L*`` (nats/datum); then each method runs from the same
   start and the clock stops when the full-data log-likelihood first reaches ``L* - 1e-3``
   and ``L* - 1e-4`` (online EM is scored every few minibatches by an exact E-step on all the
   data, whose time is not counted). Methods: full-batch EM, exact streaming EM over
   chunks, online EM (Cappé & Moulines, t0=2, kappa=0.6 and 0.51), and scikit-learn's
   ``GaussianMixture`` (full batch, the same start, when installed; it and exact streaming EM
   only up to ``--peer-max-n``). Online EM takes minibatches of N/1000 rows. Ratio = method's
   time / full-batch EM's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import _fmt_size, _report_load, _size, _versions_line
from models.gmm import gmm_model, sample_gmm
from models.gmm import init_params as gmm_init
from pyro_emvae import EMOptim, ExactEStep, NpyChunks, OnlineEM, fit

K, D = 4, 2
COV = "full"
SEED, SEPARATION = 4, 6.0  # data whose EM takes a typical ~40 iterations to tol=1e-9
KAPPAS = (0.6, 0.51)  # OnlineEM's default, and the fastest forgetting Cappé-Moulines allow


def _peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: ``VmHWM`` (the high-water mark of its own
    address space; ``ru_maxrss`` would also count the parent's size at the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def minibatches(x: torch.Tensor, batch: int, shuffle: bool) -> DataLoader:
    """A DataLoader over in-memory rows that indexes a whole minibatch at once (a
    BatchSampler as the sampler): the default per-row indexing and collation cost more than
    the E-step of the batch."""
    ds = TensorDataset(x)
    order = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(order, batch, drop_last=False), batch_size=None)


def _model_for(init):
    def model(x):
        gmm_model(x, K, COV, init=init)

    return model


def _start(path: str, n: int) -> dict:
    """The shared start: k-means-free data-driven values from the first 10,000 rows."""
    return gmm_init(NpyChunks(path, rows=10_000)[0], K, COV, seed=1)


def child(mode: str, path: str, n: int, batch: int, iters: int, out: str) -> None:
    """One fit in this (fresh) process; writes its numbers to ``out`` as JSON."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    pyro.set_rng_seed(0)
    base = _peak_rss_mb()
    init = _start(path, n)
    model = _model_for(init)
    if mode == "memory":
        data = torch.from_numpy(np.load(path))
    else:
        data = DataLoader(NpyChunks(path, rows=batch), batch_size=None)
    ends = []
    t0 = time.perf_counter()
    result = fit(
        model,
        ExactEStep(model),
        data,
        optim=EMOptim(reg_covar=1e-6),
        max_iter=iters,
        tol=0,
        callback=lambda it, info: ends.append(time.perf_counter() - t0),
    )
    wall = time.perf_counter() - t0
    per_iter = float(np.median(np.diff([0.0, *ends]))) if ends else math.nan
    Path(out).write_text(
        json.dumps(
            {
                "base_mb": base,
                "peak_mb": _peak_rss_mb(),
                "per_iter": per_iter,
                "wall": wall,
                "history": result.history["log_likelihood"],
                "params": {k: v.tolist() for k, v in result.params.items()},
                "passes": result.info.get("passes", 1),
            }
        )
    )


def memory_part(n: int, batch: int, iters: int) -> dict:
    print(
        f"\n1. Peak memory: N={_fmt_size(n)} rows x D={D}, float64 ({n * D * 8 / 2**20:.0f} MiB"
        f" on disk), K={K} full covariances, {iters} EM iterations, chunks of "
        f"{_fmt_size(batch)} rows"
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        x, _ = sample_gmm(N=n, K=K, D=D, seed=SEED, separation=SEPARATION)
        np.save(path, x.numpy().astype(np.float64))
        del x
        for mode in ("memory", "stream"):
            res = os.path.join(tmp, f"{mode}.json")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                path,
                str(n),
                str(batch),
                str(iters),
                res,
            ]
            subprocess.run(cmd, check=True, cwd=ROOT)
            out[mode] = json.loads(Path(res).read_text())
    mem, stream = out["memory"], out["stream"]
    header = f"{'method':<34}{'peak RSS MiB':>14}{'fit MiB':>10}{'s/iter':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for label, r in (
        ("full-batch EM, data in memory", mem),
        (f"exact streaming EM ({r_passes(stream)} passes)", stream),
    ):
        print(
            f"{label:<34}{r['peak_mb']:>14.0f}{r['peak_mb'] - r['base_mb']:>10.0f}"
            f"{r['per_iter']:>10.2f}{r['per_iter'] / mem['per_iter']:>8.2f}"
        )
    print(
        f"memory ratio (in memory / streamed, peak RSS): {mem['peak_mb'] / stream['peak_mb']:.1f}x;"
        f" fit's own growth: {(mem['peak_mb'] - mem['base_mb']) / max(stream['peak_mb'] - stream['base_mb'], 1):.1f}x"
    )
    dll = max(abs(a - b) / abs(b) for a, b in zip(stream["history"], mem["history"]))
    dp = max(
        float(np.max(np.abs(np.asarray(stream["params"][k]) - np.asarray(v))))
        for k, v in mem["params"].items()
    )
    _check("streamed = in memory", "log-likelihoods (rel)", dll, 1e-10)
    _check("streamed = in memory", "params (abs)", dp, 1e-10)
    return out


def r_passes(r: dict) -> int:
    return int(r["passes"])


def _check(label: str, what: str, diff: float, tol: float) -> None:
    ok = diff < tol
    print(f"  check {label:<28} {what:<22} {diff:9.2e}  (< {tol:.0e})  {'ok' if ok else 'FAIL'}")
    if not ok:
        raise AssertionError(f"correctness check failed: {label}: {what} = {diff:.3e} >= {tol}")


# ------------------------------------------------------------------ time to a log-likelihood
class _Clock:
    """Seconds of work, with the scoring of online EM's params left out."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused


def _times_to(trace: list[tuple[float, float]], targets: list[float]) -> list[float]:
    return [next((t for t, ll in trace if ll >= target), math.nan) for target in targets]


def online_part(n: int, batch: int, stream_batch: int, epochs: int, peers: bool) -> dict:
    torch.set_default_dtype(torch.float64)
    x, _ = sample_gmm(N=n, K=K, D=D, seed=SEED, separation=SEPARATION)
    init = gmm_init(x[:10_000], K, COV, seed=1)
    model = _model_for(init)
    scorer = ExactEStep(model)

    def full_ll() -> float:
        return float(scorer.log_likelihood(x)) / n

    print(
        f"\n2. Time to a log-likelihood: N={_fmt_size(n)}, K={K} full covariances; online EM on "
        f"minibatches of {_fmt_size(batch)} ({epochs} epochs at most), exact streaming EM on "
        f"chunks of {_fmt_size(stream_batch)}"
    )
    traces: dict[str, list[tuple[float, float]]] = {}

    # full-batch EM to convergence: the optimum, and its own trace
    pyro.clear_param_store()
    clock = _Clock()
    trace: list[tuple[float, float]] = []
    result = fit(
        model,
        ExactEStep(model),
        x,
        max_iter=500,
        tol=1e-9,
        callback=lambda it, info: trace.append((clock.now(), info["log_likelihood"] / n)),
    )
    best = result.per_datum()
    trace.append((clock.now(), best))
    # (the callback's value is the E-step's, at the params before the M-step: shift by one)
    traces["full-batch EM (ours)"] = [(t, ll) for (t, _), (_, ll) in itertools.pairwise(trace)]
    targets = [best - 1e-3, best - 1e-4]
    print(
        f"optimum L* = {best:.6f} nats/datum after {result.n_iter} iterations "
        f"(converged: {result.converged})"
    )

    # exact streaming EM over in-memory chunks: the same iterations, batch by batch
    if peers:
        pyro.clear_param_store()
        loader = minibatches(x, stream_batch, shuffle=False)
        clock = _Clock()
        trace = []
        fit(
            model,
            ExactEStep(model),
            loader,
            max_iter=result.n_iter,
            tol=0,
            callback=lambda it, info: trace.append((clock.now(), info["log_likelihood"] / n)),
        )
        traces["exact streaming EM"] = trace[1:] + [(clock.now(), full_ll())]

    # online EM, scored every few minibatches by an exact E-step (not timed)
    every = max(1, n // batch // 10)
    for kappa in KAPPAS:
        pyro.clear_param_store()
        torch.manual_seed(0)
        loader = minibatches(x, batch, shuffle=True)
        clock = _Clock()
        trace = []

        def score(step, info, clock=clock, trace=trace):
            if step % every:
                return False
            t = clock.now()
            paused = time.perf_counter()
            ll = full_ll()
            clock.paused += time.perf_counter() - paused
            trace.append((t, ll))
            return ll >= targets[-1]  # stop once the closer target is reached

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(
                model,
                ExactEStep(model),
                loader,
                optim=OnlineEM(kappa=kappa, t0=2.0),
                max_iter=epochs,
                tol=0,
                callback=score,
            )
        traces[f"online EM (kappa {kappa})"] = trace

    sk = _optional_sklearn() if peers else None
    if sk is not None:
        sk_time, sk_ll = _sklearn_time(sk, x, init, targets, result.n_iter)
        traces["sklearn GaussianMixture"] = [(t, ll) for t, ll in zip(sk_time, sk_ll)]

    ours = _times_to(traces["full-batch EM (ours)"], targets)
    header = (
        f"{'method':<28}{'s to L*-1e-3':>14}{'ratio':>8}{'s to L*-1e-4':>14}{'ratio':>8}"
        f"{'final L':>12}"
    )
    print(header)
    print("-" * len(header))
    out = {}
    for label, tr in traces.items():
        times = _times_to(tr, targets)
        out[label] = times
        cells = "".join(f"{t:>14.2f}{t / o:>8.2f}" for t, o in zip(times, ours))
        print(f"{label:<28}{cells}{tr[-1][1]:>12.6f}")
    print("ratio = method's time / full-batch EM's (<1: faster); nan: not reached")
    return out


def _optional_sklearn():
    try:
        from sklearn.mixture import GaussianMixture

        return GaussianMixture
    except ImportError:
        return None


def _sklearn_time(GaussianMixture, x, init, targets, n_iter):
    """scikit-learn from the same start, one iteration at a time (warm_start), timed; its
    ``lower_bound_`` is the log-likelihood per datum at the params before its last M-step."""
    xs = x.numpy()
    prec = np.linalg.inv((init["scale_tril"] @ init["scale_tril"].transpose(-1, -2)).numpy())
    gm = GaussianMixture(
        K,
        covariance_type="full",
        max_iter=1,
        tol=0,
        reg_covar=1e-6,
        weights_init=init["weights"].numpy(),
        means_init=init["locs"].numpy(),
        precisions_init=prec,
        warm_start=True,
        init_params="random",
    )
    times, lls = [], []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_iter):
            gm.fit(xs)
            times.append(time.perf_counter() - start)
            lls.append(float(gm.lower_bound_))
            if lls[-1] >= targets[-1]:
                break
    # lower_bound_ is the E-step before the iteration's M-step: the params it scores were
    # those at the end of the previous iteration
    return times[:-1] or times, lls[1:] or lls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-n", type=_size, default=10**7)
    parser.add_argument("--online-n", type=_size, nargs="+", default=[10**6, 10**7])
    parser.add_argument("--batch", type=_size, default=10**5, help="rows per streamed chunk")
    parser.add_argument(
        "--online-batch", type=_size, default=None, help="online EM's minibatch (default N/1000)"
    )
    parser.add_argument(
        "--peer-max-n",
        type=_size,
        default=10**6,
        help="run scikit-learn and exact streaming EM in part 2 up to this N (slow beyond)",
    )
    parser.add_argument("--iters", type=int, default=3, help="EM iterations in part 1")
    parser.add_argument("--epochs", type=int, default=3, help="online EM epochs at most")
    parser.add_argument("--quick", action="store_true", help="N=1e5 for both parts")
    parser.add_argument(
        "--parts", nargs="+", choices=["memory", "online"], default=["memory", "online"]
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, path, n, batch, iters, out = args.child
        child(mode, path, int(n), int(batch), int(iters), out)
        return {}
    if args.quick:
        args.memory_n, args.online_n, args.batch, args.online_batch = 10**5, [10**5], 10**4, 2000
        args.iters, args.epochs = 2, 2
    print("pyro_emvae streaming benchmark")
    print(_versions_line())
    _report_load("before")
    results = {}
    if "memory" in args.parts:
        results["memory"] = memory_part(args.memory_n, args.batch, args.iters)
    for n in args.online_n if "online" in args.parts else []:
        batch = args.online_batch or max(n // 1000, 1)
        peers = n <= args.peer_max_n
        results[("online", n)] = online_part(n, batch, args.batch, args.epochs, peers)
    return results


if __name__ == "__main__":
    main()
