"""Tests of :func:`pyro_emvae.fit`: the EG loop (exact E-step + gradient M-step) and the SVI loop.

Expected values come from outside the loop: scikit-learn's EM for the optimum of a Gaussian
mixture, the hand-written reference E-steps in ``benchmarks/reference.py`` for log-likelihoods
and gradients, brute-force sums over every assignment of a tiny mixture for the entropy of the
exact posterior, and the closed-form evidence of a conjugate Normal model for SVI.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal

from pyro_emvae import ConvergenceWarning, EMOptim, ExactEStep, FitResult, GradientMStep, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference import gaussian_log_emission, gmm_estep, hmm_forward_backward
from models.gmm import gmm_model, init_params, make_gmm_model, sample_gmm
from models.hmm import gaussian_hmm, gaussian_hmm_markov, sample_gaussian_hmm
from models.hmm import init_params as hmm_init_params

PAR = {"enumerate": "parallel"}
GMM_NAMES = {"weights", "locs", "scales"}


# ---------------------------------------------------------------------------- helpers
def _gmm(N: int = 200, K: int = 2, D: int = 2, seed: int = 1, init_seed: int = 3):
    """Well-separated diag GMM data, an init drawn from the data, and the model closure."""
    x, _ = sample_gmm(N, K, D, seed=seed, separation=4.0)
    init = init_params(x, K, "diag", seed=init_seed)
    return x, init, make_gmm_model(K, "diag", init=init)


def _store() -> dict[str, torch.Tensor]:
    """Constrained values of every param in the store (detached copies)."""
    return {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


def _reference_ll(x: torch.Tensor) -> float:
    """log p(x) of the diag GMM at the store's params, by the hand-written reference E-step."""
    s = _store()
    return float(gmm_estep(x, s["weights"], s["locs"], s["scales"], "diag")[0])


def _no_convergence_warning(record) -> None:
    assert not [w for w in record if issubclass(w.category, ConvergenceWarning)]


# ---------------------------------------------------------------------------- 1. EG = EM optimum
def test_eg_gmm_reaches_sklearn_em_optimum():
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    x, init, model = _gmm(N=200, K=2, D=2)
    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=500,
        tol=1e-7,
        svi_steps=5,
        progress=False,
    )
    assert isinstance(result, FitResult)
    assert result.algorithm == "EG"
    assert result.converged
    assert 1 < result.n_iter < 500
    assert result.n_data == 200

    gm = sklearn_mixture.GaussianMixture(
        n_components=2,
        covariance_type="diag",
        reg_covar=0.0,
        tol=1e-12,
        max_iter=2000,
        weights_init=init["weights"].numpy(),
        means_init=init["locs"].numpy(),
        precisions_init=(init["scales"] ** -2).numpy(),
    ).fit(x.numpy())
    assert gm.converged_
    sk_per_datum = float(gm.score(x.numpy()))  # mean log-likelihood at sklearn's optimum
    assert abs(result.log_likelihood / 200 - sk_per_datum) < 1e-3
    assert result.per_datum() == pytest.approx(result.log_likelihood / 200)

    # same optimum, not just the same value: the params agree with EM's (same labels: same init)
    p = result.params
    torch.testing.assert_close(p["weights"], torch.as_tensor(gm.weights_), atol=1e-2, rtol=0)
    torch.testing.assert_close(p["locs"], torch.as_tensor(gm.means_), atol=2e-2, rtol=0)
    torch.testing.assert_close(
        p["scales"] ** 2, torch.as_tensor(gm.covariances_), atol=2e-2, rtol=2e-2
    )

    # result.params: constrained values, equal to the param store's, detached copies
    assert set(p) == GMM_NAMES
    assert (p["weights"] >= 0).all() and abs(float(p["weights"].sum()) - 1) < 1e-12
    assert (p["scales"] > 0).all()
    store = _store()
    for name in GMM_NAMES:
        assert not p[name].requires_grad
        torch.testing.assert_close(p[name], store[name], atol=0, rtol=0)

    # converged via tol: the reported log-likelihood is that of the returned params
    assert result.log_likelihood == pytest.approx(
        float(ExactEStep(model).log_likelihood(x)), abs=1e-9
    )
    assert result.log_likelihood == pytest.approx(_reference_ll(x), abs=1e-9)
    assert result.elbo == result.log_likelihood == result.objective


