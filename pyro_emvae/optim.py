"""M-steps: how parameters move once the E-step has fixed q.

An M-step is any callable ``mstep(guide, posterior, args, kwargs) -> dict`` that updates the
params in Pyro's param store in place, given the exact posterior ``posterior`` computed by
``guide`` (an :class:`~pyro_emvae.estep.ExactEStep`) at the current params, and returns a dict of
diagnostics. :func:`~pyro_emvae.fit.fit` alternates E-steps with it. An M-step with the class
attribute ``needs_param_grads = True`` receives ``posterior.param_grads`` (the gradient of
:math:`\\log p_\theta(x)`, computed in the E-step's backward pass at no extra model pass).
"""

from __future__ import annotations

from typing import Any

import pyro
from pyro.optim import PyroOptim

from pyro_emvae.estep import ExactEStep, Posterior

__all__ = ["GradientMStep"]


class GradientMStep:
    """Generalized EM with a gradient M-step (EG / GEM): ``steps`` optimizer steps on

    .. math::

        Q(\\theta) = \\mathbb{E}_{q}[\\log p_\\theta(x, z)], \\qquad q = p_{\\theta_{old}}(z \\mid x)

    with q held at the E-step's exact posterior. The first step uses the gradient the E-step
    already computed (by Fisher's identity :math:`\\nabla Q(\\theta_{old}) =
    \\nabla \\log p_{\\theta_{old}}(x)`), so ``steps=1`` costs one model pass per iteration; each
    further step re-evaluates Q by one more model pass.

    Args:
        optim: a Pyro optimizer (e.g. ``pyro.optim.Adam({"lr": 0.05})``). Its per-param state
            persists across iterations, as in SVI.
        steps: optimizer steps per E-step.

    Example::

        >>> import pyro
        >>> mstep = GradientMStep(pyro.optim.Adam({"lr": 0.05}), steps=5)
    """

    def __init__(self, optim: PyroOptim, steps: int = 1) -> None:
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim optimizer such as pyro.optim.Adam({{'lr': 0.01}}), "
                f"got {type(optim).__name__}"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.optim = optim
        self.steps = steps

    needs_param_grads = True

    def __call__(
        self, guide: ExactEStep, posterior: Posterior, args: tuple, kwargs: dict
    ) -> dict[str, Any]:
        store = pyro.get_param_store()
        if posterior.param_grads is None:
            raise ValueError("GradientMStep needs posterior(..., param_grads=True)")
        params = {n: store.get_param(n).unconstrained() for n in posterior.param_grads}
        for name, p in params.items():
            p.grad = -posterior.param_grads[name].detach().clone()
        self.optim(params.values())
        pyro.infer.util.zero_grads(set(params.values()))
        q_value = None
        for _ in range(self.steps - 1):
            with pyro.poutine.trace(param_only=True) as capture:
                q = guide.expected_log_joint(posterior, *args, **kwargs)
            moved = {s["value"].unconstrained() for s in capture.trace.nodes.values()}
            (-q).backward()
            self.optim(moved)
            pyro.infer.util.zero_grads(moved)
            q_value = float(q.detach())
        info: dict[str, Any] = {"gradient": sorted(params)}
        if q_value is not None:
            info["expected_log_joint"] = q_value
        return info

    def __repr__(self) -> str:
        return f"GradientMStep({type(self.optim).__name__}, steps={self.steps})"
