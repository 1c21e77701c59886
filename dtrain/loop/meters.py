"""Loss sums and sample counts (and a weighted loss's weight sums: tokens) between logging steps, and the wall
time they took."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from dtrain.runtime.dist import DistState


WINDOW, EPOCH = 0, 1
"""The two rows of the sums: the logging window and the epoch."""


def record_sizes(samples: int, weight: Optional[float]) -> dict[str, float]:
    """A record's sample count, and a weighted loss's weight as `tokens` (a whole number when it is one)."""
    if weight is None:
        return {"samples": samples}
    return {"samples": samples, "tokens": int(weight) if float(weight).is_integer() else weight}


def _mean(total: float, samples: int, weight: Optional[float]) -> float:
    if weight is not None:  # a weighted loss: its mean over the weights (an ignored token counts nowhere)
        return total / weight if weight else math.nan
    return total / samples if samples else math.nan  # every step of the window skipped


@dataclass(frozen=True)
class WindowTotals:
    """A logging window's sums over all ranks."""

    loss_sum: float
    samples: int
    alarms: list[float]
    """The checks' flags, summed over the ranks (`loop.checks`)."""
    extra: list[float]
    """What rode along unreduced (the gradient norm, the same on every rank)."""
    weight: Optional[float] = None
    """A weighted loss's summed weights (its tokens); None for a per-sample loss."""

    @property
    def loss(self) -> float:
        return _mean(self.loss_sum, self.samples, self.weight)

    @property
    def sizes(self) -> dict[str, float]:
        return record_sizes(self.samples, self.weight)


@dataclass(frozen=True)
class EpochTotals:
    loss_sum: float
    samples: int
    weight: Optional[float] = None

    @property
    def loss(self) -> float:
        return _mean(self.loss_sum, self.samples, self.weight)

    @property
    def sizes(self) -> dict[str, float]:
        return record_sizes(self.samples, self.weight)


