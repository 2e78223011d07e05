"""Data-parallel fits over :mod:`torch.distributed`: each rank holds a shard of the data.

EM's expected sufficient statistics are sums over data points, and so are the gradients of
:math:`\\log p_\\theta(x)` and of the ELBO. A data-parallel fit therefore needs one collective
per step: every rank computes its shard's statistics (or gradients), they are all-reduced
(summed), and every rank applies the same closed-form update (or optimizer step) to the same
params. The ranks stay identical without ever exchanging params, and the fit equals the one
process fit on the concatenated shards up to the order of floating-point sums.

:func:`~pyro_emvae.fit.fit` does this with ``distributed=True`` once the process group is up::

    # launch: torchrun --nproc_per_node=4 train.py   (gloo on CPU, nccl on GPU)
    import torch.distributed as dist
    dist.init_process_group("gloo")                   # or "nccl", one GPU per rank
    shard = data[dist.get_rank() :: dist.get_world_size()]
    result = fit(model, ExactEStep(model), shard, distributed=True)

At the start the params are broadcast from rank 0 (as DistributedDataParallel does), so a model
that initializes them from its data starts every rank from rank 0's values. The reported
log-likelihood, ELBO and ``n_data`` are totals over all ranks.

The helpers here are no-ops outside :func:`data_parallel`, so the library calls them on every
path without a branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pyro.poutine.messenger import Messenger

from pyro_emvae import params

__all__ = [
    "active",
    "all_gather_object",
    "all_reduce_",
    "all_reduce_float",
    "all_reduce_grads",
    "all_reduce_stats",
    "barrier",
    "broadcast_params",
    "check_same_params",
    "count_globals_once",
    "data_parallel",
    "data_plate_of",
    "lockstep",
    "rank",
    "world_size",
]

_GROUPS: list[Any] = []  # the process groups of the enclosing data_parallel contexts


def _dist():
    import torch.distributed as tdist

    return tdist


@contextmanager
def data_parallel(group: Any = None) -> Iterator[None]:
    """Inside this context the library's reductions (statistics, gradients, log-likelihoods)
    are all-reduced over ``group`` (default: the world). Needs an initialized process group."""
    tdist = _dist()
    if not (tdist.is_available() and tdist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs torch.distributed initialized first: launch with "
            "`torchrun --nproc_per_node=N script.py` and call "
            "torch.distributed.init_process_group('gloo') (or 'nccl' on GPUs) before fit"
        )
    _GROUPS.append(group)
    try:
        yield
    finally:
        _GROUPS.pop()


def active() -> bool:
    """Whether a data-parallel context is open (reductions then sum over ranks)."""
    return bool(_GROUPS)


def _group():
    return _GROUPS[-1] if _GROUPS else None


def world_size() -> int:
    return _dist().get_world_size(_group()) if active() else 1


def rank() -> int:
    return _dist().get_rank(_group()) if active() else 0


def _comm_device(like: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if _dist().get_backend(_group()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like.type != "cpu" else like


def _in_place(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective(flat)`` on the tensors flattened into one buffer per dtype (on the
    backend's device), then copy the result back into each tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        device = _comm_device(ts[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in ts])
        collective(flat)
        offset = 0
        with torch.no_grad():
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t).to(t.device))
                offset += n


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per dtype)."""
    tensors = [t for t in tensors if t is not None]
    if active() and tensors:
        _in_place(tensors, lambda flat: _dist().all_reduce(flat, group=_group()))


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote a checkpoint, before anyone reads it)."""
    if active():
        _dist().barrier(group=_group())


def all_reduce_float(value: float) -> float:
    """A Python number summed over the ranks (float64)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    all_reduce_([t])
    return float(t[0])


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank (rank order); ``[obj]`` outside a data-parallel context."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj, group=_group())
    return out


