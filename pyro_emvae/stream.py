"""Data that comes in minibatches: the input of streaming, online and data-parallel fits.

:func:`~pyro_emvae.fit.fit` takes a :class:`torch.utils.data.DataLoader` (or a
:class:`Batches`) in place of the model's data argument. With an
:class:`~pyro_emvae.optim.EMOptim` M-step each EM iteration then makes exact passes over the
stream: the expected sufficient statistics are sums over data points, so summing them batch by
batch gives the full-batch statistics, and the fit equals full-batch EM while holding one batch
in memory. With :class:`~pyro_emvae.optim.OnlineEM` (or any other M-step) the params move after
every minibatch instead.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["Batches", "NpyChunks", "is_stream"]


class Batches:
    """A re-iterable stream of minibatches of a model's arguments.

    Each item of ``source`` becomes the model's leading arguments: a tensor is one argument, a
    tuple or list (what a ``DataLoader`` over a ``TensorDataset`` yields) its items, a dict
    keyword arguments. ``args`` and ``kwargs`` follow every batch's own, so
    ``Batches(loader, 3, "diag")`` calls ``model(x_batch, 3, "diag")``.

    Args:
        source: a ``DataLoader``, any re-iterable of batches (a list of tensors), or a
            zero-argument callable returning a fresh iterator (called once per pass).
            A generator is refused: EM needs one pass per iteration.
        device: move every batch's tensors there as they are read (a dataset on disk, EM on
            the GPU).

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=4)
        >>> [a[0].shape[0] for a, _ in Batches(loader)]
        [4, 4, 2]
    """

    def __init__(
        self,
        source: Iterable | Callable[[], Iterable],
        *args: Any,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(source, Batches):
            args, kwargs = source.args + args, {**source.kwargs, **kwargs}
            device = device if device is not None else source.device
            source = source.source
        if isinstance(source, (types.GeneratorType, Iterator)) and not callable(source):
            raise TypeError(
                "a generator or iterator can be read once, and EM reads the data once per "
                "iteration: give a DataLoader, a list of batches, or a function that returns a "
                "fresh iterator (Batches(lambda: read_chunks(path)))"
            )
        if isinstance(source, torch.Tensor):
            raise TypeError(
                "Batches needs an iterable of batches; a tensor is one batch: pass it to fit "
                "as the model's argument, or split it (Batches(list(x.split(1000))))"
            )
        self.source = source
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.device = torch.device(device) if device is not None else None

    def _items(self) -> Iterable:
        if callable(self.source) and not hasattr(self.source, "__iter__"):
            return self.source()
        return self.source

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        """Yields ``(args, kwargs)`` for each minibatch."""
        for args, kwargs, _ in self.with_rows():
            yield args, kwargs

    def with_rows(self) -> Iterator[tuple[tuple, dict, int]]:
        """Yields ``(args, kwargs, rows)``: ``rows`` is the leading size of the batch's first
        tensor (the dim a DataLoader stacks), the count online EM scales by."""
        for i, item in enumerate(self._items()):
            if isinstance(item, dict):
                own = list(item.values())
                args, kwargs = self.args, {**item, **self.kwargs}
            elif isinstance(item, (tuple, list)):
                own = list(item)
                args, kwargs = tuple(item) + self.args, self.kwargs
            else:
                own = [item]
                args, kwargs = (item,) + self.args, self.kwargs
            n = next((a.shape[0] if a.dim() else 1 for a in own if torch.is_tensor(a)), None)
            if n is None:
                raise TypeError(
                    f"batch {i} holds no tensor ({type(item).__name__}); each batch must give "
                    "the model its data as tensors"
                )
            if self.device is not None:
                args = tuple(_to(a, self.device) for a in args)
                kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
            yield args, kwargs, n

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"Batches({type(self.source).__name__}, extra args={len(self.args)})"


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def is_stream(value: Any) -> bool:
    """Whether ``fit`` reads ``value`` as a stream of minibatches: a ``DataLoader`` or a
    :class:`Batches` (a plain list stays a model argument)."""
    from torch.utils.data import DataLoader

    return isinstance(value, (Batches, DataLoader))


class NpyChunks(Dataset):
    """Blocks of ``rows`` consecutive rows of a ``.npy`` array on disk, read at each access
    (``np.fromfile`` at the block's offset: no memory map, whose touched pages would count as
    resident), as tensors: the data of a streaming fit that never holds the file.

    ``DataLoader(NpyChunks("x.npy", rows=100_000), batch_size=None)`` yields ``(rows, ...)``
    tensors (the last block shorter); ``num_workers`` reads ahead in other processes.

    Example::

        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(path, np.arange(10.0).reshape(5, 2))
        >>> chunks = NpyChunks(path, rows=2)
        >>> len(chunks), chunks[2].tolist()
        (3, [[8.0, 9.0]])
    """

    def __init__(self, path: str | os.PathLike, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = {1: np.lib.format.read_array_header_1_0}.get(
                major, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or not shape:
            raise ValueError(
                f"{self.path}: NpyChunks reads C-ordered arrays of at least one dim "
                f"(got shape {shape}, fortran_order={fortran}); save with np.save(np.ascontiguousarray(x))"
            )
        self.shape, self.dtype, self.rows = tuple(shape), np.dtype(dtype), rows
        self.row_items = math.prod(self.shape[1:])

    def __len__(self) -> int:
        return math.ceil(self.shape[0] / self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} of {len(self)}")
        n = min(self.rows, self.shape[0] - i * self.rows)
        start = self.offset + i * self.rows * self.row_items * self.dtype.itemsize
        block = np.fromfile(self.path, dtype=self.dtype, count=n * self.row_items, offset=start)
        return torch.from_numpy(block.reshape((n, *self.shape[1:])))
