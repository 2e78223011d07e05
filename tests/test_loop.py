"""Tests of :mod:`pyro_emvae.loop`: the one loop runs any object with the step interface, with
the same rules for history, ``tol``, the final evaluation, the callback, the warning and Ctrl-C
(fit's own steps are tested through :func:`pyro_emvae.fit` in test_fit, test_stream,
test_checkpoint and test_regressions)."""

import math

import pyro
import pytest
import torch

from pyro_emvae import ConvergenceWarning
from pyro_emvae.loop import Options, Tick, run


class Halving:
    """A toy step on one param ``x``: the update halves it; the objective is
    :math:`-x^2` (so the records go -1, -1/4, -1/16, ...: exactly known)."""

    key, label, algorithm, extra, exact, rollback = "log_likelihood", "toy", "toy", (), True, True
    epochs, optimizer, gradient = False, None, []

    def __init__(self, evaluates=True, window=1, interrupt_at=None):
        self.evaluates, self.window, self.interrupt_at = evaluates, window, interrupt_at
        self.evaluations = 0

    def begin(self, n_done):
        pass

    def objective(self):
        self.evaluations += 1
        return -(float(pyro.param("x").detach()) ** 2)

    def evaluate(self, rb, n_done):
        return self.objective(), None

    def update(self, post, ticks, rb):
        value = self.objective() if not self.evaluates else -(float(pyro.param("x").detach()) ** 2)
        with torch.no_grad():
            pyro.param("x").unconstrained().mul_(0.5)
        if ticks + 1 == self.interrupt_at:  # a Ctrl-C inside the update, after it wrote
            raise KeyboardInterrupt
        return Tick(value, {"ticks": ticks})

    def settled(self, post, info, tol, n_data):
        return True

    def final(self, rb, ticks):
        return self.objective()

    def unconverged(self, max_iter, tol, history, n_data):
        return f"toy did not converge in {max_iter}"


def options(max_iter=50, tol=1e-3, callback=None):
    pyro.param("x", torch.tensor(1.0))
    return Options(max_iter, tol, 1, callback, False, 0, 1, ["x"])


def test_an_evaluating_step_is_tested_before_its_update_and_its_last_evaluation_is_final():
    calls = []
    step = Halving()
    result = run(step, options(callback=lambda it, info: calls.append((it, info["ticks"]))))
    # -4^-k: the change 3 * 4^-(k+1) first falls below 1e-3 at k = 5 -> 6 (7 records)
    expected = [-(4.0**-k) for k in range(7)]
    assert result.history["log_likelihood"] == expected
    assert result.converged and result.n_iter == 6 and len(result.history["time"]) == 7
    assert step.evaluations == 7  # the converged evaluation is the final one: none after
    assert result.log_likelihood == expected[-1] == -(float(pyro.param("x").detach()) ** 2)
    assert calls == [(k, k - 1) for k in range(1, 7)]  # one callback per completed update


def test_an_updating_step_records_each_update_and_tests_windows_of_its_records():
    step = Halving(evaluates=False, window=2)
    result = run(step, options(tol=1e-3))
    h = result.history["log_likelihood"][: result.n_iter]  # (then the final evaluation)
    # windows of 2 compared at even lengths: first below tol at 10 records
    means = [(h[i] + h[i + 1]) / 2 for i in range(0, len(h), 2)]
    assert len(h) == 10 and result.n_iter == 10 and result.converged
    assert abs(means[-1] - means[-2]) < 1e-3 <= abs(means[-2] - means[-3])
    assert h == [-(4.0**-k) for k in range(10)]
    # the final objective is a last evaluation at the returned params
    assert result.log_likelihood == result.history["log_likelihood"][-1] == -(4.0**-10)
    assert step.evaluations == 11


def test_max_iter_warns_with_the_steps_text_and_evaluates_once_more():
    step = Halving()
    with pytest.warns(ConvergenceWarning, match="toy did not converge in 3"):
        result = run(step, options(max_iter=3, tol=1e-12))
    assert not result.converged and result.n_iter == 3
    assert result.history["log_likelihood"] == [-(4.0**-k) for k in range(4)]


def test_a_callback_returning_true_stops_the_run_as_converged():
    result = run(Halving(), options(tol=0, callback=lambda it, info: it == 2))
    assert result.converged and result.n_iter == 2
    assert result.history["log_likelihood"] == [-1.0, -0.25, -(4.0**-2)]


def test_ctrl_c_inside_an_update_restores_the_params_of_the_last_iteration():
    result = run(Halving(interrupt_at=3), options(tol=0))
    assert result.interrupted and result.n_iter == 2
    assert float(pyro.param("x").detach()) == 0.25  # the third halving was undone
    assert result.log_likelihood == -(0.25**2) and math.isfinite(result.elbo)
