"""The sbatch scripts under a real Slurm: time limits, requeues and preemption end COMPLETED, with
the weights of an uninterrupted run.

A slurmctld and a slurmd (Debian's packages, see tests/slurm_cluster.py) run for this module; jobs
are the project's own slurm/*.sbatch, submitted as a user would, with the same overrides. The
reference is an uninterrupted `torchrun` run of the same config at the same world size: the
requeued job's final weights must equal it bit for bit, each step must be logged once, and W&B
must see one run whose steps only increase.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from helpers import REPO, child_env, dtrain, records
from slurm_cluster import SlurmCluster, running
from test_logging import read_wandb_run_dir, tensorboard_points, wandb_env

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]

# 2 ranks x 150 samples in batches of 8: 19 steps an epoch, 76 in all; a dropout model.
ARGS = ["data.name=synthetic", "data.train_size=300", "data.batch_size=8", "train.epochs=4", "log.every_steps=1",
        "log.progress=none"]
MODEL = "model.name=tests.workers.dropout_model:build"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two emulated nodes on 127.0.0.1 (their names go into /etc/hosts while the cluster runs)."""
    yield from running(tmp_path_factory.mktemp("slurm2"), nodes=2,
                       why_not=None if os.access("/etc/hosts", os.W_OK) else "/etc/hosts is not writable")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    dtrain(2, [*ARGS, MODEL, f"output_dir={out}"])
    return out


def job_env(cluster: SlurmCluster, root: Path, sleep_s: float, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = child_env({**wandb_env(root), "DTRAIN_TEST_FORWARD_SLEEP_S": str(sleep_s), **(extra or {})})
    # The job finds python, torchrun and scontrol as a user's would: on PATH.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return cluster.env(env)


def slurm_log(root: Path, job: int) -> str:
    return (root / f"slurm-{job}.out").read_text(errors="replace")


def wait_for(ready, timeout: float, what: str, cluster: SlurmCluster, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ready():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout} s for {what}\n{log.read_text() if log.exists() else ''}\n"
                         f"{cluster.log_tail()}")


