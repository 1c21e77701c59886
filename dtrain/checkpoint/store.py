"""Checkpoints on disk: written whole or not at all, found again only once committed.

Layout, under <output_dir>/checkpoints/:

    step-000000120/state.pt      everything a run needs to continue (see TrainState.checkpoint)
    step-000000120/commit.json   written last: {"step", "epoch", "files": {name: bytes}, "sha256": {name: hex}}
    step-000000090.damaged/      a checkpoint found damaged on resume, set aside (never resumed or deleted)
    finished.json                the run ended; which checkpoint holds its end

A save writes into a temporary sibling directory, fsyncs every file and the
directory, writes commit.json, and renames the directory into place: a crash
or a full disk at any point leaves either the complete new checkpoint or none
(its temporary directory is cleared by the next save), and the previous ones
untouched. Older checkpoints are deleted only after the new one is committed.
Only directories whose commit.json matches their files are ever resumed from: listing checks the sizes,
resuming also the checksums (dtrain/checkpoint/integrity.py), and a resume falls back past damaged ones.

Global rank 0 writes everything (the other ranks' RNG states are gathered to
it first), so a multi-node job writes each checkpoint once, on whatever
storage rank 0 sees; resuming reads it on rank 0 and shares it with the rest.
A sharded strategy's model and optimizer state are the exception: every rank
writes its own shard into the same directory (dtrain/checkpoint/sharded.py),
which must then be on storage every rank sees.
Every value is a tensor, a number, a string or a container of those, so
`torch.load(weights_only=True)` reads it without allow-listing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Collection, Optional

import torch

from dtrain.checkpoint.integrity import ALGORITHM, files_problem, save_hashed
from dtrain.errors import DTrainError
from dtrain.runtime.files import fsync_dir, write_atomic

SUBDIR = "checkpoints"
STATE = "state.pt"
COMMIT = "commit.json"
FINISHED = "finished.json"
BEST = "best.json"
"""checkpoints/best.json: which checkpoint is best by checkpoint.monitor (dtrain/callbacks/best.py writes it)."""
MODEL_BEST = "model_best.pt"
MODEL_EMA = "model_ema.pt"
_PREFIX = "step-"
DAMAGED = ".damaged"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, SUBDIR)


def dir_name(step: int) -> str:
    """The directory name of the checkpoint of `step`, under checkpoints_dir."""
    return f"{_PREFIX}{step:09d}"


@dataclass(frozen=True)
class Found:
    path: str
    step: int


def committed(output_dir: str) -> list[Found]:
    """Committed checkpoints under output_dir, oldest first; half-written ones are not listed."""
    return [f for f in step_dirs(output_dir) if is_committed(f.path)]


def step_dirs(output_dir: str) -> list[Found]:
    """Every step-N directory, committed or not, oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [Found(os.path.join(root, name), int(name[len(_PREFIX):])) for name in os.listdir(root)
             if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda f: f.step)


def step_of(path: str) -> int:
    """The step a committed checkpoint holds (from its commit.json)."""
    with open(os.path.join(path, COMMIT), encoding="utf-8") as f:
        return int(json.load(f)["step"])


def is_committed(path: str) -> bool:
    try:
        with open(os.path.join(path, COMMIT), encoding="utf-8") as f:
            commit = json.load(f)
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in commit["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def problem(path: str) -> Optional[str]:
    """What is wrong with the checkpoint directory `path`, naming the file, or None when its files are the ones
    committed: the sizes, and the checksums where commit.json has them (those of dtrain versions before them:
    torch's own CRC-32s). Reads every file once."""
    commit_path = os.path.join(path, COMMIT)
    try:
        with open(commit_path, encoding="utf-8") as f:
            commit = json.load(f)
        sizes = {str(name): int(size) for name, size in commit["files"].items()}
        digests = commit.get(ALGORITHM)
        if digests is not None and not isinstance(digests, dict):
            raise TypeError(f"{ALGORITHM} is not a mapping")
    except OSError as exc:
        return f"{commit_path}: {exc.strerror or exc} (the checkpoint was never committed, or was cut)"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{commit_path}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})"
    return files_problem(path, sizes, digests)


@dataclass(frozen=True)
class Damaged:
    path: str
    problem: str
    """What is wrong, naming the file: one clause of a line."""


def newest_intact(output_dir: str) -> tuple[Optional[Found], list[Damaged]]:
    """The newest checkpoint whose files check out (`problem`), and the step-N directories newer than it, which do
    not (newest first). Only these are read: an older checkpoint's damage shows when something reaches back to it."""
    damaged = []
    for found in reversed(step_dirs(output_dir)):
        wrong = problem(found.path)
        if wrong is None:
            return found, damaged
        damaged.append(Damaged(found.path, wrong))
    return None, damaged


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint directory to <name>.damaged (-2, -3 ... if taken): kept for a look, never
    resumed from, and out of retention's count so it cannot make a good checkpoint the one deleted next."""
    target = path + DAMAGED
    n = 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{DAMAGED}-{n}"
    os.rename(path, target)
    fsync_dir(os.path.dirname(path))
    return target


