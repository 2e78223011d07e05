"""Input validation (:mod:`pyro_emvae.validate`): a battery of bad inputs, each raising a clear
error (its type, and a message naming the site / shape / value), before any work; no false
alarms on valid models; and missing data by masks, checked against brute force.

Every bad input is tried where a user meets it: ``ExactEStep(model).posterior(...)`` for the
E-step's checks, and ``validate_fit_inputs`` (what ``fit`` runs before its first iteration)
for the fit-level ones, including the SVI path of a VAE.
"""

from __future__ import annotations

import itertools
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from models import gmm, hmm
from pyro_emvae import EMOptim, EnumerationError, ExactEStep, ModelInputError, fit, validate
from pyro_emvae.validate import PrecisionWarning, validate_fit_inputs

PAR = {"enumerate": "parallel"}
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------- model builders
def _gmm_data(n: int = 20, k: int = 2, d: int = 2) -> torch.Tensor:
    return gmm.sample_gmm(n, k, d, seed=0)[0]


def mixture(family: str, k: int = 2, d: int = 3) -> Callable:
    """A k-component mixture of ``family`` emissions over rows of d features."""

    def model(x):
        w = pyro.param("w", torch.ones(k) / k, constraint=constraints.simplex)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if family == "poisson":
                rate = pyro.param("rate", torch.arange(1.0, k + 1).unsqueeze(-1).expand(k, d))
                fn = dist.Poisson(rate[z]).to_event(1)
            elif family == "bernoulli":
                p = pyro.param("p", torch.linspace(0.2, 0.8, k).unsqueeze(-1).expand(k, d))
                fn = dist.Bernoulli(p[z]).to_event(1)
            else:
                locs = pyro.param("locs", torch.linspace(-1, 1, k).unsqueeze(-1).expand(k, d))
                fn = dist.Normal(locs[z], 1.0).to_event(1)
            pyro.sample("x", fn, obs=x)

    return model


def regression_mixture(x_in, y):
    """A mixture of regressions: the covariate enters the distribution's loc."""
    beta = pyro.param("beta", torch.tensor([[1.0, 0.5], [-1.0, 0.2]]))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("y", dist.Normal((x_in * beta[z]).sum(-1), 1.0), obs=y)


def plate_mismatch(x):
    locs = pyro.param("locs", torch.zeros(2, 2))
    with pyro.plate("data", x.shape[0] + 1):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=x)


def feature_mismatch(x):
    locs = pyro.param("locs", torch.zeros(2, 3))  # 3 features in the model, 2 in the data
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=x)


def scalar_emission_on_rows(x):
    """One scalar per component, but rows of 2 features: batch (2, N) vs value batch (N, 2)."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def undeclared_dim(x):
    """x is (3, N) under a single plate at dim -1: dim -2 of size 3 is no plate's."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def missing_to_event(x):
    """Features as a batch dim under the data plate: Pyro's plate broadcast fails."""
    locs = pyro.param("locs", torch.zeros(2, x.shape[1]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def second_order_chain(history: int, lag_in: str) -> Callable:
    """A chain whose ``lag_in`` ('z': the transition, 'x': the emission) reaches two steps
    back, declared with ``pyro.markov(history=history)``."""
    k = 2
    trans2 = torch.softmax(torch.randn(k, k, k, generator=torch.Generator().manual_seed(0)), -1)
    trans = trans2[0]
    locs = torch.tensor([-1.0, 1.0])

    def model(x):
        with pyro.plate("seq", x.shape[0]):
            zs = []
            for t in pyro.markov(range(x.shape[1]), history=history):
                if t == 0:
                    p = torch.ones(k) / k
                elif lag_in == "z" and t >= 2:
                    p = trans2[zs[-2], zs[-1]]
                else:
                    p = trans[zs[-1]]
                z = pyro.sample(f"z_{t}", dist.Categorical(p), infer=PAR)
                zs.append(z)
                loc = locs[z] + (locs[zs[-3]] if lag_in == "x" and t >= 2 else 0.0)
                pyro.sample(f"x_{t}", dist.Normal(loc, 1.0), obs=x[:, t])

    return model


def after_the_loop(x, y):
    """A site after a pyro.markov loop that depends on the loop's last state."""
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    with pyro.plate("seq", x.shape[0]):
        z = None
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(
                f"z_{t}", dist.Categorical(trans[0] if z is None else trans[z]), infer=PAR
            )
            pyro.sample(f"x_{t}", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x[:, t])
        pyro.sample("y", dist.Normal(torch.tensor([0.0, 3.0])[z], 1.0), obs=y)


def two_big_sites(n: int, k: int) -> Callable:
    """Two enumerated sites of k values each feeding one observed site in a plate of n: a
    log-prob factor of k * k * n values (built lazily by broadcasting: nothing that big is
    allocated before the check)."""

    def model(x):
        locs = pyro.param("locs", torch.zeros(k))
        scales = pyro.param("scales", torch.ones(k), constraint=constraints.positive)
        a = pyro.sample("a", dist.Categorical(logits=torch.zeros(k)), infer=PAR)
        b = pyro.sample("b", dist.Categorical(logits=torch.zeros(k)), infer=PAR)
        with pyro.plate("data", n):
            pyro.sample("x", dist.Normal(locs[a], scales[b]), obs=x)

    return model


def many_global_sites(x):
    for i in range(x.shape[0]):
        b = pyro.sample(f"b{i}", dist.Bernoulli(0.5), infer=PAR)
        pyro.sample(f"x{i}", dist.Normal(b, 1.0), obs=x[i])


def param_model(init, constraint=constraints.real) -> Callable:
    def model(x):
        scale = pyro.param("scale", init, constraint=constraint)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], scale[z].abs()), obs=x)

    return model


