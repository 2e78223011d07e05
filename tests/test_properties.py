"""Property tests (issue 12): the exact E-step against brute force and Pyro on random models,
and EM's fixed points against the gradient of the exact log-likelihood.

1. For random small models built from the supported pieces (see ``tests/_brute.py``: plates,
   nested plates, ``pyro.markov`` chains, a global latent, ``poutine.mask`` around latents and
   observations or around observations only, a scalar ``poutine.scale``, ``obs_mask`` on
   observations and on latents, ``.mask()``, params under every constraint the rules accept),
   ``ExactEStep(model).log_likelihood()`` equals the brute-force sum over every joint
   assignment and ``-TraceEnum_ELBO(...).loss`` with an empty guide; posterior marginals equal
   brute force. The same for an observed ``DiscreteHMM`` site (a sum over every hidden path).
2. After ``fit`` reports ``converged``, the gradient of :math:`\\log p(x)` (by Pyro's
   ``TraceEnum_ELBO``, not the library) with respect to the constrained value of every
   closed-form param, projected onto the constraint's tangent space, is ~0 per datum: a
   converged point of EM is stationary. And the log-likelihood history never decreases.

Hypothesis runs derandomized without a database, so every run checks the same examples.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from _brute import (
    FAMILIES,
    brute_force,
    build_hmm_model,
    build_model,
    hmm_brute_force,
    pyro_log_p,
    random_hmm_spec,
    random_spec,
    spec_fills,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

from pyro_emvae import EMOptim, ExactEStep, fit

PAR = {"enumerate": "parallel"}
MAX_ASSIGNMENTS = 2048  # joint assignments the brute force lists, per model

# deterministic: the same examples every run, nothing stored between runs; no shrinking (a
# failure is reported as drawn, which keeps a failing run as fast as a passing one)
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the per-test setup is per test, not per example
    ],
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models' tensors are tiny: a second intra-op thread only adds contention (about 30x
    slower contractions on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _log_p_tol(value: float) -> float:
    return 1e-8 * (1.0 + abs(value))


# ---------------------------------------------------------------------------- random models
@st.composite
def spec_choices(draw) -> dict:
    """The structure of a random model (its numbers come from ``seed``)."""
    c = {
        "family": draw(st.sampled_from(FAMILIES)),
        "T": draw(st.integers(1, 4)),
        "K": draw(st.integers(2, 3)),
        "Kg": draw(st.sampled_from([0, 0, 2, 3])),
        "M": draw(st.sampled_from([0, 0, 2])),
        "mask_kind": draw(st.sampled_from([None, "both", "obs"])),
        "scale": draw(st.sampled_from([None, None, 0.5, 2.5])),
        "obs_mask": draw(st.booleans()),
        "dist_mask": draw(st.booleans()),
        "z_obs_mask": draw(st.booleans()),
        "N": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }
    c["inner_latent"] = c["M"] > 0 and draw(st.booleans())
    # keep the brute force small: a shorter chain, then fewer data, until it fits
    while random_spec(0, **{k: v for k, v in c.items() if k != "seed"}).n_assignments() > (
        MAX_ASSIGNMENTS
    ):
        if c["N"] > 1:
            c["N"] -= 1
        else:
            c["T"] -= 1
    return c


def _spec(c: dict):
    """The spec of drawn choices, its params new in a clear store."""
    pyro.clear_param_store()
    return random_spec(c["seed"], **{k: v for k, v in c.items() if k != "seed"})


def _check_log_p(spec) -> None:
    model = build_model(spec)
    expected = float(brute_force(spec).log_p)
    actual = float(ExactEStep(model).log_likelihood())
    by_pyro = float(pyro_log_p(model, spec.depth, spec_fills(spec)))
    msg = f"{spec.describe()}: ExactEStep {actual:.6f}, brute {expected:.6f}, Pyro {by_pyro:.6f}"
    # Pyro agrees with brute force on every structure drawn here (checked first, so that a
    # failure below is the library's)
    assert abs(by_pyro - expected) < _log_p_tol(expected), msg
    assert abs(actual - expected) < _log_p_tol(expected), msg


@PROPERTY
@given(spec_choices())
def test_random_model_log_p_equals_brute_force_and_pyro(choices):
    """log p(x) of a random model: ExactEStep = brute force = -TraceEnum_ELBO loss."""
    _check_log_p(_spec(choices))


# one piece at a time: each a regression test of its own, named by the piece it isolates
PIECES = {
    "plate_normal": {"family": "normal"},
    "plate_poisson": {"family": "poisson"},
    "plate_bernoulli": {"family": "bernoulli"},
    "plate_categorical": {"family": "categorical"},
    "global_latent": {"Kg": 3},
    "markov_chain": {"T": 4},
    "nested_plates": {"M": 2},
    "inner_plate_latent": {"M": 2, "inner_latent": True},
    "mask_latent_and_obs": {"mask_kind": "both"},
    "mask_latent_and_obs_global": {"mask_kind": "both", "Kg": 2},
    "mask_latent_and_obs_markov": {"mask_kind": "both", "T": 3},
    "mask_latent_and_obs_inner_latent": {"mask_kind": "both", "M": 2, "inner_latent": True},
    "mask_obs_only": {"mask_kind": "obs"},
    "scale": {"scale": 2.5},
    "obs_mask_on_obs": {"obs_mask": True, "family": "poisson"},
    "obs_mask_on_obs_markov": {"obs_mask": True, "T": 3},
    "obs_mask_on_latent": {"z_obs_mask": True},
    "obs_mask_on_latent_markov": {"z_obs_mask": True, "T": 3},
    "obs_mask_on_latent_masked": {"z_obs_mask": True, "mask_kind": "both"},
    "dist_mask_on_obs": {"dist_mask": True, "family": "bernoulli"},
}


def _piece_spec(name: str):
    """The piece's spec on the first seed whose masks have both values (a mask that is all
    True or all False would not test it)."""
    base = {"N": 3, "T": 1, "K": 2, "Kg": 0, "M": 0, "inner_latent": False, "family": "normal"}
    choices = {**base, **PIECES[name]}
    while random_spec(0, **choices).n_assignments() > MAX_ASSIGNMENTS:
        choices["N"] -= 1
    for seed in range(100):
        pyro.clear_param_store()
        spec = random_spec(seed, **choices)
        masks = [spec.mask] if spec.mask_kind else []
        masks += [m for m in (spec.obs_mask, spec.dist_mask, spec.z_obs_mask) if m is not None]
        if all(bool(m.any()) and not bool(m.all()) for m in masks):
            return spec
    raise AssertionError(f"no seed gives mixed masks for {name}")


@pytest.mark.parametrize("name", sorted(PIECES))
def test_piece_log_p_equals_brute_force_and_pyro(name):
    _check_log_p(_piece_spec(name))


def _check_marginals(spec) -> None:
    """ExactEStep's posterior marginal of every latent (g, z_t, w_t) equals brute force."""
    model = build_model(spec)
    expected = brute_force(spec).marginals
    actual = ExactEStep(model).marginals()
    for name, want in expected.items():
        if name.startswith("z_") and spec.z_obs_mask is not None:
            # the missing entries are the latent site z_t_unobserved; observed ones are fixed
            t = int(name[2:])
            missing = ~spec.z_obs_mask[t]
            if not missing.any():
                continue
            got = actual.get(f"{name}_unobserved")
            assert got is not None, (
                f"{spec.describe()}: no marginal for {name}_unobserved (keys {sorted(actual)})"
            )
            got, want = got.reshape(want.shape)[missing], want[missing]
        else:
            assert name in actual, f"{spec.describe()}: no marginal for {name}"
            got = actual[name].reshape(want.shape)
        err = float((got - want).abs().max()) if want.numel() else 0.0
        assert err < 1e-9, f"{spec.describe()}: marginal of {name} off by {err:.3g}\n{got}\n{want}"


