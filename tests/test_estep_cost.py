"""The steady-state E-step's shortcuts (issue 13, small data) give the numbers of the long way.

* A mixture weights' log-probs on Pyro's own enumeration of their support: the values of the
  gather (and of Pyro's ``Categorical.log_prob``), without the support check, which is kept for
  any value the enumeration did not make or that changed since.
* ``kernels._take`` as one view: the same view as the index/expand/permute it replaces.
* ``kernels._mvn``'s cached plan: bitwise the ops it had before (einsum shift, expanded
  identity, chunked ``out=`` GEMMs), on the first call and on later calls with other params.
* The enum/trace handlers reused between E-steps: the same posterior as a fresh guide's, after
  new data, new shapes and a failed run; they are not pickled.
* ``_one_latent`` (no autograd, the posterior written over a factor's buffer, handed back in
  the factors' layouts) equals the generic contraction.
* A bound on the steady-state E-step's aten ops (load-independent).
* ``kernels._mvn``'s per-geometry plan (one ``as_strided`` per tensor, the GEMM's operand by one
  ``cat``, the conditioning bound by max-norms) equals the general code bit for bit, across
  geometries, strides, new params and data changed in place; the plan is keyed on strides.
* ``_lean_posterior`` (a mixture's trace) equals ``_contract`` + ``_fill`` bit for bit, and
  declines every other structure (masks, scales, two latents, one value, an HMM).
* ``_one_latent`` in the factors' own layout equals the sorted-dims layout it had; the site
  shape check's cheap key; a fused log-prob named without a squeeze equals Pyro's ``pack``.
* The steady recipe of a mixture (``_SteadyMixture``, the E-steps after the first at
  arguments validated before) equals the general path bit for bit, follows new data, shapes
  and params, declines a changed structure (mask, scale, two latents), a template made
  without validation, and a non-finite log p(x) (the general path then warns as it does).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.utils._python_dispatch import TorchDispatchMode

from models.gmm import gmm_model, init_params, sample_gmm
from pyro_emvae import ExactEStep, kernels
from pyro_emvae import estep as _estep
from pyro_emvae.datasets import load_old_faithful

PAR = {"enumerate": "parallel"}


def _enumerated_site(probs, n=5, logits=False):
    """The enumerated site ``z`` of a one-latent model with Categorical params ``probs``."""

    def model():
        with pyro.plate("data", n):
            d = dist.Categorical(logits=probs.log()) if logits else dist.Categorical(probs)
            pyro.sample("z", d, infer=PAR)

    tr = poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace()
    return tr.nodes["z"]["fn"], tr.nodes["z"]["value"]


@pytest.mark.parametrize(
    "probs",
    [
        torch.tensor([0.2, 0.3, 0.5]),  # mixture weights, broadcast along the plate
        torch.rand(5, 4).softmax(-1),  # a weight per row
        torch.tensor([1.0, 0.0]),  # a zero weight: the clamp's log
    ],
)
@pytest.mark.parametrize("logits", [False, True])
def test_categorical_on_its_enumeration_equals_the_gather_and_pyro(probs, logits):
    fn, value = _enumerated_site(probs, logits=logits)
    assert kernels._enumerated(fn, value)
    fast = kernels.fused_log_prob(fn, value)
    slow = kernels._categorical(fn, value, enumerated=False)  # (the gather)
    assert fast.shape == slow.shape == fn.log_prob(value).shape
    assert torch.equal(fast, slow)
    assert torch.equal(fast, fn.log_prob(value))


def test_an_enumeration_changed_or_not_its_own_is_checked():
    fn, value = _enumerated_site(torch.tensor([0.5, 0.5]))
    assert kernels._enumerated(fn, value)
    other, _ = _enumerated_site(torch.tensor([0.5, 0.5]))
    assert not kernels._enumerated(other, value)  # (another distribution's enumeration)
    value.add_(1)  # now [1, 2]: 2 is outside the support, and the version moved
    assert not kernels._enumerated(fn, value)
    with pytest.raises(ValueError):
        kernels.fused_log_prob(fn, value)
    plain = torch.arange(2).reshape(2, 1)  # (no mark: checked, and computed by the gather)
    assert not kernels._enumerated(fn, plain)
    assert torch.equal(kernels.fused_log_prob(fn, plain), fn.log_prob(plain))


def _take_reference(t, dims, batch, tail=()):
    n = len(batch)
    full = n + len(tail)
    if t.dim() < full:
        t = t.reshape((1,) * (full - t.dim()) + t.shape)
    index = tuple(slice(None) if d in dims else 0 for d in range(n))
    srt = sorted(dims)
    size = [batch[d] for d in srt] + list(tail)
    order = [srt.index(d) for d in dims] + [len(dims) + i for i in range(len(tail))]
    return t[index].expand(size).permute(order)


@pytest.mark.parametrize(
    "make, dims, batch, tail",
    [
        (lambda: torch.randn(3, 1, 2).expand(3, 7, 2), [0], (3, 7), (2,)),  # expanded locs
        (lambda: torch.randn(3, 1, 2, 2), [0], (3, 7), (2, 2)),  # direct: one reshape
        (lambda: torch.randn(7, 2), [1], (3, 7), (2,)),  # padded data rows
        (lambda: torch.randn(4, 3).T, [1, 0], (3, 4), ()),  # permuted, non-contiguous
        (lambda: torch.randn(1, 5), [0, 1], (3, 5), ()),  # expanded along a kept dim
        (lambda: torch.randn(6, 2, 3)[::2], [0], (3, 2), (3,)),  # strided, offset-free
        (lambda: torch.randn(9, 2)[3:7], [0], (4,), (2,)),  # a storage offset
    ],
)
def test_take_is_the_view_of_the_index_expand_permute(make, dims, batch, tail):
    t = make()
    got = kernels._take(t, dims, batch, tail)
    want = _take_reference(t, dims, batch, tail)
    assert got.shape == want.shape and got.stride() == want.stride()
    assert got.data_ptr() == want.data_ptr() and torch.equal(got, want)
    flat = kernels._flat(t, dims, batch, tail)
    assert torch.equal(flat, want.reshape((-1,) + tuple(tail)))
    leaf = t.detach().requires_grad_()  # (a graph: the index/expand/permute path)
    assert torch.equal(kernels._take(leaf, dims, batch, tail), want)


def _mvn_before(fn, value):
    """``kernels._mvn``'s no-grad path as it was (einsum shift, expanded identity, chunks with
    ``out=``): the reference the cached plan must match bit for bit."""
    tril = fn._unbroadcasted_scale_tril
    batch, pd, vd = kernels._layout([(fn.loc, 1), (tril, 2)], value, 1)
    d = value.shape[-1]
    loc = _take_reference(fn.loc, pd, batch, (d,)).reshape(-1, d)
    tril = _take_reference(tril, pd, batch, (d, d)).reshape(-1, d, d)
    x = _take_reference(value, vd, batch, (d,)).reshape(-1, d)
    m = loc.shape[0]
    eye = torch.eye(d, dtype=loc.dtype)
    prec = torch.linalg.solve_triangular(tril, eye.expand(tril.shape), upper=False).mT
    stacked = prec.permute(1, 0, 2).reshape(d, m * d)
    const = -tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) - d * kernels._HALF_LOG_2PI
    centre = x.mean(0)
    xa = torch.ones(x.shape[0], d + 1, dtype=x.dtype)
    torch.sub(x, centre, out=xa[:, :-1])
    shift = torch.einsum("md,mde->me", loc - centre, prec).reshape(m * d)
    pa = torch.cat([stacked, -shift.unsqueeze(0)])
    y = torch.empty(x.shape[0], m * d, dtype=x.dtype)
    blocks = torch.eye(m, dtype=x.dtype).repeat_interleave(d, 0)
    out = torch.empty(x.shape[0], m, dtype=x.dtype)
    torch.mm(xa, pa, out=y).square_()
    torch.addmm(const, y, blocks, alpha=-0.5, out=out)
    return kernels._place(out.T, batch, pd, vd)


@pytest.mark.parametrize("k, d", [(2, 2), (3, 4), (1, 3)])
def test_the_fused_mvn_is_bitwise_the_ops_it_replaced(k, d):
    torch.manual_seed(k * 10 + d)
    x = torch.randn(40, d) * 3 + 1
    for step in range(3):  # (the layouts are cached at the first call, reused with new params)
        loc = torch.randn(k, 1, d) + step
        tril = torch.randn(k, 1, d, d).tril() * 0.3 + torch.eye(d) * (1 + step)
        fn = dist.MultivariateNormal(loc, scale_tril=tril).expand([k, 40])
        with torch.no_grad():
            got = kernels.fused_log_prob(fn, x)
        assert torch.equal(got, _mvn_before(fn, x))
        assert torch.allclose(got, fn.log_prob(x), rtol=1e-12, atol=1e-10)


def _gmm(n=60, k=3, cov="full", seed=0):
    data, _ = sample_gmm(N=n, K=k, D=2, seed=seed)
    init = init_params(data, k, cov, seed=1)
    return functools.partial(gmm_model, K=k, covariance_type=cov, init=init), data


def _same_posterior(a, b):
    assert torch.equal(a.log_likelihood, b.log_likelihood)
    assert a.marginals.keys() == b.marginals.keys()
    for name in a.marginals:
        assert torch.equal(a.marginals[name], b.marginals[name])
    for name in a.factor_q:
        assert torch.equal(a.factor_q[name], b.factor_q[name])


def test_reused_handlers_give_a_fresh_guides_posterior():
    pyro.clear_param_store()
    model, data = _gmm()
    guide = ExactEStep(model)
    first = guide.posterior(data)
    assert guide._tracer is not None
    _same_posterior(guide.posterior(data), first)
    _same_posterior(guide.posterior(data), ExactEStep(model).posterior(data))
    # params changed in place, other data, other shapes: as a fresh guide
    pyro.param("locs").data.add_(0.5)
    _same_posterior(guide.posterior(data), ExactEStep(model).posterior(data))
    other = data[:37] * 1.5
    _same_posterior(guide.posterior(other), ExactEStep(model).posterior(other))
    with pytest.raises(ValueError):  # (a failed E-step: the next one is as a fresh guide's)
        guide.posterior(data[:, :1])
    _same_posterior(guide.posterior(data), ExactEStep(model).posterior(data))
    # not state: a pickled guide leaves them out, and works
    copy = pickle.loads(pickle.dumps(guide))
    assert getattr(copy, "_tracer", None) is None
    _same_posterior(copy.posterior(data), guide.posterior(data))


def test_handlers_of_a_run_that_failed_midway_are_not_reused():
    pyro.clear_param_store()
    model, data = _gmm()
    boom = [False]

    def flaky(x):
        out = model(x)
        if boom[0]:
            raise RuntimeError("boom")
        return out

    guide = ExactEStep(flaky)
    want = guide.posterior(data)
    boom[0] = True
    with pytest.raises(RuntimeError, match="boom"):
        guide.posterior(data)
    assert guide._tracer is None  # (handlers left midway are dropped)
    boom[0] = False
    _same_posterior(guide.posterior(data), want)
    assert guide._tracer is not None


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_one_latent_equals_the_generic_contraction(cov, monkeypatch):
    pyro.clear_param_store()
    model, data = _gmm(cov=cov, k=4)
    fast = ExactEStep(model).posterior(data)
    # the mixture's two factors share one posterior tensor: the buffer the MVN kernel made
    assert fast.factor_q["z"] is fast.factor_q["x"]
    monkeypatch.setattr(_estep, "_one_latent", lambda *a, **k: None)
    slow = ExactEStep(model).posterior(data)
    assert torch.allclose(fast.log_likelihood, slow.log_likelihood, rtol=1e-13)
    for name in slow.marginals:
        assert torch.allclose(fast.marginals[name], slow.marginals[name], atol=1e-13)
    for name in slow.factor_q:
        assert torch.allclose(fast.factor_q[name], slow.factor_q[name], atol=1e-13)
    for name, (names, joint) in slow.joints.items():
        assert fast.joints[name][0] == names
        assert torch.allclose(fast.joints[name][1], joint, atol=1e-13)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_steady_state_estep_op_count_on_old_faithful():
    """One E-step at unchanged shapes (the model pass included: ~50 of its ops are Pyro's
    and the model's) on Old Faithful, K=2 full: 169 aten ops before issue 13's E-step work,
    100 before the MVN plan, the lean mixture posterior and syncs by tolist() (87 after; 85
    with the steady recipe, whose log p(x) proves the sites' log-prob sums finite)."""
    pyro.clear_param_store()
    x = load_old_faithful(torch.float64)
    init = init_params(x, 2, "full", seed=1)

    def model(data):
        return gmm_model(data, 2, "full", init=init)

    guide = ExactEStep(model)
    guide._keep_data = True  # (as fit's loop sets it around its E-steps: the same data)
    for _ in range(3):
        guide.posterior(x)
    with _Count() as count:
        guide.posterior(x)
    assert count.n <= 85


def test_site_shape_check_is_pyros_once_per_shape():
    from pyro.poutine.indep_messenger import CondIndepStackFrame
    from pyro.util import check_site_shape

    def site_of(n_plate, n_value):
        frame = CondIndepStackFrame(name="d", dim=-1, size=n_plate, counter=0, full_size=n_plate)
        fn = dist.Normal(torch.zeros(n_value), 1.0)
        lp = fn.log_prob(torch.zeros(n_value))
        return {"name": "x", "fn": fn, "log_prob": lp, "cond_indep_stack": (frame,), "infer": {}}

    good = site_of(3, 3)
    _estep._check_site_shape(good, 1)
    _estep._check_site_shape(good, 1)  # (cached: passes again)
    bad = site_of(3, 4)
    with pytest.raises(ValueError) as ours:
        _estep._check_site_shape(bad, 1)
    with pytest.raises(ValueError) as pyros:
        check_site_shape(bad, 1)
    assert str(ours.value) == str(pyros.value)
    with pytest.raises(ValueError):  # (a failure is not remembered)
        _estep._check_site_shape(bad, 1)
    with pytest.raises(ValueError, match="plate stack overflow"):  # (the depth is in the key)
        _estep._check_site_shape(good, 0)


# ------------------------------------------------------------------ the MVN kernel's plan
def _mvn_cases():
    g = torch.Generator().manual_seed(3)

    def spd_tril(*batch, d):
        a = torch.randn(*batch, d, d, generator=g)
        return torch.linalg.cholesky(a @ a.mT + d * torch.eye(d))

    x = torch.randn(30, 3, generator=g) * 2 + 1
    return [
        # a mixture: locs (K, 1, D), one tril per component, data (N, D)
        ("mixture", torch.randn(4, 1, 3, generator=g), spd_tril(4, 1, d=3), x),
        # data as a transposed (non-contiguous) view
        (
            "strided data",
            torch.randn(2, 1, 3, generator=g),
            spd_tril(2, 1, d=3),
            x.T.contiguous().T,
        ),
        # one shared tril, expanded
        ("shared tril", torch.randn(3, 1, 3, generator=g), spd_tril(d=3).expand(3, 1, 3, 3), x),
        # locs that vary along two dims, data along a third
        ("two param dims", torch.randn(2, 3, 1, 3, generator=g), spd_tril(2, 3, 1, d=3), x),
        # data rows of a batch (N, 1) under a (K, 1, 1) mixture dim
        (
            "data dims",
            torch.randn(2, 1, 1, 3, generator=g),
            spd_tril(2, 1, 1, d=3),
            x.reshape(5, 6, 3),
        ),
        # a storage offset: the data a slice of a bigger tensor
        (
            "offset data",
            torch.randn(2, 1, 3, generator=g),
            spd_tril(2, 1, d=3),
            torch.randn(40, 3, generator=g)[7:37],
        ),
    ]


@pytest.mark.parametrize("which", range(6))
def test_the_mvn_plan_is_the_general_code_bit_for_bit(which):
    # (the cases are made in the test: in float64, which conftest sets per test)
    _, loc, tril, x = _mvn_cases()[which]
    fn = dist.MultivariateNormal(loc, scale_tril=tril)
    with torch.no_grad():
        planned = kernels._mvn(fn, x)
        general = kernels._mvn_general(fn, x)
    assert planned is not None and general is not None
    assert planned.shape == general.shape == fn.log_prob(x).shape
    assert planned.stride() == general.stride()
    assert torch.equal(planned, general)
    assert torch.allclose(planned, fn.log_prob(x), rtol=1e-12, atol=1e-10)
    key = next(k for k in kernels._MVN_PLANS if k[4] == x.shape and k[5] == x.stride())
    assert isinstance(kernels._MVN_PLANS[key], kernels._MvnPlan)


def test_the_mvn_plan_follows_new_params_data_changed_in_place_and_strides():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 2, generator=g)
    kernels._MVN_PLANS.clear()
    with torch.no_grad():
        for step in range(3):  # new params at each call, the same geometry: one plan
            loc = torch.randn(3, 1, 2, generator=g) + step
            tril = torch.randn(3, 1, 2, 2, generator=g).tril() * 0.2 + torch.eye(2)
            fn = dist.MultivariateNormal(loc, scale_tril=tril)
            assert torch.equal(kernels._mvn(fn, x), kernels._mvn_general(fn, x))
        assert len(kernels._MVN_PLANS) == 1
        x.mul_(3).add_(1)  # the data changed in place: their centred copy is made again
        got = kernels._mvn(fn, x)
        assert torch.equal(got, kernels._mvn_general(fn, x))
        assert torch.equal(got, _mvn_before(fn.expand([3, 50]), x))
        # the same shapes with other strides: a plan of their own, and the same numbers
        xt = x.T.contiguous().T
        assert torch.equal(kernels._mvn(fn, xt), kernels._mvn_general(fn, x))
        assert len(kernels._MVN_PLANS) == 2


def test_the_mvn_plan_leaves_autograd_mixed_dtypes_and_chunks_to_the_general_code(monkeypatch):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 2, generator=g)
    loc = torch.randn(2, 1, 2, generator=g, requires_grad=True)
    tril = torch.eye(2).expand(2, 1, 2, 2) * 1.5
    fn = dist.MultivariateNormal(loc, scale_tril=tril)
    calls = []
    real = kernels._mvn_planned
    monkeypatch.setattr(kernels, "_mvn_planned", lambda *a: calls.append(1) or real(*a))
    lp = kernels._mvn(fn, x)  # (autograd records: the general code, differentiable)
    assert lp.requires_grad and not calls
    lp.sum().backward()
    assert loc.grad is not None
    with torch.no_grad():
        assert torch.equal(kernels._mvn(fn, x), kernels._mvn_general(fn, x)) and calls
        fn32 = dist.MultivariateNormal(loc.detach(), scale_tril=tril)
        assert kernels._mvn(fn32, x.float()) is not None  # (mixed dtypes: the general code)
        assert kernels._mvn_plan(kernels._MVN_PLANS and next(iter(kernels._MVN_PLANS))) is not None
    monkeypatch.setattr(kernels, "CHUNK", 8)  # (rows in chunks: the general code)
    kernels._MVN_PLANS.clear()
    with torch.no_grad():
        n = len(calls)
        assert torch.equal(kernels._mvn(fn, x), kernels._mvn_general(fn, x))
        assert len(calls) == n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_conditioning_bound_by_max_norms_is_the_abs_amax_one(dtype):
    import math

    g = torch.Generator().manual_seed(7)
    special = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e30, -1e-30]
    for trial in range(40):
        offsets = (torch.randn(3, 1, 2, generator=g) * 10 ** (trial % 9 - 4)).to(dtype)
        prec = (torch.randn(3, 2, 2, generator=g) * 10 ** (trial % 7)).to(dtype)
        if trial >= 30:
            offsets.view(-1)[trial % 6] = special[trial % len(special)]
            prec.view(-1)[trial % 12] = special[(trial + 3) % len(special)]
        spread = float(torch.rand((), generator=g)) * 10 ** (trial % 5)
        old = (offsets.abs().amax() + spread) * prec.abs().amax()
        new = torch.linalg.vector_norm(offsets, math.inf).add_(spread)
        new = new.mul_(torch.linalg.vector_norm(prec, math.inf))
        assert torch.equal(old, new) or (old.isnan() and new.isnan())
        want = not float(old) * prec.shape[-1] > kernels._AMPLIFICATION_LIMIT
        assert kernels._mvn_conditioned(prec, spread, offsets) == want


