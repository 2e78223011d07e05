"""Every error and warning class pyro_emvae raises or issues, in one module that imports
nothing of the package: any module can import them without an import circle (validate used
to import ``EnumerationError`` lazily from estep, which imports validate).

Errors are ``ValueError`` subclasses (bad input, found before any work); warnings are
``UserWarning`` subclasses, each silenced on its own::

    >>> import warnings
    >>> from pyro_emvae.errors import ConvergenceWarning
    >>> warnings.filterwarnings("ignore", category=ConvergenceWarning)
"""

from __future__ import annotations

__all__ = [
    "ClosedFormWarning",
    "ConvergenceWarning",
    "EnumerationError",
    "KMeansFallbackWarning",
    "ModelInputError",
    "PointEstimateWarning",
    "PrecisionWarning",
]


class ModelInputError(ValueError):
    """Bad data, shapes or initial params, found before any work; the message names the site or
    param, the shape or value at fault, and what to do."""


class EnumerationError(ValueError):
    """A model site that the exact E-step cannot handle (the message names the site)."""


class PrecisionWarning(UserWarning):
    """The dtype is too coarse for the computation asked (float32 on long chains)."""


class ConvergenceWarning(UserWarning):
    """The fit stopped at ``max_iter`` before the objective changed by less than ``tol``."""


class ClosedFormWarning(UserWarning):
    """A closed-form M-step lowered :math:`\\log p(x)` by more than round-off and what its
    regularization (``reg_covar``, ``min_prob``) may cost: EM never does that, so the rule of
    some param rests on an assumption this model breaks. The message names the params;
    give them gradient steps (``EMOptim(closed_form=[...])`` without them)."""


class KMeansFallbackWarning(UserWarning):
    """``init="kmeans++"`` gave a site random potentials instead (the message says why)."""


class PointEstimateWarning(UserWarning):
    """The exported log-likelihood is at point-estimate params fitted to the data it scores:
    ArviZ's ``loo`` / ``waic`` / ``compare`` on it are in-sample. Issued once per process;
    silence it with ``warnings.filterwarnings("ignore", category=PointEstimateWarning)``."""
