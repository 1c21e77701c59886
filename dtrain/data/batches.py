"""The in-memory fast path: whole batches by one indexing per tensor, in the sampler's own order.

A `TensorDataset` (digits, synthetic, a user's) already holds every sample in
a few tensors. The DataLoader would call `__getitem__` once per sample and
stack the results again (`default_collate`); `TensorBatches` asks the same
sampler for the same indices and takes each batch with one `index_select`
per tensor. `torch.stack` of rows and `index_select` of the same rows are the
same bytes, so every batch equals the DataLoader's bit for bit, for every
epoch, rank, padding repeat and resumed start (`TrainSampler.start`).

Only data whose samples are plain rows of tensors qualifies: a
`TensorDataset` itself (not a subclass, which may override `__getitem__`),
a `Subset` of one, or a dataset that offers `get_batch(indices)` itself
(the `BatchedDataset` protocol: it promises to return what collating its
items would). Anything else (a transform, PIL images, dicts, files) stays on
the DataLoader path.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Optional, Protocol, Sized, cast, runtime_checkable

import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset


@runtime_checkable
class BatchedDataset(Protocol):
    """A map-style dataset that can hand out a whole batch at once.

    `get_batch(indices)` (a 1-D int64 tensor) must return exactly what
    `default_collate([self[i] for i in indices])` would: the same values,
    dtypes and structure. dtrain then builds batches with it instead of one
    `__getitem__` per sample.
    """

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> Any: ...


class _Rows:
    """Rows of a few tensors (a TensorDataset, maybe behind Subsets): a batch is one index_select each."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], index: Optional[torch.Tensor]) -> None:
        self.tensors = tensors
        self.index = index
        """Maps dataset positions to rows (a Subset's indices); None: the identity."""

    def to(self, device: torch.device) -> _Rows:
        index = None if self.index is None else self.index.to(device)
        return _Rows(tuple(t.to(device) for t in self.tensors), index)

    def get_batch(self, indices: torch.Tensor) -> list[torch.Tensor]:
        rows = indices if self.index is None else self.index.index_select(0, indices)
        # A list, as default_collate makes of a TensorDataset's tuples.
        return [t.index_select(0, rows) for t in self.tensors]


def batched_source(ds: Dataset) -> Optional[Any]:
    """Something with get_batch(indices) equal to collating ds's items, or None: ds needs the DataLoader."""
    if type(ds) is TensorDataset:  # a subclass may transform in __getitem__
        return _Rows(tuple(ds.tensors), None)
    if type(ds) is Subset:
        inner = batched_source(ds.dataset)
        if isinstance(inner, _Rows):
            index = torch.as_tensor(list(ds.indices), dtype=torch.long)
            if inner.index is not None:
                index = inner.index.index_select(0, index)
            return _Rows(inner.tensors, index)
        return None
    if isinstance(ds, BatchedDataset):
        return ds
    return None


class TensorBatches:
    """Iterates like `DataLoader(dataset, batch_size, sampler=sampler, drop_last=False)` with the default
    collate, one get_batch per batch; `len`, `batch_size` and `sampler` answer as the DataLoader's do."""

    def __init__(self, source: Any, sampler: Sampler[int], batch_size: int,
                 device: Optional[torch.device] = None) -> None:
        self.source = source
        self.sampler = sampler
        self.batch_size = batch_size
        self.index_device = device if device is not None else torch.device("cpu")
        """Where the indices go: the data's device, so a device-resident batch is taken on the device."""

    def __iter__(self) -> Iterator[Any]:
        # The sampler's own iterator, once per epoch: its shuffle, padding and start, exactly.
        order = torch.as_tensor(list(cast(Iterable[int], self.sampler)), dtype=torch.long)
        if self.index_device.type != "cpu":
            order = order.to(self.index_device)
        for i in range(0, len(order), self.batch_size):
            yield self.source.get_batch(order[i:i + self.batch_size])

    def __len__(self) -> int:
        return math.ceil(len(cast(Sized, self.sampler)) / self.batch_size)

