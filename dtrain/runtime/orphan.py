"""Ranks that outlive their launcher: each rank whose parent is the launcher watches that parent, and
stops when it is gone.

torchrun and `accelerate launch` (torch's elastic agent) start each rank in a session of its own,
so when the agent dies by SIGKILL or the OOM killer, nothing reaches the ranks: no SIGTERM from the
agent, no hang-up from a terminal. Left alone they train on with nobody to collect them, or, when
it died while they started, wait in the connection to its store (the agent hosted it) for 15-20
minutes, holding their GPUs all that time.

A daemon thread compares `os.getppid()` with the launcher's pid every POLL_S (0.25 s): an orphan is
handed to another parent, so the number changes (cheaper than a signal to the pid, and immune to
the pid's reuse). On the change the rank says so in one line, then does what the launcher would
have done before dying: SIGTERM to itself, which the run's own handling turns into the right end
(in the loop: save at the next step boundary, as on any SIGTERM; rank 0's loggers closed; during
set-up: the default, an exit at once), and GRACE_S later a hard exit, the launcher's SIGKILL, for
a rank that the SIGTERM did not end (blocked in a collective with a peer that is already gone).
The thread runs while the main thread waits in the store's connect or in a gloo collective: torch
releases the GIL there (checked under torchrun). Not PR_SET_PDEATHSIG: it fires when the *thread*
that forked the rank ends, not the launcher, and it kills without a word.

Only launches whose parent is the launcher are watched: torchrun / `accelerate launch` (the elastic
agent) and srun (slurmstepd), whether the rank runs `python -m dtrain` or a script calling
`dtrain.train()`. Not a process started without a launcher (`python -m dtrain`, a script, a notebook),
whose parent is a shell or a kernel that may rightly go away (`nohup`, `&`), nor RANK/WORLD_SIZE set
by hand, where who the parent is is unknown.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from dtrain.runtime.env import LaunchInfo

GRACE_S = 20.0
"""From the launcher's death to the hard exit: within the 30 s that torchrun and Slurm give a rank
between SIGTERM and SIGKILL, with room for the poll and the exit."""

POLL_S = 0.25
"""getppid() is one cheap system call: four a second cost nothing and keep the heartbeats (once a second)
from finding the agent's store gone first, as they otherwise often would (a C++ stack trace each)."""

WATCHED = ("torchrun", "srun")
"""The launch kinds (env.LaunchInfo.launcher) whose ranks are the launcher's own children."""

_AT_IMPORT = (os.getpid(), os.getppid())
"""(this process, its parent) when dtrain was first imported, well before torch: a launcher killed
while the rank imports torch has already handed it to another parent by the time the watch starts.
`dtrain/__init__.py` imports this module for that reason."""


def launcher_pid() -> int:
    """The parent this process had when dtrain was imported (now, in a process forked since)."""
    pid, parent = _AT_IMPORT
    return parent if pid == os.getpid() else os.getppid()


_MODULES = {"torch.distributed.run": "torchrun", "torch.distributed.launch": "torchrun",
            "accelerate.commands.launch": "accelerate", "accelerate.commands.accelerate_cli": "accelerate"}


def _name(pid: int, launcher: str) -> str:
    """What the launcher is called in the line: its command (torchrun, accelerate, slurmstepd), the
    launcher's module for `python -m ...`, else the launch kind. From its command line: the elastic
    agent renames its process (comm is "pt_elastic")."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a for a in fh.read().decode(errors="replace").split("\0") if a]
    except OSError:
        return launcher
    program = os.path.basename(argv[0]).split(":")[0].strip() if argv else ""  # slurmstepd: "slurmstepd: [1.0]"
    if program.startswith("python") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2:
            return _MODULES.get(argv[2], launcher)
        # An entry-point script run by its interpreter: /venv/bin/python /venv/bin/accelerate launch ...
        program = os.path.basename(argv[1]) if not argv[1].startswith("-") else ""
    return program or launcher


class LauncherWatch:
    """The watching thread of one rank (see the module's docstring)."""

    def __init__(self, pid: int, name: str, rank: int, grace_s: float = GRACE_S, poll_s: float = POLL_S) -> None:
        self.pid, self.name, self.rank = pid, name, rank
        self.grace_s, self.poll_s = grace_s, poll_s
        self.on_death: list[Callable[[], None]] = []
        """Called on the watching thread once the launcher is gone, before the SIGTERM: letting go of what
        died with it (under torchrun, the store the agent hosted)."""
        self._closed = threading.Event()
        self._fired = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dtrain-launcher-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching (the process group is gone). Once the launcher has died, the hard exit stays
        armed: the process ends by then whatever it does after the run."""
        self._closed.set()
        if not self._fired.is_set():
            self._thread.join(timeout=2 * self.poll_s)

    def _run(self) -> None:
        while os.getppid() == self.pid:
            if self._closed.wait(self.poll_s):
                return
        self._fired.set()
        self._say(f"the launcher ({self.name}, pid {self.pid}) died; stopping")
        for let_go in self.on_death:
            try:
                let_go()
            except Exception:  # noqa: BLE001 - nothing may keep the rank from stopping
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(self.grace_s)
        self._say(f"still running {self.grace_s:g} s after the launcher died; exiting now")
        os._exit(128 + signal.SIGTERM)

    def _say(self, line: str) -> None:
        try:
            print(f"dtrain: rank {self.rank}: {line}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr gone with the launcher (a closed pipe): stop all the same
            pass


@contextmanager
def watching(launch: LaunchInfo) -> Iterator[Optional[LauncherWatch]]:
    """Watch the launcher from here (before the rendezvous) to the end of the block, where `launch` is
    one whose ranks are the launcher's children; None where it is not."""
    if launch.launcher not in WATCHED:
        yield None
        return
    pid = launcher_pid()
    watch = LauncherWatch(pid, _name(pid, launch.launcher), launch.rank)
    try:
        yield watch
    finally:
        watch.close()
