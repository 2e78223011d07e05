"""Tests of the example models in ``models/``: exact ``log p(x)`` of the GMM (every covariance
type) and of both HMM forms (``pyro.markov`` loop and vectorized ``DiscreteHMM``), against
direct formulas and brute-force sums over all state paths."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from torch.distributions import constraints

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference import (
    categorical_log_emission,
    gaussian_log_emission,
    hmm_forward_backward,
)
from models.gmm import (
    COVARIANCE_TYPES,
    gmm_model,
    init_params,
    make_gmm_model,
    param_names,
    sample_gmm,
)
from models.hmm import (
    categorical_hmm,
    categorical_hmm_markov,
    discrete_hmm_logits,
    gaussian_hmm,
    gaussian_hmm_markov,
    sample_categorical_hmm,
    sample_gaussian_hmm,
)
from models.hmm import init_params as hmm_init_params


def _empty_guide(*args: object, **kwargs: object) -> None:
    return None


def enum_log_px(model: Callable[..., object], *args: object) -> torch.Tensor:
    """Exact log p(x) of a model with enumerated discrete sites: minus the TraceEnum_ELBO
    loss with an empty guide."""
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, _empty_guide, *args)
    return -torch.as_tensor(loss)


def trace_log_px(model: Callable[..., object], *args: object) -> torch.Tensor:
    """log p(x) of a model without latent sample sites (the DiscreteHMM form)."""
    return pyro.poutine.trace(model).get_trace(*args).log_prob_sum().detach()


# --------------------------------------------------------------------------------------------
# GMM
# --------------------------------------------------------------------------------------------


def _gmm_direct_log_px(data: torch.Tensor, params: dict, covariance_type: str) -> torch.Tensor:
    w, locs = params["weights"], params["locs"]
    K, D = locs.shape
    if covariance_type == "diag":
        covs = torch.diag_embed(params["scales"] ** 2)
    elif covariance_type == "spherical":
        covs = params["scales"].pow(2)[:, None, None] * torch.eye(D)
    elif covariance_type == "full":
        covs = params["scale_tril"] @ params["scale_tril"].mT
    else:
        covs = (params["scale_tril"] @ params["scale_tril"].T).expand(K, D, D)
    comp = torch.distributions.MultivariateNormal(locs, covariance_matrix=covs)
    lp = comp.log_prob(data.unsqueeze(-2)) + w.log()  # (N, K)
    return torch.logsumexp(lp, -1).sum()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gmm_log_px_matches_logsumexp_formula(covariance_type: str) -> None:
    data, truth = sample_gmm(N=50, K=3, D=2, seed=0, covariance_type=covariance_type)
    log_px = enum_log_px(gmm_model, data, 3, covariance_type, truth)
    torch.testing.assert_close(log_px, _gmm_direct_log_px(data, truth, covariance_type))
    # and at the default (data-driven) initialization
    pyro.clear_param_store()
    log_px0 = enum_log_px(gmm_model, data, 3, covariance_type)
    init = init_params(data, 3, covariance_type, seed=0)
    torch.testing.assert_close(log_px0, _gmm_direct_log_px(data, init, covariance_type))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gmm_params_and_sites(covariance_type: str) -> None:
    K, D = 3, 2
    data, truth = sample_gmm(N=20, K=K, D=D, seed=1, covariance_type=covariance_type)
    saved = {k: v.clone() for k, v in truth.items()}
    trace = pyro.poutine.trace(gmm_model).get_trace(data, K, covariance_type, truth)
    store = pyro.get_param_store()
    assert set(store.keys()) == set(param_names(covariance_type))
    assert set(truth) == set(param_names(covariance_type))
    for name, value in truth.items():
        torch.testing.assert_close(store[name].detach(), value)
    expected_constraint = {
        "weights": constraints.simplex,
        "locs": constraints.real,
        "scales": constraints.positive,
        "scale_tril": constraints.lower_cholesky,
    }
    for name in param_names(covariance_type):
        assert store._constraints[name] is expected_constraint[name]
    assert trace.nodes["z"]["infer"].get("enumerate") == "parallel"
    assert trace.nodes["x"]["is_observed"]
    assert trace.nodes["z"]["value"].shape == (20,)
    # optimizing the params must never modify the caller's init dict
    store["locs"].data.add_(1.0)
    for name in truth:
        assert torch.equal(truth[name], saved[name])


def test_gmm_init_is_only_used_on_first_call() -> None:
    data, truth = sample_gmm(N=30, K=2, D=2, seed=0)
    gmm_model(data, 2, "diag", truth)
    other = init_params(data, 2, "diag", seed=3)
    gmm_model(data, 2, "diag", other)
    torch.testing.assert_close(pyro.param("locs").detach(), truth["locs"])


def test_gmm_closure_and_samplers() -> None:
    model = make_gmm_model(2, "tied")
    data, truth, z = sample_gmm(N=40, K=2, D=3, seed=2, return_assignments=True)
    assert data.shape == (40, 3) and z.shape == (40,) and data.dtype == torch.float64
    model(data)
    assert pyro.param("scale_tril").shape == (3, 3)
    data2, _ = sample_gmm(N=40, K=2, D=3, seed=2)
    assert torch.equal(data, data2)
    torch.testing.assert_close(truth["weights"].sum(), torch.tensor(1.0))
    state = torch.get_rng_state()
    sample_gmm(N=5, K=2, D=2, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError):
        gmm_model(data, 2, "banana")
    init = init_params(data, 2, "spherical", seed=0)
    assert init["scales"].shape == (2,) and init["locs"].shape == (2, 3)


# --------------------------------------------------------------------------------------------
# HMM
# --------------------------------------------------------------------------------------------


def _hmm_brute_force_log_px(
    log_start: torch.Tensor, log_trans: torch.Tensor, log_e: torch.Tensor
) -> torch.Tensor:
    """log p(x) summed over sequences; log_e is (N, T, K). Sums over all K^T paths."""
    N, T, K = log_e.shape
    total = torch.tensor(0.0)
    for n in range(N):
        joint = [
            log_start[p[0]]
            + sum(log_trans[p[t - 1], p[t]] for t in range(1, T))
            + sum(log_e[n, t, p[t]] for t in range(T))
            for p in itertools.product(range(K), repeat=T)
        ]
        total = total + torch.logsumexp(torch.stack(joint), 0)
    return total


def _random_hmm_params(K: int, D: int | None, M: int | None, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {
        "start": torch.softmax(torch.randn(K, generator=g), -1),
        "trans": torch.softmax(torch.randn(K, K, generator=g), -1),
    }
    if D is not None:
        p["locs"] = torch.randn(K, D, generator=g)
        p["scales"] = 0.5 + torch.rand(K, D, generator=g)
    if M is not None:
        p["emission_probs"] = torch.softmax(torch.randn(K, M, generator=g), -1)
    return p


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_markov_hmm_is_exact(seed: int) -> None:
    K, T, D = 3, 4, 2
    data, _ = sample_gaussian_hmm(N=2, T=T, K=K, D=D, seed=seed)
    p = _random_hmm_params(K, D, None, seed)
    log_px = enum_log_px(gaussian_hmm_markov, data, K, p)
    log_e = gaussian_log_emission(data, p["locs"], p["scales"])
    bf = _hmm_brute_force_log_px(p["start"].log(), p["trans"].log(), log_e)
    torch.testing.assert_close(log_px, bf)
    # the same with an emission density written independently of the reference module
    log_e2 = dist.Normal(p["locs"], p["scales"]).log_prob(data.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(log_e, log_e2)


@pytest.mark.parametrize("seed", [0, 1])
def test_categorical_markov_hmm_is_exact(seed: int) -> None:
    K, T, M = 3, 4, 5
    data, _ = sample_categorical_hmm(N=3, T=T, K=K, M=M, seed=seed)
    p = _random_hmm_params(K, None, M, seed)
    log_px = enum_log_px(categorical_hmm_markov, data, K, M, p)
    log_e = p["emission_probs"].log().T[data]  # (N, T, K)
    bf = _hmm_brute_force_log_px(p["start"].log(), p["trans"].log(), log_e)
    torch.testing.assert_close(log_px, bf)


@pytest.mark.parametrize("T", [1, 2, 4, 25])
def test_gaussian_hmm_forms_agree(T: int) -> None:
    K, D = 3, 2
    data, truth = sample_gaussian_hmm(N=3, T=T, K=K, D=D, seed=T)
    for params in (truth, _random_hmm_params(K, D, None, seed=7)):
        pyro.clear_param_store()
        markov = enum_log_px(gaussian_hmm_markov, data, K, params)
        pyro.clear_param_store()
        vectorized = trace_log_px(gaussian_hmm, data, K, params)
        torch.testing.assert_close(markov, vectorized)


@pytest.mark.parametrize("T", [1, 2, 4, 25])
def test_categorical_hmm_forms_agree(T: int) -> None:
    K, M = 3, 4
    data, truth = sample_categorical_hmm(N=3, T=T, K=K, M=M, seed=T)
    for params in (truth, _random_hmm_params(K, None, M, seed=7)):
        pyro.clear_param_store()
        markov = enum_log_px(categorical_hmm_markov, data, K, M, params)
        pyro.clear_param_store()
        vectorized = trace_log_px(categorical_hmm, data, K, M, params)
        torch.testing.assert_close(markov, vectorized)


def test_hmm_forms_agree_at_default_init() -> None:
    data, _ = sample_gaussian_hmm(N=2, T=6, K=2, D=3, seed=0)
    markov = enum_log_px(gaussian_hmm_markov, data, 2)
    markov_params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    vectorized = trace_log_px(gaussian_hmm, data, 2)
    torch.testing.assert_close(markov, vectorized)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), markov_params[name])

    sym, _ = sample_categorical_hmm(N=2, T=6, K=2, M=3, seed=0)
    pyro.clear_param_store()
    markov = enum_log_px(categorical_hmm_markov, sym, 2)
    pyro.clear_param_store()
    torch.testing.assert_close(markov, trace_log_px(categorical_hmm, sym, 2))


def test_hmm_forms_have_equal_gradients() -> None:
    K, D = 3, 2
    data, _ = sample_gaussian_hmm(N=2, T=8, K=K, D=D, seed=3)
    params = _random_hmm_params(K, D, None, seed=4)
    grads = []
    for form in ("markov", "vectorized"):
        pyro.clear_param_store()
        if form == "markov":
            loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
                gaussian_hmm_markov, _empty_guide, data, K, params
            )
        else:
            loss = -pyro.poutine.trace(gaussian_hmm).get_trace(data, K, params).log_prob_sum()
        store = pyro.get_param_store()
        names = sorted(store.keys())
        unconstrained = [store._params[n] for n in names]
        grads.append(dict(zip(names, torch.autograd.grad(loss, unconstrained), strict=True)))
    assert grads[0].keys() == grads[1].keys() == {"start", "trans", "locs", "scales"}
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_discrete_hmm_form_matches_reference_on_long_chain() -> None:
    K, D, T = 4, 2, 2000
    data, truth = sample_gaussian_hmm(N=2, T=T, K=K, D=D, seed=0)
    vectorized = trace_log_px(gaussian_hmm, data, K, truth)
    log_e = gaussian_log_emission(data, truth["locs"], truth["scales"])
    ll, _, _ = hmm_forward_backward(truth["start"].log(), truth["trans"].log(), log_e)
    torch.testing.assert_close(vectorized, ll.sum())

    sym, ctruth = sample_categorical_hmm(N=2, T=T, K=K, M=6, seed=0)
    pyro.clear_param_store()
    vectorized = trace_log_px(categorical_hmm, sym, K, 6, ctruth)
    log_e = categorical_log_emission(sym, ctruth["emission_probs"])
    ll, _, _ = hmm_forward_backward(ctruth["start"].log(), ctruth["trans"].log(), log_e)
    torch.testing.assert_close(vectorized, ll.sum())


def test_hmm_sites_params_and_shapes() -> None:
    K, D, T = 2, 3, 5
    data, truth, z = sample_gaussian_hmm(N=4, T=T, K=K, D=D, seed=0, return_states=True)
    assert data.shape == (4, T, D) and z.shape == (4, T) and z.dtype == torch.long
    trace = pyro.poutine.trace(gaussian_hmm_markov).get_trace(data, K, truth)
    for t in range(T):
        assert trace.nodes[f"z_{t}"]["infer"].get("enumerate") == "parallel"
        assert trace.nodes[f"x_{t}"]["is_observed"]
    store = pyro.get_param_store()
    assert set(store.keys()) == {"start", "trans", "locs", "scales"}
    assert store._constraints["trans"] is constraints.simplex
    assert store._constraints["start"] is constraints.simplex
    assert store._constraints["scales"] is constraints.positive
    torch.testing.assert_close(store["trans"].detach().sum(-1), torch.ones(K))

    pyro.clear_param_store()
    trace = pyro.poutine.trace(gaussian_hmm).get_trace(data, K, truth)
    assert trace.nodes["x"]["is_observed"]
    assert isinstance(trace.nodes["x"]["fn"], dist.DiscreteHMM)
    assert trace.nodes["x"]["fn"].batch_shape == (4,)
    assert trace.nodes["x"]["fn"].event_shape == (T, D)
    assert "sequences" in {f.name for f in trace.nodes["x"]["cond_indep_stack"]}

    sym, ctruth, cz = sample_categorical_hmm(N=3, T=T, K=K, M=4, seed=0, return_states=True)
    assert sym.shape == (3, T) and sym.dtype == torch.long and int(sym.max()) < 4
    assert ctruth["emission_probs"].shape == (K, 4) and cz.shape == (3, T)
    pyro.clear_param_store()
    categorical_hmm(sym, K, 4)
    assert pyro.param("emission_probs").shape == (K, 4)
    init = hmm_init_params(sym, K, "categorical", M=4, seed=1)
    torch.testing.assert_close(init["emission_probs"].sum(-1), torch.ones(K))
    torch.testing.assert_close(init["trans"].sum(-1), torch.ones(K))

    # a single sequence (T, D) is treated as N = 1
    pyro.clear_param_store()
    one = enum_log_px(gaussian_hmm_markov, data[0], K, truth)
    pyro.clear_param_store()
    torch.testing.assert_close(one, trace_log_px(gaussian_hmm, data[:1], K, truth))


def test_discrete_hmm_logits_shapes() -> None:
    start = torch.tensor([0.2, 0.8])
    trans = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    init, tl = discrete_hmm_logits(start, trans, 3)
    assert init.shape == (2,) and tl.shape == (3, 2, 2)
    torch.testing.assert_close(tl[0], start.log().expand(2, 2))
    torch.testing.assert_close(tl[1:], trans.log().expand(2, 2, 2))
    _, tl1 = discrete_hmm_logits(start, trans, 1)
    assert tl1.shape == (1, 2, 2)


def test_hmm_samplers_are_deterministic() -> None:
    a, _ = sample_gaussian_hmm(N=2, T=10, K=2, D=2, seed=5)
    b, _ = sample_gaussian_hmm(N=2, T=10, K=2, D=2, seed=5)
    c, _ = sample_gaussian_hmm(N=2, T=10, K=2, D=2, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    s1, _ = sample_categorical_hmm(N=2, T=10, K=2, M=3, seed=5)
    s2, _ = sample_categorical_hmm(N=2, T=10, K=2, M=3, seed=5)
    assert torch.equal(s1, s2)