def finished(output_dir: str) -> Optional[dict[str, Any]]:
    """The finished.json of a run that ended, or None."""
    try:
        with open(os.path.join(checkpoints_dir(output_dir), FINISHED), encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def mark_finished(output_dir: str, step: int, result: Optional[dict[str, float]],
                  stopped_by: Optional[str] = None) -> None:
    body = json.dumps({"step": step, "eval": result, "stopped_by": stopped_by}, allow_nan=True).encode()
    write_atomic(os.path.join(checkpoints_dir(output_dir), FINISHED), body)


def save(output_dir: str, step: int, epoch: int, state: dict[str, Any], keep: int,
         keep_also: Collection[int] = ()) -> str:
    """Commit `state` as the checkpoint of `step` (rank 0 only); keep the newest `keep`, and those of the steps
    in `keep_also` (the best ones)."""
    tmp = begin(output_dir, step)
    if tmp is None:
        return os.path.join(checkpoints_dir(output_dir), dir_name(step))
    return commit(output_dir, step, epoch, tmp, state, keep, keep_also)


def begin(output_dir: str, step: int) -> Optional[str]:
    """The empty temporary directory a checkpoint of `step` is written into (rank 0 only); None when that step is
    committed already (a signal right after a periodic save)."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, dir_name(step))
    tmp = _tmp(output_dir, step)
    try:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):  # a save that died half-way leaves its temporary directory
            if stale.startswith(f".{_PREFIX}") and stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        if os.path.isdir(final):
            if is_committed(final):
                return None
            shutil.rmtree(final)
        os.makedirs(tmp)
    except OSError as exc:
        raise _cannot_write(step, exc, root) from None
    return tmp


def _tmp(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f".{_PREFIX}{step:09d}.tmp")


def commit(output_dir: str, step: int, epoch: int, tmp: str, state: dict[str, Any], keep: int,
           keep_also: Collection[int] = (), written: Optional[dict[str, tuple[int, str]]] = None) -> str:
    """Write `state` as state.pt into `tmp` (from `begin`), then commit.json listing it and the files already
    `written` there ({relative name: (bytes, sha256)}, each fsynced by its writer: a sharded checkpoint's
    shards), and rename the directory into place (rank 0 only). Then retention: keep the newest `keep`
    committed checkpoints and those of the steps in `keep_also`."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, dir_name(step))
    try:
        target = os.path.join(tmp, STATE)
        # Hashed as it is written: no second read. A full disk raises its OSError, not torch's RuntimeError.
        digest = save_hashed(state, target)
        files = {STATE: os.path.getsize(target)}
        digests = {STATE: digest}
        for name, (size, hexdigest) in (written or {}).items():
            files[name], digests[name] = size, hexdigest
        commit = {"step": step, "epoch": epoch, "saved_at": time.time(), "files": files, ALGORITHM: digests}
        with open(os.path.join(tmp, COMMIT), "w", encoding="utf-8") as f:
            json.dump(commit, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cannot_write(step, exc, root) from None
    # Older than this one only: a newer directory is never the one to go. Uncommitted ones go too (a deletion cut
    # short leaves them, and nothing resumes from them).
    kept = {f.step for f in committed(output_dir)[-keep:]} | set(keep_also)
    for old in step_dirs(output_dir):
        if old.step < step and old.step not in kept:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def _cannot_write(step: int, exc: BaseException, root: str) -> DTrainError:
    if isinstance(exc, OSError):
        where = exc.filename or root
        why = exc.strerror or str(exc)
    else:
        where, why = root, " ".join(str(exc).split())[:200]
    return DTrainError(f"cannot write the checkpoint of step {step}: {where}: {why}; "
                       "the earlier checkpoints are untouched")


def size_of(path: str) -> int:
    """The bytes a committed checkpoint's files hold (from its commit.json)."""
    with open(os.path.join(path, COMMIT), encoding="utf-8") as f:
        return sum(int(size) for size in json.load(f)["files"].values())


def load(path: str, verify: bool = True) -> dict[str, Any]:
    """A committed checkpoint's state, read with weights_only=True; one line if it is not usable. `verify`: check
    the checksums first (False only where `problem` just did)."""
    if not is_committed(path):
        raise DTrainError(f"config key 'resume' has value {path!r}; allowed: auto | never | a committed "
                          f"checkpoint directory (one holding {COMMIT} and {STATE})")
    wrong = problem(path) if verify else None
    if wrong is not None:
        raise DTrainError(f"cannot use the checkpoint {path}: {wrong}")
    try:
        state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DTrainError(f"cannot read the checkpoint {path}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    if not isinstance(state, dict) or "train" not in state:
        raise DTrainError(f"{path} is not a dtrain checkpoint")
    return state
