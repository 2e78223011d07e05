"""Read, snapshot, restore and write params through Pyro's param store: the one place that
knows how the store keeps a param (an unconstrained leaf tensor :math:`u` and a constraint
:math:`c`; the value the model sees is :math:`\\theta = T_c(u)` with
:math:`T_c` = ``transform_to(c)``).

Two representations, two uses:

- **unconstrained** (:func:`snapshot` / :func:`restore`, :func:`unconstrained`): the tensors
  the optimizers step and the checkpoint stores; a restore copies them back bit for bit, in
  place, so that optimizer state stays attached to the same tensors.
- **constrained** (:func:`constrained` / :func:`write`): the values a closed-form M-step
  computes; :func:`write` maps them through :math:`T_c^{-1}` into the same tensors.

Example::

    >>> import pyro, torch
    >>> from torch.distributions import constraints
    >>> from pyro_emvae import params
    >>> _ = pyro.param("s", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    >>> snap = params.snapshot(["s"])                   # log 1, log 2
    >>> params.write({"s": torch.tensor([3.0, 4.0])})   # through exp^{-1}
    >>> params.restore(snap)
    >>> params.constrained(["s"])["s"]
    tensor([1., 2.])
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping

import pyro
import torch
from torch.distributions import transform_to

from pyro_emvae import _compat

__all__ = [
    "Snapshot",
    "constrained",
    "constraint_of",
    "constraints_of",
    "leaf",
    "names",
    "put",
    "restore",
    "snapshot",
    "stamped_snapshot",
    "unconstrained",
    "value",
    "write",
]


def names() -> list[str]:
    """The names of every param in the store, in creation order."""
    return list(pyro.get_param_store().keys())


def constraint_of(name: str):
    """The constraint :math:`c` the param ``name`` was created with."""
    return _compat.param_constraint(name)


def constraints_of(names: Iterable[str]) -> dict:
    """``{name: constraint}`` of the named params that are in the store."""
    store = pyro.get_param_store()
    return {n: _compat.param_constraint(n) for n in names if n in store}


def unconstrained(names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The live unconstrained leaf tensors :math:`u` (not copies: what optimizers step) of the
    named params in the store, or of every param when ``names`` is None."""
    # (the store's own map of them: ``get_param(n).unconstrained()`` would first compute and
    # drop the constrained value, a transform per param, at every snapshot and write)
    leaves = pyro.get_param_store().named_parameters().mapping
    if names is None:
        return dict(leaves)
    return {n: leaves[n] for n in names if n in leaves}


def leaf(name: str) -> torch.Tensor:
    """The live unconstrained leaf tensor :math:`u` of the param ``name`` (not a copy)."""
    return pyro.get_param_store().named_parameters().mapping[name]


def snapshot(names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the unconstrained values :math:`u` of the named params in the store
    (every param when ``names`` is None): what :func:`restore` puts back exactly."""
    # (a clone under no_grad: the same bits as detach().clone(), one op per param where that is
    # two: the loop takes one at every iteration)
    with torch.no_grad():
        return {n: u.clone() for n, u in unconstrained(names).items()}


def stamped_snapshot(names: Iterable[str]) -> tuple[dict, dict]:
    """:func:`snapshot` of the named params, and each leaf with its in-place version at the
    copy (``{name: (u, version)}``): a :class:`Snapshot` made right after, with nothing run
    in between that could write a param behind torch's version counter (a numpy view's
    write does not move it), takes these copies instead of making its own (``taken``)."""
    leaves = unconstrained(names)
    with torch.no_grad():  # (the same clone as snapshot's)
        copies = {n: u.clone() for n, u in leaves.items()}
    return copies, {n: (u, _compat.tensor_version(u)) for n, u in leaves.items()}


def restore(snap: dict[str, torch.Tensor]) -> None:
    """Copy unconstrained values (a :func:`snapshot`) back into the store's tensors, in place.
    Each param must be in the store with the snapshot's shape (``copy_`` broadcasts a smaller
    value; use :func:`put` for a param the model has not created)."""
    leaves = pyro.get_param_store().named_parameters().mapping
    with torch.no_grad():
        for n, v in snap.items():
            leaves[n].copy_(v)


# name -> (weak reference to the leaf u, u's in-place version, constraint, T_c(u) detached): an
# M-step reads each param's constrained value several times (the rollback copy, the
# statistics, the maximizers) between writes, and T_c is several ops (a stick-breaking
# simplex, a lower-Cholesky map); the same u at the same version gives the same bits
_VALUES: dict[str, tuple] = {}


def value(name: str) -> torch.Tensor:
    """The constrained value :math:`\\theta = T_c(u)` of the param ``name``, detached and
    shared between calls (read only, and for an unconstrained param a view of the live leaf:
    clone it to keep or modify it). Computed again when the store's
    leaf :math:`u` is another tensor or was modified in place (its version counter), or the
    constraint changed; otherwise the same tensor as the last call, equal bit for bit to
    ``pyro.get_param_store()[name].detach()``.

    Example::

        >>> from torch.distributions import constraints
        >>> _ = pyro.param("w", torch.tensor([0.25, 0.75]), constraint=constraints.simplex)
        >>> value("w") is value("w")
        True
    """
    u = pyro.get_param_store().named_parameters().mapping[name]
    c = _compat.param_constraint(name)
    version = _compat.tensor_version(u)
    hit = _VALUES.get(name)
    if hit is not None and hit[0]() is u and hit[1] == version and hit[2] is c:
        return hit[3]
    with torch.no_grad():
        # (detached: an unconstrained param's transform is the identity, which returns u)
        theta = transform_to(c)(u).detach()
    try:
        ref = weakref.ref(u)
    except TypeError:  # (not weak-referenceable: no cache)
        return theta
    if len(_VALUES) > 256:  # (names of params long gone: start over)
        _VALUES.clear()
    _VALUES[name] = (ref, version, c, theta)
    return theta


def constrained(names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the constrained values :math:`\\theta = T_c(u)` of the named params
    in the store (every param when ``names`` is None)."""
    store = pyro.get_param_store()
    names = store.keys() if names is None else names
    return {n: value(n).clone() for n in names if n in store}