@dataclass
class Meter:
    """Sums of per-sample losses (on the device) and sample counts (on the host).

    Row WINDOW is the logging window, EPOCH the epoch. The loss sums stay on the device
    until a logging step reads them, so adding never syncs the host. Adding is
    not even a device op: a micro-step's loss is kept in a list, and the list is
    summed into both rows in one go when they are read (or every `FOLD_AT`
    micro-steps, to bound it). On a small model a CPU step is a few ms and each
    tiny op costs microseconds of dispatch, so this is a measurable share.
    Counts are host integers already, so they cost nothing until they join the
    logging step's collective. A weighted loss's weight sums (its tokens) are
    device values like the losses, kept the same way beside them.
    """

    device: torch.device
    loss_sums: torch.Tensor = field(init=False)
    counts: list[int] = field(default_factory=lambda: [0, 0])
    weighted: bool = False
    """Whether the loss is weighted: its means divide by weight_sums, not by the sample counts."""

    FOLD_AT = 512

    def __post_init__(self) -> None:
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.weight_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        # Samples of steps skipped on the device (train.on_nonfinite=skip), known only there.
        self.excluded = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._pending_weights: list[torch.Tensor] = []

    def add(self, loss_sum: torch.Tensor, count: int, weight: Optional[torch.Tensor] = None) -> None:
        self._pending.append(loss_sum.detach())
        if weight is not None:
            self.weighted = True
            self._pending_weights.append(weight)
        self.counts[0] += count
        self.counts[1] += count
        if len(self._pending) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """The pending losses into both rows: a few device ops, no host sync."""
        if self._pending:
            self.loss_sums += torch.stack(self._pending).to(torch.float64).sum()
            self._pending.clear()
        if self._pending_weights:
            self.weight_sums += torch.stack(self._pending_weights).to(torch.float64).sum()
            self._pending_weights.clear()

    def add_unless_skipped(self, loss_sum: torch.Tensor, count: int, ok: torch.Tensor,
                           weight: Optional[torch.Tensor] = None) -> None:
        """A whole step's loss sum and samples (and weight), left out where `ok` (a device flag) is false."""
        self.loss_sums += torch.where(ok, loss_sum.detach(), 0.0)
        self.excluded += torch.where(ok, 0.0, float(count))
        if weight is not None:
            self.weighted = True
            self.weight_sums += torch.where(ok, weight.detach().to(torch.float64), 0.0)
        self.counts[0] += count
        self.counts[1] += count

    def _counts(self, rows: slice) -> torch.Tensor:
        return torch.tensor(self.counts[rows], dtype=torch.float64, device=self.device) - self.excluded[rows]

    def take_window(self, dist_state: DistState, alarms: Optional[torch.Tensor] = None,
                    extra: Optional[torch.Tensor] = None) -> WindowTotals:
        """The logging window's totals over all ranks, with `alarms` summed alongside (the one
        collective of a logging step) and `extra` as this rank has it; the window starts over."""
        values = self._take(WINDOW, dist_state, alarms, extra)
        n = alarms.numel() if alarms is not None else 0
        return WindowTotals(values[0], int(values[1]), values[3:3 + n], values[3 + n:], self._weight(values[2]))

    def take_epoch(self, dist_state: DistState) -> EpochTotals:
        """The epoch's totals over all ranks (one collective); the epoch starts over."""
        values = self._take(EPOCH, dist_state)
        return EpochTotals(values[0], int(values[1]), self._weight(values[2]))

    def _weight(self, total: float) -> Optional[float]:
        return total if self.weighted else None

    def _take(self, row: int, dist_state: DistState, summed: Optional[torch.Tensor] = None,
              extra: Optional[torch.Tensor] = None) -> list[float]:
        self._fold()
        parts = [self.loss_sums[row:row + 1], self._counts(slice(row, row + 1)), self.weight_sums[row:row + 1]]
        if summed is not None:
            parts.append(summed.detach().to(torch.float64).reshape(-1))
        totals = dist_state.all_reduce_sum(torch.cat(parts))
        self.loss_sums[row].zero_()
        self.weight_sums[row].zero_()
        self.excluded[row].zero_()
        self.counts[row] = 0
        if extra is not None:
            totals = torch.cat([totals, extra.detach().reshape(-1).to(totals)])
        return totals.tolist()  # the host sync of a logging step: one, whatever rides along

    def global_state(self, dist_state: DistState) -> list[float]:
        """[window sum, window count, epoch sum, epoch count] over all ranks (one collective), for a checkpoint;
        a weighted loss's [window weight, epoch weight] follow."""
        self._fold()
        both = torch.stack([self.loss_sums, self._counts(slice(0, 2))], dim=1).reshape(-1)  # sum0, count0, ...
        if self.weighted:
            both = torch.cat([both, self.weight_sums])
        return dist_state.all_reduce_sum(both).tolist()

    def load_global_state(self, values: list[float], is_main: bool) -> None:
        """Rank 0 takes the saved global sums, the others start from zero: the next take() adds them up."""
        self._pending.clear()
        self._pending_weights.clear()
        self.weight_sums.zero_()
        self.weighted = len(values) > 4
        if is_main:
            self.loss_sums = torch.tensor([values[0], values[2]], dtype=torch.float64, device=self.device)
            self.counts = [int(values[1]), int(values[3])]
            if self.weighted:
                self.weight_sums = torch.tensor(values[4:6], dtype=torch.float64, device=self.device)
        self.excluded.zero_()


@dataclass
class Timer:
    """Host wall time between logging steps, and the part spent waiting on the loader."""

    start: float = field(default_factory=time.perf_counter)
    data: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0

    def stepped(self, fetch_s: float) -> None:
        self.steps += 1
        self.data += fetch_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Around work that is not training (an eval, a checkpoint): a window that spans it must not count
        it as train time, or its samples_per_s and step_time_s would drop at every epoch end or save."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began