# ------------------------------------------------------------------ the lean posterior
def _same_bits(a, b):
    assert torch.equal(a.log_likelihood, b.log_likelihood) and a.scale == b.scale
    assert a.symbol_to_dim == b.symbol_to_dim and a.param_grads == b.param_grads
    assert list(a.subsample.nodes) == list(b.subsample.nodes)
    for field in ("marginals", "factor_q"):
        x, y = getattr(a, field), getattr(b, field)
        assert list(x) == list(y)
        for k in x:
            assert torch.equal(x[k], y[k]) and x[k].stride() == y[k].stride()
            assert getattr(x[k], "_pyro_dims", None) == getattr(y[k], "_pyro_dims", None)
    assert list(a.joints) == list(b.joints) and dict(a.pairwise) == dict(b.pairwise) == {}
    for k, (names, joint) in a.joints.items():
        assert names == b.joints[k][0]
        assert torch.equal(joint, b.joints[k][1]) and joint.stride() == b.joints[k][1].stride()
    # (one (K, N) buffer for both factors, as the general path leaves it)
    assert (a.factor_q["z"] is a.factor_q["x"]) == (b.factor_q["z"] is b.factor_q["x"])


@pytest.mark.parametrize("cov, k, n", [("full", 2, 60), ("full", 5, 33), ("diag", 3, 40)])
def test_the_lean_posterior_is_the_general_path_bit_for_bit(cov, k, n, monkeypatch):
    pyro.clear_param_store()
    model, data = _gmm(n=n, k=k, cov=cov)
    taken = []
    real = _estep._lean_posterior
    monkeypatch.setattr(_estep, "_lean_posterior", lambda tr: taken.append(1) or real(tr))
    guide = ExactEStep(model)
    lean = [guide.posterior(data) for _ in range(3)][-1]
    assert len(taken) == 3
    monkeypatch.setattr(_estep, "_lean_posterior", lambda tr: None)
    _same_bits(lean, ExactEStep(model).posterior(data))
    _same_bits(lean, guide.posterior(data))


