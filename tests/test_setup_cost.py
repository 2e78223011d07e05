"""What a fit does once, before its iterations (issue 13, small data): the setup's checks
run on cheaper paths and still fire.

* :meth:`ExactEStep._check_dims` reads only which dims each factor spans: for the families
  the fused kernels cover, the factor's shape comes from the distribution's batch shape and
  the value (:func:`pyro_emvae.kernels.fused_log_prob_shape`), exactly ``log_prob``'s shape; the
  reductions and recycled dims it exists for are still refused through those families.
* The enumeration budget's broadcast watch (a torch function mode) starts at a model's first
  enumerated site, where it would have sat on the mode stack: a prior trace runs unwatched,
  a model's own modes keep their order, and the budget still refuses.
* ``available_memory`` looks psutil and a missing cgroup file up once; the memory is read at
  every call.
* fit's first E-step runs its structure check as the M-step's provenance probe too (one setup
  model pass fewer): the same plan and bitwise the same fit as with the probe's own pass, the
  shared probe refused for other arguments (in place too) or params, the reductions still
  refused; ``pyro.markov`` and chain models keep their own probe.
* The probe's short path for shape inspections and selections, ``_mvn_loc_sharing``'s Python
  test of a few pairs, and the checks' one finiteness flag give what the general paths give.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_emvae import ExactEStep, _compat, validate
from pyro_emvae.errors import EnumerationError
from pyro_emvae.kernels import fused_log_prob_shape as _log_prob_shape

PAR = {"enumerate": "parallel"}


def _cases():
    g = torch.Generator().manual_seed(0)
    k, n, d = 3, 5, 2
    probs = torch.rand(k, generator=g)
    probs = probs / probs.sum()
    locs = torch.randn(k, 1, d, generator=g)  # (an enumerated selection: locs[z])
    tril = torch.eye(d).expand(k, 1, d, d)
    x = torch.randn(n, d, generator=g)
    z = torch.arange(k).reshape(k, 1)
    mask = torch.rand(n, generator=g) > 0.3
    return [
        (dist.Categorical(probs), z),
        (dist.Categorical(probs).expand([n]), z),
        (dist.Categorical(logits=probs.log().expand(n, k)), z),
        (torch.distributions.Categorical(probs), torch.arange(k)),
        (dist.MultivariateNormal(locs, scale_tril=tril), x),
        (dist.MultivariateNormal(locs, scale_tril=tril).mask(mask), x),
        (dist.MultivariateNormal(locs[0, 0], scale_tril=torch.eye(d)).expand([n]), x),
        (dist.Normal(locs, 1.0).to_event(1), x),
        (dist.Normal(locs.squeeze(-1), 1.0), torch.randn(n, 1)),
        (dist.Normal(locs, 1.0).to_event(1).mask(mask).expand([k, n]), x),
        (dist.MultivariateNormal(locs, scale_tril=tril).to_event(1), x.unsqueeze(0)),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_log_prob_shape_is_log_probs_shape(case):
    fn, value = _cases()[case]
    assert _log_prob_shape(fn, value) == fn.log_prob(value).shape


def test_log_prob_shape_leaves_other_families_to_log_prob():
    x = torch.ones(4)
    assert _log_prob_shape(dist.Bernoulli(0.3).expand([4]), x) is None
    assert _log_prob_shape(dist.Poisson(2.0).expand([4]), x) is None
    assert _log_prob_shape(dist.Normal(0.0, 1.0).expand([4]).mask(False), x) is None
    assert _log_prob_shape(dist.Normal(torch.zeros(3), 1.0), torch.zeros(4)) is None  # (raises)


def _reduction(site: str):
    """c: an independent global bit; x: enumerated bits in a plate; y reads their mean outside
    the plate (the reduction moves x's dim onto c's) through a Gaussian or a Categorical (the
    families whose factor shapes the check reads without computing them)."""

    def model():
        pyro.sample("c", dist.Bernoulli(0.5), infer=PAR)
        with pyro.plate("p", 2):
            x = pyro.sample("x", dist.Bernoulli(torch.tensor([0.2, 0.4])), infer=PAR)
        m = x.float().mean(-1)
        if site == "normal":
            pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor(0.3))
        elif site == "mvn":
            loc = torch.stack([m, m], -1)  # (an event dim after the moved one)
            pyro.sample("y", dist.MultivariateNormal(loc, torch.eye(2)), obs=torch.zeros(2))
        else:
            probs = torch.stack([m, 1 - m], -1)
            pyro.sample("y", dist.Categorical(probs), obs=torch.tensor(1))

    return model


@pytest.mark.parametrize("site", ["normal", "mvn", "categorical"])
def test_check_dims_still_refuses_a_reduction_read_by_a_shaped_family(site):
    with pytest.raises(EnumerationError, match=r"site 'y' reads an enumerated value through a"):
        ExactEStep(_reduction(site)).log_likelihood()


# ---------------------------------------------------------------- the enumeration budget's watch
class _Recorder(torch.overrides.TorchFunctionMode):
    """A model's own torch function mode: counts the ops it sees."""

    def __init__(self, name="", log=None):
        super().__init__()
        self.ops, self.name, self.log = 0, name, log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if self.log is not None:
            self.log.append(self.name)
        return func(*args, **(kwargs or {}))


def _stack():
    return [torch._C._get_function_stack_at(i) for i in range(_compat.function_mode_depth())]


def test_insert_and_remove_a_function_mode_keep_the_others_order():
    log = []
    a, b, w = _Recorder("a", log), _Recorder("b", log), _Recorder("w", log)
    base = _stack()
    with a:
        depth = _compat.function_mode_depth()
        with b:
            _compat.insert_function_mode(w, depth)
            assert _stack() == [*base, a, w, b]
            torch.ones(2).neg()  # b, then w, then a see each op
            assert log == ["b", "w", "a"] * 2
        assert _stack() == [*base, a, w]  # b's exit popped b, not w
        _compat.remove_function_mode(w)
        assert _stack() == [*base, a]
        _compat.remove_function_mode(w)  # (not there: nothing)
        assert _stack() == [*base, a]
    assert _stack() == base


def _summed(n: int, mode=None):
    """n binary latents summed into one observation (the budget's case), the sites sampled
    inside ``mode`` (a model's own torch function mode) if given; records the function-mode
    depth before any site and after the first."""
    probs = torch.linspace(0.2, 0.8, n)
    depths = []

    def model(x):
        depths.append(_compat.function_mode_depth())
        total = 0.0
        with mode if mode is not None else contextlib.nullcontext():
            for i in range(n):
                total = total + pyro.sample(f"z_{i}", dist.Bernoulli(probs[i]), infer=PAR)
                if i == 0:
                    depths.append(_compat.function_mode_depth())
        pyro.sample("x", dist.Normal(total, 1.0), obs=x)

    return model, depths


def test_the_budget_watch_starts_at_the_first_enumerated_site(monkeypatch):
    """Nothing watches a model run before its first enumerated site (fit's prior trace: not at
    all); from there on the watch refuses as before, under a model's own mode too, and every
    mode stack is left as it was."""
    monkeypatch.setenv(validate.ENUM_BUDGET_ENV, "1MB")
    base = _compat.function_mode_depth()
    model, depths = _summed(3)
    ExactEStep(model, max_plate_nesting=0).posterior(torch.tensor(1.0))  # (fits: 2**3 values)
    assert depths[:2] == [base, base + 1]  # the watch starts at z_0
    assert _compat.function_mode_depth() == base
    # a prior trace (no enumeration): nothing is watched
    depths.clear()
    tracer = pyro.poutine.trace(model)
    with validate.explain_model_errors(tracer):
        tracer.get_trace(torch.tensor(1.0))
    assert depths[:2] == [base, base]
    # refused under the model's own mode, which keeps seeing the ops; the stack is restored
    mode = _Recorder()
    model, depths = _summed(40, mode)
    with pytest.raises(EnumerationError, match=r"budget is 1 MB"):
        ExactEStep(model, max_plate_nesting=0).posterior(torch.tensor(20.0))
    assert depths[:2] == [base, base + 2]  # (the model's mode, and the watch beneath it)
    assert mode.ops > 0
    assert _compat.function_mode_depth() == base