@settings(PROPERTY, max_examples=20)
@given(spec_choices())
def test_random_model_marginals_equal_brute_force(choices):
    _check_marginals(_spec(choices))


@pytest.mark.parametrize("name", sorted(PIECES))
def test_piece_marginals_equal_brute_force(name):
    _check_marginals(_piece_spec(name))


# ---------------------------------------------------------------------------- DiscreteHMM
@st.composite
def hmm_choices(draw) -> dict:
    return {
        "N": draw(st.integers(1, 3)),
        "T": draw(st.integers(1, 4)),
        "K": draw(st.integers(2, 3)),
        "family": draw(st.sampled_from(FAMILIES)),
        "mask": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, 0.5, 3.0])),
        "inhomogeneous": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(PROPERTY, max_examples=25)
@given(hmm_choices())
def test_discrete_hmm_log_p_and_marginals_equal_brute_force(choices):
    """An observed DiscreteHMM site: log p(x) = brute force over every hidden path = Pyro, and
    the chain's marginals equal brute force (sequences that a mask leaves observed)."""
    spec = random_hmm_spec(**choices)
    model = build_hmm_model(spec)
    b = hmm_brute_force(spec)
    estep = ExactEStep(model)
    actual = float(estep.log_likelihood())
    by_pyro = float(pyro_log_p(model, 1))
    expected = float(b.log_p)
    msg = f"{spec.describe()}: ExactEStep {actual:.6f}, brute {expected:.6f}, Pyro {by_pyro:.6f}"
    assert abs(by_pyro - expected) < _log_p_tol(expected), msg
    assert abs(actual - expected) < _log_p_tol(expected), msg
    seen = torch.ones(spec.N, dtype=torch.bool) if spec.mask is None else spec.mask
    got = estep.marginals()["x"][seen]
    err = float((got - b.marginals["x"][seen]).abs().max()) if seen.any() else 0.0
    assert err < 1e-9, f"{spec.describe()}: chain marginals off by {err:.3g}"