def _trace_of(model, *args):
    guide = ExactEStep(model)
    with torch.no_grad():
        return guide._enum_trace(args, {})


def _mixture(x, k=2, mask=None, scale=1.0, latents=1, obs_mask=None):
    w = pyro.param("w_lean", torch.ones(k) / k)
    locs = pyro.param("locs_lean", torch.arange(float(k)))
    masked = poutine.mask(mask=mask) if mask is not None else contextlib.nullcontext()
    with pyro.plate("data", len(x)), poutine.scale(scale=scale), masked:
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        if latents == 2:
            z = z + pyro.sample("z2", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z % k], 1.0), obs=x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": torch.tensor([True, False, True, True])},  # a mask
        {"scale": 2.0},  # a scale
        {"latents": 2},  # two enumerated latents
        {"k": 1},  # one value: packing squeezes its dim
    ],
)
def test_the_lean_posterior_declines_other_structures(kwargs):
    pyro.clear_param_store()
    x = torch.tensor([0.1, 1.2, -0.3, 0.8])
    tr = _trace_of(functools.partial(_mixture, **kwargs), x)
    assert _estep._lean_posterior(tr) is None
    pyro.clear_param_store()
    assert _estep._lean_posterior(_trace_of(_mixture, x)) is not None  # (the plain mixture)


