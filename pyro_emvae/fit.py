"""``fit``: the loop that climbs the ELBO, whatever the guide.

* With an :class:`~pyro_emvae.estep.ExactEStep` guide each iteration is an exact E-step
  (which also yields the exact :math:`\\log p_\\theta(x)`, the tight ELBO) followed by an M-step
  (:class:`~pyro_emvae.optim.GradientMStep` when ``optim`` is a Pyro optimizer: EG / GEM).
* With any other guide (an AutoGuide, an encoder) each iteration is one
  :class:`pyro.infer.SVI` step on the ELBO (``TraceEnum_ELBO`` when the model enumerates
  discrete sites, ``Trace_ELBO`` otherwise).

The loop owns what scikit-learn's mixture fit owns: ``tol`` on the change of the per-datum
objective, ``max_iter``, restarts (``n_init``, the best run kept), a ``ConvergenceWarning``, and
a final E-step so the reported log-likelihood belongs to the returned params.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger, _bound_partial, _context_wrap, unwrap
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae import distributed as dp
from pyro_emvae.amortized import preserved_rng, rng_state, set_rng
from pyro_emvae.checkpoint import (
    Checkpoint,
    StreamDigest,
    check_storable,
    constraints_of,
    data_digest,
    load_optim_state,
    param_state,
    register,
    restore_params,
)
from pyro_emvae.elbo import KLControlledELBO
from pyro_emvae.estep import EnumerationError, ExactEStep, Posterior
from pyro_emvae.init import STRATEGIES, init_potentials
from pyro_emvae.optim import EMOptim, GradientMStep, OnlineEM
from pyro_emvae.stream import Batches, is_stream
from pyro_emvae.validate import (
    MarkConditioned,
    ModelInputError,
    check_components,
    explain_input_errors,
    explain_model_errors,
    model_inputs,
    observed_count,
    validate_fit_inputs,
)

__all__ = ["ConvergenceWarning", "FitResult", "fit"]


class ConvergenceWarning(UserWarning):
    """The fit stopped at ``max_iter`` before the objective changed by less than ``tol``."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        params: param name -> constrained value (detached copy) at the end of the best run.
        log_likelihood: exact :math:`\\log p_\\theta(x)` (total, nats) at ``params`` when the
            guide is an ``ExactEStep``; ``None`` otherwise.
        elbo: the final ELBO (equal to ``log_likelihood`` for an ``ExactEStep`` guide; for SVI,
            the mean of the last few iterations' estimates).
        history: ``"log_likelihood"`` (exact, at each E-step: ``n_iter + 1`` values, the first at
            the initial params, the last at ``params``) or ``"elbo"`` (one SVI estimate per
            iteration), and ``"time"`` (seconds since the run started, one per value).
        converged: whether ``|Δ objective| / n_data < tol`` was reached.
        n_iter: iterations run in the best run.
        n_data: the count used for per-datum values (see :func:`fit`).
        algorithm: ``"EM"`` (every param in closed form), ``"ECM"`` (closed form and gradient
            steps), ``"EG"`` (exact E-step, gradient M-steps only) or ``"SVI"``.
        closed_form: names of the params updated in closed form.
        gradient: names of the params moved by gradient steps.
        interrupted: the fit was stopped by KeyboardInterrupt; params are those of the last
            completed iteration (with restarts: of the best run so far). With ``checkpoint``,
            calling ``fit`` again resumes where it stopped.
        restarts: final objective of each run when ``n_init > 1``.
        info: the last M-step's diagnostics.
    """

    params: dict[str, torch.Tensor]
    log_likelihood: float | None
    elbo: float | None
    history: dict[str, list[float]]
    converged: bool
    n_iter: int
    n_data: int
    algorithm: str
    interrupted: bool = False
    restarts: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    closed_form: list[str] = field(default_factory=list)
    gradient: list[str] = field(default_factory=list)
    constraints: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def objective(self) -> float:
        """The final objective: ``log_likelihood`` when exact, else ``elbo``."""
        return self.log_likelihood if self.log_likelihood is not None else self.elbo

    def per_datum(self) -> float:
        """The final objective divided by ``n_data`` (nats per datum)."""
        return self.objective / self.n_data

    def n_parameters(self) -> int:
        """Free parameters of the fitted params, counted from their shapes and constraints: a
        simplex of K entries has K - 1, a D x D Cholesky factor or covariance D(D+1)/2, a
        correlation Cholesky factor D(D-1)/2, anything else (real, positive, an interval) one
        per entry. For an EM fit these are the model's params; for SVI they include the
        guide's."""
        return sum(_free_parameters(v, self.constraints.get(k)) for k, v in self.params.items())

    def aic(self) -> float:
        """Akaike's criterion :math:`-2 \\log p(x) + 2k` (lower is better); needs the exact
        log-likelihood (an ExactEStep fit)."""
        return -2.0 * self._exact("aic") + 2.0 * self.n_parameters()

    def bic(self) -> float:
        """The Bayesian information criterion :math:`-2 \\log p(x) + k \\log n` with
        ``n = n_data`` (as scikit-learn's ``GaussianMixture.bic``; lower is better)."""
        return -2.0 * self._exact("bic") + self.n_parameters() * math.log(self.n_data)

    def _exact(self, what: str) -> float:
        if self.log_likelihood is None:
            raise ValueError(
                f"{what}() needs the exact log-likelihood of an ExactEStep fit; this {self.algorithm}"
                " fit has an ELBO only (use log_marginal for an estimate)"
            )
        return self.log_likelihood

    def plot(self, ax=None, *, time: bool = False):
        """The history: the objective per datum against iterations (or seconds, ``time=True``).
        Returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        key = "log_likelihood" if "log_likelihood" in self.history else "elbo"
        values = [v / self.n_data for v in self.history[key]]
        xs = self.history["time"] if time else list(range(len(values)))
        label = "exact log p(x)" if key == "log_likelihood" else "ELBO estimate"
        ax.plot(xs, values, label=f"{self.algorithm}: {label}")
        ax.set(
            xlabel="seconds" if time else "iteration",
            ylabel="nats per datum",
            title=f"{self.algorithm} fit, {'converged' if self.converged else 'not converged'}",
        )
        ax.legend()
        return ax

    def __repr__(self) -> str:
        name = "log_likelihood" if self.log_likelihood is not None else "elbo"
        return (
            f"FitResult({self.algorithm}, {name}={self.objective:.6g} "
            f"({self.per_datum():.6g}/datum, n_data={self.n_data}), n_iter={self.n_iter}, "
            f"converged={self.converged}, params={sorted(self.params)})"
        )


@dataclass
class _ModelInfo:
    """What fit needs to know of the model before it starts, from one trace at the initial
    params: its param names, the number of observed values, whether it enumerates."""

    params: list[str]
    n_data: int
    enumerates: bool
    trace: Any = None
    first: tuple = ((), {})  # the model's (args, kwargs): of the first batch for a stream
    model: Any = None  # the model as traced
    rows: int = 0  # a stream's rows (the leading dim of its batches), over all batches
    observed: int = 0  # observed values, unclamped (n_data is at least 1)


def _unwrap_once(fn: Any) -> Any:
    """The function one handler or wrapper inside ``fn`` (a ``poutine.*(model)`` handler, a
    ``functools.wraps`` wrapper), or None."""
    if isinstance(fn, _bound_partial):
        return fn.func
    if isinstance(fn, functools.partial) and fn.func is _context_wrap and len(fn.args) >= 2:
        return fn.args[1]
    return getattr(fn, "__wrapped__", None)


def _code_key(code: types.CodeType) -> tuple:
    """What a code object computes, without where it was written (line and column)."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (
        code.co_code,
        consts,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    )


