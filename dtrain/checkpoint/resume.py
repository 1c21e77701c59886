"""Where a run starts: a new output directory, an earlier run's newest checkpoint, or a run already finished.

And the two halves of continuing: `Saver` gathers what every rank must keep
(one collective) and has rank 0 commit it; `restore` puts a checkpoint back
into a freshly built run on every rank.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist

from dtrain.checkpoint import store as checkpoint
from dtrain.config import Config, resume_conflicts, to_dict
from dtrain.data.loaders import Loaders
from dtrain.runtime.dist import DistState
from dtrain.errors import ConfigError, DTrainError
from dtrain.loop.meters import Meter
from dtrain.runtime.signals import StopSignals
from dtrain.runtime.seeding import rank_seed, rng_state, seed_everything, set_rng_state
from dtrain.loop.state import TrainState

# What a run writes into output_dir; overwrite=true removes all of it (and nothing else), so a
# replaced run leaves no stale event file, plot, weights or checkpoint behind.
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "model.pt", "curves.png", "tensorboard", "wandb", checkpoint.SUBDIR)
MARKER = ".dtrain-run"
"""Written first into every output_dir a run claims: only a directory holding it is dtrain's to resume or replace."""
NOT_A_RUN = ("lr_find",)
"""What dtrain writes into an output_dir outside a run (python -m dtrain.lr_find)."""


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


