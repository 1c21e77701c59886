"""The process group: the only module that calls `init_process_group`.

`distributed(...)` yields one explicit `DistState` that the rest of the code
takes as an argument; there is no module-level state to forget to reset.
"""

from __future__ import annotations

import datetime
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

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

from dtrain.errors import SAID_BY_RANK_0, SAID_PER_NODE, DTrainError
from dtrain.runtime.devices import resolve_backend, resolve_device
from dtrain.runtime.env import LaunchInfo
from dtrain.runtime.orphan import watching
from dtrain.runtime.peers import PeerWatch, rendezvous


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
    watch: Optional[PeerWatch] = None
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
        re-raises its own exception; the others raise a DTrainError saying it,
        marked as said by rank 0 where rank 0 prints its own (one line per job).
        `share_result=False` keeps an unpicklable result (an open logger) on rank 0.
        """
        payload: list[Any] = [None, None, False]
        result: Any = None
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # Ctrl-C on rank 0 must not leave the others in the broadcast
                error = exc
                payload[1] = str(exc) if isinstance(exc, DTrainError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
                payload[2] = isinstance(exc, Exception)  # a KeyboardInterrupt is not reported: let the others say it
            if share_result:
                payload[0] = result
        if self.world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        if payload[1] is not None:
            relayed = DTrainError(payload[1])
            if payload[2]:
                setattr(relayed, SAID_BY_RANK_0, True)
            raise relayed
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


@contextmanager
def distributed(launch: LaunchInfo, backend: str = "auto", device: Union[str, torch.device] = "auto",
                timeout_s: int = 600, start_timeout_s: int = 300) -> Iterator[DistState]:
    """Start the process group for `launch`, yield its DistState, always destroy it. `device`: a config
    value (auto | cpu | cuda), or a device already resolved for this rank. From before the rendezvous to
    the end, the rank stops if its launcher dies (`orphan`)."""
    with watching(launch) as orphan, _process_group(launch, backend, device, timeout_s, start_timeout_s) as state:
        if orphan is not None and state.watch is not None and launch.launcher == "torchrun":
            # The store is the agent's and died with it: heartbeats into it would log a C++ stack trace each.
            orphan.on_death.append(state.watch.close)
        yield state


@contextmanager
def _process_group(launch: LaunchInfo, backend: str, device: Union[str, torch.device], timeout_s: int,
                   start_timeout_s: int) -> Iterator[DistState]:
    try:
        dev = device if isinstance(device, torch.device) else resolve_device(device, launch.local_rank)
        be = resolve_backend(backend, dev)
    except DTrainError as exc:
        setattr(exc, SAID_PER_NODE, True)
        raise
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # fp16 under fsdp2 (CUDA only) builds torch's ShardedGradScaler, whose module takes
        # `process_group=dist.group.WORLD` as a default argument: imported while the group is live,
        # it pins the group as torch.distributed.nn.functional would (see the import at the top).
        from torch.distributed.fsdp import sharded_grad_scaler  # noqa: F401
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
        kwargs["store"] = rendezvous(launch, start_timeout_s, timeout_s)
    dist.init_process_group(**kwargs)
    watch: Optional[PeerWatch] = None
    try:
        host_group = dist.new_group(backend="gloo") if be != "gloo" and launch.world_size > 1 else None
        if launch.world_size > 1:
            try:
                watch = PeerWatch(dist.distributed_c10d._get_default_store(), launch.rank, launch.world_size)
            except Exception:  # noqa: BLE001 - a private torch API: without it, messages name fewer ranks
                watch = None
        yield DistState(launch.launcher, launch.rank, launch.local_rank, launch.world_size, be, dev, host_group,
                        watch)
    except BaseException as exc:
        if watch is not None:
            watch.tell_failure(exc)
        raise
    finally:
        if watch is not None:
            watch.close()
        if dist.is_initialized():
            dist.destroy_process_group()
