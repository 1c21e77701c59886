"""One run per directory at a time: rank 0 holds an OS lock on `<output_dir>/.dtrain-lock` for the run's life.

flock(2), not a pid file: the kernel drops the lock when the holding process dies, however it dies (kill -9,
the OOM killer; for a node that dies on NFS, see below), so a dead job never blocks the next one and there is
no staleness to judge.

A process forked after `take` (a DataLoader worker) would share the locked open file and keep the lock after a
kill -9 of rank 0 until it notices its parent is gone (5 s and more), long enough to refuse a quick restart its
own dead predecessor. So each child closes its copy as it is forked (os.register_at_fork): the lock dies with
rank 0 alone. The other ways out, weighed: an OFD lock (F_OFD_SETLK) belongs to the open file description just
as flock does, so a fork shares it too; a classic POSIX lock (F_SETLK) is not inherited by a fork, but it belongs
to the process, so a second `take` in the same process would not be refused, and closing any descriptor of the
file in the process (`holder` reading it, a refused `take`) drops it silently; waiting out a dead holder's
children (pid, start time and boot id in the file) would make a restart wait and still miss a holder that
wrote nothing. A fork the hook does not see (from C code, not os.fork) keeps the old behaviour.
The file also says who holds it (host, pid, start, Slurm job, command) for the refusal's one line. It is
removed at release; one left by a holder that died holds no lock and means nothing (one of another user's, not
writable here, is locked read-only and swapped for this run's own where the directory allows).

On NFS, Linux's client turns flock into a lock the server arbitrates across nodes (unless the share is mounted
with local_lock=flock or all, where it guards one node only). There a dead process frees it as anywhere (its
node's kernel unlocks), but a node that dies (crash, power, cut off the network) leaves its locks with the
server: until the NFSv4 lease runs out (about 90 s), or under NFSv3's lock manager until that node boots again.
So the refusal says to delete the file if the job it names is gone: a new job then locks a new file.
Where the file system has no locks at all (Lustre mounted without -o flock, say), the run goes on unlocked and
says so in one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from typing import Callable, Optional

from dtrain.errors import ConfigError, DTrainError
from dtrain.runtime.startup import process_start

LOCK_FILE = ".dtrain-lock"
"""In output_dir while a run uses it; never a sign by itself that the directory holds a run."""

# Locks the file system cannot take (as opposed to a lock someone else holds).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLock:
    """Taken by rank 0 once its run's directory is known (`take`), held until `release` or the process's end.

    `take` refuses, in one line naming the holder, while any other process holds the directory, this one
    included (a second `dtrain.train` in a thread). Used as a context manager, it is released on the way out,
    so `dtrain.train` called twice in a row in one process takes it twice.
    """

    def __init__(self) -> None:
        self._fd: Optional[int] = None
        self._dir = ""
        self._made: list[str] = []
        self._fork_hook = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self, directory: str, name: str = "output_dir") -> None:
        """`name`: what the refusal calls `directory` (lr_find locks `<output_dir>/lr_find`, not the output_dir)."""
        if self._fd is not None:
            raise DTrainError(f"internal: the run directory lock is already held on {self._dir}")
        path = os.path.join(directory, LOCK_FILE)
        while True:
            try:
                made = _missing(directory)
                os.makedirs(directory, exist_ok=True)
                fd, writable = _open(path)
            except FileNotFoundError:
                continue  # a releasing run removed its empty directory between the two calls: make it again
            except OSError as exc:
                allowed = f"a writable directory ({exc.strerror or exc})"
                raise ConfigError("output_dir", directory, allowed, "" if name == "output_dir" else
                                  f"{name} {directory} is not writable ({exc.strerror or exc}); allowed: another "
                                  "output_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                # NFS keeps the lock of a node that died (see above): the way out, for when no job is left.
                raise DTrainError(f"{name} {directory} is in use by another run: {holder(path)}; wait for it "
                                  f"to end, or choose another output_dir (if it is gone, delete {path})") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_LOCKS:
                    raise
                print(f"dtrain: warning: cannot lock {path} ({exc.strerror}): this file system has no locks, so "
                      "nothing stops a second job from writing into the same output_dir", file=sys.stderr, flush=True)
                return
            # A release removes the file: if that came between our open and our lock, we hold a file nobody
            # else will open. Open the one at the path now.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        if not writable:
            fd = _own_file(fd, path)
        self._fd, self._dir, self._made = fd, directory, made
        if not self._fork_hook:
            # Once per lock object, holding it weakly: a hook cannot be unregistered, and a dead one does nothing.
            os.register_at_fork(after_in_child=_closer(weakref.ref(self)))
            self._fork_hook = True
        try:
            data = json.dumps(describe_this_process()).encode()
            # Written over the old text, then cut: a reader never finds the file empty, and retries a mix.
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError:
            pass  # the lock stands; only a refused job's message would say less

    def release(self) -> None:
        """Remove the file and unlock; the directories `take` made (output_dir and any missing parent) go too,
        leaf up, as long as nothing else wrote into them (a run refused before it wrote anything)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still locked: a job that opened it meanwhile finds, once it has the lock, that the
            # file it locked is no longer the one at the path, and opens anew (see `take`).
            os.remove(os.path.join(self._dir, LOCK_FILE))
            for made in self._made:
                os.rmdir(made)  # refused once not empty: the run (or someone else) wrote there, so all above stays
        except OSError:
            pass  # a leftover lock file or empty directory blocks nothing
        finally:
            # Unlocked explicitly, not just closed: a process forked where the fork hook did not run shares
            # this open file, and would otherwise hold the lock until it exits.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open(path: str) -> tuple[int, bool]:
    """The lock file, and whether this process may write it: a leftover of another user's run in a shared group
    directory is not, but flock needs only a read-only descriptor."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
    except PermissionError as exc:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError:
            raise exc from None  # missing, and not ours to create: the directory is not writable


def _own_file(fd: int, path: str) -> int:
    """Holding the lock on someone else's leftover file (read-only), put one of this process's own in its place,
    locked before it is there, so that the refusal names this run and not the leftover's dead writer. A job
    that locks the old file once it is let go finds it is no longer the one at the path (see `take`). Where the
    directory allows no such swap (sticky), the old file stays locked and the refusal names whoever wrote it."""
    spare = f"{path}.{os.getpid()}"
    try:
        new = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError:
        return fd
    try:
        fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(spare, path)
    except OSError:
        os.close(new)
        try:
            os.remove(spare)
        except OSError:
            pass
        return fd
    os.close(fd)
    return new


def _closer(ref: weakref.ref[RunDirLock]) -> Callable[[], None]:
    def close_in_child() -> None:
        lock = ref()
        if lock is not None and lock._fd is not None:
            fd, lock._fd = lock._fd, None  # the child never unlocks or removes what its parent holds
            try:
                os.close(fd)
            except OSError:
                pass

    return close_in_child


def _missing(directory: str) -> list[str]:
    """The directories makedirs(directory) would create, leaf first."""
    missing, d = [], os.path.normpath(directory)
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent in ("", d):
            break
        d = parent
    return missing


def describe_this_process() -> dict[str, object]:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv:
        argv[0] = os.path.basename(argv[0])
    job = os.environ.get("SLURM_JOB_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array[0] and array[1]:
        job = f"{array[0]}_{array[1]} ({job})"
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(), "slurm_job": job,
            "command": shlex.join(argv)}


def holder(path: str, wait_s: float = 1.0) -> str:
    """Who holds the lock, in words, from what its holder wrote into the file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            if isinstance(info, dict):
                return _in_words(info)
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            # The holder has locked but not yet written (or cannot write): still refused, less said.
            return "a run that has not said who it is"
        time.sleep(0.05)


def _in_words(info: dict[str, object]) -> str:
    started = info.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "at an unknown time")
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    command = " ".join(str(info.get("command")).split())  # python -c 'a program over lines': still one line
    return f"pid {info.get('pid')} on {info.get('host')}, started {when}{job}, command: {command}"
