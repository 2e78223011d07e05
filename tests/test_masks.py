"""Masks on enumerated sites under :class:`~pyro_emvae.ExactEStep`, against brute force and
Pyro's ``TraceEnum_ELBO``.

Pyro's semantics (``TraceEnum_ELBO``'s ``_compute_model_factors``): an enumerated latent
keeps its *unmasked* prior; masks act, inside the sum over the latents, on the sites that
depend on enumerated values (a mask may itself read one). A latent masked together with all
that depends on it therefore sums to one: its rows drop out of :math:`\\log p(x)`, its
posterior is its prior, and EM on the masked data equals EM with those rows removed.
``obs_mask=`` on an enumerated label sums the missing labels over (semi-supervised EM).

Brute force enumerates every joint assignment with ``itertools.product`` and evaluates
``log p(x, z)`` by hand from the param store's values (masked latents with their prior,
masked observations left out).
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch.distributions import Normal

from pyro_emvae import ExactEStep, fit
from pyro_emvae.evaluate import score
from pyro_emvae.validate import ModelInputError

PAR = {"enumerate": "parallel"}
TOL = 1e-9
F64 = torch.float64  # module constants are built before conftest sets the default


def _p(name: str) -> torch.Tensor:
    return pyro.get_param_store().get_param(name).detach()


def _close(actual, expected, tol: float = TOL) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def _brute(logjoint, cards: list[int]):
    """``(assignments (M, n), log p(x, z) (M,), log p(x), p(z | x) (M,))``."""
    a = torch.tensor(list(itertools.product(*[range(k) for k in cards])), dtype=torch.long)
    lj = logjoint(a)
    logpx = lj.logsumexp(0)
    return a, lj, logpx, (lj - logpx).exp()


def _marginal(a, w, i: int, k: int) -> torch.Tensor:
    return torch.zeros(k).index_add(0, a[:, i], w)


def _pair(a, w, i: int, j: int, k: int) -> torch.Tensor:
    return torch.zeros(k * k).index_add(0, a[:, i] * k + a[:, j], w).view(k, k)


def _trace_enum(model, *args) -> float:
    """log p(x) by Pyro: TraceEnum_ELBO's loss with an empty guide."""
    with pyro.validation_enabled(False):  # (it warns of the guide's missing sites)
        return -TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda *a, **k: None, *args)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- mixture
K, N = 3, 5
_g = _gen(3)
W0 = torch.rand(K, generator=_g, dtype=F64) + 0.2
W0 = W0 / W0.sum()
LOC0 = 2.0 * torch.randn(K, generator=_g, dtype=F64)
SCALE0 = 0.5 + torch.rand(K, generator=_g, dtype=F64)
X = 2.0 * torch.randn(N, generator=_g, dtype=F64)
MASK = torch.tensor([True, False, True, True, False])


def gmm(x, mask):
    """A mixture with whole rows (latent and observation) masked by ``mask``."""
    w = pyro.param("w", W0.clone(), constraint=constraints.simplex)
    loc = pyro.param("loc", LOC0.clone())
    scale = pyro.param("scale", SCALE0.clone(), constraint=constraints.positive)
    with pyro.plate("data", len(x)), poutine.mask(mask=mask):
        z = pyro.sample("z", dist.Categorical(w), infer=PAR)
        pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def _gmm_brute(x, mask):
    w, loc, scale = _p("w"), _p("loc"), _p("scale")

    def logjoint(a):  # masked rows: their latent's prior, no observation
        return (w.log()[a] + Normal(loc[a], scale[a]).log_prob(x) * mask).sum(-1)

    return _brute(logjoint, [K] * len(x))


