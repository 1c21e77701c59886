"""Launcher detection from environment tables: pure functions, no processes."""

from __future__ import annotations

import re

import pytest

from dtrain.runtime.env import LaunchInfo, detect_launch, expand_hostlist, first_host, slurm_port
from dtrain.errors import DTrainError

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc", "GROUP_RANK": "1"}
SRUN = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
        "SLURM_NODELIST": "gpu[03-05,9]", "SLURM_STEP_ID": "0"}


def test_nothing_set_is_one_process() -> None:
    info = detect_launch({})
    assert info == LaunchInfo("single", 0, 0, 1, "127.0.0.1", None)


def test_torchrun() -> None:
    assert detect_launch(TORCHRUN) == LaunchInfo("torchrun", 3, 1, 8, "node0", 29500)


def test_accelerate_launch_sets_the_same_variables() -> None:
    # accelerate launch runs torch's elastic agent, which exports these.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29501", "TORCHELASTIC_RUN_ID": "none", "ACCELERATE_MIXED_PRECISION": "no"}
    assert detect_launch(env) == LaunchInfo("torchrun", 0, 0, 2, "127.0.0.1", 29501)


def test_torchrun_under_srun_trusts_torchrun() -> None:
    # `srun torchrun --nproc_per_node=4` on 2 nodes: SLURM_NTASKS=2, WORLD_SIZE=8.
    info = detect_launch({**TORCHRUN, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    assert (info.launcher, info.rank, info.world_size) == ("torchrun", 3, 8)


def test_plain_env_vars() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234", "LOCAL_RANK": "1"}
    assert detect_launch(env) == LaunchInfo("env", 1, 1, 2, "h", 1234)


@pytest.mark.parametrize("extra, local_rank", [
    ({"LOCAL_RANK": "2"}, 2),
    ({"LOCAL_WORLD_SIZE": "4"}, 1),   # rank 5 of 4 per node: the second process of the second node
    ({"LOCAL_WORLD_SIZE": "8"}, 5),
    ({}, None),                       # nothing says: unknown, never RANK (that would be cuda:5)
])
def test_manual_launch_local_rank(extra: dict[str, str], local_rank: object) -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1234", **extra}
    assert detect_launch(env).local_rank == local_rank


def test_manual_launch_of_one_process_needs_no_local_rank() -> None:
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0


@pytest.mark.parametrize("lws", ["3", "0"])
def test_local_world_size_must_divide_the_world(lws: str) -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1234", "LOCAL_WORLD_SIZE": lws}
    with pytest.raises(DTrainError, match=f"LOCAL_WORLD_SIZE={lws} must be >= 1 and divide WORLD_SIZE=8"):
        detect_launch(env)


def test_srun_step() -> None:
    info = detect_launch(SRUN)
    assert info == LaunchInfo("srun", 5, 1, 8, "gpu03", slurm_port(123456))


def test_srun_port_is_derived_from_job_and_step_id_and_master_port_wins() -> None:
    a = detect_launch({**SRUN, "SLURM_JOB_ID": "1000"}).master_port
    b = detect_launch({**SRUN, "SLURM_JOB_ID": "1001"}).master_port
    c = detect_launch({**SRUN, "SLURM_JOB_ID": "1000", "SLURM_STEP_ID": "1"}).master_port
    assert len({a, b, c}) == 3 and all(1024 < p < 32768 for p in (a, b, c))
    assert detect_launch({**SRUN, "MASTER_PORT": "4000", "MASTER_ADDR": "x"}).master_port == 4000


def test_sbatch_script_without_srun_is_one_process() -> None:
    # The batch step has SLURM_PROCID/SLURM_NTASKS but no SLURM_LOCALID.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_NODELIST": "a[1-2]"}
    assert detect_launch(env).launcher == "single"


@pytest.mark.parametrize("env, needle", [
    ({**SRUN, "RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "contradictory"),
    ({**SRUN, "RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "SLURM_PROCID=5"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({**TORCHRUN, "RANK": "x"}, "RANK='x'"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_WORLD_SIZE"),
    ({**SRUN, "SLURM_NODELIST": ""}, "SLURM_NODELIST"),
])
def test_contradictions_are_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(DTrainError, match=needle):
        detect_launch(env)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("host[1-3,5]", ["host1", "host2", "host3", "host5"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[1-2],b7,c[09-10]", ["a1", "a2", "b7", "c09", "c10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_hostlist_expansion(nodelist: str, hosts: list[str]) -> None:
    assert expand_hostlist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["a[1-", "a[3-1]", "a[1-2]x[b]", "a]"])
def test_bad_hostlist_names_the_whole_list(nodelist: str) -> None:
    with pytest.raises(DTrainError, match=re.escape(repr(nodelist))):
        expand_hostlist(nodelist)