def _same_values(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    return isinstance(a, (int, float, complex, str, bytes)) and a == b


def _same_function(a: Any, b: Any) -> bool:
    """Two function objects that compute the same: equal code (where written aside), the same
    globals, and the same (or equal plain-number) defaults and closure values. Two copies of
    ``lambda x: model(x, 2)`` are; ``model`` before and after its K changed are not."""
    if not (isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType)):
        return False
    try:
        cells_a = tuple(c.cell_contents for c in a.__closure__ or ())
        cells_b = tuple(c.cell_contents for c in b.__closure__ or ())
    except ValueError:  # an empty cell
        return False
    return (
        a.__globals__ is b.__globals__
        and _code_key(a.__code__) == _code_key(b.__code__)
        and _same_values(a.__defaults__, b.__defaults__)
        and _same_values(a.__kwdefaults__, b.__kwdefaults__)
        and _same_values(cells_a, cells_b)
    )


def _same_model(a: Any, b: Any) -> bool:
    """``a`` and ``b`` run the same model: the same object, the same method of the same object
    (a bound method is made anew at each attribute access: ``m.model is not m.model``), partials of the same model
    with the same arguments, or copies of the same function (:func:`_same_function`)."""
    if a is b:
        return True
    if isinstance(a, types.MethodType) and isinstance(b, types.MethodType):
        return a.__self__ is b.__self__ and _same_model(a.__func__, b.__func__)
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (
            _same_model(a.func, b.func)
            and _same_values(a.args, b.args)
            and _same_values(a.keywords, b.keywords)
        )
    return _same_function(a, b)


def _check_guide_model(model: Callable, guide: ExactEStep) -> None:
    """An ExactEStep computes its posterior, log-likelihood and M-step plan from the model it
    was built with, not from fit's ``model``: refuse a guide built for another model (a notebook
    whose model cell was re-run, with a new K, and the guide cell not). A guide built on a
    handler-wrapped form of ``model`` (``ExactEStep(config_enumerate(model))``), or on another
    copy of the same function (two ``lambda x: model(x, 2)``), is its own."""
    fn, seen = guide.user_model, set()
    while fn is not None and id(fn) not in seen:
        if _same_model(fn, model):
            return
        seen.add(id(fn))
        fn = _unwrap_once(fn)

    def name(f) -> str:
        inner = unwrap(f)
        label = getattr(inner, "__qualname__", None) or type(inner).__name__
        return f"'{label}'" + (" (wrapped in handlers)" if inner is not f else "")

    given, built = name(model), name(guide.user_model)
    same = " (another object of the same name: an earlier definition?)" if given == built else ""
    raise ModelInputError(
        f"fit's model {given} is not the model the ExactEStep guide was built with, "
        f"{built}{same}. ExactEStep computes the posterior and log p(x) of its own model, so "
        "fit would fit that one and ignore the model given: build the guide from the model "
        "you fit, fit(model, ExactEStep(model), ...)."
    )


def _inspect(model: Callable, args: tuple, kwargs: dict) -> _ModelInfo:
    """One prior trace of the model. ``n_data`` counts observed values
    (:func:`~pyro_emvae.validate.observed_count`): over observed sites, the cells of their
    plates (full sizes under subsampling) that their masks keep, times the chain length for a
    DiscreteHMM site, so a GMM on N points counts N and an HMM of N sequences of length T
    counts N*T in either model form; ``pyro.factor`` terms and latents fixed by
    ``poutine.condition`` are not data."""
    tracer = poutine.trace(model)
    with (
        poutine.block(),
        torch.no_grad(),
        explain_input_errors(args, kwargs),
        explain_model_errors(tracer, inputs=(args, kwargs)),
        MarkConditioned(),
    ):
        tr = tracer.get_trace(*args, **kwargs)
    enumerates = any(
        s["type"] == "sample" and s["infer"].get("enumerate") == "parallel"
        for s in tr.nodes.values()
    )
    total = observed_count(tr)
    params = [n for n, s in tr.nodes.items() if s["type"] == "param"]
    return _ModelInfo(params, max(total, 1), enumerates, tr, (args, kwargs), model, 0, total)


def _inspect_stream(
    model: Callable, batches: Batches, exact: bool, digest: StreamDigest | None = None
) -> _ModelInfo:
    """:func:`_inspect` and the input checks of every batch of a stream, before any work (so a
    NaN in batch 900 is an error naming the batch, not a failure 3 iterations in); ``n_data``
    and ``rows`` sum over the batches (data-parallel: over the ranks too). ``digest`` (given
    with a checkpoint) takes every batch of the same pass."""
    info = None
    n_data = rows = 0
    for i, (args, kwargs, n) in enumerate(batches.with_rows()):
        if digest is not None:
            digest.update(args, kwargs, n)
        try:
            one = _inspect(model, args, kwargs)
            validate_fit_inputs(model, args, kwargs, one.trace, exact=exact, components=False)
        except ValueError as e:
            e.args = (f"batch {i} of the stream: {e.args[0] if e.args else e}", *e.args[1:])
            raise
        n_data += one.observed
        rows += n
        if info is None:
            info = one
            continue
        if sorted(one.params) != sorted(info.params):
            raise ValueError(
                f"batch {i} of the stream makes params {sorted(one.params)}, batch 0 made "
                f"{sorted(info.params)}; every batch must run the same model"
            )
        one.trace = None
    if info is None:
        raise ValueError("the stream gave no batch: a DataLoader over an empty dataset?")
    observed = int(dp.all_reduce_float(n_data))
    info.n_data = max(observed, 1)
    info.rows = int(dp.all_reduce_float(rows))
    if exact:
        check_components(prune_subsample_sites(info.trace), observed)
    return info


def _model_params(fn: Callable, args: tuple, kwargs: dict) -> list[str]:
    with poutine.block(), torch.no_grad(), poutine.trace(param_only=True) as capture:
        fn(*args, **kwargs)
    return [n for n, s in capture.trace.nodes.items() if s["type"] == "param"]


def _forget(names: list[str]) -> None:
    """Delete params from the store, so that their ``pyro.param`` initial values are drawn again."""
    store = pyro.get_param_store()
    for name in names:
        if name in store:
            del store[name]


@dataclass
class _Loop:
    """The options of one run of the loop."""

    max_iter: int
    tol: float
    loss: Any
    n_data: int
    callback: Callable | None
    progress: bool | None
    run: int
    n_init: int
    info: _ModelInfo
    ckpt: Checkpoint | None = None
    resume: dict | None = None  # the checkpoint this run goes on from
    outer: Callable[[], dict] = dict  # the restarts' state, saved with each checkpoint
    recover: bool = False
    recoveries: list = field(default_factory=list)
    n_rows: int = 0  # a stream's rows over all its batches (online updates scale by it)


def _snapshot(names: list[str]) -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {n: store.get_param(n).unconstrained().detach().clone() for n in names if n in store}