def test_masked_rows_drop_out_of_the_mixture():
    """A plate of (z, x) under poutine.mask: log p(x) is that of the unmasked rows (not log K
    per masked row too high), the masked rows' posterior is the prior, MAP and score follow."""
    guide = ExactEStep(gmm)
    post = guide.posterior(X, MASK)
    a, lj, logpx, w = _gmm_brute(X, MASK)
    kept = ExactEStep(gmm).log_likelihood(X[MASK], torch.ones(int(MASK.sum()), dtype=torch.bool))
    _close(post.log_likelihood, logpx)
    _close(kept, logpx)
    _close(guide.log_likelihood(X, MASK), logpx)
    _close(_trace_enum(gmm, X, MASK), logpx)
    _close(post.marginals["z"], torch.stack([_marginal(a, w, n, K) for n in range(N)]))
    _close(post.marginals["z"][~MASK], _p("w").expand(int((~MASK).sum()), K))
    assert torch.equal(guide.map(X, MASK)["z"], a[int(lj.argmax())])
    _close(score(gmm, guide, X, MASK, per="row"), logpx / N)  # over the plate's rows
    _close(score(gmm, guide, X, MASK), logpx / int(MASK.sum()))  # over the observed values
    # the exact guide under SVI: every draw's ELBO is log p(x)
    _close(-Trace_ELBO().loss(gmm, guide, X, MASK), logpx)
    # the M-step's weight of the masked latent: zero on its masked rows
    q = post.factor_q["z"]
    assert q.shape[q._pyro_dims.index("a")] == N
    rows = q.sum(tuple(i for i, d in enumerate(q._pyro_dims) if d != "a"))
    _close(rows, MASK.double())


def test_masked_rows_samples_follow_the_prior():
    """Exact draws: a masked row's latent is drawn from its prior (not uniformly)."""
    guide = ExactEStep(gmm)
    draws = guide.sample(X, MASK, num_samples=4000)["z"]
    a, _, _, w = _gmm_brute(X, MASK)
    for n in range(N):
        freq = torch.nn.functional.one_hot(draws[:, n], K).double().mean(0)
        p = _marginal(a, w, n, K)
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / 4000).sqrt() + 1e-12).all(), n


def test_em_on_masked_rows_equals_em_without_them():
    """Closed-form EM on the masked mixture equals EM on the unmasked rows alone: the masked
    latent's factor gets no M-step weight (its prior's old value would otherwise pull w)."""
    g = _gen(5)
    x = torch.cat([torch.randn(30, generator=g) - 2, torch.randn(30, generator=g) + 2])
    mask = torch.rand(60, generator=g) > 0.3
    masked = fit(gmm, ExactEStep(gmm), x, mask, max_iter=5, tol=0)
    params = dict(masked.params)
    pyro.clear_param_store()
    alone = fit(
        gmm,
        ExactEStep(gmm),
        x[mask],
        torch.ones(int(mask.sum()), dtype=torch.bool),
        max_iter=5,
        tol=0,
    )
    for name, value in alone.params.items():
        _close(params[name], value, 1e-8)
    _close(masked.history["log_likelihood"], alone.history["log_likelihood"], 1e-9)
    assert masked.n_data == alone.n_data == int(mask.sum())


# ---------------------------------------------------------------------------- HMM with padding
T, S = 3, 2  # time steps, sequences
_g = _gen(7)
PI0 = torch.rand(K, generator=_g, dtype=F64) + 0.2
PI0 = PI0 / PI0.sum()
A0 = torch.rand(K, K, generator=_g, dtype=F64) + 0.2
A0 = A0 / A0.sum(-1, keepdim=True)
HLOC0 = 2.0 * torch.randn(K, generator=_g, dtype=F64)
SEQS = 2.0 * torch.randn(T, S, generator=_g, dtype=F64)
LENGTHS = torch.tensor([3, 1])


