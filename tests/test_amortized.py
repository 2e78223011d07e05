"""AmortizedGuide and MeanFieldGuide: structure read from the model, subsampling, families,
constrained latents, globals, errors; and the headline check: a linear VAE reaches the
closed-form PPCA maximum likelihood."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from models.ppca import (
    init_params,
    ppca_log_likelihood,
    ppca_mle,
    ppca_model,
    principal_angles,
    sample_ppca,
)
from pyro_emvae import AmortizedGuide, MeanFieldGuide, fit, log_marginal


def vae_model(x, batch_size=None, decoder=None):
    decoder = decoder or torch.nn.Linear(2, x.shape[-1])
    pyro.module("decoder", decoder)
    with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x[idx])


DECODER = torch.nn.Linear(2, 4)


def fixed_decoder_model(x, batch_size=None):
    vae_model(x, batch_size, DECODER.double())


def test_guide_and_model_use_the_same_minibatch_rows():
    x = torch.randn(30, 4)
    seen = []

    def model(x):
        DECODER.double()
        pyro.module("decoder", DECODER)
        with pyro.plate("data", len(x), subsample_size=7) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            seen.append(idx)
            pyro.sample("x", dist.Normal(DECODER(z), 1.0).to_event(1), obs=x[idx])

    guide = AmortizedGuide(model, hidden=(8,))
    guide.setup(x)
    seen.clear()
    guide_tr = poutine.trace(guide).get_trace(x)
    poutine.replay(model, trace=guide_tr)(x)
    idx = guide_tr.nodes["data"]["value"]
    assert torch.equal(seen[-1], idx)
    # the encoder read exactly those rows: its loc equals the encoder applied to x[idx]
    loc = guide.encoder(x[idx])["z"]["loc"]
    assert torch.allclose(guide_tr.nodes["z"]["fn"].base_dist.loc, loc)


def test_inputs_are_found_in_any_argument_and_dim():
    # the data is the second argument, stored (D, N): the plate runs over dim 1
    decoder = torch.nn.Linear(2, 3).double()

    def model(scale, xt):
        pyro.module("decoder", decoder)
        with pyro.plate("data", xt.shape[1], subsample_size=5) as idx:
            z = pyro.sample("z", dist.Normal(0.0, scale).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=xt[:, idx].T)

    xt = torch.randn(3, 20)
    guide = AmortizedGuide(model, hidden=())
    tr = poutine.trace(guide).get_trace(1.0, xt)
    idx = tr.nodes["data"]["value"]
    assert guide.groups[0]["inputs"].located == [(1, 1, None)]
    assert torch.allclose(
        tr.nodes["z"]["fn"].base_dist.loc, guide.encoder(xt[:, idx].T)["z"]["loc"]
    )


def test_unlocatable_data_asks_for_inputs():
    x = torch.randn(10, 4)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x * 2 + 1)

    with pytest.raises(ValueError, match=r"observed site 'x'.*inputs="):
        AmortizedGuide(model, hidden=()).setup(x)
    # a user-given input works
    guide = AmortizedGuide(model, hidden=(), inputs=lambda x: x * 2 + 1)
    assert guide(x)["z"].shape == (10, 2)
    with pytest.raises(ValueError, match="one row per datum"):
        AmortizedGuide(model, inputs=lambda x: x[:3]).setup(x)


def test_user_encoder_trunk_sees_image_shaped_data():
    x = torch.rand(12, 3, 5)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            loc = z.sum(-1)[..., None, None].expand(*z.shape[:-1], 3, 5)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(2), obs=x[idx])

    shapes = []

    class Trunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(15, 6)

        def forward(self, img):
            shapes.append(tuple(img.shape))
            return torch.tanh(self.lin(img.flatten(1)))

    guide = AmortizedGuide(model, encoder=Trunk())
    assert guide(x)["z"].shape == (4, 2)
    assert shapes[-1] == (4, 3, 5)
    assert guide.encoder.heads["z"].loc.in_features == 6


@pytest.mark.parametrize("family", ["diagonal", "lowrank", "full"])
def test_families_give_the_documented_q(family):
    x = torch.randn(9, 4)
    guide = AmortizedGuide(fixed_decoder_model, hidden=(5,), family=family, rank=2)
    tr = poutine.trace(guide).get_trace(x)
    out = guide.encoder(x)["z"]
    z = tr.nodes["z"]["value"]
    if family == "diagonal":
        expected = dist.Normal(out["loc"], out["scale"]).to_event(1).log_prob(z)
    elif family == "lowrank":
        expected = dist.LowRankMultivariateNormal(out["loc"], out["factor"], out["scale"] ** 2)
        assert out["factor"].shape == (9, 2, 2)
        expected = expected.log_prob(z)
    else:
        tril = out["scale_tril"]
        assert torch.equal(tril, tril.tril()) and (tril.diagonal(dim1=-2, dim2=-1) > 0).all()
        expected = dist.MultivariateNormal(out["loc"], scale_tril=tril).log_prob(z)
    assert torch.allclose(tr.nodes["z"]["fn"].log_prob(z), expected)
    assert tr.nodes["z"]["fn"].has_rsample


def test_initial_scale_is_the_same_for_every_datum():
    guide = AmortizedGuide(fixed_decoder_model, hidden=(5,), init_scale=0.3)
    out = guide.local_params(torch.randn(6, 4))["z"]
    assert torch.allclose(out["scale"], torch.full((6, 2), 0.3 + 1e-6))


def test_constrained_latent_goes_through_its_bijection():
    x = torch.rand(8, 1) + 0.5

    def model(x):
        with pyro.plate("data", len(x)):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s.unsqueeze(-1)).to_event(1), obs=x)

    guide = AmortizedGuide(model, hidden=(4,))
    tr = poutine.trace(guide).get_trace(x)
    s = tr.nodes["s"]["value"]
    assert (s > 0).all() and s.shape == (8,)
    out = guide.encoder(x)["s"]
    expected = dist.LogNormal(out["loc"][:, 0], out["scale"][:, 0]).log_prob(s)
    assert torch.allclose(tr.nodes["s"]["fn"].log_prob(s), expected)


def test_inner_plate_latents_are_laid_out_like_the_model():
    x = torch.randn(6, 5)

    def model(x):
        with (
            pyro.plate("time", 5, dim=-1),
            pyro.plate("data", len(x), subsample_size=4, dim=-2) as idx,
        ):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    guide = AmortizedGuide(model, hidden=(8,))
    tr = poutine.trace(guide).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (4, 5)
    assert guide.local[0]["n"] == 5
    idx = tr.nodes["data"]["value"]
    out = guide.encoder(x[idx])["z"]
    assert torch.allclose(tr.nodes["z"]["fn"].mean, out["loc"])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    with pytest.raises(ValueError, match="family='diagonal'"):
        AmortizedGuide(model, family="full").setup(x)


def test_discrete_site_must_be_enumerated():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"site 'c' is a discrete latent.*enumerate"):
        AmortizedGuide(model).setup(torch.randn(5))


def mixture_model(x):
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]))
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=6) as idx:
        c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(locs[c], 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift.unsqueeze(-1), 0.5).to_event(1), obs=x[idx])


@pytest.mark.parametrize("kind, cls", [("delta", AutoDelta), ("normal", AutoNormal)])
def test_globals_get_a_non_amortized_guide_and_discrete_sites_are_left_to_the_elbo(kind, cls):
    x = torch.randn(20, 2)
    guide = AmortizedGuide(mixture_model, hidden=(8,), global_guide=kind)
    tr = poutine.trace(guide).get_trace(x)
    assert isinstance(guide.global_guide, cls)
    assert guide.global_names == ["shift"]
    assert [s["name"] for s in guide.local] == ["z"]
    assert "c" not in tr.nodes  # summed out by TraceEnum_ELBO
    svi = SVI(mixture_model, guide, pyro.optim.Adam({"lr": 0.05}), TraceEnum_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert any(k.startswith("encoder_globals") for k in pyro.get_param_store())
    assert any(k.startswith("encoder$$$") for k in pyro.get_param_store())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="family"):
        AmortizedGuide(vae_model, family="banded")
    with pytest.raises(ValueError, match="global_guide"):
        AmortizedGuide(vae_model, global_guide="laplace")
    with pytest.raises(ValueError, match="init_scale"):
        AmortizedGuide(vae_model, init_scale=0.0)
    with pytest.raises(ValueError, match="data_plate"):
        AmortizedGuide(fixed_decoder_model, data_plate="rows").setup(torch.randn(4, 4))


def test_mean_field_guide_keeps_subsampling_and_hides_enumerated_sites():
    x = torch.randn(20, 2)
    guide = MeanFieldGuide(mixture_model)
    # plain SGD: Adam's momentum would keep moving rows of earlier minibatches
    svi = SVI(mixture_model, guide, pyro.optim.SGD({"lr": 0.01}), TraceEnum_ELBO())
    svi.step(x)
    store = pyro.get_param_store()
    assert store["MeanFieldGuide.locs.z"].shape == (20, 2)  # one q per datum
    assert "MeanFieldGuide.locs.c" not in store
    before = store["MeanFieldGuide.locs.z"].detach().clone()
    tr = poutine.trace(guide).get_trace(x)
    idx = tr.nodes["data"]["value"]
    assert len(idx) == 6  # the model's subsample size, not the whole plate
    pyro.set_rng_seed(3)
    guide_tr = poutine.trace(guide).get_trace(x)
    pyro.set_rng_seed(3)
    svi.step(x)
    moved = (store["MeanFieldGuide.locs.z"].detach() != before).any(-1)
    # only the rows in the minibatch moved
    rows = guide_tr.nodes["data"]["value"].sort().values
    assert torch.equal(moved.nonzero().flatten(), rows)


def test_linear_vae_reaches_the_ppca_maximum_likelihood():
    """Lucas et al. (2019): a linear VAE with a diagonal Gaussian encoder has the PPCA maximum
    likelihood as its ELBO optimum; Tipping & Bishop give it in closed form."""
    pyro.set_rng_seed(0)
    x, _ = sample_ppca(300, d=5, q=2, sigma=0.5, seed=1)
    mle = ppca_mle(x, 2)
    best = float(ppca_log_likelihood(x, **mle).mean())
    init_params(x, 2)
    guide = AmortizedGuide(ppca_model, hidden=(), init_scale=0.5)
    steps, flat = 3000, 2100
    gamma = 0.001 ** (1 / (steps - flat))
    optim = pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": 0.05},
            "lr_lambda": lambda s: 1.0 if s < flat else gamma ** (s - flat),
        }
    )
    loss = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    result = fit(
        ppca_model,
        guide,
        x,
        2,
        optim=optim,
        loss=loss,
        max_iter=steps,
        tol=0,
        callback=lambda it, info: optim.step(),
    )
    store = pyro.get_param_store()
    W, mu, sigma = (store[k].detach() for k in ("W", "mu", "sigma"))
    reached = float(ppca_log_likelihood(x, W, mu, sigma).mean())
    assert best - 1e-3 < reached <= best + 1e-12
    assert principal_angles(W, mle["W"]).max() < 0.01
    # the ELBO is below log p(x), and close to it (the diagonal q can be exact here)
    assert result.elbo / 300 < reached + 0.01
    assert result.elbo / 300 > reached - 0.01


def test_a_loaded_param_store_is_what_the_encoder_uses(tmp_path):
    x = torch.randn(10, 4)
    guide = AmortizedGuide(fixed_decoder_model, hidden=(5,))
    guide(x)
    expected = guide.local_params(x)["z"]["loc"]
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    fresh = AmortizedGuide(fixed_decoder_model, hidden=(5,))  # other random weights
    pyro.get_param_store().load(tmp_path / "store.pt")
    fresh(x)
    assert torch.equal(fresh.local_params(x)["z"]["loc"], expected)


def two_plate_model(xa, xb):
    with pyro.plate("a", len(xa), subsample_size=4) as ia:
        za = pyro.sample("za", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("xa", dist.Normal(za.sum(-1, keepdim=True), 1.0).to_event(1), obs=xa[ia])
    with pyro.plate("b", len(xb)):
        zb = pyro.sample("zb", dist.Normal(0.0, 1.0))
        pyro.sample("xb", dist.Normal(zb.unsqueeze(-1), 1.0).to_event(1), obs=xb)


def test_each_data_plate_gets_its_own_encoder():
    xa, xb = torch.randn(10, 1), torch.randn(6, 3)
    guide = AmortizedGuide(two_plate_model, hidden=(4,))
    tr = poutine.trace(guide).get_trace(xa, xb)
    assert sorted(guide.encoders) == ["a", "b"]
    assert guide.encoders["a"].trunk[1].in_features == 1  # reads xa
    assert guide.encoders["b"].trunk[1].in_features == 3  # reads xb
    assert tr.nodes["za"]["value"].shape == (4, 2) and tr.nodes["zb"]["value"].shape == (6,)
    with pytest.raises(RuntimeError, match="one encoder per data plate"):
        _ = guide.encoder
    svi = SVI(two_plate_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(xa, xb))
    assert {"encoder_a$$$heads.za.loc.weight", "encoder_b$$$heads.zb.loc.weight"} <= set(
        pyro.get_param_store()
    )
    # data of other sizes: the plates follow the arguments
    params = guide.local_params(torch.randn(7, 1), torch.randn(2, 3))
    assert params["za"]["loc"].shape == (7, 2) and params["zb"]["loc"].shape == (2, 1)
    tr = poutine.trace(guide).get_trace(torch.randn(30, 1), torch.randn(9, 3))
    assert tr.nodes["a"]["fn"].size == 30  # 4 of 30 rows
    assert tr.nodes["za"]["value"].shape == (4, 2) and tr.nodes["zb"]["value"].shape == (9,)


# ---------------------------------------------------------------------------- dtypes
@pytest.fixture
def float32_default():
    """torch's default dtype float32 for one test (conftest runs tests in float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _linear_vae(decoder, sigma=0.5):
    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            # a prior in the decoder's dtype, so that the model runs on its own prior draws
            loc = torch.zeros((), dtype=decoder.weight.dtype)
            z = pyro.sample("z", dist.Normal(loc, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), sigma).to_event(1), obs=x)

    return model


