"""Device choice from the launch (pure: torch.cuda's answers are monkeypatched)."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.runtime.devices import resolve_device
from dtrain.runtime.env import detect_launch
from dtrain.errors import DTrainError
from helpers import worker


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_rank_5_of_a_4_per_node_job_on_an_8_gpu_node_binds_its_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 8)
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_WORLD_SIZE": "4"}
    assert resolve_device("auto", detect_launch(env).local_rank) == torch.device("cuda", 1)


def test_unknown_local_rank_on_a_multi_gpu_node_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 8)
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(DTrainError) as err:
        resolve_device("auto", detect_launch(env).local_rank)
    msg = str(err.value)
    assert "\n" not in msg and "LOCAL_RANK" in msg and "LOCAL_WORLD_SIZE" in msg and "8 GPUs" in msg


@pytest.mark.parametrize("count, expected", [(0, torch.device("cpu")), (1, torch.device("cuda", 0))])
def test_unknown_local_rank_is_fine_where_there_is_no_choice(monkeypatch: pytest.MonkeyPatch, count: int,
                                                             expected: torch.device) -> None:
    _gpus(monkeypatch, count)
    assert resolve_device("auto", None) == expected


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_ranks_agree_on_a_flag_at_the_same_step_with_a_round_every_fifth_of_a_second() -> None:
    res = worker(2, "agreement.py")
    out = sorted((json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")), key=lambda o: o["rank"])
    assert [o["rank"] for o in out] == [0, 1]
    assert out[0]["seen_at"] == out[1]["seen_at"] is not None  # the same step on both ranks
    # 10 ms steps (longer under load): at most about 20 steps a round, so the flag comes back within
    # ~2 rounds of step 57 (measured: step 79-81), and 200 steps take 5-40 rounds, not one per step.
    assert 57 < out[0]["seen_at"] <= 57 + 2 * 30
    assert 5 <= out[0]["rounds"] == out[1]["rounds"] < 40, out
    print(f"flag raised at step 57 on rank 1, agreed at step {out[0]['seen_at']}; {out[0]['rounds']} rounds")