def padded_hmm(seqs, lengths):
    """Pyro's examples/hmm.py padding: poutine.mask(mask=t < lengths) around each step's latent
    (a pyro.markov chain) and its observation."""
    pi = pyro.param("pi", PI0.clone(), constraint=constraints.simplex)
    trans = pyro.param("trans", A0.clone(), constraint=constraints.simplex)
    loc = pyro.param("hloc", HLOC0.clone())
    with pyro.plate("sequences", seqs.shape[1], dim=-1):
        z = None
        for t in pyro.markov(range(seqs.shape[0])):
            with poutine.mask(mask=t < lengths):
                z = pyro.sample(
                    f"z_{t}", dist.Categorical(pi if z is None else trans[z]), infer=PAR
                )
                pyro.sample(f"x_{t}", dist.Normal(loc[z], 1.0), obs=seqs[t])


def ragged_hmm(seq_list):
    """The same chains without padding: one chain per sequence, of its own length."""
    pi = pyro.param("pi", PI0.clone(), constraint=constraints.simplex)
    trans = pyro.param("trans", A0.clone(), constraint=constraints.simplex)
    loc = pyro.param("hloc", HLOC0.clone())
    for n, xs in enumerate(seq_list):
        z = None
        for t in pyro.markov(range(len(xs))):
            z = pyro.sample(
                f"z_{n}_{t}", dist.Categorical(pi if z is None else trans[z]), infer=PAR
            )
            pyro.sample(f"x_{n}_{t}", dist.Normal(loc[z], 1.0), obs=xs[t])


def _hmm_brute(seqs, lengths):
    pi, trans, loc = _p("pi"), _p("trans"), _p("hloc")
    t_len, s_len = seqs.shape

    def logjoint(a):  # a: (M, S*T), sequence-major; masked steps keep their transitions
        a = a.view(-1, s_len, t_len)
        lp = pi.log()[a[..., 0]].sum(-1)
        lp = lp + trans.log()[a[..., :-1], a[..., 1:]].sum((-1, -2))
        seen = (torch.arange(t_len)[None, :] < lengths[:, None]).double()  # (S, T)
        lp = lp + (Normal(loc[a], 1.0).log_prob(seqs.T) * seen).sum((-1, -2))
        return lp

    return _brute(logjoint, [K] * (s_len * t_len))


def test_padded_hmm_equals_the_unpadded_sequences():
    guide = ExactEStep(padded_hmm)
    post = guide.posterior(SEQS, LENGTHS)
    a, lj, logpx, w = _hmm_brute(SEQS, LENGTHS)
    ragged = [SEQS[: int(n), s] for s, n in enumerate(LENGTHS)]
    _close(post.log_likelihood, logpx)
    _close(ExactEStep(ragged_hmm).log_likelihood(ragged), logpx)
    _close(_trace_enum(padded_hmm, SEQS, LENGTHS), logpx)
    for t in range(T):  # padded steps: the chain's prior given its past, not uniform
        expected = torch.stack([_marginal(a, w, s * T + t, K) for s in range(S)])
        _close(post.marginals[f"z_{t}"], expected)
        if t:
            pair = torch.stack([_pair(a, w, s * T + t - 1, s * T + t, K) for s in range(S)])
            _close(post.pairwise[(f"z_{t - 1}", f"z_{t}")], pair)
    best = a[int(lj.argmax())].view(S, T)
    values = guide.map(SEQS, LENGTHS)
    for t in range(T):
        assert torch.equal(values[f"z_{t}"], best[:, t]), t
    _close(-Trace_ELBO().loss(padded_hmm, guide, SEQS, LENGTHS), logpx)


def test_em_on_padded_hmm_equals_em_on_the_ragged_sequences():
    g = _gen(11)
    t_len, s_len = 4, 3
    seqs = 2.0 * torch.randn(t_len, s_len, generator=g)
    lengths = torch.tensor([4, 1, 3])
    padded = fit(padded_hmm, ExactEStep(padded_hmm), seqs, lengths, max_iter=4, tol=0)
    params = dict(padded.params)
    pyro.clear_param_store()
    ragged = [seqs[: int(n), s] for s, n in enumerate(lengths)]
    alone = fit(ragged_hmm, ExactEStep(ragged_hmm), ragged, max_iter=4, tol=0)
    for name, value in alone.params.items():
        _close(params[name], value, 1e-8)
    _close(padded.history["log_likelihood"], alone.history["log_likelihood"], 1e-9)


