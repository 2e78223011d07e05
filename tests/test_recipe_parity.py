"""The small-data shortcuts (the E-step's steady recipe ``estep._SteadyMixture``, the M-step's
mixture recipe ``optim._Mixture`` and fit's first pass ``fit._inspect_first``) on full-covariance
mixtures written the ways users write them, not as ``models/gmm.py`` does: logits, params in a
component plate, handlers (scale, mask, condition), ``.mask()``, ``obs_mask``, a permuted or
shared component param, two plates, float32 data, a subsampled plate. Each fit equals the fit
with every shortcut off bit for bit, and its log p(x) equals Pyro's ``TraceEnum_ELBO``'s."""

from __future__ import annotations

import sys
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.distributions import constraints

import pyro_emvae.estep as _estep
import pyro_emvae.optim as _optim
from pyro_emvae import EMOptim, ExactEStep, fit

_fit_module = sys.modules["pyro_emvae.fit"]

N, K, D = 120, 3, 2
PAR = {"enumerate": "parallel"}


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(40, D, generator=g) + 3, torch.randn(40, D, generator=g) - 2]
    return torch.cat([*parts, 0.5 * torch.randn(40, D, generator=g)]).double()


def _start(x):
    return torch.ones(K) / K, x[[0, 50, 100]].clone(), torch.eye(D).expand(K, D, D).clone()


def _params(x, shared_tril=False):
    w0, mu0, l0 = _start(x)
    w = pyro.param("w", w0, constraint=constraints.simplex)
    mu = pyro.param("mu", mu0)
    tril = pyro.param("L", l0[0] if shared_tril else l0, constraint=constraints.lower_cholesky)
    return w, mu, tril


def plain(x):
    w, mu, tril = _params(x)
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=x)


def logits(x):
    w0, mu0, l0 = _start(x)
    lw = pyro.param("lw", w0.log())
    mu = pyro.param("mu", mu0)
    tril = pyro.param("L", l0, constraint=constraints.lower_cholesky)
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(logits=lw), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=x)


def component_plate(x):
    w0, mu0, l0 = _start(x)
    w = pyro.param("w", w0, constraint=constraints.simplex)
    with pyro.plate("k", K):
        mu = pyro.param("mu", mu0, event_dim=1)
        tril = pyro.param("L", l0, constraint=constraints.lower_cholesky, event_dim=2)
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=x)


def scaled(x):
    with poutine.scale(scale=0.5):
        plain(x)


def masked(x):
    with poutine.mask(mask=torch.arange(x.shape[0]) % 7 != 0):
        plain(x)


def dist_mask(x):
    w, mu, tril = _params(x)
    keep = torch.arange(x.shape[0]) % 5 != 0
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]).mask(keep), obs=x)


def _every_fourth_missing(x):
    return torch.arange(x.shape[0]) % 4 != 0


def obs_mask(x):
    w, mu, tril = _params(x)
    keep = _every_fourth_missing(x)
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        fn = dist.MultivariateNormal(mu[z], scale_tril=tril[z])
        pyro.sample("x", fn, obs=x, obs_mask=keep)


def permuted(x):
    w, mu, tril = _params(x)
    perm = torch.tensor([2, 0, 1])
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[perm[z]], scale_tril=tril[z]), obs=x)


def shared_tril(x):
    w, mu, tril = _params(x, shared_tril=True)
    with pyro.plate("n", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril), obs=x)


def two_plates(x):
    w, mu, tril = _params(x)
    y = x.reshape(2, -1, D)
    with pyro.plate("a", 2, dim=-2), pyro.plate("n", y.shape[1], dim=-1):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=y)


def float32_data(x):
    plain(x.float())


def conditioned(x):
    return poutine.condition(plain, data={"x": x})(x * 0 + 1e3)


def subsampled(x):
    w, mu, tril = _params(x)
    with pyro.plate("n", x.shape[0], subsample_size=x.shape[0]) as idx:
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=x[idx])


def _observed_rows(x):
    with poutine.mask(mask=_every_fourth_missing(x)):
        plain(x)


_REFERENCE = {obs_mask: _observed_rows}

MODELS = [
    plain, logits, component_plate, scaled, masked, dist_mask, obs_mask, permuted,
    shared_tril, two_plates, float32_data, conditioned, subsampled,
]  # fmt: skip


def _fit(model, x, shortcuts: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not shortcuts:
            m.setattr(_optim, "_MIXTURE", False)
            m.setattr(_estep._SteadyMixture, "of", staticmethod(lambda *a, **k: None))
            m.setattr(_fit_module, "_inspect_first", lambda *a, **k: None)
        pyro.clear_param_store()
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(model, ExactEStep(model), x, optim=EMOptim(), max_iter=8, progress=False)
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        after = torch.rand(1)  # (the RNG as fit left it)
    return result, params, after


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_the_shortcuts_agree_with_the_general_path_and_pyro(model, monkeypatch):
    x = _data()
    fast, fast_params, fast_rng = _fit(model, x, True, monkeypatch)
    slow, slow_params, slow_rng = _fit(model, x, False, monkeypatch)
    assert fast_params.keys() == slow_params.keys()
    for name in fast_params:
        assert torch.equal(fast_params[name], slow_params[name]), name
    assert fast.history["log_likelihood"] == slow.history["log_likelihood"]
    assert fast.n_iter == slow.n_iter and fast.n_data == slow.n_data
    assert torch.equal(fast_rng, slow_rng)
    # (the fitted params as the store holds them: Pyro's exact log p(x) of the same model; for
    # obs_mask, of the observed rows, which is what the missing ones integrate to: Pyro's ELBO
    # would sample the missing values from an empty guide)
    reference = _REFERENCE.get(model, model)
    want = -TraceEnum_ELBO(max_plate_nesting=2).loss(reference, lambda *a, **k: None, x)
    lp = _estep.ExactEStep(model).posterior(x).log_likelihood
    rel = 1e-6 if model is float32_data else 1e-12  # (float32 arithmetic on either side)
    assert float(lp) == pytest.approx(want, rel=rel, abs=1e-9)


def test_the_shortcuts_are_taken_on_the_plain_model(monkeypatch):
    """(so that the comparison above compares two paths, not one path with itself)"""
    taken = {"mstep": 0, "estep": 0, "first": 0}
    run, call, first = (
        _optim._Mixture.run,
        _estep._SteadyMixture.__call__,
        _fit_module._inspect_first,
    )

    def count(key, f, hit):
        def wrapped(*a, **k):
            out = f(*a, **k)
            taken[key] += hit(out)
            return out

        return wrapped

    monkeypatch.setattr(_optim._Mixture, "run", count("mstep", run, lambda o: o == 2))
    monkeypatch.setattr(
        _estep._SteadyMixture, "__call__", count("estep", call, lambda o: o is not None)
    )
    monkeypatch.setattr(
        _fit_module, "_inspect_first", count("first", first, lambda o: o is not None)
    )
    pyro.clear_param_store()
    fit(plain, ExactEStep(plain), _data(), optim=EMOptim(), max_iter=5, tol=0, progress=False)
    assert taken["first"] == 1 and taken["mstep"] == 5 and taken["estep"] >= 4
