"""Streams: exact streaming EM equals full-batch EM; online EM reaches the full-batch optimum;
minibatch EG and SVI; checkpoints inside an epoch; memory of one batch; clear errors.

Exactness is against the full-batch fit of the same model from the same start (which the other
test files check against brute force, scikit-learn and hmmlearn): the log-likelihood history
and the params agree to 1e-10.
"""

from __future__ import annotations

import gc
import itertools
import warnings
import weakref

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

from models.count_mixtures import (
    bernoulli_mixture,
    init_bernoulli,
    init_poisson,
    poisson_mixture,
    sample_bernoulli_mixture,
    sample_poisson_mixture,
)
from models.gmm import COVARIANCE_TYPES, gmm_model, sample_gmm
from models.gmm import init_params as gmm_init
from models.hmm import (
    categorical_hmm,
    gaussian_hmm,
    gaussian_hmm_markov,
    sample_categorical_hmm,
    sample_gaussian_hmm,
)
from models.hmm import init_params as hmm_init
from pyro_emvae import (
    Batches,
    EMOptim,
    ExactEStep,
    GradientMStep,
    ModelInputError,
    NpyChunks,
    OnlineEM,
    fit,
)
from pyro_emvae.rules import Stats

PAR = {"enumerate": "parallel"}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / (1.0 + abs(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------ the zoo, as (model, data)
def _gmm(cov):
    data, _ = sample_gmm(N=700, K=3, D=2, seed=0)
    init = gmm_init(data, 3, cov, seed=1)
    return (lambda x: gmm_model(x, 3, cov, init=init)), data


def _hmm(markov):
    data, _ = sample_gaussian_hmm(N=30, T=20, K=3, D=2, seed=0)
    init = hmm_init(data, 3, "gaussian", seed=1)
    form = gaussian_hmm_markov if markov else gaussian_hmm
    return (lambda x: form(x, 3, init=init)), data


def _categorical_hmm():
    data, _ = sample_categorical_hmm(N=30, T=20, K=3, M=4, seed=0)
    init = hmm_init(data, 3, "categorical", M=4, seed=1)
    return (lambda x: categorical_hmm(x, 3, 4, init=init)), data


def _poisson():
    data = sample_poisson_mixture(500, 3, D=2, seed=0)[0]
    init = init_poisson(data, 3, seed=1)
    return (lambda x: poisson_mixture(x, 3, init=init)), data


def _bernoulli():
    data = sample_bernoulli_mixture(500, 3, D=6, seed=0)[0]
    init = init_bernoulli(data, 3, seed=1)
    return (lambda x: bernoulli_mixture(x, 3, init=init)), data


CASES = {
    **{f"gmm-{cov}": (lambda cov=cov: _gmm(cov), 2) for cov in COVARIANCE_TYPES},
    "hmm-discrete": (lambda: _hmm(False), 2),
    "hmm-markov": (lambda: _hmm(True), 2),
    "hmm-categorical": (_categorical_hmm, 1),
    "poisson-mixture": (_poisson, 1),
    "bernoulli-mixture": (_bernoulli, 1),
}


def _full_and_streamed(model, data, batch_size, **options):
    options.setdefault("optim", None)
    results = []
    for source in (data, DataLoader(TensorDataset(data), batch_size=batch_size)):
        pyro.clear_param_store()
        optim = EMOptim(reg_covar=0.0) if options["optim"] is None else options["optim"]()
        opts = {**options, "optim": optim}
        results.append(fit(model, ExactEStep(model), source, **opts))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_em_equals_full_batch_em(case):
    make, passes = CASES[case]
    model, data = make()
    full, streamed = _full_and_streamed(model, data, batch_size=64, max_iter=12, tol=0)
    assert _rel(streamed.history["log_likelihood"], full.history["log_likelihood"]) < 1e-10
    assert _max_diff(streamed.params, full.params) < 1e-10
    assert streamed.n_data == full.n_data and streamed.n_iter == full.n_iter == 12
    assert streamed.algorithm == full.algorithm == "EM"
    assert streamed.closed_form == full.closed_form
    # Gaussian scales read the new means: a second pass; counts and categories need one
    assert streamed.info["passes"] == passes
    h = streamed.history["log_likelihood"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(h))


def test_streaming_converges_where_full_batch_does():
    model, data = _gmm("diag")
    full, streamed = _full_and_streamed(model, data, batch_size=100, max_iter=500, tol=1e-8)
    assert full.converged and streamed.converged
    assert streamed.n_iter == full.n_iter
    assert abs(streamed.log_likelihood - full.log_likelihood) < 1e-8 * abs(full.log_likelihood)


def test_uneven_batches_and_a_batch_of_one():
    model, data = _gmm("full")
    data = data[:101]
    pyro.clear_param_store()
    full = fit(model, ExactEStep(model), data, optim=EMOptim(reg_covar=0), max_iter=5, tol=0)
    pyro.clear_param_store()
    pieces = [data[:1], data[1:50], data[50:]]
    streamed = fit(
        model, ExactEStep(model), Batches(pieces), optim=EMOptim(reg_covar=0), max_iter=5, tol=0
    )
    assert _max_diff(streamed.params, full.params) < 1e-10


def test_batches_as_dicts_with_extra_arguments():
    """A batch may be a dict of keyword arguments (data and its mask), and fit's other args
    follow each batch's own: the model is called as model(K, x=..., mask=...)."""
    data, _ = sample_gmm(N=300, K=2, D=2, seed=3)
    mask = torch.rand(300, generator=torch.Generator().manual_seed(0)) > 0.2

    def model(K, x, mask):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        with pyro.plate("data", len(x)), pyro.poutine.mask(mask=mask):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    full = fit(model, ExactEStep(model), 2, x=data, mask=mask, max_iter=6, tol=0)
    expected = dict(full.params)
    pyro.clear_param_store()
    items = [{"x": x, "mask": m} for x, m in zip(data.split(64), mask.split(64))]
    streamed = fit(model, ExactEStep(model), Batches(items, 2), max_iter=6, tol=0)
    # (extra positional args follow a dict batch's keywords: model(2, x=..., mask=...))
    assert _max_diff(streamed.params, expected) < 1e-10
    assert streamed.n_data == full.n_data == int(mask.sum())


def test_a_factory_of_iterators_is_read_once_per_pass():
    model, data = _gmm("diag")
    calls = []

    def read():
        calls.append(1)
        return iter(data.split(200))

    pyro.clear_param_store()
    fit(model, ExactEStep(model), Batches(read), max_iter=3, tol=0)
    # inspection, 3 iterations x 2 passes, the final log-likelihood
    assert len(calls) == 1 + 3 * 2 + 1


def test_a_stream_holds_a_bounded_number_of_batches():
    """Memory is that of a batch: however many batches pass, only a fixed few are alive
    at once (the one being read, and the first and the last one's traces)."""
    model, data = _gmm("full")
    alive: list[int] = []
    live: set[int] = set()

    def tracked():
        for i, x in enumerate(data[:300].split(20)):  # 15 batches a pass
            x = x.clone()
            live.add(i)
            weakref.finalize(x, live.discard, i)
            gc.collect()
            alive.append(len(live))
            yield x

    pyro.clear_param_store()
    fit(model, ExactEStep(model), Batches(tracked), max_iter=1, tol=0)
    assert len(alive) == 15 * (1 + 2 + 1)  # inspection, the iteration's 2 passes, the final
    assert max(alive) <= 4


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_initializations_over_a_stream(init):
    data, _ = sample_gmm(N=900, K=3, D=2, seed=5)
    results = []
    for source in (data, DataLoader(TensorDataset(data), batch_size=150)):
        pyro.clear_param_store()
        model = lambda x: gmm_model(x, 3, "full")
        results.append(
            fit(
                model,
                ExactEStep(model),
                source,
                init=init,
                seed=0,
                n_init=2,
                max_iter=300,
                tol=1e-9,
            )
        )
    full, streamed = results
    assert streamed.converged and len(streamed.restarts) == 2
    # both reach the same (global) optimum on well-separated clusters
    assert abs(streamed.per_datum() - full.per_datum()) < 1e-6


def test_ecm_over_a_stream_takes_gradient_steps_per_batch():
    """Closed form for the weights and scales, Adam steps for the slopes (through tanh), one
    pass per batch: the log-likelihood climbs from the start."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, generator=g)
    y = torch.where(torch.rand(600, generator=g) < 0.5, torch.tanh(2 * x), torch.tanh(-x))
    y = y + 0.1 * torch.randn(600, generator=g)

    def model(x, y):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        slope = pyro.param("slope", torch.tensor([-0.5, 0.5]))
        scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("y", dist.Normal(torch.tanh(slope[z] * x), scale[z]), obs=y)

    optim = EMOptim(svi_optim=pyro.optim.Adam({"lr": 0.02}), svi_steps=2)
    infos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(
            model,
            ExactEStep(model),
            DataLoader(TensorDataset(x, y), batch_size=100),
            optim=optim,
            max_iter=30,
            tol=0,
            callback=lambda it, info: infos.append(info),
        )
    assert result.algorithm == "ECM" and result.gradient == ["slope"]
    # a pass for the statistics (the scales' residuals are about tanh(slope x), which no
    # closed form moves: no second pass), one for the gradient steps; an iteration whose
    # minibatch steps lowered log p(x) is undone by the guard and takes closed-form updates only
    undone = [i for i in infos if "rejected" in i]
    assert all(i["passes"] == 2 for i in infos if "rejected" not in i)
    assert all(i["passes"] == 1 for i in undone)
    assert len(undone) == sum("undone" in str(w.message) for w in caught) < len(infos) / 2
    h = result.history["log_likelihood"]
    assert h[-1] > h[0] + 100
    assert sorted(result.params["slope"].tolist()) == pytest.approx([-1.0, 2.0], abs=0.2)


# ------------------------------------------------------------------ online EM
def _online(data, model, batch_size, epochs, seed=0, **options):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=True)
    return fit(model, ExactEStep(model), loader, optim=OnlineEM(**options), max_iter=epochs, tol=0)


def test_online_em_reaches_the_full_batch_optimum_on_a_gmm():
    data, _ = sample_gmm(N=20_000, K=3, D=2, seed=2)
    init = gmm_init(data, 3, "full", seed=1)

    def model(x):
        gmm_model(x, 3, "full", init=init)

    pyro.clear_param_store()
    full = fit(model, ExactEStep(model), data, max_iter=300, tol=1e-10)
    assert full.converged
    online = _online(data, model, 200, epochs=4, kappa=0.6, t0=2.0)
    assert online.algorithm == "online EM"
    assert len(online.history["batch"]) == 4 * 100
    assert len(online.history["log_likelihood"]) == 4 + 1  # each epoch's sum, then exact
    gap = full.per_datum() - online.per_datum()
    assert 0 <= gap < 2e-3, gap
    assert (online.params["locs"] - full.params["locs"]).abs().max() < 0.05
    assert (online.params["weights"] - full.params["weights"]).abs().max() < 0.01


def test_online_em_reaches_the_full_batch_optimum_on_an_hmm_over_many_sequences():
    data, _ = sample_gaussian_hmm(N=400, T=40, K=3, D=2, seed=0)
    init = hmm_init(data, 3, "gaussian", seed=1)

    def model(x):
        gaussian_hmm(x, 3, init=init)

    pyro.clear_param_store()
    full = fit(model, ExactEStep(model), data, max_iter=500, tol=1e-10)
    assert full.converged
    online = _online(data, model, 20, epochs=3, kappa=0.6, t0=2.0)
    gap = full.per_datum() - online.per_datum()
    assert 0 <= gap < 2e-3, gap
    assert (online.params["trans"] - full.params["trans"]).abs().max() < 0.02
    assert (online.params["locs"] - full.params["locs"]).abs().max() < 0.05


def test_online_em_scales_each_minibatch_to_the_data_set():
    """The blended statistics are estimates of the full data's: with the first step (rho = 1)
    they are N / B times the batch's, which the Dirichlet pseudo-counts are measured against;
    the recorded minibatch log-likelihoods are per datum of the data set."""
    data, _ = sample_gmm(N=1000, K=2, D=2, seed=0)
    init = gmm_init(data, 2, "diag", seed=1)

    def model(x):
        gmm_model(x, 2, "diag", init=init)

    mstep = OnlineEM()
    result = fit(
        model, ExactEStep(model), Batches([data[:250]] * 4), optim=mstep, max_iter=1, tol=0
    )
    assert mstep.n_updates == 4
    counts = mstep._running[0].sums["count"]
    assert float(counts.sum()) == pytest.approx(1000.0, rel=1e-12)  # 4 x 250 rows, not 250
    pyro.clear_param_store()
    ll = float(ExactEStep(model).log_likelihood(data[:250]))
    assert result.history["batch"][0] == pytest.approx(ll / 250, rel=1e-12)


def test_online_em_on_a_subsampled_plate_in_memory():
    """OnlineEM also runs on in-memory data whose model subsamples: one update per
    iteration, each on a fresh minibatch."""
    data, _ = sample_gmm(N=4000, K=2, D=2, seed=2)
    locs0 = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", locs0)
        scales = pyro.param("scales", torch.ones(2, 2), constraint=constraints.positive)
        with pyro.plate("data", len(x), subsample_size=200) as idx:
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=x[idx])

    def full_model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", locs0)
        scales = pyro.param("scales", torch.ones(2, 2), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    best = fit(full_model, ExactEStep(full_model), data, max_iter=300, tol=1e-10)
    expected = dict(best.params)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, ExactEStep(model), data, optim=OnlineEM(kappa=0.6), max_iter=200, tol=0)
    got = {k: pyro.param(k).detach() for k in expected}
    assert _max_diff(got, expected) < 0.05


def test_online_em_arguments_are_checked():
    with pytest.raises(ValueError, match="kappa"):
        OnlineEM(kappa=0.5)
    with pytest.raises(ValueError, match="t0"):
        OnlineEM(t0=-1)
    with pytest.raises(ValueError, match="no guard"):
        OnlineEM(guard=True)
    m = OnlineEM(kappa=1.0, t0=0.0)
    assert [m.step_size(k) for k in range(4)] == [1.0, 1.0, 0.5, 1 / 3]


def test_minibatch_eg_and_a_callback_per_minibatch():
    data, _ = sample_gmm(N=600, K=2, D=2, seed=0)
    init = gmm_init(data, 2, "diag", seed=1)

    def model(x):
        gmm_model(x, 2, "diag", init=init)

    seen = []

    def callback(step, info):
        seen.append((step, info["epoch"], info["batch"]))
        return step == 10

    result = fit(
        model,
        ExactEStep(model),
        DataLoader(TensorDataset(data), batch_size=100),
        optim=GradientMStep(pyro.optim.Adam({"lr": 0.05})),
        max_iter=5,
        tol=0,
        callback=callback,
    )
    assert result.algorithm == "EG" and result.converged and result.n_iter == 1
    assert seen[-1] == (10, 1, 3) and len(seen) == 10
    h = result.history["batch"]
    assert h[-1] > h[0]


def test_minibatch_svi_over_a_loader():
    data = 2.0 + 0.5 * torch.randn(2000, generator=torch.Generator().manual_seed(0))

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 0.5), obs=x)

    guide = pyro.infer.autoguide.AutoNormal(model)
    result = fit(
        model,
        guide,
        DataLoader(TensorDataset(data), batch_size=200, shuffle=True),
        optim=pyro.optim.Adam({"lr": 0.05}),
        max_iter=15,
        tol=0,
    )
    assert result.algorithm == "SVI" and result.n_iter == 15
    assert len(result.history["elbo"]) == 15 and len(result.history["batch"]) == 150
    # the posterior of loc: N(mean, 0.5^2 / N) nearly, whatever minibatches it saw
    loc = pyro.param("AutoNormal.locs.loc").item()
    assert loc == pytest.approx(float(data.mean()), abs=0.02)
    # the ELBO of the last epoch estimates the data set's (scaled by N / B), per datum
    assert result.elbo / result.n_data == pytest.approx(
        float(dist.Normal(data.mean(), 0.5).log_prob(data).mean()), abs=0.05
    )


# ------------------------------------------------------------------ checkpoints
def test_exact_streaming_resumes_exactly(tmp_path):
    model, data = _gmm("full")
    path = tmp_path / "stream.ckpt"

    def run(stop_at=None, checkpoint=None):
        pyro.clear_param_store()

        def callback(it, info):
            if it == stop_at:
                raise KeyboardInterrupt

        return fit(
            model,
            ExactEStep(model),
            DataLoader(TensorDataset(data), batch_size=128),
            max_iter=12,
            tol=0,
            checkpoint=checkpoint,
            checkpoint_every=2,
            callback=callback,
        )

    whole = run()
    cut = run(stop_at=5, checkpoint=path)
    assert cut.interrupted and cut.n_iter == 5
    resumed = run(checkpoint=path)
    assert resumed.history["log_likelihood"] == whole.history["log_likelihood"]
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k])


def test_online_em_resumes_inside_an_epoch_exactly(tmp_path):
    """A cut in the middle of an epoch of a shuffled loader: the resumed fit replays the
    epoch's shuffle, skips the batches done and ends bit-identical to the uninterrupted one."""
    data, _ = sample_gmm(N=1200, K=3, D=2, seed=0)
    init = gmm_init(data, 3, "full", seed=1)

    def model(x):
        gmm_model(x, 3, "full", init=init)

    path = tmp_path / "online.ckpt"

    def run(stop_at=None, checkpoint=None):
        pyro.clear_param_store()
        pyro.set_rng_seed(7)

        def callback(step, info):
            if step == stop_at:
                raise KeyboardInterrupt

        loader = DataLoader(TensorDataset(data), batch_size=100, shuffle=True)
        return fit(
            model,
            ExactEStep(model),
            loader,
            optim=OnlineEM(),
            max_iter=3,
            tol=0,
            checkpoint=checkpoint,
            checkpoint_every=5,
            callback=callback,
        )

    whole = run()
    cut = run(stop_at=17, checkpoint=path)  # epoch 1, batch 5 of 12
    assert cut.interrupted and cut.n_iter == 1 and len(cut.history["batch"]) == 17
    state = torch.load(path, weights_only=True)
    assert state["position"]["batch"] == 5 and state["n_done"] == 1
    resumed = run(checkpoint=path)
    assert resumed.history["batch"] == whole.history["batch"]
    assert resumed.history["log_likelihood"] == whole.history["log_likelihood"]
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k])


