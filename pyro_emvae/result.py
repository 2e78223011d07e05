"""``FitResult``: what :func:`~pyro_emvae.fit.fit` returns (a run's params, objective, history
and how it got there), with the model-selection criteria computed from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyro.distributions as dist
import torch

__all__ = ["FitResult"]


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

    BIC is :math:`-2 \\log p_\\theta(x) + k \\log N`, with :math:`k` the free parameters counted
    from the params' shapes and constraints:

    Example::

        >>> import math, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, fit
        >>> def model(x):
        ...     w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        ...     locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
        >>> x = torch.cat([torch.randn(100) - 3, torch.randn(100) + 3])

        >>> result = fit(model, ExactEStep(model), x, tol=1e-8)
        >>> result.algorithm, result.converged, result.n_data, sorted(result.closed_form)
        ('EM', True, 200, ['locs', 'w'])
        >>> len(result.history["log_likelihood"]) == result.n_iter + 1
        True
        >>> k = 1 + 2  # free parameters: w on the simplex of 2 has 1, locs 2
        >>> math.isclose(result.bic(), -2 * result.log_likelihood + k * math.log(200))
        True
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
        """The final objective, ``log_likelihood`` when exact, else ``elbo``."""
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
