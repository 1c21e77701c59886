"""Signals that mean "save and stop", handled so that no rank is left behind.

A handler only sets a flag: no collective and no file write may run inside a
signal handler (it can interrupt one already in progress). The loop then asks
all ranks at each optimizer-step boundary whether any of them got a signal
(`DistState.any_of`, one tiny all-reduce on a host group), so every rank saves
the same step and stops, whether Slurm signalled all ranks, one rank, or only
the batch shell that forwards it.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional, Sequence


class StopSignals:
    """Installs flag-setting handlers for the configured signals while a `with` block runs."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for name in self.names:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum in (signal.SIGTERM, signal.SIGINT):
            # Asked twice: the launcher is out of patience (or the user pressed Ctrl-C again).
            raise SystemExit(128 + signum)
        if self.received is None:
            self.received = name
            print(f"dtrain: received {name}; saving a checkpoint at the next step boundary, then stopping",
                  file=sys.stderr, flush=True)