def obs_mask_gmm(x, mask):
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.5]]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=x, obs_mask=mask)


def continuous_latent(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def unannotated(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)


def sequential(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "sequential"})
        pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)


class Decoder(torch.nn.Module):
    def __init__(self, z_dim: int = 2, x_dim: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(z_dim, x_dim)

    def forward(self, z):
        return self.lin(z)


def vae(decoder: torch.nn.Module, family: str = "normal") -> Callable:
    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            out = decoder(z)
            fn = dist.Bernoulli(logits=out) if family == "bernoulli" else dist.Normal(out, 1.0)
            pyro.sample("x", fn.to_event(1), obs=x)

    return model


def enumerating_svi_model(n: int, k: int) -> Callable:
    """A continuous global latent (for SVI) beside two big enumerated sites."""
    inner = two_big_sites(n, k)

    def model(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        inner(x)

    return model


# ---------------------------------------------------------------------------- the battery
@dataclass
class Case:
    """One bad input: ``build()`` returns ``(model, args)``; ``via`` says who meets it."""

    id: str
    build: Callable[[], tuple[Callable, tuple]]
    exc: type[Exception]
    fragments: list[str]
    via: str = "posterior"  # or "fit" (validate_fit_inputs, exact) or "svi" (exact=False)
    kwargs: dict = field(default_factory=dict)  # for ExactEStep(...)
    no_validation: bool = False  # with Pyro's validation off


def _nan_at(x: torch.Tensor, idx: tuple, value: float = NAN) -> torch.Tensor:
    x = x.clone()
    x[idx] = value
    return x


def _gmm_case(x):
    return gmm.make_gmm_model(2, "diag"), (x,)


def _dhmm_nan():
    x = hmm.sample_gaussian_hmm(3, 10, 2, 2, seed=0)[0]
    return (lambda x: hmm.gaussian_hmm(x, 2)), (_nan_at(x, (1, 5, 0)),)


def _cat_hmm_out_of_range():
    x, truth = hmm.sample_categorical_hmm(2, 6, 2, 3, seed=0)
    x = x.clone()
    x[1, 4] = 7  # 3 symbols in the model
    return (lambda x: hmm.categorical_hmm_markov(x, 2, 3, init=truth)), (x,)


def _cat_dhmm_out_of_range():
    x, truth = hmm.sample_categorical_hmm(2, 6, 2, 3, seed=0)
    x = x.clone()
    x[0, 2] = -1
    return (lambda x: hmm.categorical_hmm(x, 2, 3, init=truth)), (x,)


def _poisson_negative():
    x = torch.ones(8, 3)
    x[2, 1] = -1.0
    return mixture("poisson"), (x,)


def _bernoulli_half():
    x = torch.zeros(8, 3)
    x[5, 0] = 0.5
    return mixture("bernoulli"), (x,)


def _covariate_nan():
    x_in = torch.randn(6, 2)
    x_in[4, 1] = NAN
    return regression_mixture, (x_in, torch.randn(6))


def _markov(history, lag_in):
    return second_order_chain(history, lag_in), (torch.randn(3, 5),)


def _vae_nan():
    x = torch.randn(10, 4)
    x[7, 2] = NAN
    return vae(Decoder()), (x,)


def _vae_nan_weight():
    dec = Decoder()
    with torch.no_grad():
        dec.lin.weight[1, 0] = NAN
    return vae(dec), (torch.randn(10, 4),)


def _gmm_k_too_large():
    x = _gmm_data(3, 2, 2)
    init = {"weights": torch.ones(5) / 5, "locs": torch.randn(5, 2), "scales": torch.ones(5, 2)}
    return gmm.make_gmm_model(5, "diag", init=init), (x,)


def _hmm_k_too_large():
    x, _ = hmm.sample_categorical_hmm(1, 3, 2, 3, seed=0)
    init = {
        "start": torch.ones(5) / 5,
        "trans": torch.ones(5, 5) / 5,
        "emission_probs": torch.ones(5, 3) / 3,
    }
    return (lambda x: hmm.categorical_hmm(x, 5, 3, init=init)), (x,)


CASES = [
    # NaN / inf / support of observed values
    Case(
        "gmm-nan",
        lambda: _gmm_case(_nan_at(_gmm_data(), (3, 1))),
        ModelInputError,
        ["observed site 'x'", "1 NaN", "index (3, 1)", "mask", "obs_mask"],
    ),
    Case(
        "gmm-inf",
        lambda: _gmm_case(_nan_at(_gmm_data(), (0, 0), INF)),
        ModelInputError,
        ["observed site 'x'", "1 inf", "index (0, 0)"],
    ),
    Case(
        "gmm-nan-and-inf",
        lambda: _gmm_case(_nan_at(_nan_at(_gmm_data(), (2, 0)), (5, 1), -INF)),
        ModelInputError,
        ["1 NaN and 1 inf", "index (2, 0)"],
    ),
    Case("dhmm-nan", _dhmm_nan, ModelInputError, ["observed site 'x'", "(1, 5, 0)", "(3, 10, 2)"]),
    Case(
        "poisson-negative-count",
        _poisson_negative,
        ModelInputError,
        ["observed site 'x'", "support", "index (2, 1): -1.0"],
    ),
    Case(
        "bernoulli-non-binary",
        _bernoulli_half,
        ModelInputError,
        ["observed site 'x'", "support", "index (5, 0): 0.5"],
    ),
    Case(
        "categorical-symbol-out-of-range",
        _cat_hmm_out_of_range,
        ModelInputError,
        ["observed site 'x_4'", "support", "index (1,): 7"],
    ),
    Case(
        "dhmm-symbol-negative",
        _cat_dhmm_out_of_range,
        ModelInputError,
        ["observed site 'x'", "support", "index (0, 2): -1"],
    ),
    Case(
        "covariate-nan-validation-off",
        _covariate_nan,
        ModelInputError,
        ["site 'y'", "'loc'", "NaN", "index (0, 4)"],
        no_validation=True,
    ),
    # shapes
    Case(
        "rows-vs-plate",
        lambda: (plate_mismatch, (torch.randn(9, 2),)),
        ModelInputError,
        ["observed site 'x'", "(9, 2)", "plate 'data' (size 10, dim -1)"],
    ),
    Case(
        "features-vs-event",
        lambda: (feature_mismatch, (torch.randn(9, 2),)),
        ModelInputError,
        ["observed site 'x'", "(9, 2)", "event shape (3,)"],
    ),
    Case(
        "rows-of-features-vs-scalar",
        lambda: (scalar_emission_on_rows, (torch.randn(6, 2),)),
        ModelInputError,
        ["observed site 'x'", "batch shape (6, 2)", "does not broadcast", "'data': 6"],
    ),
    Case(
        "dim-no-plate-declares",
        lambda: (undeclared_dim, (torch.randn(3, 6),)),
        ModelInputError,
        ["observed site 'x'", "size 3 at dim -2", "no plate declares", "'data': 6 at dim -1"],
        kwargs={"max_plate_nesting": 2},
    ),
    Case(
        "features-as-batch",
        lambda: (missing_to_event, (torch.randn(6, 2),)),
        ModelInputError,
        ["Shape mismatch inside plate('data')", "site x", ".to_event(1)"],
    ),
    Case(
        "max-plate-nesting-too-small",
        lambda: _gmm_case(_gmm_data()),
        ModelInputError,
        ["plate 'data' (size 20, dim -1)", "max_plate_nesting=0", ">= 1"],
        kwargs={"max_plate_nesting": 0},
    ),
    # pyro.markov windows
    Case(
        "markov-transition-lag-2",
        lambda: _markov(1, "z"),
        EnumerationError,
        ["site 'z_2'", "enumerated site 'z_0'", "pyro.markov window", "history"],
    ),
    Case(
        "markov-emission-lag-2",
        lambda: _markov(1, "x"),
        EnumerationError,
        ["site 'x_2'", "enumerated site 'z_0'", "['z_1', 'z_2']"],
    ),
    Case(
        "markov-site-after-loop",
        lambda: (after_the_loop, (torch.randn(2, 4), torch.randn(2))),
        EnumerationError,
        ["site 'y'", "outside the pyro.markov context", "'z_3'"],
    ),
    # memory
    Case(
        "enumeration-beyond-memory",
        lambda: (two_big_sites(10**6, 2000), (torch.randn(10**6),)),
        EnumerationError,
        [
            "site 'x'",
            "(2000, 2000, 1000000)",
            "'a' (2000 values)",
            "'b' (2000 values)",
            "plate 'data' (size 1000000",
            "available",
        ],
    ),
    Case(
        # independent sites, each with its own observation: no tensor spans two of them, so
        # the budget lets them be; torch's 64 tensor dims run out first
        "more-enumerated-dims-than-torch",
        lambda: (many_global_sites, (torch.randn(70),)),
        EnumerationError,
        ["64", "pyro.plate", "pyro.markov"],
    ),
    # params
    Case(
        "param-nan",
        lambda: (param_model(torch.tensor([1.0, NAN])), (torch.randn(5),)),
        ModelInputError,
        ["param 'scale'", "1 non-finite", "index (1,)", "non-finite entries"],
    ),
    Case(
        "param-inf",
        lambda: (param_model(torch.tensor([INF, 1.0])), (torch.randn(5),)),
        ModelInputError,
        ["param 'scale'", "inf at index (0,)"],
    ),
    Case(
        "param-outside-constraint",
        lambda: (param_model(torch.tensor([-1.0, 2.0]), constraints.positive), (torch.randn(5),)),
        ModelInputError,
        ["param 'scale'", "outside its constraint", "GreaterThan"],
    ),
    # enumeration
    Case(
        "continuous-latent",
        lambda: (continuous_latent, (torch.randn(5),)),
        EnumerationError,
        ["site 'mu'", "continuous latent"],
    ),
    Case(
        "unannotated-discrete",
        lambda: (unannotated, (torch.randn(5),)),
        EnumerationError,
        ["site 'z'", "without an enumeration annotation"],
    ),
    Case(
        "sequential-enumeration",
        lambda: (sequential, (torch.randn(5),)),
        EnumerationError,
        ["site 'z'", "sequential"],
    ),
    # fit (validate_fit_inputs, as fit calls it)
    Case(
        "fit-gmm-nan",
        lambda: _gmm_case(_nan_at(_gmm_data(), (7, 0))),
        ModelInputError,
        ["observed site 'x'", "index (7, 0)"],
        via="fit",
    ),
    Case(
        "fit-more-components-than-points",
        _gmm_k_too_large,
        ModelInputError,
        ["site 'z'", "K=5", "only 3", "scikit-learn", "K <= 3"],
        via="fit",
    ),
    Case(
        "fit-more-hidden-states-than-steps",
        _hmm_k_too_large,
        ModelInputError,
        ["site 'x'", "K=5 hidden states", "only 3"],
        via="fit",
    ),
    Case(
        "fit-rows-vs-plate",
        lambda: (plate_mismatch, (torch.randn(9, 2),)),
        ModelInputError,
        ["observed site 'x'", "plate 'data' (size 10, dim -1)"],
        via="fit",
    ),
    Case(
        "fit-param-nan",
        lambda: (param_model(torch.tensor([NAN, 1.0])), (torch.randn(5),)),
        ModelInputError,
        ["param 'scale'"],
        via="fit",
    ),
    Case(
        "svi-vae-nan-data",
        _vae_nan,
        ModelInputError,
        ["observed site 'x'", "1 NaN", "index (7, 2)", "obs_mask"],
        via="svi",
    ),
    Case(
        "svi-vae-nan-weight",
        _vae_nan_weight,
        ModelInputError,
        ["param 'decoder$$$lin.weight'", "index (1, 0)"],
        via="svi",
    ),
    Case(
        "svi-enumeration-beyond-memory",
        lambda: (enumerating_svi_model(10**6, 2000), (torch.randn(10**6),)),
        EnumerationError,
        ["site 'x'", "(2000, 2000, 1000000)"],
        via="svi",
    ),
]


def _run(case: Case) -> None:
    model, args = case.build()
    if case.via == "posterior":
        ExactEStep(model, **case.kwargs).posterior(*args)
    else:
        validate_fit_inputs(model, args, {}, exact=case.via == "fit")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_a_clear_error(case: Case) -> None:
    with pyro.validation_enabled(not case.no_validation), pytest.raises(case.exc) as info:
        _run(case)
    assert type(info.value) is case.exc or isinstance(info.value, case.exc)
    message = str(info.value)
    for fragment in case.fragments:
        assert fragment in message, (fragment, message)


def test_battery_size() -> None:
    assert len(CASES) >= 15
    assert {c.via for c in CASES} == {"posterior", "fit", "svi"}


def test_memory_check_uses_the_available_memory(monkeypatch) -> None:
    """A modest enumeration refused when (as patched) little memory is left; the estimate is
    PEAK_FACTORS times the largest factor (2 * 3 * 100 float64 values here)."""
    model = two_big_sites(100, 3)
    x = torch.randn(100)
    ExactEStep(model).posterior(x)  # fits in the real memory
    need = validate.PEAK_FACTORS * 3 * 3 * 100 * 8
    monkeypatch.setattr(validate, "available_memory", lambda device=None: need - 1)
    with pytest.raises(EnumerationError, match=r"at least 28.8 KB but 28.8 KB is available"):
        ExactEStep(model).posterior(x)
    monkeypatch.setattr(validate, "available_memory", lambda device=None: need)
    ExactEStep(model).posterior(x)


def test_fit_itself_reports_nan_data_through_the_estep() -> None:
    """fit's first E-step already runs the E-step's checks: the error, not a NaN history."""
    model, (x,) = _gmm_case(_nan_at(_gmm_data(), (3, 1)))
    with pytest.raises(ModelInputError, match=r"index \(3, 1\)"):
        fit(model, ExactEStep(model), x, max_iter=3)


def test_no_bare_assertion_or_nan_from_the_markov_case() -> None:
    """Without the check, a Categorical chain with a too-short window fails by a bare
    AssertionError inside Pyro; an emission lag gives a silently wrong log p(x)."""
    with pytest.raises(EnumerationError):
        ExactEStep(second_order_chain(1, "z")).log_likelihood(torch.randn(3, 5))
    # the declared window that covers the lag is accepted, and agrees with history=3
    x = torch.randn(3, 5)
    a = ExactEStep(second_order_chain(2, "x")).log_likelihood(x)
    b = ExactEStep(second_order_chain(3, "x")).log_likelihood(x)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- re-validation
def test_checks_run_once_per_arguments_and_again_for_new_data() -> None:
    model = gmm.make_gmm_model(2, "diag")
    x = _gmm_data()
    guide = ExactEStep(model)
    guide.posterior(x)
    assert guide._validation.seen(guide._validation.key((x,), {})[0])
    # a new tensor of the same shape is checked again
    with pytest.raises(ModelInputError, match="NaN"):
        guide.posterior(_nan_at(x, (0, 0)))
    # so is the same tensor changed in place
    guide.posterior(x)
    with torch.no_grad():
        x[4, 1] = NAN
    with pytest.raises(ModelInputError, match=r"index \(4, 1\)"):
        guide.posterior(x)


def test_subsampled_minibatches_are_each_checked() -> None:
    x = torch.randn(40)
    x[37] = NAN

    def model(x):
        with pyro.plate("data", len(x), subsample_size=5) as idx:
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x[idx])

    guide = ExactEStep(model)
    with pytest.raises(ModelInputError, match="NaN"):
        for _ in range(200):  # some minibatch holds point 37
            guide.posterior(x)


def test_exact_estep_pickles_after_validation() -> None:
    guide = ExactEStep(regression_mixture)
    guide.posterior(torch.randn(6, 2), torch.randn(6))
    clone = pickle.loads(pickle.dumps(guide))
    assert clone._validation._key is None


# ---------------------------------------------------------------------------- float32 chains
def _dhmm_float32(t: int, dtype: torch.dtype) -> None:
    x, truth = hmm.sample_gaussian_hmm(1, t, 3, 1, seed=0)
    torch.set_default_dtype(dtype)  # conftest restores float64
    init = {k: v.to(dtype) for k, v in truth.items()}
    ExactEStep(lambda x: hmm.gaussian_hmm(x, 3, init=init)).posterior(x.to(dtype))


def test_float32_long_discrete_hmm_warns() -> None:
    with pytest.warns(PrecisionWarning, match=r"site 'x' \(a DiscreteHMM chain\) of length 20000"):
        _dhmm_float32(20000, torch.float32)


@pytest.mark.parametrize("t, dtype", [(1000, torch.float32), (20000, torch.float64)])
def test_short_float32_or_float64_chains_do_not_warn(t, dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dhmm_float32(t, dtype)


def test_float32_markov_chain_warns_past_the_tolerance(monkeypatch) -> None:
    """The pyro.markov form is read the same way (a chain of ~12,000 steps would take a minute:
    a lower tolerance stands in for the length)."""
    x, truth = hmm.sample_gaussian_hmm(2, 30, 2, 1, seed=0)
    torch.set_default_dtype(torch.float32)
    init = {k: v.float() for k, v in truth.items()}
    model = lambda x: hmm.gaussian_hmm_markov(x, 2, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExactEStep(model).posterior(x.float())
    monkeypatch.setattr(validate, "CHAIN_ERROR_TOLERANCE", 1e-7)
    with pytest.warns(PrecisionWarning, match="a pyro.markov chain of length 30 in torch.float32"):
        ExactEStep(model).posterior(x.float())


# ---------------------------------------------------------------------------- no false alarms
def _valid_model(name: str) -> tuple[Callable, tuple]:
    return {n: (m, a) for n, m, a in _valid_models()}[name]


def _valid_models() -> list[tuple[str, Callable, tuple]]:
    x = _gmm_data(30, 3, 2)
    g, gt = hmm.sample_gaussian_hmm(2, 12, 3, 2, seed=0)
    c, ct = hmm.sample_categorical_hmm(2, 12, 2, 4, seed=0)
    out = [(f"gmm-{cov}", gmm.make_gmm_model(3, cov), (x,)) for cov in gmm.COVARIANCE_TYPES]
    out += [
        ("gaussian-hmm", lambda x: hmm.gaussian_hmm(x, 3, init=gt), (g,)),
        ("gaussian-hmm-markov", lambda x: hmm.gaussian_hmm_markov(x, 3, init=gt), (g,)),
        ("categorical-hmm", lambda x: hmm.categorical_hmm(x, 2, 4, init=ct), (c,)),
        ("categorical-hmm-markov", lambda x: hmm.categorical_hmm_markov(x, 2, 4, init=ct), (c,)),
        ("poisson-mixture", mixture("poisson"), (torch.poisson(torch.ones(10, 3) * 2),)),
        ("bernoulli-mixture", mixture("bernoulli"), (torch.bernoulli(torch.ones(10, 3) / 2),)),
        ("second-order-chain", second_order_chain(2, "z"), (torch.randn(3, 5),)),
        ("change-point", change_point, (torch.randn(4),)),
        ("factor-and-scale", factor_and_scale, (torch.randn(8),)),
        ("nested-plates-global-local", nested_plates, (torch.randn(4, 5),)),
        ("one-hot-subsampled", one_hot_subsampled, (torch.randn(30),)),
    ]
    return out


def factor_and_scale(x):
    """pyro.factor (a Unit site with an empty value) and poutine.scale."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with poutine.scale(scale=2.0), pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
    pyro.factor("penalty", -(locs**2).sum())


def nested_plates(x):
    """A global choice, a per-group choice, observations in groups x items."""
    g = pyro.sample("g", dist.Bernoulli(0.3), infer=PAR).long()
    with pyro.plate("groups", x.shape[0], dim=-2):
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3), infer=PAR)
        with pyro.plate("items", x.shape[1], dim=-1):
            loc = torch.tensor([-1.0, 0.0, 1.0])[c] + torch.tensor([0.0, 2.0])[g]
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def one_hot_subsampled(x):
    with pyro.plate("data", len(x), subsample_size=10) as idx:
        z = pyro.sample("z", dist.OneHotCategorical(torch.ones(3) / 3), infer=PAR)
        pyro.sample("x", dist.Normal((z * torch.tensor([-1.0, 0.0, 1.0])).sum(-1), 1.0), obs=x[idx])


def change_point(x):
    """A global latent with more values (T + 1) than data: exempt from the K <= n check."""
    tau = pyro.sample("tau", dist.Categorical(torch.ones(len(x) + 1)), infer=PAR)
    with pyro.plate("time", len(x)) as t:
        pyro.sample("x", dist.Normal((t >= tau).double() * 2.0, 1.0), obs=x)


VALID = [
    *(f"gmm-{cov}" for cov in gmm.COVARIANCE_TYPES),
    "gaussian-hmm",
    "gaussian-hmm-markov",
    "categorical-hmm",
    "categorical-hmm-markov",
    "poisson-mixture",
    "bernoulli-mixture",
    "second-order-chain",
    "change-point",
    "factor-and-scale",
    "nested-plates-global-local",
    "one-hot-subsampled",
]


@pytest.mark.parametrize("name", VALID)
def test_valid_models_raise_and_warn_nothing(name) -> None:
    model, args = _valid_model(name)  # built here, in the test's float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = ExactEStep(model).posterior(*args)
        assert torch.isfinite(post.log_likelihood)
        validate_fit_inputs(model, args, {}, exact=True)


def test_valid_vae_raises_nothing() -> None:
    x = torch.randn(10, 4)
    validate_fit_inputs(vae(Decoder()), (x,), {}, exact=False)
    # validate_args=False on a Bernoulli fed grey levels (Pyro's VAE tutorial) is respected
    grey = torch.rand(10, 4)
    dec = Decoder()

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z), validate_args=False).to_event(1), obs=x)

    validate_fit_inputs(model, (grey,), {}, exact=False)


def test_fit_validation_leaves_the_rng_alone() -> None:
    model, x = vae(Decoder()), torch.randn(10, 4)
    pyro.set_rng_seed(3)
    validate_fit_inputs(model, (x,), {}, exact=False)
    a = torch.rand(3)
    pyro.set_rng_seed(3)
    b = torch.rand(3)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- missing data
K, D, N = 2, 3, 12


def _masked_gmm(how: str) -> Callable:
    """A diagonal GMM whose missing values are masked per entry (``dist.mask``: the mask has
    the value's shape, before ``.to_event``) or per row (``poutine.mask``)."""

    def model(x, mask):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.5, -0.5]]))
        scales = pyro.param(
            "scales",
            torch.tensor([[1.0, 0.7, 1.3], [0.8, 1.2, 1.0]]),
            constraint=constraints.positive,
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if how == "entries":
                pyro.sample("x", dist.Normal(locs[z], scales[z]).mask(mask).to_event(1), obs=x)
            else:
                with poutine.mask(mask=mask):
                    pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    return model


def _missing(how: str, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g) * 2
    if how == "entries":
        mask = torch.rand(N, D, generator=g) > 0.3
        mask[0] = False  # a row with nothing observed
    else:
        mask = torch.rand(N, generator=g) > 0.3
        mask[0] = False
    full = mask if how == "entries" else mask.unsqueeze(-1).expand(N, D)
    return torch.where(full, x, torch.full_like(x, fill)), mask


def _brute(x, mask, how):
    """log p(x_observed) and p(z | x_observed), by hand: masked entries left out of the sum."""
    w, locs, scales = (pyro.param(n).detach() for n in ("w", "locs", "scales"))
    full = mask if how == "entries" else mask.unsqueeze(-1).expand(N, D)
    lp = torch.distributions.Normal(locs, scales).log_prob(x.unsqueeze(-2))  # (N, K, D)
    lj = w.log() + (lp * full.unsqueeze(-2)).sum(-1)  # (N, K)
    return lj.logsumexp(-1).sum(), (lj - lj.logsumexp(-1, keepdim=True)).exp()


@pytest.mark.parametrize("how", ["entries", "rows"])
def test_masked_missing_data_matches_brute_force(how) -> None:
    model = _masked_gmm(how)
    x, mask = _missing(how)
    post = ExactEStep(model).posterior(x, mask)
    ll, resp = _brute(x, mask, how)
    torch.testing.assert_close(post.log_likelihood, ll, atol=1e-10, rtol=0)
    torch.testing.assert_close(post.marginals["z"], resp, atol=1e-10, rtol=0)
    # the row with nothing observed keeps the prior
    torch.testing.assert_close(post.marginals["z"][0], pyro.param("w").detach())
    # the fill value does not matter
    x2, _ = _missing(how, fill=1e3)
    torch.testing.assert_close(ExactEStep(model).posterior(x2, mask).log_likelihood, ll)


@pytest.mark.parametrize("how", ["entries", "rows"])
def test_masked_missing_data_em_step_is_the_masked_closed_form(how) -> None:
    """One EMOptim step equals EM with the missing entries left out of every sum."""
    model = _masked_gmm(how)
    x, mask = _missing(how)
    guide = ExactEStep(model)
    post = guide.posterior(x, mask)
    _, r = _brute(x, mask, how)  # (N, K)
    full = (mask if how == "entries" else mask.unsqueeze(-1).expand(N, D)).double()
    rm = r.unsqueeze(-1) * full.unsqueeze(-2)  # (N, K, D)
    locs = (rm * x.unsqueeze(-2)).sum(0) / rm.sum(0)
    var = (rm * (x.unsqueeze(-2) - locs) ** 2).sum(0) / rm.sum(0)
    EMOptim(reg_covar=0.0)(guide, post, (x, mask), {})
    torch.testing.assert_close(pyro.param("w").detach(), r.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(pyro.param("locs").detach(), locs, atol=1e-10, rtol=0)
    torch.testing.assert_close(pyro.param("scales").detach(), var.sqrt(), atol=1e-10, rtol=0)


def test_masked_missing_data_fit_is_monotone() -> None:
    model = _masked_gmm("entries")
    x, mask = _missing("entries")
    result = fit(model, ExactEStep(model), x, mask, max_iter=15, tol=0)
    ll = result.history["log_likelihood"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(ll))


def test_obs_mask_missing_events_drop_out_exactly():
    """obs_mask= under ExactEStep: the missing rows (NaN here) contribute nothing to log p(x)
    (brute force over the observed rows), their posterior is the prior, and EM converges to
    the fit on the observed rows alone."""
    x = torch.cat([torch.randn(40, 2) - 2, torch.randn(40, 2) + 2])
    mask = torch.rand(80, generator=torch.Generator().manual_seed(0)) > 0.3
    filled = x.clone()
    filled[~mask] = float("nan")
    guide = ExactEStep(obs_mask_gmm)
    post = guide.posterior(filled, mask)
    w = torch.ones(2) / 2
    locs = pyro.param("locs").detach()
    brute = torch.logsumexp(
        w.log() + dist.Normal(locs, 1.0).to_event(1).log_prob(x[mask][:, None]), -1
    )
    assert torch.allclose(post.log_likelihood, brute.sum(), atol=1e-10)
    assert torch.allclose(post.marginals["z"][~mask], w.expand(int((~mask).sum()), -1))
    result = fit(obs_mask_gmm, guide, filled, mask, max_iter=400, tol=1e-12)
    masked_params = dict(result.params)
    pyro.clear_param_store()
    alone = fit(obs_mask_gmm, ExactEStep(obs_mask_gmm), x[mask], None, max_iter=400, tol=1e-12)
    assert abs(result.log_likelihood - alone.log_likelihood) < 1e-6
    for name, value in alone.params.items():
        assert torch.allclose(masked_params[name], value, atol=1e-5), name


# ---------------------------------------------------------------------------- enumeration budget
def summed_binaries(n: int) -> Callable:
    """n global binary latents, all feeding one observation through their sum: the model's own
    arithmetic builds a tensor over all n enumeration dims (2**n values) before any site that
    depends on it is traced."""
    probs = torch.linspace(0.2, 0.8, n)

    def model(x):
        total = 0.0
        for i in range(n):
            total = total + pyro.sample(f"z_{i}", dist.Bernoulli(probs[i]), infer=PAR)
        pyro.sample("x", dist.Normal(total, 1.0), obs=x)

    return model


def test_coupled_binary_latents_are_refused_before_their_memory_is_spent(monkeypatch) -> None:
    """40 coupled binary latents: without the check the model's sum over them alone needs 2**40
    values (the OS kills the process); with a budget of 256 MB the refusal comes at the site
    where PEAK_FACTORS * 2**(i+1) * 8 bytes first exceeds it (z_22: 4 * 2**23 * 8 = 268 MB),
    quickly and with the model's tensors still small (2**22 values)."""
    import resource
    import time

    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "256MB")
    model = summed_binaries(40)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(EnumerationError) as info:
        ExactEStep(model).posterior(torch.tensor(20.0))
    seconds = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    message = str(info.value)
    for fragment in [
        "at least 268 MB but the budget is 256 MB (PYRO_EMVAE_MAX_ENUM_BYTES=256MB)",
        "after site 'z_22' (Bernoulli)",
        "over 23 enumerated site(s) at once",
        "'z_0' (2 values)",
        "'z_22' (2 values)",
        "8.39e+06 values of 8 bytes = 67.1 MB",
        "pyro.markov",
        "pyro.plate",
    ]:
        assert fragment in message, (fragment, message)
    assert seconds < 3.0
    assert grown_mib < 300  # the sum had 2**22 float64 values (34 MB) when it was refused


def test_the_default_budget_is_the_available_memory(monkeypatch) -> None:
    monkeypatch.delenv(validate.ENUM_BUDGET_ENV, raising=False)
    monkeypatch.setattr(validate, "available_memory", lambda device=None: 10**9)
    with pytest.raises(EnumerationError, match=r"budget is 1 GB \(the available memory\)"):
        ExactEStep(summed_binaries(40)).posterior(torch.tensor(20.0))


def test_ten_coupled_latents_still_run_and_match_brute_force(monkeypatch) -> None:
    """Below the budget nothing changes: log p(x) and a marginal by the sum over all 2**10
    assignments."""
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "1MB")  # (4 * 2**10 * 8 bytes = 33 KB)
    n, x = 10, torch.tensor(6.5)
    probs = torch.linspace(0.2, 0.8, n)
    post = ExactEStep(summed_binaries(n)).posterior(x)
    z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))  # (1024, 10)
    log_joint = dist.Bernoulli(probs).log_prob(z).sum(-1) + dist.Normal(z.sum(-1), 1.0).log_prob(x)
    brute = torch.logsumexp(log_joint, 0)
    assert abs(float(post.log_likelihood) - float(brute)) < 1e-12
    p3 = float((log_joint - brute).exp()[z[:, 3] == 1].sum())
    assert abs(float(post.marginals["z_3"].reshape(-1)[1]) - p3) < 1e-12


