"""Which launcher started this process, read from the environment alone.

Every function here is pure over a `Mapping[str, str]`, so each launcher is
tested with a table of environment variables and no processes.

One class per launcher, tried in order; the first whose `detect` is true wins:
  * TorchElastic: `torchrun` and `accelerate launch` (which runs torchrun's
    elastic agent). RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* are authoritative,
    even inside a Slurm job (`srun torchrun ...` sets SLURM_NTASKS to the node
    count, not the world size).
  * EnvVars: RANK/WORLD_SIZE set by hand or by another tool, no elastic agent.
  * SlurmStep: one process per task started by `srun`.
  * Single: nothing set; one process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from dtrain.errors import DTrainError

# Ports below 10000 are often taken by system services; the range stays below
# the Linux ephemeral range (32768+) so an OS-assigned port rarely collides.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job; nothing here touches torch.distributed."""

    launcher: str
    rank: int
    local_rank: Optional[int]
    """This process's index on its node; None where the launch does not say (see EnvVars)."""
    world_size: int
    master_addr: str
    master_port: Optional[int]
    """None for a single process, which needs no rendezvous."""


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key)
    if raw is None:
        raise DTrainError(f"environment variable {key} is not set; the launcher did not provide it")
    try:
        return int(raw)
    except ValueError:
        raise DTrainError(f"environment variable {key}={raw!r} is not an integer") from None


def _check_ranks(launcher: str, rank: int, local_rank: Optional[int], world_size: int) -> None:
    if world_size < 1:
        raise DTrainError(f"{launcher}: world size {world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise DTrainError(f"{launcher}: rank {rank} is outside [0, {world_size})")
    if local_rank is not None and not 0 <= local_rank < world_size:
        raise DTrainError(f"{launcher}: local rank {local_rank} is outside [0, {world_size})")


class TorchElastic:
    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env

    @staticmethod
    def read(env: Mapping[str, str]) -> LaunchInfo:
        rank, local_rank, world = _int(env, "RANK"), _int(env, "LOCAL_RANK"), _int(env, "WORLD_SIZE")
        _check_ranks("torchrun", rank, local_rank, world)
        if "LOCAL_WORLD_SIZE" in env and local_rank >= _int(env, "LOCAL_WORLD_SIZE"):
            raise DTrainError(
                f"torchrun: LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}")
        return LaunchInfo("torchrun", rank, local_rank, world,
                          env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT"))


class EnvVars:
    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return "RANK" in env or "WORLD_SIZE" in env

    @staticmethod
    def read(env: Mapping[str, str]) -> LaunchInfo:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = EnvVars.local_rank(env, rank, world)
        _check_ranks("env", rank, local_rank, world)
        # A stray RANK/WORLD_SIZE exported in a shell, then `srun -n N`, would
        # start N processes that all believe the shell's values.
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            ntasks, procid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
            if ntasks > 1 and (ntasks != world or procid != rank):
                raise DTrainError(
                    f"contradictory launch: WORLD_SIZE={world}, RANK={rank} but srun started "
                    f"SLURM_NTASKS={ntasks} tasks (this is SLURM_PROCID={procid}); unset RANK and "
                    "WORLD_SIZE under srun, or launch with torchrun")
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise DTrainError(f"WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT to be set")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        return LaunchInfo("env", rank, local_rank, world, env.get("MASTER_ADDR", "127.0.0.1"), port)

    @staticmethod
    def local_rank(env: Mapping[str, str], rank: int, world: int) -> Optional[int]:
        """LOCAL_RANK if set; else rank % LOCAL_WORLD_SIZE (ranks numbered node by node); else unknown.

        Taking RANK for it is right on one node only: rank 5 of a 4-per-node job
        would bind cuda:5. Unknown is fine for a single process, on CPU or with
        one visible GPU; `devices.resolve_device` refuses it on a node with several.
        """
        if "LOCAL_RANK" in env:
            return _int(env, "LOCAL_RANK")
        if "LOCAL_WORLD_SIZE" in env:
            per_node = _int(env, "LOCAL_WORLD_SIZE")
            if per_node < 1 or world % per_node:
                raise DTrainError(f"LOCAL_WORLD_SIZE={per_node} must be >= 1 and divide WORLD_SIZE={world}")
            return rank % per_node
        return 0 if world == 1 else None


class SlurmStep:
    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        # SLURM_LOCALID is set by srun for each task, not in the batch script
        # itself, so `python -m dtrain` typed in an sbatch script stays single.
        return all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))

    @staticmethod
    def read(env: Mapping[str, str]) -> LaunchInfo:
        rank, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
        world = _int(env, "SLURM_NTASKS")
        _check_ranks("srun", rank, local_rank, world)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_host(nodelist)
        else:
            raise DTrainError("srun: SLURM_NODELIST is not set, so the master host is unknown")
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        else:
            step = _int(env, "SLURM_STEP_ID") if env.get("SLURM_STEP_ID", "").isdigit() else 0
            port = slurm_port(_int(env, "SLURM_JOB_ID"), step)
        return LaunchInfo("srun", rank, local_rank, world, addr, port)


class Single:
    @staticmethod
    def detect(env: Mapping[str, str]) -> bool:
        return True

    @staticmethod
    def read(env: Mapping[str, str]) -> LaunchInfo:
        return LaunchInfo("single", 0, 0, 1, "127.0.0.1", None)


LAUNCHERS = (TorchElastic, EnvVars, SlurmStep, Single)


def detect_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Return the launch of the first launcher class that recognises `env`."""
    for launcher in LAUNCHERS:
        if launcher.detect(env):
            return launcher.read(env)
    raise AssertionError("Single always detects")  # pragma: no cover


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """A port every task of the step derives alike, spread so that concurrent jobs, and
    concurrent steps of one allocation (`srun ... &` sweeps), differ."""
    return SLURM_PORT_BASE + (job_id * 97 + step_id) % SLURM_PORT_SPAN


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'a[01-03,7],b' -> ['a01','a02','a03','a7','b']."""
    try:
        return _expand(nodelist)
    except ValueError:
        raise DTrainError(f"cannot parse Slurm node list {nodelist!r}") from None


def _expand(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not m:
            if "[" in item or "]" in item:
                raise ValueError(nodelist)
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        tails = _expand(suffix) if suffix else [""]
        for part in ranges.split(","):
            r = _RANGE.match(part.strip())
            if not r:
                raise ValueError(nodelist)
            lo, hi = r.group(1), r.group(2) or r.group(1)
            if int(hi) < int(lo):
                raise ValueError(part)
            width = len(lo)  # keep zero padding: node[001-003]
            for n in range(int(lo), int(hi) + 1):
                hosts.extend(f"{prefix}{n:0{width}d}{tail}" for tail in tails)
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [s.strip() for s in items if s.strip()]


def first_host(nodelist: str) -> str:
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise DTrainError(f"Slurm node list {nodelist!r} is empty")
    return hosts[0]
