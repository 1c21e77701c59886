"""Another rank's process on this host, named so that a process given the same pid later is never
taken for it: what lets a rank end a peer that is frozen (SIGSTOP, swapped out) and cannot end itself.

A frozen rank runs no Python, so the launcher's SIGTERM does nothing to it; torchrun then waits 30 s
before its SIGKILL (Slurm's srun, its KillWait), and the job outlives dist.timeout_s by that much.
A name here is the machine (boot id and pid namespace: two containers on one host share the
first, not the second), the pid and the process's start time. Linux only: elsewhere there is no
name, and nothing is ended.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Optional

_STATES = {"T": "stopped (SIGSTOP?)", "t": "stopped by a debugger", "D": "stuck in the kernel (swapping?)",
           "Z": "dead", "R": "running", "S": "asleep"}
_STOPPED = ("T", "t")
"""The only states in which a silent process is surely frozen: one running or asleep may be busy in native
code or on its way out, and is left to the launcher."""


def _stat(pid: int) -> Optional[tuple[str, str]]:
    """(state letter, start time in clock ticks since boot) of `pid`, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold anything
    return fields[0], fields[19]


def _machine() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def name_of_this_process() -> Optional[str]:
    machine, stat = _machine(), _stat(os.getpid())
    if machine is None or stat is None:
        return None
    return f"{machine} {os.getpid()} {stat[1]}"


@dataclass(frozen=True)
class LocalPeer:
    pid: int
    start: str
    state: str
    """What the process is doing, in words: 'stopped (SIGSTOP?)', 'running', ..."""
    stopped: bool = False
    """Stopped by a signal or a debugger: it runs nothing until continued, so it is frozen."""


def find(name: Optional[str]) -> Optional[LocalPeer]:
    """The live process `name` (from name_of_this_process in another process), when it runs on this
    machine and is not this process; else None."""
    if not name:
        return None
    try:
        machine, pid_text, start = name.rsplit(" ", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if machine != _machine() or pid == os.getpid():
        return None
    stat = _stat(pid)
    if stat is None or stat[1] != start or stat[0] == "Z":
        return None
    return LocalPeer(pid, start, _STATES.get(stat[0], f"in state {stat[0]}"), stat[0] in _STOPPED)


def kill(peer: LocalPeer) -> bool:
    """SIGKILL `peer` if that pid is still the same process and still stopped; whether it was sent.

    Through a pidfd where there is one: opened first and the identity checked after, the signal cannot
    reach a process that took the pid between the check and the kill."""
    try:
        handle: Optional[int] = os.pidfd_open(peer.pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        handle = None  # no pidfd (kernel < 5.3, not Linux) or no such process: checked below
    try:
        stat = _stat(peer.pid)
        if stat is None or stat[1] != peer.start or stat[0] not in _STOPPED:
            return False
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGKILL)  # type: ignore[attr-defined]
        else:
            os.kill(peer.pid, signal.SIGKILL)
    except OSError:
        return False
    finally:
        if handle is not None:
            os.close(handle)
    return True