# ---------------------------------------------------------------------------- 2. final E-step
def test_final_estep_and_history_are_consistent():
    x, _, model = _gmm(N=150, K=3, D=1, seed=2)
    ll0 = float(ExactEStep(model).log_likelihood(x))
    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=8,
        tol=0,
        progress=False,
    )
    h = result.history
    assert set(h) == {"log_likelihood", "time"}
    assert result.n_iter == 8
    assert len(h["log_likelihood"]) == result.n_iter + 1 == len(h["time"])
    assert h["log_likelihood"][0] == pytest.approx(ll0, abs=1e-9)  # the first at the init
    assert h["log_likelihood"][-1] == result.log_likelihood
    # ... and the last at the returned params (an E-step after the last M-step)
    fresh = float(ExactEStep(model).log_likelihood(x))
    assert result.log_likelihood == pytest.approx(fresh, abs=1e-9)
    assert result.log_likelihood == pytest.approx(_reference_ll(x), abs=1e-9)
    assert result.log_likelihood != pytest.approx(h["log_likelihood"][-2], abs=1e-9)
    assert all(math.isfinite(v) for v in h["log_likelihood"])
    assert all(b >= a for a, b in zip(h["time"], h["time"][1:]))
    assert h["time"][0] >= 0


# ---------------------------------------------------------------------------- 3. Fisher identity
def test_fisher_identity_gives_the_first_gradient_step():
    x, _, model = _gmm(N=60, K=2, D=2, seed=4)
    guide = ExactEStep(model)
    post = guide.posterior(x, param_grads=True)
    assert post.param_grads is not None and set(post.param_grads) == GMM_NAMES
    store = pyro.get_param_store()
    uncon = {n: store.get_param(n).unconstrained() for n in GMM_NAMES}

    # d/dtheta E_q[log p(x, z)] at the E-step's params, q held fixed
    q = guide.expected_log_joint(post, x)
    names = sorted(uncon)
    grads = torch.autograd.grad(q, [uncon[n] for n in names])
    # d/dtheta log p(x) by the reference E-step (no Pyro), for an independent check
    s = {n: store[n] for n in GMM_NAMES}
    ll = gmm_estep(x, s["weights"], s["locs"], s["scales"], "diag")[0]
    ref = torch.autograd.grad(ll, [uncon[n] for n in names])
    for n, g, r in zip(names, grads, ref):
        assert float(g.abs().max()) > 1e-3  # not at a stationary point: the test has teeth
        torch.testing.assert_close(post.param_grads[n], g, atol=1e-10, rtol=0)
        torch.testing.assert_close(post.param_grads[n], r, atol=1e-10, rtol=1e-10)

    # GradientMStep(steps=1) with SGD moves each unconstrained param by lr * grad
    before = {n: uncon[n].detach().clone() for n in names}
    lr = 1e-3
    GradientMStep(pyro.optim.SGD({"lr": lr}), steps=1)(guide, post, (x,), {})
    for n in names:
        moved = store.get_param(n).unconstrained().detach()
        torch.testing.assert_close(moved, before[n] + lr * post.param_grads[n], atol=1e-12, rtol=0)

    # and fit's first iteration is exactly that step
    pyro.clear_param_store()
    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.SGD({"lr": lr}),
        max_iter=1,
        tol=0,
        progress=False,
    )
    assert result.n_iter == 1
    for n in names:
        moved = pyro.get_param_store().get_param(n).unconstrained().detach()
        torch.testing.assert_close(moved, before[n] + lr * post.param_grads[n], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- 4. ELBO decomposition
def test_expected_log_joint_is_log_evidence_minus_entropy():
    """E_q[log p(x, z)] at the E-step's params is log p(x) - H(q): the ELBO's first term, so
    that E_q[log p(x, z)] + H(q) = log p(x) (the bound is tight at the exact posterior)."""
    g = torch.Generator().manual_seed(5)
    x = torch.tensor([-1.3, 0.2, 2.1])
    w0 = torch.softmax(torch.randn(2, generator=g), -1)
    loc0 = torch.tensor([-1.0, 1.5]) + 0.3 * torch.randn(2, generator=g)
    scale0 = 0.7 + 0.5 * torch.rand(2, generator=g)

    def model(x):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        loc = pyro.param("loc", loc0)
        scale = pyro.param("scale", scale0, constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    def brute_log_joint():
        """(8,) log p(x, z) over every z in {0,1}^3, by hand from the store's values."""
        store = pyro.get_param_store()
        w, loc, scale = store["w"], store["loc"], store["scale"]
        a = torch.tensor(list(itertools.product(range(2), repeat=3)))
        lj = (w.log()[a] + torch.distributions.Normal(loc[a], scale[a]).log_prob(x)).sum(-1)
        return lj.detach()

    guide = ExactEStep(model)
    post = guide.posterior(x)
    lj = brute_log_joint()
    log_px = lj.logsumexp(0)
    q = (lj - log_px).exp()  # the exact joint posterior over the 8 assignments
    entropy = -(q * q.log()).sum()
    assert float(entropy) > 0.1  # overlapping components: a nonzero entropy
    torch.testing.assert_close(post.log_likelihood, log_px, atol=1e-12, rtol=0)
    elj = guide.expected_log_joint(post, x).detach()
    torch.testing.assert_close(elj, (q * lj).sum(), atol=1e-10, rtol=0)
    torch.testing.assert_close(elj + entropy, log_px, atol=1e-10, rtol=0)

    # at other params (q held at the old posterior) it is sum_z q(z) log p_new(x, z)
    store = pyro.get_param_store()
    store["loc"] = store["loc"].detach() + torch.tensor([0.4, -0.3])
    store["scale"] = store["scale"].detach() * 1.2
    lj_new = brute_log_joint()
    elj_new = guide.expected_log_joint(post, x).detach()
    torch.testing.assert_close(elj_new, (q * lj_new).sum(), atol=1e-10, rtol=0)
    # the ELBO with the old q lower-bounds the new log evidence
    assert float(elj_new + entropy) <= float(lj_new.logsumexp(0)) + 1e-12


# ---------------------------------------------------------------------------- 5. tol / warning
def test_tol_zero_runs_max_iter_without_warning():
    x, _, model = _gmm(N=80, K=2, D=1, seed=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fit(model, ExactEStep(model), x, max_iter=5, tol=0, progress=False)
    _no_convergence_warning(record)
    assert result.n_iter == 5
    assert not result.converged
    assert len(result.history["log_likelihood"]) == 6


def test_not_converged_warns():
    x, _, model = _gmm(N=80, K=2, D=1, seed=6)
    with pytest.warns(ConvergenceWarning, match="did not converge") as record:
        result = fit(model, ExactEStep(model), x, max_iter=2, tol=1e-14, progress=False)
    warned = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(warned) == 1
    assert warned[0].filename == __file__  # attributed to the caller of fit
    assert result.converged is False
    assert result.n_iter == 2
    assert len(result.history["log_likelihood"]) == 3


# ---------------------------------------------------------------------------- 6. restarts
def test_n_init_keeps_the_best_run_and_its_params():
    x, good, _ = _gmm(N=150, K=2, D=1, seed=7)
    # a symmetric init (both components identical) is a saddle EG never leaves: K=1 solution
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    stuck = {
        "weights": torch.tensor([0.5, 0.5]),
        "locs": mean.expand(2, 1).clone(),
        "scales": std.expand(2, 1).clone(),
    }
    stuck2 = {**stuck, "scales": 1.5 * std.expand(2, 1).clone()}
    inits = [stuck, good, stuck2]  # the best run is not the last one: the store must be restored
    runs = []

    def init(run: int) -> None:
        runs.append(run)
        pyro.clear_param_store()
        gmm_model(x, 2, "diag", init=inits[run])

    def model(x):
        return gmm_model(x, 2, "diag")

    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=300,
        tol=1e-5,
        svi_steps=5,
        n_init=3,
        init=init,
        progress=False,
    )
    assert runs == [0, 1, 2]
    assert len(result.restarts) == 3
    assert result.log_likelihood == max(result.restarts)
    assert result.restarts.index(max(result.restarts)) == 1
    assert max(result.restarts) - sorted(result.restarts)[1] > 10  # the runs really differ
    # the store holds the best run's params
    fresh = float(ExactEStep(model).log_likelihood(x))
    assert fresh == pytest.approx(result.log_likelihood, abs=1e-9)
    store = _store()
    for name in GMM_NAMES:
        torch.testing.assert_close(result.params[name], store[name], atol=1e-12, rtol=0)
    assert abs(float(store["locs"][0, 0] - store["locs"][1, 0])) > 1.0


def test_n_init_runs_are_independent():
    """Two runs from the same init give the same fit (no optimizer state carried over)."""
    x, init0, _ = _gmm(N=80, K=2, D=1, seed=8)

    def init(run: int) -> None:
        pyro.clear_param_store()
        gmm_model(x, 2, "diag", init=init0)

    def model(x):
        return gmm_model(x, 2, "diag")

    result = fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=6,
        tol=0,
        n_init=2,
        init=init,
        progress=False,
    )
    assert len(result.restarts) == 2
    assert result.restarts[0] == pytest.approx(result.restarts[1], abs=1e-10)


# ---------------------------------------------------------------------------- 7. callback stop
def test_callback_true_stops():
    x, _, model = _gmm(N=80, K=2, D=1, seed=9)
    seen = []

    def callback(it, info):
        seen.append((it, info["log_likelihood"]))
        return it == 4

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fit(
            model, ExactEStep(model), x, max_iter=50, tol=1e-12, callback=callback, progress=False
        )
    _no_convergence_warning(record)
    assert [it for it, _ in seen] == [1, 2, 3, 4]
    assert result.n_iter == 4
    assert result.converged
    h = result.history["log_likelihood"]
    assert len(h) == 5
    assert [ll for _, ll in seen] == h[:4]  # the callback sees each iteration's E-step
    assert result.log_likelihood == pytest.approx(_reference_ll(x), abs=1e-9)


# ---------------------------------------------------------------------------- 8. interrupt
def test_keyboard_interrupt_in_callback_returns_result():
    x, _, model = _gmm(N=80, K=2, D=1, seed=10)

    def callback(it, info):
        if it == 3:
            raise KeyboardInterrupt

    result = fit(
        model, ExactEStep(model), x, max_iter=50, tol=1e-12, callback=callback, progress=False
    )
    assert result.interrupted
    assert result.n_iter == 3
    assert not result.converged
    assert math.isfinite(result.log_likelihood)
    assert result.log_likelihood == pytest.approx(
        float(ExactEStep(model).log_likelihood(x)), abs=1e-9
    )
    assert result.log_likelihood == pytest.approx(_reference_ll(x), abs=1e-9)
    assert len(result.history["log_likelihood"]) == 4


def test_keyboard_interrupt_inside_mstep_undoes_the_partial_step():
    x, _, model = _gmm(N=80, K=2, D=1, seed=10)
    inner = GradientMStep(pyro.optim.Adam({"lr": 0.05}))
    after = []

    def mstep(guide, post, args, kwargs):
        info = inner(guide, post, args, kwargs)
        if len(after) == 2:  # third M-step: half done when interrupted
            raise KeyboardInterrupt
        after.append(_store())
        return info

    mstep.needs_param_grads = True  # fit computes posterior.param_grads only when asked
    result = fit(model, ExactEStep(model), x, optim=mstep, max_iter=50, tol=1e-12, progress=False)
    assert result.interrupted
    assert result.n_iter == 2
    store = _store()
    for name in GMM_NAMES:  # params of the last completed iteration, not the partial step
        torch.testing.assert_close(store[name], after[-1][name], atol=1e-12, rtol=0)
    assert result.log_likelihood == pytest.approx(_reference_ll(x), abs=1e-9)


# ---------------------------------------------------------------------------- 9. non-finite
def _guarded_model(bad: float):
    """A 1-D, 2-component GMM whose log p(x) becomes ``bad`` once the second mean passes 2
    (it starts at 0, the data's second cluster is at 5)."""

    def model(x):
        gmm_model(x, 2, "diag", init={"locs": torch.tensor([[-3.0], [0.0]])})
        locs = pyro.param("locs")
        pyro.factor("guard", torch.where(locs[1, 0] > 2.0, bad, 0.0))

    return model


@pytest.mark.parametrize("bad, validate", [(-math.inf, True), (math.nan, False)])
def test_nonfinite_log_likelihood_raises_and_restores_last_finite_params(bad, validate):
    x = torch.cat([torch.randn(40) - 3, torch.randn(40) + 5]).unsqueeze(-1)
    model = _guarded_model(bad)
    seen = []
    with pyro.validation_enabled(validate):  # a NaN factor fails validation
        with pytest.raises(FloatingPointError, match=r"iteration \d+") as err:
            fit(
                model,
                ExactEStep(model),
                x,
                optim=pyro.optim.Adam({"lr": 0.5}),
                max_iter=50,
                tol=0,
                progress=False,
                callback=lambda it, info: seen.append(info["log_likelihood"]),
            )
        # locs[1] climbs from 0 towards 5: non-finite a few dozen M-steps in
        n = len(seen)
        assert 2 <= n < 50
        assert f"iteration {n}" in str(err.value)
        assert "log-likelihood" in str(err.value)
        ll = float(ExactEStep(model).log_likelihood(x))
    assert math.isfinite(ll)
    assert float(pyro.param("locs").detach()[1, 0]) <= 2.0
    assert ll == pytest.approx(seen[-1], abs=1e-9)  # the last finite E-step's params


def _diverging_fit(x, seen):
    model = make_gmm_model(2, "diag", init=init_params(x, 2, "diag", seed=3))
    fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.SGD({"lr": 1e3}),
        max_iter=30,
        tol=0,
        progress=False,
        callback=lambda it, info: seen.append(info["log_likelihood"]),
    )


