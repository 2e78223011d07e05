"""Checkpoint and resume: a fit cut short and resumed from its checkpoint (fresh param store,
fresh guide and optimizer: as in a new process) ends exactly as the uninterrupted fit, for EM,
ECM with Adam state, EG, SVI with an encoder and a KL schedule, and restarts, after Ctrl-C or
kill -9; writes are atomic. A checkpoint holds tensors and plain data only, read with
weights_only=True: a crafted file runs no code. A checkpoint of another fit (other data of the
same size, another algorithm) is refused, and an unwritable path is an error before any work."""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models.gmm import init_params, make_gmm_model, sample_gmm
from pyro_emvae import AmortizedGuide, EMOptim, ExactEStep, OnlineEM, fit, linear_warmup
from pyro_emvae.checkpoint import CONSTRAINTS, StreamDigest, from_plain, to_plain

ROOT = Path(__file__).resolve().parents[1]

DATA, _ = sample_gmm(300, 3, 2, seed=0)


def gmm_fit(checkpoint=None, stop_at=None, max_iter=20, every=3, **options):
    """A fresh start each call (empty store, new guide and optimizer): a new process."""
    pyro.clear_param_store()
    model = make_gmm_model(3, "full", init=init_params(DATA, 3, "full", seed=1))

    def callback(it, info):
        if it == stop_at:
            raise KeyboardInterrupt

    return fit(
        model,
        ExactEStep(model),
        DATA,
        max_iter=max_iter,
        tol=0,
        checkpoint=checkpoint,
        checkpoint_every=every,
        callback=callback,
        **options,
    )


def same(a, b):
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    key = "log_likelihood" if "log_likelihood" in a.history else "elbo"
    assert a.history[key] == b.history[key]
    assert a.n_iter == b.n_iter and a.converged == b.converged


def test_em_resumed_from_a_checkpoint_ends_as_the_uninterrupted_fit(tmp_path):
    path = tmp_path / "em.ckpt"
    whole = gmm_fit()
    cut = gmm_fit(path, stop_at=7)
    assert cut.interrupted and cut.n_iter == 7
    assert path.exists() and not (tmp_path / "em.ckpt.tmp").exists()
    resumed = gmm_fit(path)
    same(whole, resumed)
    # a finished fit's checkpoint gives the finished result at once
    again = gmm_fit(path)
    same(whole, again)
    # and extending max_iter goes on from where it ended
    longer = gmm_fit(max_iter=25)
    extended = gmm_fit(path, max_iter=25)
    same(longer, extended)


def test_convergence_by_tol_is_reproduced_on_resume(tmp_path):
    path = tmp_path / "tol.ckpt"
    pyro.clear_param_store()
    model = make_gmm_model(3, "full", init=init_params(DATA, 3, "full", seed=1))
    whole = fit(model, ExactEStep(model), DATA, max_iter=200, tol=1e-6)
    assert whole.converged
    pyro.clear_param_store()
    model = make_gmm_model(3, "full", init=init_params(DATA, 3, "full", seed=1))
    done = fit(model, ExactEStep(model), DATA, max_iter=200, tol=1e-6, checkpoint=path)
    same(whole, done)
    pyro.clear_param_store()
    model = make_gmm_model(3, "full", init=init_params(DATA, 3, "full", seed=1))
    again = fit(model, ExactEStep(model), DATA, max_iter=200, tol=1e-6, checkpoint=path)
    same(whole, again)


def ecm_model(x):
    # loc has a closed form; the softplus'd scale takes Adam steps (state to be saved)
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
    raw = pyro.param("raw", torch.zeros(2))
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=dist.constraints.simplex)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[z], torch.nn.functional.softplus(raw)[z]), obs=x)


def ecm_fit(path=None, stop_at=None):
    pyro.clear_param_store()
    x = torch.cat([torch.randn(80) - 2, 0.5 * torch.randn(80) + 2])

    def callback(it, info):
        if it == stop_at:
            raise KeyboardInterrupt

    optim = EMOptim(pyro.optim.Adam({"lr": 0.05}), svi_steps=3)
    return fit(
        ecm_model,
        ExactEStep(ecm_model),
        x,
        optim=optim,
        max_iter=15,
        tol=0,
        checkpoint=path,
        checkpoint_every=4,
        callback=callback,
    )


