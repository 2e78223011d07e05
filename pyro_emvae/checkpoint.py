"""Checkpoints of a running fit: written atomically, read back to resume exactly.

A checkpoint holds what the loop needs to go on as if it had never stopped: every param's
unconstrained value, the optimizer's state (Adam's moments; EMOptim's guard memory), the
iteration count, the history, the RNG state at the end of the last completed iteration, and,
across restarts, the finished runs' objectives and the best run so far. It is written to
``path + ".tmp"`` and renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows), so
a crash while writing leaves the previous checkpoint intact.

The file holds tensors and plain data only (dicts, lists, tuples, strings, numbers, None) and is
read with ``torch.load(..., weights_only=True)``, which builds nothing else: a crafted file
cannot run code when a fit resumes from it. What is not plain is stored as plain data and
rebuilt: a constraint by its name in :data:`CONSTRAINTS` (and its bounds), a NumPy array (the
NumPy RNG state) as a tensor and its dtype, the best run's :class:`~pyro_emvae.result.FitResult`
as its fields. A value of any other kind is an error when the checkpoint is written.

Params are restored *in place* into the tensors the param store already holds after one trace
of the model and guide, so ``torch.nn`` modules registered with ``pyro.module`` keep using
their own (now restored) parameters.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions.constraints as pc
import torch
from pyro import poutine
from torch.distributions import constraints as tc

from pyro_emvae import _compat, params
from pyro_emvae import distributed as dp
from pyro_emvae.params import constraints_of

__all__ = ["CONSTRAINTS", "Checkpoint", "StreamDigest", "data_digest", "from_plain", "to_plain"]

FORMAT = 2
MAGIC = "pyro_emvae checkpoint"
TAG = "__pyro_emvae__"  # marks a dict that stands for a non-plain value (a constraint, an array)

# ------------------------------------------------------------------ constraints as plain data
#: The constraints a checkpoint stores, by name: every constraint object of
#: ``torch.distributions.constraints`` and ``pyro.distributions.constraints`` (``positive``,
#: ``simplex``, ``lower_cholesky``, ``softplus_positive``, ``unit_interval``, ...).
CONSTRAINTS: dict[str, tc.Constraint] = {
    name: value
    for module in (tc, pc)
    for name, value in sorted(vars(module).items())
    if isinstance(value, tc.Constraint) and not name.startswith("_")
}
# parametrized kinds, stored as name + the constructor's arguments (read from the attributes)
_PARAMETRIZED: dict[str, tuple[type, tuple[str, ...]]] = {
    "greater_than": (_compat.GreaterThan, ("lower_bound",)),
    "greater_than_eq": (_compat.GreaterThanEq, ("lower_bound",)),
    "less_than": (_compat.LessThan, ("upper_bound",)),
    "interval": (_compat.Interval, ("lower_bound", "upper_bound")),
    "half_open_interval": (_compat.HalfOpenInterval, ("lower_bound", "upper_bound")),
    "integer_interval": (_compat.IntegerInterval, ("lower_bound", "upper_bound")),
    "integer_greater_than": (_compat.IntegerGreaterThan, ("lower_bound",)),
    "integer_less_than": (_compat.IntegerLessThan, ("upper_bound",)),
    "multinomial": (_compat.MultinomialConstraint, ("upper_bound",)),
    "independent": (
        _compat.IndependentConstraint,
        ("base_constraint", "reinterpreted_batch_ndims"),
    ),
    "cat": (_compat.Cat, ("cseq", "dim", "lengths")),
    "stack": (_compat.Stack, ("cseq", "dim")),
}
if _compat.MixtureSameFamilyConstraint is not None:  # torch >= 2.8
    _PARAMETRIZED["mixture_same_family"] = (
        _compat.MixtureSameFamilyConstraint,
        ("base_constraint",),
    )
_PARAMETRIZED_BY_TYPE = {cls: (name, attrs) for name, (cls, attrs) in _PARAMETRIZED.items()}
_NAME_OF = {id(value): name for name, value in reversed(CONSTRAINTS.items())}
# a constraint class without arguments, whatever instance of it: the named one
_NAME_OF_TYPE = {
    type(value): name
    for name, value in reversed(CONSTRAINTS.items())
    if type(value) not in _PARAMETRIZED_BY_TYPE
}


def _constraint_to_plain(c: tc.Constraint, where: str) -> dict[str, Any]:
    name = _NAME_OF.get(id(c)) or _NAME_OF_TYPE.get(type(c))
    if name is not None:
        return {TAG: "constraint", "name": name}
    kind = _PARAMETRIZED_BY_TYPE.get(type(c))
    if kind is None:
        raise TypeError(
            f"checkpoint: {where} is a constraint pyro_emvae cannot store ({c!r}, of type "
            f"{type(c).__module__}.{type(c).__qualname__}); a checkpoint stores the constraints "
            "of torch.distributions.constraints and pyro.distributions.constraints by name. "
            "Use one of those, or fit without checkpoint="
        )
    name, attrs = kind
    args = [to_plain(getattr(c, a), f"{where}.{a}") for a in attrs]
    return {TAG: "constraint", "name": name, "args": args}


def _constraint_from_plain(d: dict) -> tc.Constraint:
    name, args = d.get("name"), d.get("args")
    if args is None and name in CONSTRAINTS:
        return CONSTRAINTS[name]
    if name in _PARAMETRIZED and isinstance(args, list):
        cls, _ = _PARAMETRIZED[name]
        return cls(*(from_plain(a) for a in args))
    raise ValueError(f"unknown constraint {name!r}")


# ------------------------------------------------------------------ plain data
_PLAIN = (str, int, float, bool, type(None))


def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` as tensors and plain data that ``torch.load(weights_only=True)`` reads back
    (see :func:`from_plain`); raises TypeError naming ``where`` in ``obj`` for a value of any
    other kind.

    Example::

        >>> from torch.distributions import constraints
        >>> from_plain(to_plain({"c": constraints.interval(0.0, 2.0)}))["c"]
        Interval(lower_bound=0.0, upper_bound=2.0)
    """
    if type(obj) in _PLAIN:
        return obj
    if isinstance(obj, torch.Tensor):
        # a plain tensor (not a Parameter or another subclass), cut from the autograd graph
        return obj.detach().as_subclass(torch.Tensor) if type(obj) is not torch.Tensor else obj
    if isinstance(obj, np.generic):  # (np.float64 is a float, pickled as a NumPy object)
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint: {where} is a NumPy array of dtype {obj.dtype}")
        data = torch.from_numpy(
            np.ascontiguousarray(obj).astype(np.float64 if obj.dtype.kind == "f" else np.int64)
        )
        return {TAG: "ndarray", "dtype": obj.dtype.str, "data": data}
    if isinstance(obj, tc.Constraint):
        return _constraint_to_plain(obj, where)
    if isinstance(obj, dict):
        if TAG in obj:
            raise TypeError(f"checkpoint: {where} holds the reserved key {TAG!r}")
        out = {}
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"checkpoint: {where} has a key of type {type(k).__name__}")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint "
        "holds tensors, numbers, strings, lists, tuples and dicts of them (and constraints), so "
        "that reading it runs no code. Make the M-step's state_dict() or info return those"
    )


