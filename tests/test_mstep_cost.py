"""The steady-state M-step's shortcuts give the general path's bits (issue 13, small data).

* ``Stats.add``: a one-factor statistic summed directly, a matrix product by ``bmm``: the same
  sums as the einsum they replace.
* The maximizers' one-test paths (every element, row or matrix reached and with mass) give
  the same values, allowances and warnings as the general path (``rules._FAST_PATHS``).
* A rule's read of one param's value equals the read from all params flattened.
* The regularization costs computed when the guard reads them equal those computed at once,
  even after the statistics are changed in place (online EM).
* ``params.Snapshot`` is ``params.constrained`` taken at the same time; ``params.write``
  still refuses a value whose unconstrained image is not finite.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

from models.gmm import gmm_model, init_params, sample_gmm
from pyro_emvae import EMOptim, ExactEStep, fit, rules, stats
from pyro_emvae import distributed as dp
from pyro_emvae import kernels as _kernels
from pyro_emvae import optim as _optim
from pyro_emvae import params as _params
from pyro_emvae.rules import MStepContext

PAR = {"enumerate": "parallel"}


# ---------------------------------------------------------------- Stats.add
def _einsum_path(recipe: stats._AddRecipe, factors) -> torch.Tensor:
    sum_dims, matmul = recipe.sum_dims, recipe.matmul
    recipe.sum_dims, recipe.matmul = None, False
    try:
        return recipe.contract(factors)
    finally:
        recipe.sum_dims, recipe.matmul = sum_dims, matmul


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_factor_sums_and_matmuls_equal_einsum(dtype):
    g = torch.Generator().manual_seed(0)
    for k, n, d in itertools.product([1, 2, 5], [1, 3, 272, 3000], [1, 2, 4]):
        ids = torch.arange(k * d).reshape(k, 1, d)  # a loc's rows, pooled along the data
        w = torch.rand(k, n, 1, generator=g, dtype=dtype)
        x = torch.randn(d, n, generator=g, dtype=dtype).T  # (not contiguous)
        cases = [
            (ids, (w,)),  # one factor, pooled: a sum
            (ids, (w, x)),  # a weighted sum of rows: a matrix product
            (ids[:, :, 0], (w.reshape(k, n),)),  # a count
            (torch.arange(k * d * d).reshape(k, d, d), (torch.randn(k, d, d, dtype=dtype),)),
        ]
        for i, fs in cases:
            recipe = stats._AddRecipe(int(i.max()) + 1, i, fs)
            assert torch.equal(recipe.contract(fs), _einsum_path(recipe, fs)), (k, n, d)
        assert stats._AddRecipe(k * d, ids, (w, x)).matmul == (k > 1 and n > 1 and d > 1)


# ---------------------------------------------------------------- maximizers
def _mixture(kind: str, K: int = 3):
    """A model, its data and a guide, for each family whose maximizer has a one-test path."""
    g = torch.Generator().manual_seed(3)
    if kind in ("full", "diag", "tied", "spherical"):
        data, _ = sample_gmm(N=80, K=K, D=2, seed=2)
        init = init_params(data, K, kind, seed=1)

        def model(x):
            return gmm_model(x, K, kind, init=init)

        return model, data
    if kind == "bernoulli":
        data = (torch.rand(60, 4, generator=g) < 0.3).double()
        p0 = 0.2 + 0.6 * torch.rand(K, 4, generator=g)

        def model(x):
            w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
            p = pyro.param("p", p0.clone(), constraint=constraints.unit_interval)
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Categorical(w), infer=PAR)
                pyro.sample("x", dist.Bernoulli(p[z]).to_event(1), obs=x)

        return model, data
    data = torch.poisson(torch.full((70,), 3.0), generator=g)

    def model(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        r = pyro.param("r", torch.tensor([1.0, 5.0]), constraint=constraints.positive)
        t = pyro.param("t", torch.tensor([[0.6, 0.4], [0.1, 0.9]]), constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("y", dist.Categorical(t[z]), obs=(x > 3).long())
            pyro.sample("x", dist.Poisson(r[z]), obs=x)

    return model, data


def _one_mstep(model, data, fast: bool, **options):
    """The new params, the allowance and the warnings of one M-step."""
    pyro.clear_param_store()
    guide = ExactEStep(model)
    mstep = EMOptim(**options)
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    old, rules._FAST_PATHS = rules._FAST_PATHS, fast
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            mstep(guide, post, (data,), {})
    finally:
        rules._FAST_PATHS = old
    values = _params.constrained(plan.closed_form)
    return values, mstep.allowance, [str(w.message) for w in seen]


@pytest.mark.parametrize("kind", ["full", "diag", "tied", "spherical", "bernoulli", "poisson"])
@pytest.mark.parametrize("options", [{}, {"reg_covar": 1e-2, "min_prob": 0.3, "dirichlet": 2.0}])
def test_one_test_paths_equal_the_general_path(kind, options):
    model, data = _mixture(kind)
    fast = _one_mstep(model, data, True, **options)
    general = _one_mstep(model, data, False, **options)
    assert fast[0].keys() == general[0].keys() and fast[0]
    for name in fast[0]:
        assert torch.equal(fast[0][name], general[0][name]), name
    assert fast[1] == general[1]  # the same float, summed in the same order
    assert fast[2] == general[2]
    if options:
        assert fast[1] > 0  # (the options cost something: the comparison is not of zeros)


def test_an_empty_component_takes_the_general_path_and_warns():
    data, _ = sample_gmm(N=40, K=2, D=2, seed=0)
    init = init_params(data, 3, "full", seed=1)
    init["locs"][2] = 1e3  # far from every point: no posterior mass

    def model(x):
        return gmm_model(x, 3, "full", init=init)

    values, _, seen = _one_mstep(model, data, True)
    assert any("no posterior mass" in m for m in seen)
    assert torch.equal(values["locs"][2], init["locs"][2].double())


# ---------------------------------------------------------------- reads of the params
@pytest.mark.parametrize("cov", ["full", "diag"])
def test_a_param_read_on_its_own_equals_the_flat_read(cov):
    model, data = _mixture(cov)
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim()
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    _params.write(mstep.maximize(plan, mstep.summarize(plan, post, 0), 0))  # locs move
    reads_own = torch.zeros(plan.space.size, dtype=torch.bool)
    reads_flat = torch.zeros_like(reads_own)
    own = mstep.summarize(plan, post, 1, reads=reads_own)
    flat = mstep.summarize(plan, post, 1, flat=_optim._flat_params(plan.space), reads=reads_flat)
    assert own.sums.keys() == flat.sums.keys()
    for k in own.sums:
        assert torch.equal(own.sums[k], flat.sums[k]), k
    assert torch.equal(reads_own, reads_flat) and reads_own.any()


def test_params_of_two_dtypes_are_read_in_the_promoted_dtype():
    x = torch.randn(30, dtype=torch.float64)

    def model(data):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0], dtype=torch.float32))
        scale = pyro.param(
            "scale", torch.ones(2, dtype=torch.float64), constraint=constraints.positive
        )
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w.double()), infer=PAR)
            pyro.sample("x", dist.Normal(loc.double()[z], scale[z]), obs=data)

    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim()
    post = guide.posterior(x)
    plan = mstep.plan(guide, (x,), {}, post.subsample)
    assert not _optim._same_dtypes(plan.space)
    own = mstep.summarize(plan, post, 1)
    flat = mstep.summarize(plan, post, 1, flat=_optim._flat_params(plan.space))
    for k in own.sums:
        assert torch.equal(own.sums[k], flat.sums[k]), k


def test_a_context_reads_current_when_asked_and_gives_a_copy():
    pyro.clear_param_store()
    pyro.param("s", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    ctx = MStepContext("s", "scale", torch.Size([2]), 0, constraints.positive, None, stats.Stats(2))
    assert "current" not in vars(ctx)
    assert torch.equal(ctx.current, _params.value("s"))
    ctx.current[0] = 7.0  # the rule's own copy
    assert float(pyro.param("s").detach()[0]) == 1.0 and float(ctx.current[0]) == 7.0
    mine = torch.zeros(2, dtype=torch.float32)
    given = MStepContext("s", "scale", torch.Size([2]), 0, None, mine, stats.Stats(2))
    assert given.current is mine and given._dtype() == torch.float32
    assert ctx._dtype() == pyro.param("s").dtype
    with pytest.raises(AttributeError):
        _ = ctx.missing


# ---------------------------------------------------------------- the allowance
def test_deferred_costs_equal_costs_at_once_after_the_stats_change():
    model, data = _mixture("full")
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim(reg_covar=1e-2, min_prob=0.3)
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    start = _params.snapshot(plan.closed_form)
    got = []
    for eager in (False, True):
        _params.restore(start)
        mstep.allowance = 0.0
        original = MStepContext._allow_later
        if eager:  # each cost added at once, as allow() does
            MStepContext._allow_later = lambda self, costs: [self.allow(c) for c in costs()]
        try:
            for stage in (0, 1):
                s = mstep.summarize(plan, post, stage)
                _params.write(mstep.maximize(plan, s, stage))
                for v in s.sums.values():
                    v.mul_(3.0)  # as online EM scales its running statistics in place
        finally:
            MStepContext._allow_later = original
        got.append(mstep.allowance)
    assert got[0] == got[1] and got[0] > 0 and math.isfinite(got[0])


def test_the_guard_reads_the_allowance_of_the_previous_step():
    model, data = _mixture("full")
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim(reg_covar=1e-2)
    post = guide.posterior(data)
    mstep(guide, post, (data,), {})
    prev = mstep._prev["allowance"]
    assert isinstance(prev, _optim._Allowance)
    assert _optim._nats(prev) == mstep.allowance > 0
    assert mstep.state_dict()["prev"]["allowance"] == mstep.allowance


# ---------------------------------------------------------------- params
def test_a_snapshot_is_constrained_taken_at_the_same_time():
    pyro.clear_param_store()
    pyro.param("w", torch.tensor([0.2, 0.3, 0.5]), constraint=constraints.simplex)
    pyro.param("L", torch.tensor([[1.5, 0.0], [0.3, 0.7]]), constraint=constraints.lower_cholesky)
    pyro.param("s", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
    pyro.param("m", torch.tensor([-1.0, 1.0]))
    names = ["w", "L", "s", "m", "absent"]
    want = _params.constrained(names)
    snap = _params.Snapshot(names)
    assert list(snap) == ["w", "L", "s", "m"] and len(snap) == 4
    _params.write({"w": torch.tensor([0.6, 0.2, 0.2]), "m": torch.tensor([3.0, 4.0])})
    for n in want:
        assert torch.equal(snap[n], want[n]), n
    _params.write(snap)  # a rollback, as EMOptim makes it
    assert torch.equal(_params.constrained(["m"])["m"], torch.tensor([-1.0, 1.0]))


def test_write_refuses_a_value_off_its_constraint_and_takes_a_huge_finite_one():
    pyro.clear_param_store()
    pyro.param("s", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    pyro.param("m", torch.tensor([0.0, 0.0], dtype=torch.float64))
    for bad in ([0.0, 1.0], [math.nan, 1.0], [math.inf, 1.0]):
        with pytest.raises(FloatingPointError, match="param 's'"):
            _params.write({"s": torch.tensor(bad)})
        assert torch.equal(pyro.param("s").detach(), torch.tensor([1.0, 2.0]))
    huge = torch.tensor([1e308, 1e308], dtype=torch.float64)  # its sum overflows
    _params.write({"m": huge})
    assert torch.equal(pyro.param("m").detach(), huge)


def test_a_constant_statistic_is_made_again_when_its_scalar_changes():
    memo: dict = {}
    ids = torch.tensor([[0, 1], [2, 3]])
    one = torch.ones(())

    def marks():
        s = stats.Stats(5, memo=memo)
        s.add("rowmark", ids, one)
        return s

    first = marks()
    plain = stats.Stats(5)
    plain.add("rowmark", ids, one)
    assert torch.equal(first.sums["rowmark"], plain.sums["rowmark"])
    first.sums["rowmark"].mul_(7.0)  # a reader's in-place change: not the memo's copy
    second = marks()
    assert torch.equal(second.sums["rowmark"], plain.sums["rowmark"])
    assert torch.equal(second.touched["rowmark"], plain.touched["rowmark"])
    one.fill_(2.0)  # in place: another constant
    assert torch.equal(marks().sums["rowmark"], 2.0 * plain.sums["rowmark"])


def test_the_shared_zeros_stay_zero():
    """``Stats.add`` and the scatter start new sums from shared zeros, out of place: after
    M-steps (whose statistics are then written in place by their readers) they are still 0."""
    from pyro_emvae import kernels

    model, data = _mixture("full")
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim()
    for _ in range(3):
        post = guide.posterior(data)
        plan = mstep.plan(guide, (data,), {}, post.subsample)
        for stage in (0, 1):
            s = mstep.summarize(plan, post, stage)
            for v in s.sums.values():
                v.add_(1.0)  # a reader writing the sums in place (online EM, all-reduce)
        mstep(guide, post, (data,), {})
    shared = list(stats._ZEROS.values()) + list(kernels._ZEROS.values())
    assert shared and all(not z.any() for z in shared)


# ---------------------------------------------------------------- the steady M-step's shortcuts
def _two_summaries(model, data, **options):
    """Both stages' statistics of two M-steps of one plan (the second meets every memo)."""
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim(**options)
    out = []
    for _ in range(2):
        post = guide.posterior(data)
        plan = mstep.plan(guide, (data,), {}, post.subsample)
        out.append([mstep.summarize(plan, post, stage) for stage in (0, 1)])
        mstep(guide, post, (data,), {})
    return out


