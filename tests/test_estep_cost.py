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
"""

from __future__ import annotations

import functools
import pickle

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
    and the model's) on Old Faithful, K=2 full: 169 aten ops before issue 13's E-step work."""
    pyro.clear_param_store()
    x = load_old_faithful(torch.float64)
    init = init_params(x, 2, "full", seed=1)

    def model(data):
        return gmm_model(data, 2, "full", init=init)

    guide = ExactEStep(model)
    for _ in range(3):
        guide.posterior(x)
    with _Count() as count:
        guide.posterior(x)
    assert count.n <= 100


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