# ---------------------------------------------------------------- available memory
def test_available_memory_looks_psutil_and_the_cgroup_file_up_once(monkeypatch):
    """psutil (or its absence) and a missing cgroup v2 file are looked up once per process; the
    memory itself is read at every call."""
    import os
    import types

    free = [123, 456]
    fake = types.SimpleNamespace(
        virtual_memory=lambda: types.SimpleNamespace(available=free.pop(0))
    )
    monkeypatch.setattr(validate, "_PSUTIL", fake)
    monkeypatch.setattr(validate, "_CGROUP_V2", False)
    assert validate.available_memory() == 123
    assert validate.available_memory() == 456  # (read again)
    monkeypatch.setattr(validate, "_PSUTIL", None)
    monkeypatch.setattr(validate, "_CGROUP_V2", True)
    first = validate.available_memory()
    assert validate._PSUTIL is not None  # (the module, or False: not looked up again)
    try:
        import psutil  # noqa: F401
    except ImportError:
        if not os.path.exists("/proc/meminfo"):
            return
        with open("/proc/meminfo") as f:
            text = f.read()
        want = int(text.split("MemAvailable:")[1].split()[0]) * 1024
        assert first is not None and abs(first - want) < 2**30  # (memory moves a little)
    assert validate._CGROUP_V2 == os.path.exists("/sys/fs/cgroup/memory.max")


# ---------------------------------------------------------------- one setup pass fewer
# fit's first E-step runs its structure check (ExactEStep._check_dims) as the M-step's
# provenance probe too (ExactEStep._shared_probe): the probe's trace then has an unused dim
# beside each enumerated one, and EMOptim reads the E-step's weights at those dims (Plan.dims).
def _gmm(ct: str):
    from models.gmm import gmm_model, init_params, sample_gmm

    data, _ = sample_gmm(N=60, K=3, D=2, seed=0)
    init = init_params(data, 3, ct, seed=1)
    return (lambda d: gmm_model(d, 3, ct, init=init)), (data,)


def _poisson():
    from models.count_mixtures import init_poisson, poisson_mixture, sample_poisson_mixture

    data = sample_poisson_mixture(80, 3, 2, seed=0)
    if isinstance(data, tuple):
        data = data[0]
    init = init_poisson(data, 3, seed=0)
    return (lambda d: poisson_mixture(d, 3, init=init)), (data,)


def _two_latents():
    """Two enumerated sites, one read through the other, a masked and scaled plate."""

    def model(x, keep):
        w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
        t = pyro.param(
            "t", torch.tensor([[0.7, 0.3], [0.2, 0.8]]), constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)), poutine.mask(mask=keep), poutine.scale(scale=2.0):
            a = pyro.sample("a", dist.Categorical(w), infer=PAR)
            b = pyro.sample("b", dist.Categorical(t[a]), infer=PAR)
            pyro.sample("x", dist.Normal(locs[b], 1.0), obs=x)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, generator=g)
    return model, (x, torch.rand(40, generator=g) > 0.2)


_SHARED_CASES = {
    "gmm-full": lambda: _gmm("full"),
    "gmm-tied": lambda: _gmm("tied"),
    "gmm-diag": lambda: _gmm("diag"),
    "poisson": _poisson,
    "two-latents": _two_latents,
}


def _fit(model, args, shared: bool, monkeypatch, **kw):
    from pyro_emvae import EMOptim, fit
    from pyro_emvae import track as _track

    calls = []
    probe = _track.probe
    monkeypatch.setattr(_track, "probe", lambda *a, **k: calls.append(1) or probe(*a, **k))
    with monkeypatch.context() as m:
        if not shared:
            m.setattr(ExactEStep, "_shared_probe", lambda self, *a, **k: None)
        pyro.clear_param_store()
        res = fit(model, ExactEStep(model), *args, optim=EMOptim(reg_covar=1e-6), progress=False, **kw)  # fmt: skip
    return res, len(calls)


@pytest.mark.parametrize("case", sorted(_SHARED_CASES))
def test_a_shared_probe_gives_bitwise_the_fit_of_its_own_probe(case, monkeypatch):
    """The same plan and bitwise the same fit (params, history) as with the probe's own pass;
    one probe either way."""
    model, args = _SHARED_CASES[case]()
    a, na = _fit(model, args, True, monkeypatch, max_iter=6, tol=0)
    b, nb = _fit(model, args, False, monkeypatch, max_iter=6, tol=0)
    assert na == nb == 1
    assert a.history["log_likelihood"] == b.history["log_likelihood"] and a.n_iter == b.n_iter
    assert a.closed_form == b.closed_form and a.gradient == b.gradient
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_a_plan_with_gradient_params_takes_its_own_probe(monkeypatch):
    """ECM (a scale = softplus(raw) takes Adam steps): such a plan is probed again at every
    M-step in its own layout, the first M-step's too. The shared probe's layout sums the
    statistics in another order (the last bits differ), so a fit resumed from a checkpoint
    (whose first M-step comes at a later iteration) did not equal the uninterrupted one
    (test_checkpoint's ECM resume); every plan here is its own probe's (no Plan.dims), and
    the fit is bitwise that of no sharing."""
    from pyro_emvae import EMOptim, fit

    def model(x):
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
        raw = pyro.param("raw", torch.tensor([0.3, -0.4]))
        w = pyro.param("w", torch.tensor([0.35, 0.65]), constraint=dist.constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            scale = torch.nn.functional.softplus(raw)[z]
            pyro.sample("x", dist.Normal(loc[z], scale), obs=x)

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(80, generator=g) - 2, 0.5 * torch.randn(80, generator=g) + 2])
    plan = EMOptim.plan
    runs = []
    for shared in (True, False):
        dims = []
        with monkeypatch.context() as m:
            m.setattr(EMOptim, "plan", lambda self, *a, dims=dims, **k: dims.append(plan(self, *a, **k).dims) or self._plan)  # fmt: skip
            if not shared:
                m.setattr(ExactEStep, "_shared_probe", lambda self, *a, **k: None)
            pyro.clear_param_store()
            optim = EMOptim(pyro.optim.Adam({"lr": 0.05}), svi_steps=3)
            runs.append(fit(model, ExactEStep(model), x, optim=optim, max_iter=4, tol=0, progress=False))  # fmt: skip
        assert optim._plan.gradient == ["raw"] and len(dims) >= 4 and dims == [{}] * len(dims)
    a, b = runs
    assert a.history["log_likelihood"] == b.history["log_likelihood"]
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_a_shared_probe_plan_matches_the_plan_of_its_own_probe(monkeypatch):
    from pyro_emvae import EMOptim

    for case in sorted(_SHARED_CASES):
        model, args = _SHARED_CASES[case]()
        pyro.clear_param_store()
        guide = ExactEStep(model)
        guide.share_probe = True
        post = guide.posterior(*args)
        probe = guide._probe
        assert probe is not None and probe[2], case  # (dims: E-step -> probe, moved apart)
        shared = EMOptim().plan(guide, args, {}, post.subsample)
        assert guide._probe is None  # (taken once)
        own = EMOptim().plan(guide, args, {}, post.subsample)
        assert not own.dims and shared.dims == probe[2]
        for f in ("closed_form", "gradient", "reasons", "roles", "plain_locs"):
            assert getattr(shared, f) == getattr(own, f), (case, f)
        assert shared.space.offsets == own.space.offsets
        assert shared.space.opaque == own.space.opaque