def _nan_factor_fit(x, seen):
    model = _guarded_model(math.nan)
    fit(
        model,
        ExactEStep(model),
        x,
        optim=pyro.optim.Adam({"lr": 0.5}),
        max_iter=50,
        tol=0,
        progress=False,
        callback=lambda it, info: seen.append(info["log_likelihood"]),
    )


@pytest.mark.parametrize("run", [_diverging_fit, _nan_factor_fit], ids=["huge_lr", "nan_factor"])
def test_invalid_params_under_validation_raise_floating_point_error(run):
    x = torch.cat([torch.randn(40) - 3, torch.randn(40) + 5]).unsqueeze(-1)
    seen = []
    try:
        run(x, seen)
    except FloatingPointError:
        error = "FloatingPointError"
    except ValueError:
        error = "ValueError"
    else:
        error = None
    # whatever was raised, the store must hold the last finite iteration's params
    with pyro.validation_enabled(False):
        store = _store()
        ll = float(gmm_estep(x, store["weights"], store["locs"], store["scales"], "diag")[0])
    assert seen
    assert torch.isfinite(store["scales"]).all() and (store["scales"] > 0).all()
    assert ll == pytest.approx(seen[-1], abs=1e-6)
    assert error == "FloatingPointError"


# ---------------------------------------------------------------------------- 10. HMM
def test_eg_discrete_hmm_and_markov_form_agree():
    x, _ = sample_gaussian_hmm(N=1, T=200, K=2, D=1, seed=0)
    init = hmm_init_params(x, 2, seed=1)

    def hmm(data):
        gaussian_hmm(data, 2, init=init)

    def markov(data):
        gaussian_hmm_markov(data, 2, init=init)

    result = fit(
        hmm,
        ExactEStep(hmm),
        x,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=25,
        tol=0,
        progress=False,
    )
    h = result.history["log_likelihood"]
    assert len(h) == 26
    assert all(math.isfinite(v) for v in h)
    assert h[-1] > h[0] + 5.0
    assert result.n_data == 200  # one sequence of 200 frames
    assert set(result.params) == {"start", "trans", "locs", "scales"}
    torch.testing.assert_close(result.params["trans"].sum(-1), torch.ones(2), atol=1e-12, rtol=0)
    # the first value is log p(x) at the init, by the reference forward-backward
    log_e = gaussian_log_emission(x[0], init["locs"], init["scales"])
    ref0, _, _ = hmm_forward_backward(init["start"].log(), init["trans"].log(), log_e)
    assert h[0] == pytest.approx(float(ref0), abs=1e-8)
    # ... and the last at the returned params
    p = result.params
    log_e = gaussian_log_emission(x[0], p["locs"], p["scales"])
    ref_end, _, _ = hmm_forward_backward(p["start"].log(), p["trans"].log(), log_e)
    assert result.log_likelihood == pytest.approx(float(ref_end), abs=1e-8)

    # the pyro.markov form (one site per step: slow, so a shorter stretch) follows the same path
    xs = x[:, :40]
    pyro.clear_param_store()
    r_hmm = fit(
        hmm,
        ExactEStep(hmm),
        xs,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=2,
        tol=0,
        progress=False,
    )
    pyro.clear_param_store()
    r_markov = fit(
        markov,
        ExactEStep(markov),
        xs,
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=2,
        tol=0,
        progress=False,
    )
    hm, hh = r_markov.history["log_likelihood"], r_hmm.history["log_likelihood"]
    assert hm[0] == pytest.approx(hh[0], abs=1e-9)
    assert hm == pytest.approx(hh, abs=1e-8)
    for name in r_hmm.params:
        torch.testing.assert_close(r_markov.params[name], r_hmm.params[name], atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------- 11. SVI
def test_svi_path_conjugate_normal_evidence():
    g = torch.Generator().manual_seed(11)
    n, tau, sigma = 50, 2.0, 1.0
    x = 1.0 + sigma * torch.randn(n, generator=g)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, tau))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, sigma), obs=x)

    # x ~ N(0, sigma^2 I + tau^2 11^T)
    cov = sigma**2 * torch.eye(n) + tau**2 * torch.ones(n, n)
    log_evidence = float(dist.MultivariateNormal(torch.zeros(n), cov).log_prob(x))

    guide = AutoNormal(model)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})  # lr decays to ~1e-3
    result = fit(model, guide, x, optim=optim, max_iter=400, tol=0, progress=False)
    assert result.algorithm == "SVI"
    assert result.log_likelihood is None
    assert result.n_iter == 400
    assert len(result.history["elbo"]) == result.n_iter == len(result.history["time"])
    assert "log_likelihood" not in result.history
    assert result.objective == result.elbo
    assert abs(result.elbo - log_evidence) < 1.0
    assert result.elbo < log_evidence + 0.1  # an ELBO (the guide family holds the posterior)
    # the guide found the conjugate posterior
    post_var = 1 / (1 / tau**2 + n / sigma**2)
    post_mean = post_var * float(x.sum()) / sigma**2
    assert float(result.params["AutoNormal.locs.mu"]) == pytest.approx(post_mean, abs=0.05)


