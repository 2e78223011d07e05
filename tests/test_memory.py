"""The in-memory E-step walks the data plate in chunks and holds one (K, N) posterior.

Chunked (``kernels.CHUNK`` rows at a time, the posterior written over the fused kernel's
log-prob buffer) must equal the generic unchunked contraction (Pyro's ``contract_to_tensor``
and its backward pass over whole tensors) in the posterior marginals, log p(x), the
expected sufficient statistics and one M-step; a model that is not one latent per datum
(a global latent) must take the generic path. A tensor-allocation counter checks that the
chunk size bounds what the E-step allocates beyond the posterior, and the loop must not
hold the previous posterior while it makes the next one.
"""

import weakref
from collections import Counter

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_emvae import EMOptim, ExactEStep, fit, kernels
from pyro_emvae import estep as _estep

N, K, D = 301, 3, 2  # (301: the last chunk of 37 rows is ragged)


def _data(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 3.0 * torch.randint(0, K, (n, 1), generator=g)


def _gmm(cov: str = "diag", mask=None, scale: float = 1.0, subsample=None, obs_mask=None):
    g = torch.Generator().manual_seed(1)
    locs0, w0 = 3.0 * torch.randn(K, D, generator=g), torch.rand(K, generator=g) + 0.5
    s0 = torch.rand(K, D, generator=g) + 0.5

    def model(x):
        w = pyro.param("w", w0 / w0.sum(), constraint=dist.constraints.simplex)
        locs = pyro.param("locs", lambda: locs0.clone())  # (the store writes in place)
        with (
            poutine.scale(scale=scale),
            pyro.plate("data", len(x), subsample_size=subsample) as rows,
        ):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            if cov == "diag":
                s = pyro.param("s", s0, constraint=dist.constraints.positive)
                fn = dist.Normal(locs[z], s[z]).to_event(1)
            else:
                tril = pyro.param(
                    "tril", torch.diag_embed(s0), constraint=dist.constraints.lower_cholesky
                )
                fn = dist.MultivariateNormal(locs[z], scale_tril=tril[z])
            with poutine.mask(mask=mask) if mask is not None else poutine.block(hide=[]):
                if obs_mask is not None:
                    pyro.sample("x", fn, obs=x[rows], obs_mask=obs_mask[rows])
                else:
                    pyro.sample("x", fn, obs=x[rows])

    return model


def _global_latent_model(x):
    """A global switch g shifts every datum: the rows are not independent given the params."""
    w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [2.0, 1.0]]))
    shift = pyro.param("shift", torch.tensor([0.0, 0.5]))
    g = pyro.sample(
        "g", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"}
    )
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z] + shift[g].unsqueeze(-1), 1.0).to_event(1), obs=x)


def _generic(monkeypatch):
    """The unchunked path: every factor contracted whole by Pyro, posterior by autograd."""
    monkeypatch.setattr(_estep, "_one_latent", lambda *a, **k: None)


