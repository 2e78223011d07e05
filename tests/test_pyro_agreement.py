"""Issue 16: where the exact E-step must agree with Pyro's semantics (and brute force), and
where Pyro itself is wrong it must refuse: masked DiscreteHMM sequences, ExactEStep as an
exact guide, subsampled sequential plates in map()/sample(), and Pyro's known wrong answers."""

import itertools
import warnings
from collections import defaultdict

import pyro
import pyro.distributions as dist
import pytest
import torch
from _brute import build_hmm_model, hmm_brute_force, random_hmm_spec
from pyro import poutine
from pyro.distributions import constraints
from pyro.ops.indexing import Vindex

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


# ---------------------------------------------------------------- B: ExactEStep as a guide
def _coupled(enumerate_sites: bool):
    """Local bits b_i (a plate of 2), then a global bit g: x_i reads b_i xor g, so the
    posterior couples b_0 and b_1 through g (drawn after them)."""
    infer = PAR if enumerate_sites else {}

    def model(x):
        data = pyro.plate("data", 2)
        with data:
            b = pyro.sample("b", dist.Bernoulli(0.5), infer=infer)
        g = pyro.sample("g", dist.Bernoulli(0.3), infer=infer)
        with data:
            loc = 4.0 * (b - g).abs()
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    return model


def _coupled_brute(x):
    """{(b0, b1, g): log p(x, b, g)}."""
    out = {}
    for b0, b1, g in itertools.product((0, 1), repeat=3):
        lp = torch.tensor([0.5, 0.5]).log().sum() + torch.tensor(0.3 if g else 0.7).log()
        for bi, xi in zip((b0, b1), x):
            lp = lp + dist.Normal(4.0 * abs(bi - g), 1.0).log_prob(xi)
        out[(b0, b1, g)] = lp
    return out


def _guide_draw_elbo(model, guide, *args):
    gtr = poutine.trace(guide).get_trace(*args)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args)
    return gtr, mtr.log_prob_sum() - gtr.log_prob_sum()


def test_guide_draws_are_exact_where_a_later_global_latent_couples_a_plate():
    x = torch.tensor([0.5, 3.0])
    joint = _coupled_brute(x)
    log_px = torch.stack(list(joint.values())).logsumexp(0)
    p_apart = sum((lp - log_px).exp() for (b0, b1, _), lp in joint.items() if b0 != b1)
    plain, guide = _coupled(False), ExactEStep(_coupled(True))
    n, apart = 100, 0
    for _ in range(n):
        gtr, elbo = _guide_draw_elbo(plain, guide, x)
        _close(elbo, log_px, 1e-8)  # every draw: log p(x, z) - log q(z) = log p(x)
        b = gtr.nodes["b"]["value"]
        apart += int(b[0] != b[1])
        # the guide's log q of the draw is the exact log p(z | x)
        key = (int(b[0]), int(b[1]), int(gtr.nodes["g"]["value"]))
        _close(gtr.log_prob_sum(), joint[key] - log_px, 1e-8)
    # exact: P(b0 != b1) = 0.980; drawn independently per element it would be 0.577
    # (P(|freq - 0.98| >= 0.1) at n=100 is about 5e-5)
    assert abs(apart / n - float(p_apart)) < 0.1, (apart / n, float(p_apart))
    # the per-draw loss of Pyro's own Trace_ELBO is -log p(x) too
    loss = pyro.infer.Trace_ELBO().loss(plain, guide, x)
    assert loss == pytest.approx(-float(log_px), abs=1e-8)


def test_guide_on_a_coupled_plate_with_a_masked_row_is_exact():
    """Row 1 masked with its observation: b_1 keeps its prior (TraceEnum_ELBO's reading) and
    every draw's ELBO is log p(x) of row 0 alone, by brute force."""
    mask = torch.tensor([True, False])

    def coupled(infer):
        def model(x):
            data = pyro.plate("data", 2)
            with data, poutine.mask(mask=mask):
                b = pyro.sample("b", dist.Bernoulli(0.5), infer=infer)
            g = pyro.sample("g", dist.Bernoulli(0.3), infer=infer)
            with data, poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(4.0 * (b - g).abs(), 1.0), obs=x)

        return model

    x = torch.tensor([0.5, 3.0])
    terms = [
        torch.tensor(0.5 * (0.3 if g else 0.7)).log()
        + dist.Normal(4.0 * abs(b0 - g), 1.0).log_prob(x[0])
        for g in (0, 1)
        for b0 in (0, 1)
    ]
    log_px = torch.stack(terms).logsumexp(0)
    guide = ExactEStep(coupled(PAR))
    _close(guide.log_likelihood(x), log_px, 1e-10)
    for _ in range(8):
        _, elbo = _guide_draw_elbo(coupled({}), guide, x)
        _close(elbo, log_px, 1e-8)


