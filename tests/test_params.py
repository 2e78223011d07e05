"""pyro_emvae.params: reads and writes through Pyro's param store, checked against the store's
own arithmetic (``transform_to(c)``) and against what an optimizer holds."""

import pyro
import pytest
import torch
from torch.distributions import constraints, transform_to

from pyro_emvae import params


def _make():
    pyro.param("w", torch.tensor([0.2, 0.3, 0.5]), constraint=constraints.simplex)
    pyro.param("s", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    pyro.param("m", torch.tensor([[-1.0, 4.0]]))


def test_names_constraints_and_reads():
    _make()
    assert params.names() == ["w", "s", "m"]
    assert params.constraint_of("w") is constraints.simplex
    assert params.constraints_of(["s", "m", "absent"]) == {
        "s": constraints.positive,
        "m": constraints.real,
    }
    u = params.unconstrained(["s"])["s"]
    assert u is pyro.get_param_store().get_param("s").unconstrained()  # live, not a copy
    torch.testing.assert_close(params.snapshot(["s"])["s"], torch.tensor([1.0, 2.0]).log())
    c = params.constrained()
    assert list(c) == ["w", "s", "m"]
    torch.testing.assert_close(c["w"], torch.tensor([0.2, 0.3, 0.5]))
    assert not c["s"].requires_grad and c["s"] is not pyro.param("s")


def test_snapshot_restore_is_exact_and_in_place():
    _make()
    snap = params.snapshot()
    live = params.unconstrained()
    opt = torch.optim.SGD(list(live.values()), lr=0.1)
    sum(pyro.param(n).sum() ** 2 for n in ["w", "s", "m"]).backward()
    opt.step()
    assert not torch.equal(live["s"], snap["s"])
    params.restore(snap)
    for n in snap:
        assert torch.equal(live[n], snap[n])  # bit for bit
        assert params.unconstrained([n])[n] is live[n]  # the optimizer's tensors, still


def test_write_goes_through_the_constraints_inverse_transform():
    _make()
    live = params.unconstrained()
    new = {"w": torch.tensor([0.6, 0.3, 0.1]), "s": torch.tensor([3.0, 0.5])}
    params.write(new)
    for n, v in new.items():
        torch.testing.assert_close(pyro.param(n).detach(), v)
        torch.testing.assert_close(live[n], transform_to(params.constraint_of(n)).inv(v))
        assert params.unconstrained([n])[n] is live[n]
    assert not live["s"].grad_fn  # written without autograd


def test_write_refuses_a_value_outside_the_support():
    _make()
    before = params.snapshot()
    with pytest.raises(FloatingPointError, match="param 's'"):
        params.write({"s": torch.tensor([0.0, 1.0])})  # log 0
    assert torch.equal(params.snapshot()["s"], before["s"])  # not written


@pytest.mark.parametrize(
    "constraint", [constraints.simplex, constraints.positive, constraints.lower_cholesky]
)
def test_put_creates_a_param_with_the_saved_unconstrained_value(constraint):
    value = {
        constraints.simplex: torch.tensor([0.1, -0.4, 0.7]),  # not log-softmax-normalized
        constraints.positive: torch.tensor([0.3, -2.0]),
        constraints.lower_cholesky: torch.tensor([[0.5, 0.0], [0.2, -0.1]]),
    }[constraint]
    params.put("p", value, constraint)
    assert torch.equal(params.snapshot(["p"])["p"], value)  # exactly what was saved
    assert params.constraint_of("p") is constraint
    torch.testing.assert_close(pyro.param("p").detach(), transform_to(constraint)(value))
    params.put("p", torch.zeros_like(value), constraint)  # already there: left alone
    assert torch.equal(params.snapshot(["p"])["p"], value)


def test_value_is_the_stores_transform_kept_until_the_leaf_changes():
    """params.value equals the store's own read bit for bit, is the same tensor while the leaf
    is unmodified, and is computed again after a write, an optimizer's in-place step, a new
    leaf (the store cleared and the param made again) or a new constraint."""
    _make()
    store = pyro.get_param_store()
    for n in ["w", "s", "m"]:
        assert torch.equal(params.value(n), store[n].detach())
        assert not params.value(n).requires_grad  # (m's transform is the identity: u itself)
        assert not params.constrained([n])[n].requires_grad
    first = params.value("w")
    assert params.value("w") is first  # no transform while nothing changed
    params.write({"w": torch.tensor([0.1, 0.1, 0.8])})
    assert params.value("w") is not first
    assert torch.equal(params.value("w"), store["w"].detach())
    u = params.unconstrained(["s"])["s"]
    before = params.value("s")
    with torch.no_grad():
        u.mul_(2.0)  # (as an optimizer steps: in place)
    assert torch.equal(params.value("s"), store["s"].detach())
    assert not torch.equal(params.value("s"), before)
    pyro.clear_param_store()
    pyro.param("s", torch.tensor([3.0, 4.0]), constraint=constraints.positive)
    assert torch.equal(params.value("s"), torch.tensor([3.0, 4.0]).log().exp())
    pyro.clear_param_store()
    pyro.param("s", torch.tensor([3.0, 4.0]).log())  # the same values, now unconstrained
    assert torch.equal(params.value("s"), torch.tensor([3.0, 4.0]).log())