def test_a_mask_of_true_is_no_mask_for_the_lean_posterior(monkeypatch):
    pyro.clear_param_store()
    x = torch.tensor([0.1, 1.2, -0.3, 0.8])
    model = functools.partial(_mixture, mask=True)
    lean = _estep._lean_posterior(_trace_of(model, x))
    assert lean is not None
    monkeypatch.setattr(_estep, "_lean_posterior", lambda tr: None)
    slow = ExactEStep(model).posterior(x)
    assert torch.equal(lean.log_likelihood, slow.log_likelihood)
    assert torch.equal(lean.marginals["z"], slow.marginals["z"])
    assert torch.equal(lean.factor_q["x"], slow.factor_q["x"])


def test_the_lean_posterior_declines_an_hmm_and_leaves_the_trace_unchanged(monkeypatch):
    pyro.clear_param_store()

    def hmm(x):
        trans = pyro.param("trans_lean", torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
        obs = dist.Normal(torch.tensor([0.0, 1.0]), 1.0)
        pyro.sample("x", dist.DiscreteHMM(torch.zeros(2), trans.log(), obs), obs=x)

    assert _estep._lean_posterior(_trace_of(hmm, torch.randn(6))) is None

    # rows in chunks: declined by _two_factors, with nothing written
    pyro.clear_param_store()
    tr = _trace_of(_mixture, torch.tensor([0.1, 1.2, -0.3]))
    monkeypatch.setattr(_estep._kernels, "CHUNK", 2)
    before = [
        s["packed"]["unscaled_log_prob"].clone() for s in tr.nodes.values() if s["type"] == "sample"
    ]
    assert _estep._lean_posterior(tr) is None
    after = [s["packed"]["unscaled_log_prob"] for s in tr.nodes.values() if s["type"] == "sample"]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------ small shortcuts
@pytest.mark.parametrize("own", [True, False])
def test_one_latent_in_the_factors_layout_equals_the_sorted_layout(own, monkeypatch):
    g = torch.Generator().manual_seed(11)

    def factors():  # (K, N) named "ba": the enumerated dim first, unsorted
        a = torch.randn(7, 9, generator=g)
        b = torch.randn(9, 7, generator=g).T  # (a (K, N) view of an (N, K) buffer)
        b[2, 3] = -float("inf")
        return [_estep._named(a, "ba"), _estep._named(b, "ba")]

    def run(terms):
        inputs = [("z", terms[0]), ("x", terms[1])]
        scratch = frozenset({id(terms[1])}) if own else frozenset()
        return _estep._one_latent(
            OrderedDict([(frozenset(), list(terms))]), {"b"}, inputs, None, scratch
        )

    terms = factors()
    copies = [_estep._named(t.clone(memory_format=torch.preserve_format), "ba") for t in terms]
    monkeypatch.setattr(_estep, "_two_factors", lambda *a: None)  # (the general code)
    got = run(terms)
    monkeypatch.setattr(_estep, "_same_layout", _estep._broadcast_all)
    want = run(copies)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b) and a.shape == b.shape == (7, 9)
        assert a.stride() == b.stride()
        assert getattr(a, "_pyro_dims", "ba") == getattr(b, "_pyro_dims", "ba") == "ba"


