"""What ``fit`` and ``score`` take, and what they count.

* Inputs: numpy arrays and pandas DataFrames are converted to tensors (the fit equals the fit
  on the tensor); lists, ragged sequences, empty data and torch optimizers are errors that say
  what to pass instead.
* Counting the data (``n_data``: per-datum values, ``tol``, BIC): only observed values that
  are data count, the unmasked time steps of an HMM in either model form, not ``pyro.factor``
  terms nor latents fixed by ``poutine.condition``; ``score`` averages over the same unit.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from pyro_emvae import ExactEStep, ModelInputError, fit, score
from pyro_emvae.validate import count_observed, model_inputs

PAR = {"enumerate": "parallel"}


def gmm(data):
    """A 2-component diagonal GMM over rows of 2 features."""
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    scales = pyro.param("scales", torch.ones(2, 2), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
        pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=data)


def _data(n: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat(
        [torch.randn(n // 2, 2, generator=g) - 2, torch.randn(n // 2, 2, generator=g) + 2]
    )


def _no_mstep(guide, posterior, args, kwargs) -> dict:
    """An M-step that keeps the params: log p(x) and BIC at the initial params."""
    return {}


# ---------------------------------------------------------------------------- 15. inputs
def test_numpy_and_dataframe_data_fit_as_the_tensor() -> None:
    pd = pytest.importorskip("pandas")
    x = _data()
    reference = fit(gmm, ExactEStep(gmm), x, max_iter=5, tol=0)
    for data in (x.numpy(), pd.DataFrame(x.numpy(), columns=["a", "b"])):
        pyro.clear_param_store()
        result = fit(gmm, ExactEStep(gmm), data, max_iter=5, tol=0)
        assert result.history["log_likelihood"] == reference.history["log_likelihood"]
        assert result.n_data == 20


def test_numpy_floats_take_the_default_dtype_of_the_params() -> None:
    """With torch's default float32 (the params are float32), float64 numpy data is converted to
    float32: float64 data beside float32 params would fail in the E-step's contraction."""
    torch.set_default_dtype(torch.float32)  # (conftest restores float64)
    x = _data().numpy()  # float64
    result = fit(gmm, ExactEStep(gmm), x, max_iter=3, tol=0)
    assert result.params["locs"].dtype == torch.float32
    (t, labels), _ = model_inputs((x, np.arange(3)), {})
    assert t.dtype == torch.float32 and labels.dtype == torch.int64
    assert np.array_equal(t.numpy(), x.astype(np.float32))


def test_a_list_as_data_says_to_pass_a_tensor() -> None:
    with pytest.raises(ModelInputError) as info:
        fit(gmm, ExactEStep(gmm), _data().tolist(), max_iter=2)
    message = str(info.value)
    for fragment in [
        "observed site 'x' (Independent(Normal))",
        "list of 20 lists (data argument 0)",
        "not a tensor",
        "torch.as_tensor(x, dtype=torch.float64)",
    ]:
        assert fragment in message, (fragment, message)


def test_a_list_the_model_cannot_read_is_named() -> None:
    """A model that fails on the list itself (``data.shape``) gets the same advice."""

    def model(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=data)

    with pytest.raises(ModelInputError, match=r"data argument 0, a list of 3 floats \(Attr"):
        fit(model, ExactEStep(model), [0.0, 1.0, 2.0], max_iter=2)


def test_ragged_sequences_get_padding_and_masks_as_advice() -> None:
    def model(seqs):
        with pyro.plate("seqs", len(seqs)):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=seqs)

    ragged = [[0.0, 1.0, 2.0], [0.5], [1.0, 2.0]]
    with pytest.raises(ModelInputError, match=r"different lengths.*pad_sequence.*mask"):
        fit(model, ExactEStep(model), ragged, max_iter=2)
    ragged_array = np.empty(3, dtype=object)
    ragged_array[:] = [np.zeros(3), np.zeros(1), np.zeros(2)]
    with pytest.raises(ModelInputError, match=r"numpy.ndarray of shape \(3,\).*pad_sequence"):
        fit(model, ExactEStep(model), ragged_array, max_iter=2)