def test_discrete_hmm_masked_sequence_marginals_are_the_prior():
    """A sequence that poutine.mask drops is not observed: its chain's posterior marginals are
    the prior's (a distribution over states, as for an enumerated latent whose observations are
    masked), not zeros."""
    spec = random_hmm_spec(
        3, N=3, T=3, K=3, family="normal", mask=False, scale=None, inhomogeneous=True
    )
    spec.mask = torch.tensor([True, False, True])
    got = ExactEStep(build_hmm_model(spec)).marginals()["x"]
    want = hmm_brute_force(spec).marginals["x"]
    err = float((got - want).abs().max())
    assert err < 1e-9, f"masked sequence: marginals {got[1].tolist()}, prior {want[1].tolist()}"


# ---------------------------------------------------------------------------- stationarity
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(g, N, centers, spread=0.6):
    """N points around the rows of ``centers`` (K, D), assigned round-robin."""
    K = centers.shape[0]
    idx = torch.arange(N) % K
    return centers[idx] + spread * torch.randn(N, centers.shape[1], generator=g)


def _gmm(cov: str):
    K, D = 3, 2

    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([[-1.0, 0.0], [0.5, 1.0], [1.0, -1.0]]))
        if cov == "diag":
            s = pyro.param("scale", torch.ones(K, D), constraint=constraints.positive)
        elif cov == "spherical":
            s = pyro.param("scale", torch.ones(K), constraint=constraints.positive)
        elif cov == "full":
            s = pyro.param(
                "scale_tril",
                torch.eye(D).expand(K, D, D).clone(),
                constraint=constraints.lower_cholesky,
            )
        else:
            s = pyro.param("scale_tril", torch.eye(D), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if cov == "diag":
                fn = dist.Normal(loc[z], s[z]).to_event(1)
            elif cov == "spherical":
                fn = dist.Normal(loc[z], s[z].unsqueeze(-1)).to_event(1)
            elif cov == "full":
                fn = dist.MultivariateNormal(loc[z], scale_tril=s[z])
            else:
                fn = dist.MultivariateNormal(loc[z], scale_tril=s)
            pyro.sample("x", fn, obs=x)

    centers = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, -1.0]])
    data = _blobs(_gen(1), 150, centers)
    data[::3] = data[::3] @ torch.tensor([[1.3, 0.4], [0.0, 0.7]])  # unequal covariances
    return model, (data,), 1