def _restore(snap: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    with torch.no_grad():
        for n, v in snap.items():
            store.get_param(n).unconstrained().copy_(v)


def _constrained(names: list[str]) -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {n: store[n].detach().clone() for n in names if n in store}


def _free_parameters(value: torch.Tensor, constraint) -> int:
    """Free parameters of one param: see :meth:`FitResult.n_parameters`."""
    while isinstance(constraint, dist.constraints.independent):
        constraint = constraint.base_constraint
    shape = value.shape
    if isinstance(constraint, type(dist.constraints.simplex)):
        return shape[:-1].numel() * (shape[-1] - 1)
    if isinstance(
        constraint,
        (
            type(dist.constraints.lower_cholesky),
            type(dist.constraints.positive_definite),
            type(dist.constraints.positive_semidefinite),
        ),
    ):
        d = shape[-1]
        return shape[:-2].numel() * d * (d + 1) // 2
    if isinstance(constraint, type(dist.constraints.corr_cholesky)):
        d = shape[-1]
        return shape[:-2].numel() * d * (d - 1) // 2
    return value.numel()


def _check_optim(optim: Any, exact: bool) -> None:
    """A torch optimizer, or a pyro.optim constructor not called, is a TypeError that says what
    to pass (not a failure inside the first M-step)."""
    if isinstance(optim, torch.optim.Optimizer) or (
        isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer)
    ):
        cls = optim if isinstance(optim, type) else type(optim)
        name = cls.__name__
        wrapped = (
            f"pyro.optim.{name}({{'lr': 0.01}})"
            if getattr(pyro.optim, name, None) is not None
            else f"pyro.optim.PyroOptim(torch.optim.{name}, {{'lr': 0.01}})"
        )
        what = "a torch.optim optimizer " + ("class" if isinstance(optim, type) else "instance")
        raise TypeError(
            f"optim={name} is {what}; fit needs a pyro.optim optimizer, which makes one torch "
            f"optimizer per param as the model creates its params: pass optim={wrapped} (its "
            "options as a dict)"
            + (", or leave optim unset for EM's closed-form M-steps" if exact else "")
        )
    if isinstance(optim, type) and issubclass(optim, PyroOptim):
        raise TypeError(
            f"optim={optim.__name__} is a class; pass an instance: "
            f"{optim.__name__}(torch.optim.Adam, {{'lr': 0.01}})"
        )
    if isinstance(optim, types.FunctionType) and optim.__module__.startswith("pyro.optim"):
        names = [n for n in dir(pyro.optim) if getattr(pyro.optim, n) is optim]
        name = f"pyro.optim.{names[0]}" if names else "the pyro.optim constructor"
        raise TypeError(
            f"optim={name} is the optimizer's constructor, not an optimizer: call it with its "
            f"options, optim={name}({{'lr': 0.01}})"
        )


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    optim: Any = None,
    max_iter: int = 100,
    tol: float = 1e-5,
    n_init: int = 1,
    init: str | Callable[[int], None] = "model",
    seed: int | None = None,
    svi_steps: int = 1,
    loss: Any = None,
    n_data: int | None = None,
    kl_weight: float | Callable[[int], float] | None = None,
    free_bits: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    recover: bool = False,
    distributed: bool | Any = False,
    callback: Callable[[int, dict[str, Any]], bool | None] | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> FitResult:
    """Fit ``model``'s params (and the guide's, if any) by climbing the ELBO.

    ``args`` and ``kwargs`` go to the model and the guide, as in ``SVI.step``; fitting options
    are keyword-only. Numpy arrays and pandas DataFrames among them are converted to tensors
    first (floats in torch's default dtype: :func:`~pyro_emvae.validate.model_inputs`); lists
    are passed as they are.

    Args:
        model, guide: a Pyro model and guide. With :class:`~pyro_emvae.estep.ExactEStep` the
            E-step is exact and :math:`\\log p_\\theta(x)` is tracked exactly.
        optim: the M-step. Default for ExactEStep: :class:`~pyro_emvae.optim.EMOptim` (closed-form
            updates where the model allows, SVI steps for the rest). A ``pyro.optim`` optimizer
            gives gradient M-steps only (EG, with ``svi_steps`` steps per E-step; for other
            guides, SVI; default ``Adam({"lr": 0.01})``). Any callable
            ``mstep(guide, posterior, args, kwargs) -> dict`` is used as the M-step as it is
            (give it ``needs_param_grads = True`` to receive ``posterior.param_grads``).
        max_iter: iterations (E-step + M-step, or SVI steps) per run.
        tol: stop when the objective per datum changes by less than ``tol`` between
            iterations (for SVI, between the means of successive windows of 20 iterations);
            ``tol=0`` runs ``max_iter`` iterations.
        n_init: independent runs; the one with the highest final objective is kept. Run 0
            starts from the params as they are; each later run re-initializes the params (the
            model's, and an SVI guide's), by ``init(run)`` if given, else by deleting them from
            the param store so their ``pyro.param`` initial values are drawn again (under seed
            ``seed + run``). A model whose initial values are deterministic needs ``init``.
        init: how each run starts: ``"model"`` (the model's own initial values; later runs
            draw them again), ``"random"`` (random responsibilities, then one M-step, as
            scikit-learn's ``'random'``), ``"kmeans++"`` (k-means++ seeding of the observed
            points, nearest-center responsibilities, then one M-step), or a callable
            ``init(run)`` that sets the params (see :mod:`pyro_emvae.init`).
        seed: optional RNG seed for each run (``seed + run``).
        loss: the ELBO for SVI (default ``TraceEnum_ELBO`` if the model enumerates, else
            ``Trace_ELBO``).
        kl_weight: for SVI, a weight on the KL term (a number, or a schedule
            ``kl_weight(step) -> float`` such as :func:`~pyro_emvae.elbo.linear_warmup`: KL
            annealing); see :class:`~pyro_emvae.elbo.KLControlledELBO`.
        free_bits: for SVI, the free bits per latent element (nats): KL below it is not
            penalized. History then records the plain ELBO (and ``"kl_weight"``).
        n_data: the count for per-datum values, ``tol`` and BIC; default: the number of
            observed values (the plate cells of each observed site that its masks keep, times
            the chain length of a DiscreteHMM site), so an HMM counts its unmasked time steps
            in either model form; ``pyro.factor`` terms and latents fixed by
            ``poutine.condition`` are not data (see
            :func:`~pyro_emvae.validate.observed_count`).
        checkpoint: a file to save the fit's state to, atomically (written to ``path.tmp``,
            then renamed), every ``checkpoint_every`` iterations, at the end of each run and on
            Ctrl-C: params, optimizer state, iteration, history, RNG state, and the restarts
            so far. If the file exists, the fit resumes from it and ends exactly as the
            uninterrupted fit would (the same params, history and draws). The file holds
            tensors and plain data only, read with ``torch.load(weights_only=True)``: loading
            it runs no code. A checkpoint of a different fit is refused: another M-step or
            optimizer, other data (a SHA-256 digest of the arguments; for a stream, a digest of
            its rows whatever their order, taken in the validation pass), another size, params
            or ``n_init``. A path that cannot be written is an error before the first
            iteration (a missing directory is made).
        checkpoint_every: iterations between checkpoints.
        recover: for EM: when an iteration fails (a singular covariance, a collapsed
            variance, a non-finite log-likelihood), restore the last good params, raise the
            M-step's ``reg_covar`` tenfold (at least to 1e-6) and redo the iteration, up to 5
            times, with a warning each time (listed in ``result.info["recoveries"]``).
            Without it such a failure restores the params and raises.
        distributed: ``True`` (or a process group) for a data-parallel fit over
            :mod:`torch.distributed`: each rank passes its own shard of the data (in memory or
            as a stream); statistics, gradients and log-likelihoods are all-reduced, so every
            rank holds the same params, equal to one process's fit on all the shards (see
            :mod:`pyro_emvae.distributed`). Params start from rank 0's values; only rank 0
            writes ``checkpoint``.
        callback: ``callback(iteration, info)`` after each iteration (for a stream under
            per-batch updates, after each minibatch); returning True stops the run (counted
            as converged).
        progress: a tqdm progress bar; ``None`` shows it only on an interactive terminal.

    Streams. If the first of ``args`` is a :class:`torch.utils.data.DataLoader` or a
    :class:`~pyro_emvae.stream.Batches`, the model's data comes in minibatches (each batch is
    the model's leading arguments, the rest of ``args`` and ``kwargs`` follow), and an
    iteration is a pass over the data:

    * with :class:`~pyro_emvae.optim.EMOptim` (the default), **exact streaming EM**: the
      statistics are summed over the batches before each M-step, so the fit equals full-batch
      EM (history, params, convergence) with one batch in memory. Gaussian scales and
      covariances take a second pass per iteration (their statistics are about the new
      means);
    * with :class:`~pyro_emvae.optim.OnlineEM`, any other M-step, or an SVI guide, an update
      after every minibatch, with the model scaled by N / B (as a subsampled plate):
      **online EM**, minibatch EG, minibatch SVI. ``history[key]`` then holds one value per
      epoch, the sum of that epoch's minibatch objectives (each at the params of its step),
      ``history["batch"]`` the per-datum estimate of each minibatch, and an exact ``fit``
      adds a final pass for ``log_likelihood`` at the returned params. ``checkpoint_every``
      counts minibatches, and a resumed fit picks up in the middle of its epoch.

    Returns:
        A :class:`FitResult`. The param store holds the best run's params.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, fit
        >>> def model(x):
        ...     w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        ...     locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
        >>> x = torch.cat([torch.randn(50) - 3, torch.randn(50) + 3])
        >>> result = fit(model, ExactEStep(model), x, max_iter=50, tol=0)
        >>> result.n_iter
        50
    """
    if distributed and not dp.active():
        with dp.data_parallel(None if distributed is True else distributed):
            result = fit(
                model,
                guide,
                *args,
                optim=optim,
                max_iter=max_iter,
                tol=tol,
                n_init=n_init,
                init=init,
                seed=seed,
                svi_steps=svi_steps,
                loss=loss,
                n_data=n_data,
                kl_weight=kl_weight,
                free_bits=free_bits,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                recover=recover,
                distributed=distributed,
                callback=callback,
                progress=progress,
                **kwargs,
            )
            dp.barrier()  # every rank returns together (gloo aborts one torn down too early)
            return result
    # numpy arrays and DataFrames as tensors (dtype kept); a list the model fails on is
    # explained by _inspect
    args, kwargs = model_inputs(args, kwargs)
    stream = None
    if args and is_stream(args[0]):
        stream = Batches(args[0], *args[1:], **kwargs)
        args, kwargs = (), {}
    elif any(is_stream(a) for a in (*args, *kwargs.values())):
        raise TypeError(
            "a DataLoader or Batches must be fit's first argument after the guide (the model's "
            "data); other arguments follow it as they follow the data in the model"
        )
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if not callable(init) and init not in STRATEGIES:
        raise ValueError(f"init must be one of {STRATEGIES} or a callable, got {init!r}")
    if svi_steps < 1:
        raise ValueError(f"svi_steps must be >= 1, got {svi_steps}")
    if isinstance(guide, ExactEStep):
        _check_guide_model(model, guide)
    # an unwritable path is an error now, not after checkpoint_every iterations of work
    ckpt = None
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, checkpoint_every, write=dp.rank() == 0)
    exact = isinstance(guide, ExactEStep)
    _check_optim(optim, exact)
    if optim is None:
        optim = EMOptim() if exact else pyro.optim.Adam({"lr": 0.01})
    mstep = None
    if exact:
        mstep = GradientMStep(optim, svi_steps) if isinstance(optim, PyroOptim) else optim
        if not callable(mstep):
            raise TypeError(f"optim must be a pyro.optim optimizer or an M-step, got {optim!r}")
    elif not isinstance(optim, PyroOptim):
        raise TypeError(
            f"with a {type(guide).__name__} guide, optim must be a pyro.optim optimizer "
            f"(it runs SVI), got {type(optim).__name__}"
        )
    if kl_weight is not None or free_bits:
        if exact:
            raise ValueError(
                "kl_weight and free_bits act on the KL of continuous latents; an ExactEStep "
                "guide has none (its ELBO is log p(x))"
            )
        if loss is not None:
            raise ValueError("give either loss or kl_weight/free_bits, not both")
        loss = KLControlledELBO(1.0 if kl_weight is None else kl_weight, free_bits)
    # (an ExactEStep's own view of the model: obs_mask's missing events integrated out)
    seen = guide.model if exact else model
    # the data's digest, for a checkpoint only: in memory, of the arguments; of a stream, its
    # rows over the validation pass that follows (no pass of its own)
    digest = StreamDigest() if ckpt is not None and stream is not None else None
    if stream is None:
        info = _inspect(seen, args, kwargs)
        # bad data, params or shapes: a clear error before any work (pyro_emvae.validate)
        validate_fit_inputs(seen, args, kwargs, info.trace, exact=exact, components=False)
        observed = int(dp.all_reduce_float(info.observed))  # (over the shards)
        info.n_data = max(observed, 1)
        if exact:
            check_components(prune_subsample_sites(info.trace), observed)
    else:
        info = _inspect_stream(seen, stream, exact, digest)
    if n_data is None:
        n_data = info.n_data
    # how the data is read: exact passes over a stream (EMOptim), or an update per minibatch
    per_batch = stream is not None and not (
        exact and isinstance(mstep, EMOptim) and not isinstance(mstep, OnlineEM)
    )
    if stream is not None and recover and per_batch:
        raise ValueError(
            "recover=True redoes a failed EM iteration; with updates per minibatch there is "
            "no iteration to redo: use reg_covar"
        )

    state = None
    if ckpt is not None:
        if digest is not None:
            data = digest.hexdigest()
        else:  # (data-parallel: every rank's shard, in rank order)
            data = data_digest((), {"shards": dp.all_gather_object(data_digest(args, kwargs))})
        fingerprint = {
            "algorithm": _algorithm_key(exact, mstep, optim),
            "n_data": n_data,
            "n_init": n_init,
            "params": sorted(info.params),
            "data": "minibatches" if per_batch else "stream" if stream is not None else "memory",
            "data_digest": data,
        }
        state = ckpt.load(fingerprint)
        check_storable()  # a constraint a checkpoint cannot hold: an error now
    reg_covar = getattr(mstep, "reg_covar", None) if recover else None
    best: FitResult | None = FitResult(**state["best"]) if state and state["best"] else None
    best_snapshot: dict[str, torch.Tensor] = state["best_snapshot"] if state else {}
    finals: list[float] = list(state["finals"]) if state else []

    def outer() -> dict:
        # (the best result as its fields: a checkpoint holds plain data, see checkpoint.py)
        fields = (
            None
            if best is None
            else {f.name: getattr(best, f.name) for f in dataclasses.fields(best)}
        )
        return {"finals": list(finals), "best": fields, "best_snapshot": best_snapshot}

    scope = contextlib.ExitStack()
    if dp.active():
        # each rank's global sites (priors, a guide's global latents) count 1/world of theirs
        plate = dp.data_plate_of(info.trace)
        for name, site in info.trace.nodes.items():
            if (
                exact
                and site["type"] == "sample"
                and site["infer"].get("enumerate") == "parallel"
                and plate not in {f.name for f in site["cond_indep_stack"]}
            ):
                raise EnumerationError(
                    f"site '{name}' is enumerated outside the data plate '{plate}': its "
                    "posterior couples every shard, so a data-parallel E-step cannot split it"
                )
        scope.enter_context(dp.count_globals_once(plate))
    with scope:
        for run in range(state["run"] if state else 0, n_init):
            resume = state if state is not None and run == state["run"] else None
            if reg_covar is not None:
                mstep.reg_covar = reg_covar  # recover=True may have raised it in the last run
            if resume is None or resume["n_done"] is None:
                try:
                    _start_run(run, seed, exact, mstep, optim, init, info, guide, stream, per_batch)
                except KeyboardInterrupt:
                    if best is None:
                        raise  # nothing finished to return
                    best.interrupted = True
                    break
            loop = _Loop(
                max_iter,
                tol,
                loss,
                n_data,
                callback,
                progress,
                run,
                n_init,
                info,
                ckpt,
                resume,
                outer,
                recover,
            )
            if per_batch:
                loop.n_rows = info.rows
                result = _run_minibatch(model, guide, mstep if exact else optim, stream, loop)
            elif exact:
                engine = (
                    _Streamed(guide, mstep, stream)
                    if stream is not None
                    else _InMemory(guide, mstep, args, kwargs)
                )
                result = _run_exact(model, guide, engine, loop)
            else:
                result = _run_svi(model, guide, optim, args, kwargs, loop)
            finals.append(result.objective)
            if best is None or result.objective > best.objective:
                best = result
                best_snapshot = _snapshot(list(pyro.get_param_store().keys()))
            if result.interrupted:
                best.interrupted = True  # the fit as a whole was cut short, whichever run is best
                break
            if ckpt is not None and run + 1 < n_init:  # the next run starts from its own init
                ckpt.save({"run": run + 1, "n_done": None, **outer()})
    assert best is not None
    if n_init > 1:
        _restore(best_snapshot)
        best.restarts = finals
    if reg_covar is not None:
        mstep.reg_covar = reg_covar  # the user's EMOptim as it was given
    return best