def test_two_factors_is_the_general_one_latent_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(12)
    a0, b0 = torch.randn(4, 30, generator=g), torch.randn(30, 4, generator=g).T
    a0[1, 2] = -float("inf")

    def pair():  # (copies in the same layouts: b a (K, N) view of an (N, K) buffer)
        return [_estep._named(t.clone(memory_format=torch.preserve_format), "ba") for t in (a0, b0)]

    real = _estep._two_factors
    for in_place in (True, False):
        a, b = pair()
        a2, b2 = pair()
        fast = real([a, b], "b", frozenset({id(b)}) if in_place else frozenset())
        with monkeypatch.context() as m:
            m.setattr(_estep, "_two_factors", lambda *args: None)  # (the general code)
            slow = _estep._one_latent(
                OrderedDict([(frozenset(), [a2, b2])]),
                {"b"},
                [("z", a2), ("x", b2)],
                None,
                frozenset({id(b2)}) if in_place else frozenset(),
            )
        assert torch.equal(fast[0], slow[0])
        for f, s in zip(fast[1], slow[1]):
            assert torch.equal(f, s) and f.stride() == s.stride()
        assert fast[1][0] is fast[1][1]
        assert (fast[1][0] is b) == in_place  # (the posterior over the scratch buffer)
    # declined: autograd, other layouts, chunks
    a, b = pair()
    assert real([a, b.detach().requires_grad_()], "b", frozenset()) is None
    assert real([a, _estep._named(torch.randn(4, 29), "ba")], "b", frozenset()) is None
    monkeypatch.setattr(_estep._kernels, "CHUNK", 16)
    assert real([a, b], "b", frozenset({id(b)})) is None
    assert torch.equal(b, b0)  # (nothing written)


