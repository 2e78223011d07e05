"""The same fits on CUDA as on the CPU, where a GPU is present (skipped otherwise): full-batch
EM, exact streaming EM from CPU batches moved to the GPU as they are read, online EM, and a
Baum-Welch fit of a DiscreteHMM. Data and params live on the GPU; the results must match the
CPU's to round-off."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models.gmm import gmm_model, sample_gmm
from models.gmm import init_params as gmm_init
from models.hmm import gaussian_hmm, sample_gaussian_hmm
from models.hmm import init_params as hmm_init
from pyro_emvae import Batches, EMOptim, ExactEStep, OnlineEM, fit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on(device, tensors: dict) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def _gmm_fit(device, source_of, optim):
    data, _ = sample_gmm(N=2000, K=3, D=2, seed=0)
    init = _on(device, gmm_init(data, 3, "full", seed=1))
    pyro.clear_param_store()

    def model(x):
        gmm_model(x, 3, "full", init=init)

    torch.manual_seed(0)
    result = fit(
        model, ExactEStep(model), source_of(data, device), optim=optim(), max_iter=8, tol=0
    )
    for value in result.params.values():
        assert value.device.type == torch.device(device).type
    return result


@pytest.mark.parametrize(
    "source_of",
    [
        lambda data, device: data.to(device),
        lambda data, device: Batches(
            DataLoader(TensorDataset(data), batch_size=256), device=device
        ),
    ],
    ids=["in-memory", "streamed"],
)
def test_em_on_cuda_equals_em_on_the_cpu(source_of):
    cpu = _gmm_fit("cpu", source_of, lambda: EMOptim(reg_covar=0.0))
    gpu = _gmm_fit("cuda", source_of, lambda: EMOptim(reg_covar=0.0))
    for k in cpu.params:
        assert torch.allclose(gpu.params[k].cpu(), cpu.params[k], atol=1e-9), k
    for a, b in zip(gpu.history["log_likelihood"], cpu.history["log_likelihood"]):
        assert abs(a - b) < 1e-8 * abs(b)


def test_online_em_on_cuda_equals_online_em_on_the_cpu():
    def source_of(data, device):
        return Batches(list(data.split(200)), device=device)

    cpu = _gmm_fit("cpu", source_of, OnlineEM)
    gpu = _gmm_fit("cuda", source_of, OnlineEM)
    for k in cpu.params:
        assert torch.allclose(gpu.params[k].cpu(), cpu.params[k], atol=1e-9), k


def test_baum_welch_on_cuda_equals_the_cpu():
    data, _ = sample_gaussian_hmm(N=8, T=200, K=3, D=2, seed=0)
    results = {}
    for device in ("cpu", "cuda"):
        init = _on(device, hmm_init(data, 3, "gaussian", seed=1))
        pyro.clear_param_store()

        def model(x, init=init):
            gaussian_hmm(x, 3, init=init)

        results[device] = fit(
            model,
            ExactEStep(model),
            data.to(device),
            optim=EMOptim(reg_covar=0.0),
            max_iter=10,
            tol=0,
        )
    for k in results["cpu"].params:
        assert torch.allclose(
            results["cuda"].params[k].cpu(), results["cpu"].params[k], atol=1e-9
        ), k
