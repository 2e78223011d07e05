"""Helpers shared by the benchmark scripts (``estep.py``, ``gmm.py``, ``hmm.py``): size parsing,
the ``--tuned-malloc`` re-execution, timing, correctness checks, tables and the CPU-load check.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch

__all__ = [
    "TUNED_MALLOC",
    "Run",
    "bench",
    "per_iter_median",
    "reexec_with_peers_at_full_speed",
    "reexec_with_tuned_malloc",
]

TUNED_MALLOC: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "1073741824",
}


# ------------------------------------------------------------------------------------- setup
def _size(text: str) -> int:
    """Parse ``1e4`` / ``10000`` / ``10_000`` as a positive int."""
    value = float(text.replace("_", ""))
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive integer size: {text!r}")
    return int(value)


def _malloc_setting() -> str:
    present = {k: os.environ[k] for k in TUNED_MALLOC if k in os.environ}
    if present == TUNED_MALLOC:
        return "tuned (" + " ".join(f"{k}={v}" for k, v in present.items()) + ")"
    if present:
        return "custom (" + " ".join(f"{k}={v}" for k, v in present.items()) + ")"
    return "glibc defaults (no MALLOC_* tuning; try --tuned-malloc)"


def _tuned_malloc_help() -> str:
    return "re-execute with glibc malloc tuned: " + " ".join(
        f"{k}={v}" for k, v in TUNED_MALLOC.items()
    )


def reexec_with_tuned_malloc(script: str, argv: Sequence[str]) -> None:
    """Replace this process by ``python script *argv`` with :data:`TUNED_MALLOC` in the
    environment (glibc reads the variables only at start-up). Does nothing if they are
    already set."""
    if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return
    env = dict(os.environ, **TUNED_MALLOC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, script, *argv], env)


def _optional(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def _versions_line() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, numpy {np.__version__}; {os.cpu_count()} cpus"
    )


# OpenBLAS overrides some machines set (older OpenBLAS builds misbehave on their CPUs): they pick
# an older, slower kernel for numpy's OpenBLAS, i.e. for the peers (scikit-learn, hmmlearn); torch
# on x86 uses MKL and does not read them
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def reexec_with_peers_at_full_speed(script: str, argv: Sequence[str]) -> None:
    """Replace this process by ``python script *argv`` without :data:`OPENBLAS_OVERRIDES`
    (OpenBLAS reads them only at load time), so numpy-based peers run at full speed; the
    variables are unset for this benchmark's process only, never for tests. Does nothing if
    neither is set, or if torch itself uses OpenBLAS (then it would change our side too)."""
    if not any(k in os.environ for k in OPENBLAS_OVERRIDES):
        return
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        return
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_OVERRIDES}
    env["_EMVAE_UNSET_OPENBLAS"] = ",".join(k for k in OPENBLAS_OVERRIDES if k in os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, script, *argv], env)


def _peer_blas_line() -> str:
    """Which OpenBLAS kernel numpy (the peers' BLAS) runs, and whether overrides were unset."""
    unset = os.environ.get("_EMVAE_UNSET_OPENBLAS")
    kept = [k for k in OPENBLAS_OVERRIDES if k in os.environ]
    head = (
        f"peers at full speed: {unset} unset for this benchmark's process"
        if unset
        else f"peers: {', '.join(kept)} set (slower numpy kernel)"
        if kept
        else "peers at full speed: no OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE override"
    )
    tpc = _optional("threadpoolctl")
    if tpc is None:
        return head
    arch = [
        f"{i.get('internal_api')} {i.get('architecture')}"
        for i in tpc.threadpool_info()
        if i.get("user_api") == "blas"
    ]
    return head + (f"; numpy BLAS kernels: {', '.join(arch)}" if arch else "")


# ------------------------------------------------------------------------------------ timing
def bench(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _max_abs(a: Any, b: Any) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


def _check(label: str, what: str, diff: float, tol: float) -> None:
    ok = diff < tol  # False for NaN as well
    print(f"  check {label:<44} {what:<18} {diff:9.2e}  (< {tol:.0e})  {'ok' if ok else 'FAIL'}")
    if not ok:
        raise AssertionError(f"correctness check failed: {label}: {what} = {diff:.3e} >= {tol}")


def _print_table(title: str, rows: list[tuple[str, str, float, float]], notes: list[str]) -> None:
    width = max([len(r[0]) for r in rows] + [len("method")])
    header = f"{'method':<{width}}  {'size':>9}  {'seconds':>10}  {'ratio':>7}"
    print()
    print(title)
    print(header)
    print("-" * len(header))
    for method, size, seconds, ratio in rows:
        print(f"{method:<{width}}  {size:>9}  {seconds:>10.4f}  {ratio:>7.2f}")
    print("ratio = peer_time / our_time (>1: ours is faster; ours = the first row of each size)")
    for note in notes:
        print(note)


def _fmt_size(n: int) -> str:
    """``100000`` -> ``1e5``; other numbers as they are."""
    exp = round(math.log10(n)) if n > 0 else 0
    return f"1e{exp}" if n >= 1000 and 10**exp == n else str(n)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------ iterative fits
@dataclass
class Run:
    """One run of an iterative fit. For iteration ``i`` (0-based): ``lls[i]`` is the
    ``log p(x)`` its E-step (or SVI loss) evaluated, at the params *before* its update, and
    ``ends[i]`` the seconds from the call's start to the end of the iteration."""

    lls: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    final_ll: float = math.nan  # log p(x) at the params after the last iteration
    wall: float = math.nan  # seconds of the whole call

    def durations(self) -> list[float]:
        """Seconds of each iteration after the first (the first includes one-off work)."""
        return np.diff(self.ends).tolist()

    def per_iter(self) -> float:
        """Median duration of the iterations after the first."""
        return per_iter_median([self])

    def reached(self, target: float) -> int | None:
        """Index of the first iteration whose E-step saw ``log p(x) >= target``."""
        return next((i for i, ll in enumerate(self.lls) if ll >= target), None)


def per_iter_median(runs: Sequence[Run]) -> float:
    """Median duration of the iterations after the first, pooled over ``runs``."""
    d = [s for run in runs for s in run.durations()]
    return float(statistics.median(d)) if d else math.nan


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------- load
def _cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` while this process sleeps (so: busy with
    other processes), from ``/proc/stat``; ``None`` where that file is not available."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields)

    try:
        idle0, total0 = snapshot()
        time.sleep(seconds)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def _report_load(when: str) -> float | None:
    """Print how busy the other processes keep the CPUs, with a warning when it matters:
    contention lengthens every time here, torch's multi-threaded small ops (the HMM scan,
    Pyro's per-site work) far more than one long numpy call. Returns the busy fraction."""
    busy = _cpu_busy()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cpus = os.cpu_count() or 1
    shown = "n/a" if busy is None else f"{100 * busy:.0f}%"
    print(f"other processes' CPU use ({when}): {shown} of {cpus} cpus; load average {load:.2f}")
    if busy is not None and busy > 0.25:
        print("WARNING: the machine is busy: timings are unreliable; rerun on an idle machine")
    return busy
