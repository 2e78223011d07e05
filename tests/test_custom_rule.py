"""Adding a closed-form family from outside the package: the worked example of
docs/guide/custom_rule.md (formerly in the README).

A Gamma rate with a fixed concentration, :math:`\\beta = \\alpha \\sum w / \\sum w x`,
registered with the public :func:`pyro_emvae.register_rule` from this file (not from the
package), and checked against the stationarity of :math:`\\mathbb{E}_q[\\log p(x, z)]`, the
analytic formula, and EM's monotonicity.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_emvae import EMOptim, ExactEStep, Rule, fit, register_rule
from pyro_emvae import rules as _rules


# ------------------------------------------ docs/guide/custom_rule.md's example, verbatim
class GammaRate(Rule):
    """Gamma(concentration α fixed, rate β): the maximizer of
    sum_n w_n (α log β - β x_n) is β = α Σw / Σ w x."""

    families = (dist.Gamma,)
    arguments = {"rate": {"value": "gamma_rate"}}  # noqa: RUF012  (attribute: {form: role})
    stage = 0  # ECM stage: 0 locations/rates, 1 scales

    def summarize(self, fn, value, weight, stats, stage, current):
        rate = fn.__dict__.get("rate")
        if stage == 0 and getattr(rate, "form", None) == "value":  # the param itself
            stats.add("gamma_num", rate.ids, weight, current(fn.concentration))
            stats.add("gamma_den", rate.ids, weight, value)

    def maximize(self, role, stats, ctx):
        # num / den per element, clipped into the param's constraint; None if nothing moved
        return ctx.elementwise("gamma_num", "gamma_den")


# -------------------------------------------------------------------------- the tests
@pytest.fixture
def gamma_rule():
    """Register GammaRate for this test only (``@register_rule`` on the class at import
    would register it for the whole session)."""
    saved = [dict(r) for r in (_rules.RULES, _rules.HANDLED, _rules.ROLES, _rules.MAXIMIZERS)]
    register_rule(GammaRate)
    yield
    for registry, old in zip(
        (_rules.RULES, _rules.HANDLED, _rules.ROLES, _rules.MAXIMIZERS), saved
    ):
        registry.clear()
        registry.update(old)


ALPHA = torch.tensor([2.0, 6.0], dtype=torch.float64)


def gamma_mixture(x):
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
    rates = pyro.param("rates", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Gamma(ALPHA[z], rates[z]), obs=x)


def _data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g) < 0.4
    rate = torch.where(z, 4.0, 1.5)
    alpha = torch.where(z, ALPHA[0], ALPHA[1])
    return torch._standard_gamma(alpha, generator=g) / rate


def test_without_the_rule_the_rate_takes_gradient_steps():
    plan = EMOptim().plan(ExactEStep(gamma_mixture), (_data(),), {})
    assert "rates" in plan.gradient and "Gamma" in plan.reasons["rates"]


def test_the_registered_rule_is_the_maximizer(gamma_rule):
    x = _data()
    pyro.clear_param_store()
    guide = ExactEStep(gamma_mixture)
    opt = EMOptim()
    plan = opt.plan(guide, (x,), {})
    assert sorted(plan.closed_form) == ["rates", "weights"] and plan.gradient == []
    post = guide.posterior(x)
    r = guide.marginals(x)["z"]  # (N, 2) responsibilities at the old params
    opt(guide, post, (x,), {})
    rates = pyro.param("rates").detach()
    # the analytic formula
    expected = ALPHA * r.sum(0) / (r * x.unsqueeze(-1)).sum(0)
    torch.testing.assert_close(rates, expected, rtol=1e-10, atol=1e-10)
    # a stationary point of E_q[log p(x, z)] in the rates (concave in them: the maximizer)
    rate = pyro.param("rates")
    q = guide.expected_log_joint(post, x)
    (grad,) = torch.autograd.grad(q, rate.unconstrained())
    assert grad.abs().max() < 1e-8
    with torch.no_grad():
        for step in (1.01, 0.99):
            rate.unconstrained().copy_((rates * step).log())
            assert float(guide.expected_log_joint(post, x)) < float(q)


def test_em_with_the_registered_rule_is_monotone_and_recovers_the_rates(gamma_rule):
    x = _data(2000, seed=1)
    pyro.clear_param_store()
    result = fit(gamma_mixture, ExactEStep(gamma_mixture), x, max_iter=200, tol=1e-9)
    assert result.algorithm == "EM"
    ll = result.history["log_likelihood"]
    assert all(b >= a - 1e-8 * abs(a) for a, b in itertools.pairwise(ll))
    torch.testing.assert_close(result.params["rates"], torch.tensor([4.0, 1.5]), rtol=0.1, atol=0)


def test_register_rule_forms(gamma_rule):
    assert _rules.RULES[dist.Gamma].families == (dist.Gamma,)
    assert _rules.MAXIMIZERS["gamma_rate"] is _rules.RULES[dist.Gamma]
    with pytest.raises(TypeError, match="Rule subclass"):
        register_rule(dist.Gamma)(lambda *a: None)

    class NoMaximize(Rule):
        families = (dist.Gamma,)

        def summarize(self, fn, value, weight, stats, stage, current):
            pass

    with pytest.raises(TypeError, match="NoMaximize must define maximize"):
        register_rule(NoMaximize)
    assert _rules.RULES[dist.Gamma].families == (dist.Gamma,)  # the registered rule stays
