"""Shared pytest setup: float64, fixed seeds, a clean param store and Pyro validation per test."""

import pyro
import pytest
import torch

# The CI machine has 2 cores; more threads only adds contention.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _pyro_test_state():
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    try:
        yield
    finally:
        pyro.clear_param_store()
        torch.set_default_dtype(old_dtype)
