"""The ranks meeting and watching each other: the rendezvous that names who did not come, and the
heartbeats that say, when a collective fails, which peer was dead or stalled."""

from __future__ import annotations

import datetime
import re
import socket
import threading
import time
from typing import Any, Callable, Optional

import torch.distributed as dist

from dtrain.errors import DTrainError
from dtrain.runtime import faults, localproc
from dtrain.runtime.env import LaunchInfo


ARRIVED = "dtrain/arrived"
FAILED = "dtrain/failed"
WAITED = "dtrain/waited"
PROCESS = "dtrain/process"
DONE = "dtrain/done"
"""dtrain/done/{rank}: the rank is finishing (it failed, or its run ended): its heartbeat stops on purpose."""


def rendezvous(launch: LaunchInfo, start_timeout_s: int, step_timeout_s: int) -> Any:
    """A TCPStore on rank 0 that every rank joins, or one line naming who did not come.

    torch's own tcp:// start waits for the store's clients until the collective timeout and then
    reports only "1/2 clients joined"; here the wait has its own limit (dist.start_timeout_s), and
    each rank leaves its number in the store, so the message can name the missing ones."""
    timeout = datetime.timedelta(seconds=start_timeout_s)
    where = f"{launch.master_addr}:{launch.master_port}"
    deadline = time.monotonic() + start_timeout_s
    if launch.rank != 0:
        # Wait for rank 0's port here: TCPStore's own retries log a C++ stack trace per attempt.
        while True:
            try:
                socket.create_connection((launch.master_addr, int(launch.master_port)), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise DTrainError(f"could not reach rank 0 at MASTER_ADDR:MASTER_PORT {where} within "
                                      f"dist.start_timeout_s={start_timeout_s} s ({exc.strerror or exc}); is rank 0 "
                                      "running, and is the address right?") from None
                time.sleep(0.2)
    try:
        store = dist.TCPStore(launch.master_addr, int(launch.master_port), launch.world_size, launch.rank == 0,
                              timeout=timeout, wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError by version
        text = " ".join(str(exc).split())
        if launch.rank == 0 and re.search(r"in use|EADDRINUSE|bind", text, re.IGNORECASE):
            raise DTrainError(f"rank 0 cannot listen on MASTER_PORT {where}: the port is in use (another job on "
                              "this node?); choose a free MASTER_PORT") from None
        raise DTrainError(f"could not reach rank 0 at MASTER_ADDR:MASTER_PORT {where} within "
                          f"dist.start_timeout_s={start_timeout_s} s ({text[:200]}); is rank 0 running, and is "
                          "the address right?") from None
    store.set(f"{ARRIVED}/{launch.rank}", "1")
    arrived = store.add(ARRIVED, 1)
    while arrived < launch.world_size:
        if time.monotonic() > deadline:
            missing = [r for r in range(launch.world_size) if not store.check([f"{ARRIVED}/{r}"])]
            raise DTrainError(
                f"only {launch.world_size - len(missing)} of {launch.world_size} ranks arrived within "
                f"dist.start_timeout_s={start_timeout_s} s; missing: rank {', '.join(map(str, missing))} "
                f"(WORLD_SIZE={launch.world_size}: start every rank, or raise dist.start_timeout_s if they start "
                "late)")
        time.sleep(0.2)
        arrived = store.add(ARRIVED, 0)
    # From here on the store serves the process group's own set-up and dtrain's heartbeats:
    # its waits follow the step timeout, not the start-up one.
    store.set_timeout(datetime.timedelta(seconds=step_timeout_s))
    return store


class PeerWatch:
    """Each rank's step and a heartbeat, published to the store every second by a background
    thread, and a place where the first rank that fails says so.

    It costs the loop nothing (the thread reads a Python int: no device sync, no collective).
    When a collective fails, the rank that saw it can then say which peers were behind or gone;
    when a rank fails, the others (stopping on the launcher's SIGTERM) learn at once that no step
    boundary will come, instead of waiting out checkpoint.stop_grace_s."""

    def __init__(self, store: Any, rank: int, world_size: int, interval_s: float = 1.0) -> None:
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.step_of: Callable[[], int] = lambda: 0
        try:
            # Who this rank's process is, so that a peer on this host can end it should it freeze.
            self.store.set(f"{PROCESS}/{rank}", localproc.name_of_this_process() or "")
        except Exception:  # noqa: BLE001 - only the frozen-peer case needs it
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dtrain-peer-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.store.set(f"dtrain/step/{self.rank}", str(self.step_of()))
                self.store.add(f"dtrain/beat/{self.rank}", 1)
                failures = 0
            except Exception:  # noqa: BLE001
                failures += 1
                if failures >= 5:  # the store is gone (rank 0 exited): nothing to publish to
                    return
            self._stop.wait(self.interval_s)
        # Said here, not in close(): a store that cannot be reached holds up this thread, not the rank's exit.
        self._say_done()

    def close(self) -> None:
        """Stop publishing and let go of the store: rank 0's store server must not outlive the run
        (a second run in the same process binds MASTER_PORT again)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.store = None
        self.step_of = lambda: 0

    def _say_done(self) -> None:
        """Tell the peers that this rank's heartbeat stops on purpose: a rank that failed lives on a while,
        silent, to tear down and report, and a peer failing later must not take it for frozen."""
        if self.store is None:
            return
        try:
            self.store.set(f"{DONE}/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store may be what failed
            pass

    def _get(self, key: str) -> Optional[str]:
        if self.store is None:
            return None
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - best effort: the store may be what failed
            return None

    def _get_all(self, keys: list[str]) -> list[Optional[str]]:
        """The values of `keys` (None where missing): two round trips to the store when all are there,
        as they are unless something is wrong, so a thousand ranks asking at once stays cheap."""
        if self.store is None:
            return [None] * len(keys)
        try:
            if self.store.check(keys):
                return [v.decode() for v in self.store.multi_get(keys)]
        except Exception:  # noqa: BLE001
            return [None] * len(keys)
        return [self._get(k) for k in keys]

    def diagnose(self, timed_out: bool) -> dict[int, str]:
        """{rank: what is wrong with it} for the peers to blame (see `examine`)."""
        return self.examine(timed_out)[0]

    def examine(self, timed_out: bool) -> tuple[dict[int, str], list[localproc.LocalPeer]]:
        """{rank: what is wrong with it} for the peers to blame, found in about two heartbeats, and the
        frozen peers on this host that this rank is to end.

        After a timeout every rank that waited says so; the ones that did not were not in the
        collective. A peer whose heartbeat stops is gone (dead, or frozen in native code), unless it
        said it is finishing (DONE: it failed too and is on its way out) or it waited in the
        collective with this rank. One whose process is still there, on this host, and stopped
        (SIGSTOP, a debugger) is frozen: it cannot act on the launcher's SIGTERM, and the launcher
        waits its own grace (30 s under torchrun) before the SIGKILL that ends the job, so this rank
        ends it once its line is out (faults.report; faults.end_at_exit where nothing reports). A silent
        process in any other state (running, asleep, in the kernel) may be busy in native code or about
        to exit: it is named, and left to the launcher."""
        if timed_out:
            try:
                self.store.append(WAITED, f"{self.rank} ")  # one key for all: read back in one go
            except Exception:  # noqa: BLE001
                pass
        peers = [r for r in range(self.world_size) if r != self.rank]
        before = self._get_all([f"dtrain/beat/{r}" for r in peers])
        time.sleep(1.6 * self.interval_s)
        after = self._get_all([f"dtrain/beat/{r}" for r in peers])
        steps = self._get_all([f"dtrain/step/{r}" for r in peers])
        waited = {int(r) for r in (self._get(WAITED) or "").split()} if timed_out else set()
        # Only a beat read twice and unchanged says "silent": a store that cannot be read says nothing.
        silent = [r for r, old, new in zip(peers, before, after) if old is not None and new == old]
        done = {r for r in silent if self._get(f"{DONE}/{r}") is not None}
        suspects = [r for r in silent if r not in done and r not in waited]
        local = {r: p for r, name in zip(suspects, self._get_all([f"{PROCESS}/{r}" for r in suspects]))
                 if (p := localproc.find(name)) is not None}
        blame: dict[int, str] = {}
        for r, old, new, step in zip(peers, before, after, steps):
            alive = old is not None and new != old
            at = f"last heard of at step {step}" if step is not None else "never heard of"
            if r in done:
                blame[r] = f"{at}: it failed or stopped on its own, its own line says why"
            elif r in waited:
                continue  # it was in the collective with this rank: not the cause
            elif r in local and local[r].stopped:
                blame[r] = f"{at}, no heartbeat: frozen, its process {local[r].pid} on this host is " \
                           f"{local[r].state}; ended with SIGKILL"
            elif r in local:
                blame[r] = f"{at}, no heartbeat: its process {local[r].pid} on this host is {local[r].state} " \
                           "(hung in native code?); left to the launcher"
            elif not alive:
                blame[r] = f"{at}, no heartbeat: died, was killed or is frozen"
            elif timed_out and r not in waited:
                blame[r] = f"{at}, alive but not in the collective: stalled in its own work"
        return blame, [p for p in local.values() if p.stopped]

    def announce_failure(self, line: str) -> None:
        if self.store is None:
            return
        try:
            if not self.store.check([FAILED]):
                self.store.set(FAILED, line)
        except Exception:  # noqa: BLE001
            pass

    def failure(self) -> Optional[str]:
        return self._get(FAILED)

    def tell_failure(self, exc: BaseException) -> None:
        """Before the group goes: tell the other ranks that this one failed or, when a collective
        failed under it, note on the exception which peers to blame (faults.failure_line names them)."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return
        self._say_done()  # before the wait in `examine`: a peer failing meanwhile must not end this rank
        if faults.is_communication_failure(exc):
            timed_out = faults.is_timeout(exc)
            earlier = self.failure()  # read before this rank's own announcement can take the key
            self.announce_failure(f"rank {self.rank} " + ("gave up waiting in a collective" if timed_out
                                                          else "lost contact with a peer"))
            failed = re.match(r"rank (\d+)(?:: | )(failed: .*|data items? .*)$", earlier or "")
            if failed and int(failed.group(1)) != self.rank:
                # A peer failed on its own and said why: that is the cause, no heartbeats to wait for.
                blame, frozen = {int(failed.group(1)): failed.group(2)}, []
            else:
                blame, frozen = self.examine(timed_out)
            setattr(exc, faults.BLAME_ATTR, blame)
            setattr(exc, faults.FROZEN_ATTR, frozen)
            faults.end_at_exit(frozen)  # dist's path, which a script's dtrain.train() takes too
        else:
            own = getattr(exc, faults.OWN_LINE_ATTR, None)
            said = f"rank {self.rank}: {own}" if own else f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
            self.announce_failure(" ".join(said.split())[:250])
