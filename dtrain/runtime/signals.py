"""Signals that mean "save and stop", handled so that no rank is left behind.

A handler only sets a flag: no collective and no file write may run inside a
signal handler (it can interrupt one already in progress). The loop then asks
all ranks at each optimizer-step boundary whether any of them got a signal
(`dist.LaggedAgreement`, one tiny all-reduce on a host group, run behind the next step), so every rank saves
the same step and stops, whether Slurm signalled all ranks, one rank, or only
the batch shell that forwards it.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional, Sequence


_PIPES: set[tuple[int, int]] = set()
"""The wakeup pipes of the StopSignals active in this process."""


def _forget_pipes_after_fork() -> None:
    """In a forked child (a DataLoader worker, a user's Pool): a signal to the child must not be
    written into the parent's wakeup pipe, where the parent's monitor would take it for its own."""
    if not _PIPES:
        return
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from a thread other than the main one: no wakeup fd to clear there
        pass
    for pipe in list(_PIPES):
        for fd in pipe:
            try:
                os.close(fd)
            except OSError:
                pass
    _PIPES.clear()


os.register_at_fork(after_in_child=_forget_pipes_after_fork)

TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPEAT_MEANS_NOW_S = 3.0
BLOCKED_S = 5.0
"""How long after a SIGTERM the main thread may stay inside native code without running Python
(a collective waiting for a stalled peer, which holds off every Python signal handler until it
returns or times out) before this rank exits without a checkpoint."""


class StopSignals:
    """Installs flag-setting handlers for the configured signals while a `with` block runs.

    SIGTERM means something else when a peer has died: torchrun then SIGTERMs
    the survivors, which can never reach a step boundary together again. So a
    rank that has not reached one `grace_s` after a SIGTERM stops
    without saving (a SIGINT to the main thread, whose KeyboardInterrupt closes
    the loggers on the way out), before the launcher's own SIGKILL (torchrun and
    Slurm wait about 30 s); it stops at once when `peers` says another rank failed.

    A Python handler only runs when the main thread runs Python, which it does not while it
    waits in a collective. So a monitor thread also watches the signals (through the wakeup fd
    that CPython writes each signal number to), and a rank whose main thread has not seen a
    SIGTERM BLOCKED_S after it arrived exits from there, in one line.
    """

    def __init__(self, names: Sequence[str], grace_s: float = 20.0, peers: Any = None) -> None:
        self.names = tuple(names)
        self.grace_s = grace_s
        self.peers = peers
        """dist.PeerWatch (failure(), announce_failure(line)), or None for one process."""
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}
        self._first_at = 0.0
        self._acknowledged = False
        self._term: Optional[tuple[int, float]] = None
        self._done = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self._pipe: Optional[tuple[int, int]] = None
        self._old_wakeup = -1
        self._busy = 0
        self._gave_up_at: Optional[float] = None

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Around work every rank does together that may keep some of them waiting in native code
        for long (a checkpoint save: rank 0 writes, the others wait in a broadcast): a SIGTERM
        then waits for it, within grace_s, instead of counting as blocked after BLOCKED_S."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def acknowledge(self) -> None:
        """The ranks met at a step boundary and agreed to save: no deadline any more."""
        self._acknowledged = True

    def _give_up(self, why: str) -> None:
        self._gave_up_at = time.monotonic()
        print(f"dtrain: {why}; stopping without a checkpoint", file=sys.stderr, flush=True)
        # A real SIGINT to the main thread: it also wakes a sleep or a blocking read there, which
        # _thread.interrupt_main() would not. Its default handler raises KeyboardInterrupt.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
            return self
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        if any(getattr(signal, n) in TERMINATING for n in self.names):
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._pipe = (r, w)
            _PIPES.add(self._pipe)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._monitor = threading.Thread(target=self._watch, args=(r,), name="dtrain-stop-signals", daemon=True)
            self._monitor.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.acknowledge()
        if self._monitor is not None:
            self._done.set()
            self._monitor.join(timeout=5)
            signal.set_wakeup_fd(self._old_wakeup)
        if self._pipe is not None:
            _PIPES.discard(self._pipe)
            if self._monitor is None or not self._monitor.is_alive():  # never close an fd a thread still reads
                for fd in self._pipe:
                    os.close(fd)
            self._pipe = None
        for signum, previous in self._previous.items():
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _watch(self, fd: int) -> None:
        terminating = {int(getattr(signal, n)) for n in self.names if getattr(signal, n) in TERMINATING}
        while not self._done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.25)
            if ready:
                try:
                    data = os.read(fd, 64)
                except OSError:
                    return
                for signum in data:
                    if signum in terminating and self._term is None:
                        self._term = (signum, time.monotonic())
            if self._term is None or self._acknowledged:
                continue
            signum, at = self._term
            name = signal.Signals(signum).name
            now = time.monotonic()
            if self._gave_up_at is not None:
                # The SIGINT of _give_up cannot land while the main thread is inside a collective.
                if now - self._gave_up_at > BLOCKED_S:
                    self._exit_blocked(name, signum, f"{BLOCKED_S:g} s after giving up, this rank is still inside a "
                                                     "collective or other native call")
                continue
            waited = now - at
            if self.received is None and waited > BLOCKED_S and not self._busy:
                self._exit_blocked(name, signum, f"{name} arrived {BLOCKED_S:g} s ago while this rank waited inside "
                                                 "a collective or other native call (a stalled or dead peer?) that "
                                                 "has not returned")
            failure = self.peers.failure() if self.peers is not None else None
            if failure is not None:
                self._give_up(f"{failure}, so no step boundary will come")
            elif waited > self.grace_s:
                self._give_up(f"no step boundary reached within {self.grace_s:g} s of {name} (is a peer gone?)")

    def _exit_blocked(self, name: str, signum: int, line: str) -> None:
        if self.peers is not None:
            self.peers.announce_failure(f"a rank exited on {name} while blocked")
        who = f" rank {self.peers.rank}:" if self.peers is not None else ""
        print(f"dtrain:{who} {line}; exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self._gave_up_at is not None and signum == signal.SIGINT:
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
            # SIGTERM is the launcher's last word (SIGKILL follows in about 30 s), and what torchrun
            # sends when a peer died: the monitor thread gives up if no boundary comes in grace_s.
            # USR1/USR2 are advance notice (Slurm's --signal=USR1@120): no deadline for them.


# --- DataLoader workers -------------------------------------------------------------------------------------
# torch and multiprocessing stop workers with SIGTERM (and a join without timeout at exit):
# a worker that ignored it, or took it for "save and stop", would hang its rank's exit.
_WORKERS_MUST_HEED = ("SIGINT", "SIGHUP")
WORKER_SIGTERM_GRACE_S = 60.0
"""How long a DataLoader worker outlives a SIGTERM: its rank stops at the next step boundary and
then ends its workers the normal way, so this only bounds a worker that is stuck in user code."""


def worker_signals(names: tuple[str, ...], worker_id: int) -> None:
    """In each DataLoader worker (its worker_init_fn, with the run's stop signals bound as `names`):
    forget the parent's stop-signal handlers (a forked worker inherits them). Slurm signals every
    process of a step: at a time limit, a preemption or a requeue the workers get the same SIGTERM
    (or --signal's USR1) as their rank, and a worker that died of it would fail the rank's next
    batch before the rank reaches the step boundary where it saves. So USR1/USR2 are ignored, and
    SIGTERM ends the worker only after a grace period."""
    for name in names:
        sig = getattr(signal, name)
        if name == "SIGTERM":
            signal.signal(sig, _delayed_exit)
        else:
            signal.signal(sig, signal.SIG_DFL if name in _WORKERS_MUST_HEED else signal.SIG_IGN)


def _delayed_exit(signum: int, frame: Any) -> None:
    if not getattr(_delayed_exit, "armed", False):
        _delayed_exit.armed = True  # type: ignore[attr-defined]
        timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()
