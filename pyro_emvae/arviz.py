"""A fitted model as an :class:`arviz.InferenceData`, so that ArviZ's summaries and plots apply.

Groups:

* ``posterior``: draws of the latent sites from q: exact posterior draws for an
  :class:`~pyro_emvae.estep.ExactEStep` guide (forward filtering, backward sampling on
  chains), the guide's draws otherwise; one chain, ``num_samples`` draws.
* ``posterior_predictive``: the observed sites drawn from the model given each posterior draw.
* ``log_likelihood``: per datum, :math:`\\log p_\\theta(x_i)` with the latents summed out, at the
  fitted params: exact for an ExactEStep guide, the IWAE estimate otherwise
  (:func:`~pyro_emvae.evaluate.log_marginal`). The params are point estimates, so the value is
  the same in every draw (``az.loo`` on it is the plain held-in log-likelihood).
* ``observed_data``: the observed sites' values.
* ``fit_history``: the fit's objective and time per iteration (when ``result`` is given).

The model must be run without plate subsampling (the draws are of the whole data set).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro import poutine

from pyro_emvae.amortized import find_data_plate, frames_of, latent_sites, prototype_trace
from pyro_emvae.estep import ExactEStep
from pyro_emvae.evaluate import _no_latents, log_marginal

__all__ = ["to_inference_data"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    result: Any = None,
    num_samples: int = 100,
    log_likelihood_samples: int = 100,
    **kwargs: Any,
):
    """Export a fit (the params in the param store, ``guide`` as the posterior) to ArviZ.

    Args:
        model, guide: the fitted model and its guide; ``args``, ``kwargs`` as for the fit.
        result: the :class:`~pyro_emvae.fit.FitResult`, for the ``fit_history`` group.
        num_samples: posterior (and posterior predictive) draws.
        log_likelihood_samples: importance samples per datum for the IWAE log-likelihood
            (guides other than ExactEStep).

    Returns:
        an ``arviz.InferenceData``; see the module docstring for its groups.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2),
        ...                         infer={"enumerate": "parallel"})
        ...         pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
        >>> idata = to_inference_data(model, ExactEStep(model), torch.randn(20), num_samples=10)
        >>> idata.posterior["z"].shape
        (1, 10, 20)
    """
    import arviz as az
    import xarray as xr

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    tr = prototype_trace(model, args, kwargs)
    frame = find_data_plate(tr)
    if frame is not None and (frame.full_size or frame.size) > frame.size:
        raise ValueError(
            f"plate '{frame.name}' subsamples {frame.size} of {frame.full_size}: export the "
            "model without subsampling (the draws are of the whole data set)"
        )
    observed = {
        name: s["value"]
        for name, s in tr.nodes.items()
        if s["type"] == "sample" and s["is_observed"] and not s["infer"].get("_deterministic")
    }
    latents = [s["name"] for s in latent_sites(tr)]
    with torch.no_grad():
        draws = _posterior_draws(model, guide, latents, num_samples, args, kwargs)
        predictive = _predictive(model, draws, list(observed), num_samples, args, kwargs)
        exact = isinstance(guide, ExactEStep)
        lm = log_marginal(
            model,
            _no_latents if exact else guide,
            *args,
            num_samples=1 if exact else log_likelihood_samples,
            **kwargs,
        )
    dims, coords = _dims(tr, frame)
    per_datum = np.broadcast_to(_numpy(lm.per_datum), (1, num_samples, len(lm.per_datum)))
    obs_name = next(iter(observed)) if len(observed) == 1 else "log_likelihood"
    data_dim = f"{frame.name}_dim" if frame is not None else "datum"
    dims[obs_name + "_datum"] = [data_dim]
    groups = {
        "posterior": {k: _numpy(v)[None] for k, v in draws.items()},
        "posterior_predictive": {k: _numpy(v)[None] for k, v in predictive.items()},
        "log_likelihood": {obs_name + "_datum": per_datum.copy()},
        "observed_data": {k: _numpy(v) for k, v in observed.items()},
    }
    idata = az.from_dict(**groups, dims=dims, coords=coords)
    if result is not None:
        history = {k: np.asarray(v) for k, v in result.history.items()}
        with warnings.catch_warnings():  # a group outside ArviZ's fixed list, on purpose
            warnings.simplefilter("ignore")
            idata.add_groups(
                {"fit_history": xr.Dataset({k: (["iteration"], v) for k, v in history.items()})}
            )
        idata.attrs.update(
            algorithm=result.algorithm,
            converged=int(result.converged),
            n_iter=result.n_iter,
            n_data=result.n_data,
        )
    return idata


def _posterior_draws(model, guide, latents, num_samples, args, kwargs) -> dict:
    """``{site: (S, *shape)}`` draws of the latent sites from q."""
    if isinstance(guide, ExactEStep):
        return dict(guide.sample(*args, num_samples=num_samples, **kwargs))
    out: dict[str, list] = {name: [] for name in latents}
    for _ in range(num_samples):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
        for name in latents:
            out[name].append(mtr.nodes[name]["value"])
    return {k: torch.stack(v) for k, v in out.items()}


def _predictive(model, draws, observed, num_samples, args, kwargs) -> dict:
    """The observed sites drawn from the model given each posterior draw."""
    out: dict[str, list] = {name: [] for name in observed}
    for s in range(num_samples):
        fixed = {k: v[s] for k, v in draws.items()}
        tr = poutine.trace(poutine.uncondition(poutine.condition(model, data=fixed))).get_trace(
            *args, **kwargs
        )
        for name in observed:
            out[name].append(tr.nodes[name]["value"])
    return {k: torch.stack(v) for k, v in out.items()}


def _dims(tr, frame) -> tuple[dict, dict]:
    """ArviZ dims: the data plate's dim named after the plate, wherever a site has it."""
    dims, coords = {}, {}
    if frame is None:
        return dims, coords
    name = f"{frame.name}_dim"
    coords[name] = np.arange(frame.size)
    for site_name, site in tr.nodes.items():
        if site["type"] != "sample" or frame not in frames_of(site):
            continue
        value = site["value"]
        n_dims = value.dim()
        pos = n_dims + frame.dim - site["fn"].event_dim
        if 0 <= pos < n_dims and value.shape[pos] == frame.size:
            dims[site_name] = [name if i == pos else f"{site_name}_dim_{i}" for i in range(n_dims)]
    return dims, coords