@pytest.mark.parametrize("kind", ["full", "diag", "tied", "spherical", "bernoulli", "poisson"])
def test_the_one_lookup_add_equals_the_long_way(kind):
    model, data = _mixture(kind)
    got = {}
    for fast in (True, False):
        old, stats._FAST_ADD = stats._FAST_ADD, fast
        try:
            got[fast] = _two_summaries(model, data)
        finally:
            stats._FAST_ADD = old
    for a_call, b_call in zip(got[True], got[False], strict=True):
        assert a_call[0].sums  # (stage 0 has statistics in every model)
        for a, b in zip(a_call, b_call, strict=True):
            assert a.sums.keys() == b.sums.keys()
            for k in a.sums:
                assert torch.equal(a.sums[k], b.sums[k]), k
                assert torch.equal(a.touched[k], b.touched[k]), k


def test_the_one_lookup_add_meets_ids_changed_in_place_and_new_shapes():
    memo: dict = {}
    ids = torch.tensor([[0, 1], [2, 3]])
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    def both(ids, *factors):
        kept, plain = stats.Stats(6, memo=memo), stats.Stats(6)
        kept.add("k", ids, *factors)
        plain.add("k", ids, *factors)
        assert torch.equal(kept.sums["k"], plain.sums["k"])
        assert torch.equal(kept.touched["k"], plain.touched["k"])
        return kept.sums["k"]

    first = both(ids, w)
    assert torch.equal(both(ids, w), first)  # (the one-lookup path)
    ids[1] = torch.tensor([4, 5])  # in place: other ids, the same object
    assert torch.equal(both(ids, w)[4:], w[1])
    assert torch.equal(both(ids, w[:1]), torch.tensor([1.0, 2.0, 0, 0, 1.0, 2.0]))  # broadcast
    assert torch.equal(both(ids, w.float()), both(ids, w))  # another dtype
    assert torch.equal(both(ids.T, w), both(ids.T.contiguous(), w))  # another geometry