def test_ecm_resume_restores_the_gradient_optimizers_state(tmp_path):
    pyro.set_rng_seed(0)
    whole = ecm_fit()
    assert whole.algorithm == "ECM" and whole.gradient == ["raw"]
    pyro.set_rng_seed(0)
    ecm_fit(tmp_path / "ecm.ckpt", stop_at=6)
    pyro.set_rng_seed(0)
    resumed = ecm_fit(tmp_path / "ecm.ckpt")
    same(whole, resumed)
    # without Adam's saved moments the result would differ: the check can fail
    state = torch.load(tmp_path / "ecm.ckpt", weights_only=True)
    assert state["optimizer"]["svi_optim"]["raw"]["state"]


DECODER = torch.nn.Linear(2, 4).double()  # double before any reset: the same draws each time


def vae(x):
    DECODER.double()
    pyro.module("decoder", DECODER)
    with pyro.plate("data", len(x), subsample_size=16) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(DECODER(z), 0.5).to_event(1), obs=x[idx])


def svi_fit(path=None, stop_at=None, **options):
    pyro.clear_param_store()
    torch.manual_seed(123)  # the same decoder and encoder initial weights
    DECODER.reset_parameters()
    x = torch.linspace(-1, 1, 60).unsqueeze(-1) * torch.tensor([1.0, -2.0, 0.5, 3.0])
    guide = AmortizedGuide(vae, hidden=(8,))

    def callback(it, info):
        if it == stop_at:
            raise KeyboardInterrupt

    pyro.set_rng_seed(7)
    return fit(
        vae,
        guide,
        x,
        optim=pyro.optim.Adam({"lr": 0.01}),
        max_iter=30,
        tol=0,
        checkpoint=path,
        checkpoint_every=5,
        callback=callback,
        **options,
    )


@pytest.mark.parametrize("options", [{}, {"kl_weight": linear_warmup(20)}])
def test_svi_resume_reproduces_every_draw(tmp_path, options):
    whole = svi_fit(**options)
    cut = svi_fit(tmp_path / "svi.ckpt", stop_at=12, **options)
    assert cut.interrupted and len(cut.history["elbo"]) == 12
    resumed = svi_fit(tmp_path / "svi.ckpt", **options)
    same(whole, resumed)
    if options:
        assert whole.history["kl_weight"] == resumed.history["kl_weight"]
    # the decoder module itself was restored in place, not only the store's copy
    assert torch.equal(DECODER.weight.detach(), whole.params["decoder$$$weight"])


def test_restarts_resume_in_the_middle_of_a_later_run(tmp_path):
    def run(path=None, stop=None):
        pyro.clear_param_store()
        model = make_gmm_model(3, "diag")
        calls = {"n": 0}

        def callback(it, info):
            calls["n"] += 1
            if calls["n"] == stop:  # the 14th iteration overall: run 1 of 3
                raise KeyboardInterrupt

        return fit(
            model,
            ExactEStep(model),
            DATA,
            max_iter=10,
            tol=0,
            n_init=3,
            seed=0,
            checkpoint=path,
            checkpoint_every=4,
            callback=callback,
        )

    whole = run()
    cut = run(tmp_path / "r.ckpt", stop=14)
    assert cut.interrupted
    resumed = run(tmp_path / "r.ckpt")
    assert resumed.restarts == whole.restarts
    same(whole, resumed)


