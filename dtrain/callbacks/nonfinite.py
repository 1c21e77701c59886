"""train.on_nonfinite as a check: the guard's device flags ride the logging collective (and the checks
before a checkpoint and at the end); every rank settles them alike and stops at the same check."""

from __future__ import annotations

import math
from typing import Optional

import torch

from dtrain.loop.hooks import Callback, RunView
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.state import TrainState


class NonFiniteCheck(Callback):
    requests_alone = False

    def __init__(self, guard: NonFiniteGuard, state: TrainState) -> None:
        self.guard, self.state = guard, state

    def alarm(self) -> torch.Tensor:
        return self.guard.pending()

    def settle(self, total: float) -> Optional[Exception]:
        skipped, error = self.guard.settle(total, self.state.dist, self.state.step)
        self.state.skipped_steps += skipped
        return error

    def on_log(self, run: RunView) -> None:
        # Reached only when the check passed: the record's loss is the newest one known to be finite.
        loss = run.record.values.get("loss") if run.record is not None else None
        if isinstance(loss, float) and math.isfinite(loss):
            self.guard.last_finite = (run.step, loss)