def assert_same_as_reference(run: Path, ref: Path) -> None:
    got, want = torch.load(run / "model.pt"), torch.load(ref / "model.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), "weights differ"
    steps = [(r["split"], r["step"]) for r in records(run)]
    assert steps == [(r["split"], r["step"]) for r in records(ref)], "each step logged once, as uninterrupted"


def assert_one_wandb_run(run: Path, wandb_dir: Path, attempts: int) -> None:
    """One W&B run id over all attempts (one offline directory each), its steps only increasing."""
    dirs = sorted(wandb_dir.rglob("offline-run-*"))  # named offline-run-<start time>-<id>: attempt order
    assert len(dirs) == attempts, [d.name for d in dirs]
    assert len({d.name.rsplit("-", 1)[1] for d in dirs}) == 1, [d.name for d in dirs]
    steps = [step for d in dirs for step, _ in read_wandb_run_dir(d).history]
    assert steps == sorted(steps) and steps[-1] == records(run)[-1]["step"], steps
    assert all(read_wandb_run_dir(d).exit_code == 0 for d in dirs), "every attempt finished its W&B part"


@pytest.mark.timeout(700)
def test_time_limit_signal_checkpoints_requeues_and_finishes_as_uninterrupted(
        cluster: SlurmCluster, reference: Path, tmp_path: Path) -> None:
    """train_torchrun.sbatch with a one-minute limit and USR1 50 s before it: each attempt saves at the
    signal and requeues itself until the run is done. Also: --config FILE key=value passes through."""
    cfg = tmp_path / "my.yaml"
    cfg.write_text("log:\n  wandb: true\n  tensorboard: true\n")
    # slurmctld sends the time-limit signal from a periodic check, so it comes anywhere from at once to
    # tens of seconds late; a job it missed entirely ran in one attempt and proves nothing: submit once more.
    for attempt in range(2):
        work = tmp_path / f"try{attempt}"
        work.mkdir()
        env = job_env(cluster, work, sleep_s=0.3, extra={"NPROC_PER_NODE": "2"})
        started = time.monotonic()
        job = cluster.sbatch(["--time=1", "--signal=USR1@50", "--cpus-per-task=2",
                              str(REPO / "slurm" / "train_torchrun.sbatch"), *ARGS, "--config", str(cfg), MODEL],
                             env, work)
        info = cluster.wait_done(job, timeout=380 if attempt == 0 else 250)
        took = time.monotonic() - started
        log = slurm_log(work, job)
        assert info["JobState"] == "COMPLETED", log
        restarts = int(info["Restarts"])
        if restarts >= 1:
            break
    assert restarts >= 1, "the time-limit signal never came: the run finished in one attempt, twice"
    # --open-mode=append: every attempt's log is there, each stopped by the signal and requeued by the script.
    assert [f"start {i}," in log for i in range(restarts + 1)] == [True] * (restarts + 1), log
    assert log.count("stopped by SIGUSR1") == restarts and "Traceback" not in log, log
    assert not list(work.glob(".dtrain-requeue-*")), "the requeue flag is consumed"
    run = work / "runs" / f"slurm-{job}"
    assert_same_as_reference(run, reference)
    assert_one_wandb_run(run, work / "wandb", restarts + 1)
    tb = tensorboard_points(run / "tensorboard")
    for tag, points in tb.items():
        assert len({s for s, _ in points}) == len(points), f"TensorBoard {tag}: duplicate steps"
    print(f"time limit: {restarts} requeues, {took:.0f} s from submit to COMPLETED")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how, extra", [("scontrol-requeue", []), ("preemption", ["data.num_workers=2"])])
def test_requeue_or_preemption_mid_run_resumes_to_the_uninterrupted_weights(
        cluster: SlurmCluster, reference: Path, tmp_path: Path, how: str, extra: list[str]) -> None:
    """train.sbatch (srun, one task per rank). `scontrol requeue` from outside, or a job in a higher
    partition preempting this one (PreemptMode=REQUEUE): Slurm sends SIGTERM to every process, then
    SIGKILL after KillWait (5 s here); the ranks save the same step in time and the job comes back.
    With DataLoader workers, which get the SIGTERM too and must not die of it before their rank saves."""
    env = job_env(cluster, tmp_path, sleep_s=0.1)
    job = cluster.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", "--exclusive",
                          str(REPO / "slurm" / "train.sbatch"), *ARGS, MODEL, "log.wandb=true", *extra], env,
                         tmp_path)
    run, out = tmp_path / "runs" / f"slurm-{job}", tmp_path / f"slurm-{job}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 15, 120, "15 steps", cluster, out)
    if how == "scontrol-requeue":
        cluster.scontrol("requeue", str(job))
    else:
        cluster.sbatch(["-p", "high", "-n1", "-o", "/dev/null", "--wrap", "sleep 1"], cluster.env(), tmp_path)
    saved = wait_for(lambda: "stopped by SIGTERM" in slurm_log(tmp_path, job), 60, "the save", cluster, out)
    resumed = wait_for(lambda: "resuming from" in slurm_log(tmp_path, job), 120, "the resume", cluster, out)
    info = cluster.wait_done(job, timeout=200)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    (line,) = [ln for ln in log.splitlines() if "stopped by SIGTERM" in ln]
    step = int(line.split(" at step ")[1].split()[0])
    assert 15 <= step < 76 and f"checkpoints/step-{step:09d}" in log, log
    assert_same_as_reference(run, reference)
    # W&B's service got the SIGTERM too: at most a line about it, never a traceback; one run id.
    assert "Traceback" not in log, log
    ids = {d.name.rsplit("-", 1)[1] for d in (tmp_path / "wandb").rglob("offline-run-*")}
    assert len(ids) == 1, ids
    print(f"{how}: saved {saved:.1f} s after it, first resumed step {resumed:.1f} s after it (KillWait 5 s)")