def _algorithm_key(exact: bool, mstep: Any, optim: Any) -> str:
    """What a checkpoint's optimizer state belongs to: the M-step's class and its gradient
    optimizer's (``"EMOptim(Adam)"``, ``"GradientMStep(Adam)"``, ``"SVI(Adam)"``)."""

    def name(o: Any) -> str:
        if not isinstance(o, PyroOptim):
            return type(o).__name__
        scheduler = getattr(o, "pt_scheduler_constructor", None)
        inner = o.pt_optim_constructor.__name__
        return f"{scheduler.__name__}({inner})" if scheduler is not None else inner

    if not exact:
        return f"SVI({name(optim)})"
    inner = getattr(mstep, "optim", None) or getattr(mstep, "svi_optim", None)
    return f"{type(mstep).__name__}({name(inner)})" if inner is not None else type(mstep).__name__


def _start_run(run, seed, exact, mstep, optim, init, info, guide, stream, per_batch) -> None:
    """Seed and initialize one run of the restarts (data-parallel: then every rank takes rank
    0's params)."""
    _init_run(run, seed, exact, mstep, optim, init, info, guide, stream, per_batch)
    if dp.active():
        args, kwargs = info.first
        with preserved_rng():  # (draws as a one-process fit draws)
            _model_params(info.model, args, kwargs)  # (re)create what the init left out
            if not exact:
                _model_params(guide, args, kwargs)
        dp.broadcast_params()


