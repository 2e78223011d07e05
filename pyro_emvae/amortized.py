"""Amortized guides for continuous latents: an encoder maps each datum to :math:`q_\\phi(z_i|x_i)`.

Where the exact posterior is intractable (a neural decoder, a continuous latent), the ELBO

.. math:: \\mathcal L(\\theta, \\phi) = \\sum_i \\mathbb E_{q_\\phi(z_i|x_i)}
          [\\log p_\\theta(x_i, z_i) - \\log q_\\phi(z_i \\mid x_i)]

is climbed by stochastic gradients through reparameterized draws (the VAE). Discrete sites
that the model marks ``infer={"enumerate": "parallel"}`` are left to the ELBO, which sums them
out exactly (``TraceEnum_ELBO``): EM's exact E-step for the discrete part, the VAE's encoder
for the continuous part.

* :class:`AmortizedGuide` reads one prior trace of the model and builds the encoder: its input
  is the datum's observed values (found among the model's arguments), its outputs the
  parameters of q for every continuous latent site in the data plate. Global continuous
  latents get non-amortized parameters (Pyro's ``AutoDelta`` or ``AutoNormal``).
* :class:`MeanFieldGuide`: one free Normal per latent per datum (Pyro's ``AutoNormal`` on the
  model with its enumerated sites hidden, and the model's subsampling kept): the same ELBO
  without an encoder. It does not scale: its parameters grow with N, and each is updated only
  when its datum is in the minibatch.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import biject_to, constraints

from pyro_emvae import _compat
from pyro_emvae._compat import Subsample, get_rng_state, set_rng_state

__all__ = ["AmortizedGuide", "MeanFieldGuide", "find_data_plate", "mlp"]

FAMILIES = ("diagonal", "lowrank", "full")


# ---------------------------------------------------------------------------- model structure
def rng_state() -> dict:
    """Pyro's RNG state (torch CPU, Python, NumPy) and, once CUDA is in use, every GPU's."""
    state = get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: dict) -> None:
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng():
    """Run a block and put every RNG back as it was (CUDA's included)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng(state)


def prototype_trace(model: Callable, args: tuple, kwargs: dict):
    """One trace of the model with every latent drawn from its prior (nothing enumerated).
    The RNG state is restored afterwards, so that looking at a model's structure does not
    change the draws that follow."""
    with preserved_rng(), poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **kwargs)


def is_discrete(site: dict) -> bool:
    return bool(site["fn"].support.is_discrete)


def latent_sites(tr) -> list[dict]:
    return [
        s
        for s in prune_subsample_sites(tr).nodes.values()
        if s["type"] == "sample" and not s["is_observed"]
    ]


def observed_sites(tr) -> list[dict]:
    return [
        s
        for s in prune_subsample_sites(tr).nodes.values()
        if s["type"] == "sample" and s["is_observed"]
    ]


def frames_of(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.vectorized]


def find_data_plate(tr, name: str | None = None):
    """The frame of a traced model's data plate: the plate whose cells are the data.

    ``name`` picks it; otherwise the one subsampled plate if there is exactly one, else the
    outermost vectorized plate that every observed site lies in. ``None`` when the observed
    sites share no plate (the whole data set is then one datum).
    """
    observed = observed_sites(tr)
    frames = {f.name: f for s in observed + latent_sites(tr) for f in frames_of(s)}
    if name is not None:
        if name not in frames:
            raise ValueError(
                f"data_plate={name!r} is not a vectorized plate of the model; "
                f"its plates are {sorted(frames)}"
            )
        return frames[name]
    subsampled = [f for f in frames.values() if f.full_size is not None and f.full_size > f.size]
    if len(subsampled) == 1:
        return subsampled[0]
    if not observed:
        return None
    common = [f for f in frames_of(observed[0]) if all(f in frames_of(s) for s in observed[1:])]
    return common[0] if common else None


def plate_indices(tr, frame) -> torch.Tensor:
    """The data indices a traced model used in ``frame``'s plate."""
    site = tr.nodes.get(frame.name)
    if site is not None and site["type"] == "sample" and isinstance(site["fn"], Subsample):
        return site["value"]
    return torch.arange(frame.size)


