"""pyro_emvae: EM, exact E-steps and VAEs on one objective, for Pyro models."""

from pyro_emvae.estep import EnumerationError, ExactEStep, Posterior
from pyro_emvae.fit import ConvergenceWarning, FitResult, fit
from pyro_emvae.optim import EMOptim, GradientMStep

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "EMOptim",
    "EnumerationError",
    "ExactEStep",
    "FitResult",
    "GradientMStep",
    "Posterior",
    "__version__",
    "fit",
]
