"""Device choice from the launch (pure: torch.cuda's answers are monkeypatched)."""

from __future__ import annotations

import pytest
import torch

from dtrain.dist import resolve_device
from dtrain.env import detect_launch
from dtrain.errors import DTrainError


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