def test_a_shared_probe_is_used_only_for_what_it_saw(monkeypatch):
    """The probe kept by the E-step is refused for other arguments, arguments changed in
    place, or another param set: the plan then probes anew (and is the same)."""
    from pyro_emvae import EMOptim
    from pyro_emvae import track as _track

    model, (x,) = _gmm("full")
    calls = []
    probe = _track.probe
    monkeypatch.setattr(_track, "probe", lambda *a, **k: calls.append(1) or probe(*a, **k))

    def planned(change):
        pyro.clear_param_store()
        guide = ExactEStep(model)
        guide.share_probe = True
        post = guide.posterior(x)
        n = len(calls)
        args = change()
        plan = EMOptim().plan(guide, args, {}, post.subsample)
        return plan, len(calls) - n

    plan, extra = planned(lambda: (x,))
    assert extra == 0 and plan.dims
    plan, extra = planned(lambda: (x.clone(),))  # another tensor
    assert extra == 1 and not plan.dims
    plan, extra = planned(lambda: (x.add_(0.0),))  # changed in place
    assert extra == 1 and not plan.dims

    def new_param():
        pyro.param("extra", torch.zeros(2))
        return (x,)

    plan, extra = planned(new_param)
    assert extra == 1 and not plan.dims


def test_a_fit_makes_one_setup_pass_fewer(monkeypatch):
    """Model passes of a GMM fit: one per E-step (the first also fit's input-check trace, see
    ExactEStep._first_trace) and one pass for the structure check and the probe together."""
    model, args = _gmm("full")
    passes = [0]

    def counted(d):
        passes[0] += 1
        return model(d)

    res, probes = _fit(counted, args, True, monkeypatch, max_iter=5, tol=0)
    assert probes == 1
    assert passes[0] == (res.n_iter + 1) + 1


@pytest.mark.parametrize("site", ["normal", "mvn", "categorical"])
def test_a_shared_probe_still_refuses_a_reduction(site):
    guide = ExactEStep(_reduction(site))
    guide.share_probe = True
    with pytest.raises(EnumerationError, match=r"site 'y' reads an enumerated value through a"):
        guide.log_likelihood()


def test_markov_and_chain_models_keep_their_own_probe():
    """A pyro.markov model (whose check does not recycle dims) and a DiscreteHMM site keep
    the two passes."""
    from models.hmm import gaussian_hmm, gaussian_hmm_markov, init_params, sample_gaussian_hmm

    data = sample_gaussian_hmm(N=2, T=6, K=2, D=2, seed=0)
    data = data[0] if isinstance(data, tuple) else data
    init = init_params(data, 2, "gaussian", seed=0)
    for fn in (gaussian_hmm, gaussian_hmm_markov):
        pyro.clear_param_store()
        guide = ExactEStep(lambda d, fn=fn: fn(d, 2, init=init))
        guide.share_probe = True
        guide.posterior(data)
        assert getattr(guide, "_probe", None) is None


def test_a_pickled_guide_drops_its_shared_probe():
    model, (x,) = _gmm("diag")
    pyro.clear_param_store()
    guide = ExactEStep(model)
    guide.share_probe = True
    guide.posterior(x)
    assert guide._probe is not None
    assert "_probe" not in guide.__getstate__()


# ---------------------------------------------------------------- cheaper setup pieces
def test_the_probes_short_path_gives_what_the_general_path_gives(monkeypatch):
    """Tracked shape inspections and selections by the short path equal the general path's:
    values, ids, form and param names."""
    from pyro_emvae import track as _track

    t = _track.Tracked.wrap(torch.arange(12.0).reshape(2, 3, 2), "p")
    z = torch.tensor([[1], [0]])
    ops = [
        lambda a: a.dim(), lambda a: a.size(), lambda a: a.size(-1), lambda a: a.shape,
        lambda a: a.numel(), lambda a: a.dtype, lambda a: a.is_floating_point(),
        lambda a: a[z], lambda a: a[0], lambda a: a.expand(4, 2, 3, 2),
        lambda a: a.reshape(6, 2), lambda a: a.unsqueeze(-2), lambda a: a.transpose(-1, -2),
        lambda a: a.permute(2, 0, 1), lambda a: a.flatten(0, 1), lambda a: a.squeeze(),
        lambda a: a.detach(), lambda a: a.index_select(1, torch.tensor([2, 0])), lambda a: a.mT,
        lambda a: torch.flip(a, [0]), lambda a: a.narrow(1, 1, 2), lambda a: a.select(0, 1),
        # (a shape argument: a distribution's expand passes its batch shape as a torch.Size)
        lambda a: a.expand(torch.Size([4, 2, 3, 2])), lambda a: a.expand((4, 2, 3, 2)),
        lambda a: a.reshape(torch.Size([6, 2])), lambda a: a.reshape((3, 4)),
    ]  # fmt: skip
    fast = [op(t) for op in ops]
    # (each shape-argument op took the short path: it runs no general-path helper)
    calls = []
    strip = _track._strip
    monkeypatch.setattr(_track, "_strip", lambda o: calls.append(o) or strip(o))
    for op in ops[-4:]:
        op(t)
    assert not calls
    monkeypatch.setattr(_track, "_FAST", frozenset())
    slow = [op(t) for op in ops]
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert type(a) is type(b), i
        if isinstance(b, torch.Tensor):
            assert torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)), i
            assert torch.equal(a.ids, b.ids) and a.form == b.form, i
            assert a.param == b.param and a.param_names == b.param_names, i
        else:
            assert a == b, i