def _scatter_cases():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) + 5.0
    w = torch.rand(40, 2, generator=g, dtype=torch.float64)
    loc = torch.randn(2, 1, 3, generator=g, dtype=torch.float64)
    collapsed = torch.zeros(2, 40, dtype=torch.float64)
    collapsed[0, :3] = 1.0  # a component on 3 nearly equal points: its sums cancel
    collapsed[1] = 1.0
    close = x.clone()
    close[:3] = 1e4 + 1e-6 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    return [
        (w.T, x, loc, torch.Size([2, 1])),  # the E-step's weights: a transposed view
        (w.T.contiguous(), x, loc, torch.Size([2, 1])),
        (w.T.contiguous().unsqueeze(0), x, loc.unsqueeze(0), torch.Size([1, 2, 1])),
        (w[:, :1].T, x, loc[:1], torch.Size([1, 1])),
        (collapsed, close, close[:2].unsqueeze(1).clone(), torch.Size([2, 1])),
    ]


def test_the_steady_scatter_equals_the_general_path_and_follows_the_data():
    from pyro_emvae import kernels

    def both(*args):
        old, kernels._STEADY_SCATTER = kernels._STEADY_SCATTER, False
        try:
            want = kernels.outer_scatter(*args, event=1, outer=True)
        finally:
            kernels._STEADY_SCATTER = old
        for _ in range(2):  # (the second call meets the kept geometry and views)
            got = kernels.outer_scatter(*args, event=1, outer=True)
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape and torch.equal(a, b)
        return want

    for weight, x, loc, batch in _scatter_cases():
        both(weight, x, loc, batch)
        before = both(weight, x, loc, batch)[1]
        x.add_(1.0)  # the data changed in place: its centred rows are made again
        loc.add_(1.0)
        after = both(weight, x, loc, batch)[1]
        assert torch.allclose(after, before, rtol=1e-6, atol=1e-6)  # (a translation of both)
        loc.add_(0.5)
        both(weight, x, loc, batch)
        both(weight * 2.0, x.clone(), loc, batch)  # new tensors of the same geometry