# ---------------------------------------------------------------------------- mask reads a latent
def which_model(x):
    """The likelihood's choice expressed by masks: x_k is observed where which == k only, so
    x_k depends on the enumerated ``which`` through its mask alone."""
    w = pyro.param("w", W0.clone(), constraint=constraints.simplex)
    loc = pyro.param("loc", LOC0.clone())
    scale = pyro.param("scale", SCALE0.clone(), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        which = pyro.sample("which", dist.Categorical(w), infer=PAR)
        for k in range(K):
            with poutine.mask(mask=which == k):
                pyro.sample(f"x_{k}", dist.Normal(loc[k], scale[k]), obs=x)


def test_mask_that_reads_an_enumerated_value():
    guide = ExactEStep(which_model)
    post = guide.posterior(X)
    a, lj, logpx, w = _gmm_brute(X, torch.ones(N, dtype=torch.bool))
    _close(post.log_likelihood, logpx)
    _close(_trace_enum(which_model, X), logpx)
    _close(post.marginals["which"], torch.stack([_marginal(a, w, n, K) for n in range(N)]))
    assert torch.equal(guide.map(X)["which"], a[int(lj.argmax())])
    _close(score(which_model, guide, X, per="row"), logpx / N)
    _close(score(which_model, guide, X), logpx / N)  # one observed value per row
    _close(-Trace_ELBO().loss(which_model, guide, X), logpx)


def test_em_with_a_mask_that_reads_a_latent_equals_the_mixture():
    g = _gen(2)
    x = torch.cat([torch.randn(25, generator=g) - 2, torch.randn(25, generator=g) + 2])
    by_masks = fit(which_model, ExactEStep(which_model), x, max_iter=5, tol=0)
    params = dict(by_masks.params)
    pyro.clear_param_store()
    plain = fit(gmm, ExactEStep(gmm), x, torch.ones(50, dtype=torch.bool), max_iter=5, tol=0)
    for name, value in plain.params.items():
        _close(params[name], value, 1e-8)
    _close(by_masks.history["log_likelihood"], plain.history["log_likelihood"], 1e-9)


# ---------------------------------------------------------------------------- obs_mask labels
LABELS = torch.tensor([0, 2, 1, 1, 0])
LABELED = torch.tensor([True, False, True, False, False])


def semi(x, labels, labeled):
    """Semi-supervised mixture: the labels are observed where ``labeled``, latent elsewhere."""
    w = pyro.param("w", W0.clone(), constraint=constraints.simplex)
    loc = pyro.param("loc", LOC0.clone())
    scale = pyro.param("scale", SCALE0.clone(), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), obs=labels, obs_mask=labeled, infer=PAR)
        pyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def two_plates(x_lab, labels, x_unl):
    """The same model written as a labeled plate (z observed) and an unlabeled plate."""
    w = pyro.param("w", W0.clone(), constraint=constraints.simplex)
    loc = pyro.param("loc", LOC0.clone())
    scale = pyro.param("scale", SCALE0.clone(), constraint=constraints.positive)
    with pyro.plate("labeled", len(x_lab)):
        z = pyro.sample("z_lab", dist.Categorical(w), obs=labels)
        pyro.sample("x_lab", dist.Normal(loc[z], scale[z]), obs=x_lab)
    with pyro.plate("unlabeled", len(x_unl)):
        z = pyro.sample("z_unl", dist.Categorical(w), infer=PAR)
        pyro.sample("x_unl", dist.Normal(loc[z], scale[z]), obs=x_unl)


def _semi_brute(x, labels, labeled):
    w, loc, scale = _p("w"), _p("loc"), _p("scale")
    free = (~labeled).nonzero().flatten()

    def logjoint(a):
        z = labels.expand(a.shape[0], -1).clone()
        z[:, free] = a
        return (w.log()[z] + Normal(loc[z], scale[z]).log_prob(x)).sum(-1)

    return _brute(logjoint, [K] * len(free))


