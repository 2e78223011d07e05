"""Small real data sets shipped with :mod:`pyro_emvae`.

The CSV files live in ``pyro_emvae/data`` and are read through :mod:`importlib.resources`, so they
work from an installed wheel as well as from a source checkout. See ``pyro_emvae/data/README.md``
for where the numbers come from.
"""

from __future__ import annotations

import csv
import gzip
import io
from importlib import resources

import torch

__all__ = ["load_digits", "load_earthquakes", "load_old_faithful"]

_DATA_PACKAGE = "pyro_emvae"
_DATA_DIR = "data"


def _read_csv(filename: str, expected_header: list[str]) -> list[list[str]]:
    """Return the data rows (header removed) of a CSV file shipped in ``pyro_emvae/data``."""
    resource = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR).joinpath(filename)
    try:
        if filename.endswith(".gz"):
            text = gzip.decompress(resource.read_bytes()).decode("utf-8")
        else:
            text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise FileNotFoundError(
            f"pyro_emvae data file {_DATA_DIR}/{filename!r} is missing from the installed package "
            f"(looked in {resource}). Reinstall pyro_emvae, or check that package data "
            f"'{_DATA_DIR}/*.csv' is included in the build."
        ) from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header != expected_header:
        raise ValueError(
            f"pyro_emvae data file {filename!r} has header {header!r}, expected {expected_header!r}"
        )
    rows = [row for row in reader if row]
    bad = [i for i, row in enumerate(rows, start=2) if len(row) != len(expected_header)]
    if bad:
        raise ValueError(f"pyro_emvae data file {filename!r}: malformed line(s) {bad[:5]}")
    return rows


def load_old_faithful(dtype: torch.dtype | None = None) -> torch.Tensor:
    """Old Faithful geyser eruptions (the classic R ``faithful`` data, 272 eruptions).

    Column 0 is the eruption duration and column 1 the waiting time until the next eruption,
    both in minutes. The data are bimodal in both columns, the standard two-cluster example
    for Gaussian mixture models.

    Args:
        dtype: floating dtype of the result; ``None`` (default) means
            ``torch.get_default_dtype()``.

    Returns:
        Tensor of shape ``(272, 2)``: ``[:, 0]`` = ``eruptions`` (minutes),
        ``[:, 1]`` = ``waiting`` (minutes).

    Example:
        >>> from pyro_emvae.datasets import load_old_faithful
        >>> x = load_old_faithful(dtype=torch.float64)
        >>> tuple(x.shape)
        (272, 2)
        >>> [round(m, 3) for m in x.mean(0).tolist()]
        [3.488, 70.897]
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
    rows = _read_csv("old_faithful.csv", ["eruptions", "waiting"])
    return torch.tensor([[float(e), float(w)] for e, w in rows], dtype=dtype)


def load_earthquakes(dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Yearly counts of major (magnitude 7 and above) earthquakes worldwide, 1900-2006.

    The 107-year series analysed with Poisson hidden Markov models in Zucchini & MacDonald,
    *Hidden Markov Models for Time Series* (counts from the US Geological Survey).

    Args:
        dtype: dtype of ``counts``; ``None`` (default) means ``torch.get_default_dtype()``
            (Pyro's ``Poisson`` wants a floating tensor). ``years`` is always ``torch.int64``.

    Returns:
        ``(years, counts)``, each of shape ``(107,)``: ``years`` runs 1900, ..., 2006 and
        ``counts[i]`` is the number of major earthquakes in ``years[i]``.

    Example:
        >>> from pyro_emvae.datasets import load_earthquakes
        >>> years, counts = load_earthquakes(dtype=torch.float64)
        >>> tuple(counts.shape), int(years[0]), int(years[-1])
        ((107,), 1900, 2006)
        >>> round(counts.mean().item(), 3)
        19.364
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
    rows = _read_csv("earthquakes.csv", ["year", "count"])
    years = torch.tensor([int(y) for y, _ in rows], dtype=torch.int64)
    counts = torch.tensor([int(c) for _, c in rows], dtype=dtype)
    return years, counts


def load_digits(
    binarize: bool = False, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Handwritten digits, 8x8 grey levels: 1797 images of 0-9 (the copy of UCI's "Optical
    Recognition of Handwritten Digits" test set that scikit-learn ships as ``load_digits``).

    Args:
        binarize: threshold the scaled pixels at 0.5 (for a Bernoulli likelihood).
        dtype: dtype of the pixels; ``None`` means ``torch.get_default_dtype()``.

    Returns:
        ``(pixels, labels)``: ``pixels`` ``(1797, 64)`` in ``[0, 1]`` (grey level / 16, row by
        row), ``labels`` ``(1797,)`` int64 in 0-9.

    Example:
        >>> from pyro_emvae.datasets import load_digits
        >>> x, y = load_digits()
        >>> tuple(x.shape), int(y[0]), float(x.max())
        ((1797, 64), 0, 1.0)
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
    header = ["label"] + [f"p{i}" for i in range(64)]
    rows = _read_csv("digits.csv.gz", header)
    labels = torch.tensor([int(r[0]) for r in rows], dtype=torch.int64)
    pixels = torch.tensor([[int(v) for v in r[1:]] for r in rows], dtype=dtype) / 16.0
    if binarize:
        pixels = (pixels > 0.5).to(dtype)
    return pixels, labels