def test_the_one_op_unpack_equals_pyros():
    from pyro.ops import packed

    for kind in ("full", "bernoulli"):
        model, data = _mixture(kind)
        post = ExactEStep(model).posterior(data)
        for q in post.factor_q.values():
            want = packed.unpack(q, post.symbol_to_dim)
            for _ in range(2):
                got = _optim._unpack(q, post.symbol_to_dim)
                assert got.shape == want.shape and got.stride() == want.stride()
                assert got.data_ptr() == want.data_ptr() and torch.equal(got, want)


def test_write_keeps_inverse_transforms_per_constraint_and_registration():
    from torch.distributions import biject_to, transform_to

    from pyro_emvae import _compat

    c = constraints.positive
    assert _compat.transform_factory(c) is transform_to._registry[type(c)]  # (the pin)
    assert _params._inverse(c) is _params._inverse(c)
    pyro.param("s", torch.tensor([1.0, 2.0]), constraint=c)
    old = _compat.transform_factory(c)
    transform_to.register(type(c), lambda con: biject_to(constraints.real))  # (identity)
    try:
        _params.write({"s": torch.tensor([3.0, 4.0])})
        u = _params.unconstrained(["s"])["s"]
        assert torch.equal(u.detach(), torch.tensor([3.0, 4.0]))  # the new map, not exp^{-1}
    finally:
        transform_to.register(type(c), old)
    _params.write({"s": torch.tensor([3.0, 4.0])})
    assert torch.equal(_params.unconstrained(["s"])["s"].detach(), torch.tensor([3.0, 4.0]).log())


def test_costs_kept_as_views_of_transient_statistics_equal_costs_at_once():
    """EMOptim's own statistics are transient: the deferred costs keep views of them, read
    after the next M-step has made its own statistics."""
    model, data = _mixture("full")
    got = []
    for eager in (False, True):
        pyro.clear_param_store()
        guide, mstep = ExactEStep(model), EMOptim(reg_covar=1e-2, min_prob=0.3)
        original = MStepContext._allow_later
        if eager:
            MStepContext._allow_later = lambda self, costs: [self.allow(c) for c in costs()]
        try:
            mstep(guide, guide.posterior(data), (data,), {})
            prev = mstep._prev["allowance"]
            mstep(guide, guide.posterior(data), (data,), {})
        finally:
            MStepContext._allow_later = original
        got.append((_optim._nats(prev), mstep.allowance))
    assert got[0] == got[1] and got[0][0] > 0


def test_a_singular_covariance_raises_the_same_with_the_one_test_path():
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # on a line

    def model(x):
        return gmm_model(x, 1, "full", init={"weights": torch.ones(1)})

    errors = []
    for fast in (True, False):
        old, rules._FAST_PATHS = rules._FAST_PATHS, fast
        try:
            with pytest.raises(torch.linalg.LinAlgError) as info:
                _one_mstep(model, data, fast, reg_covar=0.0)
            errors.append(str(info.value))
        finally:
            rules._FAST_PATHS = old
    assert errors[0] == errors[1] and "singular" in errors[0]