# ---------------------------------------------------------------------------- 12. bad arguments
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"tol": -1}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"n_init": 0}, ValueError, "n_init"),
        ({"optim": "adam"}, TypeError, "optim"),
        ({"svi_steps": 0}, ValueError, "steps"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, _, model = _gmm(N=20, K=2, D=1, seed=12)
    with pytest.raises(error, match=match):
        fit(model, ExactEStep(model), x, progress=False, **kwargs)


def test_bad_optim_for_svi_guide():
    x = torch.randn(10)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(TypeError, match="optim"):
        fit(model, AutoNormal(model), x, optim="adam", progress=False)


def _collapsing_gmm():
    # 5 identical points far from the rest: a component started on them collapses to variance
    # 0 under plain maximum likelihood (reg_covar=0); the same data at every call
    x = torch.cat(
        [torch.randn(100, generator=torch.Generator().manual_seed(0)), torch.full((5,), 8.0)]
    )

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        loc = pyro.param("loc", torch.tensor([0.0, 8.0]))
        scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    return model, x


def test_recover_retries_a_failed_iteration_with_more_regularization():
    model, x = _collapsing_gmm()
    with pytest.raises(FloatingPointError, match="collapsed"):
        fit(model, ExactEStep(model), x, optim=EMOptim(reg_covar=0.0), max_iter=20, tol=0)
    pyro.clear_param_store()
    model, x = _collapsing_gmm()
    optim = EMOptim(reg_covar=0.0)
    with pytest.warns(UserWarning, match="reg_covar raised from 0 to 1e-06"):
        result = fit(model, ExactEStep(model), x, optim=optim, max_iter=20, tol=0, recover=True)
    assert result.n_iter == 20 and math.isfinite(result.log_likelihood)
    assert result.info["recoveries"][0]["reg_covar"] == 1e-6
    assert optim.reg_covar == 0.0  # the user's EMOptim is left as it was given
    # the history stays one value per E-step and EM stays monotone through the retry
    ll = result.history["log_likelihood"]
    assert len(ll) == 21
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(ll))
    # the regularized component sits on the 5 points with variance ~ reg_covar
    assert float(pyro.param("scale")[1]) ** 2 < 1e-5