def _poisson_mixture():
    K = 2

    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        rate = pyro.param(
            "rate",
            torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]),
            constraint=constraints.positive,
        )
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Poisson(rate[z]).to_event(1), obs=x)

    g = _gen(2)
    truth = torch.tensor([[0.5, 4.0, 8.0], [6.0, 1.0, 2.0]])
    data = torch.poisson(truth[torch.arange(120) % K], generator=g)
    return model, (data,), 1


def _bernoulli_mixture():
    K = 2

    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        p = pyro.param(
            "p",
            torch.tensor([[0.4, 0.5, 0.6, 0.5, 0.4, 0.6], [0.6, 0.5, 0.4, 0.5, 0.6, 0.4]]),
            constraint=constraints.unit_interval,
        )
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Bernoulli(probs=p[z]).to_event(1), obs=x)

    g = _gen(3)
    truth = torch.tensor([[0.9, 0.8, 0.2, 0.1, 0.9, 0.2], [0.1, 0.3, 0.8, 0.9, 0.2, 0.7]])
    probs = truth[torch.arange(150) % K]
    return model, ((torch.rand(probs.shape, generator=g) < probs).double(),), 1


def _categorical_hmm():
    K = 2

    def model(x):
        start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param(
            "trans", torch.tensor([[0.6, 0.4], [0.3, 0.7]]), constraint=constraints.simplex
        )
        emit = pyro.param(
            "emit", torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]), constraint=constraints.simplex
        )
        with pyro.plate("seq", x.shape[0]):
            z = None
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(
                    f"z_{t}", dist.Categorical(start if z is None else trans[z]), infer=PAR
                )
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=x[:, t])

    g = _gen(4)
    N, T = 30, 6
    states = torch.zeros(N, T, dtype=torch.long)
    states[:, 0] = torch.randint(K, (N,), generator=g)
    for t in range(1, T):
        stay = torch.rand(N, generator=g) < 0.85
        states[:, t] = torch.where(stay, states[:, t - 1], 1 - states[:, t - 1])
    emit = torch.tensor([[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]])
    data = torch.multinomial(emit[states.reshape(-1)], 1, generator=g).reshape(N, T)
    return model, (data,), 1