def test_a_steady_mstep_takes_few_ops():
    """One steady M-step of the Old Faithful benchmark's model (K=2, full covariances) in
    aten ops: the machinery around the update's math, bounded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyro_emvae.datasets import load_old_faithful

    x = torch.as_tensor(load_old_faithful()).double()
    init = init_params(x, 2, "full", seed=1)

    def model(data):
        return gmm_model(data, 2, "full", init=init)

    guide, mstep = ExactEStep(model), EMOptim(reg_covar=1e-6)
    for _ in range(3):
        mstep(guide, guide.posterior(x), (x,), {})
    post = guide.posterior(x)
    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        mstep(guide, post, (x,), {})
    # (145 before the steady paths, 113 before EMOptim's mixture recipe, 72 before its
    # one-op tests and shared unpack; 68 now, called directly: fit's loop also hands the
    # M-step its rollback's copies, 3 clones fewer)
    assert count[0] <= 70, count[0]


def _three_msteps(model, data, fast: bool, **options):
    """The params, allowances and warnings of three M-steps (the second and third meet every
    kept recipe, constant and note)."""
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim(**options)
    old, rules._FAST_PATHS = rules._FAST_PATHS, fast
    out = []
    try:
        for _ in range(3):
            post = guide.posterior(data)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                mstep(guide, post, (data,), {})
            names = mstep._plan.closed_form
            out.append((_params.constrained(names), mstep.allowance, [str(w) for w in seen]))
    finally:
        rules._FAST_PATHS = old
    return out


@pytest.mark.parametrize("kind", ["full", "tied", "bernoulli", "poisson"])
def test_marks_known_from_their_constant_give_the_general_paths_bits(kind):
    model, data = _mixture(kind)
    for options in ({}, {"reg_covar": 1e-2, "min_prob": 0.3, "dirichlet": 2.0}):
        fast = _three_msteps(model, data, True, **options)
        general = _three_msteps(model, data, False, **options)
        for (fv, fa, fw), (gv, ga, gw) in zip(fast, general, strict=True):
            assert fv.keys() == gv.keys() and fv
            assert all(torch.equal(fv[n], gv[n]) for n in fv)
            assert fa == ga and fw == gw


def test_an_empty_component_after_marks_are_known_takes_the_general_path(monkeypatch):
    """The marks say every row and matrix is reached; a component then loses its mass: the
    general path runs and warns, as without the one-test paths."""
    model, data = _mixture("full", K=2)
    pyro.clear_param_store()
    # (the statistics' path throughout: the mixture recipe makes no statistics to keep marks of)
    monkeypatch.setattr(_optim, "_MIXTURE", False)
    guide, mstep = ExactEStep(model), EMOptim()
    for _ in range(2):
        mstep(guide, guide.posterior(data), (data,), {})
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    got = []
    for fast in (True, False):
        old, rules._FAST_PATHS = rules._FAST_PATHS, fast
        try:
            s = mstep.summarize(plan, post, 0)
            assert s.constant_of("rowmark") is not None  # (a copy of the kept constant)
            s.sums["count"][s.sums["count"] > 0] = 0.0  # no mass anywhere
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                new = mstep.maximize(plan, s, 0)
            got.append((new, [str(w.message) for w in seen]))
        finally:
            rules._FAST_PATHS = old
    assert got[0][1] == got[1][1] and any("no posterior mass" in w for w in got[0][1])
    assert got[0][0].keys() == got[1][0].keys()
    assert all(torch.equal(got[0][0][n], got[1][0][n]) for n in got[0][0])


def test_a_constants_copy_is_known_until_written_or_added_to():
    memo: dict = {}
    ids, one = torch.tensor([0, 1]), torch.ones(())
    for _ in range(2):  # (the second add meets the kept constant)
        s = stats.Stats(3, memo=memo)
        s.add("rowmark", ids, one)
    const, notes = s.constant_of("rowmark")
    assert notes == {}  # (stage-free: no maximizer has read it)
    assert torch.equal(const, s.sums["rowmark"]) and const is not s.sums["rowmark"]
    s.sums["rowmark"].mul_(2.0)  # written in place by a reader
    assert s.constant_of("rowmark") is None
    s = stats.Stats(3, memo=memo)
    s.add("rowmark", ids, one)
    assert s.constant_of("rowmark")[0] is const
    s.add("rowmark", torch.tensor([2]), one)  # added to
    assert s.constant_of("rowmark") is None
    s = stats.Stats(3, memo=memo)
    s.add("rowmark", ids, one)
    s.sums["rowmark"] = s.sums["rowmark"].clone()  # replaced
    assert s.constant_of("rowmark") is None


# ---------------------------------------------------------------- the mixture recipe
def _spy_recipe(monkeypatch) -> list:
    """The stages each run of EMOptim's mixture recipe made (0, 1 or 2), in order."""
    made: list = []
    run = _optim._Mixture.run

    def spy(self, *args):
        made.append(run(self, *args))
        return made[-1]

    monkeypatch.setattr(_optim._Mixture, "run", spy)
    return made


def _fit_both(monkeypatch, model, data, **options):
    """``fit`` with the mixture recipe and with the general path only: (params, history,
    allowance, warnings) of each, and the stages the recipe made."""
    made = _spy_recipe(monkeypatch)
    out = []
    for recipe in (True, False):
        monkeypatch.setattr(_optim, "_MIXTURE", recipe)
        pyro.clear_param_store()
        optim = EMOptim(**options)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = fit(model, ExactEStep(model), data, optim=optim, max_iter=12, tol=0)
        hist = result.history["log_likelihood"]
        out.append((result.params, hist, optim.allowance, [str(w.message) for w in seen]))
    return out, made