def test_mvn_loc_sharing_small_path_equals_the_sorting_path(monkeypatch):
    """_mvn_loc_sharing's Python test of a few (row, key) pairs gives the torch.unique one's
    answer: a loc whose rows each meet one covariance, and one shared by two covariances."""
    from pyro_emvae import EMOptim, optim

    def shared_loc(x):
        loc = pyro.param("loc", torch.zeros(2, 2))
        tril = pyro.param("tril", torch.eye(2).expand(3, 2, 2).clone(),
                          constraint=dist.constraints.lower_cholesky)  # fmt: skip
        w = pyro.param("w", torch.ones(3) / 3, constraint=dist.constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            row = torch.tensor([0, 1, 1])[z]  # (components 1 and 2 share loc row 1)
            pyro.sample("x", dist.MultivariateNormal(loc[row], scale_tril=tril[z]), obs=x)

    cases = [_gmm("full"), _gmm("tied"), (shared_loc, (torch.randn(30, 2),))]
    for model, args in cases:
        got = []
        for small in (4096, 0):
            monkeypatch.setattr(optim, "_SMALL_PAIRS", small)
            pyro.clear_param_store()
            guide = ExactEStep(model)
            post = guide.posterior(*args)
            plan = EMOptim().plan(guide, args, {}, post.subsample)
            got.append((plan.plain_locs, plan.reasons, plan.closed_form))
        assert got[0] == got[1]


def test_one_flag_for_every_tensor_keeps_each_check():
    """check_params / check_distributions read one flag when all is finite; an inf (allowed
    in a distribution) or a NaN still goes through the per-tensor checks and their errors."""
    from pyro_emvae.errors import ModelInputError

    assert validate._all_finite_sums([torch.ones(3), torch.zeros(2, dtype=torch.float32)])
    assert validate._all_finite_sums([])
    assert not validate._all_finite_sums([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not validate._all_finite_sums([torch.tensor([float("nan")])])
    big = torch.full((4,), 1e308)  # finite entries whose sum overflows: checked one by one
    assert not validate._all_finite_sums([big])

    def model(logits):
        with pyro.plate("p", 3):
            pyro.sample("y", dist.Categorical(logits=logits), obs=torch.zeros(3, dtype=torch.long))

    def trace(logits):
        with pyro.validation_enabled(False):
            return poutine.trace(model).get_trace(logits)

    validate.check_distributions(trace(torch.tensor([[0.0, -float("inf")]] * 3)))
    validate.check_distributions(trace(torch.full((3, 2), 1e308)))
    with pytest.raises(ModelInputError, match=r"site 'y' .* NaN value"):
        validate.check_distributions(trace(torch.tensor([[0.0, float("nan")]] * 3)))

    def with_param(value):
        def m():
            pyro.param("a", torch.ones(2))
            pyro.param("b", value)

        pyro.clear_param_store()
        return poutine.trace(m).get_trace()

    validate.check_params(with_param(torch.full((2,), 1e308)))
    with pytest.raises(ModelInputError, match=r"param 'b' .* 1 non-finite"):
        validate.check_params(with_param(torch.tensor([0.0, float("inf")])))


# ---------------------------------------------------------------- round 2: what a fit pays once
def _recipe_cases():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(40).reshape(2, 4, 5)
    return [
        (12, torch.arange(6).reshape(2, 1, 3), (torch.rand(2, 7, 3, generator=g),)),
        (6, torch.arange(6).reshape(2, 3).expand(4, 2, 3), (torch.rand(4, 2, 3, generator=g),)),
        (40, base.transpose(0, 2)[1:], (torch.rand(4, 2, generator=g), torch.rand(1, 4, 1))),
        (40, base[:, 1:3, ::2], (torch.rand(1, 2, 3, generator=g),)),
        (6, torch.arange(6).reshape(2, 1, 3), (torch.tensor(1.0),)),
        (4, torch.arange(4).reshape(2, 1, 1, 2), (torch.rand(2, 1, 9, 2), torch.rand(9, 2))),
        (8, torch.arange(8).reshape(2, 1, 1, 2, 2), (torch.rand(2, 1, 1, 1, 1),)),
        (5, torch.tensor(3), (torch.rand(7, generator=g),)),
    ]


@pytest.mark.parametrize("case", range(len(_recipe_cases())))
def test_add_recipe_ids_and_marks_are_the_expanded_ids_at_the_pooled_dims(case):
    """_AddRecipe's ids (read as one strided view, without expanding the ids) are those of
    ``ids.expand(shape)`` at index 0 of every pooled dim (stride 0, size > 1), flattened; its
    marks are exactly those ids; and Stats.add scatters what the dense product scatters."""
    from pyro_emvae import stats as _stats

    length, ids, factors = _recipe_cases()[case]
    recipe = _stats._AddRecipe(length, ids, factors)
    shape = torch.broadcast_shapes(ids.shape, *(f.shape for f in factors))
    full = ids.expand(shape)
    index = tuple(
        slice(0, 1) if full.stride(d) == 0 and shape[d] > 1 else slice(None)
        for d in range(len(shape))
    )
    assert torch.equal(recipe.ids, full[index].reshape(-1))
    want = torch.zeros(length, dtype=torch.bool)
    want[recipe.ids] = True
    assert torch.equal(recipe.seen, want) and recipe.seen.dtype == torch.bool
    product = factors[0]
    for f in factors[1:]:
        product = product * f
    dense = torch.zeros(length, dtype=product.dtype)
    dense.index_add_(0, full.reshape(-1), product.expand(shape).reshape(-1))
    stats = _stats.Stats(length)
    stats.add("k", ids, *factors)
    assert torch.allclose(stats.sums["k"], dense, rtol=1e-12, atol=1e-12)


def test_tracked_shape_reads_skip_dispatch_and_mark_nothing():
    """A Tracked value's shape, dtype, device, dim() and size() are the plain tensor's, under
    a probe they mark no param as used, and contiguous() (an op that gives back its input)
    by the short path is a new Tracked of the same ids."""
    from pyro_emvae import track as _track

    t = _track.Tracked.wrap(torch.arange(6.0).reshape(2, 3), "p")
    plain = t.as_subclass(torch.Tensor)
    assert t.shape == plain.shape and type(t.shape) is torch.Size
    assert (t.dtype, t.device, t.dim()) == (plain.dtype, plain.device, plain.dim())
    assert t.size() == plain.size() and t.size(-1) == 3 and t.size(dim=0) == 2

    def model():
        p = pyro.param("p", torch.ones(2, 3))
        assert p.shape == (2, 3) and p.dim() == 2 and p.size(0) == 2 and p.dtype == p.dtype
        q = pyro.param("q", torch.ones(3), constraint=dist.constraints.positive)
        pyro.sample("y", dist.Normal(q.exp(), 1.0), obs=torch.zeros(3))

    pyro.clear_param_store()
    _, space = _track.probe(model, (), {}, 0)
    assert space.opaque == {"q"}  # (exp: an opaque use; shape reads of p: none)
    c = t.contiguous()
    assert type(c) is _track.Tracked and c is not t and torch.equal(c.ids, t.ids)


def test_a_recent_memory_read_stands_in_only_for_small_factors(monkeypatch):
    """check_enumeration_memory reads the available memory once per RECENT_MEMORY_S for
    factors of at most half of it; a larger factor, a replaced available_memory or an old
    read reads it again, and a factor over the memory is still refused."""
    reads = []

    def fake(device=None):
        reads.append(1)
        return free[0]

    monkeypatch.delenv(validate.ENUM_BUDGET_ENV, raising=False)
    monkeypatch.setattr(validate, "_RECENT_MEMORY", {})
    monkeypatch.setattr(validate, "available_memory", fake)
    tr = _enum_trace_of(torch.randn(50))
    need = validate.PEAK_FACTORS * 2 * 50 * 8  # (a (2, 50) float64 factor)
    free = [10 * need]
    validate.check_enumeration_memory(tr, 1)
    validate.check_enumeration_memory(tr, 1)
    assert len(reads) == 1  # (the second within the second: the first read stands in)
    free[0] = need - 1
    monkeypatch.setattr(validate, "RECENT_MEMORY_S", 0.0)  # (an old read: read again)
    with pytest.raises(EnumerationError, match="enumerating this model would need"):
        validate.check_enumeration_memory(tr, 1)
    assert len(reads) == 2
    monkeypatch.setattr(validate, "RECENT_MEMORY_S", 1.0)
    validate._RECENT_MEMORY.clear()
    free[0] = int(1.5 * need)  # (read now; a factor over half of it reads again)
    validate.check_enumeration_memory(tr, 1)
    validate.check_enumeration_memory(tr, 1)
    assert len(reads) == 4
    monkeypatch.setattr(validate, "available_memory", lambda device=None: need - 1)
    with pytest.raises(EnumerationError):  # (another available_memory: not the cached read)
        validate.check_enumeration_memory(tr, 1)


def _enum_trace_of(x):
    def model(x):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[z], 1.0), obs=x)

    pyro.clear_param_store()
    return poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace(x)


def test_a_finite_observed_value_is_summed_once_until_changed_in_place(monkeypatch):
    """The same data tensor, unmodified, is not summed again by the next check of the same
    fit (its prior trace, then its first E-step); the next fit checks it again (a write
    through a numpy alias moves no version: test_regressions), and changed in place it is
    refused with the same message as a new tensor."""
    from pyro_emvae import fit
    from pyro_emvae.errors import ModelInputError

    model, (x,) = _gmm("diag")
    x = x.clone()
    sums = []
    real = validate._finite_sum
    monkeypatch.setattr(validate, "_finite_sum", lambda t: sums.append(t) or real(t))
    pyro.clear_param_store()
    fit(model, ExactEStep(model), x, max_iter=2, tol=0)
    assert sum(t is x for t in sums) == 1
    sums.clear()
    pyro.clear_param_store()
    fit(model, ExactEStep(model), x, max_iter=2, tol=0)
    assert sum(t is x for t in sums) == 1
    x[3, 1] = float("nan")
    messages = []
    for data in (x, x.clone()):
        pyro.clear_param_store()
        with pytest.raises(ModelInputError, match="1 NaN value") as e:
            fit(model, ExactEStep(model), data, max_iter=2, tol=0)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_the_update_reads_the_log_likelihood_again_if_it_changed():
    """InMemory's update record is evaluate's read of the same log-likelihood tensor; an
    M-step that changes it in place is read again."""
    from pyro_emvae.loop import InMemory, Rollback

    model, args = _gmm("diag")
    pyro.clear_param_store()
    guide = ExactEStep(model)

    def mstep(guide, post, args, kwargs):
        post.log_likelihood.add_(1.0)
        return {}

    step = InMemory(guide, mstep, args, {}, [])
    value, post = step.evaluate(Rollback([], False), 0)
    assert value == float(post.log_likelihood)
    tick = step.update(post, 0, Rollback([], False))
    assert tick.value == value + 1.0
    value, post = step.evaluate(Rollback([], False), 1)
    assert step.update(post, 1, Rollback([], False)).value == value + 1.0
    step2 = InMemory(guide, lambda *a: {}, args, {}, [])
    value, post = step2.evaluate(Rollback([], False), 0)
    assert step2.update(post, 0, Rollback([], False)).value == value


# ---------------------------------------------------------------- fit's prior trace = first E-step
def _random_init_after_latent():
    """A param created after the latent from the RNG (so the prior trace's draw of z comes
    between two param initializations), a masked plate inside an outer plate."""

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        keep = torch.arange(x.shape[-1]) % 7 != 0
        with (
            pyro.plate("rep", x.shape[0], dim=-2),
            pyro.plate("data", x.shape[-1]),
            poutine.mask(mask=keep),
        ):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            locs = pyro.param("locs", lambda: torch.randn(2))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    x = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    return model, (x,)


def _no_latent():
    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    return model, (torch.randn(20, generator=torch.Generator().manual_seed(5)),)


_FIRST_CASES = {
    **{k: v for k, v in _SHARED_CASES.items() if k != "two-latents"},
    "random-init-after-latent": _random_init_after_latent,
    "no-latent": _no_latent,
}


def _fit_first(model, args, combined: bool, monkeypatch, **kw):
    """fit with its first E-step pass as the prior trace (``combined``) or with the separate
    prior trace; returns the result, the RNG state after, the model passes and whether the
    separate prior trace ran."""
    import sys

    from pyro_emvae import EMOptim, fit

    F = sys.modules["pyro_emvae.fit"]
    passes, separate = [0], []

    def counted(*a, **k):
        passes[0] += 1
        return model(*a, **k)

    inspect = F._inspect
    with monkeypatch.context() as m:
        m.setattr(F, "_inspect", lambda *a, **k: separate.append(1) or inspect(*a, **k))
        if not combined:
            m.setattr(F, "_inspect_first", lambda *a, **k: None)
        pyro.clear_param_store()
        pyro.set_rng_seed(11)
        guide = ExactEStep(counted)
        res = fit(counted, guide, *args, optim=EMOptim(reg_covar=1e-6), progress=False, **kw)
    return res, torch.get_rng_state(), passes[0], bool(separate), guide.max_plate_nesting


@pytest.mark.parametrize("case", sorted(_FIRST_CASES))
def test_fits_first_pass_gives_bitwise_the_fit_of_the_separate_prior_trace(case, monkeypatch):
    """The first E-step's pass as fit's prior trace: bitwise the same fit (params, history,
    n_data), the RNG left as the prior trace left it (its draw of the latent made again), the
    same max_plate_nesting, one model pass fewer."""
    model, args = _FIRST_CASES[case]()
    a, rng_a, passes_a, sep_a, depth_a = _fit_first(model, args, True, monkeypatch, max_iter=4, tol=0)  # fmt: skip
    b, rng_b, passes_b, sep_b, depth_b = _fit_first(model, args, False, monkeypatch, max_iter=4, tol=0)  # fmt: skip
    assert not sep_a and sep_b
    assert passes_a == passes_b - 1
    assert torch.equal(rng_a, rng_b)
    assert depth_a == depth_b
    assert a.history.keys() == b.history.keys()
    for key in b.history:
        if key != "time":
            assert a.history[key] == b.history[key], key
    assert a.n_iter == b.n_iter and a.n_data == b.n_data
    assert a.params.keys() == b.params.keys()
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k


def _markov():
    from models.hmm import gaussian_hmm_markov, init_params, sample_gaussian_hmm

    data = sample_gaussian_hmm(N=2, T=5, K=2, D=2, seed=0)
    data = data[0] if isinstance(data, tuple) else data
    init = init_params(data, 2, "gaussian", seed=0)
    return (lambda d: gaussian_hmm_markov(d, 2, init=init)), (data,)


def _binomial():
    """A support read from a param (a Binomial's total count per component)."""

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        p = pyro.param("p", torch.tensor([0.3, 0.6]), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Binomial(torch.tensor([10.0, 12.0])[z], p[z]), obs=x)

    return model, (torch.tensor([1.0, 4.0, 9.0, 7.0, 2.0]),)


def _mask_from_latent():
    """A mask computed from the enumerated value: a prior trace counts the drawn rows."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            with poutine.mask(mask=z > 0):
                pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    return model, (torch.randn(12, generator=torch.Generator().manual_seed(6)),)


def _deeper_plate_after():
    """A plate at dim -2 entered only after the latent (inside the data plate at dim -1): the
    enumeration's dim, set at the latent, would lie on it."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", x.shape[-1], dim=-1):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            with pyro.plate("rep", x.shape[0], dim=-2):
                pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    return model, (torch.randn(3, 8, generator=torch.Generator().manual_seed(7)),)


def _conditioned():
    def inner(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], s), obs=x)

    model = poutine.condition(inner, data={"s": torch.tensor(1.5)})
    return model, (torch.randn(12, generator=torch.Generator().manual_seed(8)),)


