"""Loss sums and sample counts between logging steps, and the wall time they took."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from dtrain.runtime.dist import DistState


@dataclass
class Meter:
    """Sums of per-sample losses (on the device) and sample counts (on the host).

    Index 0 is the logging window, 1 the epoch. The loss sums stay on the device
    until a logging step reads them, so adding never syncs the host. Adding is
    not even a device op: a micro-step's loss is kept in a list, and the list is
    summed into both rows in one go when they are read (or every `FOLD_AT`
    micro-steps, to bound it). On a small model a CPU step is a few ms and each
    tiny op costs microseconds of dispatch, so this is a measurable share.
    Counts are host integers already, so they cost nothing until they join the
    logging step's collective.
    """

    device: torch.device
    loss_sums: torch.Tensor = field(init=False)
    counts: list[int] = field(default_factory=lambda: [0, 0])

    FOLD_AT = 512

    def __post_init__(self) -> None:
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        # Samples of steps skipped on the device (train.on_nonfinite=skip), known only there.
        self.excluded = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._pending: list[torch.Tensor] = []

    def add(self, loss_sum: torch.Tensor, count: int) -> None:
        self._pending.append(loss_sum.detach())
        self.counts[0] += count
        self.counts[1] += count
        if len(self._pending) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """The pending losses into both rows: a few device ops, no host sync."""
        if self._pending:
            self.loss_sums += torch.stack(self._pending).to(torch.float64).sum()
            self._pending.clear()

    def add_unless_skipped(self, loss_sum: torch.Tensor, count: int, ok: torch.Tensor) -> None:
        """A whole step's loss sum and samples, left out where `ok` (a device flag) is false."""
        self.loss_sums += torch.where(ok, loss_sum.detach(), 0.0)
        self.excluded += torch.where(ok, 0.0, float(count))
        self.counts[0] += count
        self.counts[1] += count

    def _counts(self, rows: slice) -> torch.Tensor:
        return torch.tensor(self.counts[rows], dtype=torch.float64, device=self.device) - self.excluded[rows]

    def take(self, row: int, dist_state: DistState, extra: Optional[torch.Tensor] = None,
             summed: Optional[torch.Tensor] = None) -> list[float]:
        """All-reduce one row's [loss_sum, count, *summed] (one collective), reset the row, return
        [loss_sum, count, *summed, *extra] (`extra` as this rank has it)."""
        self._fold()
        parts = [self.loss_sums[row:row + 1], self._counts(slice(row, row + 1))]
        if summed is not None:
            parts.append(summed.detach().to(torch.float64))
        totals = dist_state.all_reduce_sum(torch.cat(parts))
        self.loss_sums[row].zero_()
        self.excluded[row].zero_()
        self.counts[row] = 0
        if extra is not None:
            totals = torch.cat([totals, extra.detach().to(totals)])
        return totals.tolist()

    def global_state(self, dist_state: DistState) -> list[float]:
        """[window sum, window count, epoch sum, epoch count] over all ranks (one collective), for a checkpoint."""
        self._fold()
        both = torch.stack([self.loss_sums, self._counts(slice(0, 2))], dim=1).reshape(-1)  # sum0, count0, ...
        return dist_state.all_reduce_sum(both).tolist()

    def load_global_state(self, values: list[float], is_main: bool) -> None:
        """Rank 0 takes the saved global sums, the others start from zero: the next take() adds them up."""
        self._pending.clear()
        if is_main:
            self.loss_sums = torch.tensor([values[0], values[2]], dtype=torch.float64, device=self.device)
            self.counts = [int(values[1]), int(values[3])]
        self.excluded.zero_()


@dataclass
class Timer:
    """Host wall time between logging steps, and the part spent waiting on the loader."""

    start: float = field(default_factory=time.perf_counter)
    data: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0