def test_non_numeric_dataframe_columns_are_named() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1.0, 2.0], "kind": ["x", "y"]})
    with pytest.raises(ModelInputError, match=r"non-numeric values \(columns \['kind'\]\)"):
        fit(gmm, ExactEStep(gmm), frame, max_iter=2)


def test_empty_data_is_an_input_error() -> None:
    """N = 0: a plate of size 0 (Pyro's ZeroDivisionError) or an empty observed value."""
    with pytest.raises(
        ModelInputError,
        match=r"pyro.plate 'data' has size 0: the data is empty \(data argument 0 has shape "
        r"\(0, 2\)\)",
    ):
        fit(gmm, ExactEStep(gmm), torch.zeros(0, 2), max_iter=2)

    def no_plate(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.0).expand([len(x)]).to_event(1), obs=x)

    with pytest.raises(ModelInputError, match=r"observed site 'x' .* empty value \(shape \(0,\)"):
        fit(no_plate, ExactEStep(no_plate), torch.zeros(0), max_iter=2)


@pytest.mark.parametrize(
    "optim, fragment",
    [
        (torch.optim.Adam, "optim=Adam is a torch.optim optimizer class"),
        (
            torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
            "optim=Adam is a torch.optim optimizer instance",
        ),
        (pyro.optim.Adam, "optim=pyro.optim.Adam is the optimizer's constructor"),
        (pyro.optim.PyroOptim, "optim=PyroOptim is a class"),
    ],
)
def test_a_torch_optimizer_says_to_pass_a_pyro_one(optim, fragment) -> None:
    with pytest.raises(TypeError) as info:
        fit(gmm, ExactEStep(gmm), _data(), optim=optim, max_iter=2)
    message = str(info.value)
    assert fragment in message, message
    assert "pyro.optim.Adam({'lr': 0.01})" in message or "PyroOptim(torch.optim.Adam" in message


def test_a_torch_optimizer_for_an_svi_guide_too() -> None:
    from pyro.infer.autoguide import AutoNormal

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(TypeError, match=r"pass optim=pyro.optim.SGD\(\{'lr': 0.01\}\)"):
        fit(model, AutoNormal(model), torch.randn(5), optim=torch.optim.SGD, max_iter=2)


# ---------------------------------------------------------------------------- 14. n_data
LENGTHS = torch.tensor([12, 8, 5])
T, K = 12, 2