def _init_run(run, seed, exact, mstep, optim, init, info, guide, stream, per_batch) -> None:
    args, kwargs = info.first
    if seed is not None:
        pyro.set_rng_seed(seed + run)
    if hasattr(mstep if exact else optim, "reset"):
        (mstep if exact else optim).reset()  # a new run: no memory of the last one's steps
    if callable(init):
        init(run)
    elif init in ("random", "kmeans++"):
        if not exact:
            raise ValueError(f"init={init!r} needs an ExactEStep guide")
        if run > 0:  # start from the model's own values again before the init M-step
            _forget(info.params)
        if stream is not None and not per_batch:  # a pass over the stream, then the M-step
            _init_stream_by_potentials(guide, mstep, init, stream, args, kwargs)
        else:  # (a stream updated per minibatch starts from its first batch)
            _init_by_potentials(guide, mstep, init, args, kwargs)
        if hasattr(mstep, "reset"):
            mstep.reset()  # the init M-step's objective was not log p(x)
    elif run > 0:
        _forget(info.params + ([] if exact else _model_params(guide, args, kwargs)))


def _save(loop: _Loop, n_done: int, history: dict, optimizer: Any, rng: Any, position=None) -> None:
    """Write the loop's state after ``n_done`` completed iterations of this run (and, for
    updates per minibatch, ``position`` in the epoch under way)."""
    if loop.ckpt is None:
        return
    values, constraints = param_state()
    getter = getattr(optimizer, "state_dict", None) or getattr(optimizer, "get_state", None)
    loop.ckpt.save(
        {
            "run": loop.run,
            "n_done": n_done,
            "history": {k: list(v) for k, v in history.items()},
            "params": values,
            "constraints": constraints,
            "optimizer": getter() if getter is not None else None,
            "rng": rng,
            "recoveries": list(loop.recoveries),
            "position": position,
            **loop.outer(),
        }
    )


def _resume(loop: _Loop, model, guide, optimizer, args, kwargs) -> tuple[int, dict]:
    """Put the params, optimizer and RNG back as the checkpoint left them; returns the
    iterations done and the history. A checkpoint written between runs only says which run
    comes next: that run starts from its own initialization."""
    state = loop.resume
    if state is None or state["n_done"] is None:
        return 0, {}
    register(model, guide, args, kwargs)
    restore_params(state["params"], state["constraints"])
    if state["optimizer"] is not None:
        if hasattr(optimizer, "load_state_dict"):
            optimizer.load_state_dict(state["optimizer"])
        else:  # a pyro.optim optimizer
            load_optim_state(optimizer, state["optimizer"])
    set_rng(state["rng"])
    return state["n_done"], {k: list(v) for k, v in state["history"].items()}


def _init_stream_by_potentials(
    guide, mstep: EMOptim, strategy: str, stream: Batches, args, kwargs
) -> None:
    """:func:`_init_by_potentials` over a stream (``args``, ``kwargs``: its first batch's): the
    potentials' E-step is a pass (k-means++ seeds its centers on the first batch and assigns
    every batch to them), then one M-step."""
    depth = guide._plate_nesting(args, kwargs)
    potentials = init_potentials(strategy, depth, centers={})
    spass = mstep.stream_estep(guide, stream, potentials=potentials)
    mstep.stream_mstep(guide, stream, spass)


