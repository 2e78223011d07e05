"""The fast paths of an EM iteration equal the generic ones they replace.

* :func:`pyro_emvae.kernels.fused_log_prob` (a mixture's Gaussian log-densities by one GEMM)
  equals ``fn.log_prob`` to 1e-12 relative in float64 (1e-5 in float32), for full, diagonal,
  tied and spherical covariances, batch dims on the params, masks, expand and Independent;
  and declines (None) a layout that is not an outer product.
* The E-step with the fused kernels equals the E-step with them disabled (log p(x), marginals,
  parameter gradients), under ``poutine.mask``, ``poutine.scale`` and ``obs_mask``.
* :func:`pyro_emvae.kernels.outer_scatter` (the M-step's residual statistics without the
  ``(K, N, D)`` broadcast) gives the statistics of the generic path: whole fits agree to 1e-12.
* :func:`pyro_emvae.kernels.categorical_log_prob` (a mixture's weights broadcast along the
  plate, without the ``(K, N, K)`` gather) equals ``fn.log_prob`` exactly.
* Row chunks change nothing: chunks of 7 rows equal one chunk.
* The plan is probed once per fit for models with a plate, again when the shapes change.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from models.gmm import gmm_model, init_params, sample_gmm
from pyro_emvae import EMOptim, ExactEStep, fit, kernels, rules, track
from pyro_emvae import estep as estep_module
from pyro_emvae.kernels import categorical_log_prob, fused_log_prob, outer_scatter

PAR = {"enumerate": "parallel"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def _spd(g, *batch, d):
    a = torch.randn(*batch, d, d, generator=g)
    return a @ a.mT + d * torch.eye(d)


# ------------------------------------------------------------------------ fused log-likelihood
def _dists(dtype):
    g = torch.Generator().manual_seed(0)
    K, D = 4, 3
    mu = (torch.randn(K, 1, D, generator=g) * 2 + 5).to(dtype)
    cov = _spd(g, K, 1, d=D).to(dtype)
    tril = torch.linalg.cholesky(cov)
    s = (torch.rand(K, 1, D, generator=g) + 0.5).to(dtype)
    mu2 = (torch.randn(2, K, 1, 1, D, generator=g) + 5).to(dtype)
    mask = torch.rand(40, generator=g) > 0.3
    return {
        "full": dist.MultivariateNormal(mu, scale_tril=tril),
        "full_cov": dist.MultivariateNormal(mu, covariance_matrix=cov),
        "full_precision": dist.MultivariateNormal(mu, precision_matrix=torch.linalg.inv(cov)),
        "tied": dist.MultivariateNormal(mu, scale_tril=tril[0, 0]),
        "diag": dist.Normal(mu, s).to_event(1),
        "spherical": dist.Normal(mu, s[..., :1]).to_event(1),
        "batch_params": dist.MultivariateNormal(mu2, scale_tril=tril.unsqueeze(1)),
        "masked": dist.MultivariateNormal(mu, scale_tril=tril).mask(mask),
        "masked_diag": dist.Normal(mu, s).to_event(1).mask(mask),
        "expanded": dist.MultivariateNormal(mu, scale_tril=tril).expand([K, 40]),
        "independent_mvn": dist.MultivariateNormal(mu.unsqueeze(-2), scale_tril=tril.unsqueeze(-3))
        .expand([K, 1, 2])
        .to_event(1),
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", list(_dists(torch.float64)))
def test_fused_log_prob_equals_generic(case, dtype, tol):
    fn = _dists(dtype)[case]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 3, generator=g) * 3 + 5).to(dtype)
    if case == "batch_params":
        x = x.unsqueeze(-2)  # value batch (40, 1) against params (2, K, 1, 1)
    if case == "independent_mvn":
        x = x.unsqueeze(-2).expand(40, 2, 3)
    want = fn.log_prob(x)
    got = fused_log_prob(fn, x)
    assert got is not None and got.shape == want.shape and got.dtype == want.dtype
    keep = want != 0  # (masked entries are 0 in both)
    assert torch.equal(got[~keep], want[~keep])
    assert _rel(got[keep], want[keep]) < tol


def test_fused_log_prob_declines_what_is_not_an_outer_product():
    mu, x = torch.randn(40, 3), torch.randn(40, 3)  # a loc per datum: both vary along N
    assert fused_log_prob(dist.MultivariateNormal(mu, torch.eye(3)), x) is None
    assert fused_log_prob(dist.Normal(mu, 1.0).to_event(1), x) is None
    assert fused_log_prob(dist.Normal(torch.zeros(3), 1.0), x) is None  # no event dim
    assert fused_log_prob(dist.Poisson(torch.ones(3)), x.abs().round()) is None


def test_the_cached_layouts_follow_the_strides_not_only_the_shapes():
    """The kernels' layouts are cached per (shape, strides): the same shapes with a value that
    is broadcast along the components (stride 0) and one materialized along them (it varies
    there, as the locs do) get their own layouts, in either order."""
    mu, tril = torch.randn(4, 1, 3), torch.eye(3).expand(4, 1, 3, 3)
    x = torch.randn(40, 3)
    for first in range(2):
        for broadcast in [first == 0, first == 1]:
            v = x.expand(4, 40, 3) if broadcast else x.expand(4, 40, 3).clone()
            fn = dist.MultivariateNormal(mu, scale_tril=tril)
            got = fused_log_prob(fn, v)
            assert (got is None) is not broadcast
            if got is not None:
                torch.testing.assert_close(got, fn.log_prob(v))
            w = torch.rand(4, 40)
            stats = outer_scatter(w, v, mu, torch.Size([4, 1]), event=1, outer=True)
            assert (stats is None) is not broadcast
    # a Categorical checked once: its value out of the support is still refused
    with pytest.raises(ValueError):
        fused_log_prob(dist.Categorical(torch.ones(3) / 3), torch.tensor([0, 3]))


@pytest.mark.parametrize("form", ["probs", "logits"])
def test_categorical_log_prob_equals_log_prob(form):
    g = torch.Generator().manual_seed(4)
    K, N = 5, 30
    w = torch.softmax(torch.randn(K, generator=g), -1)
    base = dist.Categorical(w) if form == "probs" else dist.Categorical(logits=w.log() + 1.0)
    enum = base.expand([N]).enumerate_support(expand=False)  # (K, 1): Pyro's fast path
    observed = torch.randint(K, (N,), generator=g)
    rows = torch.softmax(torch.randn(3, 1, K, generator=g), -1)  # params varying: no stride 0
    cases = [
        (base.expand([N]), enum),
        (base.expand([N]), torch.arange(K).reshape(K, 1)),  # (the generic gather)
        (base.expand([N]), observed),
        (base.expand([2, N]), torch.arange(K).reshape(K, 1, 1)),
        (dist.Categorical(rows).expand([3, N]), observed),
    ]
    for fn, value in cases:
        got = categorical_log_prob(fn, value)
        assert got.shape == fn.log_prob(value).shape
        assert torch.equal(got, fn.log_prob(value))
        assert torch.equal(
            fused_log_prob(fn.mask(observed > 1), value), fn.mask(observed > 1).log_prob(value)
        )
    assert categorical_log_prob(dist.Bernoulli(torch.tensor(0.3)), torch.tensor(1.0)) is None


def test_the_support_check_is_skipped_only_for_the_same_unmodified_data():
    fn = _dists(torch.float64)["full"]
    x = torch.randn(40, 3)
    assert fused_log_prob(fn, x) is not None  # checked, then remembered
    x[3, 1] = float("nan")  # in place: a new version of the same tensor
    with pytest.raises(ValueError):
        fused_log_prob(fn, x)
    y = torch.randn(40, 3)
    y[0, 0] = float("nan")
    with pytest.raises(ValueError):
        fused_log_prob(fn, y)
    with pytest.raises(ValueError):  # still refused the second time
        fused_log_prob(fn, y)


def test_the_centred_data_are_recomputed_when_the_data_change():
    fn = _dists(torch.float64)["full"]
    x = torch.randn(40, 3) + 5
    fused_log_prob(fn, x)
    x.mul_(2.0)  # in place
    assert _rel(fused_log_prob(fn, x), fn.log_prob(x)) < 1e-12
    w = torch.rand(4, 40)
    _, num = outer_scatter(w, x, fn.loc, torch.Size([4, 1]), event=1, outer=True)
    r = x - fn.loc
    assert _rel(num[:, 0], torch.einsum("kn,kni,knj->kij", w, r, r)) < 1e-12


def test_outer_scatter_of_a_collapsing_component_is_summed_centred():
    """A component on 5 points 1e-4 apart, 10 away from the rest: the uncentred sums would
    lose ~8 digits; the kernel sums that component again about its loc (1e-12 relative)."""
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(200, 2, generator=g), 10 + 1e-4 * torch.randn(5, 2, generator=g)])
    mu = torch.stack([x[:200].mean(0), x[200:].mean(0)]).unsqueeze(1)  # (2, 1, 2)
    w = torch.stack([torch.ones(205), torch.zeros(205)])
    w[0, 200:], w[1, 200:] = 0.0, 1.0
    r = x - mu
    _, num = outer_scatter(w, x, mu, torch.Size([2, 1]), event=1, outer=True)
    assert _rel(num[:, 0], torch.einsum("kn,kni,knj->kij", w, r, r)) < 1e-12
    _, num = outer_scatter(w.unsqueeze(-1), x, mu, torch.Size([2, 1, 2]), event=0, outer=False)
    assert _rel(num[:, 0], torch.einsum("kn,knd->kd", w, r**2)) < 1e-12


@pytest.mark.parametrize("chunk", [7, 2048])
def test_chunks_change_nothing(monkeypatch, chunk):
    fn = _dists(torch.float64)["full"]
    x = torch.randn(40, 3) + 5
    whole = fused_log_prob(fn, x)
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    assert _rel(fused_log_prob(fn, x), whole) < 1e-13
    w = torch.rand(4, 40)
    big = outer_scatter(w, x, fn.loc[:, :1], torch.Size([4, 1]), event=1, outer=True)
    monkeypatch.setattr(kernels, "CHUNK", 3)
    small = outer_scatter(w, x, fn.loc[:, :1], torch.Size([4, 1]), event=1, outer=True)
    assert _rel(small[0], big[0]) < 1e-13 and _rel(small[1], big[1]) < 1e-12


def test_outer_scatter_equals_the_broadcast_sums():
    g = torch.Generator().manual_seed(2)
    K, N, D = 3, 50, 4
    x, mu, w = torch.randn(N, D, generator=g), torch.randn(K, 1, D, generator=g), torch.rand(K, N)
    r = x - mu  # (K, N, D)
    den, num = outer_scatter(w, x, mu, torch.Size([K, 1]), event=1, outer=True)
    assert _rel(num[:, 0], torch.einsum("kn,kni,knj->kij", w, r, r)) < 1e-12
    assert _rel(den[:, 0], w.sum(1)) < 1e-14
    den, num = outer_scatter(w.unsqueeze(-1), x, mu, torch.Size([K, 1, D]), event=0, outer=False)
    assert num.shape == (K, 1, D) and den.shape == (K, 1, D)
    assert _rel(num[:, 0], torch.einsum("kn,knd->kd", w, r**2)) < 1e-12
    assert _rel(den[:, 0], w.sum(1, keepdim=True).expand(K, D)) < 1e-14
    # the weight varying along a coordinate (a mask per entry): not an outer product
    wd = torch.rand(K, N, D)
    assert outer_scatter(wd, x, mu, torch.Size([K, 1, D]), event=0, outer=False) is None


# ------------------------------------------------------------------------ in the E-step
def _generic(monkeypatch):
    monkeypatch.setattr(estep_module, "fused_log_prob", lambda fn, value: None)
    monkeypatch.setattr(rules, "outer_scatter", lambda *a, **k: None)
    monkeypatch.setattr(estep_module, "_one_latent", lambda *a, **k: None)


def _mixture(cov: str, wrap: str):
    g = torch.Generator().manual_seed(3)
    K, D, N = 3, 2, 60
    x = torch.randn(N, D, generator=g) * 2 + 3
    keep = torch.rand(N, generator=g) > 0.25
    init = init_params(x, K, cov, seed=1)

    def model(data):
        if wrap == "mask":
            with poutine.mask(mask=keep):
                return gmm_model(data, K, cov, init=init)
        if wrap == "scale":
            with poutine.scale(scale=2.5):
                return gmm_model(data, K, cov, init=init)
        return gmm_model(data, K, cov, init=init)

    return model, x


@pytest.mark.parametrize("cov", ["full", "diag", "tied", "spherical"])
@pytest.mark.parametrize("wrap", ["none", "mask", "scale"])
def test_posterior_with_fused_kernels_equals_generic(monkeypatch, cov, wrap):
    model, x = _mixture(cov, wrap)
    fast = ExactEStep(model).posterior(x, param_grads=True)
    with monkeypatch.context() as m:
        _generic(m)
        slow = ExactEStep(model).posterior(x, param_grads=True)
    assert _rel(fast.log_likelihood, slow.log_likelihood) < 1e-12
    assert torch.allclose(fast.marginals["z"], slow.marginals["z"], rtol=1e-11, atol=1e-13)
    for name, grad in slow.param_grads.items():
        assert torch.allclose(fast.param_grads[name], grad, rtol=1e-10, atol=1e-10), name


def test_obs_mask_with_fused_kernels_equals_generic(monkeypatch):
    g = torch.Generator().manual_seed(4)
    K, D, N = 2, 3, 30
    x = torch.randn(N, D, generator=g)
    observed = torch.rand(N, generator=g) > 0.3

    def model(data):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.randn(K, D, generator=torch.Generator().manual_seed(5)))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample(
                "x", dist.MultivariateNormal(locs[z], torch.eye(D)), obs=data, obs_mask=observed
            )

    fast = ExactEStep(model).posterior(x)
    with monkeypatch.context() as m:
        _generic(m)
        slow = ExactEStep(model).posterior(x)
    assert _rel(fast.log_likelihood, slow.log_likelihood) < 1e-12
    assert torch.allclose(fast.marginals["z"], slow.marginals["z"], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("cov", ["full", "diag", "tied", "spherical"])
def test_fits_with_fused_paths_equal_generic(monkeypatch, cov):
    """Five EM iterations (E-step kernels and M-step statistics) land on the same params."""

    def run():
        pyro.clear_param_store()
        model, x = _mixture(cov, "none")
        result = fit(
            model, ExactEStep(model), x, optim=EMOptim(reg_covar=0), max_iter=5, tol=0,
            progress=False,
        )  # fmt: skip
        return result, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}

    fast, fast_params = run()
    with monkeypatch.context() as m:
        _generic(m)
        slow, slow_params = run()
    assert _rel(torch.tensor(fast.log_likelihood), torch.tensor(slow.log_likelihood)) < 1e-12
    for name, value in slow_params.items():
        assert torch.allclose(fast_params[name], value, rtol=1e-11, atol=1e-12), name


# ------------------------------------------------------------------------ the plan
def _count_probes(monkeypatch) -> list[int]:
    calls = [0]
    orig = track.probe

    def counting(*args, **kwargs):
        calls[0] += 1
        return orig(*args, **kwargs)

    monkeypatch.setattr(track, "probe", counting)
    return calls


def test_the_plan_is_probed_once_per_fit_for_a_plate_model(monkeypatch):
    calls = _count_probes(monkeypatch)
    x, _ = sample_gmm(N=200, K=3, D=2, seed=0)
    init = init_params(x, 3, "full", seed=1)

    def model(data):
        return gmm_model(data, 3, "full", init=init)

    opt = EMOptim(reg_covar=0)
    fit(model, ExactEStep(model), x, optim=opt, max_iter=8, tol=0, progress=False)
    assert calls[0] == 1
    # new shapes: probed again (once)
    x2 = torch.cat([x, x[:50] + 0.1])
    fit(model, ExactEStep(model), x2, optim=opt, max_iter=4, tol=0, progress=False)
    assert calls[0] == 2
    # the same shapes but another tensor (the probe's trace holds the data): probed again
    fit(model, ExactEStep(model), x2.clone(), optim=opt, max_iter=4, tol=0, progress=False)
    assert calls[0] == 3


def test_a_new_minibatch_is_probed_again(monkeypatch):
    """A plate that subsamples draws new rows each E-step: each gets its own probe."""
    calls = _count_probes(monkeypatch)
    x, _ = sample_gmm(N=200, K=2, D=2, seed=0)

    def model(data):
        locs = pyro.param("locs", data[:2].clone())
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(data), subsample_size=50) as idx:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.MultivariateNormal(locs[z], torch.eye(2)), obs=data[idx])

    guide, opt = ExactEStep(model), EMOptim()
    for _ in range(3):
        post = guide.posterior(x)
        opt(guide, post, (x,), {})
    assert calls[0] == 3
    post = guide.posterior(x)
    plan = opt.plan(guide, (x,), {}, post.subsample)
    assert calls[0] == 4 and opt.plan(guide, (x,), {}, post.subsample) is plan


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_a_fit_in_chunks_of_5_rows_equals_one_chunk(monkeypatch, cov):
    def run():
        pyro.clear_param_store()
        model, x = _mixture(cov, "none")
        result = fit(
            model, ExactEStep(model), x, optim=EMOptim(reg_covar=0), max_iter=3, tol=0,
            progress=False,
        )  # fmt: skip
        return result, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}

    whole, whole_params = run()
    monkeypatch.setattr(kernels, "CHUNK", 5)
    chunked, chunked_params = run()
    assert _rel(torch.tensor(chunked.log_likelihood), torch.tensor(whole.log_likelihood)) < 1e-13
    for name, value in whole_params.items():
        assert torch.allclose(chunked_params[name], value, rtol=1e-12, atol=1e-13), name


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_an_ill_conditioned_covariance_leaves_the_gemm_form(offset):
    """Regression: the fused MVN kernel's GEMM form (x - c) P - (mu - c) P lets its two products
    cancel; for a component collapsing onto a line (Cholesky diagonal 1e-11, P ~ 1e11) it was
    up to 3e-5 relative off Pyro's log_prob, which takes the difference first. Past its
    amplification limit the kernel hands the site to Pyro's log_prob: the E-step's log p(x) and
    responsibilities equal Pyro's (TraceEnum_ELBO) to 1e-12, and, in a well-conditioned mixture
    of the same data, the fused path is still taken."""
    from pyro.infer import TraceEnum_ELBO

    g = torch.Generator().manual_seed(3)
    x = offset + torch.randn(200, 2, generator=g, dtype=torch.float64)
    loc = torch.stack([x[0], x[1:].mean(0)])
    x[1:50] = loc[0] + torch.randn(49, 1, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5], dtype=torch.float64
    )
    for tiny, fused in ((1e-11, False), (0.3, True)):
        tril = torch.stack(
            [torch.tensor([[1.0, 0.0], [0.5, tiny]], dtype=torch.float64), torch.eye(2)]
        )
        fn = dist.MultivariateNormal(loc.unsqueeze(-2), scale_tril=tril.unsqueeze(-3))
        assert (kernels.fused_log_prob(fn, x) is not None) is fused

        def model(data, tril=tril):
            w = pyro.param("w", torch.tensor([0.5, 0.5], dtype=torch.float64))
            with pyro.plate("n", len(data)):
                z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.MultivariateNormal(loc[z], scale_tril=tril[z]), obs=data)

        pyro.clear_param_store()
        post = ExactEStep(model).posterior(x)
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        want = -float(elbo.differentiable_loss(model, lambda d: None, x).detach())
        assert abs(float(post.log_likelihood) - want) <= 1e-12 * abs(want)
        lp = fn.log_prob(x) + torch.tensor([0.5, 0.5], dtype=torch.float64).log().unsqueeze(-1)
        resp = (lp - lp.logsumexp(0)).exp()  # (K, N)
        assert torch.allclose(post.marginals["z"], resp.T, rtol=0, atol=1e-12)