def decide_start(cfg: Config) -> Start:
    """Rank 0: pick the output directory and what to continue from, refusing to clobber what is there.

    It only looks (and probes that it could write): deleting an earlier run, creating
    directories and the marker wait for `claim`, after the whole run is set up, so a
    config, factory or dataset that fails leaves an earlier run as it was.
    """
    path = os.path.expanduser(cfg.output_dir) if cfg.output_dir else new_run_dir()
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
        step = checkpoint.step_of(start.checkpoint)
        later = [f.path for f in checkpoint.committed(path) if f.step > step]
        if later or checkpoint.finished(path) is not None:
            # Continuing from an earlier point here would mix two trajectories in one directory:
            # the later checkpoints would win the next resume=auto, and pruning would eat the new ones.
            raise ConfigError("resume", cfg.resume, f"a checkpoint no older than the newest in {path} "
                              f"({later[-1] if later else 'the run there finished'}); to branch off an earlier "
                              "step, resume from it into a new output_dir")
    elif cfg.resume == "auto" and checkpoint.committed(path):
        latest = checkpoint.committed(path)[-1].path
        start = Start(path, checkpoint=latest, finished=checkpoint.finished(path))
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
        os.makedirs(checkpoint.checkpoints_dir(path), exist_ok=True)
        marker = os.path.join(path, MARKER)
        if not os.path.exists(marker):
            checkpoint.write_atomic(marker, b"dtrain run directory: overwrite=true may replace what dtrain wrote here\n")
    except OSError as exc:
        raise DTrainError(f"cannot prepare the output directory {path}: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from None


def _check_ours(path: str) -> None:
    """A non-empty directory without dtrain's marker holds someone else's files: never resume or replace it."""
    try:
        entries = [n for n in os.listdir(path) if n not in NOT_A_RUN] if os.path.isdir(path) else []
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


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum_steps * world_size


def restore(state: TrainState, payload: dict[str, Any], cfg: Config, loaders: Loaders, meter: Meter,
            path: str) -> None:
    """Put a checkpoint back on this rank, after checking that it belongs to this config."""
    ds = state.dist
    conflicts = resume_conflicts(payload["config"], to_dict(cfg))
    if conflicts:
        raise DTrainError(f"cannot resume from {path}: the config differs from the checkpoint's in what changes "
                          f"the math: {'; '.join(conflicts)}; use resume=never with a new output_dir, or "
                          "overwrite=true, to start over")
    saved_batch, batch = int(payload["global_batch"]), global_batch(cfg, ds.world_size)
    if saved_batch != batch:
        raise DTrainError(f"cannot resume from {path}: its global batch is {saved_batch}, this run's is {batch} "
                          f"({cfg.data.batch_size} x {cfg.train.grad_accum_steps} x {ds.world_size} processes); "
                          "change data.batch_size or train.grad_accum_steps so that they match")
    try:
        state.load_state_dict(payload["train"])
    except (RuntimeError, KeyError, ValueError) as exc:  # e.g. a model factory changed since the save
        first = " ".join(str(exc).split())[:300]
        raise DTrainError(f"cannot resume from {path}: it does not fit this run's model or optimizer "
                          f"({type(exc).__name__}: {first})") from None
    meter.load_global_state(payload["meters"], ds.is_main)
    rngs = payload["rng"]
    if int(payload["world_size"]) == ds.world_size:
        set_rng_state(rngs[str(ds.rank)], loaders.workers_rng)
    else:
        # Other ranks than were saved: fresh per-rank streams, still a function of
        # (seed, rank, world size) and of the step, so a rerun repeats them.
        seed = rank_seed(cfg.train.seed + state.step, ds.rank, ds.world_size)
        seed_everything(seed)
        loaders.workers_rng.manual_seed(seed)


class Saver:
    """Saves a checkpoint of the whole job: called by every rank at the same step boundary."""

    def __init__(self, cfg: Config, output_dir: str, ds: DistState, loaders: Loaders, signals: StopSignals,
                 run_id: Callable[[], Optional[str]], say: Callable[[str], None]) -> None:
        self.cfg, self.output_dir, self.ds, self.loaders = cfg, output_dir, ds, loaders
        self.signals, self.run_id, self.say = signals, run_id, say

    def save(self, state: TrainState, meter: Meter) -> None:
        with self.signals.busy():  # ranks wait in collectives while rank 0 writes: not "blocked"
            self._save(state, meter)

    def _save(self, state: TrainState, meter: Meter) -> None:
        started = time.perf_counter()
        meters = meter.global_state(self.ds)  # collective: every rank is here
        mine = rng_state(self.loaders.workers_rng)
        rngs: list[Any] = [mine]
        if self.ds.world_size > 1:
            rngs = [None] * self.ds.world_size
            dist.all_gather_object(rngs, mine)

        def write() -> str:
            payload = {"format": 1, "train": state.state_dict(), "meters": meters,
                       "rng": {str(r): s for r, s in enumerate(rngs)}, "world_size": self.ds.world_size,
                       "global_batch": global_batch(self.cfg, self.ds.world_size), "config": to_dict(self.cfg),
                       "wandb_id": self.run_id()}
            return checkpoint.save(self.output_dir, state.step, state.epoch, payload, self.cfg.checkpoint.keep)

        # Rank 0 writes; a failure there (a full disk) reaches every rank as one error.
        path = self.ds.run_on_main(write, share_result=False)
        if self.ds.is_main:
            size = os.path.getsize(os.path.join(path, checkpoint.STATE))
            self.say(f"dtrain: checkpoint of step {state.step} saved in {time.perf_counter() - started:.2f} s "
                     f"({size / 2**20:.1f} MiB): {path}")


REQUEUE_FLAG_ENV = "DTRAIN_REQUEUE_FLAG"
"""Set by a batch script that requeues the job itself once its step has ended (slurm/*.sbatch do)."""


def requeue_slurm_job(say: Callable[[str], None]) -> None:
    """Rank 0, after a signal's checkpoint, once everything is closed: put the Slurm job back in the queue.

    `scontrol requeue` ends the running step at once (SIGTERM to each of its processes), so issued from
    here it cuts short whatever is still exiting: other ranks, torchrun (which then prints a traceback).
    A batch script that sets DTRAIN_REQUEUE_FLAG gets a file there instead and requeues after `srun`
    returns, when nothing of the step is left to kill.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    flag = os.environ.get(REQUEUE_FLAG_ENV)
    if flag:
        try:
            checkpoint.write_atomic(flag, f"{job}\n".encode())
            say(f"dtrain: asked the batch script to requeue Slurm job {job}; it resumes from the checkpoint")
            return
        except OSError as exc:
            say(f"dtrain: cannot write {flag} ({exc.strerror or exc}); requeueing Slurm job {job} from here")
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"dtrain: could not requeue Slurm job {job}: {exc}; resubmit the same command to resume")
        return
    if res.returncode == 0:
        say(f"dtrain: requeued Slurm job {job}; it resumes from the checkpoint")
    else:
        why = " ".join((res.stderr or res.stdout).split()) or f"exit {res.returncode}"
        say(f"dtrain: Slurm job {job} was not requeued ({why}); submit it with --requeue, or resubmit "
            "the same command to resume")


def print_main(ds: DistState) -> Callable[[str], None]:
    def say(line: str) -> None:
        if ds.is_main:
            print(line, file=sys.stdout, flush=True)
    return say