def _init_by_potentials(guide, mstep, strategy, args, kwargs) -> None:
    """One E-step under init potentials (see :mod:`pyro_emvae.init`), then one M-step."""
    depth = guide._plate_nesting(args, kwargs)
    potentials = init_potentials(strategy, depth)
    post = guide.posterior(
        *args,
        potentials=potentials,
        param_grads=getattr(mstep, "needs_param_grads", False),
        **kwargs,
    )
    mstep(guide, post, args, kwargs)


def _bar(progress: bool | None, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, disable=(None if progress is None else not progress), leave=False
    )


def _check_finite(value: float, what: str, iteration: int, snap: dict, names: list[str]) -> None:
    if not math.isfinite(value):
        _restore(snap)
        restored = (
            f"the params of the last finite iteration were restored ({', '.join(names)})"
            if snap
            else "no earlier params were finite"
        )
        raise FloatingPointError(
            f"the {what} became {value} at iteration {iteration}; {restored}. Check the data "
            "for extreme values, lower the learning rate, or regularize the params."
        )


class _InMemory:
    """EM on data held in memory: an E-step is one posterior, the M-step takes it."""

    def __init__(self, guide: ExactEStep, mstep, args: tuple, kwargs: dict) -> None:
        self.guide, self.optim, self.args, self.kwargs = guide, mstep, args, kwargs

    def estep(self, wants_grads, n_done, snap, names) -> tuple[float, Posterior]:
        post = _estep(self.guide, self.args, self.kwargs, wants_grads, n_done, snap, names)
        return float(post.log_likelihood), post

    def mstep(self, post: Posterior) -> dict[str, Any]:
        return self.optim(self.guide, post, self.args, self.kwargs)

    def final(self, n_done, snap, names) -> float:
        return self.estep(False, n_done, snap, names)[0]

    def stationary(self, post: Posterior, tol: float, n_data: int) -> bool:
        """Whether the params that take gradient steps are at a stationary point: a small
        change of log p(x) is no proof of it (an optimizer's step across the optimum, or one
        that the guard undid, changes log p(x) little while the gradient stays large).
        :math:`\\max |\\nabla \\log p(x)| / n \\le \\sqrt{tol}` in the unconstrained values
        (a step of a gradient method moves log p(x) by about the gradient's square). Plain EM
        has no such params and costs nothing here; ECM pays one backward pass, on the
        iterations where the change is below ``tol``."""
        if isinstance(self.optim, EMOptim):
            plan = self.optim._plan  # (None after a resume, before the first M-step)
            if plan is None:
                plan = self.optim.plan(self.guide, self.args, self.kwargs, post.subsample)
            names = set(plan.gradient)
        elif isinstance(self.optim, GradientMStep):
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


class _Streamed:
    """Exact EM on a stream: an E-step is a pass over the batches summing log p(x) and the
    statistics (:meth:`EMOptim.stream_estep`), the M-step applies them."""

    def __init__(self, guide: ExactEStep, mstep: EMOptim, batches: Batches) -> None:
        self.guide, self.optim, self.batches = guide, mstep, batches

    def estep(self, wants_grads, n_done, snap, names):
        spass = _guarded_estep(
            lambda: self.optim.stream_estep(self.guide, self.batches), n_done, snap, names
        )
        return spass.log_likelihood, spass

    def mstep(self, spass) -> dict[str, Any]:
        return self.optim.stream_mstep(self.guide, self.batches, spass)

    def final(self, n_done, snap, names) -> float:
        return _guarded_estep(
            lambda: stream_log_likelihood(self.guide, self.batches), n_done, snap, names
        )

    def stationary(self, post, tol: float, n_data: int) -> bool:
        # (exact streaming EM: its gradient params, if any, take steps per batch; the change
        # of log p(x) over a pass is the test)
        return True


def stream_log_likelihood(guide: ExactEStep, batches: Batches) -> float:
    """Exact :math:`\\log p(x)` of a stream at the current params: one pass, summed over the
    batches (and, data-parallel, over the ranks)."""
    total = 0.0
    for args, kwargs in batches:
        total += float(guide.log_likelihood(*args, **kwargs))
    return dp.all_reduce_float(total)


def _run_exact(model, guide: ExactEStep, engine, loop: _Loop) -> FitResult:
    max_iter, tol, n_data, callback = loop.max_iter, loop.tol, loop.n_data, loop.callback
    mstep = engine.optim
    history: dict[str, list[float]] = {"log_likelihood": [], "time": []}
    names = loop.info.params
    wants_grads = getattr(mstep, "needs_param_grads", False)
    converged = interrupted = in_mstep = False
    info: dict[str, Any] = {}
    n_done, saved = _resume(loop, model, guide, mstep, *loop.info.first)
    history = saved or history
    start = time.perf_counter() - (history["time"][-1] if history["time"] else 0.0)
    snap = _snapshot(names)  # params of the last iteration whose log-likelihood was finite
    post: Posterior | None = None
    rng = rng_state() if loop.ckpt is not None else None
    recoveries: list[dict[str, Any]] = (
        list(loop.resume.get("recoveries", [])) if loop.resume else []
    )
    loop.recoveries = recoveries
    bar = _bar(loop.progress, max_iter, "EM" if loop.n_init == 1 else f"EM run {loop.run}")
    bar.update(n_done)
    try:
        while n_done < max_iter:
            try:
                ll, post = engine.estep(wants_grads, n_done, snap, names)
                _check_finite(ll, "log-likelihood", n_done, snap, names)
            except FloatingPointError as e:
                # the last M-step led to invalid params; they were restored: undo that iteration
                if n_done == 0 or not _recover(loop, mstep, e, n_done, recoveries):
                    raise
                n_done -= 1
                _trim(history, n_done)
                continue
            history["log_likelihood"].append(ll)
            history["time"].append(time.perf_counter() - start)
            h = history["log_likelihood"]
            # (after an M-step whose gradient steps the guard undid, log p(x) stands still
            # because those params did not move: that is no sign of a stationary point)
            if (
                tol > 0
                and len(h) > 1
                and _last_change(h, n_data) < tol
                and not info.get("rejected")
                and engine.stationary(post, tol, n_data)
            ):
                converged = True  # this E-step is the final one
                if loop.ckpt is not None:  # resuming redoes this E-step and stops there
                    _save(loop, n_done, {k: v[:-1] for k, v in history.items()}, mstep, rng)
                break
            snap = _snapshot(names)
            in_mstep = True
            try:
                info = dict(engine.mstep(post) or {})
            except (FloatingPointError, torch.linalg.LinAlgError) as e:
                if not _recover(loop, mstep, e, n_done + 1, recoveries):
                    raise
                _restore(snap)  # (EMOptim has already put its params back)
                in_mstep = False
                _trim(history, n_done)
                continue
            if "log_likelihood" in info:  # the M-step undid the last update (EMOptim's guard)
                ll = history["log_likelihood"][-1] = info["log_likelihood"]
            in_mstep = False
            n_done += 1
            if loop.ckpt is not None:
                rng = rng_state()
                if loop.ckpt.due(n_done) or n_done == max_iter:
                    _save(loop, n_done, history, mstep, rng)
            bar.update()
            bar.set_postfix(ll_per_datum=f"{ll / n_data:.6g}")
            if callback is not None and callback(
                n_done,
                {
                    "log_likelihood": ll,
                    "posterior": post if isinstance(engine, _InMemory) else None,
                    **info,
                },
            ):
                converged = True
                post = None
                break
    except KeyboardInterrupt:
        interrupted = True
        if in_mstep:  # a partial M-step is undone: params are those of the last iteration
            _restore(snap)
        # a checkpoint of the completed iterations; not from inside an M-step, whose
        # optimizer state (Adam's moments, the guard) has moved: the last periodic one stands
        if loop.ckpt is not None and not in_mstep:
            _save(loop, n_done, {k: v[:n_done] for k, v in history.items()}, mstep, rng)
    finally:
        bar.close()
    if post is None or not converged or interrupted:
        # the final E-step: the reported log-likelihood belongs to the returned params
        final = engine.final(n_done, snap, names)
        _check_finite(final, "log-likelihood", n_done, snap, names)
        history["log_likelihood"].append(final)
        history["time"].append(time.perf_counter() - start)
    else:
        final = history["log_likelihood"][-1]
    if not converged and not interrupted and tol > 0:
        warnings.warn(
            f"fit did not converge in {max_iter} iterations (last change "
            f"{_last_change(history['log_likelihood'], n_data):.3g} nats/datum >= tol={tol}); "
            "raise max_iter or tol.",
            ConvergenceWarning,
            stacklevel=3,
        )
    if recoveries:
        info = {**info, "recoveries": recoveries}
    return FitResult(
        constraints=constraints_of(names),
        params=_constrained(names),
        log_likelihood=final,
        elbo=final,
        history=history,
        converged=converged,
        n_iter=n_done,
        n_data=n_data,
        algorithm="EG" if isinstance(mstep, GradientMStep) else getattr(mstep, "algorithm", "EM"),
        interrupted=interrupted,
        info=info,
        closed_form=list(info.get("closed_form", [])),
        gradient=list(info.get("gradient", names if isinstance(mstep, GradientMStep) else [])),
    )