@pytest.mark.parametrize("fill", [0, 2, "random"])
def test_obs_mask_labels_are_summed_over(fill):
    """log p(x) does not depend on the hidden fill values, and equals brute force, Pyro's
    TraceEnum_ELBO (with z_unobserved enumerated) and the two-plate form."""
    if fill == "random":
        filled = torch.where(LABELED, LABELS, torch.randint(K, (N,), generator=_gen(1)))
    else:
        filled = torch.where(LABELED, LABELS, torch.tensor(fill))
    guide = ExactEStep(semi)
    post = guide.posterior(X, filled, LABELED)
    a, lj, logpx, w = _semi_brute(X, filled, LABELED)
    _close(post.log_likelihood, logpx)
    _close(_trace_enum(config_enumerate(semi), X, filled, LABELED), logpx)
    _close(ExactEStep(two_plates).log_likelihood(X[LABELED], LABELS[LABELED], X[~LABELED]), logpx)
    free = (~LABELED).nonzero().flatten()
    marg = post.marginals["z_unobserved"][free]
    _close(marg, torch.stack([_marginal(a, w, i, K) for i in range(len(free))]))
    assert torch.equal(guide.map(X, filled, LABELED)["z_unobserved"][free], a[int(lj.argmax())])
    _close(score(semi, guide, X, filled, LABELED, per="row"), logpx / N)
    _close(score(semi, guide, X, filled, LABELED), logpx / (N + int(LABELED.sum())))
    _close(-Trace_ELBO().loss(semi, guide, X, filled, LABELED), logpx)


def test_semi_supervised_em_equals_the_two_plate_form():
    g = _gen(4)
    x = torch.cat([torch.randn(30, generator=g) - 2, torch.randn(30, generator=g) + 2])
    truth = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(30, dtype=torch.long)])
    labeled = torch.rand(60, generator=g) < 0.3
    filled = torch.where(labeled, truth, torch.tensor(K - 1))
    semi_fit = fit(semi, ExactEStep(semi), x, filled, labeled, max_iter=5, tol=0)
    params = dict(semi_fit.params)
    pyro.clear_param_store()
    two = fit(
        two_plates,
        ExactEStep(two_plates),
        x[labeled],
        truth[labeled],
        x[~labeled],
        max_iter=5,
        tol=0,
    )
    for name, value in two.params.items():
        _close(params[name], value, 1e-8)
    _close(semi_fit.history["log_likelihood"], two.history["log_likelihood"], 1e-9)


def test_obs_mask_fill_outside_the_support_is_refused_with_the_right_advice():
    filled = torch.where(LABELED, LABELS, torch.tensor(-1))
    with pytest.raises(ModelInputError) as info:
        ExactEStep(semi).log_likelihood(X, filled, LABELED)
    msg = str(info.value)
    for part in [
        "'z_observed'",
        "-1",
        "observed part of site 'z' (obs_mask=)",
        "any value inside the support",
        "'z_unobserved' is summed over",
    ]:
        assert part in msg, (part, msg)
    assert ".mask(observed)" not in msg  # masking the label would condition x on the fill