def _assert_same(a, b) -> None:
    assert a[0].keys() == b[0].keys() and a[0]
    assert all(torch.equal(a[0][n], b[0][n]) for n in a[0])
    assert a[1:] == b[1:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options", [{}, {"reg_covar": 0.0}, {"reg_covar": 1e-2, "min_prob": 0.3, "dirichlet": 2.0}]
)
def test_the_mixture_recipe_gives_the_general_paths_bits(monkeypatch, dtype, options):
    """A full-covariance GMM's M-steps by EMOptim's recipe equal the general path's bit for
    bit: params, log-likelihoods, allowance (deferred costs included), warnings; in ``fit``
    (the E-step's shared probe: an unused dim beside the enumerated one) and called directly."""
    data, _ = sample_gmm(N=90, K=3, D=3, seed=4)
    data = data.to(dtype)
    init = {k: v.to(dtype) for k, v in init_params(data, 3, "full", seed=2).items()}

    def model(x):
        return gmm_model(x, 3, "full", init=init)

    (fast, general), made = _fit_both(monkeypatch, model, data, **options)
    assert made and set(made) == {2}  # (the recipe made every M-step of the first fit)
    _assert_same(fast, general)
    if options.get("reg_covar"):
        assert fast[2] > 0  # (the costs were computed: the comparison is not of zeros)
    made.clear()
    direct = []
    for recipe in (True, False):
        monkeypatch.setattr(_optim, "_MIXTURE", recipe)
        direct.append(_three_msteps(model, data, True, **options))
    assert made == [2, 2, 2]
    for (fv, fa, fw), (gv, ga, gw) in zip(*direct, strict=True):
        assert all(torch.equal(fv[n], gv[n]) for n in fv) and fa == ga and fw == gw


def test_the_mixture_recipe_leaves_an_empty_component_to_the_general_path(monkeypatch):
    """A component with no mass: the recipe's one test fails before anything is written, and
    the general path keeps it and warns, as it does alone."""
    data, _ = sample_gmm(N=60, K=2, D=2, seed=1)
    init = init_params(data, 3, "full", seed=1)
    init["locs"] = torch.cat([init["locs"][:2], torch.full((1, 2), 1e3)])  # far from any point

    def model(x):
        return gmm_model(x, 3, "full", init=init)

    (fast, general), made = _fit_both(monkeypatch, model, data)
    assert 0 in made and any("no posterior mass" in w for w in fast[3])
    _assert_same(fast, general)


def test_the_mixture_recipe_leaves_a_singular_covariance_to_the_general_path(monkeypatch):
    data = torch.arange(12.0).repeat(2, 1).T  # on a line
    init = init_params(data, 2, "full", seed=1)

    def model(x):
        return gmm_model(x, 2, "full", init=init)

    made = _spy_recipe(monkeypatch)
    errors = []
    for recipe in (True, False):
        monkeypatch.setattr(_optim, "_MIXTURE", recipe)
        with pytest.raises(torch.linalg.LinAlgError) as info:
            _one_mstep(model, data, True, reg_covar=0.0)
        errors.append((str(info.value), _params.constrained()))
    assert made == [1]  # (stage 0 made, stage 1 left to the general path, which raised)
    assert errors[0][0] == errors[1][0] and "singular" in errors[0][0]
    # (the failed M-step rolled back: the same params either way)
    assert all(torch.equal(errors[0][1][n], errors[1][1][n]) for n in errors[0][1])


def _plan_of(model, data, **options):
    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim(**options)
    post = guide.posterior(data)
    return mstep.plan(guide, (data,), {}, post.subsample)


def test_the_mixture_recipe_is_made_only_for_its_model():
    """Anything else takes the general path: other covariances, a mask, a scale, a param
    left to gradient steps, a constrained loc, a covariance matrix param, more rows than a
    chunk."""
    data, _ = sample_gmm(N=40, K=2, D=2, seed=0)
    init = init_params(data, 2, "full", seed=1)

    def gmm(x, kind="full", mask=None, scale=None, loc_constraint=constraints.real, cov=False):
        w = pyro.param("weights", init["weights"], constraint=constraints.simplex)
        mu = pyro.param("locs", init["locs"].abs(), constraint=loc_constraint)
        tril = pyro.param("scale_tril", init["scale_tril"], constraint=constraints.lower_cholesky)
        masked = poutine.mask(mask=mask) if mask is not None else contextlib.nullcontext()
        scaled = poutine.scale(scale=scale) if scale is not None else contextlib.nullcontext()
        with pyro.plate("data", len(x)), masked, scaled:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            mat = {"covariance_matrix": tril[z]} if cov else {"scale_tril": tril[z]}
            pyro.sample("x", dist.MultivariateNormal(mu[z], **mat), obs=x)

    assert _optim._make_mixture(_plan_of(gmm, data)) is not None
    others = [
        lambda x: gmm(x, mask=torch.arange(len(x)) % 3 > 0),
        lambda x: gmm(x, scale=2.0),
        lambda x: gmm(x, loc_constraint=constraints.positive),
        lambda x: gmm(x, cov=True),
    ]
    for model in others:
        assert _optim._make_mixture(_plan_of(model, data)) is None
    assert _optim._make_mixture(_plan_of(gmm, data, closed_form=["weights", "locs"])) is None
    for kind in ("tied", "diag", "spherical"):

        def other(x, kind=kind):
            return gmm_model(x, 2, kind, init=init_params(data, 2, kind, seed=1))

        assert _optim._make_mixture(_plan_of(other, data)) is None
    old, _kernels.CHUNK = _kernels.CHUNK, 16
    try:
        assert _optim._make_mixture(_plan_of(gmm, data)) is None
    finally:
        _kernels.CHUNK = old


