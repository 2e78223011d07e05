"""The one loop of :func:`~pyro_emvae.fit.fit`, and the steps it runs.

A *step* moves the params once and says what that move saw; the loop around it is the same for
every algorithm. It owns the history, the ``tol`` test, the :class:`ConvergenceWarning`, the
progress bar, the callback, checkpoints (save and resume), Ctrl-C, rollback to the last good
params (and, with ``recover=True``, retries with a larger ``reg_covar``), and builds the
:class:`~pyro_emvae.result.FitResult`. As in NumPyro's ``svi.py`` and BlackJAX, a step
returns its record (:class:`Tick`: the objective and the update's ``info``) and a run returns a
named result.

The steps, and the shape of one iteration of each:

===================  ===========================================================================
:class:`InMemory`    exact EM / ECM / EG on data in memory: **evaluate** (the E-step: the exact
                     :math:`\\log p_\\theta(x)`, recorded and tested against ``tol`` *before*
                     the update, so a converged fit stops at an E-step), then one **update**
                     (the M-step on that posterior)
:class:`Streamed`    the same over a stream: the E-step is a pass summing the statistics
:class:`Minibatch`   online EM, minibatch EG or SVI: an iteration is an **epoch** of updates,
                     one per minibatch (the model scaled by N / B); the epoch's summed
                     objective is the record
:class:`SVIStep`     SVI on data in memory: each update is an iteration and its record (the
                     ELBO estimate), tested on means over windows of 20
===================  ===========================================================================

A step is an object with these attributes and methods (the loop reads nothing else):

* ``key`` (``"log_likelihood"`` or ``"elbo"``), ``label`` (the progress bar's),
  ``algorithm``, ``optimizer`` (whose state a checkpoint holds), ``gradient`` (the params
  reported as moved by gradient steps unless the update's ``info`` says), ``extra`` (history
  keys of its own), ``exact`` (its final objective is evaluated, not estimated), ``rollback``
  (keep the last good params), ``window`` (of the ``tol`` test);
* ``evaluates``: whether an iteration starts with ``evaluate(rollback, n_done) -> (value,
  posterior)``; ``epochs``: whether it is a pass over ``batches()``;
* ``begin(n_done)``; ``update(data, ticks, rollback) -> Tick``; ``settled(posterior, info, tol,
  n_data) -> bool`` (a small change is a stationary point); ``final(rollback, ticks)`` (exact
  steps) or ``estimate(history, batches)``; ``unconverged(max_iter, tol, history, n_data)`` (the
  warning's text).
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.messenger import Messenger

from pyro_emvae import distributed as dp
from pyro_emvae import params as _params
from pyro_emvae.amortized import rng_state, set_rng
from pyro_emvae.checkpoint import (
    Checkpoint,
    constraints_of,
    load_optim_state,
    param_state,
    register,
    restore_params,
)
from pyro_emvae.elbo import KLControlledELBO
from pyro_emvae.errors import ConvergenceWarning
from pyro_emvae.estep import EnumerationError, ExactEStep, Posterior
from pyro_emvae.optim import EMOptim, GradientMStep, OnlineEM
from pyro_emvae.params import (
    constrained,
    restore,
    stamped_snapshot,
)
from pyro_emvae.result import FitResult
from pyro_emvae.stream import Batches

__all__ = [
    "ConvergenceWarning",
    "InMemory",
    "Minibatch",
    "Options",
    "SVIStep",
    "Streamed",
    "Tick",
    "run",
]


class Tick(NamedTuple):
    """What one update returns.

    ``value``: its objective (at the params before it: an E-step's :math:`\\log p(x)`, an SVI
    step's ELBO estimate, a minibatch's scaled objective); ``info``: the update's diagnostics;
    ``stop``: a Ctrl-C came during it and was deferred until the update is recorded; ``extra``:
    history entries of the step's own keys; ``part``: its share of the epoch's objective;
    ``report``: entries for the callback besides ``value`` and ``info``."""

    value: float
    info: dict[str, Any]
    stop: bool = False
    extra: dict[str, float] | None = None
    part: float = 0.0
    report: dict[str, Any] | None = None


@dataclass
class Options:
    """The options of one run of the loop (one of fit's restarts)."""

    max_iter: int
    tol: float
    n_data: int
    callback: Callable | None
    progress: bool | None
    run: int
    n_init: int
    names: list[str]  # the model's params: rolled back, and reported by exact steps
    model: Any = None  # (model, guide, first batch's args and kwargs): to register the params
    guide: Any = None  # before a checkpoint's values are put back
    first: tuple = ((), {})
    ckpt: Checkpoint | None = None
    resume: dict | None = None  # the checkpoint this run goes on from
    outer: Callable[[], dict] = dict  # the restarts' state, saved with each checkpoint
    recover: bool = False
    recoveries: list = field(default_factory=list)


# ------------------------------------------------------------------ rollback
class Rollback:
    """The params of the last good iteration, and the guards that go back to them."""

    def __init__(self, names: list[str], keep: bool) -> None:
        self.names = names
        self.snap: dict[str, torch.Tensor] = {}
        # (each leaf and its version at the copy: an EMOptim step that follows at once takes
        # these copies for its own rollback, see InMemory.update)
        self.stamps: dict[str, tuple] = {}
        if keep:
            self.take()

    def take(self) -> None:
        self.snap, self.stamps = stamped_snapshot(self.names)

    def restore(self) -> None:
        restore(self.snap)

    def check(self, value: float, what: str, iteration: int) -> None:
        """A non-finite ``value`` restores the params and is a FloatingPointError."""
        if not math.isfinite(value):
            self.restore()
            restored = (
                f"the params of the last finite iteration were restored ({', '.join(self.names)})"
                if self.snap
                else "no earlier params were finite"
            )
            raise FloatingPointError(
                f"the {what} became {value} at iteration {iteration}; {restored}. Check the "
                "data for extreme values, lower the learning rate, or regularize the params."
            )

    def guard(self, run: Callable[[], Any], iteration: int) -> Any:
        """Run an E-step; a model error once the M-step has moved the params (Pyro's validation
        of a scale driven to 0, say) rolls back to the last finite params and is a
        FloatingPointError."""
        try:
            return run()
        except EnumerationError:
            raise
        except ValueError as e:
            if iteration == 0:
                raise  # the model fails at its initial params: the user's error, as it is
            self.restore()
            raise FloatingPointError(
                f"the E-step failed at iteration {iteration} after the M-step moved the params "
                f"to invalid values; the params of the last finite iteration were restored "
                f"({', '.join(self.names)}). Lower the learning rate or regularize. Cause: {e}"
            ) from e


_MAX_RECOVERIES = 5


def _recover(o: Options, mstep, error: Exception, iteration: int) -> bool:
    """With ``recover=True``: raise the M-step's ``reg_covar`` tenfold (at least to 1e-6) so
    that iteration ``iteration`` can be redone from the restored params; False when recovery
    is off, the M-step has no ``reg_covar``, or it was tried too often."""
    done = o.recoveries
    if not o.recover or not hasattr(mstep, "reg_covar") or len(done) >= _MAX_RECOVERIES:
        if o.recover and len(done) >= _MAX_RECOVERIES:
            message = (
                f"{error.args[0] if error.args else error} (gave up after {len(done)} "
                f"retries with reg_covar raised to {mstep.reg_covar:g})"
            )
            error.args = (message,)
        return False
    old = mstep.reg_covar
    mstep.reg_covar = max(10 * old, 1e-6)
    if hasattr(mstep, "reset"):
        mstep.reset()
    done.append({"iteration": iteration, "reg_covar": mstep.reg_covar, "error": str(error)})
    warnings.warn(
        f"iteration {iteration} failed ({type(error).__name__}: {error}); the params of the "
        f"last good iteration were restored and reg_covar raised from {old:g} to "
        f"{mstep.reg_covar:g} to retry it",
        stacklevel=5,  # (the user's call of fit: _recover, the _Run method, run, fit, the user)
    )
    return True


# ------------------------------------------------------------------ checkpoints
def _save(o: Options, optimizer: Any, n_done: int, history: dict, rng: Any, position=None) -> None:
    """Write the loop's state after ``n_done`` completed iterations of this run (and, for
    updates per minibatch, ``position`` in the epoch under way)."""
    if o.ckpt is None:
        return
    values, constraints = param_state()
    getter = getattr(optimizer, "state_dict", None) or getattr(optimizer, "get_state", None)
    o.ckpt.save(
        {
            "run": o.run,
            "n_done": n_done,
            "history": {k: list(v) for k, v in history.items()},
            "params": values,
            "constraints": constraints,
            "optimizer": getter() if getter is not None else None,
            "rng": rng,
            "recoveries": list(o.recoveries),
            "position": position,
            **o.outer(),
        }
    )


def _resume(o: Options, optimizer: Any) -> tuple[int, dict]:
    """Put the params, optimizer and RNG back as the checkpoint left them; returns the
    iterations done and the history. A checkpoint written between runs only says which run
    comes next: that run starts from its own initialization."""
    state = o.resume
    if state is None or state["n_done"] is None:
        return 0, {}
    register(o.model, o.guide, *o.first)
    restore_params(state["params"], state["constraints"])
    if state["optimizer"] is not None:
        if hasattr(optimizer, "load_state_dict"):
            optimizer.load_state_dict(state["optimizer"])
        else:  # a pyro.optim optimizer
            load_optim_state(optimizer, state["optimizer"])
    set_rng(state["rng"])
    return state["n_done"], {k: list(v) for k, v in state["history"].items()}


def _position(batch: int, rng_epoch, epoch_sum: float, rng) -> dict[str, Any]:
    """Where a minibatch fit is inside its epoch: batches done, the RNG at the epoch's start
    (the loader's shuffle) and now, and the epoch's running sum."""
    return {"batch": batch, "rng_epoch": rng_epoch, "epoch_sum": epoch_sum, "rng": rng}


def _bar(progress: bool | None, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, disable=(None if progress is None else not progress), leave=False
    )


def _trim(history: dict[str, list[float]], n: int) -> None:
    for values in history.values():
        del values[n:]


def _last_change(values: list[float], n_data: int) -> float:
    return abs(values[-1] - values[-2]) / n_data if len(values) > 1 else float("nan")


# ------------------------------------------------------------------ the loop
_GO, _REDO, _STOP = "go", "redo", "stop"  # what a part of an iteration tells the loop


def run(step: Any, o: Options) -> FitResult:
    """Run ``step`` for ``o.max_iter`` iterations, or until the objective per datum changes by
    less than ``o.tol`` (``|\\bar h_{now} - \\bar h_{before}| / n < tol`` over the step's
    window of records, and the step :meth:`settled`), the callback returns True, or Ctrl-C.

    One iteration: ``evaluate`` (record, test) for a step that evaluates first; then its
    updates (one, or one per minibatch of an epoch), each followed by the checkpoint when due,
    the progress bar and the callback; an epoch ends with its record and test. Returns the
    run's :class:`~pyro_emvae.result.FitResult`; the final objective of an exact step is a last
    evaluation at the returned params.
    """
    r = _Run(step, o)
    try:
        while r.n_done < o.max_iter:
            if step.evaluates:  # the objective at the params the update will start from
                outcome = r.evaluate()
                if outcome == _REDO:  # the last update led to invalid params: undone
                    continue
                if outcome == _STOP:  # converged at this evaluation
                    break
            outcome = r.updates()
            if outcome == _STOP:
                break
            if outcome == _REDO or not step.epochs:
                continue
            if r.end_epoch():
                break
    except KeyboardInterrupt:
        r.interrupted()
    finally:
        r.bar.close()
    return r.finish()


class _Run:
    """The state of one run of the loop: the history (``records`` and ``times`` are its
    objective's and times' lists), the iterations done (``n_done``) and updates taken
    (``ticks``), the last good params (``rb``), the RNG state of the last checkpoint, the
    progress bar, the place in an epoch of minibatch updates, and how the run ends."""

    def __init__(self, step: Any, o: Options) -> None:
        self.step, self.o = step, o
        self.resume()
        self.records, self.times = self.history[step.key], self.history["time"]
        self.start = time.perf_counter() - (self.times[-1] if self.times else 0.0)
        self.rb = Rollback(o.names, step.rollback)
        self.rng = rng_state() if o.ckpt is not None else None
        self.converged = self.was_interrupted = self.in_update = self.at_final = False
        self.info: dict[str, Any] = {}  # the last update's
        self.post: Any = None  # the last evaluation's posterior: the update's data
        self.done_in_epoch, self.epoch_sum, self.epoch_batches, self.rng_epoch = 0, 0.0, 0, None
        key = step.key
        self.per_datum = f"{'ll' if key == 'log_likelihood' else key}_per_datum"
        label = step.label if o.n_init == 1 else f"{step.label} run {o.run}"
        self.bar = _bar(o.progress, o.max_iter, label)
        self.bar.update(self.n_done)

    # ------------------------------------------------------------ the parts of an iteration
    def resume(self) -> None:
        """A fresh history, or the checkpoint's: params, optimizer, RNG, iterations done, the
        place in the epoch under way and the recoveries so far."""
        step, o = self.step, self.o
        history: dict[str, list[float]] = {step.key: [], "time": []}
        if step.epochs:
            history["batch"] = []
        for k in step.extra:
            history[k] = []
        self.n_done, saved = _resume(o, step.optimizer)
        self.history = saved or history
        self.position = o.resume.get("position") if saved and step.epochs else None
        self.ticks = len(self.history["batch"]) if step.epochs else self.n_done
        o.recoveries = list(o.resume.get("recoveries", [])) if o.resume else []
        step.begin(self.n_done)

    def evaluate(self) -> str:
        """The E-step of a step that evaluates first: record its objective and test it;
        ``_REDO`` after undoing the last update (recovery), ``_STOP`` when converged."""
        step, o = self.step, self.o
        # the last posterior goes before the next E-step makes one: an in-memory
        # posterior is as large as the data, and two would be alive at once
        self.post = None
        try:
            value, self.post = step.evaluate(self.rb, self.n_done)
            self.rb.check(value, "log-likelihood", self.n_done)
        except FloatingPointError as e:
            # the last update led to invalid params; they were restored: undo it
            if self.n_done == 0 or not _recover(o, step.optimizer, e, self.n_done):
                raise
            self.n_done -= 1
            self.ticks -= 1
            _trim(self.history, self.n_done)
            return _REDO
        self.record(value)
        # (after an update that the M-step's guard undid, the objective stands still
        # because those params did not move: that is no sign of a stationary point)
        if self.changed_little() and step.settled(self.post, self.info, o.tol, o.n_data):
            self.converged = self.at_final = True  # this evaluation is the final one
            if o.ckpt is not None:  # resuming redoes this evaluation and stops there
                self.save({k: v[:-1] for k, v in self.history.items()})
            return _STOP
        self.rb.take()
        return _GO

    def updates(self) -> str:
        """One update (on the evaluation's posterior), or an epoch of updates, one per
        minibatch; each is recorded, then reported. ``_REDO`` after a failed update that
        recovery undid, ``_STOP`` when the tol test or the callback ends the run."""
        step, o = self.step, self.o
        batches, skip = self.start_epoch() if step.epochs else ((self.post,), 0)
        for data in batches:
            if self.done_in_epoch < skip:
                self.done_in_epoch += 1
                if self.done_in_epoch == skip:
                    set_rng(self.position["rng"])
                continue
            self.position = None
            self.in_update = step.evaluates  # (a Ctrl-C inside an M-step undoes it)
            try:
                tick = step.update(data, self.ticks, self.rb)
            except (FloatingPointError, torch.linalg.LinAlgError) as e:
                if not _recover(o, step.optimizer, e, self.n_done + 1):
                    raise
                self.rb.restore()  # (EMOptim has already put its params back)
                self.in_update = False
                _trim(self.history, self.n_done)
                return _REDO
            value = self.took(tick)
            if self.report(tick, value):
                self.converged = True
                return _STOP
        return _GO

    def start_epoch(self) -> tuple[Iterable, int]:
        """The epoch's batches and how many of them a resume skips."""
        if self.position is not None:  # resume inside the epoch: the same shuffle, then skip
            self.rng_epoch = self.position["rng_epoch"]
            set_rng(self.rng_epoch)
            skip, self.epoch_sum = self.position["batch"], self.position["epoch_sum"]
        else:
            self.rng_epoch = rng_state()
            skip, self.epoch_sum = 0, 0.0
        self.done_in_epoch = 0
        return self.step.batches(), skip

    def took(self, tick: Tick) -> float:
        """Record an update: history, counts, and the checkpoint when due; returns its value."""
        step, o, history = self.step, self.o, self.history
        value, self.info = tick.value, tick.info
        if step.evaluates and step.key in self.info:  # the M-step undid the update (its guard)
            value = self.records[-1] = self.info[step.key]
        self.in_update = False
        if tick.extra:
            for k, v in tick.extra.items():
                history[k].append(v)
        self.ticks += 1
        if step.epochs:
            self.done_in_epoch += 1
            self.epoch_sum += tick.part
            history["batch"].append(value / o.n_data)
            if step.rollback:
                self.rb.take()
        else:
            if not step.evaluates:  # the update is the iteration's record
                self.record(value)
            self.n_done += 1
        if o.ckpt is not None:
            self.rng = rng_state()
            if step.epochs:
                if o.ckpt.due(self.ticks):
                    self.save(history, self.here())
            elif o.ckpt.due(self.ticks) or self.n_done == o.max_iter:
                self.save(history)
        return value

    def report(self, tick: Tick, value: float) -> bool:
        """The progress bar, a deferred Ctrl-C, the tol test of a step whose updates are its
        records, and the callback; True to stop here."""
        step, o = self.step, self.o
        if not step.epochs:
            self.bar.update()
        if not getattr(self.bar, "disable", False):  # (a hidden bar shows no postfix)
            self.bar.set_postfix({self.per_datum: f"{value / o.n_data:.6g}"})
        if tick.stop:  # a Ctrl-C came during the update: it is recorded, now stop
            raise KeyboardInterrupt
        if not (step.evaluates or step.epochs) and self.changed_little():
            return True
        if o.callback is None:
            return False
        report = {step.key: value, **(tick.report or {})}
        if step.epochs:
            report["epoch"], report["batch"] = self.n_done, self.done_in_epoch - 1
        return bool(o.callback(self.ticks, {**report, **self.info}))

    def end_epoch(self) -> bool:
        """The epoch's record (the sum of its minibatch objectives), checkpoint and tol test;
        True when converged."""
        if self.done_in_epoch == 0:
            raise ValueError("the stream gave no batch in this epoch")
        self.epoch_batches = self.done_in_epoch
        self.record(self.epoch_sum)
        self.n_done += 1
        self.done_in_epoch = 0
        self.bar.update()
        if self.o.ckpt is not None:
            self.rng = rng_state()
            self.save(self.history)
        if self.changed_little():
            self.converged = True
            return True
        return False

    def interrupted(self) -> None:
        """Ctrl-C: the params of the last whole iteration (or update), and a checkpoint of
        what was completed."""
        step, ckpt, history = self.step, self.o.ckpt, self.history
        self.was_interrupted = True
        if self.in_update:  # a partial M-step is undone: params are those of the last iteration
            self.rb.restore()
        if step.epochs:
            if ckpt is not None:
                self.save(history, self.here() if self.done_in_epoch else None)
        elif step.evaluates:
            # a checkpoint of the completed iterations; not from inside an M-step, whose
            # optimizer state (Adam's moments, the guard) has moved: the last periodic one stands
            if ckpt is not None and not self.in_update:
                self.save({k: v[: self.n_done] for k, v in history.items()})
        else:  # (updates defer Ctrl-C, so a step is whole; its record may be cut short)
            self.n_done = len(self.times)
            _trim(history, self.n_done)
            if ckpt is not None and self.n_done:
                self.save(history)

    def finish(self) -> FitResult:
        """The final objective, the ConvergenceWarning, and the run's FitResult."""
        step, o, history = self.step, self.o, self.history
        if step.exact:
            if self.at_final and not self.was_interrupted:
                final = self.records[-1]
            else:  # the final evaluation: the reported objective belongs to the returned params
                self.post = None  # (as before each E-step)
                final = step.final(self.rb, self.ticks)
                self.rb.check(final, "log-likelihood", self.ticks)
                self.record(final)
        else:
            final = step.estimate(history, self.epoch_batches, o.n_data)
        if not self.converged and not self.was_interrupted and o.tol > 0:
            warnings.warn(
                step.unconverged(o.max_iter, o.tol, history, o.n_data),
                ConvergenceWarning,
                stacklevel=4,  # (the user's call of fit: finish, run, fit, the user)
            )
        info = self.info
        if step.exact:
            names = o.names
            if o.recoveries:
                info = {**info, "recoveries": o.recoveries}
        else:
            names = list(pyro.get_param_store().keys())
            info = {"guide_params": names}
        return FitResult(
            constraints=constraints_of(names),
            params=constrained(names),
            log_likelihood=final if step.exact else None,
            elbo=final,
            history=history,
            converged=self.converged,
            n_iter=self.n_done,
            n_data=o.n_data,
            algorithm=step.algorithm,
            interrupted=self.was_interrupted,
            info=info,
            closed_form=list(info.get("closed_form", [])),
            gradient=list(info.get("gradient", step.gradient)),
        )

    # ------------------------------------------------------------ helpers
    def record(self, value: float) -> None:
        self.records.append(value)
        self.times.append(time.perf_counter() - self.start)

    def changed_little(self) -> bool:
        """The ``tol`` test on the records (its step's stationarity check comes after)."""
        h, tol, window, n_data = self.records, self.o.tol, self.step.window, self.o.n_data
        if tol <= 0 or len(h) < 2 * window or len(h) % window:
            return False
        if window == 1:
            return abs(h[-1] - h[-2]) / n_data < tol
        now = sum(h[-window:]) / window
        before = sum(h[-2 * window : -window]) / window
        return abs(now - before) / n_data < tol

    def here(self) -> dict[str, Any]:
        """Where the run is inside its epoch (for a checkpoint)."""
        return _position(self.done_in_epoch, self.rng_epoch, self.epoch_sum, self.rng)

    def save(self, history: dict, position: dict | None = None) -> None:
        _save(self.o, self.step.optimizer, self.n_done, history, self.rng, position)


# ------------------------------------------------------------------ the steps
def _algorithm(mstep: Any) -> str:
    return "EG" if isinstance(mstep, GradientMStep) else getattr(mstep, "algorithm", "EM")


class _Exact:
    """What exact steps share: an E-step first, the M-step as the update."""

    key, label, extra, exact, rollback, window = "log_likelihood", "EM", (), True, True, 1
    evaluates, epochs = True, False

    def __init__(self, guide: ExactEStep, mstep: Any, names: list[str]) -> None:
        self.guide, self.optimizer = guide, mstep
        self.gradient = names if isinstance(mstep, GradientMStep) else []
        self.wants_grads = getattr(mstep, "needs_param_grads", False)

    @property
    def algorithm(self) -> str:  # (EMOptim's, known once it has planned its M-step)
        return _algorithm(self.optimizer)

    def begin(self, n_done: int) -> None:
        pass

    def unconverged(self, max_iter: int, tol: float, history: dict, n_data: int) -> str:
        return (
            f"fit did not converge in {max_iter} iterations (last change "
            f"{_last_change(history['log_likelihood'], n_data):.3g} nats/datum >= tol={tol}); "
            "raise max_iter or tol."
        )


class InMemory(_Exact):
    """EM on data held in memory: an E-step is one posterior, the M-step takes it."""

    def __init__(self, guide: ExactEStep, mstep: Any, args: tuple, kwargs: dict, names) -> None:
        super().__init__(guide, mstep, names)
        self.args, self.kwargs = args, kwargs

    def evaluate(self, rb: Rollback, n_done: int) -> tuple[float, Posterior]:
        """The E-step (data-parallel: its log-likelihood summed over the ranks)."""

        def estep() -> Posterior:
            # (the same data at every iteration of this fit: what the E-step keeps of their
            # values is reused; fit forgets it when it starts, see ExactEStep.posterior)
            self.guide._keep_data = True
            try:
                post = self.guide.posterior(*self.args, param_grads=self.wants_grads, **self.kwargs)
            finally:
                self.guide._keep_data = False
            dp.all_reduce_([post.log_likelihood])
            return post

        post = rb.guard(estep, n_done)
        # (float(post.log_likelihood), without a scalar copy where the E-step read it)
        return post.log_likelihood_value(), post

    def update(self, post: Posterior, ticks: int, rb: Rollback) -> Tick:
        opt = self.optimizer
        if isinstance(opt, EMOptim):
            # (the rollback's copies, taken after this E-step with no code run since that
            # could write a param unseen: the M-step's own rollback copy is the same bits)
            opt._taken = (rb.snap, rb.stamps)
        try:
            info = dict(opt(self.guide, post, self.args, self.kwargs) or {})
        finally:
            if isinstance(opt, EMOptim):
                opt._taken = None
        return Tick(post.log_likelihood_value(), info, report={"posterior": post})

    def final(self, rb: Rollback, ticks: int) -> float:
        return self.evaluate(rb, ticks)[0]

    def settled(self, post: Posterior, info: dict, tol: float, n_data: int) -> bool:
        """Whether the params that take gradient steps are at a stationary point: a small
        change of log p(x) is no proof of it (an optimizer's step across the optimum, or one
        that the guard undid, changes log p(x) little while the gradient stays large).
        :math:`\\max |\\nabla \\log p(x)| / n \\le \\sqrt{tol}` in the unconstrained values
        (a step of a gradient method moves log p(x) by about the gradient's square). Plain EM
        has no such params and costs nothing here; ECM pays one backward pass, on the
        iterations where the change is below ``tol``."""
        if info.get("rejected"):
            return False
        if isinstance(self.optimizer, EMOptim):
            plan = self.optimizer._plan  # (None after a resume, before the first M-step)
            if plan is None:
                plan = self.optimizer.plan(self.guide, self.args, self.kwargs, post.subsample)
            names = set(plan.gradient)
        elif isinstance(self.optimizer, GradientMStep):
            names = None  # all of the model's params
        else:
            return True  # a user's M-step: its params are its own business
        if names is not None and not names:
            return True
        grads = post.param_grads
        if grads is None:
            grads = self.guide.posterior(*self.args, param_grads=True, **self.kwargs).param_grads
        moved = [g for n, g in grads.items() if names is None or n in names]
        if not moved:
            return True
        dp.all_reduce_(moved)
        worst = max(float(g.abs().max()) for g in moved)
        return worst / n_data <= math.sqrt(tol)


class Streamed(_Exact):
    """Exact EM on a stream: an E-step is a pass over the batches summing log p(x) and the
    statistics (:meth:`EMOptim.stream_estep`), the M-step applies them."""

    def __init__(self, guide: ExactEStep, mstep: EMOptim, batches: Batches, names) -> None:
        super().__init__(guide, mstep, names)
        self.batches = batches

    def evaluate(self, rb: Rollback, n_done: int):
        spass = rb.guard(lambda: self.optimizer.stream_estep(self.guide, self.batches), n_done)
        return spass.log_likelihood, spass

    def update(self, spass, ticks: int, rb: Rollback) -> Tick:
        info = dict(self.optimizer.stream_mstep(self.guide, self.batches, spass) or {})
        return Tick(spass.log_likelihood, info, report={"posterior": None})

    def final(self, rb: Rollback, ticks: int) -> float:
        return rb.guard(lambda: stream_log_likelihood(self.guide, self.batches), ticks)

    def settled(self, post, info: dict, tol: float, n_data: int) -> bool:
        # (exact streaming EM: its gradient params, if any, take steps per batch; the change
        # of log p(x) over a pass is the test)
        return not info.get("rejected")


def stream_log_likelihood(guide: ExactEStep, batches: Batches) -> float:
    """Exact :math:`\\log p(x)` of a stream at the current params: one pass, summed over the
    batches (and, data-parallel, over the ranks)."""
    total = 0.0
    for args, kwargs in batches:
        total += float(guide.log_likelihood(*args, **kwargs))
    return dp.all_reduce_float(total)


class _Scale(Messenger):
    """Multiplies every sample site's scale by ``factor`` (set before each minibatch)."""

    factor = 1.0

    def _pyro_sample(self, msg) -> None:
        msg["scale"] = msg["scale"] * self.factor


def _svi_loss(loss: Any, enumerates: bool) -> Any:
    return loss or (TraceEnum_ELBO() if enumerates else Trace_ELBO())


class Minibatch:
    """An update after every minibatch of ``stream``, the model scaled by N / B: online EM or
    minibatch EG (an ExactEStep guide and its M-step), or SVI. An iteration is an epoch; its
    record is the sum of its minibatch objectives, each at the params of its step."""

    evaluates, epochs, window = False, True, 1

    def __init__(
        self,
        model,
        guide,
        optimizer,
        stream: Batches,
        rows: int,
        names,
        loss=None,
        enumerates=False,
    ) -> None:
        self.stream, self.rows, self.optimizer = stream, rows, optimizer
        self.exact = self.rollback = isinstance(guide, ExactEStep)
        self.key = "log_likelihood" if self.exact else "elbo"
        self.label = (
            "online EM" if isinstance(optimizer, OnlineEM) else "EM" if self.exact else "SVI"
        )
        self.gradient = names if isinstance(optimizer, GradientMStep) else []
        self.controlled = False
        if self.exact:
            self.guide = guide
            self.wants_grads = getattr(optimizer, "needs_param_grads", False)
            # the guide on the model scaled by N / B: the E-step, the M-step's probe of the
            # model and its gradient steps all see the scale (an ambient poutine.scale would
            # not reach the probe, which blocks the handlers around it)
            self.scaler = _Scale()
            self.scaled = copy.copy(guide)
            self.scaled.model = self.scaler(guide.model)
        else:
            self.loss = _svi_loss(loss, enumerates)
            self.svi = SVI(model, guide, optimizer, self.loss)
            self.controlled = isinstance(self.loss, KLControlledELBO)
        self.extra = ("kl_weight",) if self.controlled else ()

    def begin(self, n_done: int) -> None:
        pass

    @property
    def algorithm(self) -> str:
        return _algorithm(self.optimizer) if self.exact else "SVI"

    def batches(self) -> Iterable:
        return dp.lockstep(self.stream.with_rows())

    def update(self, batch, ticks: int, rb: Rollback) -> Tick:
        args, kwargs, n_rows = batch
        scale = self.rows / dp.all_reduce_float(n_rows)
        with _deferred_interrupt() as caught:  # a step is never cut in half
            value, info, stop = self._update(args, kwargs, scale, ticks, rb)
        extra = {"kl_weight": self.loss.beta} if self.controlled else None
        return Tick(value, info, stop or bool(caught), extra, value / scale)

    def _update(self, args, kwargs, scale, ticks, rb) -> tuple[float, dict, bool]:
        if not self.exact:
            if self.controlled:
                self.loss.step = ticks
            with poutine.scale(scale=scale):
                value, stop = _svi_step(self.svi, args, kwargs, ticks + 1)
            return (self.loss.last_elbo if self.controlled else -value), {}, stop

        def estep() -> Posterior:
            post = self.scaled.posterior(*args, param_grads=self.wants_grads, **kwargs)
            dp.all_reduce_([post.log_likelihood])
            return post

        self.scaler.factor = scale
        post = rb.guard(estep, ticks)
        ll = float(post.log_likelihood)
        rb.check(ll, "minibatch log-likelihood", ticks)
        info = dict(self.optimizer(self.scaled, post, args, kwargs) or {})
        return ll, info, False

    def settled(self, post, info: dict, tol: float, n_data: int) -> bool:
        return True

    def final(self, rb: Rollback, ticks: int) -> float:
        """The exact log-likelihood of the returned params: one more pass."""
        return rb.guard(lambda: stream_log_likelihood(self.guide, self.stream), ticks)

    def estimate(self, history: dict, batches: int, n_data: int) -> float:
        """The mean per-datum objective of the last epoch's minibatches, times ``n_data``."""
        recent = history["batch"][-(batches or len(history["batch"])) :]
        return sum(recent) / len(recent) * n_data if recent else float("nan")

    def unconverged(self, max_iter: int, tol: float, history: dict, n_data: int) -> str:
        return (
            f"fit did not converge in {max_iter} epochs (tol={tol} on the change of the "
            "epoch's summed minibatch objective per datum); raise max_iter or tol."
        )


_WINDOW = 20


class SVIStep:
    """One :class:`pyro.infer.SVI` step on data in memory: an iteration, recorded by its ELBO
    estimate; ``tol`` compares the means of successive windows of 20."""

    key, label, algorithm, exact, rollback = "elbo", "SVI", "SVI", False, False
    evaluates, epochs, window, gradient = False, False, _WINDOW, []

    def __init__(self, model, guide, optim, args, kwargs, loss=None, enumerates=False) -> None:
        self.loss = _svi_loss(loss, enumerates)
        self.svi = SVI(model, guide, optim, self.loss)
        self.optimizer, self.args, self.kwargs = optim, args, kwargs
        self.controlled = isinstance(self.loss, KLControlledELBO)
        self.extra = ("kl_weight",) if self.controlled else ()

    def begin(self, n_done: int) -> None:
        if self.controlled:
            self.loss.step = n_done  # (a new run starts its schedule again)

    def update(self, data, ticks: int, rb: Rollback) -> Tick:
        loss_value, stop = _svi_step(self.svi, self.args, self.kwargs, ticks + 1)
        if self.controlled:  # the plain ELBO, not the weighted objective that was climbed
            return Tick(self.loss.last_elbo, {}, stop, {"kl_weight": self.loss.beta})
        return Tick(-loss_value, {}, stop)

    def settled(self, post, info: dict, tol: float, n_data: int) -> bool:
        return True

    def estimate(self, history: dict, batches: int, n_data: int) -> float:
        """The mean ELBO estimate of the last window."""
        h = history["elbo"]
        return sum(h[-_WINDOW:]) / len(h[-_WINDOW:]) if h else float("nan")

    def unconverged(self, max_iter: int, tol: float, history: dict, n_data: int) -> str:
        return (
            f"SVI did not converge in {max_iter} iterations (tol={tol} on the ELBO per datum, "
            f"averaged over windows of {_WINDOW}); raise max_iter or tol."
        )


@contextmanager
def _deferred_interrupt():
    """Defer Ctrl-C while the optimizer writes the params: the yielded list records it, and
    the loop raises KeyboardInterrupt once the step is recorded (history, checkpoint), so an
    interrupted fit never holds half-updated or unrecorded params (main thread only)."""
    caught: list = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


def _svi_step(svi: SVI, args: tuple, kwargs: dict, it: int) -> tuple[float, bool]:
    """``SVI.step``, except that a non-finite loss or gradient is caught *before* the
    optimizer moves the params (so nothing needs to be rolled back, and no copy of the params
    is kept per step), and that a Ctrl-C during the update is deferred: returns the loss and
    whether one came."""
    try:
        with poutine.trace(param_only=True) as capture:
            loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
    except KeyboardInterrupt:  # before the update: the step did not happen, its grads go
        pyro.infer.util.zero_grads(set(_params.unconstrained().values()))
        raise
    # (a list in trace order: data-parallel ranks reduce the grads in the same order)
    params = list(
        {
            id(p): p for p in (s["value"].unconstrained() for s in capture.trace.nodes.values())
        }.values()
    )
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    dp.all_reduce_grads(params)  # the gradient of the ELBO summed over the shards
    value = dp.all_reduce_float(value)
    bad = sorted(
        pyro.get_param_store().param_name(p)
        for p in params
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    )
    if not math.isfinite(value) or bad:
        pyro.infer.util.zero_grads(params)
        what = (
            f"the ELBO became {-value}"
            if not math.isfinite(value)
            else (f"the gradient of {bad} became non-finite")
        )
        raise FloatingPointError(
            f"{what} at iteration {it}; the step was not taken, so the params are those of "
            f"iteration {it - 1}. Check the data for extreme values, lower the learning rate, "
            "or bound the guide's scales."
        )
    with _deferred_interrupt() as caught:
        svi.optim(params)
        pyro.infer.util.zero_grads(params)
    return value, bool(caught)
