"""Hybrid models: an exact discrete latent (summed out by the ELBO, as EM's E-step would) and
an amortized continuous one (the VAE's encoder), on one ELBO.

**Mixture VAE** (a VAE with a Gaussian-mixture prior, as in VaDE, Jiang et al., 2017):

.. math:: c_i \\sim \\mathrm{Categorical}(\\pi), \\qquad
          z_i \\mid c_i \\sim \\mathcal N(\\mu_{c_i}, \\mathrm{diag}\\,\\sigma_{c_i}^2), \\qquad
          x_i \\mid z_i \\sim p\\big(x_i \\mid f_\\theta(z_i)\\big),

with params ``weights`` :math:`\\pi` ``(K,)`` (simplex), ``locs`` :math:`\\mu` ``(K, q)``,
``scales`` :math:`\\sigma` ``(K, q)`` (positive), and the decoder :math:`f_\\theta` of
:mod:`models.vae`. The guide is :math:`q_\\phi(z_i \\mid x_i)` only; ``c`` is marked
``infer={"enumerate": "parallel"}`` so ``TraceEnum_ELBO`` sums it out exactly:

.. math:: \\mathcal L = \\sum_i \\mathbb E_{q_\\phi(z_i|x_i)}\\Big[\\log \\sum_k \\pi_k
          \\mathcal N(z_i; \\mu_k, \\sigma_k^2) + \\log p(x_i \\mid z_i)
          - \\log q_\\phi(z_i \\mid x_i)\\Big].

The cluster of a datum is read off :math:`p(c \\mid z)` at the encoder's mean of z
(:func:`cluster_posterior`): x depends on c only through z, so :math:`p(c \\mid x, z) =
p(c \\mid z)`.

**M2** (Kingma et al., 2014, semi-supervised): a class :math:`y` and a style :math:`z`,

.. math:: y_i \\sim \\mathrm{Categorical}(\\pi), \\qquad z_i \\sim \\mathcal N(0, I_q), \\qquad
          x_i \\mid y_i, z_i \\sim p\\big(x_i \\mid f_\\theta([\\mathrm{onehot}(y_i), z_i])\\big),

where :math:`y_i` is observed for labeled data and summed out for the rest. Here y is
enumerated for every datum (exact, in place of M2's classifier guide :math:`q(y \\mid x)`), and
a labeled datum's label is an exact observation of it, :math:`\\ell_i \\mid y_i \\sim
\\delta_{y_i}`, masked off for unlabeled data: the sum over y then keeps only
:math:`y_i = \\ell_i` for labeled data and all classes for the rest. One data plate holds both
kinds: :class:`~pyro_emvae.amortized.AmortizedGuide` amortizes the local latents of one plate
only (a second plate's latents would get a global point guide), so M2's textbook two plates
("labeled", "unlabeled") are not used. (``pyro.sample(..., obs=y, obs_mask=labeled)`` gives
the same sums, but it drops the site's ``infer=``: its ``y_unobserved`` copy is enumerated
only under ``config_enumerate``, otherwise drawn from the prior. The explicit label site keeps
the enumeration visible in the model.) Without a guide for y there is no classifier to train,
so M2's extra classification loss on the labels has no place here: the labels teach the model
through :math:`p(x \\mid y, z)`, and :func:`m2_classify` reads :math:`p(y \\mid x)` off it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from models.vae import _check, decoder_net, encode_mean, likelihood_dist

__all__ = [
    "cluster_accuracy",
    "cluster_posterior",
    "m2_classify",
    "m2_inputs",
    "make_m2",
    "make_mixture_vae",
    "mixture_log_joint",
]


# ---------------------------------------------------------------------------- mixture VAE
def make_mixture_vae(
    data_dim: int = 64,
    latent_dim: int = 8,
    n_clusters: int = 10,
    hidden: Sequence[int] = (256,),
    likelihood: str = "bernoulli",
    init_spread: float = 1.0,
    seed: int | None = None,
) -> tuple[Callable[..., None], nn.Module]:
    """The mixture VAE's model and decoder: ``(model, decoder)``; ``model(x, batch_size=None)``
    with ``x`` ``(N, data_dim)``.

    The params start at uniform ``weights``, unit ``scales`` and ``locs`` drawn from
    :math:`\\mathcal N(0, \\text{init\\_spread}^2)` (from ``seed`` if given, else the global
    RNG) when the model first runs: spread out, so the clusters differ from the start (equal
    locs would stay equal, every component getting the same gradient).

    >>> model, decoder = make_mixture_vae(data_dim=4, latent_dim=2, n_clusters=3, hidden=(8,))
    >>> decoder(torch.zeros(5, 2)).shape
    torch.Size([5, 4])
    """
    _check(likelihood, latent_dim, data_dim)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    decoder = decoder_net(latent_dim, hidden, data_dim)
    K = n_clusters

    def init_locs(dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return init_spread * torch.randn(K, latent_dim, generator=g, dtype=dtype)

    def model(x: torch.Tensor, batch_size: int | None = None) -> None:
        pyro.module("decoder", decoder)
        weights = pyro.param(
            "weights", lambda: x.new_full((K,), 1.0 / K), constraint=constraints.simplex
        )
        locs = pyro.param("locs", lambda: init_locs(x.dtype))
        scales = pyro.param(
            "scales", lambda: x.new_ones(K, latent_dim), constraint=constraints.positive
        )
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(locs[c], scales[c]).to_event(1))
            pyro.sample("x", likelihood_dist(decoder(z), likelihood), obs=x[idx])

    return model, decoder


def mixture_log_joint(z: torch.Tensor) -> torch.Tensor:
    """:math:`\\log \\pi_k + \\log \\mathcal N(z_i; \\mu_k, \\sigma_k^2)` from the param store:
    ``z`` ``(N, q)`` -> ``(N, K)``.

    Example::

        >>> import torch
        >>> from pyro_emvae import AmortizedGuide
        >>> from models.mixture_vae import make_mixture_vae, mixture_log_joint
        >>> model, decoder = make_mixture_vae(data_dim=4, latent_dim=2, n_clusters=3, hidden=(8,))
        >>> x = torch.bernoulli(torch.full((10, 4), 0.5))
        >>> guide = AmortizedGuide(model, hidden=(8,))
        >>> model(x); _ = guide(x)  # the first calls create the params

        >>> mixture_log_joint(torch.zeros(5, 2)).shape  # (N, q) -> (N, K)
        torch.Size([5, 3])
    """
    store = pyro.get_param_store()
    weights, locs, scales = store["weights"], store["locs"], store["scales"]
    return weights.log() + dist.Normal(locs, scales).to_event(1).log_prob(z.unsqueeze(-2))


def cluster_posterior(guide, x: torch.Tensor) -> torch.Tensor:
    """:math:`p(c_i = k \\mid z_i = \\mathbb E_q[z_i \\mid x_i])` by Bayes with the mixture prior
    (params from the store): ``(N, K)``, rows summing to 1; ``.argmax(-1)`` clusters the data.
    ``x`` may be held-out data of any size.

    Example::

        >>> import torch
        >>> from pyro_emvae import AmortizedGuide
        >>> from models.mixture_vae import make_mixture_vae, cluster_posterior
        >>> model, decoder = make_mixture_vae(data_dim=4, latent_dim=2, n_clusters=3, hidden=(8,))
        >>> x = torch.bernoulli(torch.full((10, 4), 0.5))
        >>> guide = AmortizedGuide(model, hidden=(8,))
        >>> model(x); _ = guide(x)  # the first calls create the params

        >>> p = cluster_posterior(guide, x)
        >>> p.shape, torch.allclose(p.sum(-1), torch.ones(10))
        (torch.Size([10, 3]), True)
    """
    with torch.no_grad():
        return mixture_log_joint(encode_mean(guide, x)).softmax(-1)


def cluster_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Clustering accuracy: the fraction of data whose cluster maps to their label under the best
    one-to-one map of clusters to labels (the Hungarian algorithm on the contingency table,
    ``scipy.optimize.linear_sum_assignment``). Cluster and label ids are any non-negative ints;
    with more clusters than labels the unmatched clusters count as errors.

    >>> cluster_accuracy(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 2]))
    1.0
    """
    from scipy.optimize import linear_sum_assignment

    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    if pred.shape != labels.shape or pred.dim() != 1:
        raise ValueError(
            f"pred and labels must be 1-d of one length, got {pred.shape}, {labels.shape}"
        )
    if len(pred) == 0:
        raise ValueError("no data")
    table = torch.zeros(int(pred.max()) + 1, int(labels.max()) + 1, dtype=torch.long)
    table.index_put_((pred, labels), torch.ones_like(pred), accumulate=True)
    rows, cols = linear_sum_assignment(table.numpy(), maximize=True)
    return float(table[rows, cols].sum()) / len(pred)