class Snapshot(Mapping):
    """The constrained values :math:`\theta = T_c(u)` of the named params as they are now,
    each computed when first read: a mapping like :func:`constrained`'s (the same bits), that
    keeps copies of the leaves :math:`u` and their constraints, and no more, until asked.
    ``taken``: a :func:`stamped_snapshot` made just before, whose copy of a leaf is kept
    where the store still holds that leaf at that version (the same bits, one copy fewer);
    the caller vouches that nothing wrote a param behind the version counter in between.
    An M-step keeps one for its rollback and its guard, which read it only when something
    went wrong; a param's transform (a simplex, a Cholesky factor: several ops) is then not
    computed at every step.

    Example::

        >>> from torch.distributions import constraints
        >>> _ = pyro.param("v", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
        >>> snap = Snapshot(["v"])
        >>> write({"v": torch.tensor([5.0, 6.0])})
        >>> snap["v"]
        tensor([1., 2.])
    """

    def __init__(self, names: Iterable[str], taken: tuple | None = None) -> None:
        leaves = pyro.get_param_store().named_parameters().mapping
        if taken is not None:  # (copies made already: see stamped_snapshot)
            copies, stamps = taken
            self._leaves = {}
            for n in names:
                u = leaves.get(n)
                if u is None:
                    continue
                stamp = stamps.get(n)
                if stamp is not None and stamp[0] is u and stamp[1] == _compat.tensor_version(u):
                    self._leaves[n] = copies[n]
                else:
                    with torch.no_grad():
                        self._leaves[n] = u.clone()
        else:
            with torch.no_grad():  # (a copy out of autograd: one op where detach().clone() is two)
                self._leaves = {n: leaves[n].clone() for n in names if n in leaves}
        self._constraint = {n: _compat.param_constraint(n) for n in self._leaves}
        self._values: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        theta = self._values.get(name)
        if theta is None:
            u = self._leaves[name]
            with torch.no_grad():  # (as value() computes it; the identity returns u, a copy)
                theta = transform_to(self._constraint[name])(u).detach()
            self._values[name] = theta
        return theta

    def __iter__(self) -> Iterator[str]:
        return iter(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)


def write(values: dict[str, torch.Tensor]) -> None:
    """Set params to constrained values :math:`\\theta`: :math:`u \\leftarrow T_c^{-1}(\\theta)`,
    in place (an optimizer's state stays attached to the same tensor). Raises
    ``FloatingPointError`` naming the param, before writing it, if :math:`T_c^{-1}(\\theta)` is
    not finite (a value on or outside the constraint's boundary)."""
    leaves = pyro.get_param_store().named_parameters().mapping
    with torch.no_grad():
        for name, value in values.items():
            u = leaves[name]
            new = _inverse(_compat.param_constraint(name))(value)
            # (a finite sum means every element is finite: nan and ±inf propagate through a
            # sum; two ops and one sync where isfinite().all() is six; the exact test runs
            # only when the sum is not finite, which a huge but finite value can also cause)
            # (tolist(): the number without an aten op)
            if not math.isfinite(new.sum().tolist()) and not torch.isfinite(new).all():
                raise FloatingPointError(
                    f"the closed-form update of param '{name}' is not finite: {value}"
                )
            u.copy_(new)


# id(constraint) -> (the constraint, transform_to's factory for it, T_c^{-1}): transform_to makes a new transform (and its
# inverse) at every call, the same map each time; kept per constraint object (held, so that
# its id is not reused), for write, which runs for every closed-form param at every M-step
_INVERSES: dict[int, tuple] = {}


def _inverse(c):
    """:math:`T_c^{-1}`, ``transform_to(c).inv``, made once per constraint object."""
    hit = _INVERSES.get(id(c))
    factory = _compat.transform_factory(c)  # (a new registration for c's type: made again)
    if hit is not None and hit[0] is c and hit[1] is factory:
        return hit[2]
    inv = transform_to(c).inv
    if len(_INVERSES) > 256:  # (constraints long gone: start over)
        _INVERSES.clear()
    _INVERSES[id(c)] = (c, factory, inv)
    return inv


def put(name: str, value: torch.Tensor, constraint) -> None:
    """Create the param ``name`` in the store with the unconstrained value ``value`` exactly
    (as a checkpoint saved it) and ``constraint``; a param already there is left alone."""
    store = pyro.get_param_store()
    if name in store:
        return
    store.setdefault(name, transform_to(constraint)(value), constraint)
    with torch.no_grad():  # T^{-1}(T(u)) need not be u (softmax): keep the saved u itself
        store.get_param(name).unconstrained().copy_(value)
