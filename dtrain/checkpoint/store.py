"""Checkpoints on disk: written whole or not at all, found again only once committed.

Layout, under <output_dir>/checkpoints/:

    step-000000120/state.pt      everything a run needs to continue (see TrainState.checkpoint)
    step-000000120/commit.json   written last: {"step", "epoch", "files": {name: bytes}}
    finished.json                the run ended; which checkpoint holds its end

A save writes into a temporary sibling directory, fsyncs every file and the
directory, writes commit.json, and renames the directory into place: a crash
or a full disk at any point leaves either the complete new checkpoint or none
(its temporary directory is cleared by the next save), and the previous ones
untouched. Older checkpoints are deleted only after the new one is committed.
Only directories whose commit.json matches their files are ever resumed from.

Global rank 0 writes everything (the other ranks' RNG states are gathered to
it first), so a multi-node job writes each checkpoint once, on whatever
storage rank 0 sees; resuming reads it on rank 0 and shares it with the rest.
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
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
            path = os.path.join(root, name)
            if is_committed(path):
                found.append(Found(path, int(name[len(_PREFIX):])))
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
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, dir_name(step))
    tmp = os.path.join(root, f".{_PREFIX}{step:09d}.tmp")
    try:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):  # a save that died half-way leaves its temporary directory
            if stale.startswith(f".{_PREFIX}") and stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        if os.path.isdir(final):
            if is_committed(final):
                return final  # this step is saved already (a signal right after a periodic save)
            shutil.rmtree(final)
        os.makedirs(tmp)
        target = os.path.join(tmp, STATE)
        with open(target, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        commit = {"step": step, "epoch": epoch, "saved_at": time.time(),
                  "files": {STATE: os.path.getsize(target)}}
        with open(os.path.join(tmp, COMMIT), "w", encoding="utf-8") as f:
            json.dump(commit, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(root)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (a full disk) as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise DTrainError(f"cannot write the checkpoint of step {step} in {root}: {why}; "
                          "the earlier checkpoints are untouched") from None
    for old in committed(output_dir)[:-keep]:
        if old.step not in keep_also:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def load(path: str) -> dict[str, Any]:
    """A committed checkpoint's state, read with weights_only=True; one line if it is not usable."""
    if not is_committed(path):
        raise DTrainError(f"config key 'resume' has value {path!r}; allowed: auto | never | a committed "
                          f"checkpoint directory (one holding {COMMIT} and {STATE})")
    try:
        state = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DTrainError(f"cannot read the checkpoint {path}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    if not isinstance(state, dict) or "train" not in state:
        raise DTrainError(f"{path} is not a dtrain checkpoint")
    return state
