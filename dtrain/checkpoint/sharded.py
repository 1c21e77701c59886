"""Sharded checkpoints: every rank writes its own shard of the model and optimizer state, under the same commit
protocol as a whole one (dtrain/checkpoint/store.py).

    step-000000120/state.pt          the rest of the run's state (counters, schedule, data position, RNGs, ...)
    step-000000120/shards/.metadata  torch.distributed.checkpoint's index of the shards
    step-000000120/shards/__R_0.distcp  rank R's shard of the model and optimizer state
    step-000000120/commit.json       written last, listing every file above with its size and sha256

Rank 0 prepares the temporary directory, every rank writes its shard into it with torch.distributed.checkpoint
(fsynced) and hashes what it wrote, the digests are gathered to rank 0, and rank 0 writes state.pt and
commit.json and renames the directory into place: the checkpoint counts only once every rank's shard is durable,
and a job killed at any point leaves the earlier checkpoints as they were. The shards are keyed by parameter
name, so any world size and any strategy loads them (`Strategy.load_sharded_state`); the directory must be on
storage every rank sees.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Callable, Collection, Optional

import torch
import torch.distributed as dist

from dtrain.checkpoint import store
from dtrain.checkpoint.integrity import file_digest
from dtrain.errors import DTrainError
from dtrain.runtime.dist import DistState
from dtrain.runtime.files import fsync_dir

SHARDS = "shards"
"""The sub-directory of a sharded checkpoint that holds the shards; state.pt names it under "sharded"."""


def save(dist_state: DistState, output_dir: str, step: int, epoch: int, shards: dict[str, Any],
         payload: Callable[[], dict[str, Any]], keep: int, keep_also: Callable[[], Collection[int]]) -> str:
    """Commit the checkpoint of `step`: `shards` (this rank's part of the model and optimizer state, in
    torch.distributed.checkpoint's form) written by every rank, `payload()` (the rest) by rank 0. Every rank
    calls it; a failure on any rank is one error on every rank, and leaves no committed checkpoint."""
    import torch.distributed.checkpoint as dcp

    final = os.path.join(store.checkpoints_dir(output_dir), store.dir_name(step))
    tmp = dist_state.run_on_main(lambda: store.begin(output_dir, step))
    if tmp is None:
        return final  # committed already (a signal right after a periodic save)
    folder = os.path.join(tmp, SHARDS)
    mine: dict[str, tuple[int, str]] = {}
    error: Optional[BaseException] = None
    try:
        dcp.save(shards, storage_writer=dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True))
        mine = _own_files(folder, f"__{dist_state.rank}_")
    except (Exception, checkpoint_exception()) as exc:  # noqa: BLE001 - any rank's failure is said once, by all
        error = _as_line(step, exc)
    try:
        dist_state.check_all(error, f"while writing its shard of the checkpoint of step {step}")
    except BaseException:
        if dist_state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    reports: list[Any] = [mine]
    if dist_state.world_size > 1:
        reports = [None] * dist_state.world_size
        dist.all_gather_object(reports, mine)

    def write() -> str:
        written: dict[str, tuple[int, str]] = {}
        for rank, report in enumerate(reports):
            for name, (size, _) in report.items():
                # A shard written to storage rank 0 does not see (node-local disks) would be committed unreadable.
                path = os.path.join(tmp, name)
                if not os.path.isfile(path) or os.path.getsize(path) != size:
                    raise DTrainError(f"cannot write the checkpoint of step {step}: rank {rank} wrote {name} "
                                      f"({size} bytes), which rank 0 does not see at {path}; dist.strategy=fsdp2 "
                                      f"needs output_dir on storage every rank sees")
            written.update(report)
        # What no rank reported (DCP's .metadata, written by its coordinator, rank 0) is hashed here.
        rest = _own_files(folder, "", skip={name.partition("/")[2] for name in written}, sync=True)
        written.update(rest)
        fsync_dir(folder)
        return store.commit(output_dir, step, epoch, tmp, {**payload(), "sharded": SHARDS}, keep, keep_also(),
                            written)

    return dist_state.run_on_main(write)


def _own_files(folder: str, prefix: str, skip: Collection[str] = (), sync: bool = False) -> dict[str, tuple[int, str]]:
    """{"shards/<name>": (bytes, sha256)} of the files in `folder` whose names start with `prefix`."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(prefix) or name in skip or not os.path.isfile(path):
            continue
        if sync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        found[f"{SHARDS}/{name}"] = (os.path.getsize(path), file_digest(path))
    return found


def checkpoint_exception() -> type[BaseException]:
    """torch.distributed.checkpoint's error: a BaseException (not an Exception) carrying every rank's failure."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def unwrap(exc: BaseException) -> BaseException:
    """The first rank's own failure inside a torch.distributed.checkpoint error (an OSError where one rank had one);
    any other exception itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, checkpoint_exception()) and failures:
        causes = [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
        return next((c for c in causes if isinstance(c, OSError)), causes[0])
    return exc


def _as_line(step: int, exc: BaseException) -> DTrainError:
    exc = unwrap(exc)
    cause: Optional[BaseException] = exc
    while cause is not None and not isinstance(cause, OSError):  # DCP wraps a full disk in its own exception
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        why = f"{cause.filename or ''}: {cause.strerror or cause}".lstrip(": ")
    else:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return DTrainError(f"cannot write the checkpoint of step {step}: {why}; the earlier checkpoints are untouched")


def shards_of(path: str, payload: dict[str, Any]) -> Optional[str]:
    """The shards directory of the checkpoint at `path`, or None for a whole (unsharded) checkpoint."""
    name = payload.get("sharded")
    return os.path.join(path, str(name)) if name else None


def full_model(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The whole, unsharded model state dict a checkpoint holds, on the CPU, in this process alone (no process
    group needed): from state.pt, or assembled from the shards of a sharded checkpoint."""
    folder = shards_of(path, payload)
    if folder is None:
        return payload["train"]["model"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001
        raise DTrainError(f"cannot read the shards of {path}: {type(exc).__name__}: {exc}") from None
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["model"]