# ------------------------------------------------------------------ errors
def test_errors_name_the_problem():
    model, data = _gmm("diag")
    guide = ExactEStep(model)
    with pytest.raises(TypeError, match="generator"):
        fit(model, guide, Batches(x for x in data.split(10)))
    with pytest.raises(TypeError, match="first argument"):
        fit(model, guide, 3, DataLoader(TensorDataset(data)))
    with pytest.raises(ValueError, match="no batch"):
        fit(model, guide, Batches([]))
    bad = [b.clone() for b in data.split(100)]
    bad[3][7, 1] = float("nan")
    with pytest.raises(ModelInputError, match="batch 3 of the stream") as err:
        fit(model, guide, Batches(bad))
    assert "NaN" in str(err.value)
    with pytest.raises(ValueError, match="recover=True"):
        fit(model, guide, Batches(list(data.split(100))), optim=OnlineEM(), recover=True)
    with pytest.raises(TypeError, match="a tensor is one batch"):
        Batches(data)


def test_batches_that_make_other_params_are_refused():
    def model(x):
        pyro.param(f"p{len(x)}", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="same model"):
        fit(model, ExactEStep(model), Batches([torch.zeros(3), torch.zeros(4)]))


def test_batches_move_to_a_device_and_count():
    loader = DataLoader(TensorDataset(torch.randn(10, 2), torch.arange(10)), batch_size=4)
    b = Batches(loader, "extra", device="cpu")
    items = list(b.with_rows())
    assert [n for *_, n in items] == [4, 4, 2] and len(b) == 3
    args, kwargs, _ = items[0]
    assert args[2] == "extra" and args[1].tolist() == [0, 1, 2, 3] and kwargs == {}


