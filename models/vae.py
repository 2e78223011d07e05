"""A variational autoencoder on scikit-learn's 8x8 digits (Kingma & Welling, 2014).

.. math:: z_i \\sim \\mathcal N(0, I_q), \\qquad
          x_i \\mid z_i \\sim \\prod_{j=1}^{d} p(x_{ij} \\mid \\lambda_{ij}), \\qquad
          \\lambda_i = f_\\theta(z_i),

where :math:`f_\\theta` (the *decoder*, an MLP ``q -> hidden -> d``) gives one logit
:math:`\\lambda_{ij}` per pixel and the pixel likelihood is

* ``"bernoulli"``: :math:`\\mathrm{Bernoulli}(\\sigma(\\lambda_j))`, for binary pixels
  (:func:`load_digits` with ``binarize=True``: Pyro's validation refuses grey levels);
* ``"continuous_bernoulli"``: :math:`\\mathcal{CB}(\\sigma(\\lambda_j))` (Loaiza-Ganem &
  Cunningham, 2019), a normalized density on :math:`[0, 1]` for grey levels. Its mean is not
  :math:`\\sigma(\\lambda)`: :func:`pixel_means` gives the right one.

The model registers the decoder (``pyro.module("decoder", ...)``) and has one local latent
``"z"`` in ``pyro.plate("data", N)``, so :class:`~pyro_emvae.amortized.AmortizedGuide` builds
the encoder :math:`q_\\phi(z_i \\mid x_i)` from it, and :func:`~pyro_emvae.fit` climbs the ELBO
by SVI. The model broadcasts over extra leading dims of ``z`` (an IWAE particle dim), as
:func:`~pyro_emvae.evaluate.log_marginal` needs.

Example::

    import pyro
    from models.vae import load_digits, make_vae
    from pyro_emvae import AmortizedGuide, fit, log_marginal

    x = load_digits(binarize=True)                      # (1797, 64) in {0, 1}
    model, decoder = make_vae(latent_dim=8)

    def train_model(x):                                 # minibatches of 128
        model(x, batch_size=128)

    guide = AmortizedGuide(train_model, hidden=(256,))
    fit(train_model, guide, x, optim=pyro.optim.Adam({"lr": 1e-3}), max_iter=2000, tol=0)
    log_marginal(train_model, guide, x, num_samples=1000).mean()  # IWAE-1000, nats/datum
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_emvae import datasets

__all__ = [
    "IMAGE_SHAPE",
    "LIKELIHOODS",
    "decoder_net",
    "encode_mean",
    "likelihood_dist",
    "load_digits",
    "load_digits_labels",
    "make_vae",
    "pixel_means",
    "prior_samples",
    "reconstructions",
    "to_images",
    "train_test_split",
]

IMAGE_SHAPE = (8, 8)
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")


# ---------------------------------------------------------------------------- data
def load_digits(
    binarize: bool = False, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The handwritten digits bundled with pyro_emvae (:func:`pyro_emvae.datasets.load_digits`,
    no download): ``(1797, 64)`` pixels scaled from ``0..16`` to ``[0, 1]`` in the default
    dtype, and binarized (``x > 0.5``, values 0/1) if ``binarize``. With ``return_labels``
    also the digit classes, a ``(1797,)`` LongTensor.

    >>> load_digits(binarize=True).shape
    torch.Size([1797, 64])
    """
    x, labels = datasets.load_digits(binarize=binarize)
    return (x, labels) if return_labels else x


def load_digits_labels() -> torch.Tensor:
    """The digit class (0..9) of each row of :func:`load_digits`: a ``(1797,)`` LongTensor.

    Example::

        >>> from models.vae import load_digits_labels
        >>> y = load_digits_labels()
        >>> y.shape, y.dtype, y.unique().tolist()
        (torch.Size([1797]), torch.int64, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    return load_digits(return_labels=True)[1]


def train_test_split(n: int, n_train: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random split of ``range(n)``: ``(train indices (n_train,), test indices)``, from a
    generator seeded with ``seed`` (the global RNG is left alone).

    Example::

        >>> from models.vae import train_test_split
        >>> train, test = train_test_split(10, 7)
        >>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(10))
        (7, 3, True)
    """
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in [1, {n - 1}], got {n_train}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def to_images(x: torch.Tensor) -> torch.Tensor:
    """``(..., 64)`` -> ``(..., 8, 8)``.

    Example::

        >>> import torch
        >>> from models.vae import to_images
        >>> to_images(torch.zeros(5, 64)).shape
        torch.Size([5, 8, 8])
    """
    return x.reshape(*x.shape[:-1], *IMAGE_SHAPE)