def _gaussian_discrete_hmm():
    K = 2

    def model(x):
        init = pyro.param("init", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param(
            "trans", torch.tensor([[0.7, 0.3], [0.3, 0.7]]), constraint=constraints.simplex
        )
        loc = pyro.param("loc", torch.tensor([-0.5, 0.5]))
        scale = pyro.param("scale", torch.ones(K), constraint=constraints.positive)
        fn = dist.DiscreteHMM(init.log(), trans.log(), dist.Normal(loc, scale))
        with pyro.plate("seq", x.shape[0]):
            pyro.sample("x", fn, obs=x)

    g = _gen(5)
    N, T = 10, 20
    states = torch.zeros(N, T, dtype=torch.long)
    for t in range(1, T):
        stay = torch.rand(N, generator=g) < 0.9
        states[:, t] = torch.where(stay, states[:, t - 1], 1 - states[:, t - 1])
    data = torch.tensor([-2.0, 2.0])[states] + 0.7 * torch.randn(N, T, generator=g)
    return model, (data,), 1


def _interval_params():
    """A mixture whose params sit under interval constraints other than [0, 1], with data
    pushing each of them onto a bound (the constrained maximizer is the clipped one)."""
    K = 2

    def model(a, b, c):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        rate = pyro.param(
            "rate", torch.tensor([1.0, 1.5]), constraint=constraints.interval(0.5, 3.0)
        )
        loc = pyro.param(
            "loc", torch.tensor([-0.5, 0.5]), constraint=constraints.interval(-2.0, 2.0)
        )
        scale = pyro.param("scale", torch.ones(K), constraint=constraints.positive)
        p = pyro.param("p", torch.tensor([0.4, 0.6]), constraint=constraints.interval(0.1, 0.9))
        with pyro.plate("data", len(a)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("a", dist.Poisson(rate[z]), obs=a)
            pyro.sample("b", dist.Normal(loc[z], scale[z]), obs=b)
            pyro.sample("c", dist.Bernoulli(probs=p[z]), obs=c)

    g = _gen(6)
    N = 120
    k = torch.arange(N) % K
    # component 0: counts of mean 1, Normal around -3 (below -2), Bernoulli 0.98 (above 0.9);
    # component 1: counts of mean 6 (above 3), Normal around 1, Bernoulli 0.3
    a = torch.poisson(torch.tensor([1.0, 6.0])[k], generator=g)
    b = torch.tensor([-3.0, 1.0])[k] + 0.5 * torch.randn(N, generator=g)
    c = (torch.rand(N, generator=g) < torch.tensor([0.98, 0.3])[k]).double()
    return model, (a, b, c), 1


def _greater_than_params():
    """Scales under greater_than, one pushed onto its bound by data of a smaller spread."""
    K = 2

    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
        scale = pyro.param("scale", torch.ones(K), constraint=constraints.greater_than(0.3))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    g = _gen(8)
    N = 120
    k = torch.arange(N) % K
    # spreads 0.1 (below the bound 0.3) and 1.0
    x = torch.tensor([-3.0, 3.0])[k] + torch.tensor([0.1, 1.0])[k] * torch.randn(N, generator=g)
    return model, (x,), 1


def _mvn_shared_loc():
    """One MVN loc shared by components with different scale_tril: the loc's maximizer is
    precision-weighted, not the plain weighted mean."""
    K, D = 2, 2

    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.zeros(D))
        L = pyro.param(
            "scale_tril",
            torch.stack([torch.eye(D), 2 * torch.eye(D)]),
            constraint=constraints.lower_cholesky,
        )
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.MultivariateNormal(loc, scale_tril=L[z]), obs=x)

    g = _gen(7)
    N = 200
    k = torch.arange(N) % K
    centers = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])  # different means: the weighting matters
    scales = torch.tensor([0.3, 3.0])
    data = centers[k] + scales[k, None] * torch.randn(N, D, generator=g)
    return model, (data,), 1


FAMILIES_EM = {
    "gmm_diag": lambda: _gmm("diag"),
    "gmm_spherical": lambda: _gmm("spherical"),
    "gmm_full": lambda: _gmm("full"),
    "gmm_tied": lambda: _gmm("tied"),
    "poisson_mixture": _poisson_mixture,
    "bernoulli_mixture": _bernoulli_mixture,
    "categorical_hmm_markov": _categorical_hmm,
    "gaussian_discrete_hmm": _gaussian_discrete_hmm,
    "interval_params": _interval_params,
    "greater_than_params": _greater_than_params,
    "mvn_shared_loc_per_component_cov": _mvn_shared_loc,
}

_BOUND_TOL = 1e-6  # a value this close (relative to the scale of the bound) is at the bound


def _bounds(c) -> tuple[float | None, float | None]:
    """Lower and upper bounds of a box-type constraint (None where unbounded)."""
    lo = getattr(c, "lower_bound", None)  # positive and greater_than: lower_bound only
    hi = getattr(c, "upper_bound", None)
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _project(g: torch.Tensor, value: torch.Tensor, c) -> torch.Tensor:
    """The part of the ascent direction ``g`` (the gradient at the constrained ``value``) that
    stays feasible: zero at a KKT point of the constrained maximization."""
    if isinstance(c, type(constraints.simplex)):
        interior = value > _BOUND_TOL
        # tangent space {v : sum v = 0}; a component at 0 may only grow (g_k <= mean there)
        mean = (g * interior).sum(-1, keepdim=True) / interior.sum(-1, keepdim=True)
        return torch.where(interior, g - mean, (g - mean).clamp_min(0))
    if isinstance(c, type(constraints.lower_cholesky)):
        return g.tril()
    if isinstance(c, type(constraints.positive_definite)):
        return 0.5 * (g + g.transpose(-1, -2))
    lo, hi = _bounds(c)
    out = g
    if lo is not None:  # at the lower bound only an increase is feasible
        at = value - lo <= _BOUND_TOL * (1 + abs(lo))
        out = torch.where(at, out.clamp_min(0), out)
    if hi is not None:
        at = hi - value <= _BOUND_TOL * (1 + abs(hi))
        out = torch.where(at, out.clamp_max(0), out)
    return out


