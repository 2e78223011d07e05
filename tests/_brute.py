"""Small random Pyro models with a brute-force log p(x), for the property tests.

A :class:`Spec` describes one model built from the pieces the exact E-step supports: a data
plate (optionally with an inner plate), a local categorical latent per datum or a
``pyro.markov`` chain of them, an optional global latent coupling the data, an optional latent
in the inner plate, ``poutine.mask`` (around the latents and the observation, or around the
observation only), a scalar ``poutine.scale``, ``obs_mask`` on the observation, ``obs_mask`` on
the chain's latents (semi-supervised), and ``.mask()`` on the observation's distribution.

:func:`build_model` turns a spec into a Pyro model; :func:`brute_force` evaluates the same
spec by hand: every joint assignment of every latent of every plate element is listed with
``itertools.product`` and :math:`\\log p(x, z)` is summed factor by factor with
``torch.distributions`` and plain indexing (no Pyro handler, no enumeration, no contraction).
Semantics follow Pyro's ``TraceEnum_ELBO`` (``pyro/infer/traceenum_elbo.py``,
``_compute_model_factors``):

* a masked *observed* factor is dropped; a masked *enumerated* latent keeps its prior factor
  (the enumerated site's ``unscaled_log_prob`` is used unmasked), so masking a latent together
  with its observations leaves a factor that sums to one;
* a common scalar scale multiplies :math:`\\log p(x)`, outside the sum over latents;
* ``obs_mask`` on an observation: missing events are integrated out (their density integrates
  to one), so their factors are dropped whatever values fill them;
* ``obs_mask`` on a latent: observed entries are fixed to their values (their prior factor kept
  unless a ``poutine.mask`` drops it), missing entries are summed over;
* ``.mask(m)`` on a distribution drops that site's factor where ``m`` is False.

:func:`hmm_brute_force` does the same for an observed :class:`~pyro.distributions.DiscreteHMM`
site: a sum over every hidden path, including Pyro's initial state :math:`z_{-1}`.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger

FAMILIES = ("normal", "poisson", "bernoulli", "categorical")
C = 3  # categories of a categorical observation
KW = 2  # values of the inner-plate latent w


@dataclass
class Spec:
    """One random model. Plate-local tensors are laid out ``(T, N)`` or ``(T, N, M)``."""

    N: int  # data plate size
    T: int  # chain length per datum (1: one local latent; > 1: a pyro.markov chain)
    K: int  # values of each z_t
    Kg: int  # values of the global latent g (0: no global latent)
    M: int  # inner plate size (0: no inner plate)
    inner_latent: bool  # a latent w_t (KW values) per inner-plate element, a child of z_t
    family: str  # the observation's family, one of FAMILIES
    mask_kind: str | None  # None, "both" (latents and observation) or "obs"
    mask: torch.Tensor  # (N,) bool, the poutine.mask over the data plate
    scale: float | None  # a scalar poutine.scale around the whole model
    obs_mask: torch.Tensor | None  # (T, N[, M]) bool: obs_mask on each x_t
    dist_mask: torch.Tensor | None  # (T, N[, M]) bool: x_t's distribution .mask()-ed
    z_obs_mask: torch.Tensor | None  # (T, N) bool: obs_mask on each z_t (True = observed)
    z_obs: torch.Tensor  # (T, N) long: the observed values of z (where z_obs_mask)
    x: torch.Tensor  # (T, N[, M]) observations (missing events hold finite junk)
    params: dict[str, tuple[torch.Tensor, object]] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return 2 if self.M else 1

    def obs_shape(self) -> tuple[int, ...]:
        return (self.N, self.M) if self.M else (self.N,)

    def n_assignments(self) -> int:
        per_datum = self.K**self.T * (KW ** (self.T * self.M) if self.inner_latent else 1)
        return max(self.Kg, 1) * per_datum**self.N

    def describe(self) -> str:
        parts = [f"N={self.N}", f"T={self.T}", f"K={self.K}", self.family]
        if self.Kg:
            parts.append(f"global Kg={self.Kg}")
        if self.M:
            parts.append(
                f"inner plate M={self.M}" + (" with latent w" if self.inner_latent else "")
            )
        if self.mask_kind:
            parts.append(f"poutine.mask({self.mask_kind}, {self.mask.int().tolist()})")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.obs_mask is not None:
            parts.append("obs_mask on x")
        if self.dist_mask is not None:
            parts.append(".mask() on x")
        if self.z_obs_mask is not None:
            parts.append(f"obs_mask on z {self.z_obs_mask.int().tolist()}")
        return ", ".join(parts)


# ---------------------------------------------------------------------------- the random spec
def _simplex(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.softmax(1.5 * torch.randn(*shape, generator=g), -1)


def random_spec(seed: int, **choices) -> Spec:
    """A spec whose structural choices are given (keyword args of :class:`Spec`, with ``mask``
    etc. given as booleans saying whether to draw one) and whose numbers are drawn from
    ``seed``: params, data, masks."""
    g = torch.Generator().manual_seed(seed)
    N, T, K, Kg, M = (choices[k] for k in ("N", "T", "K", "Kg", "M"))
    inner_latent, family = choices["inner_latent"], choices["family"]
    plate_shape = (T, N, M) if M else (T, N)

    def bools(shape, p=0.6):
        return torch.rand(shape, generator=g) < p

    Kw = KW if inner_latent else 1
    params: dict[str, tuple[torch.Tensor, object]] = {
        "init": (_simplex(g, max(Kg, 1), K), constraints.simplex),
        "trans": (_simplex(g, K, K), constraints.simplex),
    }
    if Kg:
        params["pg"] = (_simplex(g, Kg), constraints.simplex)
    if inner_latent:
        params["wtab"] = (_simplex(g, K, KW), constraints.simplex)
    # the emission params, with constraints of every kind the M-step rules accept
    if family == "normal":
        params["loc"] = (2.0 * torch.randn(K, Kw, generator=g), constraints.real)
        params["scale"] = (0.6 + torch.rand(K, Kw, generator=g), constraints.greater_than(0.1))
        x = 2.0 * torch.randn(plate_shape, generator=g)
    elif family == "poisson":
        params["rate"] = (0.5 + 4 * torch.rand(K, Kw, generator=g), constraints.interval(0.1, 8.0))
        x = torch.poisson(3 * torch.ones(plate_shape), generator=g)
    elif family == "bernoulli":
        params["p"] = (0.1 + 0.8 * torch.rand(K, Kw, generator=g), constraints.unit_interval)
        x = bools(plate_shape, 0.5).to(torch.get_default_dtype())
    else:
        params["probs"] = (_simplex(g, K, Kw, C), constraints.simplex)
        x = torch.randint(C, plate_shape, generator=g)
    mask = bools((N,))
    obs_mask = bools(plate_shape) if choices.get("obs_mask") else None
    dist_mask = bools(plate_shape) if choices.get("dist_mask") else None
    z_obs_mask = bools((T, N), 0.4) if choices.get("z_obs_mask") else None
    z_obs = torch.randint(K, (T, N), generator=g)
    return Spec(
        N=N,
        T=T,
        K=K,
        Kg=Kg,
        M=M,
        inner_latent=inner_latent,
        family=family,
        mask_kind=choices.get("mask_kind"),
        mask=mask,
        scale=choices.get("scale"),
        obs_mask=obs_mask,
        dist_mask=dist_mask,
        z_obs_mask=z_obs_mask,
        z_obs=z_obs,
        x=x,
        params=params,
    )


def _values(spec: Spec) -> dict[str, torch.Tensor]:
    """The params' constrained values as the param store holds them (registered if new)."""
    return {
        name: pyro.param(name, init.clone(), constraint=c).detach()
        for name, (init, c) in spec.params.items()
    }


