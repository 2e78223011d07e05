"""Tests of :mod:`pyro_emvae.track`, the provenance tracker behind EMOptim's closed-form M-steps.

Expected ids are computed independently: every selection op is applied, with plain torch, to
``offset + torch.arange(numel)`` of each param, and the expected values by the same op on the
plain param values. The probe is checked on the model zoo (``models.gmm``, ``models.hmm``):
which params reach which distribution argument, in which form.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_emvae import track
from pyro_emvae.track import IdSpace, Tracked, probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.gmm import COVARIANCE_TYPES, gmm_model, init_params, sample_gmm
from models.hmm import (
    categorical_hmm,
    categorical_hmm_markov,
    gaussian_hmm,
    gaussian_hmm_markov,
    sample_categorical_hmm,
    sample_gaussian_hmm,
)

PAR = {"enumerate": "parallel"}
K, D = 3, 4


# ---------------------------------------------------------------------------- helpers
def _tracked(**values: torch.Tensor) -> tuple[IdSpace, dict[str, Tracked]]:
    """Tracked copies of ``values`` made the way the probe makes them: ``pyro.param`` under an
    :class:`IdSpace`, so each param gets its own id range and ``param_names``."""
    space = IdSpace()
    out = {}
    with space:
        for name, v in values.items():
            out[name] = pyro.param(name, v.clone())
    return space, out


def _ref_ids(space: IdSpace, name: str) -> torch.Tensor:
    shape = space.shapes[name]
    return space.offsets[name] + torch.arange(shape.numel()).reshape(shape)


def _plain(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def _check(result, ids, values, param_names: set[str] | None = None) -> None:
    """``result`` is Tracked with exactly ``ids`` and ``values`` (recursing into tuples)."""
    if isinstance(result, (tuple, list)):
        assert isinstance(ids, (tuple, list)) and len(result) == len(ids) == len(values)
        for r, i, v in zip(result, ids, values):
            _check(r, i, v, param_names)
        return
    assert isinstance(result, Tracked), type(result)
    assert result.ids.dtype == torch.long
    assert result.ids.shape == result.shape == ids.shape
    assert torch.equal(result.ids, ids)
    assert torch.equal(_plain(result), values)
    if param_names is not None:
        assert set(result.param_names) == param_names


Z2 = torch.arange(K).reshape(K, 1)  # an enumerated latent's value at dim -2
Z3 = torch.tensor([2, 0, 1]).reshape(3, 1, 1)  # at dim -3 (a second enumerated site)
Z_DATA = torch.tensor([[0, 2, 2, 1, 0]])  # (1, N): a sampled latent in a plate

SINGLE_OPS = {
    "index_z_K1": lambda p: p[Z2],
    "index_z_311": lambda p: p[Z3],
    "index_z_data": lambda p: p[Z_DATA],
    "expand": lambda p: p.expand(2, K, D),
    "unsqueeze_expand": lambda p: p.unsqueeze(0).expand(5, K, D),
    "index_then_expand": lambda p: p[Z2].expand(K, 6, D),
    "reshape": lambda p: p.reshape(D, K),
    "reshape_flat": lambda p: p.reshape(-1),
    "view": lambda p: p.view(K * D),
    "T": lambda p: p.T,
    "mT": lambda p: p.mT,
    "transpose": lambda p: p.transpose(0, 1),
    "transpose_neg": lambda p: p.transpose(-1, -2),
    "permute": lambda p: p.permute(1, 0),
    "column": lambda p: p[:, 1],
    "row_slice": lambda p: p[1:],
    "ellipsis_none": lambda p: p[..., None, :],
    "index_select": lambda p: p.index_select(1, torch.tensor([3, 0, 0])),
    "torch_index_select": lambda p: torch.index_select(p, 0, torch.tensor([2, 2, 1])),
    "unbind": lambda p: p.unbind(0),
    "unbind_last": lambda p: torch.unbind(p, -1),
    "split": lambda p: p.split([1, 3], dim=-1),
    "select": lambda p: p.select(0, 2),
    "narrow": lambda p: p.narrow(1, 1, 2),
    "flatten": lambda p: p.flatten(),
    "movedim": lambda p: p.movedim(0, -1),
    "repeat": lambda p: p.repeat(2, 1),
    "contiguous_clone": lambda p: p.T.contiguous().clone(),
    "broadcast_to": lambda p: torch.broadcast_to(p, (2, K, D)),
}


# ---------------------------------------------------------------------------- ids = selections
@pytest.mark.parametrize("op", list(SINGLE_OPS), ids=list(SINGLE_OPS))
def test_ids_follow_single_param_selection(op):
    value = torch.randn(K, D)
    # a first param shifts P's id range: ids are global, not per param
    space, t = _tracked(other=torch.randn(2), P=value)
    fn = SINGLE_OPS[op]
    assert space.offsets == {"other": 0, "P": 2}
    _check(fn(t["P"]), fn(_ref_ids(space, "P")), fn(value), {"P"})


def test_ids_follow_chained_selections_and_form_is_kept():
    value = torch.rand(K, D) + 0.1
    space, t = _tracked(P=value)
    p = t["P"]
    norm = p / p.sum(-1, keepdim=True)
    out = norm[Z3].expand(3, 5, 1, D).reshape(3, 5, 2, 2)[..., 1, :]
    ref = lambda x: x[Z3].expand(3, 5, 1, D).reshape(3, 5, 2, 2)[..., 1, :]
    _check(out, ref(_ref_ids(space, "P")), ref(value / value.sum(-1, keepdim=True)), {"P"})
    assert out.form == "normalized" and out.param == "P"


@pytest.mark.parametrize(
    "fn", [torch.cat, torch.concat, torch.stack], ids=["cat", "concat", "stack"]
)
def test_cat_of_two_params_keeps_both_id_ranges(fn):
    a, b = torch.randn(2, D), torch.randn(2, D)
    space, t = _tracked(P1=a, P2=b)
    out = fn([t["P1"], t["P2"]])
    _check(out, fn([_ref_ids(space, "P1"), _ref_ids(space, "P2")]), fn([a, b]), {"P1", "P2"})
    assert out.param_names == {"P1", "P2"}
    # and a selection of the concatenation keeps both names and the right ids
    sel = out[..., 1:]
    assert set(sel.param_names) == {"P1", "P2"}
    assert torch.equal(sel.ids, fn([_ref_ids(space, "P1"), _ref_ids(space, "P2")])[..., 1:])


def test_cat_along_last_dim_of_selected_params():
    a, b = torch.randn(K, D), torch.randn(K, 2)
    space, t = _tracked(P1=a, P2=b)
    out = torch.cat([t["P1"][Z2], t["P2"][Z2]], dim=-1)
    ref = torch.cat([_ref_ids(space, "P1")[Z2], _ref_ids(space, "P2")[Z2]], dim=-1)
    _check(out, ref, torch.cat([a[Z2], b[Z2]], dim=-1), {"P1", "P2"})


def test_cat_with_a_plain_tensor_or_mixed_forms_is_not_tracked():
    a, b = torch.rand(2, D), torch.rand(2, D)
    _space, t = _tracked(P1=a, P2=b)
    assert not isinstance(torch.cat([t["P1"], torch.zeros(1, D)]), Tracked)
    assert not isinstance(torch.cat([t["P1"], t["P2"].log()]), Tracked)


def test_broadcast_tensors_of_two_params_each_keeps_its_own_ids():
    a, b = torch.randn(K, D), torch.randn(K, 1)
    space, t = _tracked(P1=a, P2=b)
    r1, r2 = torch.broadcast_tensors(t["P1"][Z3], t["P2"][Z2])
    e1, e2 = torch.broadcast_tensors(_ref_ids(space, "P1")[Z3], _ref_ids(space, "P2")[Z2])
    v1, v2 = torch.broadcast_tensors(a[Z3], b[Z2])
    _check(r1, e1, v1, {"P1"})
    _check(r2, e2, v2, {"P2"})
    assert r1.param == "P1" and r2.param == "P2"
    assert r1.param_names == {"P1"} and r2.param_names == {"P2"}


def test_broadcast_tensors_with_a_plain_tensor():
    a = torch.randn(K, 1)
    space, t = _tracked(P=a)
    x = torch.randn(5)
    r1, r2 = torch.broadcast_tensors(t["P"], x)
    _check(r1, _ref_ids(space, "P").expand(K, 5), a.expand(K, 5), {"P"})
    assert type(r2) is torch.Tensor and torch.equal(r2, x.expand(K, 5))


def test_offsets_and_size():
    space, _t = _tracked(A=torch.randn(2, 3), B=torch.randn(4), C=torch.randn(1))
    assert space.size == 11
    assert space.shapes == {"A": (2, 3), "B": (4,), "C": (1,)}
    assert space.offsets == {"A": 0, "B": 6, "C": 10}  # each param owns a disjoint id range


def test_wrap_docstring_example():
    t = Tracked.wrap(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "locs")
    z = torch.tensor([[1], [0]])
    assert t[z].ids.tolist() == [[[2, 3]], [[0, 1]]]
    assert t.form == "value" and t.param == "locs"


def test_cat_of_wrapped_tensors():
    a = Tracked.wrap(torch.randn(2), "a")
    b = Tracked.wrap(torch.randn(2), "b", ids=torch.arange(2, 4))
    out = torch.cat([a, b])
    assert torch.equal(out.ids, torch.arange(4))


def test_to_dtype_keeps_long_ids():
    space, t = _tracked(P=torch.randn(K, D))
    out = t["P"].to(torch.get_default_dtype())
    assert isinstance(out, Tracked)
    assert out.ids.dtype == torch.long
    assert torch.equal(out.ids, _ref_ids(space, "P"))


def test_shape_is_a_torch_size():
    _space, t = _tracked(P=torch.randn(K, D))
    assert isinstance(t["P"].shape, torch.Size)
    assert isinstance(t["P"].size(), torch.Size)


def test_inspection_ops_do_not_make_a_param_opaque():
    def model():
        p = pyro.param("p", torch.rand(K, D) + 0.1)
        assert p.shape == (K, D) and p.dim() == 2 and p.numel() == K * D and p.size(-1) == D
        assert bool((p > 0).all()) and bool(torch.isfinite(p).all())
        with pyro.plate("d", D):
            pyro.sample("x", dist.Poisson(p[0]), obs=torch.ones(D))

    model()
    _, space = probe(model, (), {}, 1)
    assert space.opaque == set()


# ---------------------------------------------------------------------------- forms
def test_row_normalization_is_normalized_form():
    value = torch.rand(K, D) + 0.1
    space, t = _tracked(P=value)
    p = t["P"]
    out = p / p.sum(-1, keepdim=True)
    _check(out, _ref_ids(space, "P"), value / value.sum(-1, keepdim=True))
    assert out.form == "normalized"
    out2 = torch.div(p, p.sum(dim=-1, keepdim=True))
    assert isinstance(out2, Tracked) and out2.form == "normalized"
    out3 = p / p.sum(1, keepdim=True)  # the last dim by its positive index
    assert isinstance(out3, Tracked) and out3.form == "normalized"


def test_log_and_log_normalization_are_log_form():
    value = torch.rand(K, D) + 0.1
    space, t = _tracked(P=value)
    lg = t["P"].log()
    _check(lg, _ref_ids(space, "P"), value.log())
    assert lg.form == "log"
    out = lg - lg.logsumexp(-1, keepdim=True)
    _check(out, _ref_ids(space, "P"), value.log() - value.log().logsumexp(-1, keepdim=True))
    assert out.form == "log"
    sel = out[Z2]
    assert sel.form == "log" and torch.equal(sel.ids, _ref_ids(space, "P")[Z2])


ARITHMETIC = {
    "mul2": lambda p: p * 2,
    "rmul2": lambda p: 2 * p,
    "add1": lambda p: p + 1,
    "softplus": torch.nn.functional.softplus,
    "exp": lambda p: p.exp(),
    "sqrt": lambda p: p.sqrt(),
    "pow": lambda p: p**2,
    "whole_sum": lambda p: p / p.sum(),
    "sum_no_keepdim": lambda p: p / p.sum(-1).unsqueeze(-1),
    "sum_first_dim": lambda p: p / p.sum(0, keepdim=True),
    "log_of_log": lambda p: p.log().log(),
    "log_of_normalized": lambda p: (p / p.sum(-1, keepdim=True)).log(),
    "other_rows_sum": lambda p: p / (p * 1).sum(-1, keepdim=True),
    "logsumexp_of_value": lambda p: p - p.logsumexp(-1, keepdim=True),
    "matmul": lambda p: p @ torch.ones(D),
}


@pytest.mark.parametrize("op", list(ARITHMETIC), ids=list(ARITHMETIC))
def test_arithmetic_gives_plain_tensor_and_is_opaque_in_probe(op):
    value = torch.rand(K, D) + 1.5
    fn = ARITHMETIC[op]
    space, t = _tracked(P=value)
    out = fn(t["P"])
    assert type(out) is torch.Tensor
    assert torch.allclose(out.double(), fn(value).double())

    def model():
        p = pyro.param("P", value, constraint=constraints.positive)
        fn(p)
        with pyro.plate("d", 2):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(2))

    pyro.clear_param_store()
    _, space = probe(model, (), {}, 1)
    assert space.opaque == {"P"}


def test_selection_outside_probe_does_not_record_opaque():
    space, t = _tracked(P=torch.rand(2))
    assert track._OPAQUE is None
    _ = t["P"] * 2  # no probe running: nothing to record into, and no error
    assert track._OPAQUE is None and space.opaque == set()


# ---------------------------------------------------------------------------- probe on the zoo
def _uses(trace) -> dict[tuple[str, str], tuple[str, frozenset]]:
    """(site, attribute path) -> (form, param names) for every tracked distribution argument."""
    out = {}

    def walk(site, fn, prefix):
        for attr, v in vars(fn).items():
            if isinstance(v, Tracked):
                out[(site, prefix + attr)] = (v.form, frozenset(v.param_names))
            elif isinstance(v, torch.distributions.Distribution):
                walk(site, v, prefix + attr + ".")

    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            walk(name, site["fn"], "")
    return out


GMM_EXPECTED = {
    "diag": {
        ("x", "base_dist.loc"): ("value", {"locs"}),
        ("x", "base_dist.scale"): ("value", {"scales"}),
    },
    "spherical": {
        ("x", "base_dist.loc"): ("value", {"locs"}),
        ("x", "base_dist.scale"): ("value", {"scales"}),
    },
    "full": {
        ("x", "loc"): ("value", {"locs"}),
        ("x", "scale_tril"): ("value", {"scale_tril"}),
        ("x", "_unbroadcasted_scale_tril"): ("value", {"scale_tril"}),
    },
    "tied": {
        ("x", "loc"): ("value", {"locs"}),
        ("x", "scale_tril"): ("value", {"scale_tril"}),
        ("x", "_unbroadcasted_scale_tril"): ("value", {"scale_tril"}),
    },
}


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_probe_gmm(ct):
    N, Kc, Dc = 7, 3, 2
    data, _ = sample_gmm(N, Kc, Dc, seed=0, covariance_type=ct)
    init = init_params(data, Kc, ct, seed=1)
    gmm_model(data, Kc, ct, init=init)
    tr, space = probe(gmm_model, (data, Kc, ct), {}, 1)
    uses = _uses(tr)
    expected = {
        ("z", "probs"): ("normalized", {"weights"}),
        ("z", "_param"): ("normalized", {"weights"}),
        **GMM_EXPECTED[ct],
    }
    assert uses == {k: (f, frozenset(n)) for k, (f, n) in expected.items()}
    assert space.opaque == set()
    scale_name = "scales" if ct in ("diag", "spherical") else "scale_tril"
    assert list(space.offsets) == ["weights", "locs", scale_name]
    # the enumerated layout: z at dim -2 (left of the data plate), so locs[z] is (K, N, D)
    fn = tr.nodes["x"]["fn"]
    loc = fn.base_dist.loc if ct in ("diag", "spherical") else fn.loc
    ref = (space.offsets["locs"] + torch.arange(Kc * Dc).reshape(Kc, Dc)).unsqueeze(1)
    assert torch.equal(loc.ids, ref.expand(Kc, N, Dc))
    assert torch.equal(_plain(loc), init["locs"].unsqueeze(1).expand(Kc, N, Dc))
    if ct == "spherical":  # scales[z].unsqueeze(-1) broadcast over D: one id per component
        ids = fn.base_dist.scale.ids
        assert torch.equal(
            ids, (space.offsets["scales"] + torch.arange(Kc)).reshape(Kc, 1, 1).expand(Kc, N, Dc)
        )
    if ct == "tied":  # the tied matrix is not indexed by z
        ids = fn._unbroadcasted_scale_tril.ids
        assert torch.equal(ids, space.offsets["scale_tril"] + torch.arange(Dc * Dc).reshape(Dc, Dc))


def test_probe_gaussian_hmm_discrete_hmm_form():
    N, T, Kc, Dc = 2, 5, 3, 2
    data, truth = sample_gaussian_hmm(N, T, Kc, Dc, seed=0)
    gaussian_hmm(data, Kc, init=truth)
    tr, space = probe(gaussian_hmm, (data, Kc), {}, 1)
    # (the model's HomogeneousHMM holds log(start) and the (K, K) log(trans) apart; its
    # DiscreteHMM transition_logits, built from them, carry both params' ids as before)
    assert _uses(tr) == {
        ("x", "start_logits"): ("log", frozenset({"start"})),
        ("x", "trans_logits"): ("log", frozenset({"trans"})),
        ("x", "observation_dist.base_dist.loc"): ("value", frozenset({"locs"})),
        ("x", "observation_dist.base_dist.scale"): ("value", frozenset({"scales"})),
    }
    assert space.opaque == set()
    tl = tr.nodes["x"]["fn"].transition_logits
    start_ids = space.offsets["start"] + torch.arange(Kc)
    trans_ids = space.offsets["trans"] + torch.arange(Kc * Kc).reshape(Kc, Kc)
    expected = torch.cat([start_ids.expand(1, Kc, Kc), trans_ids.expand(T - 1, Kc, Kc)])
    assert torch.equal(tl.ids, expected.expand(tl.shape))  # (batched by the plate's expand)
    # the DiscreteHMM's own normalization keeps the log form and the values
    ref = torch.cat(
        [truth["start"].log().expand(1, Kc, Kc), truth["trans"].log().expand(T - 1, Kc, Kc)]
    )
    assert torch.allclose(_plain(tl), ref - ref.logsumexp(-1, keepdim=True), atol=1e-12)
    assert not isinstance(tr.nodes["x"]["fn"].initial_logits, Tracked)


def test_probe_gaussian_hmm_markov_form():
    N, T, Kc, Dc = 2, 4, 2, 2
    data, truth = sample_gaussian_hmm(N, T, Kc, Dc, seed=0)
    gaussian_hmm_markov(data, Kc, init=truth)
    tr, space = probe(gaussian_hmm_markov, (data, Kc), {}, 1)
    uses = _uses(tr)
    expected = {}
    for t in range(T):
        chain = "start" if t == 0 else "trans"
        expected[(f"z_{t}", "probs")] = ("normalized", frozenset({chain}))
        expected[(f"z_{t}", "_param")] = ("normalized", frozenset({chain}))
        expected[(f"x_{t}", "base_dist.loc")] = ("value", frozenset({"locs"}))
        expected[(f"x_{t}", "base_dist.scale")] = ("value", frozenset({"scales"}))
    assert uses == expected
    assert space.opaque == set()
    # z_1's probs are trans[z_0]: row z_0 of trans, z_0 enumerated at dim -2
    probs = tr.nodes["z_1"]["fn"].probs
    rows = space.offsets["trans"] + torch.arange(Kc * Kc).reshape(Kc, Kc)
    assert torch.equal(probs.ids, rows.unsqueeze(1).expand(Kc, N, Kc))


@pytest.mark.parametrize("form", ["discrete_hmm", "markov"])
def test_probe_categorical_hmm(form):
    N, T, Kc, M = 2, 3, 2, 4
    data, truth = sample_categorical_hmm(N, T, Kc, M, seed=0)
    model = categorical_hmm if form == "discrete_hmm" else categorical_hmm_markov
    model(data, Kc, M, init=truth)
    tr, space = probe(model, (data, Kc, M), {}, 1)
    uses = _uses(tr)
    assert space.opaque == set()
    if form == "discrete_hmm":
        assert uses == {  # (HomogeneousHMM: log(start) and log(trans) apart)
            ("x", "start_logits"): ("log", frozenset({"start"})),
            ("x", "trans_logits"): ("log", frozenset({"trans"})),
            ("x", "observation_dist.probs"): ("normalized", frozenset({"emission_probs"})),
            ("x", "observation_dist._param"): ("normalized", frozenset({"emission_probs"})),
        }
    else:
        for t in range(T):
            assert uses[(f"x_{t}", "probs")] == ("normalized", frozenset({"emission_probs"}))
            assert uses[(f"z_{t}", "probs")][0] == "normalized"
        assert len(uses) == 4 * T


# ---------------------------------------------------------------------------- opaque uses
def test_softplus_scale_is_opaque():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.5))
        raw = pyro.param("raw", torch.tensor(0.3))
        with pyro.plate("d", len(x)):
            pyro.sample("x", dist.Normal(loc, torch.nn.functional.softplus(raw)), obs=x)

    x = torch.randn(5)
    model(x)
    tr, space = probe(model, (x,), {}, 1)
    assert space.opaque == {"raw"}
    assert _uses(tr) == {("x", "loc"): ("value", frozenset({"loc"}))}


def test_neural_net_params_are_opaque():
    net = torch.nn.Linear(2, 1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    X, y = torch.randn(6, 2), torch.randn(6)

    def model(X, y):
        pyro.module("net", net)
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("d", len(y)):
            pyro.sample("y", dist.Normal(net(X).squeeze(-1), s), obs=y)

    model(X, y)
    tr, space = probe(model, (X, y), {}, 1)
    assert space.opaque == {"net$$$weight", "net$$$bias"}
    assert _uses(tr) == {("y", "scale"): ("value", frozenset({"s"}))}
    # the module is untouched: plain Parameters with the same values
    for n, p in net.named_parameters():
        assert type(p) is torch.nn.Parameter
        assert torch.equal(p.detach(), before[n])


# ---------------------------------------------------------------------------- no leaks
def _store_snapshot():
    store = pyro.get_param_store()
    return {
        n: (
            store.get_param(n).unconstrained(),
            store.get_param(n).unconstrained().detach().clone(),
            store._constraints[n],
        )
        for n in store
    }


def test_probe_leaves_param_store_unchanged_and_no_tracked_leaks():
    data, _ = sample_gmm(6, 2, 2, seed=0, covariance_type="full")
    gmm_model(data, 2, "full")
    before = _store_snapshot()
    _tr, _space = probe(gmm_model, (data, 2, "full"), {}, 1)
    after = _store_snapshot()
    assert before.keys() == after.keys()
    for n in before:
        assert after[n][0] is before[n][0]  # the same unconstrained tensor
        assert torch.equal(after[n][1], before[n][1])
        assert after[n][2] is before[n][2]
        assert after[n][0].requires_grad
    for n in before:
        v = pyro.param(n)
        assert type(v) is torch.Tensor and not isinstance(v, Tracked)
    assert track._OPAQUE is None
    # and the model runs normally afterwards: a gradient reaches the params
    tr2 = pyro.poutine.trace(gmm_model).get_trace(data, 2, "full")
    assert not any(
        isinstance(s["value"], Tracked) for s in tr2.nodes.values() if s["type"] == "param"
    )
    lp = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        gmm_model, lambda *a, **k: None, data, 2, "full"
    )
    lp.backward()
    assert pyro.get_param_store().get_param("locs").unconstrained().grad is not None


def test_probe_records_opaque_only_during_probe():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        pyro.sample("x", dist.Normal(p.exp(), 1.0), obs=torch.tensor(0.0))

    _, space = probe(model, (), {}, 0)
    assert space.opaque == {"p"}
    assert track._OPAQUE is None
    _, space2 = probe(model, (), {}, 0)  # a second probe starts from an empty set
    assert space2.opaque == {"p"} and space2 is not space


class _Boom(RuntimeError):
    pass


def test_probe_cleans_up_when_the_model_raises():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        _ = p * 2
        raise _Boom("inside the model")

    pyro.param("p", torch.tensor(0.3))
    before = _store_snapshot()
    with pytest.raises(_Boom):
        probe(model, (), {}, 0)
    assert track._OPAQUE is None
    v = pyro.param("p")
    assert type(v) is torch.Tensor and not isinstance(v, Tracked)
    after = _store_snapshot()
    assert after["p"][0] is before["p"][0] and torch.equal(after["p"][1], before["p"][1])
    # the handler stack is clean: a plain trace sees no IdSpace, poutine.enum or block
    tr = pyro.poutine.trace(lambda: pyro.param("p") * 1).get_trace()
    assert type(tr.nodes["p"]["value"]) is torch.Tensor
    assert not pyro.poutine.runtime._PYRO_STACK


def test_probe_of_model_raising_after_a_sample_site_restores_stack():
    def model():
        p = pyro.param("p", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        pyro.sample("z", dist.Categorical(p), infer=PAR)
        raise _Boom

    with pytest.raises(_Boom):
        probe(model, (), {}, 0)
    assert not pyro.poutine.runtime._PYRO_STACK
    assert track._OPAQUE is None
    assert type(pyro.param("p")) is torch.Tensor
