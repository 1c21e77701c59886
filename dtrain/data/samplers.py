"""Which samples each rank reads: the train sampler (same global batches at any world size), its padding
arithmetic, and the eval shard (never padded).

Training uses `DistributedSampler`: rank r takes positions r, r+W, r+2W, ...
of one seeded permutation, so the union of the ranks' i-th batches is the
i-th slice of that permutation: the same global batches at any world size.
It pads that permutation with its own head so every rank gets as many
samples; `TrainShard` says which of a rank's positions are such repeats, and
the step leaves them out, so no sample counts twice.

Evaluation uses `ShardSampler`, which never pads: `DistributedSampler` repeats
samples to even out the ranks, and those repeats would be counted twice in
the eval loss and accuracy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class TrainShard:
    """Which of this rank's sampler positions hold real samples, by host arithmetic alone.

    DistributedSampler (drop_last=False) pads the epoch's permutation of N
    samples to a multiple of W by repeating its head; rank r's j-th index is
    position r + j*W of the padded list, a repeat exactly when r + j*W >= N.
    So a rank's repeats are always at the end of its list, and the real
    samples of rank-local positions [start, stop) on all ranks together are
    the padded positions [start*W, stop*W) below N.
    """

    dataset_size: int
    rank: int
    world_size: int

    @property
    def real(self) -> int:
        """Real samples this rank gets per epoch."""
        return len(range(self.rank, self.dataset_size, self.world_size))

    def real_between(self, start: int, stop: int) -> int:
        """Real samples at this rank's positions [start, stop)."""
        return max(0, min(stop, self.real) - start)

    def global_real_between(self, start: int, stop: int) -> int:
        """Real samples at positions [start, stop) of every rank together."""
        return max(0, min(stop * self.world_size, self.dataset_size) - start * self.world_size)


class ShardSampler(Sampler[int]):
    """Rank r gets indices r, r+W, ...: every sample on exactly one rank, no padding. `limit`: only the first
    `limit` samples of the set (the same ones at any world size)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, limit: Optional[int] = None) -> None:
        n = len(dataset)  # type: ignore[arg-type]  # map-style datasets are sized
        self.indices = range(rank, n if limit is None else min(n, limit), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way, for a resumed run.

    The epoch's index list is built as always (indices only, no data read) and
    the first `start` of this rank's indices are skipped, so a resumed run reads
    exactly the samples the interrupted one had not reached, and none twice.
    """

    start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start

    @property
    def shard(self) -> TrainShard:
        """Which of this rank's positions are real samples."""
        return TrainShard(len(self.dataset), self.rank, self.num_replicas)  # type: ignore[arg-type]