def test_a_fused_log_prob_is_named_as_pyros_pack_names_it():
    from pyro.ops import packed

    dim_to_symbol = {-2: "b", -1: "a"}
    t = torch.randn(3, 5)
    ours = _estep._pack_own(t, dim_to_symbol)
    pyros = packed.pack(t.clone(), dim_to_symbol)
    assert ours is t and ours._pyro_dims == pyros._pyro_dims == "ba"
    assert torch.equal(ours, pyros) and ours.stride() == pyros.stride()
    squeezed = _estep._pack_own(torch.randn(3, 1), dim_to_symbol)  # (a size-1 dim: Pyro's)
    assert squeezed._pyro_dims == "b" and squeezed.shape == (3,)
    with pytest.raises(AssertionError):  # (named already: Pyro's refusal)
        _estep._pack_own(t, dim_to_symbol)
    with pytest.raises(ValueError, match="Invalid tensor shape"):
        _estep._pack_own(torch.randn(2, 3, 5), dim_to_symbol)


def test_site_shape_passes_are_keyed_on_plate_dims_and_sizes_not_names():
    from pyro.poutine.indep_messenger import CondIndepStackFrame

    def site_of(name, size, n_value):
        frame = CondIndepStackFrame(name=name, dim=-1, size=size, counter=0, full_size=size)
        fn = dist.Normal(torch.zeros(n_value), 1.0)
        lp = fn.log_prob(torch.zeros(n_value))
        return {"name": "x", "fn": fn, "log_prob": lp, "cond_indep_stack": (frame,), "infer": {}}

    _estep._SHAPES_PASSED.clear()
    _estep._check_site_shape(site_of("a", 4, 4), 1)
    _estep._check_site_shape(site_of("b", 4, 4), 1)  # (another plate name, same dims: cached)
    assert len(_estep._SHAPES_PASSED) == 1
    with pytest.raises(ValueError, match="invalid log_prob shape"):
        _estep._check_site_shape(site_of("a", 5, 4), 1)  # (another size: checked)


def test_the_one_tensor_validation_key_is_the_general_one():
    from pyro_emvae.validate import ValidationState

    x = torch.randn(5, 2)
    fast = ValidationState().key((x,), {})
    out, shapes = [], []
    ValidationState._entries(((x,), {}), out, shapes)
    assert fast[1] == repr(shapes)
    assert [e[:1] + e[2:] for e in fast[0]] == [e[:1] + e[2:] for e in out]
    assert [e[1]() for e in fast[0] if e[0] == "t"] == [x]
    state = ValidationState()
    state.remember(*state.key((x,), {}))
    assert state.seen(state.key((x,), {})[0])
    x.add_(1)  # (changed in place: not seen)
    assert not state.seen(state.key((x,), {})[0])
    assert not state.same_shapes(state.key((x.float(),), {})[1])
    assert not state.same_shapes(state.key((x[:3],), {})[1])
    assert state.same_shapes(state.key((x.clone(),), {})[1])


# ------------------------------------------------------------------ the steady recipe
def _recipe_calls(monkeypatch):
    """Count the steady recipe's answers: [taken, declined]."""
    seen = [0, 0]
    real = _estep._SteadyMixture.__call__

    def call(self, tr, depth):
        out = real(self, tr, depth)
        seen[out is None] += 1
        return out

    monkeypatch.setattr(_estep._SteadyMixture, "__call__", call)
    return seen


def _general(monkeypatch):
    """The general path only: no recipe is made."""
    monkeypatch.setattr(_estep._SteadyMixture, "of", classmethod(lambda cls, tr, depth: None))