def _ragged() -> tuple[torch.Tensor, torch.Tensor]:
    """3 sequences of lengths 12, 8, 5, padded to 12 with a finite value; the mask (N, T)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, T, generator=g) + 2.0 * (torch.rand(3, T, generator=g) > 0.5)
    mask = torch.arange(T) < LENGTHS[:, None]
    return x.masked_fill(~mask, 0.0), mask


def _hmm_params():
    start = pyro.param("start", torch.tensor([0.6, 0.4]), constraint=constraints.simplex)
    trans = pyro.param(
        "trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex
    )
    locs = pyro.param("locs", torch.tensor([0.0, 2.0]))
    scales = pyro.param("scales", torch.ones(2), constraint=constraints.positive)
    return start, trans, locs, scales


def hmm_discrete(x, mask):
    """The DiscreteHMM form: the padding masked by .mask() on the observation_dist."""
    start, trans, locs, scales = _hmm_params()
    logits = torch.cat([start.log().expand(1, K, K), trans.log().expand(T - 1, K, K)])
    obs = dist.Normal(locs, scales).mask(mask[..., None])  # batch (N, T, K)
    with pyro.plate("seqs", len(x)):
        pyro.sample("x", dist.DiscreteHMM(torch.zeros(K), logits, obs), obs=x)


def hmm_markov(x, mask):
    """The pyro.markov form: the padded emissions under poutine.mask (the chain runs on, its
    transitions summing to one, as in the DiscreteHMM form)."""
    start, trans, locs, scales = _hmm_params()
    with pyro.plate("seqs", len(x)):
        z = None
        for t in pyro.markov(range(T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]), infer=PAR)
            with poutine.mask(mask=mask[:, t]):
                pyro.sample(f"x_{t}", dist.Normal(locs[z], scales[z]), obs=x[:, t])


def test_both_hmm_forms_count_the_unmasked_steps_and_agree_on_bic() -> None:
    """25 unpadded steps in both forms (the DiscreteHMM form counted all 36 before), so BIC,
    per-datum values and tol agree between the two forms of one model."""
    x, mask = _ragged()
    results = {}
    for name, model in [("discrete", hmm_discrete), ("markov", hmm_markov)]:
        pyro.clear_param_store()
        results[name] = fit(model, ExactEStep(model), x, mask, optim=_no_mstep, max_iter=1, tol=0)
    a, b = results["discrete"], results["markov"]
    assert a.n_data == b.n_data == int(LENGTHS.sum()) == 25
    assert a.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-10)
    assert a.n_parameters() == b.n_parameters() == 1 + 2 + 2 + 2
    assert a.bic() == pytest.approx(b.bic(), abs=1e-9)
    assert a.bic() == pytest.approx(-2 * a.log_likelihood + 7 * math.log(25), abs=1e-9)
    assert a.per_datum() == pytest.approx(b.per_datum(), abs=1e-12)
    # score is per observed value too: the training data's score is per_datum()
    for name, model in [("discrete", hmm_discrete), ("markov", hmm_markov)]:
        s = score(model, ExactEStep(model), x, mask)
        assert s == pytest.approx(results[name].per_datum(), abs=1e-12)
        rows = score(model, ExactEStep(model), x, mask, per="row")
        assert rows == pytest.approx(results[name].log_likelihood / 3, abs=1e-10)


def test_a_factor_is_not_data() -> None:
    """pyro.factor terms (a prior on the params, a per-datum penalty) change log p but are not
    observed values: n_data is the 20 rows (it was 41)."""

    def model(data):
        weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        pyro.factor("prior", dist.Normal(0.0, 10.0).log_prob(locs).sum())
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer=PAR)
            pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=data)
            pyro.factor("penalty", -0.01 * data.pow(2).sum(-1))

    x = _data()
    assert count_observed(model, (x,)) == 20
    result = fit(model, ExactEStep(model), x, optim=_no_mstep, max_iter=1, tol=0)
    assert result.n_data == 20


def test_a_latent_fixed_by_condition_is_not_data() -> None:
    """Labels fixed with poutine.condition make 'z' observed, but it is a latent given a value,
    not data: n_data counts the 20 rows of x (it was 40); a site the model gives obs= counts."""
    x = _data()
    labels = (torch.arange(20) >= 10).long()
    conditioned = poutine.condition(gmm, data={"z": labels})
    assert count_observed(conditioned, (x,)) == 20
    result = fit(conditioned, ExactEStep(conditioned), x, optim=_no_mstep, max_iter=1, tol=0)
    assert result.n_data == 20

    def labelled(data, y):  # the labels as data: obs= in the model
        weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), obs=y)
            pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=data)

    assert count_observed(labelled, (x, labels)) == 40
    # and n_data= still overrides the count
    pyro.clear_param_store()
    result = fit(
        labelled, ExactEStep(labelled), x, labels, n_data=20, optim=_no_mstep, max_iter=1, tol=0
    )
    assert result.n_data == 20


def test_score_per_value_and_per_row() -> None:
    """For a mixture (one observed site per row) the two units agree; score takes numpy."""
    x = _data()
    result = fit(gmm, ExactEStep(gmm), x, max_iter=3, tol=0)
    guide = ExactEStep(gmm)
    assert score(gmm, guide, x) == pytest.approx(result.per_datum(), rel=1e-12)
    assert score(gmm, guide, x.numpy(), per="row") == pytest.approx(result.per_datum(), rel=1e-12)
    with pytest.raises(ValueError, match="per must be 'value' or 'row'"):
        score(gmm, guide, x, per="sequence")
