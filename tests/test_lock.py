"""One run per directory at a time (checkpoint/lock.py): a second job into a directory in use stops in one line
naming the holder, before it writes anything; a holder that died, even by kill -9, blocks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.checkpoint.lock import LOCK_FILE, RunDirLock
from dtrain.config import load_config
from dtrain.errors import DTrainError
from dtrain.run import train
from helpers import REPO, child_env, records


def test_a_held_directory_is_refused_naming_its_holder_until_released(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first, second = RunDirLock(), RunDirLock()
    first.take(str(tmp_path))
    with pytest.raises(DTrainError) as refused:
        second.take(str(tmp_path))  # another open of the file: refused even within one process
    said = str(refused.value)
    assert said.startswith(f"output_dir {tmp_path} is in use by another run: pid {os.getpid()} on "
                           f"{socket.gethostname()}, started "), said
    assert ", Slurm job 4242, command: " in said and "\n" not in said
    assert said.endswith(f"; wait for it to end, or choose another output_dir (if it is gone, delete "
                         f"{tmp_path / LOCK_FILE})"), said
    assert not second.held
    first.release()
    second.take(str(tmp_path))
    second.release()


@pytest.mark.multiproc
def test_a_child_forked_while_the_lock_was_held_does_not_keep_it(tmp_path: Path) -> None:
    """A DataLoader worker of rank 0 inherits the locked file: releasing must free it all the same, and
    a SIGKILL of the holder must free it once its children are gone too."""
    lock = RunDirLock()
    lock.take(str(tmp_path))
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps, holding what it inherited
        time.sleep(60)
        os._exit(0)
    try:
        lock.release()
        with RunDirLock() as again:
            again.take(str(tmp_path))  # free, though the child still holds the inherited file open
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_lock_file_leaves_no_trace_and_a_leftover_one_is_no_run(tmp_path: Path) -> None:
    from dtrain.checkpoint.rundir import decide_start

    fresh = tmp_path / "new" / "run"
    with RunDirLock() as lock:
        lock.take(str(fresh))
        assert os.listdir(fresh) == [LOCK_FILE]
    assert not fresh.exists()  # made for the lock, and nothing else came: gone again
    (tmp_path / "empty").mkdir()
    with RunDirLock() as lock:
        lock.take(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []
    # A leftover lock file (its holder died before writing anything) makes no directory a run, nor someone else's.
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / LOCK_FILE).write_text("{}")
    cfg = load_config(None, ["data.name=synthetic", f"output_dir={tmp_path / 'left'}"])
    start = decide_start(cfg)
    assert (start.checkpoint, start.restart, start.replace) == (None, False, False)


def test_a_run_holds_the_lock_only_while_it_runs_and_overwrite_waits_for_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=2", "log.progress=none", f"output_dir={out}"])
    train(cfg, environ={})
    assert not (out / LOCK_FILE).exists()  # removed as the run let go of it
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with RunDirLock() as other:
        other.take(str(out))  # released by the run that ended
        overwrite = load_config(None, ["data.name=synthetic", "train.max_steps=2", "overwrite=true",
                                       f"output_dir={out}"])
        with pytest.raises(DTrainError, match=f"output_dir {out} is in use by another run: pid {os.getpid()}"):
            train(overwrite, environ={})
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE} == before  # untouched
    train(overwrite, environ={})  # the same process again, once the directory is free


def _start(args: list[str], pids: Path, gate: Path) -> subprocess.Popen:
    pids.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dtrain", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env({"DTRAIN_TEST_PID_DIR": str(pids), "DTRAIN_TEST_GATE":
                                                          str(gate)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end and proc.poll() is None, f"never saw {path}"
        time.sleep(0.05)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_jobs_into_one_directory_one_runs_the_other_names_it_and_a_killed_one_blocks_nothing(
        tmp_path: Path) -> None:
    """The same 2-rank command twice at once; the winner waits (gated model) until the loser is out, then is
    killed with SIGKILL, every process of it; the same command a third time goes ahead and logs each step once."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    # 64 samples, 2 ranks x 16: 2 steps an epoch, 4 in all; the gate holds the winner at its 3rd forward.
    args = ["data.name=synthetic", "data.train_size=64", "data.batch_size=16", "train.epochs=2", "log.every_steps=1",
            "log.progress=none", "model.name=tests.workers.gated_model:build", f"output_dir={out}"]
    jobs = {"a": _start(args, tmp_path / "a", gate), "b": _start(args, tmp_path / "b", gate)}
    try:
        started = time.monotonic()
        while all(p.poll() is None for p in jobs.values()):
            assert time.monotonic() - started < 150, "neither job stopped"
            time.sleep(0.05)
        loser = next(k for k, p in jobs.items() if p.poll() is not None)
        winner = "b" if loser == "a" else "a"
        _, err = jobs[loser].communicate()
        took = time.monotonic() - started
        _wait_for(tmp_path / winner / "waiting", jobs[winner])  # the winner is training, and still holds the dir
        held_by = int((tmp_path / winner / "pid_rank0.txt").read_text())
        lines = [ln for ln in err.splitlines() if ln.startswith("dtrain: error")]  # not torchrun's report
        assert jobs[loser].returncode != 0 and len(lines) == 1, err
        assert lines[0].startswith(f"dtrain: error: output_dir {out} is in use by another run: pid {held_by} on "
                                   f"{socket.gethostname()}, started "), lines[0]
        assert "-m dtrain data.name=synthetic" in lines[0], lines[0]
        assert not (tmp_path / loser / "pid_rank0.txt").exists()  # stopped before building anything
        print(f"refused job out {took:.1f} s after both started: {lines[0]}\n{err}")
        for rank in (0, 1):
            os.kill(int((tmp_path / winner / f"pid_rank{rank}.txt").read_text()), signal.SIGKILL)
        os.killpg(jobs[winner].pid, signal.SIGKILL)
        jobs[winner].communicate(timeout=30)
    finally:
        for proc in jobs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    gate.write_text("open")
    (tmp_path / "c").mkdir()
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "dtrain", *args], cwd=REPO, capture_output=True, text=True, timeout=150,
                           env=child_env({"DTRAIN_TEST_PID_DIR": str(tmp_path / "c"), "DTRAIN_TEST_GATE": str(gate)}))
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]


