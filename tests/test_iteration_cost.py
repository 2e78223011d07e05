"""What an EM iteration does, and does not redo (issue 13, small data).

* One model pass per iteration: a fit of ``k`` iterations runs the model ``k`` more times than
  a fit of none beyond the first E-step; the setup (the input checks' trace, the E-step's
  structure check, the plan's probe, the final E-step) is a fixed count, not per iteration.
* The statistics' structure-only work (``Stats.add`` recipes, the rules' gathered ids) is
  cached per plan: the sums are those of the uncached path exactly, iteration after
  iteration; the cache does not grow per iteration; a recipe is made again when the ids
  change in place or the factors' shapes change.
* The batched covariance update and its ``reg_covar`` cost equal the per-matrix formulas.
* ``plate_nesting`` of fit's first trace is the E-step's own ``max_plate_nesting``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from models.gmm import gmm_model, init_params, sample_gmm
from pyro_emvae import EMOptim, ExactEStep, fit, rules, stats
from pyro_emvae import params as _params
from pyro_emvae.estep import plate_nesting

PAR = {"enumerate": "parallel"}


def _counting_gmm(data, K, cov, init):
    calls = [0]

    def model(x):
        calls[0] += 1
        return gmm_model(x, K, cov, init=init)

    return model, calls


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_one_model_pass_per_iteration(cov):
    data, _ = sample_gmm(N=60, K=2, D=2, seed=0)
    init = init_params(data, 2, cov, seed=1)
    passes = {}
    for k in (1, 4):
        pyro.clear_param_store()
        model, calls = _counting_gmm(data, 2, cov, init)
        result = fit(model, ExactEStep(model), data, max_iter=k, tol=0, progress=False)
        assert result.n_iter == k
        passes[k] = calls[0]
    # k E-steps and M-steps, then the final E-step: one pass per iteration, no M-step pass
    assert passes[4] - passes[1] == 3
    # setup: the E-step's structure check, which is the plan's probe too
    # (ExactEStep._shared_probe); the input checks read the first E-step's own pass
    # (ExactEStep._first_trace)
    assert passes[1] == 1 + 2


def _plan_and_posterior(cov="full", K=3):
    data, _ = sample_gmm(N=50, K=K, D=2, seed=2)
    init = init_params(data, K, cov, seed=1)

    def model(x):
        return gmm_model(x, K, cov, init=init)

    guide, mstep = ExactEStep(model), EMOptim()
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    return guide, mstep, plan, post, data


def _assert_same_stats(a: stats.Stats, b: stats.Stats):
    assert a.sums.keys() == b.sums.keys() and a.touched.keys() == b.touched.keys()
    for k in a.sums:
        assert torch.equal(a.sums[k], b.sums[k]), k
        assert torch.equal(a.touched[k], b.touched[k]), k
    assert a.forms == b.forms


@pytest.mark.parametrize("cov", ["full", "diag", "tied", "spherical"])
def test_cached_statistics_equal_the_uncached_ones_over_iterations(cov):
    guide, mstep, plan, post, data = _plan_and_posterior(cov)
    sizes = []
    for _ in range(3):  # EM iterations: the params move, the plan (and its memo) stays
        for stage in (0, 1):
            cached = mstep.summarize(plan, post, stage)
            memo, plan.memo = plan.memo, None
            try:
                plain = mstep.summarize(plan, post, stage)
            finally:
                plan.memo = memo
            _assert_same_stats(cached, plain)
            _params.write(mstep.maximize(plan, cached, stage))
        sizes.append(len(plan.memo))
        post = guide.posterior(data)
        assert mstep.plan(guide, (data,), {}, post.subsample) is plan
    assert sizes[0] > 0 and sizes[0] == sizes[-1]  # made once, not per iteration


def test_add_recipe_is_made_again_when_the_ids_or_shapes_change():
    memo: dict = {}
    ids = torch.tensor([[0], [1]])  # (2, 1): two rows, pooled along the data
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

    def run(ids, w):
        s = stats.Stats(4, memo=memo)
        s.add("count", ids, w)
        return s.sums["count"]

    assert torch.equal(run(ids, w), torch.tensor([6.0, 15.0, 0.0, 0.0]))
    assert len(memo) == 1
    ids[1, 0] = 3  # in place: another statistic's ids now
    assert torch.equal(run(ids, w), torch.tensor([6.0, 0.0, 0.0, 15.0]))
    w2 = torch.ones(2, 5)  # other shapes: another recipe
    assert torch.equal(run(ids, w2), torch.tensor([5.0, 0.0, 0.0, 5.0]))
    view = ids[:1]  # a view of the same ids: its own geometry
    assert torch.equal(run(view, w[:1]), torch.tensor([6.0, 0.0, 0.0, 0.0]))
    # the same calls without a memo
    for i, ww in [(ids, w2), (view, w[:1])]:
        s = stats.Stats(4)
        s.add("count", i, ww)
        assert torch.equal(s.sums["count"], run(i, ww))


def test_the_memo_is_bounded():
    memo: dict = {}
    for i in range(stats._MEMO_SIZE + 10):
        s = stats.Stats(2, memo=memo)
        s.add("count", torch.tensor([i % 2]), torch.tensor([1.0]))  # new ids every call
    assert len(memo) <= stats._MEMO_SIZE


def _reg_cost_reference(ml, cov, n):
    sign, logdet_ml = torch.linalg.slogdet(ml)
    if sign <= 0:
        return math.inf
    _, logdet = torch.linalg.slogdet(cov)
    trace = torch.linalg.solve(cov, ml).diagonal().sum()
    return max(0.0, 0.5 * n * float(logdet - logdet_ml + trace - ml.shape[-1]))


@pytest.mark.parametrize("d", [1, 2, 5])
def test_batched_reg_cost_is_the_per_matrix_formula(d):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(4, d, d, generator=g)
    ml = a @ a.mT / d
    ml[3] = 0.0  # singular: an unbounded likelihood
    cov = ml + 1e-3 * torch.eye(d)
    n = torch.tensor([10.0, 3.0, 200.0, 7.0])
    factors, infos = torch.linalg.cholesky_ex(torch.cat([ml, cov]))
    got = rules._reg_cost(ml, (factors[:4], infos[:4]), factors[4:], n)
    want = [_reg_cost_reference(ml[m], cov[m], float(n[m])) for m in range(4)]
    assert got[3] == want[3] == math.inf
    for a_, b_ in zip(got[:3], want[:3], strict=True):
        assert a_ == pytest.approx(b_, rel=1e-8, abs=1e-12)


def test_plate_nesting_of_a_trace_is_the_estep_own():
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        with pyro.plate("rows", x.shape[0], dim=-2), pyro.plate("cols", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)

    x = torch.randn(4, 3)
    tr = pyro.poutine.trace(model).get_trace(x)
    assert plate_nesting(tr) == ExactEStep(model)._plate_nesting((x,), {}) == 2
    guide = ExactEStep(model)
    fit(model, guide, x, max_iter=2, tol=0, progress=False)
    assert guide.max_plate_nesting == 2


def test_fused_log_prob_still_warns_on_a_non_finite_sum():
    import warnings

    from pyro_emvae.estep import _fused_log_prob

    def site(loc):
        fn = dist.MultivariateNormal(loc, scale_tril=torch.eye(2), validate_args=False)
        value = torch.zeros(5, 2)
        return {"fn": fn, "value": value, "args": (), "kwargs": {}, "scale": 1.0, "mask": None}

    ok = site(torch.zeros(3, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fused_log_prob("x", ok)
    assert torch.equal(ok["log_prob"], ok["fn"].log_prob(ok["value"]))
    bad = site(torch.tensor([[[float("nan"), 0.0]]]))
    with pytest.warns(UserWarning, match="log_prob_sum at site 'x'"):
        _fused_log_prob("x", bad)
    assert math.isnan(float(bad["log_prob_sum"]))