def test_stats_accumulate_in_place_as_they_add():
    a = Stats(4)
    a.add("count", torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    b = Stats(4)
    b.add("count", torch.tensor([1, 3]), torch.tensor([5.0, 7.0]))
    b.add("mean_num", torch.tensor([2]), torch.tensor([1.5]))
    total = a + b
    acc = Stats(4).add_(a).add_(b)
    assert torch.equal(acc.sums["count"], total.sums["count"])
    assert torch.equal(acc.sums["mean_num"], total.sums["mean_num"])
    assert torch.equal(acc.touched["count"], total.touched["count"])
    assert acc.sums["count"].tolist() == [1.0, 10.0, 0.0, 7.0]
    blend = Stats(4).add_(a).scale_(0.25).add_(b, alpha=0.75)
    assert blend.sums["count"].tolist() == [0.25, 1.25 + 3.75, 0.0, 5.25]
    assert a.sums["count"].tolist() == [1.0, 5.0, 0.0, 0.0]  # the operands are untouched


def test_a_fit_streamed_from_an_npy_file_equals_the_fit_in_memory(tmp_path):
    model, data = _gmm("tied")
    path = tmp_path / "x.npy"
    np.save(path, data.numpy())
    chunks = NpyChunks(path, rows=128)
    assert len(chunks) == 6 and chunks[5].shape == (700 - 5 * 128, 2)
    assert torch.equal(torch.cat([chunks[i] for i in range(len(chunks))]), data)
    full, _ = _full_and_streamed(model, data, batch_size=700, max_iter=6, tol=0)
    pyro.clear_param_store()
    streamed = fit(
        model,
        ExactEStep(model),
        DataLoader(chunks, batch_size=None),
        optim=EMOptim(reg_covar=0.0),
        max_iter=6,
        tol=0,
    )
    assert _rel(streamed.history["log_likelihood"], full.history["log_likelihood"]) < 1e-10
    assert _max_diff(streamed.params, full.params) < 1e-10
    with pytest.raises(IndexError):
        chunks[6]
    with pytest.raises(ValueError, match="rows"):
        NpyChunks(path, rows=0)
    np.save(tmp_path / "f.npy", np.asfortranarray(data.numpy()))
    with pytest.raises(ValueError, match="C-ordered"):
        NpyChunks(tmp_path / "f.npy", rows=10)
