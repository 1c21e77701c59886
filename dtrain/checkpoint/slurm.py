"""Putting a Slurm job back in the queue after a signal's checkpoint, so that it resumes on its own."""

from __future__ import annotations

import os
import subprocess
from typing import Callable

from dtrain.runtime.files import write_atomic


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
            write_atomic(flag, f"{job}\n".encode())
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
