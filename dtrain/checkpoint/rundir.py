"""Where a run starts: a new output directory, an earlier run's newest checkpoint, or a run already finished.

`decide_start` only looks (after taking the directory's lock, `lock.py`, so that two jobs never decide
on one directory at once); `claim` acts, once every rank is set up, so a run that fails to start leaves an
earlier one as it was. Only a directory holding dtrain's marker is ever resumed or replaced.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from dtrain.checkpoint import store as checkpoint
from dtrain.checkpoint.lock import LOCK_FILE, RunDirLock
from dtrain.config import Config, resume_conflicts, to_dict
from dtrain.errors import ConfigError, DTrainError
from dtrain.runtime.files import write_atomic

# What a run writes into output_dir; overwrite=true removes all of it (and nothing else), so a
# replaced run leaves no stale event file, plot, weights or checkpoint behind.
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "model.pt", checkpoint.MODEL_BEST, checkpoint.MODEL_EMA, "curves.png",
               "tensorboard", "wandb", checkpoint.SUBDIR)
MARKER = ".dtrain-run"
"""Written first into every output_dir a run claims: only a directory holding it is dtrain's to resume or replace."""
NOT_A_RUN = ("lr_find", LOCK_FILE)
"""What dtrain writes into an output_dir outside a run (python -m dtrain.lr_find, the lock any run takes first)."""


@dataclass(frozen=True)
class Start:
    """Decided on rank 0 before anything is built, and shared with every rank; carried out by `claim`."""

    output_dir: str
    checkpoint: Optional[str] = None
    """The committed checkpoint to continue from; None: start from step 0."""
    finished: Optional[dict[str, Any]] = None
    """finished.json of a run that already ended: nothing is trained or rewritten."""
    restart: bool = False
    """An earlier attempt of this run died before its first checkpoint: start again, replacing its logs."""
    replace: bool = False
    """overwrite=true over an earlier run: its outputs go, but only once the new run is set up."""
    set_aside: tuple[str, ...] = ()
    """Damaged checkpoints newer than `checkpoint`: renamed out of the way (store.set_aside) once the run is set up."""


def new_run_dir(root: str = "runs") -> str:
    """Create and return runs/<date>-<time> (-2, -3, ... if taken): a default that never collides,
    since creating the directory is what claims the name."""
    stem = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(root, exist_ok=True)
    for n in range(1, 10_000):
        path = stem if n == 1 else f"{stem}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise DTrainError(f"cannot find a free run directory name under {root}")


def decide_start(cfg: Config, lock: Optional[RunDirLock] = None) -> Start:
    """Rank 0: pick the output directory and what to continue from, refusing to clobber what is there.

    It only looks (and probes that it could write): deleting an earlier run, creating
    directories and the marker wait for `claim`, after the whole run is set up, so a
    config, factory or dataset that fails leaves an earlier run as it was. `lock` is taken
    on the directory before it is looked at, and refuses a directory another job is using.
    """
    path = os.path.expanduser(cfg.output_dir) if cfg.output_dir else new_run_dir()
    if lock is not None:
        # Before looking: a run setting up there (its checkpoints/ made, its marker not yet) is then refused as
        # in use, not as someone else's files. Someone else's directory keeps no lock file: it goes at release.
        lock.take(path)
    _check_ours(path)
    has_run = os.path.exists(os.path.join(path, "metrics.jsonl"))
    # dtrain creates checkpoints/ before it logs anything: a run with that directory, no committed
    # checkpoint, no finished.json and the same math in its config.yaml is an earlier attempt of
    # this very run that died before its first checkpoint (killed, requeued): start it again.
    died_early = (os.path.isdir(checkpoint.checkpoints_dir(path)) and not checkpoint.committed(path)
                  and checkpoint.finished(path) is None and _same_math(path, cfg))
    start = Start(path)
    if cfg.overwrite:
        start = Start(path, replace=True)
    elif cfg.resume not in ("auto", "never"):
        start = Start(path, checkpoint=os.path.expanduser(cfg.resume))
        if not checkpoint.is_committed(start.checkpoint):
            raise ConfigError("resume", cfg.resume, "auto | never | a committed checkpoint directory "
                              f"(one holding {checkpoint.COMMIT}), e.g. {checkpoint.checkpoints_dir(path)}/step-...")
        wrong = checkpoint.problem(start.checkpoint)
        if wrong is not None:
            raise DTrainError(f"cannot resume from {cfg.resume}: {wrong}; nothing was trained")
        step = checkpoint.step_of(start.checkpoint)
        later = [f.path for f in checkpoint.committed(path) if f.step > step]
        if later or checkpoint.finished(path) is not None:
            # Continuing from an earlier point here would mix two trajectories in one directory:
            # the later checkpoints would win the next resume=auto, and pruning would eat the new ones.
            raise ConfigError("resume", cfg.resume, f"a checkpoint no older than the newest in {path} "
                              f"({later[-1] if later else 'the run there finished'}); to branch off an earlier "
                              "step, resume from it into a new output_dir")
    elif cfg.resume == "auto" and checkpoint.committed(path) and checkpoint.finished(path) is not None:
        # Nothing is trained from it: no need to read it through.
        start = Start(path, checkpoint=checkpoint.committed(path)[-1].path, finished=checkpoint.finished(path))
    elif cfg.resume == "auto" and checkpoint.step_dirs(path):
        start = _newest_intact(path)
    elif cfg.resume == "auto" and died_early:
        start = Start(path, restart=True)
    elif has_run or os.path.isdir(checkpoint.checkpoints_dir(path)):
        raise ConfigError("output_dir", path, "a new directory, or overwrite=true to replace the run already there"
                          + ("" if cfg.resume == "never" else " (it has no committed checkpoint to resume from)"))
    if start.finished is None:
        _check_writable(path, start.replace)
    return start