def _emission(spec: Spec, v: dict[str, torch.Tensor], z, w):
    """The observation's distribution given (broadcastable) indices z and w."""
    if spec.family == "normal":
        return dist.Normal(v["loc"][z, w], v["scale"][z, w])
    if spec.family == "poisson":
        return dist.Poisson(v["rate"][z, w])
    if spec.family == "bernoulli":
        return dist.Bernoulli(probs=v["p"][z, w])
    return dist.Categorical(probs=v["probs"][z, w])


# ---------------------------------------------------------------------------- the Pyro model
LATENT_PREFIXES = ("g", "z_", "w_")


def _enumerate_latents(msg) -> dict:
    """Parallel enumeration for the spec's latents (z_t_unobserved included: obs_mask does not
    pass ``infer`` on to the sites it creates); never for an observation's imputed part."""
    if (
        msg["type"] == "sample"
        and not msg["is_observed"]
        and msg["name"].startswith(LATENT_PREFIXES)
    ):
        return {"enumerate": "parallel"}
    return {}


def build_model(spec: Spec):
    """The Pyro model of ``spec`` (no arguments; params registered with their constraints)."""
    data_dim = -2 if spec.M else -1
    z_shape = (spec.N, 1) if spec.M else (spec.N,)
    mask = spec.mask.reshape(z_shape)

    def model():
        v = {
            name: pyro.param(name, init.clone(), constraint=c)
            for name, (init, c) in spec.params.items()
        }
        with contextlib.ExitStack() as stack:
            if spec.scale is not None:
                stack.enter_context(poutine.scale(scale=spec.scale))
            g = pyro.sample("g", dist.Categorical(v["pg"])) if spec.Kg else 0
            # one plate object for every time step (a plate created anew per step would add
            # its subsample site to the trace again)
            inner = pyro.plate("inner", spec.M, dim=-1) if spec.M else None
            with pyro.plate("data", spec.N, dim=data_dim):
                z = None
                for t in pyro.markov(range(spec.T)):
                    probs = v["init"][g] if z is None else v["trans"][z]
                    both = spec.mask_kind == "both"
                    with poutine.mask(mask=mask) if both else contextlib.nullcontext():
                        if spec.z_obs_mask is None:
                            z = pyro.sample(f"z_{t}", dist.Categorical(probs))
                        else:
                            z = pyro.sample(
                                f"z_{t}",
                                dist.Categorical(probs),
                                obs=spec.z_obs[t].reshape(z_shape),
                                obs_mask=spec.z_obs_mask[t].reshape(z_shape),
                            )
                        with inner if spec.M else contextlib.nullcontext():
                            w = 0
                            if spec.inner_latent:
                                w = pyro.sample(f"w_{t}", dist.Categorical(v["wtab"][z]))
                            fn = _emission(spec, v, z, w)
                            if spec.dist_mask is not None:
                                fn = fn.mask(spec.dist_mask[t])
                            obs_only = spec.mask_kind == "obs"
                            with poutine.mask(mask=mask) if obs_only else contextlib.nullcontext():
                                pyro.sample(
                                    f"x_{t}",
                                    fn,
                                    obs=spec.x[t],
                                    obs_mask=None if spec.obs_mask is None else spec.obs_mask[t],
                                )

    return poutine.infer_config(model, _enumerate_latents)