def test_the_mixture_recipe_steps_aside_for_other_rules_and_subclasses(monkeypatch):
    """A rule registered over the built-in ones, an EMOptim subclass with its own
    statistics, a data-parallel run or the general paths asked for: no recipe."""
    data, _ = sample_gmm(N=40, K=2, D=2, seed=0)
    init = init_params(data, 2, "full", seed=1)

    def model(x):
        return gmm_model(x, 2, "full", init=init)

    made = _spy_recipe(monkeypatch)
    _one_mstep(model, data, True)
    assert made == [2]

    class Mine(EMOptim):
        def summarize(self, *args, **kwargs):
            return super().summarize(*args, **kwargs)

    assert EMOptim()._plain() and not Mine()._plain()
    monkeypatch.setattr(rules, "_FAST_PATHS", False)
    assert not EMOptim()._plain()
    monkeypatch.setattr(rules, "_FAST_PATHS", True)
    monkeypatch.setattr(_kernels, "_STEADY_SCATTER", False)
    assert not EMOptim()._plain()
    monkeypatch.setattr(_kernels, "_STEADY_SCATTER", True)
    monkeypatch.setattr(dp, "active", lambda: True)
    assert not EMOptim()._plain()
    monkeypatch.undo()
    saved = (dict(rules.RULES), dict(rules.MAXIMIZERS), dict(rules.HANDLED), dict(rules.ROLES))
    try:

        @rules.register_rule
        class MyCategorical(rules.CategoricalRule):
            pass

        assert not rules.builtin_mixture_rules() and not EMOptim()._plain()
    finally:
        for table, old in zip(
            (rules.RULES, rules.MAXIMIZERS, rules.HANDLED, rules.ROLES), saved, strict=True
        ):
            table.clear()
            table.update(old)
    assert rules.builtin_mixture_rules()