def _float64_data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(40, 2, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64
    )


def test_the_encoder_takes_the_models_dtype_under_a_float32_default(float32_default):
    """float64 data and decoder, float32 default: the encoder, its heads and q's draws are
    float64 (a float32 encoder fed the decoder a float32 draw: a dtype error in F.linear)."""
    assert torch.get_default_dtype() == torch.float32
    x = _float64_data()
    decoder = torch.nn.Linear(2, 3).double()
    model = _linear_vae(decoder)
    guide = AmortizedGuide(model, hidden=(8,))
    fit(model, guide, x, optim=pyro.optim.Adam({"lr": 0.01}), max_iter=5, tol=0)
    params = dict(pyro.get_param_store().items())
    assert {k for k in params if k.startswith("encoder$$$heads.z")}  # heads in the store
    assert all(v.dtype == torch.float64 for v in params.values()), {
        k: v.dtype for k, v in params.items()
    }
    assert guide(x)["z"].dtype == torch.float64
    est = log_marginal(model, guide, x, num_samples=200)
    assert est.per_datum.dtype == torch.float64 and est.per_datum.shape == (40,)
    # a linear-Gaussian model: p(x_i) = N(b, W W^T + sigma^2 I), which IWAE bounds from below
    w, b = decoder.weight.detach(), decoder.bias.detach()
    exact = dist.MultivariateNormal(b, w @ w.T + 0.25 * torch.eye(3, dtype=w.dtype)).log_prob(x)
    assert (est.per_datum <= exact + 4 * est.stderr + 1e-9).all()
    assert float((exact - est.per_datum).mean()) < 1.0


