"""``fit``: checks its inputs, picks the step, runs the restarts.

* With an :class:`~pyro_emvae.estep.ExactEStep` guide each iteration is an exact E-step
  (which also yields the exact :math:`\\log p_\\theta(x)`, the tight ELBO) followed by an M-step
  (:class:`~pyro_emvae.optim.GradientMStep` when ``optim`` is a Pyro optimizer: EG / GEM).
* With any other guide (an AutoGuide, an encoder) each iteration is one
  :class:`pyro.infer.SVI` step on the ELBO (``TraceEnum_ELBO`` when the model enumerates
  discrete sites, ``Trace_ELBO`` otherwise).

What scikit-learn's mixture fit owns is split in two: :func:`fit` checks the inputs, picks the
step (:mod:`pyro_emvae.loop`: in memory or a stream, exact passes or updates per minibatch)
and runs the restarts (``n_init``, the best run kept); :func:`pyro_emvae.loop.run` owns
``tol`` on the change of the per-datum objective, ``max_iter``, the ``ConvergenceWarning``,
checkpoints, Ctrl-C, rollback and the final E-step, so the reported log-likelihood belongs to
the returned params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.optim import PyroOptim
from pyro.poutine.messenger import unwrap
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae import _compat
from pyro_emvae import distributed as dp
from pyro_emvae import params as _params
from pyro_emvae.amortized import preserved_rng, rng_state, set_rng
from pyro_emvae.checkpoint import Checkpoint, StreamDigest, check_storable, data_digest
from pyro_emvae.elbo import KLControlledELBO
from pyro_emvae.estep import EnumerationError, ExactEStep, plate_nesting
from pyro_emvae.init import STRATEGIES, init_potentials
from pyro_emvae.loop import (
    ConvergenceWarning,
    InMemory,
    Minibatch,
    Options,
    Streamed,
    SVIStep,
)
from pyro_emvae.loop import run as run_loop
from pyro_emvae.optim import EMOptim, GradientMStep, OnlineEM
from pyro_emvae.result import FitResult
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
    inner = _compat.handler_inner(fn)
    return inner if inner is not None else getattr(fn, "__wrapped__", None)


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
    return _info(model, args, kwargs, tr)


def _info(model: Callable, args: tuple, kwargs: dict, tr) -> _ModelInfo:
    """What fit reads of a trace of the model (a prior trace, or the first E-step's pass):
    its params, the observed count (:func:`_inspect`) and whether it enumerates."""
    enumerates = any(
        s["type"] == "sample" and s["infer"].get("enumerate") == "parallel"
        for s in tr.nodes.values()
    )
    total = observed_count(tr)
    params = [n for n, s in tr.nodes.items() if s["type"] == "param"]
    return _ModelInfo(params, max(total, 1), enumerates, tr, (args, kwargs), model, 0, total)


def _inspect_first(guide: ExactEStep, args: tuple, kwargs: dict) -> _ModelInfo | None:
    """:func:`_inspect` and fit's input checks on the guide's first E-step pass
    (:meth:`ExactEStep._first_trace`, kept for that E-step), instead of a prior trace of their
    own: one model pass per fit fewer. The same checks, on the enumerated trace: what they
    read of it is what they read of the prior trace (the same params, observed values, masks
    and plates) or more (every component's distribution parameters, where the prior trace
    holds the drawn ones); the RNG is left as the prior trace left it (its one draw made
    again), the params are created in the same order.

    Returns None, with the draws and the params the pass made undone, where the pass cannot
    stand for the prior trace (see :func:`_reads_as_prior` and
    :class:`~pyro_emvae.estep._FirstPass`) or where the pass or a check fails: the caller then
    takes the separate passes, which say what they said before (an error of the prior
    trace's, or the first E-step's own). Not for a data-parallel fit or under the user's own
    handlers (which a prior trace does not see and the E-step does)."""
    if dp.active() or _compat.handler_stack():
        return None
    store = pyro.get_param_store()
    before = set(store.keys())
    rng = rng_state()
    try:
        first = guide._first_trace(args, kwargs)
        if first is not None and _reads_as_prior(first[0], first[1]):
            tr, depth = first
            info = _info(guide.model, args, kwargs, tr)
            validate_fit_inputs(guide.model, args, kwargs, tr, exact=True, components=False)
            info.n_data = max(info.observed, 1)
            check_components(prune_subsample_sites(tr), info.observed)
            if guide.max_plate_nesting is None:
                guide.max_plate_nesting = depth
            # (validate_fit_inputs read the trace's own plate nesting: the first E-step skips
            # the checks it shares with them on this same trace)
            guide._first.checked = plate_nesting(tr)
            return info
    except Exception:  # noqa: BLE001, S110 - the separate passes say what it is, as before
        pass
    guide.__dict__.pop("_first", None)
    for name in [n for n in store if n not in before]:
        del store[name]
    set_rng(rng)
    return None


def _reads_as_prior(tr, depth: int) -> bool:
    """Whether fit's checks and count read the same of this enumerated trace as of a prior
    trace: every observed site's support holds no tensor (a support read from the params, such
    as a Binomial's, is checked for the drawn component in a prior trace and for any component
    in an enumerated one), and every mask on an observed site spans no dim left of the plates
    (where the enumerated dims lie; a mask computed from an enumerated value would count
    other rows than a drawn one) and broadcasts to at most 2**24 cells (so that the share of
    cells it keeps is the same float32 however many enumerated copies it is counted over)."""
    for site in tr.nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn = site["fn"]
        try:
            support = fn.support
        except (NotImplementedError, AttributeError):
            return False
        while isinstance(support, dist.constraints.independent):
            support = support.base_constraint
        if any(isinstance(v, torch.Tensor) for v in vars(support).values()):
            return False
        masks = [(site["mask"], fn.batch_shape)]
        inner = fn.observation_dist if isinstance(fn, dist.DiscreteHMM) else fn
        while isinstance(inner, (dist.Independent, dist.MaskedDistribution)):
            if isinstance(inner, dist.MaskedDistribution):
                masks.append((_compat.mask_of(inner), inner.batch_shape))
            inner = inner.base_dist
        for mask, batch in masks:
            if not torch.is_tensor(mask):
                continue
            if any(n != 1 for n in mask.shape[: max(mask.dim() - depth, 0)]):
                return False
            if math.prod(batch) * mask.numel() > 2**24:
                return False
    return True


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
    if exact:
        # data changed since an earlier fit or call through an alias torch does not see (a
        # numpy array sharing their memory) are read again: what the E-step keeps of their
        # values, and a plan probed on them (its trace holds values computed from them)
        guide.forget_data()
        if isinstance(mstep, EMOptim):
            mstep._plan_key = None
    # (an ExactEStep's first E-step pass serves as the prior trace where it can: _inspect_first)
    info = _inspect_first(guide, args, kwargs) if exact and stream is None else None
    if stream is None and info is None:
        info = _inspect(seen, args, kwargs)
        # bad data, params or shapes: a clear error before any work (pyro_emvae.validate)
        validate_fit_inputs(seen, args, kwargs, info.trace, exact=exact, components=False)
        observed = int(dp.all_reduce_float(info.observed))  # (over the shards)
        info.n_data = max(observed, 1)
        if exact:
            check_components(prune_subsample_sites(info.trace), observed)
            if guide.max_plate_nesting is None:  # (from this trace: the E-step needs no other)
                guide.max_plate_nesting = plate_nesting(info.trace)
    elif stream is not None:
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
    # (the prior trace holds what the model computed on the whole data: a mixture's locs[z]
    # at a drawn z, (N, D) per param; nothing reads it from here on)
    info.trace = None
    if exact:
        # (with EMOptim in memory, the first E-step's structure check probes the model for
        # the M-step's plan too: one setup pass fewer, see ExactEStep._shared_probe; no other
        # M-step reads a plan, and a stream's passes plan each batch afresh. For this fit's
        # loop only: a later direct posterior call probes for no M-step)
        guide.share_probe = isinstance(mstep, EMOptim) and stream is None
        scope.callback(_stop_sharing_probes, guide)
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
            step = _pick_step(model, guide, exact, mstep, optim, loss, stream, per_batch, args, kwargs, info)  # fmt: skip
            options = Options(
                max_iter, tol, n_data, callback, progress, run, n_init, info.params,
                model=model, guide=guide, first=info.first, ckpt=ckpt, resume=resume,
                outer=outer, recover=recover,
            )  # fmt: skip
            result = run_loop(step, options)
            finals.append(result.objective)
            if best is None or result.objective > best.objective:
                best = result
                if n_init > 1 or ckpt is not None:
                    # (read only to restore the best of several runs, or by a checkpoint: one
                    # run without a checkpoint keeps its params where they are)
                    best_snapshot = _params.snapshot(_params.names())
            if result.interrupted:
                best.interrupted = True  # the fit as a whole was cut short, whichever run is best
                break
            if ckpt is not None and run + 1 < n_init:  # the next run starts from its own init
                ckpt.save({"run": run + 1, "n_done": None, **outer()})
    assert best is not None
    if n_init > 1:
        _params.restore(best_snapshot)
        best.restarts = finals
    if reg_covar is not None:
        mstep.reg_covar = reg_covar  # the user's EMOptim as it was given
    return best


def _stop_sharing_probes(guide: ExactEStep) -> None:
    """The end of a fit's loop: the guide's structure checks probe for no M-step any more, and
    a probe not taken (an error, an interrupt) is let go."""
    guide.share_probe = False
    guide.__dict__.pop("_probe", None)


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
    if seed is not None or callable(init):
        # fit's first pass, kept for the first E-step (_inspect_first), ran before this seed
        # and this init: a model that draws (a subsampled plate) would keep the draws made
        # before the seed, and a write the init makes behind the version counters (.data)
        # would not be seen; the E-step traces the model again
        getattr(guide, "__dict__", {}).pop("_first", None)
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


def _pick_step(model, guide, exact, mstep, optim, loss, stream, per_batch, args, kwargs, info):
    """The step the loop runs: an update per minibatch of a stream (online EM, minibatch EG,
    SVI), exact EM passes over a stream, exact EM in memory, or SVI in memory."""
    if per_batch:
        optimizer = mstep if exact else optim
        return Minibatch(model, guide, optimizer, stream, info.rows, info.params, loss, info.enumerates)  # fmt: skip
    if exact and stream is not None:
        return Streamed(guide, mstep, stream, info.params)
    if exact:
        return InMemory(guide, mstep, args, kwargs, info.params)
    return SVIStep(model, guide, optim, args, kwargs, loss, info.enumerates)
