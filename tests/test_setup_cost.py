"""What a fit does once, before its iterations (issue 13, small data): the setup's checks
run on cheaper paths and still fire.

* :meth:`ExactEStep._check_dims` reads only which dims each factor spans: for the families
  the fused kernels cover, the factor's shape comes from the distribution's batch shape and
  the value (:func:`pyro_emvae.estep._log_prob_shape`), exactly ``log_prob``'s shape; the
  reductions and recycled dims it exists for are still refused through those families.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_emvae import ExactEStep
from pyro_emvae.errors import EnumerationError
from pyro_emvae.estep import _log_prob_shape

PAR = {"enumerate": "parallel"}


def _cases():
    g = torch.Generator().manual_seed(0)
    k, n, d = 3, 5, 2
    probs = torch.rand(k, generator=g)
    probs = probs / probs.sum()
    locs = torch.randn(k, 1, d, generator=g)  # (an enumerated selection: locs[z])
    tril = torch.eye(d).expand(k, 1, d, d)
    x = torch.randn(n, d, generator=g)
    z = torch.arange(k).reshape(k, 1)
    mask = torch.rand(n, generator=g) > 0.3
    return [
        (dist.Categorical(probs), z),
        (dist.Categorical(probs).expand([n]), z),
        (dist.Categorical(logits=probs.log().expand(n, k)), z),
        (torch.distributions.Categorical(probs), torch.arange(k)),
        (dist.MultivariateNormal(locs, scale_tril=tril), x),
        (dist.MultivariateNormal(locs, scale_tril=tril).mask(mask), x),
        (dist.MultivariateNormal(locs[0, 0], scale_tril=torch.eye(d)).expand([n]), x),
        (dist.Normal(locs, 1.0).to_event(1), x),
        (dist.Normal(locs.squeeze(-1), 1.0), torch.randn(n, 1)),
        (dist.Normal(locs, 1.0).to_event(1).mask(mask).expand([k, n]), x),
        (dist.MultivariateNormal(locs, scale_tril=tril).to_event(1), x.unsqueeze(0)),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_log_prob_shape_is_log_probs_shape(case):
    fn, value = _cases()[case]
    assert _log_prob_shape(fn, value) == fn.log_prob(value).shape


def test_log_prob_shape_leaves_other_families_to_log_prob():
    x = torch.ones(4)
    assert _log_prob_shape(dist.Bernoulli(0.3).expand([4]), x) is None
    assert _log_prob_shape(dist.Poisson(2.0).expand([4]), x) is None
    assert _log_prob_shape(dist.Normal(0.0, 1.0).expand([4]).mask(False), x) is None
    assert _log_prob_shape(dist.Normal(torch.zeros(3), 1.0), torch.zeros(4)) is None  # (raises)


def _reduction(site: str):
    """c: an independent global bit; x: enumerated bits in a plate; y reads their mean outside
    the plate (the reduction moves x's dim onto c's) through a Gaussian or a Categorical (the
    families whose factor shapes the check reads without computing them)."""

    def model():
        pyro.sample("c", dist.Bernoulli(0.5), infer=PAR)
        with pyro.plate("p", 2):
            x = pyro.sample("x", dist.Bernoulli(torch.tensor([0.2, 0.4])), infer=PAR)
        m = x.float().mean(-1)
        if site == "normal":
            pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor(0.3))
        elif site == "mvn":
            loc = torch.stack([m, m], -1)  # (an event dim after the moved one)
            pyro.sample("y", dist.MultivariateNormal(loc, torch.eye(2)), obs=torch.zeros(2))
        else:
            probs = torch.stack([m, 1 - m], -1)
            pyro.sample("y", dist.Categorical(probs), obs=torch.tensor(1))

    return model


@pytest.mark.parametrize("site", ["normal", "mvn", "categorical"])
def test_check_dims_still_refuses_a_reduction_read_by_a_shaped_family(site):
    with pytest.raises(EnumerationError, match=r"site 'y' reads an enumerated value through a"):
        ExactEStep(_reduction(site)).log_likelihood()
