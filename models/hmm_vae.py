r"""HMM-VAE: a discrete Markov chain of states, a continuous latent per step, a decoder network.

For ``N`` independent sequences of length ``T`` (plate ``"sequences"``, ``dim=-1``),

.. math:: z_0 \sim \mathrm{Cat}(\pi), \quad z_t \mid z_{t-1} \sim \mathrm{Cat}(A_{z_{t-1}}),
          \quad u_t \mid z_t \sim \mathcal N(\mu_{z_t}, \mathrm{diag}\,\sigma_{z_t}^2), \quad
          x_t \mid u_t \sim p\big(x_t \mid f_\theta(u_t)\big),

with params ``start`` :math:`\pi` ``(K,)``, ``trans`` :math:`A` ``(K, K)`` (rows simplex),
``locs`` :math:`\mu` ``(K, q)``, ``scales`` :math:`\sigma` ``(K, q)``, the decoder
:math:`f_\theta` (``pyro.module("decoder")``) and, for a Normal likelihood, ``x_scale``
``(D,)``. The guide draws :math:`u_{1:T} \sim q_\phi(u \mid x)` (an amortized encoder,
:class:`StepEncoderGuide`: one network applied to every frame) and leaves the chain to be summed
exactly, so the ELBO is

.. math:: \mathcal L = \mathbb E_{q_\phi(u|x)}\Big[\log \sum_{z_{1:T}} p(z)\prod_t
          p(u_t \mid z_t) + \sum_t \log p(x_t \mid u_t) - \log q_\phi(u \mid x)\Big],

the inner sum over :math:`K^T` paths done by the forward algorithm. The model comes in two
forms with the same ELBO (tested against brute force over all paths):

* ``form="hmm"`` (default, fast): ``u`` is one site ``(N, T, q)`` whose prior is
  ``DiscreteHMM(..., Normal(locs, scales))``: the chain is summed inside its ``log_prob``
  (vectorized over T). ``fit`` climbs it with ``Trace_ELBO`` (nothing to enumerate).
* ``form="markov"``: a ``pyro.markov`` loop with sites ``z_t``
  (``infer={"enumerate": "parallel"}``), ``u_t``, ``x_t``; ``fit`` picks ``TraceEnum_ELBO``,
  which sums the chain by variable elimination. One site per step: for short chains.

Given draws of u, the chain's posterior :math:`p(z_t \mid x, u) = p(z_t \mid u)` (x depends
on z only through u) is exact: :func:`state_marginals` conditions the model on the draws and
runs :class:`~pyro_emvae.ExactEStep`. :func:`kl_decomposition` splits the KL into one part per
latent unit and the chain's part.

Example::

    import pyro
    from models.hmm_vae import StepEncoderGuide, make_hmm_vae, state_marginals
    from pyro_emvae import fit, log_marginal

    model, decoder = make_hmm_vae(n_states=3, latent_dim=2)
    guide = StepEncoderGuide(latent_dim=2)
    result = fit(model, guide, x, optim=pyro.optim.Adam({"lr": 1e-2}), max_iter=500, tol=0)
    gamma = state_marginals(model, guide, x)               # (N, T, K)
    print(log_marginal(model, guide, x, num_samples=100).mean())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from models.hmm import discrete_hmm_logits
from models.vae import decoder_net
from pyro_emvae import ExactEStep

__all__ = [
    "FORMS",
    "StepEncoderGuide",
    "chain_log_prob",
    "digit_sequences",
    "kl_decomposition",
    "make_hmm_vae",
    "match_states",
    "state_marginals",
]

FORMS = ("hmm", "markov")
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "normal")


def _emission(loc: torch.Tensor, likelihood: str, x_scale: torch.Tensor | None):
    """p(x_t | u_t) with the decoder's output ``loc`` (logits or means), pixels as one event."""
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=loc).to_event(1)
    if likelihood == "continuous_bernoulli":
        return dist.ContinuousBernoulli(logits=loc).to_event(1)
    return dist.Normal(loc, x_scale).to_event(1)