@pytest.mark.parametrize("kind", ["gmm", "hmm"])
def test_float32_em_agrees_with_float64(kind):
    """float32 is supported: the same data and start in both precisions give the same fit to
    float32 accuracy."""
    from models import gmm, hmm

    if kind == "gmm":
        x64, _ = gmm.sample_gmm(500, 3, 2, seed=0)
        init64 = gmm.init_params(x64, 3, "full", seed=1)
    else:
        x64, _ = hmm.sample_gaussian_hmm(4, 100, 3, 2, seed=0)
        init64 = hmm.init_params(x64, 3, seed=1)
    results = {}
    try:
        for dtype in (torch.float64, torch.float32):
            torch.set_default_dtype(dtype)
            pyro.clear_param_store()
            x = x64.to(dtype)
            init = {k: v.to(dtype) for k, v in init64.items()}
            if kind == "gmm":
                model = gmm.make_gmm_model(3, "full", init=init)
                result = fit(model, ExactEStep(model), x, max_iter=30, tol=0)
            else:

                def model(x, init=init):
                    hmm.gaussian_hmm(x, 3, init=init)

                result = fit(model, ExactEStep(model), x, max_iter=15, tol=0)
            assert all(v.dtype == dtype for v in result.params.values())
            results[dtype] = result
    finally:
        torch.set_default_dtype(torch.float64)
    lo, hi = results[torch.float32], results[torch.float64]
    assert abs(lo.log_likelihood - hi.log_likelihood) < 1e-6 * abs(hi.log_likelihood)
    for name, value in hi.params.items():
        assert torch.allclose(lo.params[name].double(), value, atol=1e-4), name