def test_the_mixture_recipe_is_kept_per_plan_and_follows_the_data(monkeypatch):
    """Made once per plan (its memo, keyed on the plan's trace); a new plan (new data, data
    written in place: the plan's key) makes it again, and its M-steps equal the general
    path's on the new values."""
    data, _ = sample_gmm(N=50, K=2, D=2, seed=3)
    init = init_params(data, 2, "full", seed=1)

    def model(x):
        return gmm_model(x, 2, "full", init=init)

    results = []
    for recipe in (True, False):
        monkeypatch.setattr(_optim, "_MIXTURE", recipe)
        pyro.clear_param_store()
        x = data.clone()
        guide, mstep = ExactEStep(model), EMOptim()
        recipes, out = [], []
        for step in range(6):
            if step == 2:
                x.mul_(1.5)  # in place: the plan's key sees the version move
                mstep.reset()  # (other data: the guard compares no log-likelihoods across)
            if step == 4:
                x = x[:40].clone()  # other rows: a new plan
                mstep.reset()
            post = guide.posterior(x)
            mstep(guide, post, (x,), {})
            recipes.append(mstep._plan.memo.get("_mixture", (None, None))[1])
            out.append(_params.constrained(mstep._plan.closed_form))
        results.append((recipes, out))
    recipes = results[0][0]
    assert all(r is not None for r in recipes)
    assert recipes[0] is recipes[1] and recipes[2] is recipes[3] and recipes[4] is recipes[5]
    assert recipes[1] is not recipes[2] and recipes[3] is not recipes[4]
    assert recipes[4].n == 40
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- the steady iteration
def test_a_snapshot_takes_the_loops_copies_only_of_leaves_it_has_not_seen_change():
    """``Snapshot(names, taken)`` keeps a stamped snapshot's copy of a leaf that is the same
    tensor at the same version (the same bits as its own copy) and copies again a leaf
    written in place since, or replaced; the copies stay what they were when taken."""
    pyro.clear_param_store()
    pyro.param("w", torch.tensor([0.2, 0.3, 0.5]), constraint=constraints.simplex)
    pyro.param("s", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
    pyro.param("m", torch.tensor([-1.0, 1.0]))
    names = ["w", "s", "m", "absent"]
    taken = _params.stamped_snapshot(names)
    assert taken[0].keys() == {"w", "s", "m"}
    want = _params.constrained(names)
    snap = _params.Snapshot(names, taken)
    assert list(snap) == ["w", "s", "m"]
    assert all(snap._leaves[n] is taken[0][n] for n in snap)  # (no copy made)
    assert all(torch.equal(snap[n], want[n]) for n in want)
    _params.write({"s": torch.tensor([3.0, 4.0])})  # in place: its version moves
    pyro.get_param_store().__delitem__("m")
    pyro.param("m", torch.tensor([7.0, 8.0]))  # another leaf
    snap = _params.Snapshot(names, taken)
    assert snap._leaves["w"] is taken[0]["w"]
    assert snap._leaves["s"] is not taken[0]["s"] and snap._leaves["m"] is not taken[0]["m"]
    now = _params.constrained(names)
    assert all(torch.equal(snap[n], now[n]) for n in now)
    assert torch.equal(taken[0]["m"], torch.tensor([-1.0, 1.0]))


def test_the_loops_rollback_copies_serve_the_mstep_and_give_the_same_fit(monkeypatch):
    """In ``fit``'s loop, a steady EMOptim step takes its rollback copies from the loop's
    rollback (the same bits: the fits are equal to those that copy twice), not after a step
    whose plan was probed (the probe ran the model), and never outside the loop."""
    data, _ = sample_gmm(N=60, K=2, D=2, seed=3)
    init = init_params(data, 2, "full", seed=1)

    def model(x):
        return gmm_model(x, 2, "full", init=init)

    shared = []
    snapshot = _params.Snapshot

    class Spy(snapshot):
        def __init__(self, names, taken=None):
            super().__init__(names, taken)
            shared.append(taken is not None and all(self._leaves[n] is taken[0][n] for n in self))

    results = []
    for spy in (True, False):
        if spy:
            monkeypatch.setattr(_params, "Snapshot", Spy)
        else:
            monkeypatch.setattr(_params, "Snapshot", lambda names, taken=None: snapshot(names))
        pyro.clear_param_store()
        optim = EMOptim()
        r = fit(model, ExactEStep(model), data, optim=optim, max_iter=6, tol=0)
        results.append((r.params, r.history["log_likelihood"]))
        assert optim._taken is None
    assert shared[0] is False and all(shared[1:]) and len(shared) == 6
    assert all(torch.equal(results[0][0][n], results[1][0][n]) for n in results[0][0])
    assert results[0][1] == results[1][1]
    shared.clear()
    monkeypatch.setattr(_params, "Snapshot", Spy)
    guide, optim = ExactEStep(model), EMOptim()
    optim(guide, guide.posterior(data), (data,), {})
    optim(guide, guide.posterior(data), (data,), {})
    assert shared == [False, False]  # (a direct call: its own copies)


@pytest.mark.parametrize("loc_constraint", [constraints.real, constraints.real_vector])
def test_the_mixture_recipe_reads_the_written_locs_as_the_store_holds_them(
    monkeypatch, loc_constraint
):
    """Stage 1 of the mixture recipe centres on the locs just written, as the store holds
    them (real and real_vector locs: identity transforms), giving the general path's bits."""
    data, _ = sample_gmm(N=50, K=2, D=2, seed=5)
    init = init_params(data, 2, "full", seed=2)

    def model(x):
        # (copies: the store keeps an identity-constrained init itself, and writes it in place)
        w = pyro.param("weights", init["weights"].clone(), constraint=constraints.simplex)
        loc = pyro.param("locs", init["locs"].clone(), constraint=loc_constraint)
        tril = pyro.param(
            "scale_tril", init["scale_tril"].clone(), constraint=constraints.lower_cholesky
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.MultivariateNormal(loc[z], scale_tril=tril[z]), obs=x)

    (fast, general), made = _fit_both(monkeypatch, model, data)
    assert made and set(made) == {2}
    _assert_same(fast, general)


def test_the_plan_keys_check_in_place_agrees_with_a_new_key():
    """``PlanKey.holds(args, kwargs)`` (the cached plan's check) is
    ``matches(PlanKey(args, kwargs))`` under every change the key is made of: the argument
    objects, their versions, shapes and dtypes, kwargs, the params' names, shapes and
    constraints; and the plan is probed again exactly when it says no."""
    from pyro_emvae.plan import PlanKey

    pyro.clear_param_store()
    x = torch.randn(5, 2)
    pyro.param("a", torch.ones(2))
    pyro.param("b", torch.ones(3), constraint=constraints.positive)
    key = PlanKey((x,), {})

    def agree(args, kwargs):
        want = key.matches(PlanKey(args, kwargs))
        assert key.holds(args, kwargs) is want
        return want

    assert agree((x,), {})
    assert not agree((x.clone(),), {})  # another object
    assert not agree((x, x), {})
    assert not agree((), {})
    assert not agree((x,), {"y": x})
    x.add_(1.0)  # in place: its version
    assert not agree((x,), {})
    key = PlanKey((x, 3), {"y": x})
    assert agree((x, 3), {"y": x}) and not agree((x, 4), {"y": x})
    key = PlanKey((x,), {})
    _params.write({"a": torch.zeros(2)})  # a value: no part of the key
    assert agree((x,), {})
    store = pyro.get_param_store()
    del store["b"]
    pyro.param("b", torch.ones(3))  # another constraint (the same names, in order)
    assert not agree((x,), {})
    key = PlanKey((x,), {})
    del store["b"]
    pyro.param("b", torch.ones(4))  # another shape
    assert not agree((x,), {})
    key = PlanKey((x,), {})
    pyro.param("c", torch.ones(1))  # a new param
    assert not agree((x,), {})
    key = PlanKey((x,), {})
    del store["c"]
    pyro.param("c", torch.ones(1, dtype=torch.float32))  # another dtype
    assert not agree((x,), {})


def test_the_cached_plan_is_kept_and_dropped_as_before():
    """The plan is kept across M-steps on the same data, and probed again when the data
    change in place, another data object comes, or a param is added."""
    data, _ = sample_gmm(N=40, K=2, D=2, seed=1)
    init = init_params(data, 2, "full", seed=1)

    def model(x):
        return gmm_model(x, 2, "full", init=init)

    pyro.clear_param_store()
    guide, mstep = ExactEStep(model), EMOptim()
    post = guide.posterior(data)
    plan = mstep.plan(guide, (data,), {}, post.subsample)
    assert mstep.plan(guide, (data,), {}, post.subsample) is plan
    mstep(guide, post, (data,), {})
    post = guide.posterior(data)
    assert mstep.plan(guide, (data,), {}, post.subsample) is plan
    data.mul_(1.0)  # in place, same values: its version moved
    other = mstep.plan(guide, (data,), {}, guide.posterior(data).subsample)
    assert other is not plan
    copy = data.clone()
    assert mstep.plan(guide, (copy,), {}, guide.posterior(copy).subsample) is not other
    plan = mstep.plan(guide, (copy,), {}, guide.posterior(copy).subsample)
    pyro.param("extra", torch.ones(1))
    assert mstep.plan(guide, (copy,), {}, guide.posterior(copy).subsample) is not plan
