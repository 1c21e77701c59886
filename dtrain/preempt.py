"""Signals that mean "save and stop", handled so that no rank is left behind.

A handler only sets a flag: no collective and no file write may run inside a
signal handler (it can interrupt one already in progress). The loop then asks
all ranks at each optimizer-step boundary whether any of them got a signal
(`dist.LaggedAgreement`, one tiny all-reduce on a host group, run behind the next step), so every rank saves
the same step and stops, whether Slurm signalled all ranks, one rank, or only
the batch shell that forwards it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Optional, Sequence


TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPEAT_MEANS_NOW_S = 3.0


class StopSignals:
    """Installs flag-setting handlers for the configured signals while a `with` block runs.

    SIGTERM means something else when a peer has died: torchrun then SIGTERMs
    the survivors, which can never reach a step boundary together again. So a
    rank that has not reached one `grace_s` after a SIGTERM stops
    without saving (a SIGINT to the main thread, whose KeyboardInterrupt closes
    the loggers on the way out), before the launcher's own SIGKILL (torchrun and
    Slurm wait about 30 s).
    """

    def __init__(self, names: Sequence[str], grace_s: float = 20.0) -> None:
        self.names = tuple(names)
        self.grace_s = grace_s
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None
        self._giving_up = False
        self._first_at = 0.0

    def acknowledge(self) -> None:
        """The ranks met at a step boundary and agreed to save: no deadline any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _give_up(self) -> None:
        self._giving_up = True
        print(f"dtrain: no step boundary reached within {self.grace_s:g} s of {self.received} (is a peer gone?); "
              "stopping without a checkpoint", file=sys.stderr, flush=True)
        # A real SIGINT to the main thread: it also wakes a sleep or a blocking read there, which
        # _thread.interrupt_main() would not. Its default handler raises KeyboardInterrupt.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for name in self.names:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.acknowledge()
        for signum, previous in self._previous.items():
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self._giving_up and signum == signal.SIGINT:
            raise KeyboardInterrupt  # our own, from _give_up, where SIGINT is one of the stop signals
        if (self.received == name and signum in TERMINATING
                and time.monotonic() - self._first_at > REPEAT_MEANS_NOW_S):
            # The same signal again, well after the first: the launcher is out of patience (or
            # Ctrl-C, again). Within moments it is the same event reaching us twice (Slurm's
            # SIGTERM to every process and torchrun's forwarded copy), and changes nothing.
            raise SystemExit(128 + signum)
        if self.received is None:
            self.received = name
            self._first_at = time.monotonic()
            print(f"dtrain: received {name}; saving a checkpoint at the next step boundary, then stopping",
                  file=sys.stderr, flush=True)
            if signum in TERMINATING:
                # SIGTERM is the launcher's last word (SIGKILL follows in about 30 s), and what
                # torchrun sends when a peer died: do not wait for a boundary that may never come.
                # USR1/USR2 are advance notice (Slurm's --signal=USR1@120): no deadline here.
                self._timer = threading.Timer(self.grace_s, self._give_up)
                self._timer.daemon = True
                self._timer.start()
