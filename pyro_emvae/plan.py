"""The plan: what probing the model once found — which param element feeds which site through
which rule (:mod:`pyro_emvae.track`'s ids over one global id space), which params are closed
form and which take gradient steps, and why — cached on what it depends on.

A plan depends on the model's structure, not on the param values: :class:`PlanKey` holds what
it does depend on (the argument objects, their shapes, dtypes, devices and in-place versions,
the param store's names, shapes, dtypes and constraints) and :func:`same_rows` whether a
subsampled plate selects the rows the probe saw, so :meth:`pyro_emvae.EMOptim.plan` probes once
per fit and checks the cached plan in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_emvae import _compat
from pyro_emvae import params as _params
from pyro_emvae._compat import Subsample
from pyro_emvae.track import IdSpace

__all__ = ["Plan", "PlanKey", "same_rows", "subsample_sites"]


@dataclass
class Plan:
    """What the probe found for one set of model args: sites, ids, closed-form params."""

    trace: Any
    space: IdSpace
    closed_form: list[str]
    gradient: list[str]
    reasons: dict[str, str]
    roles: dict[str, str] = field(default_factory=dict)  # what each rule-updated param is
    plain_locs: frozenset = frozenset()  # MVN locs whose rows each meet one covariance
    # structure-only work of the rules' statistics (Stats.memo): made at the first M-step of
    # this plan, reused while the plan is (its trace holds the ids the memo is keyed on)
    memo: dict = field(default_factory=dict, repr=False)
    # where the trace's enumerated dims lie, by the E-step's dim (empty: where the E-step's
    # do): a probe shared with ExactEStep's structure check leaves an unused dim beside each
    dims: dict = field(default_factory=dict)


class PlanKey:
    """What a plan depends on besides the plates' rows: the argument objects themselves (held,
    compared by identity: the probe's trace holds their values, which the statistics read),
    their shapes, dtypes, devices and in-place versions, and the param store's names, shapes,
    dtypes and constraints. Checking it costs microseconds."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.objects = (*args, *(v for _, v in sorted(kwargs.items())))
        self.names = tuple(sorted(kwargs))
        self.meta = tuple(_meta(a) for a in self.objects)
        self.params = tuple(_param_meta(n, v) for n, v in _params.unconstrained().items())

    def holds(self, args: tuple, kwargs: dict) -> bool:
        """``self.matches(PlanKey(args, kwargs))``, without making that key: the same
        comparisons of the same things (the argument objects, their shapes, dtypes, devices
        and versions; the store's param names in order, shapes, dtypes, devices and
        constraints), for the cached plan's check at every M-step."""
        if kwargs or self.names:
            return self.matches(PlanKey(args, kwargs))
        if len(args) != len(self.objects):
            return False
        for a, b, m in zip(args, self.objects, self.meta):
            if a is not b or _meta(a) != m:
                return False
        leaves = _params.unconstrained()
        if len(leaves) != len(self.params):
            return False
        return all(p == _param_meta(n, v) for p, (n, v) in zip(self.params, leaves.items()))

    def matches(self, other: PlanKey) -> bool:
        return (
            len(self.objects) == len(other.objects)
            and self.names == other.names
            and all(a is b for a, b in zip(self.objects, other.objects))
            and self.meta == other.meta
            and self.params == other.params
        )


def _param_meta(name: str, leaf: torch.Tensor) -> tuple:
    """What a plan depends on of one param: its name, shape, dtype, device and constraint."""
    return (name, tuple(leaf.shape), leaf.dtype, leaf.device, id(_params.constraint_of(name)))


def _meta(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.dtype, a.device, _compat.tensor_version(a))
    return ()


def subsample_sites(trace) -> dict:
    """The plate subsample sites of a probe's ``trace`` (what :func:`same_rows` compares)."""
    return {
        n: s
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and isinstance(s["fn"], Subsample)
    }


def same_rows(trace, subsample, probed: dict | None = None) -> bool:
    """Whether ``subsample`` (the E-step's plate subsample sites) selects the same rows as the
    probe's ``trace`` did (no subsample sites: a model without plates). ``probed``:
    ``subsample_sites(trace)``, read before (a plan's trace does not change)."""
    sites = subsample.nodes if subsample is not None else {}
    if probed is None:
        probed = subsample_sites(trace)
    if set(sites) != set(probed):
        return not sites  # (a probe made without the E-step's subsample trace)
    for name, site in sites.items():
        old, new = probed[name]["value"], site["value"]
        if old is not new and not (old.shape == new.shape and torch.equal(old, new)):
            return False
    return True