def _dot_masked_hmm(x, keep, how):
    """A Gaussian DiscreteHMM over sequences, ``keep`` applied by ``how``: ``"dot"`` as
    ``DiscreteHMM(...).mask(keep)``, ``"poutine"`` as ``poutine.mask(mask=keep)``, ``"rows"``
    not at all (the caller passes the kept rows)."""
    K = 3
    start = pyro.param("start", torch.ones(K, dtype=F64) / K, constraint=constraints.simplex)
    trans = pyro.param(
        "trans",
        torch.full((K, K), 0.1, dtype=F64) + 0.7 * torch.eye(K, dtype=F64),
        constraint=constraints.simplex,
    )
    locs = pyro.param("locs", torch.tensor([-2.0, 0.0, 2.0], dtype=F64))
    scales = pyro.param("scales", torch.ones(K, dtype=F64), constraint=constraints.positive)
    d = dist.DiscreteHMM(start.log(), trans.log(), dist.Normal(locs, scales), duration=x.shape[1])
    with pyro.plate("seqs", x.shape[0]), poutine.mask(mask=keep if how == "poutine" else True):
        pyro.sample("x", d.mask(keep) if how == "dot" else d, obs=x)


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
def test_a_dot_masked_discrete_hmm_reads_as_poutine_mask():
    """``DiscreteHMM(...).mask(keep)`` is ``poutine.mask(mask=keep)`` around it (the same
    log-prob): the E-step read the MaskedDistribution as an opaque observed site (log p(x)
    right, no chain posterior), and fit's M-step crashed on its missing weights (IndexError in
    the transition counts). Now: the posterior equals poutine.mask's, log p(x) Pyro's, and EM
    equals EM on the kept sequences alone."""
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(3, 7, generator=g, dtype=F64)
    keep = torch.tensor([True, False, True])
    post = {}
    for how in ("dot", "poutine"):
        pyro.clear_param_store()
        post[how] = ExactEStep(_dot_masked_hmm).posterior(x, keep, how)
    want = -TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        _dot_masked_hmm, lambda *a: None, x, keep, "dot"
    )
    torch.testing.assert_close(post["dot"].log_likelihood, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post["dot"].log_likelihood, post["poutine"].log_likelihood)
    torch.testing.assert_close(post["dot"].marginals["x"], post["poutine"].marginals["x"])
    torch.testing.assert_close(
        post["dot"].pairwise[("x", "x")], post["poutine"].pairwise[("x", "x")]
    )
    params = {}
    for how, data, kept in (("dot", x, keep), ("rows", x[keep], keep[keep])):
        pyro.clear_param_store()
        r = fit(_dot_masked_hmm, ExactEStep(_dot_masked_hmm), data, kept, how, max_iter=3, tol=0)
        params[how] = r.params
    for name in params["rows"]:
        torch.testing.assert_close(params["dot"][name], params["rows"][name], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("how", ["dot", "poutine"])
def test_a_chain_masked_out_by_a_plain_false(how):
    """``poutine.mask(mask=False)`` (or ``.mask(False)``) around a DiscreteHMM: every factor
    is masked out, log p(x) no longer depends on anything, and the E-step's backward pass
    crashed ("element 0 of tensors does not require grad"). Now it is what the all-False
    tensor mask gives (log p(x) = 0, as Pyro's TraceEnum_ELBO says; the chain's prior as its
    marginals, no weight for the M-step), and fit leaves the params where they were."""
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(3, 7, generator=g, dtype=F64)
    pyro.clear_param_store()
    want = ExactEStep(_dot_masked_hmm).posterior(x, torch.zeros(3, dtype=torch.bool), how)
    pyro.clear_param_store()
    got = ExactEStep(_dot_masked_hmm).posterior(x, False, how)
    pyro_lp = -TraceEnum_ELBO(max_plate_nesting=1).loss(
        _dot_masked_hmm, lambda *a: None, x, False, how
    )
    assert float(got.log_likelihood) == pyro_lp == 0.0
    torch.testing.assert_close(got.marginals["x"], want.marginals["x"], rtol=0, atol=0)
    assert float(got.factor_q["x"].abs().sum()) == 0.0
    pyro.clear_param_store()
    r = fit(_dot_masked_hmm, ExactEStep(_dot_masked_hmm), x, False, how, max_iter=2, tol=0)
    pyro.clear_param_store()
    _dot_masked_hmm(x, False, how)  # the initial params
    for name, value in r.params.items():
        torch.testing.assert_close(value, pyro.param(name).detach(), rtol=0, atol=0)