def _run_minibatch(model, guide, optimizer, stream: Batches, loop: _Loop) -> FitResult:
    """An update after every minibatch of ``stream``, the model scaled by N / B: online EM or
    minibatch EG (an ExactEStep guide and its M-step), or SVI. An iteration is an epoch."""
    max_iter, tol, n_data, callback = loop.max_iter, loop.tol, loop.n_data, loop.callback
    exact = isinstance(guide, ExactEStep)
    key = "log_likelihood" if exact else "elbo"
    history: dict[str, list[float]] = {key: [], "time": [], "batch": []}
    names = loop.info.params
    if exact:
        wants_grads = getattr(optimizer, "needs_param_grads", False)
        # the guide on the model scaled by N / B: the E-step, the M-step's probe of the
        # model and its gradient steps all see the scale (an ambient poutine.scale would not
        # reach the probe, which blocks the handlers around it)
        scaler = _Scale()
        scaled = copy.copy(guide)
        scaled.model = scaler(guide.model)
    else:
        loss = loop.loss or (TraceEnum_ELBO() if loop.info.enumerates else Trace_ELBO())
        svi = SVI(model, guide, optimizer, loss)
        controlled = isinstance(loss, KLControlledELBO)
        if controlled:
            history["kl_weight"] = []
    n_done, saved = _resume(loop, model, guide, optimizer, *loop.info.first)
    history = saved or history
    position = loop.resume.get("position") if saved else None
    steps = len(history["batch"])
    start = time.perf_counter() - (history["time"][-1] if history["time"] else 0.0)
    converged = interrupted = False
    info: dict[str, Any] = {}
    snap = _snapshot(names) if exact else {}
    rng = rng_state() if loop.ckpt is not None else None
    done_in_epoch, epoch_sum, epoch_batches = 0, 0.0, 0
    rng_epoch = None
    label = "online EM" if isinstance(optimizer, OnlineEM) else "EM" if exact else "SVI"
    bar = _bar(loop.progress, max_iter, label if loop.n_init == 1 else f"{label} run {loop.run}")
    bar.update(n_done)

    def update(args, kwargs, scale) -> tuple[float, dict, bool]:
        """One minibatch step; returns its (scaled) objective, the step's info and whether a
        Ctrl-C came during an optimizer update."""
        if not exact:
            if controlled:
                loss.step = steps
            with poutine.scale(scale=scale):
                value, stop = _svi_step(svi, args, kwargs, steps + 1)
            return (loss.last_elbo if controlled else -value), {}, stop

        def estep() -> Posterior:
            post = scaled.posterior(*args, param_grads=wants_grads, **kwargs)
            dp.all_reduce_([post.log_likelihood])
            return post

        scaler.factor = scale
        post = _guarded_estep(estep, steps, snap, names)
        ll = float(post.log_likelihood)
        _check_finite(ll, "minibatch log-likelihood", steps, snap, names)
        step_info = dict(optimizer(scaled, post, args, kwargs) or {})
        return ll, step_info, False

    try:
        while n_done < max_iter:
            if position is not None:  # resume inside the epoch: the same shuffle, then skip
                rng_epoch = position["rng_epoch"]
                set_rng(rng_epoch)
                skip, epoch_sum = position["batch"], position["epoch_sum"]
            else:
                rng_epoch = rng_state()
                skip, epoch_sum = 0, 0.0
            done_in_epoch = 0
            stopped = False
            for args, kwargs, n_rows in dp.lockstep(stream.with_rows()):
                if done_in_epoch < skip:
                    done_in_epoch += 1
                    if done_in_epoch == skip:
                        set_rng(position["rng"])
                    continue
                position = None
                scale = loop.n_rows / dp.all_reduce_float(n_rows)
                with _deferred_interrupt() as caught:  # a step is never cut in half
                    value, info, stop = update(args, kwargs, scale)
                if not exact and controlled:
                    history["kl_weight"].append(loss.beta)
                steps += 1
                done_in_epoch += 1
                epoch_sum += value / scale
                history["batch"].append(value / n_data)
                if exact:
                    snap = _snapshot(names)
                if loop.ckpt is not None:
                    rng = rng_state()
                    if loop.ckpt.due(steps):
                        _save(
                            loop,
                            n_done,
                            history,
                            optimizer,
                            rng,
                            _position(done_in_epoch, rng_epoch, epoch_sum, rng),
                        )
                bar.set_postfix({f"{key}_per_datum": f"{value / n_data:.6g}"})
                if callback is not None and callback(
                    steps, {key: value, "epoch": n_done, "batch": done_in_epoch - 1, **info}
                ):
                    converged = stopped = True
                    break
                if stop or caught:
                    raise KeyboardInterrupt
            if stopped:
                break
            if done_in_epoch == 0:
                raise ValueError("the stream gave no batch in this epoch")
            epoch_batches = done_in_epoch
            history[key].append(epoch_sum)
            history["time"].append(time.perf_counter() - start)
            n_done += 1
            done_in_epoch = 0
            bar.update()
            if loop.ckpt is not None:
                rng = rng_state()
                _save(loop, n_done, history, optimizer, rng)
            h = history[key]
            if tol > 0 and len(h) > 1 and _last_change(h, n_data) < tol:
                converged = True
                break
    except KeyboardInterrupt:
        interrupted = True
        if loop.ckpt is not None:
            pos = _position(done_in_epoch, rng_epoch, epoch_sum, rng) if done_in_epoch else None
            _save(loop, n_done, history, optimizer, rng, pos)
    finally:
        bar.close()
    if not converged and not interrupted and tol > 0:
        warnings.warn(
            f"fit did not converge in {max_iter} epochs (tol={tol} on the change of the "
            "epoch's summed minibatch objective per datum); raise max_iter or tol.",
            ConvergenceWarning,
            stacklevel=3,
        )
    if exact:
        # the exact log-likelihood of the returned params: one more pass
        final = _guarded_estep(lambda: stream_log_likelihood(guide, stream), steps, snap, names)
        _check_finite(final, "log-likelihood", steps, snap, names)
        history[key].append(final)
        history["time"].append(time.perf_counter() - start)
        params = names
    else:
        recent = history["batch"][-(epoch_batches or len(history["batch"])) :]
        final = sum(recent) / len(recent) * n_data if recent else float("nan")
        params = list(pyro.get_param_store().keys())
    algorithm = (
        "SVI"
        if not exact
        else (
            "EG" if isinstance(optimizer, GradientMStep) else getattr(optimizer, "algorithm", "EM")
        )
    )
    return FitResult(
        constraints=constraints_of(params),
        params=_constrained(params),
        log_likelihood=final if exact else None,
        elbo=final,
        history=history,
        converged=converged,
        n_iter=n_done,
        n_data=n_data,
        algorithm=algorithm,
        interrupted=interrupted,
        info=info if exact else {"guide_params": params},
        closed_form=list(info.get("closed_form", [])),
        gradient=list(info.get("gradient", names if isinstance(optimizer, GradientMStep) else [])),
    )