def _run(model, x, chunk, monkeypatch, generic=False):
    """log p(x), marginals, stage 0 and 1 statistics and the params after one EM M-step."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "CHUNK", chunk)
        if generic:
            _generic(m)
        pyro.clear_param_store()
        pyro.set_rng_seed(3)  # (a subsampled plate draws the same rows in both runs)
        guide = ExactEStep(model)
        post = guide.posterior(x)
        mstep = EMOptim(reg_covar=0.0)
        plan = mstep.plan(guide, (x,), {}, post.subsample)
        stats = [mstep.summarize(plan, post, stage).sums for stage in (0, 1)]
        mstep(guide, post, (x,), {})
        params = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
    return post, stats, params


def _same(a, b):
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()


def _compare(model, x, monkeypatch):
    chunked = _run(model, x, 37, monkeypatch)
    whole = _run(model, x, 10**9, monkeypatch, generic=True)
    (pc, sc, mc), (pw, sw, mw) = chunked, whole
    _same(pc.log_likelihood, pw.log_likelihood)
    assert pc.marginals.keys() == pw.marginals.keys()
    for name in pc.marginals:
        _same(pc.marginals[name], pw.marginals[name])
    for stage in (0, 1):
        assert sc[stage].keys() == sw[stage].keys()
        for kind in sc[stage]:
            _same(sc[stage][kind], sw[stage][kind])
    for name in mc:
        _same(mc[name], mw[name])
    return pc


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_chunked_equals_unchunked_gmm(cov, monkeypatch):
    calls = Counter()
    one_latent = _estep._one_latent

    def spy(*args, **kwargs):
        out = one_latent(*args, **kwargs)
        calls["chunked" if out is not None else "generic"] += 1
        return out

    monkeypatch.setattr(_estep, "_one_latent", spy)
    post = _compare(_gmm(cov), _data(), monkeypatch)
    assert calls["chunked"] >= 1 and calls["generic"] == 0  # (the chunked path ran)
    assert post.marginals["z"].shape == (N, K)


def test_chunked_equals_unchunked_masked_rows_and_scale(monkeypatch):
    mask = torch.arange(N) % 5 != 0
    _compare(_gmm("diag", mask=mask, scale=0.25), _data(), monkeypatch)


def test_chunked_equals_unchunked_subsampled_plate(monkeypatch):
    _compare(_gmm("full", subsample=120), _data(), monkeypatch)


def test_chunked_equals_unchunked_obs_mask(monkeypatch):
    """Rows whose observation is missing (obs_mask=False) drop out of p(x) exactly."""
    obs_mask = torch.arange(N) % 4 != 1
    post = _compare(_gmm("diag", obs_mask=obs_mask), _data(), monkeypatch)
    assert post.marginals["z"].shape == (N, K)


def test_global_latent_takes_the_unchunked_path(monkeypatch):
    """g couples every datum: no chunked sum applies, and the posterior is the exact one."""
    calls = Counter()
    one_latent = _estep._one_latent

    def spy(*args, **kwargs):
        out = one_latent(*args, **kwargs)
        calls["chunked" if out is not None else "generic"] += 1
        return out

    x = _data(n=40)
    monkeypatch.setattr(kernels, "CHUNK", 7)
    monkeypatch.setattr(_estep, "_one_latent", spy)
    post = ExactEStep(_global_latent_model).posterior(x)
    assert calls["chunked"] == 0 and calls["generic"] >= 1
    # brute force over g (the z's are independent given g)
    w = pyro.param("w").detach()
    locs, shift = pyro.param("locs").detach(), pyro.param("shift").detach()
    per_g = []
    for gv in range(2):
        comp = dist.Normal(locs + shift[gv], 1.0).to_event(1).log_prob(x.unsqueeze(-2))
        per_g.append(torch.tensor([0.4, 0.6]).log()[gv] + (comp + w.log()).logsumexp(-1).sum())
    per_g = torch.stack(per_g)
    _same(post.log_likelihood, per_g.logsumexp(0))
    _same(post.marginals["g"], (per_g - per_g.logsumexp(0)).exp())


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated under it that are still alive, and their peak (a
    storage counts once, from the op that made it until its last tensor is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self.refs: Counter = Counter()
        self.sizes: dict[int, int] = {}

    def _dead(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.sizes.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {
            a.untyped_storage().data_ptr()
            for a in (*args, *kwargs.values())
            if isinstance(a, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr == 0 or (ptr in seen and ptr not in self.refs):
                continue  # (a view of a tensor made before: not an allocation)
            if ptr not in self.refs:
                self.sizes[ptr] = t.untyped_storage().nbytes()
                self.live += self.sizes[ptr]
                self.peak = max(self.peak, self.live)
            self.refs[ptr] += 1
            weakref.finalize(t, self._dead, ptr)
        return out


def test_chunk_size_bounds_the_estep_peak(monkeypatch):
    """Beyond the (K, N) posterior, the E-step allocates O(CHUNK) bytes whatever N is; the
    unchunked contraction holds several (K, N) tensors."""
    n = 20000
    x = _data(n=n)
    model = _gmm("diag")  # (a full covariance also keeps its centred rows, once per data)
    posterior_bytes = K * n * 8

    def peak(chunk: int, generic: bool = False) -> int:
        with monkeypatch.context() as m:
            m.setattr(kernels, "CHUNK", chunk)
            if generic:
                _generic(m)
            guide = ExactEStep(model)
            guide.posterior(x)  # (the first call also checks the model: not this test's)
            with torch.no_grad(), _LiveBytes() as counter:
                post = guide.posterior(x)
            del post
        return counter.peak - posterior_bytes

    small, large, generic = peak(64), peak(4096), peak(64, generic=True)
    # Pyro's plate indices (8 N bytes), and at most one data-sized check of the data (its
    # support, when an earlier test left no cached check): no second (K, N) tensor
    allowed = 8 * n + x.numel() * 8 + 32 * 1024
    assert small < allowed < posterior_bytes + 8 * n
    assert large - small > 128 * 1024  # (64 times the chunk: it is the chunk that bounds it)
    assert generic > posterior_bytes  # (what the chunks save: the whole contraction's tensors)


def test_loop_drops_the_last_posterior_before_the_next_estep():
    model = _gmm("diag")
    x = _data()
    guide = ExactEStep(model)
    last: list = []
    alive = []
    posterior = guide.posterior

    def watched(*args, **kwargs):
        alive.append(bool(last) and last[-1]() is not None)
        post = posterior(*args, **kwargs)
        last.append(weakref.ref(post))
        return post

    guide.posterior = watched
    fit(model, guide, x, optim=EMOptim(reg_covar=0.0), max_iter=3, tol=0, progress=False)
    assert len(alive) == 4 and not any(alive)  # (3 E-steps and the final one)


def test_fit_input_checks_allocate_no_data_sized_tensor():
    """The data's finiteness and support (real) and the NaN check of the distributions'
    tensors (locs[z], (N, D)) are read from sums: no bool or float copy of the data."""
    from pyro_emvae.validate import validate_fit_inputs

    n = 20000
    x = _data(n=n)
    model = _gmm("diag")
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(x)
    with _LiveBytes() as counter:
        validate_fit_inputs(model, (x,), {}, tr, exact=True, components=False)
    assert counter.peak < x.numel() // 8  # (an (N, D) bool would be N * D bytes)


@pytest.mark.parametrize(
    "bad, what", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")]
)
def test_fit_input_checks_still_find_each_bad_entry(bad, what):
    from pyro_emvae.errors import ModelInputError
    from pyro_emvae.validate import validate_fit_inputs

    x = _data()
    x[17, 1] = bad
    model = _gmm("diag")
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(x)
    with pytest.raises(ModelInputError, match=rf"1 {what}.*\(17, 1\)"):
        validate_fit_inputs(model, (x,), {}, tr, exact=True, components=False)


def test_fit_input_checks_pass_finite_data_whose_sum_overflows():
    """A sum that overflows to inf only sends the check to its elementwise form."""
    from pyro_emvae.validate import validate_fit_inputs

    x = torch.full((N, D), 1e308)  # (finite; their sum is inf)
    model = _gmm("diag")
    with torch.no_grad():
        tr = poutine.trace(model).get_trace(x)
    validate_fit_inputs(model, (x,), {}, tr, exact=True, components=False)
