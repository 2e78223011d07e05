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
    param, the shape or value at fault, and what to do.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, ModelInputError
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2),
        ...                         infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)
        >>> try:
        ...     ExactEStep(model).log_likelihood(torch.tensor([0.5, float("nan")]))
        ... except ModelInputError as e:
        ...     print(str(e)[:60])
        observed site 'x' (Normal): its value of shape (2,) has 1 ...
    """


class EnumerationError(ValueError):
    """A model site that the exact E-step cannot handle (the message names the site).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import EnumerationError, ExactEStep
        >>> def model(x):  # a continuous latent: not for the exact E-step
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        >>> try:
        ...     ExactEStep(model).log_likelihood(torch.zeros(3))
        ... except EnumerationError as e:
        ...     print(str(e)[:50])
        site 'mu' (Normal) is a continuous latent variable
    """


class PrecisionWarning(UserWarning):
    """The dtype is too coarse for the computation asked (float32 on long chains).

    Example::

        A Gaussian HMM of 20,000 steps (about 28,000 nats): float64 is quiet, float32 warns.

        >>> import warnings, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, PrecisionWarning
        >>> def hmm(x):
        ...     logits = torch.full((2, 2), 0.5, dtype=x.dtype).log()  # in x's dtype
        ...     obs = dist.Normal(torch.tensor([-1.0, 1.0], dtype=x.dtype), 1.0)
        ...     pyro.sample("x", dist.DiscreteHMM(logits[0], logits, obs), obs=x)
        >>> x = torch.randn(20000, dtype=torch.float32)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = ExactEStep(hmm).log_likelihood(x.double())
        ...     quiet = not any(w.category is PrecisionWarning for w in caught)
        ...     _ = ExactEStep(hmm).log_likelihood(x)
        >>> quiet, any(w.category is PrecisionWarning for w in caught)
        (True, True)
    """


class ConvergenceWarning(UserWarning):
    """The fit stopped at ``max_iter`` before the objective changed by less than ``tol``.

    Example::

        >>> import warnings, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, fit
        >>> def model(x):
        ...     w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        ...     locs = pyro.param("locs", torch.tensor([-0.1, 0.1]))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
        >>> x = torch.cat([torch.randn(50) - 3, torch.randn(50) + 3])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     result = fit(model, ExactEStep(model), x, max_iter=2)
        >>> result.converged, [w.category.__name__ for w in caught]
        (False, ['ConvergenceWarning'])
    """


class ClosedFormWarning(UserWarning):
    """A closed-form M-step lowered :math:`\\log p(x)` by more than round-off and what its
    regularization (``reg_covar``, ``min_prob``) may cost: EM never does that, so the rule of
    some param rests on an assumption this model breaks. The message names the params;
    give them gradient steps (``EMOptim(closed_form=[...])`` without them).

    Example::

        It is a ``UserWarning`` of its own: make it an error while checking a new
        :class:`~pyro_emvae.Rule`, so a rule that does not maximize stops the fit.

        >>> import warnings
        >>> from pyro_emvae import ClosedFormWarning
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", category=ClosedFormWarning)
        ...     issubclass(ClosedFormWarning, UserWarning)
        True
    """


class KMeansFallbackWarning(UserWarning):
    """``init="kmeans++"`` gave a site random potentials instead (the message says why).

    Example::

        Here ``x`` depends on two enumerated latents, ``a`` and ``b``:

        >>> import warnings, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import ExactEStep, fit
        >>> def model(x):
        ...     locs = pyro.param("ab", torch.tensor([[-1.0, 1.0], [-0.5, 0.5]]))
        ...     with pyro.plate("data", len(x)):
        ...         a = pyro.sample("a", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        ...         b = pyro.sample("b", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        ...         loc = locs[0, a.long()] + locs[1, b.long()]
        ...         pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = fit(model, ExactEStep(model), torch.randn(40), init="kmeans++", max_iter=1)
        >>> "KMeansFallbackWarning" in [w.category.__name__ for w in caught]
        True
    """


class PointEstimateWarning(UserWarning):
    """The exported log-likelihood is at point-estimate params fitted to the data it scores:
    ArviZ's ``loo`` / ``waic`` / ``compare`` on it are in-sample. Issued once per process;
    silence it with ``warnings.filterwarnings("ignore", category=PointEstimateWarning)``.

    Example::

        >>> import warnings
        >>> from pyro_emvae import PointEstimateWarning
        >>> with warnings.catch_warnings():  # or for the whole session, without the ``with``
        ...     warnings.filterwarnings("ignore", category=PointEstimateWarning)
        ...     # idata = to_inference_data(model, guide, x, result=result): no warning
    """