def claim(start: Start) -> None:
    """Rank 0, once every rank is set up: replace or set aside the earlier run, make the directories, mark them."""
    path = start.output_dir
    try:
        if start.replace:
            _remove_outputs(path)
        if start.restart:
            _keep_aside(path)
        for damaged in start.set_aside:
            checkpoint.set_aside(damaged)
        marker = os.path.join(path, MARKER)
        if not os.path.exists(marker):  # first: whatever else is found here is dtrain's
            os.makedirs(path, exist_ok=True)
            write_atomic(marker, b"dtrain run directory: overwrite=true may replace what dtrain wrote here\n")
        os.makedirs(checkpoint.checkpoints_dir(path), exist_ok=True)
    except OSError as exc:
        raise DTrainError(f"cannot prepare the output directory {path}: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from None


def _newest_intact(path: str) -> Start:
    """Continue from the newest checkpoint whose files are as committed, saying which newer ones are damaged; stop
    if none is (never from garbage, and never from scratch over a run that had checkpoints)."""
    good, damaged = checkpoint.newest_intact(path)
    what = "; ".join(d.problem for d in damaged)
    if good is None:
        raise DTrainError(f"{what}; no intact checkpoint is left to resume from, so nothing was trained (restore "
                          "it from a copy, or start over with overwrite=true or a new output_dir)")
    if damaged:
        names = ", ".join(os.path.basename(d.path) for d in damaged)
        print(f"dtrain: {what}; resuming from {os.path.basename(good.path)} instead ({names} set aside as "
              f"<name>{checkpoint.DAMAGED})", file=sys.stderr, flush=True)
    return Start(path, checkpoint=good.path, set_aside=tuple(d.path for d in damaged))


def _check_ours(path: str) -> None:
    """A non-empty directory without dtrain's marker holds someone else's files: never resume or replace it."""
    try:
        # <lock>.<pid>: what a lock swapped in for another user's leftover was called till it was in place.
        entries = ([n for n in os.listdir(path) if n not in NOT_A_RUN and not n.startswith(f"{LOCK_FILE}.")]
                   if os.path.isdir(path) else [])
    except OSError as exc:
        raise ConfigError("output_dir", path, f"a readable directory ({exc.strerror or exc})") from None
    if entries and MARKER not in entries:
        found = next((n for n in RUN_OUTPUTS if n in entries), sorted(entries)[0])
        raise ConfigError("output_dir", path, f"a new or empty directory, or one a dtrain run wrote (it has a {MARKER} "
                          f"file); this one holds {found!r}, which dtrain did not write, and is left alone")


def _check_writable(path: str, replacing: bool) -> None:
    """Probe, writing nothing that stays, that the run can create its files; replacing, that it can delete
    the earlier run's (a read-only folder in it must stop the run before anything is deleted)."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    dirs = [existing]
    if os.path.isdir(checkpoint.checkpoints_dir(path)):
        dirs.append(checkpoint.checkpoints_dir(path))
    if replacing:
        for name in RUN_OUTPUTS:
            target = os.path.join(path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                dirs += [root for root, _, _ in os.walk(target)]
    for d in dirs:
        try:
            fd, probe = tempfile.mkstemp(prefix=".dtrain-probe-", dir=d)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            where = "" if d == path else f": {d} is not"
            raise ConfigError("output_dir", path, f"a writable directory{where} ({exc.strerror or exc})") from None


def _same_math(path: str, cfg: Config) -> bool:
    import yaml

    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and not resume_conflicts(saved, to_dict(cfg))


def _keep_aside(path: str) -> None:
    """The dead attempt's metrics.jsonl becomes metrics.attempt-N.jsonl: restarted, nothing lost."""
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        n = 1
        while os.path.exists(os.path.join(path, f"metrics.attempt-{n}.jsonl")):
            n += 1
        os.replace(metrics, os.path.join(path, f"metrics.attempt-{n}.jsonl"))


def _remove_outputs(path: str) -> None:
    attempts = [n for n in os.listdir(path) if n.startswith("metrics.attempt-")] if os.path.isdir(path) else []
    for name in (*RUN_OUTPUTS, *attempts):
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