def test_a_float32_model_keeps_a_float32_encoder_on_float64_data(float32_default):
    """The decoder's dtype wins over the data's: float64 rows into a float32 VAE (data read
    from NumPy, say) still give float32 draws, which the float32 decoder takes."""
    x = _float64_data()
    decoder = torch.nn.Linear(2, 3)
    assert decoder.weight.dtype == torch.float32
    model = _linear_vae(decoder)
    guide = AmortizedGuide(model, hidden=(8,))
    fit(model, guide, x, optim=pyro.optim.Adam({"lr": 0.01}), max_iter=3, tol=0)
    assert all(p.dtype == torch.float32 for p in guide.encoder.parameters())
    assert guide(x)["z"].dtype == torch.float32
    assert torch.isfinite(log_marginal(model, guide, x, num_samples=20).per_datum).all()


def test_without_params_the_encoder_takes_the_datas_dtype(float32_default):
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(30, dtype=torch.float64)
    guide = AmortizedGuide(model, hidden=(4,))
    fit(model, guide, x, optim=pyro.optim.Adam({"lr": 0.01}), max_iter=3, tol=0)
    assert all(p.dtype == torch.float64 for p in guide.encoder.parameters())
    # exact here: p(x_i) = N(0, 2), and IWAE bounds it from below
    est = log_marginal(model, guide, x, num_samples=200)
    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x)
    assert est.per_datum.dtype == torch.float64
    assert (est.per_datum <= exact + 4 * est.stderr + 1e-9).all()