# ---------------------------------------------------------------------------- the model
def decoder_net(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """An MLP ``in_dim -> hidden... -> out_dim`` with ReLU between layers and none on the
    output (the logits), in the default dtype. ``nn.Linear`` acts on the last dim, so any
    leading dims (particles, enumerated values, data) pass through.

    Example::

        >>> import torch
        >>> from models.vae import decoder_net
        >>> net = decoder_net(2, (16,), 64)
        >>> net(torch.zeros(10, 3, 2)).shape  # leading dims pass through
        torch.Size([10, 3, 64])
    """
    sizes = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(torch.get_default_dtype())


def likelihood_dist(logits: torch.Tensor, likelihood: str) -> dist.TorchDistribution:
    """The per-pixel likelihood with these logits, pixels as one event: batch shape
    ``logits.shape[:-1]``, event shape ``logits.shape[-1:]``.

    Example::

        >>> import torch
        >>> from models.vae import likelihood_dist
        >>> d = likelihood_dist(torch.zeros(3, 64), "bernoulli")
        >>> d.batch_shape, d.event_shape
        (torch.Size([3]), torch.Size([64]))
    """
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=logits).to_event(1)
    if likelihood == "continuous_bernoulli":
        return dist.ContinuousBernoulli(logits=logits).to_event(1)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def pixel_means(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """:math:`\\mathbb E[x \\mid \\lambda]` per pixel: :math:`\\sigma(\\lambda)` for the Bernoulli,
    the continuous Bernoulli's own mean (pulled towards 1/2) for ``"continuous_bernoulli"``.

    Example::

        >>> import torch
        >>> from models.vae import pixel_means
        >>> logits = torch.tensor([0.0, 2.0])
        >>> pixel_means(logits, "bernoulli")  # sigmoid
        tensor([0.5000, 0.8808])
        >>> bool((pixel_means(logits, "continuous_bernoulli")[1] < 0.8808))  # pulled towards 1/2
        True
    """
    return likelihood_dist(logits, likelihood).mean


def _check(likelihood: str, latent_dim: int, data_dim: int) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if latent_dim < 1 or data_dim < 1:
        raise ValueError(f"latent_dim and data_dim must be >= 1, got {latent_dim}, {data_dim}")


def make_vae(
    data_dim: int = 64,
    latent_dim: int = 8,
    hidden: Sequence[int] = (256,),
    likelihood: str = "bernoulli",
) -> tuple[Callable[..., None], nn.Module]:
    """The VAE's model and its decoder: ``(model, decoder)``.

    ``model(x, batch_size=None)`` takes ``x`` of shape ``(N, data_dim)``; ``batch_size``
    subsamples the data plate (minibatch SVI; the ELBO is scaled by ``N / batch_size``). The
    decoder maps ``(..., latent_dim)`` to logits ``(..., data_dim)``; it is created here, in
    the default dtype, and registered by each call of the model as ``"decoder"``.

    >>> model, decoder = make_vae(data_dim=4, latent_dim=2, hidden=(8,))
    >>> decoder(torch.zeros(3, 2)).shape
    torch.Size([3, 4])
    """
    _check(likelihood, latent_dim, data_dim)
    decoder = decoder_net(latent_dim, hidden, data_dim)

    def model(x: torch.Tensor, batch_size: int | None = None) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            # x.new_zeros: the prior follows the data's dtype and device
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", likelihood_dist(decoder(z), likelihood), obs=x[idx])

    return model, decoder


# ---------------------------------------------------------------------------- other data
# ---------------------------------------------------------------------------- pictures
def encode_mean(guide, *args, **kwargs) -> torch.Tensor:
    """The encoder's mean of :math:`q(z_i \\mid x_i)` for every datum of ``args`` (the model's
    arguments, held-out data of any size included): ``(N, latent_dim)``, detached, for the
    guide's one local site.

    Example::

        >>> import torch
        >>> from pyro_emvae import AmortizedGuide
        >>> from models.vae import load_digits, make_vae, encode_mean
        >>> x = load_digits(binarize=True)[:20]
        >>> model, decoder = make_vae(latent_dim=2, hidden=(16,))
        >>> guide = AmortizedGuide(model, hidden=(16,))
        >>> model(x); _ = guide(x)  # the first calls create the params

        >>> encode_mean(guide, x).shape  # (N, latent_dim)
        torch.Size([20, 2])
    """
    if guide.local is None:
        guide.setup(*args, **kwargs)
    if len(guide.local) != 1:
        names = [s["name"] for s in guide.local]
        raise ValueError(f"encode_mean needs a guide with one local site, this one has {names}")
    return next(iter(guide.local_params(*args, **kwargs).values()))["loc"]


def reconstructions(
    decoder: nn.Module, guide, x: torch.Tensor, likelihood: str = "bernoulli"
) -> torch.Tensor:
    """Mean reconstructions :math:`\\mathbb E[x \\mid z = \\mathbb E_q[z \\mid x_i]]` as images
    ``(N, 8, 8)`` in ``[0, 1]``: the encoder's mean, decoded, then each pixel's mean.

    Example::

        >>> import torch
        >>> from pyro_emvae import AmortizedGuide
        >>> from models.vae import load_digits, make_vae, reconstructions
        >>> x = load_digits(binarize=True)[:20]
        >>> model, decoder = make_vae(latent_dim=2, hidden=(16,))
        >>> guide = AmortizedGuide(model, hidden=(16,))
        >>> model(x); _ = guide(x)  # the first calls create the params

        >>> r = reconstructions(decoder, guide, x)
        >>> r.shape, bool(((0 <= r) & (r <= 1)).all())
        (torch.Size([20, 8, 8]), True)
    """
    z = encode_mean(guide, x)
    with torch.no_grad():
        return to_images(pixel_means(decoder(z), likelihood))


def prior_samples(
    decoder: nn.Module,
    n: int,
    latent_dim: int,
    likelihood: str = "bernoulli",
    seed: int | None = None,
) -> torch.Tensor:
    """``n`` images ``(n, 8, 8)`` decoded from :math:`z \\sim \\mathcal N(0, I)`: each pixel's
    mean given z (not a noisy draw of the pixels, which is what one usually shows).

    Example::

        >>> from models.vae import make_vae, prior_samples
        >>> model, decoder = make_vae(latent_dim=2, hidden=(16,))
        >>> prior_samples(decoder, 4, latent_dim=2, seed=0).shape
        torch.Size([4, 8, 8])
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    dtype = next(decoder.parameters()).dtype
    z = torch.randn(n, latent_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        return to_images(pixel_means(decoder(z), likelihood))
