"""Run dtrain (or a worker script) as real processes under torchrun, and read what they wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"

# Each multi-process run gets this long before it is killed; a hang fails the
# test in seconds instead of eating the CI budget.
DEFAULT_TIMEOUT_S = 180


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                       "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S, env: Optional[dict[str, str]] = None,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(env), cwd=cwd or REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def torchrun(nproc: int, module_args: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
             env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone`: the rendezvous port is assigned by the OS, so tests never collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *module_args]
    return run(cmd, timeout=timeout, env=env)


def predict_on_three_ranks(run_dir: Path, out: Path) -> dict:
    """`dtrain.predict` of a run's eval set (101 samples) under torchrun at 3 ranks: it says so once and writes
    every sample's output once, in dataset order. What it saved."""
    import torch

    res = torchrun(3, ["-m", "dtrain.predict", str(run_dir), str(out)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("dtrain.predict: 101 outputs") == 1
    saved = torch.load(out)
    assert torch.equal(saved["index"], torch.arange(101))
    return saved


def dtrain(nproc: int, overrides: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
           env: Optional[dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m dtrain` alone (nproc=0) or under torchrun with nproc processes."""
    if nproc == 0:
        result = run([sys.executable, "-m", "dtrain", *overrides], timeout=timeout, env=env)
    else:
        result = torchrun(nproc, ["-m", "dtrain", *overrides], timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def one_line_error(args: Sequence[str], env: Optional[dict[str, str]] = None) -> str:
    """`python -m dtrain ARGS` must exit 2 with one line on stderr, `dtrain: error: ...`; that line."""
    res = run([sys.executable, "-m", "dtrain", *args], timeout=90, env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("dtrain: error: "), res.stderr
    return lines[0]


def free_port() -> int:
    """A port the OS just handed out (and released); the tiny reuse race beats a fixed port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_id_with_free_port() -> int:
    """A Slurm job id whose derived port (dtrain.runtime.env.slurm_port) is free right now."""
    import random
    import socket

    from dtrain.runtime.env import slurm_port

    for _ in range(50):
        job_id = random.randrange(1, 10**7)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", slurm_port(job_id, 0)))
                return job_id
            except OSError:
                continue
    raise AssertionError("no free port found for a Slurm job id")


def srun_like(nproc: int, overrides: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
              env: Optional[dict[str, str]] = None, derive_port: bool = False) -> list[subprocess.CompletedProcess]:
    """Start `python -m dtrain` nproc times with the variables `srun` gives each task, no torchrun.

    With derive_port, MASTER_PORT is left unset and the ranks derive it from SLURM_JOB_ID,
    as under a real srun. Ranks run concurrently, each in its own session; on timeout all are killed.
    """
    import time

    job_id = _job_id_with_free_port() if derive_port else 4242
    port = {} if derive_port else {"MASTER_PORT": str(free_port())}
    procs = []
    for rank in range(nproc):
        task_env = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(nproc),
                    "SLURM_JOB_ID": str(job_id), "SLURM_NODELIST": "localhost", "SLURM_STEP_ID": "0",
                    **port, **(env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "dtrain", *overrides], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=child_env(task_env), cwd=REPO,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"srun-like job timed out after {timeout}s")
    return results


def worker(nproc: int, script: str, args: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT_S,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/workers/<script> under torchrun."""
    result = torchrun(nproc, [str(WORKERS / script), *args], timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def records(run_dir: Path, split: Optional[str] = None) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)