def _onehot_model(x):
    w = pyro.param("w", torch.tensor([0.2, 0.5, 0.3]), constraint=constraints.simplex)
    loc = pyro.param("loc", torch.tensor([-2.0, 0.0, 2.0]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.OneHotCategorical(w), infer=PAR)
        assert z.shape[-1] == 3, z.shape  # a model that reads the one-hot form
        pyro.sample("x", dist.Normal((z * loc).sum(-1), 1.0), obs=x)


def test_guide_draws_one_hot_vectors_for_one_hot_sites():
    x = torch.tensor([-1.5, 0.4, 2.2])
    w, loc = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-2.0, 0.0, 2.0])
    log_px = (w.log() + dist.Normal(loc, 1.0).log_prob(x.unsqueeze(-1))).logsumexp(-1).sum()
    guide = ExactEStep(_onehot_model)
    _close(guide.log_likelihood(x), log_px, 1e-10)
    gtr = poutine.trace(guide).get_trace(x)
    z = gtr.nodes["z"]["value"]
    assert z.shape == (3, 3) and bool((z.sum(-1) == 1).all()), z
    assert gtr.nodes["z"]["fn"].event_dim == 1
    for _ in range(5):
        loss = pyro.infer.Trace_ELBO().loss(_onehot_model, guide, x)
        assert loss == pytest.approx(-float(log_px), abs=1e-8)
    # TraceEnum_ELBO with this guide (was: "Model and guide event_dims disagree")
    with warnings.catch_warnings():  # (the guide's draws leave nothing to enumerate)
        warnings.filterwarnings("ignore", "TraceEnum_ELBO found no sample sites")
        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(_onehot_model, guide, x)
    assert loss == pytest.approx(-float(log_px), abs=1e-8)


# ---------------------------------------------------------------- C: subsampled plates
_W = torch.tensor([0.3, 0.7], dtype=torch.float64)
_LOC = torch.tensor([-1.0, 1.5], dtype=torch.float64)


def _subsampled(sequential: bool):
    def model(x):
        w = pyro.param("w", _W.clone(), constraint=constraints.simplex)
        loc = pyro.param("loc", _LOC.clone())
        if sequential:
            for i in pyro.plate("data", len(x), subsample_size=3):
                z = pyro.sample(f"z_{i}", dist.Categorical(w), infer=PAR)
                pyro.sample(f"x_{i}", dist.Normal(loc[z], 1.0), obs=x[i])
        else:
            with pyro.plate("data", len(x), subsample_size=3) as idx:
                z = pyro.sample("z", dist.Categorical(w), infer=PAR)
                pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x[idx])

    return model


@pytest.mark.parametrize("sequential", [False, True], ids=["vectorized", "sequential"])
def test_map_and_sample_on_a_randomly_subsampled_plate(sequential):
    """map()/sample() draw one minibatch per call and every internal pass replays it (each
    pass drew its own before: KeyError 'x_<i>' on a sequential plate, the wrong rows on a
    vectorized one); the answers are the brute-force posterior of the rows drawn."""
    x = torch.tensor([-2.0, 2.5, 0.2, -0.6, 1.1, 3.0, -1.4, 0.4])
    model = _subsampled(sequential)
    guide = ExactEStep(model)
    post = (_W.log() + dist.Normal(_LOC, 1.0).log_prob(x.unsqueeze(-1))).softmax(-1)  # (8, 2)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        best = guide.map(x)
        pyro.set_rng_seed(seed)  # the call's minibatch is the first thing it draws
        rows = poutine.trace(model).get_trace(x).nodes["data"]["value"].tolist()
        pyro.set_rng_seed(seed)
        draws = guide.sample(x, num_samples=3000)
        if sequential:
            assert sorted(best) == sorted(f"z_{i}" for i in rows)
            best = torch.stack([best[f"z_{i}"] for i in rows])
            freq = torch.stack([draws[f"z_{i}"].double().mean(0) for i in rows])
        else:
            best, freq = best["z"], draws["z"].double().mean(0)
        assert best.tolist() == post[rows].argmax(-1).tolist()
        _close(freq, post[rows, 1], 0.04)


