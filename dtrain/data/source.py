"""The train data as the loop sees it: windows of micro-batches with their real sample counts, and a
position the source keeps itself (what a checkpoint saves and a resumed run restores).

The loop asks a `TrainSource` for an epoch's windows and never computes a
sampler offset. `SamplerSource` is the one source today: this rank's share of
the shuffled train set (`samplers.TrainSampler`), read either through a
DataLoader or through the in-memory fast path (`batches.TensorBatches`).
Both read the same sampler, so one class over either reader keeps the epoch
order, the resumed start and the real-sample arithmetic in one place: the
two paths cannot drift apart, and the fast path stays the DataLoader's twin
bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Generator, Iterable, Iterator, Mapping, Protocol

import torch

from dtrain.data.samplers import TrainSampler


@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank, and which of their samples are real."""

    batches: list[Any]
    real: list[int]
    """Real samples at the head of each micro-batch; the rest are the sampler's repeats."""
    global_real: int
    """Real samples in the window on all ranks together: the divisor of the summed loss."""
    fetch_s: float
    """Host seconds spent fetching this window's batches: the loop's data time."""
    index: int
    """This window's 0-based index in its epoch."""


class TrainSource(Protocol):
    """What the loop reads its training windows from."""

    steps_per_epoch: int
    """Windows in a whole epoch."""
    position: int
    """Windows of the current epoch already handed out; 0 at an epoch start."""
    workers_rng: torch.Generator
    """Seeds the DataLoader workers; part of this rank's random state in a checkpoint."""

    def windows(self, epoch: int) -> Generator[Window, None, None]:
        """The epoch's windows from `position` on; `position` counts them, and is 0 again once they run out
        or the generator is closed early (the loop closes it when max_steps ends an epoch part-way)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SamplerSource:
    """This rank's shard of a `TrainSampler`, `k` micro-batches of `batch_size` per window.

    `batches` iterates the sampler's current order in batches of `batch_size`
    (the last one short): a DataLoader, or a TensorBatches on the fast path.
    """

    def __init__(self, batches: Iterable[Any], sampler: TrainSampler, batch_size: int, k: int,
                 workers_rng: torch.Generator) -> None:
        self.batches = batches
        self.sampler = sampler
        self.batch_size = batch_size
        self.k = k
        self.workers_rng = workers_rng
        self.shard = sampler.shard
        self.steps_per_epoch = math.ceil(math.ceil(sampler.num_samples / batch_size) / k)
        self.position = 0

    def windows(self, epoch: int) -> Generator[Window, None, None]:
        """The epoch's windows from `position` on. A window's micro-batches are all fetched before it is
        handed out, so its sample count, and so the loss scale, comes from what was read."""
        self.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        # A resumed epoch starts where the checkpoint was: no batch read twice, none replayed.
        self.sampler.start = self.position * self.k * self.batch_size
        sample = self.sampler.start  # this rank's place in the epoch, counted from the batches fetched
        index = self.position
        try:
            yield from self._windows(iter(self.batches), sample, index)
        finally:
            # Run out, or closed early (max_steps ends the epoch there): the next epoch starts at its beginning.
            self.position = 0
            self.sampler.start = 0

    def _windows(self, it: Iterator[Any], sample: int, index: int) -> Iterator[Window]:
        exhausted = False
        while not exhausted:
            t = time.perf_counter()
            batches: list[Any] = []
            for _ in range(self.k):
                try:
                    batches.append(next(it))
                except StopIteration:
                    exhausted = True  # a short window ends the epoch: the iterator is not asked again
                    break
            fetch_s = time.perf_counter() - t
            if not batches:
                break
            real, first = [], sample
            for b in batches:
                n = batch_len(b)
                real.append(self.shard.real_between(sample, sample + n))
                sample += n
            # Counted before the window is handed out: a checkpoint taken after its step resumes after it.
            self.position = index + 1
            yield Window(batches, real, self.shard.global_real_between(first, sample), fetch_s, index)
            index += 1

    def state_dict(self) -> dict[str, Any]:
        return {"window_in_epoch": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["window_in_epoch"])


def batch_len(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    raise TypeError(f"cannot tell how many samples a batch of type {type(batch).__name__} holds")


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch, moved to the device without blocking the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
