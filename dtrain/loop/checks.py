"""Checks that ride a collective the loop makes anyway: each rank raises a flag on the device, the
logging step's all-reduce sums the flags, and every rank settles them alike, so all stop together.

Before a checkpoint and at the end there is no logging step to ride: `check_now` makes one tiny
collective of its own, so nothing non-finite is saved and no failed log goes unnoticed.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from dtrain.runtime.dist import DistState


class Check(Protocol):
    def alarm(self) -> torch.Tensor:
        """This rank's flag: one float64 value on the device, summed over the ranks."""
        ...

    def settle(self, total: float) -> Optional[Exception]:
        """Every rank, with the same sum: the error that ends the run here, or None."""
        ...


class Agreement(Protocol):
    def settle(self) -> None: ...


class Checks:
    def __init__(self, dist_state: DistState, checks: Sequence[Check], agreement: Agreement) -> None:
        self.dist_state = dist_state
        self.checks = list(checks)
        self.agreement = agreement
        """The loop's lagged agreement: its round in flight is collected before an error ends the run."""

    def alarms(self) -> torch.Tensor:
        if not self.checks:
            return torch.zeros(0, dtype=torch.float64, device=self.dist_state.device)
        return torch.cat([c.alarm().reshape(1) for c in self.checks])

    def settle(self, totals: Sequence[float]) -> Optional[Exception]:
        """The first error of the checks, in order, with the flags summed over the ranks."""
        for check, total in zip(self.checks, totals):
            error = check.settle(total)
            if error is not None:
                return error
        return None

    def fail(self, error: Exception) -> None:
        """Raise a settled error, leaving no collective in flight behind it."""
        self.agreement.settle()
        raise error

    def check_now(self) -> None:
        """One tiny collective of its own (before a checkpoint, at the end)."""
        error = self.settle(self.dist_state.all_reduce_sum(self.alarms()).tolist())
        if error is not None:
            self.fail(error)
