"""Issue 16: where the exact E-step must agree with Pyro's semantics (and brute force), and
where Pyro itself is wrong it must refuse: masked DiscreteHMM sequences, ExactEStep as an
exact guide, subsampled sequential plates in map()/sample(), and Pyro's known wrong answers."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from _brute import build_hmm_model, hmm_brute_force, random_hmm_spec
from pyro import poutine
from pyro.distributions import constraints

from pyro_emvae import ExactEStep, fit
from pyro_emvae.estep import EnumerationError

PAR = {"enumerate": "parallel"}


def _close(a, b, tol):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = float((a - b).abs().max())
    assert err < tol, f"max abs error {err:.3g} >= {tol:g}\n{a}\n{b}"


# ---------------------------------------------------------------- A: masked DiscreteHMM rows
def _hmm_paths(spec, observed: bool, n: int):
    """(paths (P, T+1), log joint (P,)) over (z_{-1}, ..., z_{T-1}) of sequence n."""
    K, T = spec.K, spec.T
    a = torch.tensor(list(itertools.product(range(K), repeat=T + 1)), dtype=torch.long)
    init = spec.init_logits.log_softmax(-1)
    trans = spec.trans_logits.log_softmax(-1)
    trans = trans if trans.dim() == 3 else trans.expand(T, K, K)
    lj = init[a[:, 0]] + sum(trans[t][a[:, t], a[:, t + 1]] for t in range(T))
    if observed:
        e = dist.Normal(spec.emit["loc"], spec.emit["scale"])
        le = torch.stack([e.log_prob(spec.x[n, t]) for t in range(T)])
        lj = lj + sum(le[t][a[:, t + 1]] for t in range(T))
    return a, lj


def test_masked_hmm_sequence_pairwise_map_and_samples_are_the_prior_chains():
    spec = random_hmm_spec(
        3, N=3, T=3, K=3, family="normal", mask=False, scale=None, inhomogeneous=True
    )
    spec.mask = torch.tensor([True, False, True])
    guide = ExactEStep(build_hmm_model(spec))
    post = guide.posterior()
    _close(post.log_likelihood, hmm_brute_force(spec).log_p, 1e-9)
    pair = post.pairwise[("x", "x")]
    best = guide.map()["x"]
    draws = guide.sample(num_samples=4000)["x"]
    for n in range(3):
        a, lj = _hmm_paths(spec, bool(spec.mask[n]), n)
        p = (lj - lj.logsumexp(0)).exp()
        want = torch.zeros(spec.T, spec.K, spec.K)
        for t in range(spec.T):
            want[t].index_put_((a[:, t], a[:, t + 1]), p, accumulate=True)
        _close(pair[n], want, 1e-9)
        assert best[n].tolist() == a[lj.argmax(), 1:].tolist(), n
        # the draws' path frequencies match the exact posterior of the paths (z_0..z_{T-1})
        flat = (draws[:, n] * spec.K ** torch.arange(spec.T - 1, -1, -1)).sum(-1)
        codes = (a[:, 1:] * spec.K ** torch.arange(spec.T - 1, -1, -1)).sum(-1)
        want_p = torch.zeros(spec.K**spec.T).index_add(0, codes, p)
        freq = torch.bincount(flat, minlength=spec.K**spec.T) / 4000.0
        _close(freq, want_p, 0.035)
    # the M-step's weight on the masked sequence is zero
    assert float(post.factor_q["x"][1].abs().max()) == 0.0
    assert float(post.factor_q["x"][0].sum()) == pytest.approx(spec.T)


def _hmm_em_model(x, mask):
    K = 2
    init = pyro.param("init", torch.tensor([0.6, 0.4]), constraint=constraints.simplex)
    trans = pyro.param(
        "trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex
    )
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    scale = pyro.param("scale", torch.ones(K), constraint=constraints.positive)
    fn = dist.DiscreteHMM(init.log(), trans.log(), dist.Normal(loc, scale))
    with pyro.plate("seq", x.shape[0]), poutine.mask(mask=mask):
        pyro.sample("x", fn, obs=x)


def test_em_on_masked_hmm_sequences_equals_em_without_them():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g) + 2 * (torch.rand(6, 8, generator=g) > 0.5)
    mask = torch.tensor([True, False, True, True, False, True])
    masked = fit(_hmm_em_model, ExactEStep(_hmm_em_model), x, mask, max_iter=4, tol=0)
    params = {k: v.clone() for k, v in masked.params.items()}
    pyro.clear_param_store()
    keep = torch.ones(int(mask.sum()), dtype=torch.bool)
    alone = fit(_hmm_em_model, ExactEStep(_hmm_em_model), x[mask], keep, max_iter=4, tol=0)
    for name, value in alone.params.items():
        _close(params[name], value, 1e-8)
