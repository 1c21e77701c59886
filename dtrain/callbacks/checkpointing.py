"""When to checkpoint: every checkpoint.every_steps steps, every checkpoint.every_minutes minutes (by rank
0's clock, agreed with the others), and whenever a callback asks (a stop signal does); the save itself
(every rank gathers, rank 0 commits) is the checkpointer's (`dtrain.checkpoint.saving`)."""

from __future__ import annotations

import time
from typing import Optional, Protocol

from dtrain.loop.checks import Checks
from dtrain.loop.hooks import Callback, RunView
from dtrain.loop.meters import Meter
from dtrain.loop.state import TrainState


class Saves(Protocol):
    def save(self, state: TrainState, meter: Meter) -> None: ...


class Checkpointing(Callback):
    def __init__(self, checkpointer: Saves, meter: Meter, checks: Checks, every_steps: Optional[int] = None,
                 every_minutes: Optional[float] = None) -> None:
        self.checkpointer, self.meter, self.checks = checkpointer, meter, checks
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.requests_alone = every_minutes is not None  # rank 0's clock decides for all
        self._last_save = time.monotonic()
        self._asked = False

    def on_boundary(self, run: RunView) -> None:
        if self.every_steps is not None and run.step % self.every_steps == 0:
            run.request_save(all_ranks=True)
        if (self.every_minutes is not None and run.is_main and not self._asked
                and time.monotonic() - self._last_save >= 60 * self.every_minutes):
            self._asked = True  # asked once: the agreement brings it back to every rank a round later
            run.request_save()

    def on_save(self, run: RunView) -> None:
        self.checks.check_now()  # no non-finite weights saved; a log that failed stops every rank first
        self.checkpointer.save(run.state, self.meter)
        self._last_save, self._asked = time.monotonic(), False
