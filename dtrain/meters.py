"""Loss sums and sample counts between logging steps, and the wall time they took."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from dtrain.dist import DistState


@dataclass
class Meter:
    """Sums of per-sample losses (on the device) and sample counts (on the host).

    Index 0 is the logging window, 1 the epoch. The loss sums stay a device
    tensor until a logging step reads them, so adding never syncs the host;
    one in-place add per micro-step serves both. Counts are host integers
    already, so they cost nothing until they join the logging step's collective.
    """

    device: torch.device
    loss_sums: torch.Tensor = field(init=False)
    counts: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: torch.Tensor, count: int) -> None:
        self.loss_sums += loss_sum.detach()
        self.counts[0] += count
        self.counts[1] += count

    def take(self, row: int, dist_state: DistState, extra: Optional[torch.Tensor] = None) -> list[float]:
        """All-reduce one row's [loss_sum, count] (one collective), reset it, return [loss_sum, count, *extra]."""
        count = torch.tensor([float(self.counts[row])], dtype=torch.float64, device=self.device)
        totals = dist_state.all_reduce_sum(torch.cat([self.loss_sums[row:row + 1], count]))
        self.loss_sums[row].zero_()
        self.counts[row] = 0
        if extra is not None:
            totals = torch.cat([totals, extra.detach().to(totals)])
        return totals.tolist()


    def global_state(self, dist_state: DistState) -> list[float]:
        """[window sum, window count, epoch sum, epoch count] over all ranks (one collective), for a checkpoint."""
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.device)
        both = torch.stack([self.loss_sums, counts], dim=1).reshape(-1)  # sum0, count0, sum1, count1
        return dist_state.all_reduce_sum(both).tolist()

    def load_global_state(self, values: list[float], is_main: bool) -> None:
        """Rank 0 takes the saved global sums, the others start from zero: the next take() adds them up."""
        if is_main:
            self.loss_sums = torch.tensor([values[0], values[2]], dtype=torch.float64, device=self.device)
            self.counts = [int(values[1]), int(values[3])]


@dataclass
class Timer:
    """Host wall time between logging steps, and the part spent waiting on the loader."""

    start: float = field(default_factory=time.perf_counter)
    data: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0