_SEPARATE_CASES = {
    "two-latents": _two_latents,
    "markov": _markov,
    "binomial-support": _binomial,
    "mask-from-latent": _mask_from_latent,
    "deeper-plate-after": _deeper_plate_after,
    "conditioned": _conditioned,
}


@pytest.mark.parametrize("case", sorted(_SEPARATE_CASES))
def test_models_the_first_pass_cannot_stand_for_keep_the_prior_trace(case, monkeypatch):
    """Two latents (the prior trace's second draw reads the first's value), a support read
    from params, a mask computed from the latent, a plate deeper than the enumeration's first
    dim set at the latent, a site held by poutine.condition: the separate prior trace runs,
    after the first pass's draws and params are undone (bitwise the fit and RNG as before)."""
    model, args = _SEPARATE_CASES[case]()
    a, rng_a, passes_a, sep_a, depth_a = _fit_first(model, args, True, monkeypatch, max_iter=3, tol=0)  # fmt: skip
    b, rng_b, passes_b, sep_b, depth_b = _fit_first(model, args, False, monkeypatch, max_iter=3, tol=0)  # fmt: skip
    assert sep_a and sep_b
    assert passes_a == passes_b + 1  # (the first pass, undone)
    assert torch.equal(rng_a, rng_b) and depth_a == depth_b
    assert a.n_data == b.n_data and a.n_iter == b.n_iter
    assert a.history["log_likelihood"] == b.history["log_likelihood"]
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k


