"""A real, throwaway Slurm cluster for the `slurm` tests: Debian's slurmctld + slurmd on 127.0.0.1.

One node (named after a host name that resolves, so job scripts can use it as the master
address), no cgroups, no accounting, auth/none, its own ports and state directory under a
temporary path; /etc is never touched (the client commands find the cluster through
SLURM_CONF). The daemons are ended by their recorded PIDs. Needs root (slurmd starts jobs
as their users) and the packages `slurmctld slurmd slurm-client` (the README's install line).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd slurm-client"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_name() -> str:
    """A name for the one node that resolves to this machine: the job scripts use it as MASTER_ADDR."""
    for name in (socket.gethostname().split(".")[0], "localhost"):
        try:
            socket.gethostbyname(name)
            return name
        except OSError:
            continue
    raise RuntimeError("neither this host's name nor localhost resolves")


HOSTS = Path("/etc/hosts")


def _hosts_mark(root: Path) -> str:
    return f"# dtrain slurm tests: {root}"


class SlurmCluster:
    """`nodes=1`: one node named after this host. `nodes=2`: two emulated nodes, dtrain-n1 and
    dtrain-n2, both on 127.0.0.1, made resolvable by a marked line in /etc/hosts that stop()
    takes out again (jobs use the first node's name as the master address)."""

    def __init__(self, root: Path, cpus: int = 4, kill_wait_s: int = 5, nodes: int = 1) -> None:
        self.root = root
        self.names = [_node_name()] if nodes == 1 else [f"dtrain-n{i}" for i in range(1, nodes + 1)]
        self.node = self.names[0]
        self.conf = root / "etc" / "slurm.conf"
        self.cpus = cpus
        self.kill_wait_s = kill_wait_s

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> None:
        for sub in ("etc", "state", "log", "run", *(f"spool/{n}" for n in self.names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if len(self.names) > 1:
            with HOSTS.open("a") as fh:  # appended in place: /etc/hosts may be a bind mount
                fh.write(f"127.0.0.1 {' '.join(self.names)} {_hosts_mark(self.root)}\n")
        ctld_port, *slurmd_ports = _free_ports(1 + len(self.names))
        mem = max(1024, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname={socket.gethostname().split('.')[0]} NodeAddr=127.0.0.1 "
                          f"Port={p} CPUs={self.cpus} RealMemory={mem // len(self.names)} State=UNKNOWN"
                          for n, p in zip(self.names, slurmd_ports))
        all_nodes = ",".join(self.names)
        # The node advertises more CPUs than the machine has (2 in CI) so that a 2-task job
        # with --cpus-per-task=2 fits; nothing is pinned (task/none), so this only affects scheduling.
        self.conf.write_text(f"""\
ClusterName=dtraintest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait={self.kill_wait_s}
MinJobAge=600
DebugFlags=NO_CONF_HASH
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{nodes}
PartitionName=debug Nodes={all_nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes={all_nodes} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env())
        self._wait(lambda: " is UP" in self._out(["scontrol", "ping"]), timeout, "slurmctld up")
        for name in self.names:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], check=True, env=self.env())
        # One line per partition the node is in.
        self._wait(lambda: set(self._out(["sinfo", "-h", "-N", "-o", "%T"]).split()) == {"idle"}, timeout,
                   "node idle")

    def stop(self) -> None:
        try:
            jobs = self._out(["squeue", "-h", "-o", "%i"]).split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env(), timeout=30)
                self._wait(lambda: not self._out(["squeue", "-h", "-o", "%i"]).strip(), 60, "jobs gone",
                           fail=False)
        except (OSError, subprocess.SubprocessError):
            pass
        self._restore_hosts()
        for pid_file in sorted((self.root / "run").glob("*.pid"), key=lambda p: p.name.startswith("slurmctld")):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def _restore_hosts(self) -> None:
        mark = _hosts_mark(self.root)
        try:
            text = HOSTS.read_text()
            if mark in text:
                HOSTS.write_text("".join(ln for ln in text.splitlines(True) if mark not in ln))
        except OSError:
            pass

    # ------------------------------------------------------------ jobs
    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        """Submit; `env` is the whole environment the job gets (sbatch's default --export=ALL)."""
        res = subprocess.run(["sbatch", "--parsable", *args], env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd,
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self._out(["scontrol", "show", "job", "-o", str(job_id)])
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float) -> str:
        self._wait(lambda: self.state(job_id) in states, timeout, f"job {job_id} in {states}")
        return self.state(job_id)

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE")
        self.wait_state(job_id, done, timeout)
        return self.job(job_id)

    def scontrol(self, *args: str) -> None:
        subprocess.run(["scontrol", *args], env=self.env(), check=True, capture_output=True, timeout=30)

    def log_tail(self, n: int = 30) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    # ------------------------------------------------------------ internals
    def _out(self, cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    def _wait(self, ready, timeout: float, what: str, fail: bool = True) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            time.sleep(0.2)
        if fail:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{self.log_tail()}")


def running(root: Path, nodes: int = 1, why_not: Optional[str] = None) -> Iterator[SlurmCluster]:
    """A fixture's body: a started cluster under `root`, stopped afterwards; without Slurm (or for `why_not`)
    the test is skipped, and under CI it fails (.ci/run installs the packages)."""
    import pytest

    why = missing() or why_not
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the slurm tests: {why}")
        pytest.skip(why)
    c = SlurmCluster(root, nodes=nodes)
    try:
        c.start()
        yield c
    finally:
        c.stop()