@pytest.mark.timeout(300)
def test_a_users_own_script_is_requeued_by_rank_0(cluster: SlurmCluster, reference: Path, tmp_path: Path) -> None:
    """A minimal batch script of a user's own (no DTRAIN_REQUEUE_FLAG): USR1 to every process of the
    step, as `--signal=USR1@N` sends it, and rank 0 runs `scontrol requeue` itself after saving."""
    script = tmp_path / "mine.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --requeue\n#SBATCH --open-mode=append\n"
                      'srun python -m dtrain output_dir=runs/mine-$SLURM_JOB_ID "$@"\n')
    env = job_env(cluster, tmp_path, sleep_s=0.1)
    job = cluster.sbatch(["--cpus-per-task=1", str(script), *ARGS, MODEL], env, tmp_path)
    run, out = tmp_path / "runs" / f"mine-{job}", tmp_path / f"slurm-{job}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 15, 120, "15 steps", cluster, out)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env(), check=True, timeout=30)
    info = cluster.wait_done(job, timeout=200)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "stopped by SIGUSR1" in log and f"requeued Slurm job {job}" in log, log
    assert_same_as_reference(run, reference)


@pytest.mark.timeout(300)
def test_a_usr1_to_the_whole_job_leaves_the_batch_shell_alive_and_requeues(
        cluster: SlurmCluster, reference: Path, tmp_path: Path) -> None:
    """`scancel --signal=USR1 --full`: the batch shell gets the signal as well as every rank. bash's
    default for USR1 is to exit, which ended the job FAILED with no requeue; train.sbatch catches it."""
    env = job_env(cluster, tmp_path, sleep_s=0.1)
    job = cluster.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", str(REPO / "slurm" / "train.sbatch"), *ARGS,
                          MODEL], env, tmp_path)
    run, out = tmp_path / "runs" / f"slurm-{job}", tmp_path / f"slurm-{job}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 15, 120, "15 steps", cluster, out)
    subprocess.run(["scancel", "--signal=USR1", "--full", str(job)], env=cluster.env(), check=True, timeout=30)
    info = cluster.wait_done(job, timeout=200)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "the batch shell got SIGUSR1" in log and "stopped by SIGUSR1" in log, log
    assert_same_as_reference(run, reference)


@pytest.mark.timeout(300)
def test_two_nodes_one_torchrun_each_requeued_resume_to_the_uninterrupted_weights(
        cluster2: SlurmCluster, reference: Path, tmp_path: Path) -> None:
    """train_torchrun.sbatch on 2 (emulated) nodes, one torchrun agent and one rank each, meeting at the
    first node's rendezvous. Part-way, USR2 to the batch shell alone (`scancel --batch`, as
    `--signal=B:USR2@N` sends it): the script passes it on to the ranks, which save, and the job comes
    back and finishes."""
    env = job_env(cluster2, tmp_path, sleep_s=0.1, extra={"NPROC_PER_NODE": "1"})
    job = cluster2.sbatch(["--nodes=2", "--cpus-per-task=1", str(REPO / "slurm" / "train_torchrun.sbatch"), *ARGS,
                           MODEL], env, tmp_path)
    run, out = tmp_path / "runs" / f"slurm-{job}", tmp_path / f"slurm-{job}.out"
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 15, 120, "15 steps", cluster2,
             out)
    subprocess.run(["scancel", "--signal=USR2", "--batch", str(job)], env=cluster2.env(), check=True, timeout=30)
    info = cluster2.wait_done(job, timeout=200)
    log = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "the batch shell got SIGUSR2" in log and "stopped by SIGUSR2" in log, log
    assert info["NodeList"] == "dtrain-n[1-2]" and "resuming from" in log, (info, log)
    assert_same_as_reference(run, reference)


@pytest.mark.multiproc
def test_slurm_scripts_are_valid_bash_and_set_up_for_clusters() -> None:
    for script in sorted((Path(__file__).resolve().parent.parent / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        text = script.read_text()
        for needle in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                       "--cpus-per-task=", "# source ", 'output_dir="runs/slurm-${SLURM_JOB_ID}" "$@"'):
            assert needle in text, (script.name, needle)
    torchrun_script = (Path(__file__).resolve().parent.parent / "slurm" / "train_torchrun.sbatch").read_text()
    assert "29500" not in torchrun_script and 'trap "" USR1 USR2' in torchrun_script
    assert "NPROC_PER_NODE" in torchrun_script
    for script in sorted((Path(__file__).resolve().parent.parent / "slurm").glob("*.sbatch")):
        assert "trap 'pass_on USR1' USR1" in script.read_text(), script.name