def _nan_in_data():
    model, (x,) = _gmm("full")
    x = x.clone()
    x[3, 1] = float("nan")
    return model, (x,)


def _nan_in_an_undrawn_component():
    """A component's loc is NaN and its weight 0: a prior trace never draws it (the first
    E-step's checks refuse it)."""

    def model(x):
        w = pyro.param("w", torch.tensor([1.0, 0.0]), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([0.0, float("nan")]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    return model, (torch.randn(10, generator=torch.Generator().manual_seed(9)),)


def _too_many_components():
    model, (x,) = _gmm("diag")
    return model, (x[:2],)


def _bad_shape():
    model, (x,) = _gmm("diag")
    return model, (x[:, :1],)


def _item_of_latent():
    """A model that reads its latent as one number: fine on a drawn value, not under
    enumeration."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(float(z), 1.0), obs=x)

    return model, (torch.randn(10, generator=torch.Generator().manual_seed(10)),)


_ERROR_CASES = {
    "nan-in-data": _nan_in_data,
    "nan-in-an-undrawn-component": _nan_in_an_undrawn_component,
    "too-many-components": _too_many_components,
    "bad-shape": _bad_shape,
    "item-of-latent": _item_of_latent,
}


@pytest.mark.parametrize("case", sorted(_ERROR_CASES))
def test_fits_first_pass_leaves_every_error_as_it_was(case, monkeypatch):
    """Bad inputs and models fail with the same error (type and message) either way, and leave
    the RNG and the param store as the separate passes leave them."""
    model, args = _ERROR_CASES[case]()
    got = []
    for combined in (True, False):
        with pytest.raises(Exception) as info:
            _fit_first(model, args, combined, monkeypatch, max_iter=2, tol=0)
        store = {n: pyro.param(n).detach().clone() for n in pyro.get_param_store()}
        got.append((type(info.value), str(info.value), torch.get_rng_state(), store))
    (ta, ma, ra, sa), (tb, mb, rb, sb) = got
    assert ta is tb and ma == mb
    assert torch.equal(ra, rb)
    assert sa.keys() == sb.keys()
    assert all(sa[k].numpy().tobytes() == sb[k].numpy().tobytes() for k in sa)  # (NaN too)


def test_the_kept_first_pass_is_taken_only_for_what_it_was_made_from():
    """ExactEStep._first_trace's trace is taken by the next E-step only for the same arguments
    (not another tensor, not one changed in place) and params (not one changed in place, not
    a new one), and only once; the posterior then is bitwise the one of its own pass."""
    model, (x,) = _gmm("full")
    passes = [0]

    def counted(d):
        passes[0] += 1
        return model(d)

    def run(change=None):
        pyro.clear_param_store()
        guide = ExactEStep(counted)
        guide._keep_data = True  # (the E-steps of a fit's loop, which the kept pass is for)
        _, depth = guide._first_trace((x,), {})
        guide.max_plate_nesting = depth
        args = (x,)
        if change is not None:
            args = change() or args
        passes[0] = 0
        post = guide.posterior(*args)
        used = passes[0] == 1  # (the structure check's own pass only)
        assert passes[0] in (1, 2)
        passes[0] = 0
        again = guide.posterior(*args)  # (taken once: the next call traces)
        assert passes[0] == 1
        return used, post, again

    used, post, again = run()
    assert used
    assert torch.equal(post.log_likelihood, again.log_likelihood)
    for k in again.marginals:
        assert torch.equal(post.marginals[k], again.marginals[k])

    x2 = x.clone()
    assert not run(lambda: (x2,))[0]  # another tensor
    y = x.clone()
    x_saved = x.clone()

    def in_place():
        x.add_(0.0)  # (a write: the version moves)

    assert not run(in_place)[0]
    x.copy_(x_saved)
    del y

    def param_in_place():
        with torch.no_grad():
            pyro.get_param_store().named_parameters().mapping["locs"].add_(0.5)

    used, post, again = run(param_in_place)
    assert not used and torch.equal(post.log_likelihood, again.log_likelihood)

    def new_param():
        pyro.param("extra", torch.zeros(2))

    assert not run(new_param)[0]


@pytest.mark.parametrize("depth", [None, 2])
def test_the_first_e_step_does_not_repeat_fits_checks_of_the_same_trace(depth, monkeypatch):
    """fit's input checks ran on the first E-step's own trace: the E-step runs its other checks
    only (check_shapes again where it reads more plate dims than fit's did: a
    max_plate_nesting above the model's); with the separate prior trace each runs twice."""
    import sys

    from pyro_emvae import EMOptim, fit

    F = sys.modules["pyro_emvae.fit"]
    model, args = _gmm("full")
    # (check_params and check_distributions run as one, check_params_and_distributions)
    names = ["check_observed", "check_params_and_distributions", "check_shapes"]
    for combined in (True, False):
        calls = {n: 0 for n in names}
        with monkeypatch.context() as m:
            for n in names:
                f = getattr(validate, n)

                def counted(*a, _n=n, _f=f, _calls=calls, **k):
                    _calls[_n] += 1
                    return _f(*a, **k)

                m.setattr(validate, n, counted)
            if not combined:
                m.setattr(F, "_inspect_first", lambda *a, **k: None)
            pyro.clear_param_store()
            guide = ExactEStep(model, max_plate_nesting=depth)
            fit(model, guide, *args, optim=EMOptim(reg_covar=1e-6), max_iter=2, tol=0, progress=False)  # fmt: skip
        once = {n: 1 for n in names}
        if combined and depth is not None:
            once["check_shapes"] = 2
        assert calls == (once if combined else {n: 2 for n in names}), (combined, calls)


# ---------------------------------------------------------------- the check's reads from shapes
def _scaled_masked_by_latent():
    """A mask computed from the enumerated value (the site then reads it through its mask),
    a tensor mask and a scalar scale on the latent's plates, a tensor scale on a site that
    reads no latent, nested plates."""

    def model(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("outer", 2, dim=-2), pyro.plate("data", x.shape[-1], dim=-1):
            with poutine.scale(scale=torch.tensor([1.0, 2.0]).unsqueeze(-1)):
                pyro.sample("u", dist.Normal(locs[0], 1.0), obs=x)
            keep = torch.tensor([True, False]).unsqueeze(-1)
            with poutine.scale(scale=2.0), poutine.mask(mask=keep):
                z = pyro.sample("z", dist.Categorical(w), infer=PAR)
                with poutine.mask(mask=z == 1):
                    pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
                    pyro.sample("v", dist.Normal(0.0, 1.0), obs=x)  # (reads z by its mask only)

    return model, (torch.randn(2, 5, generator=torch.Generator().manual_seed(4)),)


def _grid_keep():
    from collections import defaultdict

    from pyro.ops.indexing import Vindex

    p = torch.full((2, 2, 2), 0.5)
    obs = torch.tensor([[0.3, -0.5], [1.2, 0.1]])

    def model():
        x = defaultdict(lambda: torch.tensor(0))
        cols = pyro.markov(range(2), keep=True)  # (reused across rows: refused)
        for i in pyro.markov(range(2)):
            for j in cols:
                x[i, j] = pyro.sample(
                    f"x_{i}_{j}", dist.Categorical(Vindex(p)[x[i - 1, j], x[i, j - 1]]), infer=PAR
                )
                pyro.sample(f"o_{i}_{j}", dist.Normal(1.5 * x[i, j], 1.0), obs=obs[i, j])

    return model, ()


def _categorical_reduction(site: str):
    """:func:`_reduction` with Categorical latents (a family whose factor shape is known)."""

    def model():
        pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])), infer=PAR)
        with pyro.plate("p", 2):
            x = pyro.sample("x", dist.Categorical(torch.tensor([[0.8, 0.2], [0.6, 0.4]])), infer=PAR)  # fmt: skip
        m = x.float().mean(-1)
        if site == "normal":
            pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor(0.3))
        else:
            pyro.sample("y", dist.Categorical(torch.stack([m, 1 - m], -1)), obs=torch.tensor(1))

    return model


_READS_CASES = {
    **_SHARED_CASES,
    "scaled-masked-by-latent": _scaled_masked_by_latent,
    "grid-keep": _grid_keep,
    "reduction-bernoulli": lambda: (_reduction("normal"), ()),
    **{
        f"reduction-{s}": (lambda s=s: (_categorical_reduction(s), ()))
        for s in ("normal", "categorical")
    },
}
_REFUSED = {"grid-keep", "reduction-bernoulli", "reduction-normal", "reduction-categorical"}


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("case", sorted(_READS_CASES))
def test_the_checks_reads_from_shapes_equal_the_packed_log_probs(case, shared, monkeypatch):
    """ExactEStep._check_dims reads each factor's dims from shapes (estep._shape_reads) where
    every site's family is one whose log-prob shape is known: what it reads equals the long way
    (log-probs computed on a copy, packed by Pyro, then estep._reads), on the shared probe's
    trace and on the check's own pass; the probe's trace is left unwritten (no log-prob, no
    packed values), and a model with another family takes the long way."""
    from pyro_emvae import estep

    seen = []
    fast = estep._shape_reads

    def both(trace):
        got = fast(trace)
        before = {n: set(s) for n, s in trace.nodes.items()}
        copy = estep._copied(trace)
        for name, site in list(copy.nodes.items()):
            if estep.site_is_subsample(site):
                copy.remove_node(name)
        want = ExactEStep._long_reads(copy)
        assert {n: set(s) for n, s in trace.nodes.items()} == before  # (nothing written)
        seen.append((got, want))
        return got

    monkeypatch.setattr(estep, "_shape_reads", both)
    model, args = _READS_CASES[case]()
    pyro.clear_param_store()
    guide = ExactEStep(model)
    guide.share_probe = shared
    with pytest.raises(EnumerationError) if case in _REFUSED else contextlib.nullcontext():
        guide.posterior(*args)
    assert len(seen) == 1
    got, want = seen[0]
    if case in ("poisson", "reduction-bernoulli"):  # (no shape without their log-probs)
        assert got is None
    else:
        assert got is not None and got == want


def test_compact_and_the_distinct_views_keep_each_finiteness_check():
    """validate._compact / rules._compact give the tensor itself where no dim is broadcast
    (else its compact slice, the same elements); check_distributions sums each distinct view
    once (an MVN's scale_tril and _unbroadcasted_scale_tril, a Categorical's probs and
    _param) and still names the first NaN as before, under each attribute it is held by."""
    from pyro_emvae import rules
    from pyro_emvae.errors import ModelInputError

    for compact in (validate._compact, rules._compact):
        t = torch.arange(6.0).reshape(2, 3)
        assert compact(t) is t
        e = torch.arange(3.0).reshape(1, 3, 1).expand(4, 3, 2)
        assert compact(e).shape == (1, 3, 1) and torch.equal(compact(e).expand(4, 3, 2), e)

    def model(tril):
        with pyro.plate("p", 3):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), scale_tril=tril), obs=torch.zeros(3, 2))  # fmt: skip

    def trace(tril):
        with pyro.validation_enabled(False):
            return poutine.trace(model).get_trace(tril)

    sums = []
    finite = validate._all_finite_sums
    with pytest.MonkeyPatch.context() as m:
        m.setattr(validate, "_all_finite_sums", lambda ts: sums.append(len(ts)) or finite(ts))
        validate.check_distributions(trace(torch.eye(2).expand(1, 2, 2)))
    fn = trace(torch.eye(2).expand(1, 2, 2)).nodes["x"]["fn"]
    held = [a for a, t in validate._tensors(fn) if t.is_floating_point()]
    assert len(held) > sums[0]  # (views of the same elements summed once)
    bad = torch.eye(2)
    bad[1, 0] = float("nan")
    with pytest.raises(ModelInputError, match=r"site 'x' .*'(loc|_unbroadcasted_scale_tril|scale_tril)'.* 1 NaN"):  # fmt: skip
        validate.check_distributions(trace(bad))


def test_the_plans_small_id_tests_equal_their_tensor_ops(monkeypatch):
    """rules.rows_aligned, optim._identity_ids and optim._enumeration_values read a few ids as
    Python ints (rules.small_ints): the same answers as their tensor ops (SMALL_IDS = 0)."""
    from pyro_emvae import optim, rules

    ids = [
        torch.arange(6).reshape(3, 2),
        torch.arange(6).reshape(3, 2) + 10,
        torch.arange(6).reshape(3, 2).flip(-1),
        torch.arange(6).reshape(2, 3),
        torch.arange(4).reshape(2, 1, 2).expand(2, 5, 2),  # (a broadcast view)
        torch.tensor([[3, 4], [1, 2]]),
        torch.tensor([[-1, 0]]),
        torch.arange(6).reshape(3, 2)[:, :1],
        torch.tensor(5),
    ]
    values = [
        torch.arange(3).reshape(3, 1),
        torch.tensor([[0.0], [1.0]]),
        torch.tensor([False, True]),
    ]
    values += [torch.tensor([1, 0]), torch.tensor([0.0, float("nan")]), torch.tensor([[0, 1]])]

    def answers():
        out = []
        for t in ids:
            for offset in (0, 1, 10, -2):
                out.append(rules.rows_aligned(t, offset) if t.dim() else None)
                for shape in (tuple(t.shape), (6,), (3, 2)):
                    out.append(optim._identity_ids(t, offset, shape))
        out += [optim._enumeration_values(v, k) for v in values for k in (2, 3)]
        return out

    small = answers()
    assert (
        rules.small_ints(torch.arange(4).reshape(2, 1, 2).expand(2, 3, 2))
        == [0, 1] * 3 + [2, 3] * 3
    )
    monkeypatch.setattr(rules, "SMALL_IDS", -1)
    assert rules.small_ints(torch.arange(3)) is None
    assert answers() == small
    assert any(small) and not all(a for a in small if a is not None)


def test_the_probes_row_normalization_short_path_gives_the_general_paths(monkeypatch):
    """A value-form tracked tensor's row sum and its division by it (Categorical(probs=p))
    by the short path (track._row_fast) equal the general path's: values, ids, form, param
    names, the _RowSum's source; other sums and divisions go the general way."""
    from pyro_emvae import track as _track

    p = _track.Tracked.wrap(torch.tensor([[0.2, 0.6], [1.0, 3.0]]), "p")

    def ops():
        s = p.sum(-1, keepdim=True)
        out = [s, p / s, torch.div(p, p.sum(dim=-1, keepdim=True)), torch.sum(p, -1, True)]
        out += [p.sum(-1), p.sum(0, keepdim=True), p / 2.0, p / p.sum(-1, keepdim=True).clone()]
        c = dist.Categorical(p)
        return out + [c.probs, c.logits]

    calls = []
    strip = _track._strip
    monkeypatch.setattr(_track, "_strip", lambda o: calls.append(o) or strip(o))
    _ = p / p.sum(-1, keepdim=True), torch.div(p, torch.sum(p, dim=-1, keepdim=True))
    assert not calls  # (the short path: no general-path helper ran)
    fast = ops()
    monkeypatch.setattr(_track, "_ROW_FAST", frozenset())
    slow = ops()
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert type(a) is type(b), i
        assert torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)), i
        if isinstance(b, _track.Tracked):
            assert torch.equal(a.ids, b.ids) and a.form == b.form, i
            assert a.param == b.param and a.param_names == b.param_names, i
        if isinstance(b, _track._RowSum):
            assert a.source is b.source, i
    assert fast[1].form == "normalized" and isinstance(fast[0], _track._RowSum)


@pytest.mark.parametrize(
    "param, tril",
    [
        (1.0, 1.0),
        (float("inf"), 1.0),
        (1.0, float("nan")),
        (1.0, float("inf")),
        (float("nan"), float("nan")),
        (1e308, 1e308),
    ],
)
def test_one_flag_for_params_and_distributions_says_what_each_check_says(param, tril):
    """validate.check_params_and_distributions (one flag for both where all is finite) passes
    or raises exactly as check_params then check_distributions do: a non-finite param first,
    a NaN in a distribution next, an inf in a distribution allowed."""
    from pyro_emvae.errors import ModelInputError

    def model():
        a = pyro.param("a", torch.tensor([param, 2.0]))
        m = torch.eye(2).expand(1, 2, 2).clone()
        m[0, 1, 0] = tril
        with pyro.plate("p", 3):
            pyro.sample("x", dist.MultivariateNormal(a, scale_tril=m), obs=torch.zeros(3, 2))

    pyro.clear_param_store()
    with pyro.validation_enabled(False):
        tr = poutine.trace(model).get_trace()

    def outcome(check):
        try:
            check(tr)
        except ModelInputError as e:
            return str(e)
        return None

    def separate(t):
        validate.check_params(t)
        validate.check_distributions(t)

    got = outcome(validate.check_params_and_distributions)
    assert got == outcome(separate)
    import math

    assert (got is not None) == (not math.isfinite(param) or math.isnan(tril))


def test_a_params_id_range_is_made_once_and_again_when_changed(monkeypatch):
    """track._id_range gives start + arange(numel) in the param's shape (the probe's ids),
    the same tensor again for the same start, shape and device (a small range), a new one
    after an in-place change of the old, and never keeps a large range."""
    from pyro_emvae import track as _track

    monkeypatch.setattr(_track, "_ID_RANGES", {})
    a = _track._id_range(5, torch.Size([2, 3]), torch.device("cpu"))
    assert torch.equal(a, torch.arange(5, 11).reshape(2, 3)) and a.dtype == torch.long
    assert _track._id_range(5, torch.Size([2, 3]), torch.device("cpu")) is a
    assert _track._id_range(5, torch.Size([3, 2]), torch.device("cpu")) is not a
    assert torch.equal(_track._id_range(0, torch.Size([]), torch.device("cpu")), torch.tensor(0))
    a[0, 0] = 99  # (an in-place change: made again)
    b = _track._id_range(5, torch.Size([2, 3]), torch.device("cpu"))
    assert b is not a and torch.equal(b, torch.arange(5, 11).reshape(2, 3))
    big = torch.Size([_track._SMALL_RANGE + 1])
    assert _track._id_range(0, big, torch.device("cpu")) is not _track._id_range(0, big, torch.device("cpu"))  # fmt: skip
    # a probe reads the same ids as the long way made them: every param's range from its offset
    model, (x,) = _gmm("full")
    pyro.clear_param_store()
    model(x)
    tr, space = _track.probe(model, (x,), {}, 1)
    for name in space.offsets:
        ids = tr.nodes[name]["value"].ids
        want = torch.arange(space.offsets[name], space.offsets[name] + ids.numel())
        assert torch.equal(ids, want.reshape(space.shapes[name]))


def test_mvn_loc_sharings_pairs_as_python_ints_equal_the_tensor_pairs(monkeypatch):
    """optim._pair_tuples (the (row, covariance ids) pairs read as Python ints, broadcast in
    Python) equals optim._pair_tensor's rows, for broadcast batch dims, a leading dim only one
    side has, a constant key and many ids (the tensor way)."""
    from pyro_emvae import optim, rules

    loc = torch.arange(12).reshape(3, 1, 1, 4) + 7
    key = torch.arange(100, 100 + 2 * 5 * 4).reshape(2, 5, 4)
    cases = [
        (loc, key, torch.Size([3, 2, 5])),
        (loc, -3, torch.Size([3, 1, 1])),
        (loc[:, 0], key[:1, :1], torch.Size([3, 1])),
        (torch.arange(8).reshape(2, 4).expand(6, 2, 4), key[1, :2], torch.Size([6, 2])),
        (torch.arange(4).reshape(1, 4), torch.arange(3).reshape(3, 1), torch.Size([3])),
    ]
    for ids, k, shape in cases:
        assert shape == torch.broadcast_shapes(ids.shape[:-1], k.shape[:-1] if torch.is_tensor(k) else ())  # fmt: skip
        want = [tuple(r) for r in optim._pair_tensor(ids, k, shape).tolist()]
        assert optim._pair_tuples(ids, k, shape) == want
        assert optim._pair_entries(ids, k, shape) == optim._pair_tensor(ids, k, shape).numel()
        monkeypatch.setattr(rules, "SMALL_IDS", -1)
        assert optim._pair_tuples(ids, k, shape) == want
        monkeypatch.setattr(rules, "SMALL_IDS", 4096)


def test_a_guarded_probe_is_the_probe():
    """track.probe(guarded=True), run under the guards its caller holds (validation off,
    no_grad, poutine.block: the E-step's structure check), traces what probe() does with its
    own: the same sites, values, ids and opaque params."""
    from pyro_emvae import track as _track

    for case in ("gmm-full", "two-latents"):
        model, args = _SHARED_CASES[case]()
        pyro.clear_param_store()
        own, own_space = _track.probe(model, args, {}, 1)
        with pyro.validation_enabled(False), torch.no_grad(), poutine.block():
            got, space = _track.probe(model, args, {}, 1, guarded=True)
        assert list(got.nodes) == list(own.nodes)
        assert space.offsets == own_space.offsets and space.opaque == own_space.opaque
        for name, site in own.nodes.items():
            if "value" not in site:  # (the trace's input and return nodes)
                continue
            other = got.nodes[name]["value"]
            if isinstance(site["value"], torch.Tensor):
                assert torch.equal(other, site["value"]), name
            if isinstance(site["value"], _track.Tracked):
                assert torch.equal(other.ids, site["value"].ids), name
