"""The one owner of this process's signal handlers: stop signals, SIGTERM while the loggers are open,
and (at the end) the DataLoader workers' policy.

Every handler here only notes the signal (a flag, and a byte that wakes a monitor thread). A Python
handler runs between two bytecodes of whatever the main thread was doing: one that printed could
land inside a print already writing to stderr (a reentrant write raises), and one that raised could
tear a file write or the Python side of a collective half-way. What a signal leads to (a line on
stderr, the main thread interrupted, an exit code) is decided by the monitor thread, from those
flags, or by the main thread where a scope ends.

Two scopes, nested on rank 0: `TerminationGuard` while rank 0's loggers are open, and inside it
`StopSignals` while the loop runs (every rank). The inner one takes over the signals it names and
gives them back when it ends.

For a stop signal the loop asks all ranks at each optimizer-step boundary whether any of them got one
(`agreement.LaggedAgreement`, one tiny all-reduce on a host group, run behind the next step), so every
rank saves the same step and stops, whether Slurm signalled all ranks, one rank, or only the batch
shell that forwards it.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional, Sequence


TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REPEAT_MEANS_NOW_S = 3.0
BLOCKED_S = 5.0
"""How long after a SIGTERM the main thread may stay inside native code without running Python
(a collective waiting for a stalled peer, which holds off every Python signal handler until it
returns or times out) before this rank exits without a checkpoint."""

_SPARE: Optional[int] = getattr(signal, "SIGRTMAX", None)
"""What interrupts the main thread where SIGINT cannot (a stop signal itself, or ignored): a real-time
signal nothing else uses, given Python's KeyboardInterrupt handler while a scope is installed."""

_ACTIVE: set["_FlagScope"] = set()
"""The scopes installed in this process (their pipes are closed in a forked child)."""


def _forget_pipes_after_fork() -> None:
    """In a forked child (a DataLoader worker, a user's Pool): a signal to the child must not be
    written into the parent's wakeup pipe, where the parent's monitor would take it for its own."""
    if not _ACTIVE:
        return
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from a thread other than the main one: no wakeup fd to clear there
        pass
    for scope in list(_ACTIVE):
        pipe, scope._pipe = scope._pipe, None  # the child's handler (inherited) then writes nowhere
        for fd in pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass
    _ACTIVE.clear()


os.register_at_fork(after_in_child=_forget_pipes_after_fork)


class _FlagScope:
    """The flag-only handler on `names`, a pipe that wakes the monitor thread, and that thread, from
    `_install()` to `_uninstall()` (main thread only: signal.signal works nowhere else). The monitor
    calls `_react` on every wake-up and at least every 0.25 s; what the signals mean is the subclass's."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.arrived: list[tuple[int, float]] = []
        """(signal number, time.monotonic()) of each signal whose handler ran, in order of arrival."""
        self._exit_code: Optional[int] = None
        """Set by the monitor when it interrupts the main thread: the code the KeyboardInterrupt becomes."""
        self._previous: dict[int, Any] = {}
        self._pipe: Optional[tuple[int, int]] = None
        self._old_wakeup = -1
        self._done = threading.Event()
        self._monitor: Optional[threading.Thread] = None

    def _flag(self, signum: int, frame: Optional[FrameType]) -> None:
        """The handler: note the signal and wake the monitor; nothing else (see the module's docstring)."""
        self.arrived.append((signum, time.monotonic()))
        pipe = self._pipe
        if pipe is not None:
            try:
                os.write(pipe[1], b"\0")  # 0 is no signal's number: "a handler ran"
            except OSError:  # full: the monitor has bytes to read anyway
                pass

    def _install(self, thread_name: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        _ACTIVE.add(self)
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._flag)
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler and _SPARE is not None \
                and signal.getsignal(_SPARE) in (signal.SIG_DFL, None):
            self._previous[_SPARE] = signal.signal(_SPARE, signal.default_int_handler)
        # CPython writes each signal's number here as it arrives, even while the main thread is inside
        # native code and no Python handler can run: the monitor learns of a SIGTERM that the loop cannot.
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._monitor = threading.Thread(target=self._watch, args=(r,), name=thread_name, daemon=True)
        self._monitor.start()

    def _interrupt(self) -> None:
        """Make the main thread raise KeyboardInterrupt: a real signal, so that it also wakes a sleep or
        a blocking read there, which _thread.interrupt_main() would not. SIGINT, whose handler is then
        Python's own (not one of these); where SIGINT is one of ours or ignored, the spare; where neither
        can be had (no real-time signals, or the spare taken), interrupt_main, which still raises at the
        main thread's next line of Python."""
        for signum in (signal.SIGINT, _SPARE):
            if signum is not None and signal.getsignal(signum) is signal.default_int_handler:
                signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]
                return
        _thread.interrupt_main()

    def _uninstall(self) -> None:
        if self._monitor is not None:
            self._done.set()
            self._monitor.join(timeout=5)
            signal.set_wakeup_fd(self._old_wakeup)
        if self._pipe is not None:
            _ACTIVE.discard(self)
            if self._monitor is None or not self._monitor.is_alive():  # never close an fd a thread still reads
                for fd in self._pipe:
                    os.close(fd)
            self._pipe = None
        for signum, previous in self._previous.items():
            # None: a handler set outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _watch(self, fd: int) -> None:
        while not self._done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.25)
            delivered = b""
            if ready:
                try:
                    delivered = os.read(fd, 64)
                except OSError:
                    return
            self._react(bytes(b for b in delivered if b), time.monotonic())

    def _react(self, delivered: bytes, now: float) -> None:
        """On the monitor thread: `delivered` holds the numbers of the signals that arrived since the
        last call, whether or not the main thread has run their handler yet."""

    def _exit_instead(self, exc_type: Any) -> Optional[int]:
        """The exit code that the KeyboardInterrupt from `_interrupt` stands for (None: not ours)."""
        return self._exit_code if exc_type is KeyboardInterrupt else None