# ---------------------------------------------------------------------------- M2
def _cat_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the others (enumerated y has shape
    ``(K, 1, ..., K)``, z ``(..., B, q)``)."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], -1)


def make_m2(
    data_dim: int = 64,
    latent_dim: int = 8,
    n_classes: int = 10,
    hidden: Sequence[int] = (256,),
    likelihood: str = "bernoulli",
) -> tuple[Callable[..., None], nn.Module]:
    """The semi-supervised M2 model and its decoder ``p(x | y, z)``: ``(model, decoder)``.

    ``model(x, y, labeled, batch_size=None)``: ``x`` ``(N, data_dim)``; ``y`` ``(N,)`` the
    labels (any valid class where unlabeled: those entries are never read); ``labeled``
    ``(N,)`` bool. Param ``class_weights`` :math:`\\pi` ``(n_classes,)`` (simplex). The decoder
    maps ``[onehot(y), z]`` ``(..., n_classes + latent_dim)`` to logits. Train it with an
    encoder whose input does not show the placeholder labels of unlabeled data:
    ``AmortizedGuide(model, inputs=m2_inputs(n_classes))`` (the default input would one-hot
    them).

    >>> model, decoder = make_m2(data_dim=4, latent_dim=2, n_classes=3, hidden=(8,))
    >>> decoder(torch.zeros(5, 3 + 2)).shape
    torch.Size([5, 4])
    """
    _check(likelihood, latent_dim, data_dim)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    decoder = decoder_net(n_classes + latent_dim, hidden, data_dim)
    K = n_classes

    def model(
        x: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor, batch_size: int | None = None
    ) -> None:
        pyro.module("decoder", decoder)
        pi = pyro.param(
            "class_weights", lambda: x.new_full((K,), 1.0 / K), constraint=constraints.simplex
        )
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            cls = pyro.sample("y", dist.Categorical(pi), infer={"enumerate": "parallel"})
            # the label observes y exactly: log 1[label = y], 0 or -inf; masked off where
            # unlabeled, so that y is summed over all classes there
            with pyro.poutine.mask(mask=labeled[idx]):
                # logits, not probs: Categorical clamps probs away from 0 (log 0 -> log eps)
                onehot = nn.functional.one_hot(cls, K).bool()
                exact = x.new_zeros(onehot.shape).masked_fill(~onehot, -math.inf)
                pyro.sample("label", dist.Categorical(logits=exact), obs=y[idx])
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            onehot = nn.functional.one_hot(cls, K).to(z.dtype)
            logits = decoder(_cat_last(onehot, z))
            pyro.sample("x", likelihood_dist(logits, likelihood), obs=x[idx])

    return model, decoder


