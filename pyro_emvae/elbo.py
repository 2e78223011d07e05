"""The ELBO with its KL term controlled: KL annealing (a weight :math:`\\beta` on the KL, warmed
up from 0 to 1) and free bits (Kingma et al., 2016), two remedies for posterior collapse.

.. math:: \\mathcal L_{\\beta,\\lambda} = \\mathbb E_q[\\log p(x \\mid z)]
          - \\beta \\sum_u \\max\\big(\\lambda,\\ \\mathrm{KL}_u\\big),

where :math:`\\mathrm{KL}_u` is the KL of latent element :math:`u` averaged over the data in
the minibatch (and scaled to the data set). With :math:`\\beta = 1, \\lambda = 0` it is the
ELBO. Units whose KL is below :math:`\\lambda` get no gradient pushing them further towards
the prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_emvae.amortized import _signature, find_data_plate, frames_of, prototype_trace, to_front

__all__ = ["KLControlledELBO", "linear_warmup"]


def linear_warmup(steps: int, start: float = 0.0) -> Callable[[int], float]:
    """A KL weight schedule rising linearly from ``start`` to 1 over ``steps`` SVI steps.

    :math:`\\beta(t) = \\min\\big(1, s + (1 - s)\\, t / T\\big)` at step :math:`t`, with :math:`s` =
    ``start`` and :math:`T` = ``steps``; pass it as ``fit(..., kl_weight=linear_warmup(T))``.

    Example::

        >>> from pyro_emvae import linear_warmup
        >>> beta = linear_warmup(100)
        >>> beta(0), beta(50), beta(100), beta(1000)
        (0.0, 0.5, 1.0, 1.0)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start}")

    def weight(step: int) -> float:
        return min(1.0, start + (1.0 - start) * step / steps)

    return weight


class KLControlledELBO:
    """A Pyro loss, ``loss(model, guide, *args, **kwargs) -> tensor``, for ``SVI`` or
    :func:`~pyro_emvae.fit.fit`: minus the ELBO with KL weight ``kl_weight`` (a number, or a
    schedule ``kl_weight(step) -> float`` such as :func:`linear_warmup`) and ``free_bits``
    :math:`\\lambda` nats per latent element.

    One trace gives both the controlled objective (what is minimized) and the plain ELBO
    estimate, kept in ``last_elbo``. When the model enumerates discrete sites :math:`c`,
    they are summed out exactly per datum (as ``TraceEnum_ELBO`` does) and the KL is taken
    against the marginal prior :math:`p(z) = \\sum_c p(c)\\,p(z \\mid c)`:
    :math:`\\mathrm{KL} = \\mathbb E_q[\\log q(z) - \\log p(z)]`, reconstruction
    :math:`\\mathbb E_q[\\log p(x \\mid z)] = \\mathbb E_q[\\log p(x, z) - \\log p(z)]`. A
    mixture prior has no KL per element, so free bits are refused there. Draws are vectorized
    under a particle plate (the model must broadcast over a leading particle dim).

    Guide sites must be reparameterized (the encoder guides are).

    The controlled objective is :math:`\\mathbb E_q[\\log p(x \\mid z)] - \\beta \\sum_u
    \\max(\\lambda, \\mathrm{KL}_u)`; ``last_elbo`` is the plain ELBO (:math:`\\beta = 1`,
    :math:`\\lambda = 0`).

    Example::

        >>> import math, torch, pyro, pyro.distributions as dist
        >>> from pyro_emvae import KLControlledELBO
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        >>> def guide(x):  # the exact posterior N(x / 2, 1 / 2)
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5).to_event(1))
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> elbo = KLControlledELBO(kl_weight=0.5)
        >>> loss = elbo(model, guide, x)  # -(reconstruction - 0.5 KL): what SVI minimizes
        >>> exact = dist.Normal(0.0, 2 ** 0.5).log_prob(x).sum()  # log p(x)
        >>> math.isclose(elbo.last_elbo, exact.item())  # q exact: the plain ELBO is log p(x)
        True
    """

    def __init__(
        self,
        kl_weight: float | Callable[[int], float] = 1.0,
        free_bits: float = 0.0,
        num_particles: int = 1,
    ):
        if not callable(kl_weight) and not (0.0 <= float(kl_weight) and math.isfinite(kl_weight)):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
        if free_bits < 0 or not math.isfinite(free_bits):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits}")
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        self.kl_weight = kl_weight
        self.free_bits = float(free_bits)
        self.num_particles = num_particles
        self.step = 0
        self.last_elbo: float | None = None
        self.last_kl: float | None = None
        self.beta: float = 1.0
        self._structure: dict = {}  # argument signature -> (enumerates, data plate frame)
        self._setup: dict = {}  # argument signature -> evaluate's plan (enumerated path)

    def _weight(self) -> float:
        beta = self.kl_weight(self.step) if callable(self.kl_weight) else self.kl_weight
        beta = float(beta)
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"kl_weight({self.step}) returned {beta}; it must be finite, >= 0")
        return beta

    def __call__(self, model, guide, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = _signature(args, kwargs)  # plate sizes follow the data: held-out data too
        if key not in self._structure:
            if len(self._structure) >= 16:
                self._structure.pop(next(iter(self._structure)))
            tr = prototype_trace(model, args, kwargs)
            enumerates = any(
                s["type"] == "sample" and s["infer"].get("enumerate") == "parallel"
                for s in tr.nodes.values()
            )
            self._structure[key] = (enumerates, find_data_plate(tr))
        enumerates, frame = self._structure[key]
        self.beta = beta = self._weight()
        self.step += 1
        if enumerates:
            if self.free_bits > 0:
                raise ValueError(
                    "free_bits needs a KL per latent element; this model enumerates discrete "
                    "sites, and a prior that mixes over them (a mixture prior) has none. Use "
                    "kl_weight only."
                )
            return self._enumerated(model, guide, frame, beta, args, kwargs)
        total = 0.0
        elbo_sum = kl_sum = 0.0
        for _ in range(self.num_particles):
            rec, kl, penalty = self._one(model, guide, frame, args, kwargs)
            total = total - (rec - beta * (kl + penalty))
            elbo_sum += float(torch.as_tensor(rec - kl).detach())
            kl_sum += float(torch.as_tensor(kl).detach())
        self.last_elbo = elbo_sum / self.num_particles
        self.last_kl = kl_sum / self.num_particles
        return total / self.num_particles

    def _one(self, model, guide, frame, args, kwargs):
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        guide_tr = prune_subsample_sites(guide_tr)
        model_tr = prune_subsample_sites(model_tr)
        model_tr.compute_log_prob()
        guide_tr.compute_log_prob()
        rec = kl = penalty = 0.0
        for name, site in model_tr.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                rec = rec + site["log_prob_sum"]
            else:
                kl = kl - site["log_prob_sum"]
        for name, site in guide_tr.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"guide site '{name}' is not reparameterized; KLControlledELBO uses "
                    "pathwise gradients only"
                )
            kl = kl + site["log_prob_sum"]
            if self.free_bits > 0:
                penalty = penalty + self._free_bits(site, model_tr.nodes[name], frame)
        return rec, kl, penalty

    def _free_bits(self, q_site, p_site, frame) -> torch.Tensor:
        """:math:`N \\sum_u \\mathrm{relu}(\\lambda - \\overline{\\mathrm{KL}}_u)`, the amount that
        turns :math:`\\sum_u \\mathrm{KL}_u` into :math:`\\sum_u \\max(\\lambda, \\mathrm{KL}_u)`."""
        from pyro_emvae.evaluate import _per_element

        value = q_site["value"]
        _, q_lp = _per_element(q_site["fn"], value)
        _, p_lp = _per_element(p_site["fn"], value)
        if q_lp is None or p_lp is None:
            raise ValueError(
                f"free_bits: site '{q_site['name']}' has no KL per element (its q or prior "
                "does not factor over elements)"
            )
        elem = (q_lp - p_lp).expand(value.shape)
        scale = q_site["scale"]
        if frame is not None and frame in frames_of(q_site):
            per = to_front(elem, frame, q_site["fn"].event_dim).reshape(frame.size, -1)
            kl_u = per.mean(0)  # per datum
            n = frame.size * scale  # the data set's size
        else:
            kl_u, n = elem.reshape(-1), scale
        return n * torch.relu(self.free_bits - kl_u).sum()

    def _enumerated(self, model, guide, frame, beta, args, kwargs) -> torch.Tensor:
        from pyro_emvae.evaluate import _plan, _weights

        key = _signature(args, kwargs)
        if key not in self._setup:
            if len(self._setup) >= 16:
                self._setup.pop(next(iter(self._setup)))
            setup = _plan(model, guide, args, kwargs, None, None)
            setup.fixed = {}  # training: global latents are drawn, their KL counted
            self._setup[key] = setup
        out = _weights(model, guide, args, kwargs, self._setup[key], self.num_particles, None, True)
        for name, site in out.guide_tr.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
                raise ValueError(
                    f"guide site '{name}' is not reparameterized; KLControlledELBO uses "
                    "pathwise gradients only"
                )
        # per-datum terms were summed unscaled: apply the model's and the guide's common
        # scales (the plate's N / B times any poutine.scale), outside the sum over enumerated
        # values as Pyro does
        s_model = _common_scale(out.model_tr, frame, "model")
        s_guide = _common_scale(out.guide_tr, frame, "guide")
        log_pxz, log_pz = out.log_w + out.log_q, out.kl_term + out.log_q
        rec = s_model * (log_pxz - log_pz).sum(-1) + out.global_rec
        kl = (s_guide * out.log_q - s_model * log_pz).sum(-1) + out.global_kl
        self.last_elbo = float((rec - kl).mean().detach())
        self.last_kl = float(kl.mean().detach())
        return -(rec - beta * kl).mean()


def _common_scale(tr, frame, which: str) -> float:
    """The one scale of the ``which`` trace's sites in the data plate (``TraceEnum_ELBO``
    asks the same of the sites an enumerated site touches); sites outside it must not be
    scaled (their terms are added unscaled)."""
    scales, outside = set(), set()
    for name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        value = float(site["scale"])
        if frame is None or frame in frames_of(site):
            scales.add(value)
        elif value != 1.0:
            outside.add(name)
    if len(scales) > 1 or outside:
        raise ValueError(
            f"kl_weight on a model that enumerates needs one common poutine.scale on the "
            f"{which}'s sites in the data plate (found {sorted(scales)}) and none outside it "
            f"(scaled: {sorted(outside)})"
        )
    return scales.pop() if scales else 1.0