def test_lr_find_holds_its_own_directory(tmp_path: Path) -> None:
    """lr_find writes only into <output_dir>/lr_find/: that is what it locks (a training run there is not its)."""
    from dtrain.lr_find import lr_find

    cfg = load_config(None, ["data.name=synthetic", "lr_find.num_steps=3", f"output_dir={tmp_path}"])
    with RunDirLock() as other:
        other.take(str(tmp_path / "lr_find"))
        with pytest.raises(DTrainError) as refused:
            lr_find(cfg, environ={})
        assert str(refused.value).startswith(f"lr_find's directory {tmp_path / 'lr_find'} is in use by another "
                                             f"run: pid {os.getpid()}"), refused.value
        assert os.listdir(tmp_path / "lr_find") == [LOCK_FILE]
    with RunDirLock() as run:
        run.take(str(tmp_path))  # a training run in the same output_dir
        assert lr_find(cfg, environ={}) is not None
    assert (tmp_path / "lr_find" / "lr_find.csv").exists()


def test_a_run_refused_in_set_up_leaves_no_directory_it_made_parents_included(tmp_path: Path) -> None:
    """output_dir runs/exp/seed0 under a root that has none of them, and a model that fails to build: the lock made
    all three directories, and all three go again (a one-line error writes nothing)."""
    out = tmp_path / "runs" / "exp" / "seed0"
    cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "model.kwargs={depth: 3}",
                             f"output_dir={out}"])
    with pytest.raises(DTrainError):
        train(cfg, environ={})
    assert os.listdir(tmp_path) == []
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "other").mkdir()  # a sibling run's directory: runs/ is no longer only the lock's to remove
    with RunDirLock() as lock:
        lock.take(str(out) + "/")
    assert sorted(os.listdir(tmp_path / "runs")) == ["other"]


