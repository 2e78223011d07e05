"""pyro_emvae: EM, exact E-steps and VAEs on one objective, for Pyro models."""

from pyro_emvae.amortized import AmortizedGuide, MeanFieldGuide
from pyro_emvae.arviz import to_inference_data
from pyro_emvae.elbo import KLControlledELBO, linear_warmup
from pyro_emvae.errors import (
    ClosedFormWarning,
    ConvergenceWarning,
    EnumerationError,
    KMeansFallbackWarning,
    ModelInputError,
    PointEstimateWarning,
    PrecisionWarning,
)
from pyro_emvae.estep import ExactEStep, Posterior
from pyro_emvae.evaluate import (
    AmortizationGap,
    Diagnostics,
    LogMarginal,
    amortization_gap,
    diagnostics,
    log_marginal,
    score,
)
from pyro_emvae.fit import fit
from pyro_emvae.optim import EMOptim, GradientMStep, OnlineEM
from pyro_emvae.result import FitResult
from pyro_emvae.rules import MStepContext, Rule, register_rule
from pyro_emvae.stream import Batches, NpyChunks

__version__ = "0.1.0"

__all__ = [
    "AmortizationGap",
    "AmortizedGuide",
    "Batches",
    "ClosedFormWarning",
    "ConvergenceWarning",
    "Diagnostics",
    "EMOptim",
    "EnumerationError",
    "ExactEStep",
    "FitResult",
    "GradientMStep",
    "KLControlledELBO",
    "KMeansFallbackWarning",
    "LogMarginal",
    "MStepContext",
    "MeanFieldGuide",
    "ModelInputError",
    "NpyChunks",
    "OnlineEM",
    "PointEstimateWarning",
    "Posterior",
    "PrecisionWarning",
    "Rule",
    "__version__",
    "amortization_gap",
    "diagnostics",
    "fit",
    "linear_warmup",
    "log_marginal",
    "register_rule",
    "score",
    "to_inference_data",
]