class _ZeroWeightImputation(Messenger):
    """An observation's ``obs_mask`` creates a latent ``x_unobserved`` that an empty guide
    cannot propose (a continuous or unenumerated site would be drawn from the prior and its
    log-density would enter the ELBO). Its density integrates to one, so it is made an observed
    site of weight zero: fixed to the observed tensor's (junk) values, fully masked."""

    def __init__(self, fills: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.fills = fills

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.fills:
            msg["value"] = self.fills[msg["name"]]
            msg["is_observed"] = True
            msg["mask"] = False


def pyro_log_p(model, depth: int, fills: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """:math:`\\log p(x)` by Pyro's own ``TraceEnum_ELBO`` with an empty guide (``-loss``);
    ``fills`` names the imputed parts of ``obs_mask`` observations and their fill values."""

    def guide(*a, **k):
        pass

    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=depth)
    with _ZeroWeightImputation(fills or {}), warnings.catch_warnings():
        # a model whose only chain is a DiscreteHMM site enumerates nothing, as intended
        warnings.filterwarnings("ignore", "TraceEnum_ELBO found no sample sites")
        return torch.tensor(-elbo.loss(model, guide))


def spec_fills(spec: Spec) -> dict[str, torch.Tensor]:
    """The ``x_t_unobserved`` sites of ``spec`` and the values that fill them."""
    if spec.obs_mask is None:
        return {}
    return {f"x_{t}_unobserved": spec.x[t] for t in range(spec.T)}


# ---------------------------------------------------------------------------- brute force
@dataclass
class BruteResult:
    log_p: torch.Tensor  # 0-dim, log p(x) (times the scale)
    marginals: dict[str, torch.Tensor]  # site -> (*plate shape, K)


def brute_force(spec: Spec) -> BruteResult:
    """log p(x) and the posterior marginal of every latent, by listing every joint assignment
    of every latent of every plate element (``itertools.product``)."""
    v = _values(spec)
    N, T, K = spec.N, spec.T, spec.K
    Ms = max(spec.M, 1)
    names: list[tuple] = []  # one per variable: ("g",), ("z", t, n) or ("w", t, n, j)
    domains: list[range | list[int]] = []
    if spec.Kg:
        names.append(("g",))
        domains.append(range(spec.Kg))
    for t in range(T):
        for n in range(N):
            observed = spec.z_obs_mask is not None and bool(spec.z_obs_mask[t, n])
            names.append(("z", t, n))
            domains.append([int(spec.z_obs[t, n])] if observed else range(K))
            if spec.inner_latent:
                for j in range(spec.M):
                    names.append(("w", t, n, j))
                    domains.append(range(KW))
    col = {name: i for i, name in enumerate(names)}
    a = torch.tensor(list(itertools.product(*domains)), dtype=torch.long).reshape(-1, len(names))
    G = a[:, col[("g",)]] if spec.Kg else torch.zeros(len(a), dtype=torch.long)
    lj = torch.zeros(len(a))
    if spec.Kg:
        lj = lj + v["pg"].log()[G]
    x = spec.x.reshape(T, N, Ms)
    obs_on = torch.ones(T, N, Ms, dtype=torch.bool)
    if spec.mask_kind is not None:
        obs_on &= spec.mask.reshape(1, N, 1)
    for m in (spec.obs_mask, spec.dist_mask):
        if m is not None:
            obs_on &= m.reshape(T, N, Ms)
    for t in range(T):
        for n in range(N):
            Z = a[:, col[("z", t, n)]]
            prior = (
                v["init"].log()[G, Z] if t == 0 else v["trans"].log()[a[:, col[("z", t - 1, n)]], Z]
            )
            observed = spec.z_obs_mask is not None and bool(spec.z_obs_mask[t, n])
            # an observed z is an observed site: a poutine.mask over it drops its factor; an
            # enumerated z keeps its prior factor under any mask (Pyro's TraceEnum_ELBO)
            if not (observed and spec.mask_kind == "both" and not bool(spec.mask[n])):
                lj = lj + prior
            for j in range(Ms):
                W = a[:, col[("w", t, n, j)]] if spec.inner_latent else 0
                if spec.inner_latent:
                    lj = lj + v["wtab"].log()[Z, W]
                if obs_on[t, n, j]:
                    lj = lj + _emission(spec, v, Z, W).log_prob(x[t, n, j])
    log_px = lj.logsumexp(0)
    post = (lj - log_px).exp()
    marginals: dict[str, torch.Tensor] = {}
    if spec.Kg:
        marginals["g"] = torch.zeros(spec.Kg).index_add(0, G, post)
    for t in range(T):
        zm = torch.stack(
            [torch.zeros(K).index_add(0, a[:, col[("z", t, n)]], post) for n in range(N)]
        )
        marginals[f"z_{t}"] = zm  # (N, K)
        if spec.inner_latent:
            marginals[f"w_{t}"] = torch.stack(
                [
                    torch.stack(
                        [
                            torch.zeros(KW).index_add(0, a[:, col[("w", t, n, j)]], post)
                            for j in range(spec.M)
                        ]
                    )
                    for n in range(N)
                ]
            )  # (N, M, KW)
    scale = 1.0 if spec.scale is None else spec.scale
    return BruteResult(scale * log_px, marginals)


# ---------------------------------------------------------------------------- DiscreteHMM
@dataclass
class HMMSpec:
    N: int  # sequences (a plate)
    T: int  # chain length
    K: int  # hidden states
    family: str
    mask: torch.Tensor | None  # (N,) bool: poutine.mask over the sequences
    scale: float | None
    init_logits: torch.Tensor  # (K,), over Pyro's initial state z_{-1}
    trans_logits: torch.Tensor  # (T, K, K) (time-inhomogeneous) or (K, K)
    emit: dict[str, torch.Tensor]
    x: torch.Tensor  # (N, T)

    def describe(self) -> str:
        parts = [f"N={self.N}", f"T={self.T}", f"K={self.K}", self.family]
        if self.mask is not None:
            parts.append(f"mask={self.mask.int().tolist()}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.trans_logits.dim() == 3:
            parts.append("inhomogeneous")
        return ", ".join(parts)


def random_hmm_spec(seed: int, N, T, K, family, mask, scale, inhomogeneous) -> HMMSpec:
    g = torch.Generator().manual_seed(seed)
    tshape = (T, K, K) if inhomogeneous else (K, K)
    if family == "normal":
        emit = {"loc": 2 * torch.randn(K, generator=g), "scale": 0.5 + torch.rand(K, generator=g)}
        x = 2 * torch.randn(N, T, generator=g)
    elif family == "poisson":
        emit = {"rate": 0.5 + 4 * torch.rand(K, generator=g)}
        x = torch.poisson(3 * torch.ones(N, T), generator=g)
    elif family == "bernoulli":
        emit = {"p": 0.1 + 0.8 * torch.rand(K, generator=g)}
        x = (torch.rand(N, T, generator=g) < 0.5).to(torch.get_default_dtype())
    else:
        emit = {"probs": _simplex(g, K, C)}
        x = torch.randint(C, (N, T), generator=g)
    return HMMSpec(
        N=N,
        T=T,
        K=K,
        family=family,
        mask=(torch.rand(N, generator=g) < 0.6) if mask else None,
        scale=scale,
        init_logits=torch.randn(K, generator=g),
        trans_logits=torch.randn(tshape, generator=g),
        emit=emit,
        x=x,
    )


def _hmm_emission(spec: HMMSpec) -> dist.Distribution:
    """The emission distribution with batch shape (K,) (the state is the rightmost batch dim)."""
    e = spec.emit
    if spec.family == "normal":
        return dist.Normal(e["loc"], e["scale"])
    if spec.family == "poisson":
        return dist.Poisson(e["rate"])
    if spec.family == "bernoulli":
        return dist.Bernoulli(probs=e["p"])
    return dist.Categorical(probs=e["probs"])


def build_hmm_model(spec: HMMSpec):
    def model():
        fn = dist.DiscreteHMM(spec.init_logits, spec.trans_logits, _hmm_emission(spec))
        with contextlib.ExitStack() as stack:
            if spec.scale is not None:
                stack.enter_context(poutine.scale(scale=spec.scale))
            with pyro.plate("seq", spec.N, dim=-1):
                m = (
                    poutine.mask(mask=spec.mask)
                    if spec.mask is not None
                    else contextlib.nullcontext()
                )
                with m:
                    pyro.sample("x", fn, obs=spec.x)

    return model


def hmm_brute_force(spec: HMMSpec) -> BruteResult:
    """log p(x) and the hidden chain's marginals ``(N, T, K)`` by a sum over every path
    ``(z_{-1}, z_0, ..., z_{T-1})`` of each sequence."""
    K, T = spec.K, spec.T
    a = torch.tensor(list(itertools.product(range(K), repeat=T + 1)), dtype=torch.long)
    init = spec.init_logits.log_softmax(-1)
    trans = spec.trans_logits.log_softmax(-1)
    trans = trans if trans.dim() == 3 else trans.expand(T, K, K)
    log_trans = init[a[:, 0]] + sum(trans[t][a[:, t], a[:, t + 1]] for t in range(T))
    emission = _hmm_emission(spec)
    total = torch.zeros(())
    marg = torch.zeros(spec.N, T, K)
    for n in range(spec.N):
        # log p(x_t | z_t) for every state, then picked along each path
        le = torch.stack([emission.log_prob(spec.x[n, t]) for t in range(T)])  # (T, K)
        lj = log_trans + sum(le[t][a[:, t + 1]] for t in range(T))
        lp = lj.logsumexp(0)
        observed = spec.mask is None or bool(spec.mask[n])
        if observed:
            total = total + lp
        else:  # a masked sequence is not observed: its chain's posterior is its prior
            lj = log_trans
            lp = lj.logsumexp(0)
        post = (lj - lp).exp()
        for t in range(T):
            marg[n, t] = torch.zeros(K).index_add(0, a[:, t + 1], post)
    scale = 1.0 if spec.scale is None else spec.scale
    return BruteResult(scale * total, {"x": marg})
