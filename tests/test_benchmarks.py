"""Smoke tests of ``benchmarks/estep.py``, ``benchmarks/gmm.py`` and ``benchmarks/hmm.py``: the
quick runs print their tables and every correctness check passes (no timing assertions: the CI
machine is small and shared)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import estep as bench
from benchmarks import gmm as gmm_bench
from benchmarks import hmm as hmm_bench
from benchmarks import small as small_bench

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAVE_HMMLEARN = importlib.util.find_spec("hmmlearn") is not None


@pytest.mark.timeout(120)
def test_quick_run_prints_tables_and_passes_checks(capsys):
    result = bench.main(["--quick"])
    out = capsys.readouterr().out

    assert out.startswith("pyro_emvae E-step benchmark\nmalloc: ")
    # both tables, with their headers and our rows
    assert "GMM (diag covariance), K=8, D=8, float64: seconds per E-step (median of 2)" in out
    assert "Gaussian HMM, K=8, D=4, one sequence, float64: seconds per E-step" in out
    header_lines = [
        ln for ln in out.splitlines() if ln.split()[:4] == ["method", "size", "seconds", "ratio"]
    ]
    assert len(header_lines) == 2
    for row in (
        "ExactEStep.posterior (ours)",
        "ExactEStep.posterior(param_grads=True)",
        "reference.gmm_estep (torch)",
        "ExactEStep.posterior, DiscreteHMM (ours)",
        "ExactEStep.posterior, pyro.markov (ours)",
        "reference.hmm_forward_backward (torch)",
    ):
        assert any(ln.startswith(row) for ln in out.splitlines()), row
    assert ("sklearn GaussianMixture (diag)" in out) == HAVE_SKLEARN
    assert ("hmmlearn GaussianHMM.score_samples" in out) == HAVE_HMMLEARN
    assert "target (issue): GMM N=1e5 E-step < 0.1 s" in out
    assert "target (issue): HMM T=1e4 E-step < 1 s" in out
    assert "Note on malloc" in out

    # every correctness check ran and passed: 2 per non-reference method and size
    checks = [ln for ln in out.splitlines() if ln.lstrip().startswith("check ")]
    n_gmm = 2 + HAVE_SKLEARN  # ours, ours(param_grads), sklearn
    n_hmm = 2 + HAVE_HMMLEARN  # DiscreteHMM, pyro.markov, hmmlearn
    assert len(checks) == 2 * (n_gmm + n_hmm)
    assert all(ln.endswith(" ok") for ln in checks), checks
    assert "FAIL" not in out

    # the smallest sizes only, and our median times come back
    assert set(result) == {"gmm", "hmm"}
    assert list(result["gmm"]) == [10_000] and list(result["hmm"]) == [1_000]
    assert all(t > 0 for d in result.values() for t in d.values())


@pytest.mark.timeout(120)
def test_small_data_run_prints_the_table_and_the_breakdown(capsys):
    med = small_bench.main(["--repeat", "1"])
    out = capsys.readouterr().out
    assert "ours, torch 1 thread" in med and all(t > 0 for t in med.values())
    assert ("sklearn GaussianMixture" in med) == HAVE_SKLEARN
    if HAVE_SKLEARN:
        checks = [ln for ln in out.splitlines() if ln.lstrip().startswith("check ")]
        assert len(checks) == 2 and all(ln.endswith(" ok") for ln in checks), checks
    # the breakdown: E-steps, M-steps, and the model passes per fit
    assert "where our fit's time goes" in out
    for part in ("whole fit", "E-step", "M-step", "rest ("):
        assert any(ln.startswith(part) for ln in out.splitlines()), part
    # (within the M-steps: EMOptim's mixture recipe, which this model takes, or the general
    # path's statistics and maximization)
    shown = {ln[:16] for ln in out.splitlines()}
    assert "  mixture recipe" in shown or {"  statistics    ", "  maximize      "} <= shown
    line = next(ln for ln in out.splitlines() if ln.startswith("model passes per fit:"))
    passes, e_steps = line.split()[4], line.split("one per E-step, ")[1].split(";")[0]
    # (one setup pass: the structure check that is the plan's probe too; the first E-step's
    # pass is fit's input checks' trace too)
    assert int(passes) == int(e_steps) + 1


def test_failed_check_raises():
    bench._check("a method", "max |d resp|", 1e-12, 1e-8)
    with pytest.raises(AssertionError, match="correctness check failed"):
        bench._check("a method", "max |d resp|", 1e-3, 1e-8)
    with pytest.raises(AssertionError):
        bench._check("a method", "max |d resp|", float("nan"), 1e-8)


def test_sizes_parse_and_format():
    assert bench._size("1e4") == 10_000 and bench._size("10_000") == 10_000
    assert bench._fmt_size(100_000) == "1e5" and bench._fmt_size(1500) == "1500"


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc variables")
def test_tuned_malloc_reexecutes_with_the_variables():
    env = {k: v for k, v in os.environ.items() if k not in bench.TUNED_MALLOC}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "estep.py"),
            "--tuned-malloc",
            "--skip-gmm",
            "--skip-hmm",
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert "malloc: tuned (MALLOC_MMAP_THRESHOLD_=4294967296" in proc.stdout
    assert proc.stdout.count("pyro_emvae E-step benchmark") == 1  # re-executed once, no loop


def _headers(out: str, columns: list[str]) -> list[str]:
    return [ln for ln in out.splitlines() if ln.split() == columns]


def _checks(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.lstrip().startswith("check ")]


@pytest.mark.timeout(60)
def test_gmm_quick_run_prints_tables_and_passes_checks(capsys):
    result = gmm_bench.main(["--quick"])
    out = capsys.readouterr().out

    assert out.startswith("pyro_emvae GMM EM benchmark\nmalloc: ")
    assert "== GMM (full), K=8, D=8: correctness checks (float64) ==" in out
    assert "GMM (full covariance), K=8, D=8, float64: seconds per EM iteration" in out
    assert "wall seconds until log p(x) is within 0.0001 nats/datum of the EM optimum" in out
    assert len(_headers(out, ["method", "size", "seconds", "ratio"])) == 1
    assert len(_headers(out, ["method", "size", "iters", "seconds", "ratio"])) == 1
    lines = out.splitlines()
    for row in (gmm_bench.OURS, gmm_bench.TORCH, gmm_bench.LIMIT, gmm_bench.ADAM):
        # one row in each table (the padding after the name tells TORCH from LIMIT)
        assert sum(ln.startswith(row + " ") and "N=1e4" in ln for ln in lines) == 2, row
    assert sum(ln.startswith(gmm_bench.SKLEARN) for ln in lines) == 2 * HAVE_SKLEARN
    assert "targets (issue), GMM D=8 K=8 full:" in out
    assert "N=1e5: not run at this size" in out and "N=1e6: not run at this size" in out

    # every check ran and passed: at the initial params (ours, the GEMM-form EM, Adam, sklearn)
    # and after the timed iterations (ours, the GEMM-form EM, sklearn), each against the plain
    # hand-written EM
    checks = _checks(out)
    assert len(checks) == (3 + HAVE_SKLEARN) + (2 + HAVE_SKLEARN)
    assert all(ln.endswith(" ok") for ln in checks), checks
    assert "FAIL" not in out

    assert list(result) == [10_000]
    per_iter = result[10_000]["per_iter"]
    assert set(per_iter) == {gmm_bench.OURS, gmm_bench.TORCH, gmm_bench.LIMIT, gmm_bench.ADAM} | (
        {gmm_bench.SKLEARN} if HAVE_SKLEARN else set()
    )
    assert all(t > 0 for t in per_iter.values())
    # EM reaches the optimum it defines, whichever implementation runs it
    to_opt = result[10_000]["to_optimum"]
    assert to_opt[gmm_bench.OURS] > 0 and to_opt[gmm_bench.TORCH] > 0
    assert to_opt[gmm_bench.LIMIT] > 0


@pytest.mark.timeout(60)
def test_hmm_quick_run_prints_table_and_passes_checks(capsys):
    result = hmm_bench.main(["--quick"])
    out = capsys.readouterr().out

    assert out.startswith("pyro_emvae Gaussian HMM Baum-Welch benchmark\nmalloc: ")
    assert "== Gaussian HMM, K=8, D=4, one sequence: correctness checks (float64) ==" in out
    assert "Gaussian HMM, K=8, D=4, one sequence, float64: seconds per Baum-Welch iteration" in out
    assert len(_headers(out, ["method", "size", "seconds", "ratio"])) == 1
    lines = out.splitlines()
    for row in (hmm_bench.OURS, hmm_bench.TORCH):
        assert sum(ln.startswith(row) and "T=1e3" in ln for ln in lines) == 1, row
    hmmlearn_rows = [ln for ln in lines if ln.startswith("hmmlearn GaussianHMM") and "T=1e3" in ln]
    assert len(hmmlearn_rows) == 2 * HAVE_HMMLEARN  # implementation "log" and "scaling"
    assert "target (issue): Gaussian HMM K=8 D=4 T=1e5: per iteration faster than hmmlearn" in out

    # checks at the initial params and after the iterations: ours and both hmmlearns
    checks = _checks(out)
    assert len(checks) == 2 * (1 + 2 * HAVE_HMMLEARN)
    assert all(ln.endswith(" ok") for ln in checks), checks
    assert "FAIL" not in out

    assert list(result) == [1_000]
    assert hmm_bench.OURS in result[1_000] and hmm_bench.TORCH in result[1_000]
    assert all(t > 0 for t in result[1_000].values())


@pytest.mark.timeout(120)
def test_amortized_benchmark_quick_run(capsys):
    from benchmarks import amortized

    results = amortized.main(["--quick"])
    out = capsys.readouterr().out
    assert "amortized" in out and "mean-field" in out
    amortized_row, mean_field_row = results[("amortized", 1000)], results[("mean-field", 1000)]
    # the encoder's size does not depend on N; the mean-field guide has 2 N q parameters
    assert amortized_row["params"] == 2 * 10 * 3 + 2 * 3
    assert mean_field_row["params"] == 2 * 1000 * 3
    assert all(map(math.isfinite, (amortized_row["elbo"], mean_field_row["elbo"])))


@pytest.mark.timeout(300)
def test_streaming_quick_run_prints_its_tables_and_checks(capsys):
    from benchmarks import streaming

    result = streaming.main(["--quick"])
    out = capsys.readouterr().out
    assert "1. Peak memory: N=1e5" in out and "2. Time to a log-likelihood: N=1e5" in out
    checks = [ln for ln in out.splitlines() if ln.lstrip().startswith("check ")]
    assert len(checks) == 2 and all(ln.endswith(" ok") for ln in checks), checks
    for row in (
        "full-batch EM, data in memory",
        "exact streaming EM (2 passes)",
        "full-batch EM (ours)",
        "online EM (kappa 0.6)",
        "online EM (kappa 0.51)",
    ):
        assert any(ln.startswith(row) for ln in out.splitlines()), row
    mem = result["memory"]
    assert mem["stream"]["peak_mb"] > 0 and mem["memory"]["peak_mb"] > 0
    # exact streaming reaches the targets (it is EM), whatever the time
    times = result[("online", 100_000)]
    assert all(math.isfinite(t) for t in times["full-batch EM (ours)"])
    assert all(math.isfinite(t) for t in times["exact streaming EM"])


@pytest.mark.timeout(120)
def test_pcfg_quick_run_prints_table_and_passes_checks(capsys):
    from benchmarks import pcfg as pcfg_bench

    result = pcfg_bench.main(["--quick", "--repeat", "1"])
    out = capsys.readouterr().out
    assert out.startswith("pyro_emvae PCFG inside-outside benchmark\n")
    assert "PCFG B=16 L=8 NT=10 PT=20 V=100, float32: seconds (median of 1)" in out
    for times in result.values():
        assert {pcfg_bench.OURS, pcfg_bench.ESTEP, pcfg_bench.EM} <= set(times)
        assert all(t > 0 for t in times.values())
        assert (pcfg_bench.PEER in times) == (importlib.util.find_spec("torch_struct") is not None)
    checks = [ln for ln in out.splitlines() if ln.startswith("check vs torch-struct")]
    assert all(ln.endswith(": ok") for ln in checks) and "FAIL" not in out
