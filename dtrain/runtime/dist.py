"""The process group: the only module that calls `init_process_group`.

`distributed(...)` yields one explicit `DistState` that the rest of the code
takes as an argument; there is no module-level state to forget to reset.
"""

from __future__ import annotations

import datetime
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

# Building the first DDP model imports this module (through torch.distributed._shard).
# Its functions take `group=group.WORLD` as a default argument, evaluated at import:
# imported while a group is live, those defaults pin that group forever.
# destroy_process_group() then cannot free it, gloo's threads keep running into
# interpreter shutdown, and the process can abort there ("terminate called without
# an active exception") after a successful run. Imported here, before any group
# exists, the defaults are None.
import torch.distributed.nn.functional  # noqa: F401  (imported for the side effect above)

from dtrain.runtime.env import LaunchInfo
from dtrain.errors import SAID_BY_RANK_0, DTrainError


@dataclass(frozen=True)
class DistState:
    launcher: str
    rank: int
    local_rank: Optional[int]
    """None where the launch does not say (RANK/WORLD_SIZE set by hand, nothing else)."""
    world_size: int
    backend: str
    device: torch.device
    host_group: Any = None
    """A gloo group for tiny host-side agreements when the main group is NCCL; None: the main group."""
    watch: Optional["PeerWatch"] = None
    """Steps and failures shared through the store (None for one process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place across ranks (a no-op cost for one process) and return the tensor."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def run_on_main(self, fn: Callable[[], Any], share_result: bool = True) -> Any:
        """Run `fn` on rank 0 only; every rank gets its result (or None) or raises its error.

        Without this, a step that fails on rank 0 alone (an output directory
        that already holds a run, a logger that cannot start) leaves the other
        ranks waiting in their next collective until the timeout. Rank 0
        re-raises its own exception; the others raise a DTrainError saying it.
        `share_result=False` keeps an unpicklable result (an open logger) on rank 0.
        """
        payload: list[Any] = [None, None]
        result: Any = None
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # Ctrl-C on rank 0 must not leave the others in the broadcast
                error = exc
                payload[1] = str(exc) if isinstance(exc, DTrainError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
            if share_result:
                payload[0] = result
        if self.world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        if payload[1] is not None:
            raise DTrainError(payload[1])
        return result if self.is_main else payload[0]


    def run_on_node_main(self, fn: Callable[[], None]) -> None:
        """Run `fn` on global rank 0 first, then on the first rank of every other node; every rank waits.

        For work that must happen once per file system: on shared storage the
        nodes after the first find it done (`fn` is a no-op there), on
        node-local storage each node does its own. Where the launch does not
        say which rank is first on its node, only rank 0 runs `fn`.
        """
        self.run_on_main(fn, share_result=False)
        if self.world_size == 1:
            return
        error: Optional[BaseException] = None
        if not self.is_main and self.local_rank == 0:
            try:
                fn()
            except Exception as exc:
                error = exc
        self.check_all(error, "while preparing data on its node")

    def check_all(self, error: Optional[BaseException], during: str) -> None:
        """Every rank says whether its part of a step failed (one collective); all stop if any did.

        A rank whose own work raised re-raises that exception; the others raise a
        DTrainError naming the first rank that failed, instead of going on into a
        collective (DDP's first broadcast, say) that rank will never join and
        waiting there until dist.timeout_s.
        """
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        mine = None if error is None else (str(error) if isinstance(error, DTrainError)
                                           else f"{type(error).__name__}: {error}")
        reports: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(reports, mine)
        if error is not None:
            if self.rank != 0 and all(r == mine for r in reports):
                # Every rank failed alike (a missing dataset, say): rank 0's line says it for all.
                setattr(error, SAID_BY_RANK_0, True)
            raise error
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            rank, message = failed[0]
            others = f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
            raise DTrainError(f"rank {rank} failed {during}{others}: {' '.join(message.split())}")


class LaggedAgreement:
    """Whether a flag is set on any rank, a round late, on a host (gloo) group.

    The all-reduce of round N runs in the background while the caller goes on (training
    steps), and round N+1 collects it, so it neither waits on the GPU nor stalls a step. Rounds
    are spaced about `every_s` of training apart, not every step: rank 0 measures its step time
    and puts into each round how many steps the next one waits, and every rank reads that from
    the same round, so all of them exchange at the same steps and decide alike. A flag raised
    anywhere is acted on within about two rounds: well under a second, whatever the step time."""

    def __init__(self, dist_state: DistState, every_s: float = 0.2, max_steps: int = 100) -> None:
        self.dist_state = dist_state
        self.every_s, self.max_steps = every_s, max_steps
        self._work: Any = None
        self._values: Optional[torch.Tensor] = None
        self._next = 0
        self._last: Optional[tuple[float, int]] = None

    def poll(self, step: int, flags: Sequence[bool]) -> list[bool]:
        """At a step boundary: the flags of the round collected here, reduced over every rank;
        all False at steps between rounds (the flags raised meanwhile go out with the next one)."""
        if self.dist_state.world_size == 1:
            return list(flags)
        if step < self._next:
            return [False] * len(flags)
        proposal = 0.0
        now = time.monotonic()
        if self.dist_state.is_main and self._last is not None:
            per_step = (now - self._last[0]) / max(step - self._last[1], 1)
            proposal = float(min(max(round(self.every_s / max(per_step, 1e-9)), 1), self.max_steps))
        self._last = (now, step)
        previous = [0.0] * (len(flags) + 1)
        if self._work is not None and self._values is not None:
            self._work.wait()
            previous = self._values.tolist()
        self._values = torch.tensor([*(1.0 if f else 0.0 for f in flags), proposal])
        self._work = dist.all_reduce(self._values, op=dist.ReduceOp.MAX, group=self.dist_state.host_group,
                                     async_op=True)
        self._next = step + max(int(previous[-1]), 1)
        return [v > 0 for v in previous[:-1]]

    def settle(self) -> None:
        """Wait for the round in flight (before the loop ends, so no collective is left behind)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def resolve_device(requested: str, local_rank: Optional[int]) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DTrainError("config key 'train.device' has value 'cuda'; allowed: auto | cpu (no CUDA device is visible)")
    count = torch.cuda.device_count()
    if count == 1:
        # One GPU visible per task (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set
        # per rank): whatever this task's local rank, that GPU is its own.
        return torch.device("cuda", 0)
    if local_rank is None:
        # RANK/WORLD_SIZE by hand without LOCAL_RANK: on a node with several GPUs,
        # guessing cuda:RANK binds rank 5 of a 4-per-node job to another job's GPU.
        raise DTrainError(f"{count} GPUs are visible but the launch does not say which is this process's: "
                          "set LOCAL_RANK (or LOCAL_WORLD_SIZE, the processes per node), or launch with torchrun")
    if local_rank >= count:
        raise DTrainError(f"local rank {local_rank} has no GPU: only {count} visible on this node; "
                          "start at most one process per GPU")
    return torch.device("cuda", local_rank)


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise DTrainError("config key 'dist.backend' has value 'nccl'; allowed: gloo | auto on CPU (NCCL needs CUDA)")
    return requested


ARRIVED = "dtrain/arrived"
FAILED = "dtrain/failed"
WAITED = "dtrain/waited"


def _rendezvous(launch: LaunchInfo, start_timeout_s: int, step_timeout_s: int) -> Any:
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

    def close(self) -> None:
        """Stop publishing and let go of the store: rank 0's store server must not outlive the run
        (a second run in the same process binds MASTER_PORT again)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.store = None
        self.step_of = lambda: 0

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
        """{rank: what is wrong with it} for the peers to blame, found in about two heartbeats.

        After a timeout every rank that waited says so; the ones that did not were not in the
        collective. A peer whose heartbeat stops is gone (dead, or frozen in native code)."""
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
        blame: dict[int, str] = {}
        for r, old, new, step in zip(peers, before, after, steps):
            alive = old is not None and new != old
            at = f"last heard of at step {step}" if step is not None else "never heard of"
            if not alive:
                blame[r] = f"{at}, no heartbeat: died, was killed or is frozen"
            elif timed_out and r not in waited:
                blame[r] = f"{at}, alive but not in the collective: stalled in its own work"
        return blame

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


def _describe_failure(exc: BaseException, ds: DistState) -> None:
    """Before the group goes: tell the other ranks that this one failed or, when a collective
    failed under it, note on the exception which peers to blame (faults.describe prints them)."""
    from dtrain.runtime import faults

    if ds.watch is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return
    if faults.is_communication_failure(exc):
        timed_out = faults.is_timeout(exc)
        ds.watch.announce_failure(f"rank {ds.rank} " + ("gave up waiting in a collective" if timed_out
                                                        else "lost contact with a peer"))
        setattr(exc, faults.BLAME_ATTR, ds.watch.diagnose(timed_out))
    else:
        ds.watch.announce_failure(f"rank {ds.rank} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


@contextmanager
def distributed(launch: LaunchInfo, backend: str = "auto", device: str = "auto",
                timeout_s: int = 600, start_timeout_s: int = 300) -> Iterator[DistState]:
    """Start the process group for `launch`, yield its DistState, always destroy it."""
    dev = resolve_device(device, launch.local_rank)
    be = resolve_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": be, "rank": launch.rank, "world_size": launch.world_size,
                              "timeout": timeout}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    if launch.master_port is None:
        # One process: an in-memory store, so no port is needed or can collide.
        if launch.world_size != 1:
            raise DTrainError(f"world size {launch.world_size} needs MASTER_PORT to be set")
        kwargs["store"] = dist.HashStore()
    elif launch.launcher == "torchrun":
        # env:// lets torchrun hand over its own store (TORCHELASTIC_USE_AGENT_STORE)
        # instead of rank 0 binding MASTER_PORT a second time; torchrun's rendezvous already
        # waited for every rank.
        kwargs["init_method"] = "env://"
    else:
        kwargs["store"] = _rendezvous(launch, start_timeout_s, timeout_s)
    dist.init_process_group(**kwargs)
    watch: Optional[PeerWatch] = None
    ds: Optional[DistState] = None
    try:
        host_group = dist.new_group(backend="gloo") if be != "gloo" and launch.world_size > 1 else None
        if launch.world_size > 1:
            try:
                watch = PeerWatch(dist.distributed_c10d._get_default_store(), launch.rank, launch.world_size)
            except Exception:  # noqa: BLE001 - a private torch API: without it, messages name fewer ranks
                watch = None
        ds = DistState(launch.launcher, launch.rank, launch.local_rank, launch.world_size, be, dev, host_group,
                       watch)
        yield ds
    except BaseException as exc:
        if ds is not None:
            _describe_failure(exc, ds)
        raise
    finally:
        if watch is not None:
            watch.close()
        if dist.is_initialized():
            dist.destroy_process_group()