class ForceSubsample(Messenger):
    """Makes ``pyro.plate(name, ...)`` return the given indices, in the model and the guide
    alike: evaluation walks the whole data set through a subsampled plate, chunk by chunk.
    Under it the plate's scale is ``size / len(indices)``; evaluation uses unscaled
    log-densities."""

    def __init__(self, name: str, indices: torch.Tensor):
        super().__init__()
        self.name = name
        self.indices = indices

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and isinstance(msg["fn"], Subsample):
            msg["value"] = self.indices
            msg["done"] = True


def to_front(value: torch.Tensor, frame, event_dim: int) -> torch.Tensor:
    """A site value with the plate's dim moved to the front: ``(B, *rest)``; broadcast dims
    are expanded first."""
    dim = frame.dim - event_dim
    if value.dim() < -dim:
        value = value.reshape((1,) * (-dim - value.dim()) + tuple(value.shape))
    if value.shape[dim] != frame.size:
        shape = list(value.shape)
        shape[dim] = frame.size
        value = value.expand(shape)
    return value.movedim(dim, 0)


# ---------------------------------------------------------------------------- encoder inputs
def _tensor_args(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        if torch.is_tensor(a):
            yield i, a
    for k, a in kwargs.items():
        if torch.is_tensor(a):
            yield k, a


def _locate(site: dict, frame, indices: torch.Tensor, args: tuple, kwargs: dict):
    """The model argument and dim whose entries at ``indices`` are this observed site's value:
    ``(key, dim)``, or ``None``."""
    obs = to_front(site["value"], frame, site["fn"].event_dim)
    flat = obs.reshape(len(indices), -1).double()
    full = frame.full_size or frame.size
    for key, a in _tensor_args(args, kwargs):
        for d in range(a.dim()):
            if a.shape[d] != full:
                continue
            picked = a.index_select(d, indices.to(a.device)).movedim(d, 0)
            if picked.numel() != obs.numel():
                continue
            if torch.allclose(picked.reshape(len(indices), -1).double(), flat.to(a.device)):
                return key, d
    return None


class _Inputs:
    """Gathers the encoder's input for a batch of data indices from the model's arguments."""

    def __init__(self, located: list[tuple[Any, int, int | None]], user: Callable | None):
        self.located = located  # (arg key, dim, number of classes to one-hot or None)
        self.user = user

    def __call__(self, indices: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.user is not None:
            full = self.user(*args, **kwargs)
            picked = full.index_select(0, indices.to(full.device))
            return picked if picked.dim() > 1 else picked.unsqueeze(-1)
        parts = []
        for key, d, classes in self.located:
            a = args[key] if isinstance(key, int) else kwargs[key]
            part = a.index_select(d, indices.to(a.device)).movedim(d, 0)
            if classes is not None:
                part = nn.functional.one_hot(part.long(), classes)
            parts.append(part)
        if len(parts) == 1 and self.located[0][2] is None:
            # one site: the datum as it is (an image stays an image); a scalar gets a dim
            return parts[0] if parts[0].dim() > 1 else parts[0].unsqueeze(-1)
        # in the data's own floating dtype (a one-hot or count part follows it)
        dtype = next((p.dtype for p in parts if p.is_floating_point()), torch.get_default_dtype())
        return torch.cat([p.reshape(p.shape[0], -1).to(dtype) for p in parts], -1)


# ---------------------------------------------------------------------------- the encoder
def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Head(nn.Module):
    """Features -> the parameters of q for one site over its flattened unconstrained value of
    size ``n`` per datum: ``loc``, ``scale`` (softplus), and ``factor`` (low rank) or
    ``scale_tril`` (full)."""

    def __init__(self, features: int, n: int, family: str, rank: int, init_scale: float):
        super().__init__()
        self.n, self.family, self.rank = n, family, rank
        self.loc = nn.Linear(features, n)
        self.scale = nn.Linear(features, n)
        # q starts at the same scale for every datum
        nn.init.zeros_(self.scale.weight)
        nn.init.constant_(self.scale.bias, _inv_softplus(init_scale))
        if family == "lowrank":
            self.factor = nn.Linear(features, n * rank)
            nn.init.normal_(self.factor.weight, std=1e-3)
            nn.init.zeros_(self.factor.bias)
        elif family == "full":
            self.tril = nn.Linear(features, n * (n - 1) // 2)
            nn.init.zeros_(self.tril.weight)
            nn.init.zeros_(self.tril.bias)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"loc": self.loc(h), "scale": nn.functional.softplus(self.scale(h)) + 1e-6}
        if self.family == "lowrank":
            out["factor"] = self.factor(h).reshape(*h.shape[:-1], self.n, self.rank)
        elif self.family == "full":
            lower = h.new_zeros(*h.shape[:-1], self.n, self.n)
            i, j = torch.tril_indices(self.n, self.n, -1, device=h.device)
            lower[..., i, j] = self.tril(h)
            out["scale_tril"] = lower + torch.diag_embed(out["scale"])
        return out


def _key(site_name: str) -> str:
    return site_name.replace(".", "_")


class Encoder(nn.Module):
    """``trunk`` (features of each datum) followed by one :class:`Head` per latent site."""

    def __init__(self, trunk: nn.Module, heads: dict[str, Head]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict({_key(k): v for k, v in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """A multilayer perceptron on flattened inputs, ``sizes[0] -> ... -> sizes[-1]``, with
    ``activation`` after every layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- the guide
class AmortizedGuide(nn.Module):
    """A guide whose local continuous latents come from an encoder of each datum.

    For every continuous latent site :math:`z` in the data plate,

    .. math:: q_\\phi(z_i \\mid x_i) = T_\\#\\,
              \\mathcal N\\big(\\mu_\\phi(x_i), \\Sigma_\\phi(x_i)\\big),

    where :math:`T` is ``biject_to(site.support)`` (the identity for a real latent), and
    :math:`\\Sigma` is diagonal (``family="diagonal"``), diagonal plus rank ``rank``
    (``"lowrank"``), or full through a Cholesky factor (``"full"``), over the datum's
    flattened latent. Draws are reparameterized. The encoder's input is the datum's observed
    values: one prior trace of the model tells which argument (and which dim) holds each
    observed site's rows, so under plate subsampling the guide reads the same rows as the
    model (the guide declares the same plate; the model replays its indices). Global
    continuous latents (outside the data plate) get Pyro's ``AutoDelta`` (a MAP point,
    ``global_guide="delta"``) or ``AutoNormal`` (``"normal"``). Discrete latents must be
    enumerated by the model (``infer={"enumerate": "parallel"}``): the ELBO then sums them
    out exactly.

    Args:
        model: the Pyro model.
        hidden: widths of the default MLP trunk's hidden layers (``()``: a linear encoder).
        family: ``"diagonal"``, ``"lowrank"`` or ``"full"``.
        rank: the low rank (default ``ceil(sqrt(n))`` for a latent of size n).
        encoder: a ``torch.nn.Module`` trunk mapping a batch of inputs ``(B, *datum shape)``
            to features ``(B, H)``; the heads go on top. With one observed site its input is
            the datum shaped as in the argument (an image stays an image); several observed
            sites are flattened and concatenated (a Categorical one one-hot).
        inputs: ``inputs(*args, **kwargs) -> (N, ...)``, the encoder's input for every datum,
            for models whose observed values are not rows of an argument.
        data_plate: the data plate's name (default: see :func:`find_data_plate`).
        global_guide: ``"delta"`` or ``"normal"``.
        init_scale: the initial standard deviation of q (the same for every datum).
        activation: the trunk's activation.
        name: the encoder's name in the param store.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> decoder = torch.nn.Linear(2, 5)
        >>> def model(x):
        ...     pyro.module("decoder", decoder)
        ...     with pyro.plate("data", len(x), subsample_size=8) as idx:
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x[idx])
        >>> guide = AmortizedGuide(model, hidden=(16,))
        >>> guide(torch.randn(100, 5))["z"].shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        model: Callable,
        hidden: Sequence[int] = (256,),
        *,
        family: str = "diagonal",
        rank: int | None = None,
        encoder: nn.Module | None = None,
        inputs: Callable | None = None,
        data_plate: str | None = None,
        global_guide: str = "delta",
        init_scale: float = 1.0,
        activation: type[nn.Module] = nn.ReLU,
        name: str = "encoder",
    ):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if global_guide not in ("delta", "normal"):
            raise ValueError(f"global_guide must be 'delta' or 'normal', got {global_guide!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        # kept off the nn.Module: a PyroModule model must not become a submodule of the guide
        object.__setattr__(self, "model", model)
        self.hidden = tuple(hidden)
        self.family = family
        self.rank = rank
        self.user_trunk = encoder
        self.user_inputs = inputs
        self.data_plate = data_plate
        self.global_kind = global_guide
        self.init_scale = init_scale
        self.activation = activation
        self.name = name
        self.encoders = nn.ModuleDict()
        self.groups: list[dict] = []
        self.local: list[dict] | None = None  # set by setup()
        self.global_names: list[str] = []
        self._override: dict[str, dict[str, torch.Tensor]] | None = None
        # kept off the nn.Module: the global guide is a PyroModule with its own params
        object.__setattr__(self, "global_guide", None)

    # ------------------------------------------------------------------ setup
    def setup(self, *args: Any, **kwargs: Any) -> AmortizedGuide:
        """Build the encoders from one prior trace of the model (run by the first call).

        Each continuous latent belongs to a *data plate*: ``data_plate`` if given, else the
        subsampled plate among its plates, else the outermost of its plates that holds an
        observed site. Latents of the same data plate share one encoder, whose input is that
        plate's observed values; latents in no such plate are global."""
        tr = prototype_trace(self.model, args, kwargs)
        observed_plates = {f.name for s in observed_sites(tr) for f in frames_of(s)}
        if self.data_plate is not None:
            find_data_plate(tr, self.data_plate)  # checks the name
        groups: dict[str, dict] = {}
        global_names: list[str] = []
        for site in latent_sites(tr):
            if is_discrete(site):
                if site["infer"].get("enumerate") != "parallel":
                    raise ValueError(
                        f"site '{site['name']}' is a discrete latent: AmortizedGuide covers "
                        "continuous latents only. Mark it infer={'enumerate': 'parallel'} in "
                        "the model so that the ELBO sums it out exactly (TraceEnum_ELBO)."
                    )
                continue
            frame = self._data_frame(site, observed_plates)
            if frame is None:
                global_names.append(site["name"])
                continue
            group = groups.setdefault(frame.name, {"frame": frame, "sites": []})
            group["sites"].append(self._describe(site, frame))
        encoders = {}
        for name, group in groups.items():
            frame = group["frame"]
            indices = plate_indices(tr, frame)
            group["inputs"] = self._find_inputs(tr, frame, indices, args, kwargs)
            example = group["inputs"](indices, args, kwargs)
            encoders[_key(name)] = self._build(example, group["sites"], _float_dtype(example, tr))
            group["module"] = self.name if len(groups) == 1 else f"{self.name}_{_key(name)}"
        self.encoders = nn.ModuleDict(encoders)
        self.groups = list(groups.values())
        self._size_cache = {_signature(args, kwargs): _plate_sizes(tr)}
        if global_names:
            blocked = poutine.block(self.model, expose=global_names)
            if self.global_kind == "delta":
                guide = AutoDelta(blocked)
            else:
                guide = AutoNormal(blocked, init_scale=0.1)
            _compat.set_pyro_name(guide, f"{self.name}_globals")
            object.__setattr__(self, "global_guide", guide)
        self.global_names = global_names
        self.local = [site for group in self.groups for site in group["sites"]]
        return self

    def _data_frame(self, site: dict, observed_plates: set[str]):
        frames = frames_of(site)
        if self.data_plate is not None:
            return next((f for f in frames if f.name == self.data_plate), None)
        for f in frames:
            if f.full_size is not None and f.full_size > f.size:
                return f
        return next((f for f in frames if f.name in observed_plates), None)

    @property
    def encoder(self) -> Encoder:
        """The encoder, when the model has one data plate (else see ``encoders``)."""
        if self.local is None:
            raise RuntimeError("the encoder is built by the guide's first call (or setup())")
        if len(self.encoders) != 1:
            # (not AttributeError: nn.Module would replace its message)
            raise RuntimeError(
                f"this guide has one encoder per data plate: encoders[{list(self.encoders)}]"
            )
        return next(iter(self.encoders.values()))

    @property
    def frame(self):
        """The data plate's frame (as first traced), when the model has one."""
        return self.groups[0]["frame"] if self.local and len(self.groups) == 1 else None

    def _sizes(self, args: tuple, kwargs: dict) -> dict[str, tuple[int, int]]:
        """Plate sizes ``(full, subsample)`` for these arguments: one prior trace of the model
        per new signature (argument shapes and plain values), so a trained guide scores data of
        another size, or the model without subsampling."""
        key = _signature(args, kwargs)
        if key not in self._size_cache:
            if len(self._size_cache) >= 16:
                self._size_cache.pop(next(iter(self._size_cache)))
            tr = prototype_trace(self.model, args, kwargs)
            self._size_cache[key] = _plate_sizes(tr)
            self._check_layout(tr)
        return self._size_cache[key]

    def _check_layout(self, tr) -> None:
        for group in self.groups:
            for site in group["sites"]:
                new = tr.nodes.get(site["name"])
                if new is None:
                    raise ValueError(
                        f"site '{site['name']}' that the encoder was built for is missing from "
                        "the model with these arguments"
                    )
                fn = new["fn"]
                value = new["value"].expand(fn.batch_shape + fn.event_shape)
                if site["transform"] is not None:
                    value = site["transform"].inv(value)
                frame = next(f for f in frames_of(new) if f.name == group["frame"].name)
                datum = tuple(to_front(value, frame, fn.event_dim).shape[1:])
                if datum != site["u_datum"]:
                    raise ValueError(
                        f"site '{site['name']}': its value per datum now has shape {datum}, "
                        f"the encoder was built for {site['u_datum']}"
                    )

    def _describe(self, site: dict, frame) -> dict:
        fn = site["fn"]
        event_dim = fn.event_dim
        value = site["value"].expand(fn.batch_shape + fn.event_shape)
        support = fn.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        transform = None if support is constraints.real else biject_to(fn.support)
        u = value if transform is None else transform.inv(value)
        u_datum = tuple(to_front(u, frame, event_dim).shape[1:])
        if self.family != "diagonal" and (event_dim != 1 or any(s != 1 for s in u_datum[:-1])):
            raise ValueError(
                f"site '{site['name']}': family={self.family!r} needs a latent whose value per "
                f"datum is a vector (one event dim, no other plate); its per-datum shape is "
                f"{u_datum} with event_dim={event_dim}. Use family='diagonal'."
            )
        return {
            "name": site["name"],
            "event_dim": event_dim,
            "u_datum": u_datum,
            "n": math.prod(u_datum),
            "frames": frames_of(site),
            "transform": transform,
        }

    def _find_inputs(self, tr, frame, indices, args, kwargs) -> _Inputs:
        full = frame.full_size or frame.size
        if self.user_inputs is not None:
            data = self.user_inputs(*args, **kwargs)
            if not torch.is_tensor(data) or data.dim() < 1 or data.shape[0] != full:
                raise ValueError(
                    f"inputs(...) must return a tensor with one row per datum of plate "
                    f"'{frame.name}' ({full} rows), got {getattr(data, 'shape', type(data))}"
                )
            return _Inputs([], self.user_inputs)
        observed = [s for s in observed_sites(tr) if frame in frames_of(s)]
        if not observed:
            raise ValueError(
                f"no observed site lies in the data plate '{frame.name}', so the encoder has "
                "no input. Pass inputs=lambda *args, **kwargs: <tensor with one row per datum>."
            )
        located = []
        for site in observed:
            where = _locate(site, frame, indices, args, kwargs)
            if where is None:
                raise ValueError(
                    f"observed site '{site['name']}': no tensor argument of the model has rows "
                    f"(along a dim of size {full}) equal to its value, so the encoder cannot "
                    "find the datum. Pass inputs=lambda *args, **kwargs: <tensor with one row "
                    "per datum>."
                )
            fn = site["fn"]
            classes = fn.logits.shape[-1] if isinstance(fn, dist.Categorical) else None
            located.append((where[0], where[1], classes))
        return _Inputs(located, None)

    def _build(self, example: torch.Tensor, local: list[dict], dtype: torch.dtype) -> Encoder:
        """The encoder for data like ``example``, on its device, in ``dtype`` (see
        :func:`_float_dtype`) or in the dtype of a user trunk's params."""
        if self.user_trunk is not None:
            own = next(
                (p.dtype for p in self.user_trunk.parameters() if p.is_floating_point()), None
            )
            dtype = own or dtype  # a trunk the user built in some dtype stays in it
        example = example.to(dtype)
        if self.user_trunk is not None:
            trunk = self.user_trunk.to(example.device)
            with torch.no_grad():
                features = trunk(example).shape[-1]
        else:
            d_in = math.prod(example.shape[1:])
            trunk = mlp((d_in, *self.hidden), self.activation)
            features = self.hidden[-1] if self.hidden else d_in
        heads = {
            s["name"]: Head(
                features,
                s["n"],
                self.family,
                self.rank or max(1, math.ceil(math.sqrt(s["n"]))),
                self.init_scale,
            )
            for s in local
        }
        return Encoder(trunk, heads).to(device=example.device, dtype=dtype)

    # ------------------------------------------------------------------ running
    def encode(self, indices: torch.Tensor, *args: Any, group: int = 0, **kwargs: Any) -> dict:
        """The encoder's outputs for the data at ``indices`` of data plate ``group`` (0 when
        there is one): ``{site: {"loc": (B, n), "scale": (B, n), ...}}`` over each datum's
        flattened unconstrained latent."""
        if self.local is None:
            self.setup(*args, **kwargs)
        g = self.groups[group]
        if self._override is not None:
            return {
                _key(site["name"]): {
                    p: v.index_select(0, indices.to(v.device))
                    for p, v in self._override[_key(site["name"])].items()
                }
                for site in g["sites"]
            }
        encoder = self.encoders[_key(g["frame"].name)]
        x = g["inputs"](indices, args, kwargs)
        weight = next(encoder.parameters(), None)
        if weight is not None and (x.dtype != weight.dtype or x.device != weight.device):
            x = x.to(weight)  # data in another dtype than the encoder's (float32 rows, say)
        return encoder(x)

    def distribution(self, site: dict, params: dict, batch: int, frame=None):
        """q for one site from its head's outputs, laid out like the site's value: the data
        dim where the plate puts it, inner plate dims as batch dims, event dims last."""
        frame = frame if frame is not None else self.frame
        pos = frame.dim - site["event_dim"]
        if self.family == "diagonal":
            shape = (batch, *site["u_datum"])
            loc = params["loc"].reshape(shape).movedim(0, pos)
            scale = params["scale"].reshape(shape).movedim(0, pos)
            q = dist.Normal(loc, scale).to_event(site["event_dim"])
        else:  # a vector per datum; other dims have size 1, so reshaping places the data dim
            layout = list(site["u_datum"])
            layout.insert(len(layout) + 1 + pos, batch)
            loc = params["loc"].reshape(layout)
            if self.family == "lowrank":
                factor = params["factor"].reshape(*layout, -1)
                cov_diag = params["scale"].reshape(layout) ** 2
                q = dist.LowRankMultivariateNormal(loc, factor, cov_diag)
            else:
                tril = params["scale_tril"].reshape(*layout, layout[-1])
                q = dist.MultivariateNormal(loc, scale_tril=tril)
        if site["transform"] is not None:
            q = dist.TransformedDistribution(q, [site["transform"]])
        return q

    def _plates(self, sizes: dict[str, tuple[int, int]]) -> dict:
        plates = {}
        for site in self.local:
            for f in site["frames"]:
                if f.name not in plates:
                    full, sub = sizes.get(f.name, (f.full_size or f.size, f.size))
                    plates[f.name] = pyro.plate(
                        f.name, full, subsample_size=sub if sub < full else None, dim=f.dim
                    )
        return plates

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.local is None:
            self.setup(*args, **kwargs)
        values: dict[str, torch.Tensor] = {}
        if self.global_guide is not None:
            values.update(self.global_guide(*args, **kwargs))
        if not self.local:
            return values
        plates = self._plates(self._sizes(args, kwargs))
        for i, group in enumerate(self.groups):
            frame = group["frame"]
            if self._override is None:
                # the store wins over the module: a loaded param store is what it uses
                encoder = self.encoders[_key(frame.name)]
                pyro.module(group["module"], encoder, update_module_params=True)
            with plates[frame.name] as indices:
                outs = self.encode(indices, *args, group=i, **kwargs)
            for site in group["sites"]:
                q = self.distribution(site, outs[_key(site["name"])], len(indices), frame)
                with ExitStack() as stack:
                    for f in site["frames"]:
                        stack.enter_context(plates[f.name])
                    values[site["name"]] = pyro.sample(site["name"], q)
        return values

    def local_params(self, *args: Any, **kwargs: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The encoders' outputs for every datum (no subsampling), detached:
        ``{site: {"loc": (N, n), "scale": (N, n), ...}}``."""
        if self.local is None:
            self.setup(*args, **kwargs)
        sizes = self._sizes(args, kwargs)
        out = {}
        with torch.no_grad():
            for i, group in enumerate(self.groups):
                full = sizes[group["frame"].name][0]
                outs = self.encode(torch.arange(full), *args, group=i, **kwargs)
                out.update(
                    {k: {p: v.detach().clone() for p, v in d.items()} for k, d in outs.items()}
                )
        return out

    def with_model(self, model: Callable) -> AmortizedGuide:
        """This guide for another model with the same latents (the model without
        subsampling, say): the same encoders and params, plates read from ``model``."""
        if model is self.model:
            return self
        new = copy.copy(self)
        new.__dict__ = dict(self.__dict__)  # its own attributes; the encoders are shared
        object.__setattr__(new, "model", model)
        new._size_cache = {}
        return new

    def override(self, params: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Use free per-datum parameters (as returned by :meth:`local_params`, possibly
        optimized) in place of the encoders' outputs; ``None`` restores the encoders. Used to
        measure the amortization gap."""
        self._override = params


def _float_dtype(example: torch.Tensor, tr) -> torch.dtype:
    """The encoder's dtype: the one q's draws must have to enter the model. In order: the
    dtype of the model's params (a decoder's weights, which consume the draws), else the
    observed data's, else the model's continuous latents' (integer data), else torch's
    default. Not torch's default first: float64 data and decoder under a float32 default
    would meet a float32 draw in the decoder."""
    params = [
        s for s in tr.nodes.values() if s["type"] == "param" and s["value"].is_floating_point()
    ]
    # a module's weights (pyro.module names them "module$$$weight") before plain params: a
    # network is what takes the draw, a scalar noise param may sit in the default dtype
    params.sort(key=lambda s: "$$$" not in s["name"])
    if params:
        return params[0]["value"].dtype
    if example.is_floating_point():
        return example.dtype
    for site in latent_sites(tr):
        value = site["value"]
        if torch.is_tensor(value) and value.is_floating_point():
            return value.dtype
    return torch.get_default_dtype()


def _signature(args: tuple, kwargs: dict):
    """What decides the model's plate sizes: tensor shapes and plain values."""

    def one(a):
        if torch.is_tensor(a):
            return ("tensor", tuple(a.shape), str(a.dtype), str(a.device))
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, (tuple, list)):
            return tuple(one(b) for b in a)
        return ("object", id(a))

    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _plate_sizes(tr) -> dict[str, tuple[int, int]]:
    return {
        f.name: (f.full_size or f.size, f.size)
        for s in latent_sites(tr) + observed_sites(tr)
        for f in frames_of(s)
    }


# ---------------------------------------------------------------------------- mean field
class MeanFieldGuide(AutoNormal):
    """One free Normal per latent element per datum: Pyro's ``AutoNormal`` over the model's
    continuous latents, with the model's enumerated discrete sites hidden (the ELBO sums them
    out) and the model's plate subsampling kept (``AutoNormal`` alone would replay the whole
    plate into the model).

    The non-amortized counterpart of :class:`AmortizedGuide`: it climbs the same ELBO, but
    its parameters grow with the data (``2 * N * latent size``) and each datum's parameters
    move only when the datum is in the minibatch.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x), subsample_size=4):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x[:4])
        >>> guide = MeanFieldGuide(model)
        >>> guide(torch.randn(10))["z"].shape
        torch.Size([4])
    """

    def __init__(self, model: Callable, *, init_scale: float = 0.1, **kwargs: Any):
        self._frames: dict | None = None
        self._original = model
        hide = self._hide
        super().__init__(
            poutine.block(model, hide_fn=hide),
            init_scale=init_scale,
            create_plates=self._subsampled_plates,
            **kwargs,
        )

    @staticmethod
    def _hide(msg) -> bool:
        if msg["type"] != "sample" or isinstance(msg["fn"], Subsample):
            return False
        if msg["infer"].get("enumerate") == "parallel":
            return True
        return not msg["is_observed"] and msg["fn"].support.is_discrete

    def _subsampled_plates(self, *args: Any, **kwargs: Any):
        if self._frames is None:
            tr = prototype_trace(self._original, args, kwargs)
            self._frames = {
                f.name: f
                for s in latent_sites(tr) + observed_sites(tr)
                for f in frames_of(s)
                if f.full_size is not None and f.full_size > f.size
            }
        return [
            pyro.plate(f.name, f.full_size, subsample_size=f.size, dim=f.dim)
            for f in self._frames.values()
        ]