@pytest.mark.parametrize("cov, k, n", [("full", 2, 60), ("full", 5, 33), ("diag", 3, 40)])
def test_the_steady_recipe_is_the_general_path_bit_for_bit(cov, k, n, monkeypatch):
    pyro.clear_param_store()
    model, data = _gmm(n=n, k=k, cov=cov)
    seen = _recipe_calls(monkeypatch)
    guide = ExactEStep(model)
    guide._keep_data = True  # (as fit's loop sets it: the arguments' checks are kept)
    posts = [guide.posterior(data) for _ in range(3)]
    assert seen == [2, 0]  # (the first call is the general path's, which makes the recipe)
    with monkeypatch.context() as m:
        _general(m)
        slow = ExactEStep(model)
        slow._keep_data = True
        want = [slow.posterior(data) for _ in range(3)]
        assert slow.__dict__.get("_steady") is None
    for a, b in zip(posts, want):
        _same_bits(a, b)
    # params changed in place (as an M-step writes them): still the general path's numbers
    pyro.param("locs").data.add_(0.25)
    _same_bits(guide.posterior(data), slow.posterior(data))
    assert seen == [3, 0]


def test_the_steady_recipe_follows_new_data_shapes_and_params(monkeypatch):
    pyro.clear_param_store()
    model, data = _gmm(n=40, k=3)
    seen = _recipe_calls(monkeypatch)
    guide = ExactEStep(model)
    guide._keep_data = True
    guide.posterior(data)
    guide.posterior(data)
    assert seen == [1, 0]
    # another tensor, other values, other shapes: checked again by the general path, which
    # makes the recipe anew; each as a fresh guide's
    for other in (data * 1.5, data[:25].clone(), data.clone()):
        got = guide.posterior(other)
        _same_bits(got, ExactEStep(model).posterior(other))
        _same_bits(guide.posterior(other), got)
    assert seen == [4, 0]
    # a new param store (new tensors, other values): the recipe reads them afresh
    pyro.clear_param_store()
    pyro.param("locs", torch.randn(3, 2))
    _same_bits(guide.posterior(other), ExactEStep(model).posterior(other))
    # a direct call (its arguments checked at every call) makes none
    direct = ExactEStep(model)
    direct.posterior(other)
    assert direct.__dict__.get("_steady") is None
    # not state: a pickled guide leaves the recipe out, and works
    copy = pickle.loads(pickle.dumps(guide))
    assert "_steady" not in copy.__dict__
    _same_bits(copy.posterior(other), guide.posterior(other))


def test_the_steady_recipe_declines_a_changed_structure(monkeypatch):
    """A model whose structure changes between E-steps at the same arguments (a mask, a
    scale, a second latent, another plate size): the recipe declines, with nothing written,
    and the general path gives each posterior."""
    pyro.clear_param_store()
    x = torch.tensor([[0.1], [1.2], [-0.3], [0.8], [2.0]])
    how: dict = {}

    def model(x):
        # (as _mixture, with a fused observation: a diagonal Gaussian)
        k, mask, scale = 2, how.get("mask"), how.get("scale", 1.0)
        w = pyro.param("w_steady", torch.ones(k) / k)
        locs = pyro.param("locs_steady", torch.arange(float(k)).unsqueeze(-1))
        masked = poutine.mask(mask=mask) if mask is not None else contextlib.nullcontext()
        with pyro.plate("data", len(x)), poutine.scale(scale=scale), masked:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            if how.get("latents") == 2:
                z = z + pyro.sample("z2", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z % k], 1.0).to_event(1), obs=x)

    seen = _recipe_calls(monkeypatch)
    guide = ExactEStep(model)
    guide._keep_data = True
    guide.posterior(x)
    guide.posterior(x)
    assert seen == [1, 0]
    cases = [
        {"mask": torch.tensor([True, False, True, True, True])},
        {"mask": True},
        {"scale": 2.0},
        {"latents": 2},
    ]
    for case in cases:
        how.clear()
        how.update(case)
        got = guide.posterior(x)
        with monkeypatch.context() as m:
            _general(m)
            want = ExactEStep(model).posterior(x)
        assert torch.equal(got.log_likelihood, want.log_likelihood)
        for name in want.marginals:
            assert torch.equal(got.marginals[name], want.marginals[name])
        how.clear()
        guide.posterior(x)  # (the plain mixture again: the general path's, a new recipe)
    assert seen[1] == len(cases)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_steady_recipe_warns_as_the_general_path(bad, monkeypatch):
    """Pyro's non-finite log-prob warnings (a NaN or +inf log-density, made here by the
    kernel itself: validated params do not give one): log p(x) is not finite, the recipe
    leaves the E-step to the general path, which warns as it does."""
    import warnings

    pyro.clear_param_store()
    model, data = _gmm(n=30, k=2)
    guide, slow = ExactEStep(model), ExactEStep(model)
    guide._keep_data = slow._keep_data = True
    with monkeypatch.context() as m:
        _general(m)
        slow.posterior(data)
    guide.posterior(data)
    seen = _recipe_calls(monkeypatch)
    real = kernels._mvn_planned

    def spoiled(*args):
        out = real(*args)
        out[1, 3] = bad
        return out

    monkeypatch.setattr(kernels, "_mvn_planned", spoiled)

    def run(g):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            post = g.posterior(data)
        return post, sorted(str(m.message) for m in w)

    got, warned = run(guide)
    assert seen == [0, 1]
    want, expected = run(slow)
    assert warned == expected and any("log_prob_sum at site 'x'" in w for w in warned)
    assert torch.equal(got.log_likelihood.isnan(), want.log_likelihood.isnan())
    assert torch.allclose(got.marginals["z"], want.marginals["z"], equal_nan=True, rtol=0, atol=0)