_HOLDER = """
import multiprocessing, os, sys, time
from dtrain.checkpoint.lock import RunDirLock
lock = RunDirLock()
lock.take(sys.argv[1])
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
worker.start()  # as a DataLoader worker is: forked, and not told when its parent dies
print(worker.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_a_holder_killed_with_its_forked_worker_alive_frees_the_directory_at_once(tmp_path: Path) -> None:
    """kill -9 of rank 0 while its DataLoader worker lives on (it would notice only seconds later): a restart at once
    finds the directory free, not held by its own dead predecessor's worker."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO, env=child_env({}),
                              stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(DTrainError, match=f"pid {holder.pid} on ") as refused:
            RunDirLock().take(str(tmp_path))
        assert "\n" not in str(refused.value)  # its command, python -c over several lines, on one line
        holder.kill()
        holder.wait(timeout=30)
        os.kill(worker, 0)  # still alive, holding whatever it inherited
        with RunDirLock() as again:
            again.take(str(tmp_path))
    finally:
        holder.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_job_looking_while_the_first_claims_is_told_it_is_in_use(tmp_path: Path) -> None:
    """The first job holds the lock and has made checkpoints/ but not yet its marker: the second is refused as
    "in use", not as a directory of someone else's files."""
    from dtrain.checkpoint.rundir import decide_start

    out = tmp_path / "run"
    cfg = load_config(None, ["data.name=synthetic", f"output_dir={out}"])
    with RunDirLock() as first:
        first.take(str(out))
        (out / "checkpoints").mkdir()
        with pytest.raises(DTrainError, match=f"output_dir {out} is in use by another run"):
            decide_start(cfg, RunDirLock())


def _take_as_another_user(directory: str) -> dict:
    """Take the lock in a forked child, as nobody when this is root (a file mode binds root to nothing); report
    what it found."""
    import json

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reported through the pipe
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            lock = RunDirLock()
            lock.take(directory)
            said = {"held": lock.held, "file": json.loads(Path(directory, LOCK_FILE).read_text()),
                    "names": sorted(os.listdir(directory))}
        except BaseException as exc:  # noqa: BLE001 - whatever it was, the test says it
            said = {"error": repr(exc)}
        os.write(write, json.dumps(said).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = json.loads(f.read())
    os.waitpid(child, 0)
    return said | {"pid": child}


def test_another_users_leftover_lock_file_is_locked_read_only_and_replaced_by_ours(tmp_path: Path) -> None:
    """A shared group directory holds a leftover lock file of another user's run (read-only to this one, and
    naming its dead writer): the lock is taken all the same, and the file at the path then names this run."""
    import json
    import shutil
    import tempfile

    shared = tempfile.mkdtemp(prefix="dtrain-shared-")  # not under tmp_path: nobody could not reach it
    try:
        os.chmod(shared, 0o777)
        leftover = Path(shared, LOCK_FILE)
        leftover.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "python -m dtrain"}))
        leftover.chmod(0o444)
        said = _take_as_another_user(shared)
        assert said.get("held") is True, said
        assert said["file"]["pid"] == said["pid"] and said["names"] == [LOCK_FILE], said
        if os.getuid() == 0:  # sticky (as /tmp): the leftover cannot be swapped, and is locked as it is
            os.chmod(shared, 0o1777)
            leftover.unlink()  # the first child's, never released (it ended without): again root's, read-only
            leftover.write_text("{}")
            leftover.chmod(0o444)
            said = _take_as_another_user(shared)
            assert said.get("held") is True and said["names"] == [LOCK_FILE], said
    finally:
        shutil.rmtree(shared)