def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    gmm_fit(path, max_iter=6, every=3)
    before = torch.load(path, weights_only=True)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save({"half": "written"}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        gmm_fit(path, max_iter=9, every=3)
    monkeypatch.setattr(torch, "save", real_save)
    after = torch.load(path, weights_only=True)
    assert after["n_done"] == before["n_done"] == 6


def test_a_checkpoint_of_another_fit_is_refused(tmp_path):
    path = tmp_path / "b.ckpt"
    gmm_fit(path, max_iter=3)
    with pytest.raises(ValueError, match="different fit.*n_init"):
        gmm_fit(path, max_iter=3, n_init=2)
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        gmm_fit(bad)
    with pytest.raises(IsADirectoryError):
        gmm_fit(tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        gmm_fit(tmp_path / "c.ckpt", every=0)


# ------------------------------------------------------------------ kill -9
def test_a_fit_killed_by_sigkill_resumes_in_another_process_as_the_whole_fit(tmp_path):
    """A process killed outright (no handler runs) leaves its last periodic checkpoint; a new
    process resumes from it and ends bit-identical to the uninterrupted fit."""
    path = tmp_path / "killed.ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import pyro, torch
        import test_checkpoint as t  # (imported as pytest does: its data made in float32)
        torch.set_num_threads(2)  # as conftest: the same reductions, the same bits
        torch.set_default_dtype(torch.float64)
        pyro.set_rng_seed(0)
        from pyro_emvae import fit as fit_module

        def kill(it, info):
            if it == 8:  # after the checkpoint of iteration 6 (every 3), before the next
                os.kill(os.getpid(), signal.SIGKILL)

        t.pyro.clear_param_store()
        model = t.make_gmm_model(3, "full", init=t.init_params(t.DATA, 3, "full", seed=1))
        fit_module(model, t.ExactEStep(model), t.DATA, max_iter=20, tol=0,
                   checkpoint={str(path)!r}, checkpoint_every=3, callback=kill)
        """
    )
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert torch.load(path, weights_only=True)["n_done"] == 6
    whole = gmm_fit()
    resumed = gmm_fit(path)
    same(whole, resumed)


# ------------------------------------------------------------------ EG
def eg_fit(path=None, stop_at=None):
    pyro.clear_param_store()
    model = make_gmm_model(3, "diag", init=init_params(DATA, 3, "diag", seed=1))

    def callback(it, info):
        if it == stop_at:
            raise KeyboardInterrupt

    return fit(
        model,
        ExactEStep(model),
        DATA,
        optim=pyro.optim.Adam({"lr": 0.05}),
        svi_steps=2,
        max_iter=12,
        tol=0,
        checkpoint=path,
        checkpoint_every=4,
        callback=callback,
    )


def test_eg_resume_restores_the_pyro_optimizers_state(tmp_path):
    whole = eg_fit()
    assert whole.algorithm == "EG"
    cut = eg_fit(tmp_path / "eg.ckpt", stop_at=6)
    assert cut.interrupted and cut.n_iter == 6
    state = torch.load(tmp_path / "eg.ckpt", weights_only=True)
    moments = state["optimizer"]["optim"]
    assert moments and all(s["state"][0]["exp_avg"].abs().sum() > 0 for s in moments.values())
    resumed = eg_fit(tmp_path / "eg.ckpt")
    same(whole, resumed)


# ------------------------------------------------------------------ no code runs on load
class _Payload:
    """Unpickling it would create ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("form", ["pickle", "torch zip"])
def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    payload = {"format": 2, "magic": "pyro_emvae checkpoint", "x": _Payload(marker)}
    if form == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)  # a torch zip archive
    with pytest.raises(ValueError) as refused:
        gmm_fit(path)
    assert str(path) in str(refused.value)
    assert "not a pyro_emvae checkpoint or cannot be read safely" in str(refused.value)
    assert not marker.exists()
    # the file is a live payload: an unsafe load would have run it (so the test can fail)
    if form == "torch zip":
        loaded = torch.load(path, weights_only=False)
    else:
        loaded = pickle.loads(path.read_bytes())
    loaded["x"].close()
    assert marker.exists()


def test_every_known_constraint_round_trips_as_plain_data(tmp_path):
    c = dist.constraints
    kinds = [
        *CONSTRAINTS.values(),
        c.interval(-1.0, 2.5),
        c.interval(torch.zeros(2), torch.ones(2)),
        c.greater_than(3.0),
        c.greater_than_eq(-1.0),
        c.less_than(torch.tensor([1.0, 2.0])),
        c.half_open_interval(0.0, 1.0),
        c.integer_interval(0, 5),
        c.independent(c.positive, 2),
        c.independent(c.interval(0.0, 1.0), 1),
        c.cat([c.positive, c.real], dim=0, lengths=[1, 2]),
        c.stack([c.positive, c.simplex], dim=-1),
        type(c.simplex)(),  # another instance of a singleton's class
    ]
    torch.save(to_plain(kinds), tmp_path / "c.pt")
    back = from_plain(torch.load(tmp_path / "c.pt", weights_only=True))
    for a, b in zip(kinds, back):
        assert type(a) is type(b), a
        for attr in ("lower_bound", "upper_bound", "reinterpreted_batch_ndims", "dim", "lengths"):
            va, vb = getattr(a, attr, None), getattr(b, attr, None)
            assert (
                torch.equal(torch.as_tensor(va), torch.as_tensor(vb))
                if va is not None
                else vb is None
            )
        if hasattr(a, "cseq"):
            assert [type(x) for x in a.cseq] == [type(x) for x in b.cseq]
        if hasattr(a, "base_constraint"):
            assert type(a.base_constraint) is type(b.base_constraint)
    # names give the library's own objects
    assert back[list(CONSTRAINTS).index("simplex")] is c.simplex
    # the NumPy RNG state (an array) survives, and an unknown object is an error on save
    state = np.random.get_state()
    again = from_plain(to_plain(state))
    assert again[0] == state[0] and np.array_equal(again[1], state[1])
    assert again[1].dtype == state[1].dtype and again[2:] == state[2:]
    with pytest.raises(TypeError, match=r"state\['x'\] is a .*object"):
        to_plain({"x": object()})


class _Odd(dist.constraints.Constraint):
    """A user's own constraint (its transform registered), unknown to the checkpoint."""

    def check(self, value):
        return value > 0


for _registry in (torch.distributions.biject_to, torch.distributions.transform_to):
    _registry.register(_Odd)(lambda c: torch.distributions.ExpTransform())


def test_a_constraint_a_checkpoint_cannot_hold_is_an_error_before_any_iteration(tmp_path):
    odd = _Odd()

    def model(x):
        pyro.param("s", torch.ones(()), constraint=odd)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample(
                "z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
            )
            pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    calls = []
    with pytest.raises(TypeError, match=r"constraint of param 's'.*_Odd"):
        fit(
            model, ExactEStep(model), torch.randn(20), max_iter=3,
            checkpoint=tmp_path / "odd.ckpt", callback=lambda it, info: calls.append(it),
        )  # fmt: skip
    assert calls == [] and not (tmp_path / "odd.ckpt").exists()


def test_restarts_state_round_trips_with_the_best_result(tmp_path):
    """The best run so far is stored as its fields and rebuilt (constraints included)."""
    path = tmp_path / "r.ckpt"

    def run(stop=None):
        pyro.clear_param_store()
        model = make_gmm_model(2, "full")
        calls = {"n": 0}

        def callback(it, info):
            calls["n"] += 1
            if calls["n"] == stop:
                raise KeyboardInterrupt

        return fit(
            model, ExactEStep(model), DATA, max_iter=4, tol=0, n_init=2, seed=0,
            checkpoint=path if stop != -1 else None, checkpoint_every=2, callback=callback,
        )  # fmt: skip

    whole = run(-1)
    run(6)  # cut inside run 1: run 0's result is in the checkpoint
    state = torch.load(path, weights_only=True)
    assert state["best"]["n_iter"] == 4 and state["best"]["constraints"]
    resumed = run()
    same(whole, resumed)
    assert resumed.n_parameters() == whole.n_parameters()
    assert {k: type(v) for k, v in resumed.constraints.items()} == {
        k: type(v) for k, v in whole.constraints.items()
    }


# ------------------------------------------------------------------ another fit's checkpoint
def test_other_data_of_the_same_size_is_refused(tmp_path):
    path = tmp_path / "fold.ckpt"
    fold_a, fold_b = DATA[:150], DATA[150:]

    def run(x):
        pyro.clear_param_store()
        model = make_gmm_model(2, "diag", init=init_params(DATA, 2, "diag", seed=1))
        return fit(model, ExactEStep(model), x, max_iter=3, tol=0, checkpoint=path)

    first = run(fold_a)
    with pytest.raises(ValueError, match="written by a different fit.*data_digest"):
        run(fold_b)
    # the same data resumes (the finished fit, at once)
    same(first, run(fold_a.clone()))
    # one value changed is other data
    changed = fold_a.clone()
    changed[77, 1] = torch.nextafter(changed[77, 1], changed.new_tensor(float("inf")))
    with pytest.raises(ValueError, match="written by a different fit"):
        run(changed)


def test_a_stream_digest_ignores_order_and_batching_but_not_values():
    data = torch.randn(100, 3)
    mask = torch.rand(100) < 0.5

    def digest(batches):
        d = StreamDigest()
        for x, m in batches:
            d.update((x, 4), {"mask": m}, len(x))
        return d.hexdigest()

    ref = digest(zip(data.split(10), mask.split(10)))
    perm = torch.randperm(100)
    assert digest(zip(data[perm].split(7), mask[perm].split(7))) == ref
    # a row's values are tied together: the mask rows permuted alone is other data
    assert digest(zip(data.split(10), mask[perm].split(10))) != ref
    swapped = data.clone()
    swapped[[0, 1], 2] = data[[1, 0], 2]  # the same column sums, other rows
    assert digest(zip(swapped.split(10), mask.split(10))) != ref
    assert digest(zip(data[:-1].split(10), mask[:-1].split(10))) != ref


def test_a_shuffled_stream_resumes_and_another_stream_is_refused(tmp_path):
    """The stream's digest is of its rows whatever the shuffle, so a shuffled loader resumes
    in another RNG state; a stream of other rows of the same size is refused."""
    path = tmp_path / "s.ckpt"
    data = DATA[:200]

    def run(x, stop_at=None, seed=0):
        pyro.clear_param_store()
        model = make_gmm_model(2, "diag", init=init_params(DATA, 2, "diag", seed=1))
        torch.manual_seed(seed)  # the shuffle of the validation pass differs per seed

        def callback(it, info):
            if it == stop_at:
                raise KeyboardInterrupt

        loader = DataLoader(TensorDataset(x), batch_size=32, shuffle=True)
        return fit(
            model, ExactEStep(model), loader, max_iter=6, tol=0,
            checkpoint=path, checkpoint_every=2, callback=callback,
        )  # fmt: skip

    cut = run(data, stop_at=3, seed=1)
    assert cut.interrupted
    resumed = run(data, seed=2)
    assert resumed.n_iter == 6 and not resumed.interrupted
    with pytest.raises(ValueError, match="written by a different fit.*data_digest"):
        run(DATA[200:].repeat(2, 1), seed=2)


def test_an_em_checkpoint_resumed_with_another_algorithm_is_refused(tmp_path):
    path = tmp_path / "em.ckpt"
    gmm_fit(path, max_iter=3)
    for optim in (pyro.optim.Adam({"lr": 0.01}), EMOptim(pyro.optim.SGD({"lr": 0.01}))):
        with pytest.raises(ValueError, match=r"written by a different fit \(algorithm"):
            gmm_fit(path, max_iter=3, optim=optim)
    eg = tmp_path / "eg.ckpt"
    gmm_fit(eg, max_iter=3, optim=pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(ValueError, match="written by a different fit.*GradientMStep"):
        gmm_fit(eg, max_iter=3)  # EMOptim
    # SVI on an EM checkpoint: the same message, not a KeyError on the optimizer state
    pyro.clear_param_store()
    model = make_gmm_model(3, "full", init=init_params(DATA, 3, "full", seed=1))
    with pytest.raises(ValueError, match="written by a different fit.*SVI"):
        fit(model, lambda x: None, DATA, max_iter=2, checkpoint=path)


# ------------------------------------------------------------------ unwritable paths
def _counting_fit(path):
    """A fit whose model counts its calls: 0 means nothing ran, not even the input checks."""
    calls = {"model": 0, "iterations": 0}
    pyro.clear_param_store()
    gmm = make_gmm_model(2, "diag")

    def model(x):
        calls["model"] += 1
        gmm(x)

    def callback(it, info):
        calls["iterations"] += 1

    try:
        fit(model, ExactEStep(model), DATA, max_iter=3, checkpoint=path, callback=callback)
    finally:
        assert calls == {"model": 0, "iterations": 0}


def test_an_unwritable_checkpoint_path_is_an_error_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="cannot be written.*writable directory"):
        _counting_fit(blocker / "sub" / "x.ckpt")  # its directory cannot be made
    with pytest.raises(IsADirectoryError, match="is a directory"):
        _counting_fit(tmp_path)
    if os.geteuid() != 0:  # (root writes into read-only directories)
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="cannot be written"):
                _counting_fit(locked / "x.ckpt")
        finally:
            locked.chmod(0o700)
    # a missing directory that can be made is made, before the work, and nothing is left
    # behind there but the checkpoint itself
    nested = tmp_path / "new" / "dir" / "x.ckpt"
    gmm_fit(nested, max_iter=2)
    assert sorted(p.name for p in nested.parent.iterdir()) == ["x.ckpt"]


def test_no_digest_is_computed_without_a_checkpoint(monkeypatch, tmp_path):
    fit_module = sys.modules["pyro_emvae.fit"]  # (the package's `fit` is the function)

    def fail(*a, **k):
        raise AssertionError("digest computed without a checkpoint")

    monkeypatch.setattr(fit_module, "data_digest", fail)
    monkeypatch.setattr(fit_module, "StreamDigest", fail)
    gmm_fit(max_iter=2)
    pyro.clear_param_store()
    model = make_gmm_model(2, "diag")
    loader = DataLoader(TensorDataset(DATA), batch_size=100)
    fit(model, ExactEStep(model), loader, max_iter=2, tol=0)
    pyro.clear_param_store()
    fit(model, ExactEStep(model), loader, optim=OnlineEM(), max_iter=1, tol=0)
    # (and the patch is where fit looks: with a checkpoint it is called)
    with pytest.raises(AssertionError, match="digest computed"):
        gmm_fit(tmp_path / "c.ckpt", max_iter=2)
