"""Checkpoint and resume: a fit cut short and resumed from its checkpoint (fresh param store,
fresh guide and optimizer: as in a new process) ends exactly as the uninterrupted fit, for EM,
ECM with Adam state, SVI with an encoder and a KL schedule, and restarts; writes are atomic."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from models.gmm import init_params, make_gmm_model, sample_gmm
from pyro_emvae import AmortizedGuide, EMOptim, ExactEStep, fit, linear_warmup

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
    state = torch.load(tmp_path / "ecm.ckpt", weights_only=False)
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
    before = torch.load(path, weights_only=False)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save({"half": "written"}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        gmm_fit(path, max_iter=9, every=3)
    monkeypatch.setattr(torch, "save", real_save)
    after = torch.load(path, weights_only=False)
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