def test_markov_chains_and_plates_are_counted_as_pyro_allocates_them(monkeypatch) -> None:
    """A pyro.markov HMM (T=200, K=4) keeps two enumerated sites in scope at a time (Pyro
    recycles the dims), so a 1 MB budget is plenty, and it runs to the DiscreteHMM form's log
    p(x); a mixture's plate multiplies: K * N * 8 bytes * PEAK_FACTORS is refused one byte
    below it and runs at it."""
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "1MB")
    x, truth = hmm.sample_gaussian_hmm(N=1, T=200, K=4, D=1, seed=0)
    markov = ExactEStep(lambda x: hmm.gaussian_hmm_markov(x, 4, init=truth)).log_likelihood(x)
    pyro.clear_param_store()
    chain = ExactEStep(lambda x: hmm.gaussian_hmm(x, 4, init=truth)).log_likelihood(x)
    assert abs(float(markov) - float(chain)) < 1e-8

    pyro.clear_param_store()
    model, data = two_big_sites(1000, 3), torch.randn(1000)

    def local(x):  # one enumerated site of 3 values in a plate of 1000
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(3) / 3), infer=PAR)
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 0.0, 1.0])[z], 1.0), obs=x)

    need = validate.PEAK_FACTORS * 3 * 1000 * 8
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, str(need - 1))
    with pytest.raises(
        EnumerationError,
        match=r"site 'z' \(Categorical\) has a log-prob factor of shape \(3, 1000\)",
    ):
        ExactEStep(local).posterior(data)
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, str(need))
    ExactEStep(local).posterior(data)
    # the post-trace check reads the same budget: two global sites of 3 feeding the plate
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, str(3 * need - 1))
    with pytest.raises(EnumerationError, match=r"\(3, 3, 1000\).*PYRO_EMVAE_MAX_ENUM_BYTES"):
        ExactEStep(model).posterior(data)