def test_svi_stops_before_a_non_finite_step_moves_the_params():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    x = torch.randn(20)
    calls = {"n": 0}
    real = dist.Normal.log_prob

    def poisoned(self, value):  # the 4th evaluation gives a NaN
        calls["n"] += 1
        out = real(self, value)
        return out * math.nan if calls["n"] == 4 else out

    seen = []
    dist.Normal.log_prob = poisoned
    try:
        with pytest.raises(FloatingPointError, match=r"ELBO became nan at iteration 4; the step"):
            fit(
                model,
                guide,
                x,
                optim=pyro.optim.Adam({"lr": 0.1}),
                max_iter=10,
                tol=0,
                callback=lambda it, info: seen.append(float(pyro.param("loc"))),
            )
    finally:
        dist.Normal.log_prob = real
    # the params are those after iteration 3
    assert float(pyro.param("loc")) == seen[-1] and len(seen) == 3


@pytest.mark.parametrize("cov", ["full", "diag", "tied", "spherical"])
def test_aic_bic_count_free_parameters_as_scikit_learn(cov):
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    from models import gmm

    x, _ = gmm.sample_gmm(300, 3, 2, seed=0)
    model = gmm.make_gmm_model(3, cov, init=gmm.init_params(x, 3, cov, seed=1))
    result = fit(model, ExactEStep(model), x, max_iter=30, tol=0)
    p = {k: v.numpy() for k, v in result.params.items()}
    if cov in ("full", "tied"):
        covariances = p["scale_tril"] @ np.swapaxes(p["scale_tril"], -1, -2)
    else:
        covariances = p["scales"] ** 2
    sk = GaussianMixture(3, covariance_type=cov)
    sk.weights_, sk.means_, sk.covariances_ = p["weights"], p["locs"], covariances
    sk.precisions_cholesky_ = _compute_precision_cholesky(covariances, cov)
    assert result.n_parameters() == sk._n_parameters()
    assert result.bic() == pytest.approx(sk.bic(x.numpy()), rel=1e-10)
    assert result.aic() == pytest.approx(sk.aic(x.numpy()), rel=1e-10)


def test_aic_needs_an_exact_log_likelihood_and_plot_draws_the_history():
    import matplotlib

    matplotlib.use("Agg")

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    result = fit(model, lambda x: None, torch.randn(10), max_iter=5, tol=0)
    with pytest.raises(ValueError, match="exact log-likelihood"):
        result.aic()
    ax = result.plot()
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([v / 10 for v in result.history["elbo"]])
    assert ax.get_xlabel() == "iteration"
    assert result.plot(time=True).get_xlabel() == "seconds"
