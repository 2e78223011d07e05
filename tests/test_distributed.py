"""Data-parallel fits: 2 CPU processes (gloo on localhost, launched by torchrun as a user
would) against one process on all the data.

``tests/distributed_worker.py`` is one rank: it fits each case on its shard with
``distributed=True``; here the same cases run in this process on the concatenated shards. The
ranks must hold identical params, equal to the one-process fit to 1e-10: EM on a full-covariance
GMM (in memory and streamed from a DataLoader), Baum-Welch on a Gaussian DiscreteHMM over
sequences, ECM (closed form + Adam), EG, online EM, SVI with a global latent (counted once over
the ranks, not twice), and a model that initializes its params from its own shard (the ranks
start from rank 0's values).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_emvae import ExactEStep, fit
from pyro_emvae import distributed as dp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every case on 2 ranks once; returns {case: [rank 0's result, rank 1's]}."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "distributed_worker.py"), str(out), *worker.CASES,
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {
        case: [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(2)]
        for case in worker.CASES
    }


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", worker.CASES)
def test_two_ranks_equal_one_process(two_ranks, case):
    r0, r1 = two_ranks[case]
    assert r0["world"] == 2
    # identical params on every rank, bit for bit: they apply the same reduced update
    assert _max_diff(r0["params"], r1["params"]) == 0.0
    assert {k: v for k, v in r0["history"].items() if k != "time"} == {
        k: v for k, v in r1["history"].items() if k != "time"
    }
    ref = worker.run(case, worker.DATA[case](), distributed=False)
    assert _max_diff(r0["params"], ref.params) < 1e-10
    key = "log_likelihood" if ref.log_likelihood is not None else "elbo"
    ours, theirs = r0["history"][key], ref.history[key]
    assert len(ours) == len(theirs)
    assert max(abs(a - b) / (1 + abs(b)) for a, b in zip(ours, theirs)) < 1e-10
    assert r0["n_data"] == ref.n_data  # totals over the ranks


def test_a_model_with_its_own_init_starts_every_rank_from_rank_0(two_ranks):
    # 'mismatch': each rank's model draws its params from its own shard; without the
    # broadcast the ranks would start apart and the shards' statistics would mix
    r0, r1 = two_ranks["mismatch"]
    assert _max_diff(r0["params"], r1["params"]) == 0.0


def test_em_is_monotone_on_the_reduced_log_likelihood(two_ranks):
    for case in ("gmm", "gmm_stream", "hmm"):
        h = two_ranks[case][0]["history"]["log_likelihood"]
        assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(h)), case


# ------------------------------------------------------------------- one process, no torchrun
def test_distributed_without_a_process_group_says_how_to_launch():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0), obs=x)

    with pytest.raises(RuntimeError, match="torchrun"):
        fit(model, ExactEStep(model), torch.randn(10), distributed=True)


def test_helpers_are_no_ops_outside_a_data_parallel_context():
    t = torch.tensor([1.0, 2.0])
    dp.all_reduce_([t])
    assert t.tolist() == [1.0, 2.0]
    assert dp.all_reduce_float(3.5) == 3.5
    assert not dp.active() and dp.world_size() == 1 and dp.rank() == 0
    assert list(dp.lockstep([1, 2])) == [1, 2]


def test_the_data_plate_is_the_outermost_plate_every_observation_shares():
    def model(x):
        pyro.factor("prior", torch.tensor(0.0))  # outside every plate: not the data
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    tr = pyro.poutine.trace(model).get_trace(torch.zeros(4, 3))
    assert dp.data_plate_of(tr) == "data"

    def no_plate(x):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(1), obs=x)

    with pytest.raises(ValueError, match="share none"):
        dp.data_plate_of(pyro.poutine.trace(no_plate).get_trace(torch.zeros(4)))


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank in this process."""
    tdist = torch.distributed
    tdist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        tdist.destroy_process_group()


def test_a_world_of_one_fits_as_without_distributed(world_of_one):
    data, init = worker.gmm_data()
    results = []
    for distributed in (False, True):
        pyro.clear_param_store()

        def model(x):
            worker.gmm_model(x, 3, "full", init=init)

        results.append(
            fit(model, ExactEStep(model), data, max_iter=5, tol=0, distributed=distributed)
        )
    assert _max_diff(results[0].params, results[1].params) == 0.0
    assert results[0].history["log_likelihood"] == results[1].history["log_likelihood"]


def test_an_enumerated_global_site_is_refused(world_of_one):
    def model(x):
        regime = pyro.sample(
            "regime", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"}
        )
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(locs[regime], 1.0), obs=x)

    with pytest.raises(Exception, match="couples every shard"):
        fit(model, ExactEStep(model), torch.randn(20), max_iter=2, distributed=True)