def all_reduce_stats(stats) -> None:
    """Sum :class:`~pyro_emvae.stats.Stats` over the ranks in place: every kind of statistic,
    the marks of touched ids (a logical or), and the covariance forms. A rank whose shard gave
    no statistic of some kind (an empty shard) contributes zeros."""
    if not active():
        return
    kinds = all_gather_object((sorted(stats.sums), sorted(stats.touched), dict(stats.forms)))
    like = next(iter(stats.sums.values()), None)
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else torch.device("cpu")
    for sums, touched, forms in kinds:
        for k in sums:
            if k not in stats.sums:
                stats.sums[k] = torch.zeros(stats.length(k), dtype=dtype, device=device)
        for k in touched:
            if k not in stats.touched:
                stats.touched[k] = torch.zeros(stats.length(k), dtype=torch.bool, device=device)
        stats.forms.update(forms)
    names = sorted(stats.sums)
    marks = sorted(stats.touched)
    counts = [stats.touched[k].to(dtype) for k in marks]
    all_reduce_([stats.sums[k] for k in names] + counts)
    for k, c in zip(marks, counts):
        stats.touched[k] = c > 0


def _store_params() -> list[tuple[str, torch.Tensor]]:
    return sorted(params.unconstrained().items())


def check_same_params() -> None:
    """Every rank must hold the same params (names and shapes) to reduce their gradients and
    statistics; raise naming the difference if they do not."""
    if not active():
        return
    mine = {n: tuple(p.shape) for n, p in _store_params()}
    every = all_gather_object(mine)
    for r, theirs in enumerate(every):
        if theirs != mine:
            diff = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
            detail = ", ".join(
                f"{n}: {theirs.get(n)} on rank {r} vs {mine.get(n)} here" for n in diff
            )
            raise ValueError(
                f"data-parallel fit: the ranks hold different params ({detail}). Every rank "
                "must build the same params whatever its shard's size; a per-datum param (a "
                "mean-field guide's local latents) cannot be shared across shards: use an "
                "amortized guide"
            )


def broadcast_params(src: int = 0) -> None:
    """Overwrite every param in the store with rank ``src``'s value (in place, so optimizers
    and ``pyro.module`` nets keep their tensors)."""
    if not active():
        return
    check_same_params()
    params = [p for _, p in _store_params()]
    if params:
        _in_place(params, lambda flat: _dist().broadcast(flat, src=src, group=_group()))


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the ``.grad`` of each param over the ranks (a missing grad counts as zero)."""
    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params])


class count_globals_once(Messenger):
    """Scale every sample site outside the data plate by 1 / world size: each rank's model
    sees its shard and the global sites (priors, global latents of a guide), and the sum over
    ranks must count those once, as one process on all the data does."""

    def __init__(self, plate: str) -> None:
        super().__init__()
        self.plate = plate
        self.factor = 1.0 / world_size()

    def _pyro_sample(self, msg) -> None:
        if not any(f.name == self.plate for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def data_plate_of(trace) -> str:
    """The name of the plate a data-parallel fit shards: the outermost plate shared by every
    observed site that lies in a plate (a ``pyro.factor`` prior outside all plates aside)."""
    observed = [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample" and s["is_observed"] and s["cond_indep_stack"]
    ]
    names = None
    for s in observed:
        mine = [f.name for f in s["cond_indep_stack"] if f.vectorized]
        names = mine if names is None else [n for n in names if n in mine]
    if not names:
        raise ValueError(
            "a data-parallel fit shards the data along a plate, and the model's observed sites "
            "share none: put the data in pyro.plate('data', len(x))"
        )
    return names[0]  # (cond_indep_stack lists the outermost plate first)


def lockstep(batches: Iterable) -> Iterator:
    """Yield ``batches`` while *every* rank still has one: steps that all-reduce per batch need
    the ranks in lockstep, so an epoch ends on all ranks when the shortest shard ends."""
    if not active():
        yield from batches
        return
    it = iter(batches)
    while True:
        try:
            item = next(it)
            have = 1.0
        except StopIteration:
            item, have = None, 0.0
        flag = torch.tensor([have], dtype=torch.float64, device=_comm_device(torch.device("cpu")))
        _dist().all_reduce(flag, op=_dist().ReduceOp.MIN, group=_group())
        if flag[0] < 1:
            return
        yield item