def test_the_budget_can_be_raised_or_turned_off(monkeypatch) -> None:
    """'inf' turns the budget off: 70 independent global sites then run into torch's 64 dims,
    which is explained as before."""
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "inf")
    with pytest.raises(EnumerationError, match=r"more sites at once than torch has tensor dims"):
        ExactEStep(many_global_sites).posterior(torch.randn(70))
    assert validate.enumeration_budget()[0] == float("inf")
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "2GiB")
    assert validate.enumeration_budget() == (2**31, "PYRO_EMVAE_MAX_ENUM_BYTES=2GiB")
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "1.5e9")
    assert validate.enumeration_budget()[0] == 1.5e9
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=r"PYRO_EMVAE_MAX_ENUM_BYTES='lots': give a number"):
        validate.enumeration_budget()


def test_the_budget_leaves_the_models_own_data_arithmetic_alone(monkeypatch) -> None:
    """A big tensor that spans no enumerated dim (a distance matrix of the data, built after an
    enumerated site) is the model's own business, not the enumeration's: not refused."""
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "10MB")
    x = torch.randn(1000)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer=PAR)
            d = (x.unsqueeze(-1) - x).abs().mean(-1)  # (1000, 1000): 8 MB, 4x that > 10 MB
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z] + d, 1.0), obs=x)

    post = ExactEStep(model).posterior(x)
    assert post.marginals["z"].shape == (1000, 2)
