"""A fitted model as an :class:`arviz.InferenceData`, so that ArviZ's summaries and plots apply.

Groups:

* ``posterior``: draws of the latent sites from q: exact posterior draws for an
  :class:`~pyro_emvae.estep.ExactEStep` guide (forward filtering, backward sampling on
  chains), the guide's draws otherwise; one chain, ``num_samples`` draws. The hidden chain of
  an observed :class:`~pyro.distributions.DiscreteHMM` site ``x`` is the variable
  ``x_states`` (``(*sequences, T)``; exact FFBS draws given the other latents' draws), on
  the time dim ``x_time`` it shares with ``x``.
* ``posterior_predictive``: the observed sites drawn from the model given each posterior
  draw (a DiscreteHMM site: each step's emission given the drawn hidden state).
* ``log_likelihood``: per datum, :math:`\\log p_{\\hat\\theta}(x_i)` with the latents summed
  out, at the fitted params: exact for an ExactEStep guide, the IWAE estimate otherwise
  (:func:`~pyro_emvae.evaluate.log_marginal`). A datum is one entry of the data plate; a
  DiscreteHMM sequence is one datum (the chain couples its steps, so there is no per-step
  :math:`\\log p(x_t)`), and a model without a data plate is one datum. See
  :func:`to_inference_data` on why ``az.loo`` / ``az.waic`` / ``az.compare`` on it are
  in-sample.
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
from pyro.distributions import DiscreteHMM
from pyro.poutine.messenger import Messenger

from pyro_emvae import _compat
from pyro_emvae.amortized import find_data_plate, frames_of, latent_sites, prototype_trace
from pyro_emvae.errors import PointEstimateWarning
from pyro_emvae.estep import ExactEStep, _hmm_parts, _hmm_sample
from pyro_emvae.evaluate import _no_latents, log_marginal

__all__ = ["IN_SAMPLE_NOTE", "PointEstimateWarning", "to_inference_data"]

#: The note on the ``log_likelihood`` group (its ``attrs["note"]``) and in the warning.
IN_SAMPLE_NOTE = (
    "log p(x_i) at point-estimate params fitted to these data, the same in every draw: "
    "az.loo / az.waic / az.compare on it are in-sample (p_loo = p_waic = 0, every Pareto k inf) "
    "and favour the bigger model. Compare models by score() on held-out data or by "
    "FitResult.bic()."
)


_warned = False  # the warning is shown once per process: every export carries the note anyway


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

    The ``log_likelihood`` group is :math:`\\log p_{\\hat\\theta}(x_i)` per datum at the fitted
    params :math:`\\hat\\theta` (a point estimate, repeated in every draw), not at draws of a
    posterior over :math:`\\theta`. On the data the params were fitted to it is **in-sample**:
    ``az.loo`` and ``az.waic`` find no effective parameters (``p_loo = 0``), flag every Pareto
    k, and ``az.compare`` prefers the model with more components where BIC does not. Compare
    models by :func:`~pyro_emvae.evaluate.score` on held-out data or by
    :meth:`FitResult.bic() <pyro_emvae.fit.FitResult.bic>`. The group's ``attrs`` say so
    (``in_sample=1``, ``note``, ``method``, ``datum``), and the first export of a process
    issues a :class:`PointEstimateWarning`.

    Unit of a datum: one entry of the data plate (a data point of a mixture); for an observed
    :class:`~pyro.distributions.DiscreteHMM` site, one **sequence**: the hidden chain couples
    the steps, so :math:`\\log p(x_{1:T})` does not split into per-step terms. A model without
    a data plate (one DiscreteHMM sequence) has a single datum. The values sum to the exact
    :math:`\\log p(x)` for an ExactEStep guide.

    Args:
        model, guide: the fitted model and its guide; ``args``, ``kwargs`` as for the fit.
        result: the :class:`~pyro_emvae.fit.FitResult`, for the ``fit_history`` group.
        num_samples: posterior (and posterior predictive) draws.
        log_likelihood_samples: importance samples per datum for the IWAE log-likelihood
            (guides other than ExactEStep).

    Returns:
        an ``arviz.InferenceData``; see the module docstring for its groups. For a
        DiscreteHMM site ``x`` of ``N`` sequences of length ``T``: ``posterior["x_states"]``
        ``(1, num_samples, N, T)``, ``posterior_predictive["x"]`` and ``observed_data["x"]``
        shaped as ``x``, ``log_likelihood["x_datum"]`` ``(1, num_samples, N)``.

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
        >>> idata.log_likelihood.attrs["in_sample"]
        1
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
        if s["type"] == "sample" and s["is_observed"] and not _compat.is_deterministic(s)
    }
    chains = [n for n in observed if isinstance(tr.nodes[n]["fn"], DiscreteHMM)]
    taken = set(tr.nodes)
    states = {}  # DiscreteHMM site -> the posterior variable of its hidden chain
    for name in chains:
        states[name] = f"{name}_states"
        while states[name] in taken:
            states[name] += "_"
        taken.add(states[name])
    latents = [s["name"] for s in latent_sites(tr)]
    exact = isinstance(guide, ExactEStep)
    with torch.no_grad():
        draws = _posterior_draws(model, guide, latents, chains, num_samples, args, kwargs)
        predictive = _predictive(model, draws, list(observed), chains, num_samples, args, kwargs)
        lm = log_marginal(
            model,
            _no_latents if exact else guide,
            *args,
            num_samples=1 if exact else log_likelihood_samples,
            **kwargs,
        )
    draws = {states.get(k, k): v for k, v in draws.items()}
    dims, coords = _dims(tr, frame, states)
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
    unit = f"one entry of plate '{frame.name}'" if frame is not None else "the whole data set"
    if chains:
        unit += f" (a DiscreteHMM sequence of {', '.join(repr(c) for c in chains)} is one datum)"
    idata.log_likelihood.attrs.update(
        estimate="point",
        in_sample=1,
        method="exact" if exact else f"IWAE, {log_likelihood_samples} samples per datum",
        datum=unit,
        note=IN_SAMPLE_NOTE,
    )
    _warn_in_sample()
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


def _warn_in_sample() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"to_inference_data: {IN_SAMPLE_NOTE} (Shown once per process; every export's "
        "log_likelihood.attrs['note'] says it too.)",
        PointEstimateWarning,
        stacklevel=3,
    )


def _posterior_draws(model, guide, latents, chains, num_samples, args, kwargs) -> dict:
    """``{site: (S, *shape)}`` draws of the latent sites from q, and of the hidden chain of each
    DiscreteHMM site in ``chains`` (``(S, *batch, T)``, under the site's name): exact FFBS
    given the other latents' draw."""
    if isinstance(guide, ExactEStep):
        return dict(guide.sample(*args, num_samples=num_samples, **kwargs))
    out: dict[str, list] = {name: [] for name in latents + chains}
    for _ in range(num_samples):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
        for name in latents:
            out[name].append(mtr.nodes[name]["value"])
        for name in chains:
            site = mtr.nodes[name]
            init, m = _hmm_parts(site["fn"], site["value"], mask=site["mask"])
            out[name].append(_hmm_sample(ExactEStep._hmm_pairwise(init, m), 1)[0])
    return {k: torch.stack(v) for k, v in out.items()}


class _Replicate(Messenger):
    """Draws every observed site afresh from the model (``poutine.uncondition`` for the sites
    that were observed, and only those: it sits inside the ``condition`` that fixes the
    latents to a posterior draw). A DiscreteHMM site draws each step's emission given its
    hidden chain's draw ``states[name]`` ``(*batch, T)``."""

    def __init__(self, states: dict[str, torch.Tensor]):
        super().__init__()
        self.states = states

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] or _compat.is_deterministic(msg):
            return
        msg["is_observed"] = False
        msg["infer"]["was_observed"] = True
        msg["infer"]["obs"] = msg["value"]
        msg["done"] = False
        fn = msg["fn"]
        msg["value"] = _emit(fn, self.states[msg["name"]]) if isinstance(fn, DiscreteHMM) else None


