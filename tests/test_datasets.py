import pytest
import torch

from pyro_emvae import datasets
from pyro_emvae.datasets import load_earthquakes, load_old_faithful


def test_old_faithful_shape_and_means():
    x = load_old_faithful()
    assert x.shape == (272, 2)
    assert x.dtype == torch.float64  # conftest sets the default dtype
    assert torch.isfinite(x).all()
    eruptions, waiting = x[:, 0], x[:, 1]
    assert eruptions.mean().item() == pytest.approx(3.487783, abs=1e-3)
    assert waiting.mean().item() == pytest.approx(70.897059, abs=1e-3)
    assert eruptions.std().item() == pytest.approx(1.141371, abs=1e-3)
    assert waiting.std().item() == pytest.approx(13.594974, abs=1e-3)
    # Known first and last rows of R's `faithful`.
    assert x[0].tolist() == [3.6, 79.0]
    assert x[-1].tolist() == [4.467, 74.0]
    # Ranges in minutes.
    assert 1.5 <= eruptions.min().item() and eruptions.max().item() <= 5.2
    assert 40 <= waiting.min().item() and waiting.max().item() <= 100
    # Bimodal: both modes well populated around the usual 3-minute split.
    short = (eruptions < 3).sum().item()
    assert 80 <= short <= 120


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_old_faithful_dtype(dtype):
    x = load_old_faithful(dtype=dtype)
    assert x.dtype == dtype
    assert x.shape == (272, 2)


def test_old_faithful_default_dtype_follows_torch_default():
    torch.set_default_dtype(torch.float32)  # conftest restores the default afterwards
    assert load_old_faithful().dtype == torch.float32


def test_earthquakes():
    years, counts = load_earthquakes()
    assert years.shape == counts.shape == (107,)
    assert years.dtype == torch.int64
    assert counts.dtype == torch.float64
    assert torch.equal(years, torch.arange(1900, 2007))
    # Zucchini & MacDonald report mean 19.364 and variance 51.573 for this series.
    assert counts.mean().item() == pytest.approx(19.364486, abs=1e-3)
    assert counts.var().item() == pytest.approx(51.573, abs=1e-3)
    assert counts.sum().item() == 2072
    assert counts[:5].tolist() == [13.0, 14.0, 8.0, 10.0, 16.0]
    assert counts.min().item() == 6 and counts.max().item() == 41
    assert torch.equal(counts, counts.round())


def test_earthquakes_dtype():
    _, counts = load_earthquakes(dtype=torch.float32)
    assert counts.dtype == torch.float32


def test_missing_file_error_is_clear():
    with pytest.raises(FileNotFoundError, match="no_such_file.csv"):
        datasets._read_csv("no_such_file.csv", ["a", "b"])