def make_hmm_vae(
    n_states: int,
    latent_dim: int = 2,
    data_dim: int = 64,
    hidden: Sequence[int] = (128,),
    likelihood: str = "bernoulli",
    form: str = "hmm",
    init_spread: float = 1.0,
    seed: int | None = None,
) -> tuple[Callable[..., None], nn.Module]:
    """The HMM-VAE's model and decoder: ``(model, decoder)``; ``model(x, batch_size=None)``
    with ``x`` ``(N, T, data_dim)`` (``batch_size`` subsamples sequences).

    ``hidden=()`` makes the decoder linear (with a Normal likelihood: a linear-Gaussian model
    whose ``log p(x)`` is exact, see the tests). Params start at a uniform ``start``, a
    ``trans`` of 0.5 on the diagonal, unit ``scales`` and ``locs`` drawn from
    :math:`\\mathcal N(0, \\text{init\\_spread}^2)` (from ``seed`` if given): spread out, so
    the states differ from the start.

    >>> model, decoder = make_hmm_vae(3, latent_dim=2, data_dim=4, hidden=(8,))
    >>> decoder(torch.zeros(5, 7, 2)).shape
    torch.Size([5, 7, 4])
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if n_states < 1 or latent_dim < 1 or data_dim < 1:
        raise ValueError("n_states, latent_dim and data_dim must be >= 1")
    K = n_states
    decoder = decoder_net(latent_dim, hidden, data_dim)

    def init_locs(dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return init_spread * torch.randn(K, latent_dim, generator=g, dtype=dtype)

    def params(x):
        start = pyro.param(
            "start", lambda: x.new_full((K,), 1.0 / K), constraint=constraints.simplex
        )
        trans = pyro.param(
            "trans",
            lambda: 0.5 * torch.eye(K, dtype=x.dtype) + 0.5 / K,
            constraint=constraints.simplex,
        )
        locs = pyro.param("locs", lambda: init_locs(x.dtype))
        scales = pyro.param(
            "scales", lambda: x.new_ones(K, latent_dim), constraint=constraints.positive
        )
        x_scale = None
        if likelihood == "normal":
            x_scale = pyro.param(
                "x_scale", lambda: x.new_ones(data_dim), constraint=constraints.positive
            )
        return start, trans, locs, scales, x_scale

    def model(x: torch.Tensor, batch_size: int | None = None) -> None:
        pyro.module("decoder", decoder)
        start, trans, locs, scales, x_scale = params(x)
        N, T = x.shape[0], x.shape[1]
        with pyro.plate("sequences", N, subsample_size=batch_size, dim=-1) as idx:
            xb = x[idx]
            if form == "hmm":
                init_logits, trans_logits = discrete_hmm_logits(start, trans, T)
                prior = dist.DiscreteHMM(
                    init_logits, trans_logits, dist.Normal(locs, scales).to_event(1)
                )
                u = pyro.sample("u", prior)
                pyro.sample("x", _emission(decoder(u), likelihood, x_scale).to_event(1), obs=xb)
                return
            z = None
            for t in pyro.markov(range(T)):
                probs = start if z is None else trans[z]
                z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                u = pyro.sample(f"u_{t}", dist.Normal(locs[z], scales[z]).to_event(1))
                pyro.sample(f"x_{t}", _emission(decoder(u), likelihood, x_scale), obs=xb[:, t])

    model.form = form  # read by the helpers below
    return model, decoder


# ---------------------------------------------------------------------------- the guide
class StepEncoderGuide(nn.Module):
    """:math:`q_\\phi(u \\mid x) = \\prod_t \\mathcal N\\big(u_t;\\ m_\\phi(x_t),
    \\mathrm{diag}\\, s_\\phi(x_t)^2\\big)`: one MLP encoder applied to every frame (so it
    learns from all ``N * T`` frames and works for any T). Draws are reparameterized; its sites
    are ``"u"`` (``form="hmm"``) or ``"u_0" .. "u_{T-1}"`` (``form="markov"``), matching
    :func:`make_hmm_vae`. (:class:`~pyro_emvae.AmortizedGuide` also fits the ``"hmm"`` form,
    with one encoder of the whole sequence.)

    >>> guide = StepEncoderGuide(latent_dim=2, data_dim=4, hidden=(8,))
    >>> guide(torch.rand(3, 5, 4))["u"].shape
    torch.Size([3, 5, 2])
    """

    def __init__(
        self,
        latent_dim: int,
        data_dim: int = 64,
        hidden: Sequence[int] = (128,),
        form: str = "hmm",
        init_scale: float = 0.1,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.latent_dim, self.form = latent_dim, form
        self.net = decoder_net(data_dim, hidden, 2 * latent_dim)
        last = self.net[-1]
        with torch.no_grad():  # q starts at scale init_scale for every frame
            last.bias[latent_dim:] = math.log(math.expm1(init_scale))
            last.weight[latent_dim:] = 0.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(..., T, D)`` -> ``(loc, scale)``, each ``(..., T, q)``."""
        out = self.net(x.to(self.net[0].weight.dtype))
        loc, raw = out.split(self.latent_dim, -1)
        return loc, nn.functional.softplus(raw) + 1e-6

    def forward(self, x: torch.Tensor, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        pyro.module("encoder", self)
        with pyro.plate("sequences", x.shape[0], subsample_size=batch_size, dim=-1) as idx:
            loc, scale = self.encode(x[idx])
            if self.form == "hmm":
                return {"u": pyro.sample("u", dist.Normal(loc, scale).to_event(2))}
            return {
                f"u_{t}": pyro.sample(f"u_{t}", dist.Normal(loc[:, t], scale[:, t]).to_event(1))
                for t in range(x.shape[1])
            }


# ---------------------------------------------------------------------------- the chain given u
def _draws(guide, x: torch.Tensor, num_samples: int, mean: bool):
    """``num_samples`` draws of u per sequence, by running the guide on ``x`` repeated:
    ``(x_rep (S*N, T, D), {site: value}, u (S*N, T, q), log q per element (S*N, T, q))``."""
    x_rep = x.repeat(num_samples, *([1] * (x.dim() - 1)))
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(guide).get_trace(x_rep)
    sites = [s for s in tr.nodes.values() if s["type"] == "sample" and not s["is_observed"]]
    sites = [s for s in sites if s["name"] == "u" or s["name"].startswith("u_")]
    if mean:
        values = {s["name"]: s["fn"].mean for s in sites}
    else:
        values = {s["name"]: s["value"] for s in sites}
    if "u" in values:
        u = values["u"]
        base = sites[0]["fn"].base_dist
        log_q = base.log_prob(u)
    else:
        T = x.shape[1]
        u = torch.stack([values[f"u_{t}"] for t in range(T)], 1)
        log_q = torch.stack(
            [tr.nodes[f"u_{t}"]["fn"].base_dist.log_prob(values[f"u_{t}"]) for t in range(T)], 1
        )
    return x_rep, values, u, log_q


def _given_u(model, x_rep, values, T: int) -> torch.Tensor:
    """:math:`p(z_t = k \\mid u)` ``(S*N, T, K)`` by ExactEStep on the model conditioned on u."""
    post = ExactEStep(poutine.condition(model, data=values)).posterior(x_rep)
    if "u" in values:
        return post.marginals["u"]
    return torch.stack([post.marginals[f"z_{t}"].reshape(len(x_rep), -1) for t in range(T)], 1)


def state_marginals(
    model, guide, x: torch.Tensor, num_samples: int = 10, mean: bool = False
) -> torch.Tensor:
    """Posterior state marginals :math:`\\frac1S \\sum_s p(z_t = k \\mid u^{(s)})`,
    :math:`u^{(s)} \\sim q_\\phi(u \\mid x)`: ``(N, T, K)``, rows summing to 1. Each term is
    exact (forward-backward by :class:`~pyro_emvae.ExactEStep` on the model conditioned on the
    draw); the average estimates :math:`p(z_t \\mid x)` as well as q approximates
    :math:`p(u \\mid x)`. ``mean=True`` uses q's mean once in place of draws.

    ``.argmax(-1)`` labels every frame with a state.

    >>> pyro.clear_param_store()
    >>> model, _ = make_hmm_vae(3, latent_dim=2, data_dim=4, hidden=(8,), seed=0)
    >>> guide = StepEncoderGuide(latent_dim=2, data_dim=4, hidden=(8,))
    >>> x = torch.rand(5, 6, 4).round()
    >>> model(x)  # (creates the params)
    >>> g = state_marginals(model, guide, x, num_samples=4)
    >>> g.shape, bool(torch.allclose(g.sum(-1), torch.ones(5, 6)))
    (torch.Size([5, 6, 3]), True)
    """
    S = 1 if mean else num_samples
    N, T = x.shape[0], x.shape[1]
    with torch.no_grad():
        x_rep, values, _, _ = _draws(guide, x, S, mean)
        gamma = _given_u(model, x_rep, values, T)
    return gamma.reshape(S, N, T, -1).mean(0)


def chain_log_prob(u: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(u) = \\log \\sum_z p(z) \\prod_t \\mathcal N(u_t; \\mu_{z_t},
    \\sigma_{z_t}^2)` per sequence, params from the store: ``u`` ``(..., T, q)`` -> ``(...)``.

    >>> pyro.clear_param_store()
    >>> model, _ = make_hmm_vae(3, latent_dim=2, data_dim=4, hidden=(8,), seed=0)
    >>> model(torch.rand(5, 6, 4).round())  # (creates the params)
    >>> chain_log_prob(torch.zeros(5, 6, 2)).shape
    torch.Size([5])
    """
    store = pyro.get_param_store()
    start, trans = store["start"], store["trans"]
    init_logits, trans_logits = discrete_hmm_logits(start, trans, u.shape[-2])
    emit = dist.Normal(store["locs"], store["scales"]).to_event(1)
    return dist.DiscreteHMM(init_logits, trans_logits, emit).log_prob(u)


def kl_decomposition(model, guide, x: torch.Tensor, num_samples: int = 10) -> dict:
    """The KL of the ELBO split into one part per latent unit and the chain's part.

    With :math:`r(u, z) = q(u \\mid x)\\, p(z \\mid u)` (the draws of u, the exact chain given
    them), :math:`\\mathrm{KL}(r \\,\\|\\, p(u, z)) = \\mathrm{KL}(q(u|x) \\,\\|\\, p(u))`, and it
    splits exactly as

    .. math:: \\mathrm{KL} = \\sum_{t,d} \\underbrace{\\mathbb E_r[\\log q(u_{td}) -
              \\log \\mathcal N(u_{td}; \\mu_{z_t d}, \\sigma_{z_t d}^2)]}_{\\text{unit } d
              \\text{ at step } t} + \\underbrace{\\mathbb E_q\\,
              \\mathrm{KL}(p(z \\mid u) \\,\\|\\, p(z))}_{\\text{chain}} .

    A unit whose part hugs zero carries no information about x (posterior collapse); the chain
    part is the information the states carry. Monte Carlo over ``num_samples`` draws per
    sequence; nats per sequence, averaged over the data.

    Returns:
        ``{"per_dim": (q,) summed over steps, "per_step_dim": (T, q), "chain": float,
        "total": float}``; ``per_dim.sum() + chain == total``.

    Example:
        >>> pyro.clear_param_store()
        >>> model, _ = make_hmm_vae(3, latent_dim=2, data_dim=4, hidden=(8,), seed=0)
        >>> guide = StepEncoderGuide(latent_dim=2, data_dim=4, hidden=(8,))
        >>> x = torch.rand(5, 6, 4).round()
        >>> model(x)  # (creates the params)
        >>> kl = kl_decomposition(model, guide, x, num_samples=3)
        >>> kl["per_dim"].shape, abs(float(kl["per_dim"].sum()) + kl["chain"] - kl["total"]) < 1e-9
        (torch.Size([2]), True)
    """
    store = pyro.get_param_store()
    T = x.shape[1]
    with torch.no_grad():
        x_rep, values, u, log_q = _draws(guide, x, num_samples, False)
        gamma = _given_u(model, x_rep, values, T)  # (S*N, T, K)
        # log N(u_td; mu_kd, s_kd): (S*N, T, K, q)
        log_p = dist.Normal(store["locs"], store["scales"]).log_prob(u.unsqueeze(-2))
        unit = log_q - (gamma.unsqueeze(-1) * log_p).sum(-2)  # (S*N, T, q)
        total = log_q.sum((-2, -1)) - chain_log_prob(u)
        per_step_dim = unit.mean(0)
        chain = total - unit.sum((-2, -1))
    return {
        "per_dim": per_step_dim.sum(0),
        "per_step_dim": per_step_dim,
        "chain": float(chain.mean()),
        "total": float(total.mean()),
    }


# ---------------------------------------------------------------------------- data, matching
def digit_sequences(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    trans: torch.Tensor,
    n_seqs: int,
    T: int,
    start: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of real images whose classes follow a Markov chain: the state chain
    :math:`s_0 \\sim` ``start`` (default uniform), :math:`s_t \\sim` ``trans[s_{t-1}]`` over
    ``len(classes)`` states, and frame t a random image (with replacement) of digit
    ``classes[s_t]`` from ``images`` ``(M, D)`` with ``labels`` ``(M,)``.

    Returns ``(x (n_seqs, T, D), states (n_seqs, T))``.

    >>> imgs, labs = torch.rand(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> x, s = digit_sequences(imgs, labs, [0, 1], torch.eye(2), n_seqs=2, T=3)
    >>> x.shape, bool((s[:, 1:] == s[:, :1]).all())
    (torch.Size([2, 3, 4]), True)
    """
    g = torch.Generator().manual_seed(seed)
    K = len(classes)
    trans = torch.as_tensor(trans, dtype=torch.float64)
    start = torch.full((K,), 1.0 / K, dtype=torch.float64) if start is None else start.double()
    states = torch.empty(n_seqs, T, dtype=torch.long)
    states[:, 0] = torch.multinomial(start, n_seqs, replacement=True, generator=g)
    for t in range(1, T):
        states[:, t] = torch.multinomial(trans[states[:, t - 1]], 1, generator=g).squeeze(-1)
    pools = [torch.nonzero(labels == c).squeeze(-1) for c in classes]
    if any(len(p) == 0 for p in pools):
        raise ValueError(f"no image of some class in {list(classes)}")
    x = images.new_empty(n_seqs, T, images.shape[-1])
    for k, pool in enumerate(pools):
        where = states == k
        pick = torch.randint(len(pool), (int(where.sum()),), generator=g)
        x[where] = images[pool[pick]]
    return x, states


def match_states(pred: torch.Tensor, truth: torch.Tensor, K: int) -> torch.Tensor:
    """The one-to-one map of fitted states to true states that maximizes their co-occurrence
    (Hungarian algorithm on the ``(K, K)`` table): ``perm`` with ``perm[k]`` the true state
    matched to fitted state ``k``. Then ``perm[pred]`` relabels predictions, and the fitted
    transition matrix in the true states' order is ``A_hat[inv][:, inv]`` with
    ``inv = perm.argsort()``.

    >>> match_states(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]), 2).tolist()
    [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    table = torch.zeros(K, K, dtype=torch.long)
    table.index_put_(
        (pred.reshape(-1), truth.reshape(-1)), torch.ones_like(pred.reshape(-1)), accumulate=True
    )
    rows, cols = linear_sum_assignment(table.numpy(), maximize=True)
    perm = torch.empty(K, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm
