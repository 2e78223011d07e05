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
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch

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