def _emit(fn: DiscreteHMM, states: torch.Tensor) -> torch.Tensor:
    """``x_t ~ observation_dist[z_t]`` for every step: ``(*batch, T, *event)``."""
    obs = fn.observation_dist
    lead = states.shape
    draw = obs.expand(lead + obs.batch_shape[-1:]).sample()  # (*batch, T, K, *event)
    event = obs.event_shape
    index = states.reshape(lead + (1,) * (1 + len(event))).expand(lead + (1,) + event)
    return draw.gather(len(lead), index).squeeze(len(lead))


def _predictive(model, draws, observed, chains, num_samples, args, kwargs) -> dict:
    """The observed sites drawn from the model given each posterior draw."""
    out: dict[str, list] = {name: [] for name in observed}
    for s in range(num_samples):
        fixed = {k: v[s] for k, v in draws.items() if k not in chains}
        replicate = _Replicate({k: draws[k][s] for k in chains})
        tr = poutine.trace(poutine.condition(replicate(model), data=fixed)).get_trace(
            *args, **kwargs
        )
        for name in observed:
            out[name].append(tr.nodes[name]["value"])
    return {k: torch.stack(v) for k, v in out.items()}


def _dims(tr, frame, states: dict[str, str]) -> tuple[dict, dict]:
    """ArviZ dims: the data plate's dim named after the plate, wherever a site has it; the
    time dim of a DiscreteHMM site ``x`` named ``x_time``, shared by ``x`` and the variable of
    its hidden chain (``states[x]``)."""
    dims, coords = {}, {}
    plate = f"{frame.name}_dim" if frame is not None else None
    if frame is not None:
        coords[plate] = np.arange(frame.size)
    for site_name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        value, fn = site["value"], site["fn"]
        n_dims = value.dim()
        names = [f"{site_name}_dim_{i}" for i in range(n_dims)]
        named = False
        if frame is not None and frame in frames_of(site):
            pos = n_dims + frame.dim - fn.event_dim
            if 0 <= pos < n_dims and value.shape[pos] == frame.size:
                names[pos] = plate
                named = True
        if site_name in states:
            time = n_dims - fn.event_dim  # DiscreteHMM: the first event dim is time
            names[time] = f"{site_name}_time"
            dims[states[site_name]] = names[: time + 1]
            named = True
        if named:
            dims[site_name] = names
    return dims, coords
