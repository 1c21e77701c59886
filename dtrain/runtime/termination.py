"""SIGTERM handling while rank 0's loggers are open."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional


class TerminationGuard:
    """Turns SIGTERM into SystemExit while loggers are open, and holds it off while they close.

    torchrun stops the surviving ranks with SIGTERM when one rank fails, and
    Slurm does the same at a time limit or preemption. Python's default action
    kills the process on the spot, so rank 0 would leave a W&B run that never
    finishes, and any TensorBoard events still in the writer's queue unwritten. Raising
    instead unwinds the training loop through MultiLogger.__exit__; a SIGTERM
    that lands during the close itself is held until the close is done
    (torchrun and Slurm wait about 30 s before SIGKILL).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._closing = False
        self.deferred = False

    def install(self) -> None:
        # signal.signal only works in the main thread; elsewhere keep the default.
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def closing(self) -> None:
        self._closing = True

    def uninstall(self) -> None:
        if self._installed:
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._closing:
            self.deferred = True
            return
        print("dtrain: received SIGTERM; closing the loggers before exiting", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