class _Scale(Messenger):
    """Multiplies every sample site's scale by ``factor`` (set before each minibatch)."""

    factor = 1.0

    def _pyro_sample(self, msg) -> None:
        msg["scale"] = msg["scale"] * self.factor


def _position(batch: int, rng_epoch, epoch_sum: float, rng) -> dict[str, Any]:
    """Where a minibatch fit is inside its epoch: batches done, the RNG at the epoch's start
    (the loader's shuffle) and now, and the epoch's running sum."""
    return {"batch": batch, "rng_epoch": rng_epoch, "epoch_sum": epoch_sum, "rng": rng}


_MAX_RECOVERIES = 5


def _recover(loop: _Loop, mstep, error: Exception, iteration: int, done: list) -> bool:
    """With ``recover=True``: raise the M-step's ``reg_covar`` tenfold (at least to 1e-6) so
    that iteration ``iteration`` can be redone from the restored params; False when recovery
    is off, the M-step has no ``reg_covar``, or it was tried too often."""
    if not loop.recover or not hasattr(mstep, "reg_covar") or len(done) >= _MAX_RECOVERIES:
        if loop.recover and len(done) >= _MAX_RECOVERIES:
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
        stacklevel=4,
    )
    return True


def _trim(history: dict[str, list[float]], n: int) -> None:
    for values in history.values():
        del values[n:]


def _estep(guide, args, kwargs, wants_grads, n_done, snap, names) -> Posterior:
    """The E-step (data-parallel: its log-likelihood summed over the ranks); see
    :func:`_guarded_estep`."""

    def run() -> Posterior:
        post = guide.posterior(*args, param_grads=wants_grads, **kwargs)
        dp.all_reduce_([post.log_likelihood])
        return post

    return _guarded_estep(run, n_done, snap, names)


def _guarded_estep(run: Callable[[], Any], n_done, snap, names):
    """Run an E-step; a model error once the M-step has moved the params (Pyro's validation of
    a scale driven to 0, say) rolls back to the last finite params and is a
    FloatingPointError."""
    try:
        return run()
    except EnumerationError:
        raise
    except ValueError as e:
        if n_done == 0:
            raise  # the model fails at its initial params: the user's error, as it is
        _restore(snap)
        raise FloatingPointError(
            f"the E-step failed at iteration {n_done} after the M-step moved the params to "
            f"invalid values; the params of the last finite iteration were restored "
            f"({', '.join(names)}). Lower the learning rate or regularize. Cause: {e}"
        ) from e


def _last_change(values: list[float], n_data: int) -> float:
    return abs(values[-1] - values[-2]) / n_data if len(values) > 1 else float("nan")


_WINDOW = 20


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
        store = pyro.get_param_store()
        pyro.infer.util.zero_grads({store.get_param(n).unconstrained() for n in store})
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


def _run_svi(model, guide, optim, args, kwargs, loop: _Loop) -> FitResult:
    max_iter, tol, n_data, callback = loop.max_iter, loop.tol, loop.n_data, loop.callback
    loss = loop.loss or (TraceEnum_ELBO() if loop.info.enumerates else Trace_ELBO())
    svi = SVI(model, guide, optim, loss)
    history: dict[str, list[float]] = {"elbo": [], "time": []}
    controlled = isinstance(loss, KLControlledELBO)
    if controlled:
        history["kl_weight"] = []
        loss.step = 0  # a new run starts its schedule again
    converged = interrupted = False
    done, saved = _resume(loop, model, guide, optim, args, kwargs)
    if saved:
        history = saved
    if controlled:
        loss.step = done
    start = time.perf_counter() - (history["time"][-1] if history["time"] else 0.0)
    it = done
    rng = rng_state() if loop.ckpt is not None else None
    bar = _bar(loop.progress, max_iter, "SVI" if loop.n_init == 1 else f"SVI run {loop.run}")
    bar.update(done)
    try:
        for it in range(done + 1, max_iter + 1):
            loss_value, stop = _svi_step(svi, args, kwargs, it)
            elbo = -loss_value
            if controlled:  # the plain ELBO, not the weighted objective that was climbed
                elbo = loss.last_elbo
                history["kl_weight"].append(loss.beta)
            history["elbo"].append(elbo)
            history["time"].append(time.perf_counter() - start)
            if loop.ckpt is not None:
                rng = rng_state()
                if loop.ckpt.due(it) or it == max_iter:
                    _save(loop, it, history, optim, rng)
            bar.update()
            bar.set_postfix(elbo_per_datum=f"{elbo / n_data:.6g}")
            if stop:  # a Ctrl-C came during the update: the step is recorded, now stop
                raise KeyboardInterrupt
            h = history["elbo"]
            if tol > 0 and len(h) >= 2 * _WINDOW and it % _WINDOW == 0:
                now = sum(h[-_WINDOW:]) / _WINDOW
                before = sum(h[-2 * _WINDOW : -_WINDOW]) / _WINDOW
                if abs(now - before) / n_data < tol:
                    converged = True
                    break
            if callback is not None and callback(it, {"elbo": elbo}):
                converged = True
                break
    except KeyboardInterrupt:
        interrupted = True  # (optimizer updates defer Ctrl-C: no param is half-updated)
        n = len(history["time"])  # appended last: the steps that completed
        _trim(history, n)
        if loop.ckpt is not None and n:
            _save(loop, n, history, optim, rng)
        it = n
    finally:
        bar.close()
    h = history["elbo"]
    final = sum(h[-_WINDOW:]) / len(h[-_WINDOW:]) if h else float("nan")
    if not converged and not interrupted and tol > 0:
        warnings.warn(
            f"SVI did not converge in {max_iter} iterations (tol={tol} on the ELBO per datum, "
            f"averaged over windows of {_WINDOW}); raise max_iter or tol.",
            ConvergenceWarning,
            stacklevel=3,
        )
    names = list(pyro.get_param_store().keys())
    return FitResult(
        constraints=constraints_of(names),
        params=_constrained(names),
        log_likelihood=None,
        elbo=final,
        history=history,
        converged=converged,
        n_iter=it,
        n_data=n_data,
        algorithm="SVI",
        interrupted=interrupted,
        info={"guide_params": names},
    )
