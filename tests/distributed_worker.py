"""One rank of the data-parallel tests (tests/test_distributed.py), launched by torchrun:

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT_DIR [CASE ...]

Every rank builds the same data from fixed seeds, keeps its shard (every world_size-th row,
starting at its rank), fits with ``distributed=True`` and saves its params and history to
``OUT_DIR/<case>.rank<r>.pt``. The test fits the same cases in one process on all the data
(``reference``) and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.gmm import gmm_model, sample_gmm
from models.gmm import init_params as gmm_init
from models.hmm import gaussian_hmm, sample_gaussian_hmm
from models.hmm import init_params as hmm_init
from pyro_emvae import EMOptim, ExactEStep, GradientMStep, OnlineEM, fit

CASES = ("gmm", "gmm_stream", "hmm", "ecm", "eg", "online", "svi", "mismatch", "resumed")


def gmm_data():
    data, _ = sample_gmm(N=600, K=3, D=2, seed=0)
    return data, gmm_init(data, 3, "full", seed=1)


def hmm_data():
    data, _ = sample_gaussian_hmm(N=12, T=50, K=3, D=2, seed=0)
    return data, hmm_init(data, 3, "gaussian", seed=1)


def ecm_model(x, y):
    """A mixture of two regressions whose slopes pass through tanh (gradient steps) and whose
    weights and noise scales have closed forms: ECM."""
    w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
    slope = pyro.param("slope", torch.tensor([-1.0, 1.0]))
    scale = pyro.param("scale", torch.tensor([1.0, 1.0]), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(torch.tanh(slope[z] * x), scale[z]), obs=y)


def ecm_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, generator=g)
    z = torch.rand(400, generator=g) < 0.4
    y = torch.where(z, torch.tanh(2.0 * x), torch.tanh(-0.5 * x)) + 0.1 * torch.randn(
        400, generator=g
    )
    return x, y


def svi_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    log_scale = pyro.param("log_scale", torch.tensor(0.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, log_scale.exp()), obs=x)


def svi_data():
    return 3.0 + 2.0 * torch.randn(500, generator=torch.Generator().manual_seed(4))


def online_batches(data: torch.Tensor, world: int, batch: int) -> list[torch.Tensor]:
    """The minibatches one process sees when ``world`` ranks each read ``batch`` rows of their
    shard per step: step k's rows of every rank, concatenated."""
    shards = [data[r::world] for r in range(world)]
    steps = min(len(s) for s in shards) // batch
    return [torch.cat([s[k * batch : (k + 1) * batch] for s in shards]) for k in range(steps)]


def run(case: str, data_args, distributed: bool, rank: int = 0, world: int = 1, tmp=None):
    """Fit ``case`` on this rank's shard (``distributed``) or on all the data (world 1)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def shard(t):
        return t[rank::world]

    if case == "resumed":
        # cut at iteration 6 on every rank (rank 0 writes the checkpoint), then resumed
        data, init = data_args

        def model(x):
            gmm_model(x, 3, "full", init=init)

        def fit_from(path, stop_at=None):
            pyro.clear_param_store()

            def callback(it, info):
                if it == stop_at:
                    raise KeyboardInterrupt

            loader = DataLoader(TensorDataset(shard(data)), batch_size=64)
            return fit(
                model,
                ExactEStep(model),
                loader,
                optim=EMOptim(reg_covar=0.0),
                max_iter=15,
                tol=0,
                checkpoint=path,
                checkpoint_every=4,
                callback=callback,
                distributed=distributed,
            )

        path = Path(tmp or ".") / "resumed.ckpt"
        if not distributed:
            return fit_from(None)
        cut = fit_from(path, stop_at=6)
        assert cut.interrupted and cut.n_iter == 6
        return fit_from(path)
    if case in ("gmm", "gmm_stream", "online", "mismatch"):
        data, init = data_args

        def model(x):
            gmm_model(x, 3, "full", init=init)

        guide = ExactEStep(model)
        if case == "gmm":
            return fit(
                model,
                guide,
                shard(data),
                optim=EMOptim(reg_covar=0.0),
                max_iter=15,
                tol=0,
                distributed=distributed,
            )
        if case == "mismatch":
            # every rank initializes from its own shard: the broadcast makes them rank 0's,
            # as if one process had initialized from shard 0
            first = data[0::2]

            def model(x):
                start = x if distributed else first
                gmm_model(x, 3, "full", init=gmm_init(start, 3, "full", seed=1))

            return fit(
                model,
                ExactEStep(model),
                shard(data),
                optim=EMOptim(reg_covar=0.0),
                max_iter=5,
                tol=0,
                distributed=distributed,
            )
        if case == "gmm_stream":
            loader = DataLoader(TensorDataset(shard(data)), batch_size=64)
            return fit(
                model,
                guide,
                loader,
                optim=EMOptim(reg_covar=0.0),
                max_iter=15,
                tol=0,
                distributed=distributed,
            )
        # online EM: each rank reads 32 rows a step; one process reads the 2 x 32 rows
        if distributed:
            source = [b for b in shard(data).split(32)][: len(online_batches(data, world, 32))]
        else:
            source = online_batches(data, 2, 32)
        from pyro_emvae import Batches

        return fit(
            model,
            guide,
            Batches(source),
            optim=OnlineEM(kappa=0.7),
            max_iter=3,
            tol=0,
            distributed=distributed,
        )
    if case == "hmm":
        data, init = data_args

        def model(x):
            gaussian_hmm(x, 3, init=init)

        return fit(
            model,
            ExactEStep(model),
            shard(data),
            optim=EMOptim(reg_covar=0.0),
            max_iter=10,
            tol=0,
            distributed=distributed,
        )
    if case in ("ecm", "eg"):
        x, y = data_args
        optim = (
            EMOptim(svi_optim=pyro.optim.Adam({"lr": 0.01}), svi_steps=3, reg_covar=0.0)
            if case == "ecm"
            else GradientMStep(pyro.optim.Adam({"lr": 0.01}), steps=2)
        )
        return fit(
            ecm_model,
            ExactEStep(ecm_model),
            shard(x),
            shard(y),
            optim=optim,
            max_iter=20,
            tol=0,
            distributed=distributed,
        )
    if case == "svi":
        x = data_args
        guide = pyro.infer.autoguide.AutoDelta(svi_model)
        guide(shard(x))  # its initial values drawn before the fit, as one process draws them
        return fit(
            svi_model,
            guide,
            shard(x),
            optim=pyro.optim.Adam({"lr": 0.05}),
            max_iter=60,
            tol=0,
            distributed=distributed,
        )
    raise ValueError(case)


DATA = {
    "gmm": gmm_data,
    "gmm_stream": gmm_data,
    "online": gmm_data,
    "mismatch": gmm_data,
    "hmm": hmm_data,
    "ecm": ecm_data,
    "eg": ecm_data,
    "svi": svi_data,
    "resumed": gmm_data,
}


def main(argv: list[str]) -> None:
    import torch.distributed as tdist

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    out = Path(argv[0])
    cases = argv[1:] or list(CASES)
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    try:
        for case in cases:
            result = run(case, DATA[case](), True, rank, world, tmp=out)
            torch.save(
                {
                    "params": result.params,
                    "history": result.history,
                    "n_data": result.n_data,
                    "log_likelihood": result.log_likelihood,
                    "elbo": result.elbo,
                    "world": world,
                },
                out / f"{case}.rank{rank}.pt",
            )
        tdist.barrier()  # (gloo aborts a rank that tears down while its peer still talks)
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