# ---------------------------------------------------------------- D: where Pyro is wrong
def _reduction_model(reduce: bool):
    """c: an independent global bit; x: enumerated bits in a plate; y reads their mean outside
    the plate (reduce=True: Pyro's value is log 0.5, the truth log 0.3) or a global latent
    feeds the plate (reduce=False: the legit neighbour)."""

    def model():
        c = pyro.sample("c", dist.Bernoulli(0.5), infer=PAR)
        with pyro.plate("p", 2):
            probs = torch.tensor([0.2, 0.4])
            x = pyro.sample("x", dist.Bernoulli(probs if reduce else probs + 0.3 * c), infer=PAR)
            if not reduce:
                pyro.sample("o", dist.Normal(2.0 * x, 1.0), obs=torch.tensor([0.4, 1.3]))
        if reduce:
            pyro.sample("y", dist.Bernoulli(x.float().mean(-1)), obs=torch.tensor(1.0))

    return model


def test_reduction_over_an_enumerated_plate_is_refused():
    model = _reduction_model(True)
    # brute force: c is independent, P(y = 1) = E[mean(x)] = (0.2 + 0.4) / 2
    truth = torch.tensor(0.3).log()
    pyro_value = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    assert abs(pyro_value - float(truth)) > 0.3  # Pyro: log 0.5 (why this is refused)
    with pytest.raises(
        EnumerationError,
        match=r"site 'y' reads an enumerated value through a "
        r"reduction.*'x'",
    ):
        ExactEStep(model).log_likelihood()


def test_a_global_latent_feeding_a_plate_is_not_refused():
    model = _reduction_model(False)
    o = torch.tensor([0.4, 1.3])
    terms, post_c = [], []
    for c in (0, 1):
        lp = torch.tensor(0.5).log()
        for k, p in enumerate((0.2 + 0.3 * c, 0.4 + 0.3 * c)):
            p = torch.tensor([1 - p, p])
            lp = lp + (p.log() + dist.Normal(2.0 * torch.tensor([0.0, 1.0]), 1.0).log_prob(o[k]))
            lp = lp.logsumexp(-1) if lp.dim() else lp
        terms.append(lp)
    truth = torch.stack(terms).logsumexp(0)
    post_c = (torch.stack(terms) - truth).exp()
    guide = ExactEStep(model)
    _close(guide.log_likelihood(), truth, 1e-10)
    _close(guide.marginals()["c"], post_c, 1e-10)


def _grid(keep: bool, markov_rows: bool):
    """Pyro's recycling grid (2 x 2): x[i, j] reads x[i-1, j] and x[i, j-1]; each cell has
    an observation. keep=True: the inner markov is reused across rows (Pyro's value is wrong;
    its own funsor test of it is an xfail); markov_rows without an inner markov is the legit
    neighbour."""
    g = torch.Generator().manual_seed(0)
    P = torch.rand(2, 2, 2, generator=g, dtype=torch.float64)
    P = P / P.sum(-1, keepdim=True)
    obs = torch.tensor([[0.3, -0.5], [1.2, 0.1]])

    def model():
        x = defaultdict(lambda: torch.tensor(0))
        cols = pyro.markov(range(2), keep=True) if keep else range(2)
        for i in pyro.markov(range(2)) if markov_rows else range(2):
            for j in cols:
                probs = Vindex(P)[x[i - 1, j], x[i, j - 1]]
                x[i, j] = pyro.sample(f"x_{i}_{j}", dist.Categorical(probs), infer=PAR)
                pyro.sample(f"o_{i}_{j}", dist.Normal(1.5 * x[i, j], 1.0), obs=obs[i, j])

    def brute():
        out = []
        for a in itertools.product(range(2), repeat=4):
            x = dict(zip([(0, 0), (0, 1), (1, 0), (1, 1)], a))
            lp = torch.zeros(())
            for (i, j), v in x.items():
                lp = lp + P[x.get((i - 1, j), 0), x.get((i, j - 1), 0), v].log()
                lp = lp + dist.Normal(1.5 * v, 1.0).log_prob(obs[i, j])
            out.append(lp)
        return torch.stack(out).logsumexp(0)

    return model, brute()


def test_markov_keep_true_grid_is_refused():
    model, truth = _grid(keep=True, markov_rows=True)
    pyro_value = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=0).loss(model, lambda: None)
    assert abs(pyro_value - float(truth)) > 0.05  # Pyro is wrong here (why this is refused)
    with pytest.raises(
        EnumerationError,
        match=r"site 'x_1_1' reads the enumerated sites "
        r"'x_0_1', 'x_1_0', 'x_1_1', but with pyro.markov's recycled dims",
    ):
        ExactEStep(model).log_likelihood()


@pytest.mark.parametrize("markov_rows", [True, False])
def test_grids_without_keep_equal_brute_force(markov_rows):
    model, truth = _grid(keep=False, markov_rows=markov_rows)
    guide = ExactEStep(model)
    _close(guide.log_likelihood(), truth, 1e-10)
    pyro_value = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=0).loss(model, lambda: None)
    assert pyro_value == pytest.approx(float(truth), abs=1e-10)