def test_the_steady_recipe_needs_the_validation_its_template_had(monkeypatch):
    pyro.clear_param_store()
    model, data = _gmm(n=30, k=2)
    seen = _recipe_calls(monkeypatch)
    guide = ExactEStep(model)
    guide._keep_data = True
    with pyro.validation_enabled(False):
        guide.posterior(data)  # (the template: its site-shape checks did not run)
    guide.posterior(data)  # (declined: the general path runs the checks, a new recipe)
    assert seen == [0, 1]
    guide.posterior(data)
    guide.posterior(data)
    assert seen == [2, 1]


def _semi(x, labels, labeled, mask):
    """A semi-supervised mixture (obs_mask= labels) with a poutine.mask on the rows."""
    w = pyro.param("w_view", torch.tensor([0.3, 0.5, 0.2]))
    loc = pyro.param("loc_view", torch.tensor([-1.0, 0.5, 2.0]))
    with pyro.plate("data", len(x)), poutine.mask(mask=mask):
        z = pyro.sample("z", dist.Categorical(w), obs=labels, obs_mask=labeled, infer=PAR)
        pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_the_exact_view_folded_into_enum_is_the_two_handlers(monkeypatch):
    """_ExactEnum (the E-step's reused handler: _ExactView's step, then the enumeration's)
    gives the posterior of enum(_ExactViewModel(model)), on a model where the view acts:
    missing labels summed over, a masked latent read unmasked."""
    pyro.clear_param_store()
    x = torch.tensor([0.1, 1.2, -0.3, 0.8, 2.0, -1.1])
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    labeled = torch.tensor([True, False, True, False, False, True])
    mask = torch.tensor([True, True, False, True, True, True])
    args = (x, labels, labeled, mask)
    calls = []
    real = _estep._ExactEnum._pyro_sample
    monkeypatch.setattr(
        _estep._ExactEnum, "_pyro_sample", lambda self, msg: calls.append(1) or real(self, msg)
    )
    got = ExactEStep(_semi).posterior(*args)
    assert calls  # (the folded handler ran)
    old = ExactEStep(_semi)
    # (a view of another type: the E-step stacks enum over it, the two handlers as before)
    old.model = type("Other", (_estep._ExactViewModel,), {})(_semi)
    n = len(calls)
    want = old.posterior(*args)
    assert len(calls) == n
    assert list(got.marginals) == list(want.marginals)
    _same_posterior(got, want)


def test_the_log_likelihood_read_is_floats_and_follows_writes():
    pyro.clear_param_store()
    model, data = _gmm(n=30, k=2)
    guide = ExactEStep(model)
    guide._keep_data = True
    guide.posterior(data)
    post = guide.posterior(data)  # (the steady recipe's: read once, kept)
    assert "_read" in post.__dict__
    assert post.log_likelihood_value() == float(post.log_likelihood)
    post.log_likelihood.add_(1.0)  # (written in place, as a data-parallel sum does)
    assert post.log_likelihood_value() == float(post.log_likelihood)
    post.log_likelihood = torch.tensor(3.5)  # (another tensor)
    assert post.log_likelihood_value() == 3.5
    fresh = ExactEStep(model).posterior(data)  # (no read kept: read now)
    assert "_read" not in fresh.__dict__
    assert fresh.log_likelihood_value() == float(fresh.log_likelihood)


def _arrange_reference(t, dims_out, shape_out):
    """``_arrange`` as it was before its views were cached per names and shapes."""
    src = t._pyro_dims
    missing = set(src) - {d for d in dims_out if d is not None}
    if missing:
        raise AssertionError("not placed")
    present = [d for d in dims_out if d is not None and d in src]
    order = [src.index(d) for d in present]
    if not present:
        x = t.reshape(())
    elif order != list(range(t.dim())):
        x = t.permute(order)
    else:
        x = t
    if x.shape == shape_out:
        return x
    shape = [t.shape[src.index(d)] if d is not None and d in src else 1 for d in dims_out]
    return x.reshape(shape).expand(shape_out)


@pytest.mark.parametrize(
    "dims, shape, dims_out, shape_out",
    [
        ("ba", (3, 5), ["a", "b"], (5, 3)),  # a mixture's (K, N) posterior: one permute
        ("ab", (5, 3), ["a", "b"], (5, 3)),  # in place
        ("a", (5,), [None, "a", "c"], (2, 5, 4)),  # broadcast positions: reshape and expand
        ("", (), [None, None], (2, 3)),  # a scalar
        ("ab", (5, 3), ["a"], (5,)),  # a dim not placed: an internal error
    ],
)
def test_arrange_by_cached_views_is_the_reference(dims, shape, dims_out, shape_out):
    t = _estep._named(torch.randn(shape), dims)
    for _ in range(2):  # (the second call reads the cached views)
        try:
            want = _arrange_reference(t, dims_out, shape_out)
        except AssertionError:
            with pytest.raises(AssertionError):
                _estep._arrange(t, dims_out, shape_out)
            continue
        got = _estep._arrange(t, dims_out, shape_out)
        assert torch.equal(got, want) and got.stride() == want.stride()
        assert got.data_ptr() == want.data_ptr()
