"""The README's example and the demo command run and report what they claim."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_emvae.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_two_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1)
    commands = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("python3 -m pyro_emvae demo")
    test_cmd = commands[1].split("&&")[-1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Fifteen lines\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    result = namespace["result"]
    assert result.converged
    assert namespace["guide"].marginals(namespace["data"])["z"].shape == (400, 2)
    # two well-separated unit blobs: about -log(2 pi e) - log 2 nats/datum at the optimum
    assert -3.8 < result.per_datum() < -3.0


@pytest.mark.parametrize("model", ["gmm", "hmm"])
def test_demo_reports_and_plots(model, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--model", model, "--max-iter", "15", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "log-likelihood" in out
    n_iter = int(re.search(r"iterations\s+(\d+)", out).group(1))
    assert 1 <= n_iter <= 15
    assert "EM: exact E-step; closed-form M-step for" in out
    assert png.stat().st_size > 10_000
    start, end = re.search(r"start -> end\s+(-?[\d.]+) -> (-?[\d.]+)", out).groups()
    assert float(end) > float(start)  # the fit improved the exact log-likelihood


def test_demo_gmm_reaches_known_optimum(capsys):
    """Old Faithful, K=2 full covariance: the maximum likelihood is -1130.264 nats."""
    assert main(["demo", "--plot", "none"]) == 0
    out = capsys.readouterr().out
    ll = float(re.search(r"log p\(x\) = (-?[\d.]+) nats", out).group(1))
    assert abs(ll - (-1130.264)) < 0.01


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_emvae", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "--model" in proc.stdout


def test_demo_vae_reports_iwae_and_active_units(tmp_path, capsys):
    png = tmp_path / "vae.png"
    args = ["demo", "--model", "vae", "--max-iter", "40", "--iwae-samples", "20"]
    assert main([*args, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "iterations       40 SVI steps" in out
    elbo = float(re.search(r"held-out\s+(-?[\d.]+) nats\n", out).group(1))
    iwae = float(re.search(r"IWAE-20\s+held-out\s+(-?[\d.]+)", out).group(1))
    assert -80 < elbo < iwae < 0  # the IWAE bound is above the ELBO
    assert re.search(r"active units\s+\d of 8", out)
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-iter", "0"], "argument --max-iter: must be >= 1, got 0"),
        (["--max-iter", "-5"], "argument --max-iter: must be >= 1, got -5"),
        (["--max-iter", "ten"], "argument --max-iter: expected a whole number >= 1, got 'ten'"),
        (["--model", "vae", "--iwae-samples", "0"], "argument --iwae-samples: must be >= 1"),
        (["--plot", "no/such/dir/demo.png"], "the directory 'no/such/dir' does not exist"),
        (["--plot", "demo.xyz"], "matplotlib cannot write '.xyz' files"),
    ],
)
def test_demo_arguments_are_checked_before_any_fit(args, message, capsys, monkeypatch, tmp_path):
    """Bad values are argparse errors (exit code 2, the message on stderr), found before the
    fit starts (nothing is printed to stdout: no report, no fit ran)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["demo", *args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.out == ""


def test_demo_plot_into_a_directory_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--plot", str(tmp_path)])
    assert info.value.code == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_demo_bad_arguments_exit_2_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_emvae", "demo", "--max-iter", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "must be >= 1, got 0" in proc.stderr and "Traceback" not in proc.stderr