def _projected_grads(model, args, depth, names) -> dict[str, torch.Tensor]:
    """Projected gradient of log p(x) (Pyro's TraceEnum_ELBO, empty guide) with respect to the
    constrained value of each named param, at the param store's values."""
    store = pyro.get_param_store()
    leaves = {n: store[n].detach().clone().requires_grad_() for n in names}
    elbo = TraceEnum_ELBO(max_plate_nesting=depth)

    def guide(*a, **k):
        pass

    with warnings.catch_warnings():
        # a model whose only chain is a DiscreteHMM site enumerates nothing, as intended
        warnings.filterwarnings("ignore", "TraceEnum_ELBO found no sample sites")
        loss = elbo.differentiable_loss(poutine.substitute(model, data=leaves), guide, *args)
    grads = torch.autograd.grad(-loss, list(leaves.values()), allow_unused=True)
    out = {}
    for (n, leaf), g in zip(leaves.items(), grads):
        g = torch.zeros_like(leaf) if g is None else g
        out[n] = _project(g, leaf.detach(), store._constraints[n])
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES_EM))
def test_converged_em_is_stationary(family):
    """A fit that reports convergence stopped at a stationary point of log p(x) with respect to
    every closed-form param (projected onto its constraint), and never decreased log p(x)."""
    model, args, depth = FAMILIES_EM[family]()
    result = fit(
        model,
        ExactEStep(model),
        *args,
        optim=EMOptim(reg_covar=0.0),  # the plain maximizer: reg_covar would move the point
        tol=1e-10,
        max_iter=2000,
        progress=False,
    )
    hist = result.history["log_likelihood"]
    drops = [b - a for a, b in itertools.pairwise(hist) if b - a < -1e-9 * (1 + abs(a))]
    assert not drops, f"{family}: log p(x) decreased by {[-d for d in drops]}"
    assert result.converged, f"{family}: no convergence in {result.n_iter} iterations"
    assert result.closed_form, f"{family}: no closed-form param"
    grads = _projected_grads(model, args, depth, result.closed_form)
    n = result.n_data
    worst = {name: float(g.abs().max()) / n for name, g in grads.items()}
    # |dlog p/N| < tol per iteration bounds the gradient per datum only to ~sqrt(tol) (an EM
    # step moves a param by about gradient / curvature): 1e-4 is ten times that, and a wrong
    # maximizer leaves gradients of order 1e-2 and more
    bad = {name: w for name, w in worst.items() if not w < 1e-4 or math.isnan(w)}
    assert not bad, (
        f"{family}: max |projected d log p / d param| per datum {bad} after {result.n_iter} "
        f"converged iterations (params { {k: result.params[k].tolist() for k in bad} })"
    )


def test_converged_ecm_is_stationary_in_its_gradient_params():
    """ECM with the loc on Adam steps (the rest closed-form): a small change of log p(x) is no
    proof of a stationary point (a step across the optimum, or one the guard undid, moves it
    little), so fit checks the gradient params' gradient before it reports convergence. Before
    that check this fit reported converged after 22 iterations with |d log p / d loc| / N =
    2.2e-4."""
    model, args, depth = _mvn_shared_loc()
    optim = EMOptim(
        closed_form=["w", "scale_tril"], reg_covar=0.0, svi_optim=pyro.optim.Adam({"lr": 0.01})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the guard's notes of undone steps)
        result = fit(model, ExactEStep(model), *args, optim=optim, tol=1e-10, max_iter=3000)
    assert result.converged and result.gradient == ["loc"]
    grads = _projected_grads(model, args, depth, ["loc", "w", "scale_tril"])
    worst = {name: float(g.abs().max()) / result.n_data for name, g in grads.items()}
    assert worst["loc"] <= 1e-5 * 1.01, worst  # sqrt(tol): the bound fit checks
    assert max(worst.values()) < 1e-4, worst