class StopSignals(_FlagScope):
    """Save at the next step boundary, then stop, on the configured signals while a `with` block runs.

    SIGTERM means something else when a peer has died: torchrun then SIGTERMs
    the survivors, which can never reach a step boundary together again. So a
    rank that has not reached one `grace_s` after a SIGTERM stops
    without saving (the monitor interrupts the main thread, whose KeyboardInterrupt closes
    the loggers on the way out), before the launcher's own SIGKILL (torchrun and
    Slurm wait about 30 s); it stops at once when `peers` says another rank failed.

    A Python handler only runs when the main thread runs Python, which it does not while it
    waits in a collective. So the monitor also watches the signals as they arrive (through the
    wakeup fd that CPython writes each signal number to), and a rank whose main thread has not seen a
    SIGTERM BLOCKED_S after it arrived exits from there, in one line.
    """

    def __init__(self, names: Sequence[str], grace_s: float = 20.0, peers: Any = None) -> None:
        super().__init__(names)
        self.grace_s = grace_s
        self.peers = peers
        """peers.PeerWatch (failure(), announce_failure(line)), or None for one process."""
        self._announced = False
        self._acknowledged = False
        self._term: Optional[tuple[int, float]] = None
        self._busy = 0
        self._gave_up_at: Optional[float] = None

    @property
    def received(self) -> Optional[str]:
        """The first of `names` whose handler ran (the main thread saw it), or None."""
        return signal.Signals(self.arrived[0][0]).name if self.arrived else None

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

    def __enter__(self) -> "StopSignals":
        if self.names:
            self._install("dtrain-stop-signals")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.acknowledge()
        self._uninstall()
        self._announce()  # a signal the monitor had no time to say
        code = self._exit_instead(exc_type)
        if code is not None:
            raise SystemExit(code) from None

    def _announce(self) -> None:
        if self.arrived and not self._announced:
            self._announced = True
            print(f"dtrain: received {self.received}; saving a checkpoint at the next step boundary, then stopping",
                  file=sys.stderr, flush=True)
            # SIGTERM is the launcher's last word (SIGKILL follows in about 30 s), and what torchrun
            # sends when a peer died: the monitor gives up if no boundary comes in grace_s.
            # USR1/USR2 are advance notice (Slurm's --signal=USR1@120): no deadline for them.

    def _react(self, delivered: bytes, now: float) -> None:
        terminating = {int(getattr(signal, n)) for n in self.names if getattr(signal, n) in TERMINATING}
        for signum in delivered:
            if signum in terminating and self._term is None:
                self._term = (signum, now)
        self._announce()
        self._check_repeat()
        self._check_deadline(now)

    def _check_repeat(self) -> None:
        """The same signal again, well after the first: the launcher is out of patience (or Ctrl-C,
        again), and the run exits now with 128 + its number. Within moments it is the same event
        reaching us twice (Slurm's SIGTERM to every process and torchrun's forwarded copy), and
        changes nothing."""
        if self._exit_code is not None or not self.arrived:
            return
        first, first_at = self.arrived[0]
        if first not in TERMINATING:
            return
        if any(signum == first and at - first_at > REPEAT_MEANS_NOW_S for signum, at in self.arrived[1:]):
            self._exit_code = 128 + first
            if self._gave_up_at is None:  # else the main thread is already on its way out
                self._interrupt()

    def _check_deadline(self, now: float) -> None:
        if self._term is None or self._acknowledged:
            return
        signum, at = self._term
        name = signal.Signals(signum).name
        if self._gave_up_at is not None:
            # The interrupt of _give_up cannot land while the main thread is inside a collective.
            if now - self._gave_up_at > BLOCKED_S:
                self._exit_blocked(name, signum, f"{BLOCKED_S:g} s after giving up, this rank is still inside a "
                                                 "collective or other native call")
            return
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

    def _give_up(self, why: str) -> None:
        self._gave_up_at = time.monotonic()
        print(f"dtrain: {why}; stopping without a checkpoint", file=sys.stderr, flush=True)
        self._interrupt()

    def _exit_blocked(self, name: str, signum: int, line: str) -> None:
        if self.peers is not None:
            self.peers.announce_failure(f"a rank exited on {name} while blocked")
        who = f" rank {self.peers.rank}:" if self.peers is not None else ""
        print(f"dtrain:{who} {line}; exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)


class TerminationGuard(_FlagScope):
    """SIGTERM while rank 0's loggers are open ends the run through their close (exit 143); a SIGTERM
    during the close waits for it.

    torchrun stops the surviving ranks with SIGTERM when one rank fails, and
    Slurm does the same at a time limit or preemption. Python's default action
    kills the process on the spot, so rank 0 would leave a W&B run that never
    finishes, and any TensorBoard events still in the writer's queue unwritten. The monitor
    interrupts the main thread instead, which unwinds the training loop through the loggers'
    close (torchrun and Slurm wait about 30 s before SIGKILL). While `StopSignals` holds SIGTERM
    (checkpoint.signals), a SIGTERM is its: save, then stop.

    A scope of its own, not a mode of StopSignals: it is rank 0's, begins when the loggers open
    and outlasts the loop, since it must also cover their close.
    """

    def __init__(self) -> None:
        super().__init__(("SIGTERM",))
        self._closing = False
        self._lock = threading.Lock()
        """Held by the monitor from its look at `_closing` to its interrupt, so the two cannot cross."""

    def install(self) -> None:
        self._install("dtrain-sigterm-guard")

    @contextmanager
    def closing(self, exc_type: Any) -> Iterator[None]:
        """Around the loggers' close, the end of the guard: a SIGTERM now waits for the close. After it,
        the exit a SIGTERM asked for (128 + SIGTERM) replaces a normal end, and the KeyboardInterrupt
        the monitor raised to get here (`exc_type`); another exception stays as it is."""
        with self._lock:
            self._closing = True
        if self._exit_code is not None and exc_type is None:
            # The monitor interrupted the main thread just before the close began: take that
            # KeyboardInterrupt here, where it changes nothing, not inside a logger's close.
            try:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            except KeyboardInterrupt:
                pass
        try:
            yield
        finally:
            self._uninstall()
        code = 128 + signal.SIGTERM if exc_type is None and self.arrived else self._exit_instead(exc_type)
        if code is not None:
            raise SystemExit(code) from None

    def _react(self, delivered: bytes, now: float) -> None:
        with self._lock:
            if not self.arrived or self._closing or self._exit_code is not None:
                return
            self._exit_code = 128 + signal.SIGTERM
            print("dtrain: received SIGTERM; closing the loggers before exiting", file=sys.stderr, flush=True)
            self._interrupt()


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
