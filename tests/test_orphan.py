"""No rank outlives its launcher: `kill -9` of torchrun or `accelerate launch` while its ranks start or
train ends every rank within 30 s, each saying why in one line; `kill -9` of srun in a batch job is
Slurm's to clean up, and it does.

Real launchers, killed with a real SIGKILL; the ranks' pids are read from /proc before the kill and
watched until they are gone. Without dtrain.runtime.orphan, ranks killed in start-up waited in the
connection to the dead agent's store for 15-20 minutes, and ranks killed mid-training trained on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dtrain.checkpoint.store import committed
from dtrain.runtime.env import LaunchInfo
from dtrain.runtime.orphan import watching
from helpers import REPO, child_env
from slurm_cluster import SlurmCluster, running

pytestmark = pytest.mark.multiproc

BOUND_S = 30.0
"""The promise: every rank gone this long after its launcher's death."""

# 2 ranks x 300 samples in batches of 8: 38 steps an epoch at >= 0.2 s each, 10 epochs: left alone, a
# rank trains on for over a minute after the kill.
TRAIN = ["data.name=synthetic", "data.train_size=600", "data.batch_size=8", "train.epochs=10", "log.every_steps=1",
         "log.progress=none", "model.name=tests.workers.dropout_model:build"]
SLOW_STEPS = {"DTRAIN_TEST_FORWARD_SLEEP_S": "0.2"}


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of a live process; ("gone", 0) for one that is not (a zombie is gone too: it is
    dead, only not yet reaped)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return "gone", 0
    return ("gone", 0) if state in ("Z", "X") else (state, int(ppid))


def _ranks_of(launcher: int) -> list[int]:
    """The launcher's children that run dtrain: its ranks."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return []
    ranks = []
    for pid in map(int, children):
        try:
            if b"dtrain" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            continue
    return ranks


def _importing_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait(ready: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def _kill_launcher_and_time_the_ranks(launcher: subprocess.Popen, ranks: list[int]) -> float:
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    # Twice the bound, so a miss reports how late it was instead of only that it was.
    return _wait(lambda: all(_stat(p)[0] == "gone" for p in ranks), 2 * BOUND_S, f"ranks {ranks} to exit")


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test, whatever happened: a failing test must not leave ranks behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _stat(pid)[0] != "gone":
            os.kill(pid, signal.SIGKILL)


def _launch(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with (log.parent / f"{log.name}.out").open("w") as out, log.open("w") as err:
        return subprocess.Popen(argv, stdout=out, stderr=err, env=child_env(env), cwd=REPO, start_new_session=True)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"]


# The first checkpoint (step 5) takes 8 s on rank 0 while rank 1 waits in its collectives; 3750 steps of 20 ms
# (75 s) and a checkpoint every 5 would keep both ranks going for minutes after the kill.
SAVING = ["data.name=synthetic", "data.train_size=4000", "data.batch_size=16", "train.epochs=30",
          "checkpoint.every_steps=5", "log.progress=none", "model.name=tests.workers.slow_save_model:build"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name, when", [("torchrun", "start"), ("torchrun", "train"), ("torchrun", "save"),
                                        ("accelerate", "train")])
def test_every_rank_exits_within_30s_of_its_launchers_sigkill(name: str, when: str, tmp_path: Path,
                                                              leftovers: list[int]) -> None:
    """start: killed while both ranks import torch, before any rendezvous (they then found the agent's store
    gone and retried it for 15-20 minutes). train: killed after the first logged step. save: killed while rank
    0 writes a checkpoint and rank 1 waits for it in a collective. In the loop the ranks stop as on the
    launcher's SIGTERM, so they save a checkpoint on the way out."""
    if name == "accelerate":
        pytest.importorskip("accelerate")
    out, err = tmp_path / "run", tmp_path / "stderr"
    args, env = (SAVING, {"DTRAIN_TEST_PID_DIR": str(tmp_path), "DTRAIN_TEST_SLOW_SAVE_S": "8"}) if when == "save" \
        else (TRAIN, SLOW_STEPS)
    launcher = _launch([*(TORCHRUN if name == "torchrun" else ACCELERATE), "-m", "dtrain", *args,
                        f"output_dir={out}"], err, env)
    leftovers.append(launcher.pid)
    try:
        _wait(lambda: len(_ranks_of(launcher.pid)) == 2, 60, "two ranks")
        ranks = _ranks_of(launcher.pid)
        leftovers.extend(ranks)
        if when == "start":
            _wait(lambda: all(_importing_torch(p) for p in ranks), 60, "both ranks to import torch")
        elif when == "save":
            _wait(lambda: (tmp_path / "saving").exists(), 120, "rank 0 to start its first checkpoint")
        else:
            _wait(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip() != "",
                  120, "a logged step")
        assert all(_stat(p)[1] == launcher.pid for p in ranks), "the ranks are the launcher's children"
        took = _kill_launcher_and_time_the_ranks(launcher, ranks)
    finally:
        launcher.kill()
    stderr = err.read_text(errors="replace")
    print(f"{name}, killed at {when}: every rank gone {took:.1f} s after the launcher's SIGKILL")
    assert took < BOUND_S, stderr
    for rank in (0, 1):
        assert f"dtrain: rank {rank}: the launcher ({name}, pid {launcher.pid}) died; stopping\n" in stderr, stderr
    assert "still running" not in stderr, "the SIGTERM ended them; the hard exit was not needed"
    if when != "start":
        assert committed(str(out)), "stopped as on SIGTERM: a checkpoint saved on the way out"


