"""Checkpoints of a running fit: written atomically, read back to resume exactly.

A checkpoint holds what the loop needs to go on as if it had never stopped: every param's
unconstrained value, the optimizer's state (Adam's moments; EMOptim's guard memory), the
iteration count, the history, the RNG state at the end of the last completed iteration, and,
across restarts, the finished runs' objectives and the best run so far. It is written to
``path + ".tmp"`` and renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows), so
a crash while writing leaves the previous checkpoint intact.

Params are restored *in place* into the tensors the param store already holds after one trace
of the model and guide, so ``torch.nn`` modules registered with ``pyro.module`` keep using
their own (now restored) parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from pyro_emvae import distributed as dp

__all__ = ["Checkpoint"]

FORMAT = 1


class Checkpoint:
    """One checkpoint file: ``save(state)`` atomically, ``load()`` (``None`` if absent)."""

    def __init__(
        self, path: str | os.PathLike, every: int, fingerprint: dict[str, Any], write: bool = True
    ):
        """``write=False`` reads the file but never writes it (the ranks other than 0 of a
        data-parallel fit)."""
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.fingerprint = fingerprint
        self.write = write
        if self.path.exists() and self.path.is_dir():
            raise IsADirectoryError(f"checkpoint={str(self.path)!r} is a directory; give a file")

    def due(self, n_done: int) -> bool:
        return n_done > 0 and n_done % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        if self.write:
            self._write(state)
        dp.barrier()  # data-parallel: no rank goes on (and may read it) before it is written

    def _write(self, state: dict[str, Any]) -> None:
        state = {"format": FORMAT, "fingerprint": self.fingerprint, **state}
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            raise ValueError(
                f"checkpoint {str(self.path)!r} cannot be read ({type(e).__name__}: {e}); "
                "delete it to start afresh"
            ) from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{str(self.path)!r} is not a pyro_emvae checkpoint (format {FORMAT})")
        theirs = state.get("fingerprint", {})
        diff = {k: (theirs.get(k), v) for k, v in self.fingerprint.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"checkpoint {str(self.path)!r} was written by a different fit ({detail}); "
                "give another path or delete it"
            )
        return state


def param_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every param's unconstrained value (detached copies) and its constraint."""
    store = pyro.get_param_store()
    values = {n: store.get_param(n).unconstrained().detach().clone() for n in store}
    return values, constraints_of(list(values))


def constraints_of(names: list[str]) -> dict[str, Any]:
    """The constraint of each named param in the store."""
    store = pyro.get_param_store()
    return {n: store._constraints[n] for n in names if n in store}


def register(model, guide, args: tuple, kwargs: dict) -> None:
    """Create every param of the model and the guide (one trace of each, nothing kept)."""
    with poutine.block(), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_tr)(*args, **kwargs)


def restore_params(saved: dict[str, torch.Tensor], constraints: dict[str, Any]) -> None:
    """Write saved unconstrained values into the store's tensors, in place."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in saved.items():
            if name in store:
                target = store.get_param(name).unconstrained()
                if target.shape != value.shape:
                    raise ValueError(
                        f"checkpoint: param '{name}' has shape {tuple(value.shape)}, the model "
                        f"now makes {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.device, target.dtype))
            else:  # not (yet) created by the model: put it in the store as saved
                constraint = constraints[name]
                store.setdefault(name, biject_to(constraint)(value), constraint)


def load_optim_state(optim, state: dict) -> None:
    """Give a ``pyro.optim`` optimizer a saved ``get_state()``: its per-param optimizers are
    made again from it (``set_state`` alone only reaches optimizers not made yet)."""
    optim.optim_objs.clear()
    optim.set_state(state)