def m2_inputs(n_classes: int) -> Callable[..., torch.Tensor]:
    """The M2 encoder's input, for ``AmortizedGuide(model, inputs=m2_inputs(n_classes))``: a
    function of the model's arguments ``(x, y, labeled, ...)`` giving ``[x, onehot(y)]`` for
    labeled data and ``[x, 0]`` for unlabeled ones, ``(N, data_dim + n_classes)``, so
    :math:`q(z \\mid x, y)` sees a label only where there is one (the guide's default input
    would one-hot the placeholder labels of unlabeled data too).

    Example::

        >>> import torch
        >>> from models.mixture_vae import m2_inputs
        >>> x, y = torch.zeros(3, 2), torch.tensor([0, 2, 0])
        >>> m2_inputs(3)(x, y, torch.tensor([True, True, False]))  # the third is unlabeled
        tensor([[0., 0., 1., 0., 0.],
                [0., 0., 0., 0., 1.],
                [0., 0., 0., 0., 0.]])
    """

    def inputs(x: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor, *args, **kwargs):
        onehot = nn.functional.one_hot(y.long(), n_classes) * labeled.unsqueeze(-1)
        return torch.cat([x, onehot.to(x.dtype)], -1)

    return inputs


def m2_classify(
    decoder: nn.Module,
    guide,
    x: torch.Tensor,
    likelihood: str = "bernoulli",
    num_samples: int = 0,
) -> torch.Tensor:
    """:math:`p(y \\mid x)` under M2 for unlabeled data ``x`` ``(N, data_dim)``: ``(N, K)``.

    * ``num_samples=0``: the enumerated posterior at the encoder's mean
      :math:`\\hat z = \\mathbb E_q[z \\mid x, \\text{no label}]`,
      :math:`p(y \\mid x, \\hat z) \\propto \\pi_y\\, p(x \\mid y, \\hat z)` (fast, biased);
    * ``num_samples=S > 0``: importance sampling with q as proposal,
      :math:`\\hat p(x, y) = \\frac1S \\sum_s \\pi_y p(x \\mid y, z_s) p(z_s) / q(z_s \\mid x)`,
      normalized over y (consistent as S grows; the same draws for every y).

    ``guide`` is the ``AmortizedGuide(model, inputs=m2_inputs(K))`` the model was trained with;
    ``x`` may be held-out data of any size.

    Example::

        >>> import torch
        >>> from pyro_emvae import AmortizedGuide
        >>> from models.mixture_vae import m2_classify, m2_inputs, make_m2
        >>> model, decoder = make_m2(data_dim=4, latent_dim=2, n_classes=3, hidden=(8,))
        >>> x = torch.bernoulli(torch.full((6, 4), 0.5))
        >>> y, labeled = torch.tensor([0, 1, 2, 0, 0, 0]), torch.tensor([True] * 3 + [False] * 3)
        >>> guide = AmortizedGuide(model, inputs=m2_inputs(3), hidden=(8,))
        >>> model(x, y, labeled); _ = guide(x, y, labeled)  # the first calls create the params
        >>> p = m2_classify(decoder, guide, x[3:], num_samples=10)
        >>> p.shape, torch.allclose(p.sum(-1), torch.ones(3))
        (torch.Size([3, 3]), True)
    """
    pi = pyro.param("class_weights").detach()
    K = len(pi)
    n = x.shape[0]
    y0 = torch.zeros(n, dtype=torch.long)
    unlabeled = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        q = guide.encode(torch.arange(n), x, y0, unlabeled)
        loc, scale = q["z"]["loc"], q["z"]["scale"]
        z = loc.unsqueeze(0) if num_samples == 0 else dist.Normal(loc, scale).sample([num_samples])
        ys = torch.eye(K, dtype=x.dtype)  # (K, K): every class for every datum and draw
        inp = _cat_last(ys[:, None, None, :], z.unsqueeze(0))  # (K, S, N, K + q)
        log_px = likelihood_dist(decoder(inp), likelihood).log_prob(x)  # (K, S, N)
        log_w = log_px + pi.log()[:, None, None]
        if num_samples > 0:
            log_w = log_w + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_w = log_w - dist.Normal(loc, scale).log_prob(z).sum(-1)
        log_joint = torch.logsumexp(log_w, 1) - math.log(max(num_samples, 1))  # (K, N)
        return log_joint.T.softmax(-1)