def from_plain(obj: Any) -> Any:
    """The value :func:`to_plain` stored (constraints and arrays rebuilt)."""
    if isinstance(obj, dict):
        kind = obj.get(TAG)
        if kind is None:
            return {k: from_plain(v) for k, v in obj.items()}
        if kind == "constraint":
            return _constraint_from_plain(obj)
        if kind == "ndarray" and isinstance(obj.get("data"), torch.Tensor):
            return obj["data"].numpy().astype(np.dtype(obj["dtype"]))
        raise ValueError(f"unknown stored kind {kind!r}")
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


# ------------------------------------------------------------------ digests of the data
def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor's values, row-major (a contiguous CPU copy where needed)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def _feed(h, obj: Any) -> None:
    """Hash ``obj``'s data into ``h``: tensors and arrays by dtype, shape and bytes, plain
    values by their repr, containers item by item; any other object (a function, a module)
    by its type only (its params are the fit's own)."""
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(_bytes(obj))
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
        h.update(f"A{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    elif type(obj) in _PLAIN or isinstance(obj, np.generic):
        h.update(f"P{type(obj).__name__}:{obj!r}".encode())
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(f"K{k!r}".encode())
            _feed(h, obj[k])
    else:
        h.update(f"O{type(obj).__module__}.{type(obj).__qualname__}".encode())


def data_digest(args: tuple, kwargs: dict) -> str:
    """A SHA-256 digest of the model's arguments (every tensor's dtype, shape and bytes):
    a checkpoint of the fit of other data of the same size is refused."""
    h = hashlib.sha256()
    _feed(h, (args, kwargs))
    return h.hexdigest()


_U64 = np.uint64
_C1, _C2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on uint64 (wrapping arithmetic)."""
    z ^= z >> _U64(30)
    z *= _C1
    z ^= z >> _U64(27)
    z *= _C2
    z ^= z >> _U64(31)
    return z


class StreamDigest:
    """A digest of the rows a stream yields over one pass, *whatever their order or their
    grouping into batches*: a shuffled ``DataLoader`` gives the same digest at every pass, and
    in a new process, while another data set of the same size does not.

    Each row (the leading index of the batch's tensors that have one, all of them together) is
    hashed to 64 bits and the hashes are summed modulo 2**64: a sum does not depend on the
    order. A batch's other values (an extra argument of every batch) are hashed whole, and
    the set of those digests is kept. It costs a few nanoseconds per byte (0.8 s for 10^7 rows
    of 2 float64 on a loaded 2-core machine, where SHA-256 of the same tensor takes 0.35 s).
    """

    def __init__(self) -> None:
        self.rows_sum = 0  # sum of the row hashes, mod 2**64
        self.others: set[str] = set()  # digests of the values that are not rows
        self.rows = 0
        self.layout: set[str] = set()  # each batch's arguments: which are rows, their dtypes

    def update(self, args: tuple, kwargs: dict, n: int) -> None:
        """Add one batch: the model's ``args`` and ``kwargs``, whose tensors with leading size
        ``n`` are its rows."""
        aligned, layout = [], []
        for key, value in [*enumerate(args), *sorted(kwargs.items())]:
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                aligned.append(_bytes(value).reshape(n, -1))
                layout.append(f"{key}:rows:{value.dtype}")
            else:
                h = hashlib.sha256(f"{key}:".encode())
                _feed(h, value)
                self.others.add(h.hexdigest())
                layout.append(f"{key}:whole")
        self.layout.add(",".join(layout))
        if not aligned or n == 0:
            return
        # each argument's row bytes padded to whole 8-byte words, side by side
        words = [
            b if b.shape[1] % 8 == 0 else np.pad(b, ((0, 0), (0, -b.shape[1] % 8))) for b in aligned
        ]
        x = (words[0] if len(words) == 1 else np.concatenate(words, axis=1)).view(_U64)
        keys = _mix(np.arange(1, x.shape[1] + 1, dtype=_U64))  # each column its own key
        z = x ^ keys
        z *= _C1
        z ^= z >> _U64(29)
        row = _mix(z.sum(axis=1, dtype=_U64))  # (a row's words combined, then mixed)
        self.rows_sum = (self.rows_sum + int(row.sum(dtype=_U64))) % (1 << 64)
        self.rows += n

    def hexdigest(self) -> str:
        """The digest of the rows seen (data-parallel: of every rank's, as one stream)."""
        mine = (self.rows_sum, self.rows, sorted(self.others), sorted(self.layout))
        every = dp.all_gather_object(mine)
        rows_sum = sum(e[0] for e in every) % (1 << 64)
        rows = sum(e[1] for e in every)
        others = sorted({s for e in every for s in e[2]})
        layout = sorted({s for e in every for s in e[3]})
        return hashlib.sha256(repr((rows_sum, rows, others, layout)).encode()).hexdigest()


# ------------------------------------------------------------------ the file
class Checkpoint:
    """One checkpoint file: ``save(state)`` atomically, ``load()`` (``None`` if absent).

    Made before the fit's first iteration: a path that cannot be written (its directory
    cannot be made, is read-only, or the path is a directory) is an error then, not after
    ``every`` iterations of work.
    """

    def __init__(self, path: str | os.PathLike, every: int, write: bool = True):
        """``write=False`` reads the file but never writes it (the ranks other than 0 of a
        data-parallel fit)."""
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.fingerprint: dict[str, Any] = {}
        self.write = write
        if self.path.exists() and self.path.is_dir():
            raise IsADirectoryError(f"checkpoint={str(self.path)!r} is a directory; give a file")
        # the writer tries its directory and temporary file now; every rank learns the outcome
        # (a data-parallel rank that went on alone would wait forever for the others)
        failure = self._probe() if write else None
        failure = next((f for f in dp.all_gather_object(failure) if f is not None), None)
        if failure is not None:
            errno, reason = failure
            raise OSError(
                errno,
                f"checkpoint={str(self.path)!r} cannot be written ({reason}); give a path in a "
                "writable directory",
            )

    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def _probe(self) -> tuple[int | None, str] | None:
        """Make the directory and write and remove the temporary file the saves write; the
        failure's (errno, reason), or None."""
        tmp = self._tmp()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb"):
                pass
            tmp.unlink()
        except OSError as e:
            return e.errno, f"{type(e).__name__}: {e.strerror or e}"
        return None

    def due(self, n_done: int) -> bool:
        return n_done > 0 and n_done % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        if self.write:
            self._write(state)
        dp.barrier()  # data-parallel: no rank goes on (and may read it) before it is written

    def _write(self, state: dict[str, Any]) -> None:
        plain = to_plain(state)  # (an unstorable value is an error before the file is touched)
        plain = {"magic": MAGIC, "format": FORMAT, "fingerprint": self.fingerprint, **plain}
        tmp = self._tmp()
        with open(tmp, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state, or None if there is no file. A file that is not a checkpoint of
        this format, or that holds anything but tensors and plain data, is refused (read with
        ``weights_only=True``: nothing in it runs), as is a checkpoint whose ``fingerprint``
        (what identifies the fit: algorithm, data digest, sizes) is not this one. The saves
        that follow carry ``fingerprint``."""
        self.fingerprint = to_plain(fingerprint, "fingerprint")
        if not self.path.exists():
            return None
        where = str(self.path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file, or one that would run code
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"checkpoint {where!r} is not a pyro_emvae checkpoint or cannot be read safely "
                f"({type(e).__name__}: {first}); it was not loaded (no code in it ran). "
                "Delete it to start afresh"
            ) from e
        if (
            not isinstance(state, dict)
            or state.get("magic") != MAGIC
            or state.get("format") != FORMAT
        ):
            raise ValueError(
                f"{where!r} is not a pyro_emvae checkpoint of format {FORMAT} (an older "
                "pyro_emvae's, or another file); delete it to start afresh"
            )
        theirs = state.get("fingerprint")
        theirs = theirs if isinstance(theirs, dict) else {}
        diff = {k: (theirs.get(k), v) for k, v in self.fingerprint.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {_short(a)} vs now {_short(b)}" for k, (a, b) in diff.items()
            )
            raise ValueError(
                f"checkpoint {where!r} was written by a different fit ({detail}); "
                "give another path or delete it"
            )
        try:
            return from_plain(state)
        except Exception as e:  # (a constraint's stored arguments that do not build one)
            raise ValueError(f"{where!r} is not a pyro_emvae checkpoint ({e})") from e


def _short(value: Any) -> str:
    """A fingerprint value for a message: digests cut to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64:
        return repr(value[:12] + "...")
    return repr(value)


# ------------------------------------------------------------------ params and optimizers
def param_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every param's unconstrained value (detached copies) and its constraint."""
    values = params.snapshot()
    return values, constraints_of(list(values))


def check_storable() -> None:
    """Raise (TypeError, naming the param) if a param in the store has a constraint a
    checkpoint cannot store: before the first iteration rather than at the first save."""
    for name, constraint in constraints_of(params.names()).items():
        to_plain(constraint, f"the constraint of param '{name}'")


def register(model, guide, args: tuple, kwargs: dict) -> None:
    """Create every param of the model and the guide (one trace of each, nothing kept)."""
    with poutine.block(), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_tr)(*args, **kwargs)


def restore_params(saved: dict[str, torch.Tensor], constraints: dict[str, Any]) -> None:
    """Write saved unconstrained values into the store's tensors, in place."""
    live = params.unconstrained(saved)
    for name, value in saved.items():
        target = live.get(name)
        if target is None:  # not (yet) created by the model: put it in the store as saved
            params.put(name, value, constraints[name])
        elif target.shape != value.shape:
            raise ValueError(
                f"checkpoint: param '{name}' has shape {tuple(value.shape)}, the model "
                f"now makes {tuple(target.shape)}"
            )
    params.restore({n: saved[n].to(t.device, t.dtype) for n, t in live.items()})


def load_optim_state(optim, state: dict) -> None:
    """Give a ``pyro.optim`` optimizer a saved ``get_state()``: its per-param optimizers are
    made again from it (``set_state`` alone only reaches optimizers not made yet)."""
    optim.optim_objs.clear()
    optim.set_state(state)