RANK = textwrap.dedent("""
    import os, signal, sys, time
    from dtrain.runtime.orphan import LauncherWatch, launcher_pid
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank its SIGTERM cannot end (stuck in native code)
    LauncherWatch(launcher_pid(), "stand-in", 3, grace_s=1.0)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)
""")


@pytest.mark.timeout(60)
def test_a_rank_that_ignores_sigterm_is_ended_after_the_grace(tmp_path: Path, leftovers: list[int]) -> None:
    """The hard exit behind the SIGTERM, with a plain stand-in for the launcher (no torch: cheap)."""
    ready, err = tmp_path / "pid", tmp_path / "stderr"
    stand_in = _launch([sys.executable, "-c", "import subprocess, sys, time; "
                        f"subprocess.Popen([sys.executable, '-c', {RANK!r}, {str(ready)!r}]); time.sleep(120)"],
                       err, {})
    leftovers.append(stand_in.pid)
    _wait(lambda: ready.exists() and ready.read_text() != "", 30, "the rank to start watching")
    rank = int(ready.read_text())
    leftovers.append(rank)
    took = _kill_launcher_and_time_the_ranks(stand_in, [rank])
    stderr = err.read_text()
    assert stderr == (f"dtrain: rank 3: the launcher (stand-in, pid {stand_in.pid}) died; stopping\n"
                      "dtrain: rank 3: still running 1 s after the launcher died; exiting now\n"), stderr
    assert 1.0 <= took < 10, took


@pytest.mark.parametrize("kind", ["single", "env"])
def test_no_watch_without_a_launcher_that_is_the_parent(kind: str) -> None:
    """`python -m dtrain` and dtrain.train() in a script or notebook (parent: a shell or a kernel, which may
    go away on purpose: nohup, &), and RANK/WORLD_SIZE set by hand (parent unknown): nothing watched."""
    with watching(LaunchInfo(kind, 0, 0, 1, "127.0.0.1", None)) as watch:
        assert watch is None


def _processes_naming(text: str) -> dict[int, bytes]:
    """{pid: command line} of the live processes whose command line holds `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline and _stat(int(entry.name))[0] != "gone":
                found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running(tmp_path_factory.mktemp("slurm"))


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_under_slurm_a_killed_srun_takes_its_tasks_with_it(cluster: SlurmCluster, tmp_path: Path,
                                                             leftovers: list[int]) -> None:
    """slurm/train.sbatch, `kill -9` of its srun mid-training. The tasks are slurmstepd's children, not
    srun's (they may be on other nodes): what ends them is slurmstepd, which cancels the step when srun's
    connection drops. dtrain has nothing to add (its watch is of slurmstepd, which lives on), and the
    tasks' lines would have nowhere to go (srun carried their output)."""
    env = child_env(SLOW_STEPS)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    job = cluster.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", str(REPO / "slurm" / "train.sbatch"), *TRAIN],
                         cluster.env(env), tmp_path)
    mark = f"output_dir=runs/slurm-{job}"
    metrics = tmp_path / "runs" / f"slurm-{job}" / "metrics.jsonl"
    try:
        _wait(lambda: metrics.exists() and metrics.read_text().strip() != "", 120, "a logged step")
    except AssertionError:
        raise AssertionError(f"{(tmp_path / f'slurm-{job}.out').read_text()}\n{cluster.log_tail()}") from None
    procs = _processes_naming(mark)
    leftovers.extend(procs)
    tasks = [p for p, cmd in procs.items() if b"-m\0dtrain" in cmd and not cmd.startswith(b"srun")]
    sruns = [p for p, cmd in procs.items() if cmd.startswith(b"srun") and _stat(p)[1] not in procs]
    assert len(tasks) == 2 and len(sruns) == 1, procs
    assert all(b"slurmstepd" in Path(f"/proc/{_stat(p)[1]}/cmdline").read_bytes() for p in tasks)
    os.kill(sruns[0], signal.SIGKILL)
    took = _wait(lambda: not _processes_naming(mark), 2 * BOUND_S, f"every process of job {job} to exit")
    print(f"srun in train.sbatch, killed mid-training: every process of the step gone {took:.1f} s later")
    assert took < BOUND_S
    info = cluster.wait_done(job, timeout=BOUND_S)
    assert info["JobState"] == "FAILED", (info, (tmp_path / f"slurm-{job}.out").read_text())
