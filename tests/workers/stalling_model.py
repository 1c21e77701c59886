"""A model factory whose training forward, on one rank and one call, sleeps or kills its process.

For the fault tests: DTRAIN_TEST_STALL_RANK picks the rank, DTRAIN_TEST_STALL_AT the 1-based
training forward, and DTRAIN_TEST_STALL_S how long it sleeps there (a stalled rank: its peers
wait in the step's all-reduce). DTRAIN_TEST_DIE=1 makes it SIGKILL itself instead (a dead rank).
Every rank writes its pid to DTRAIN_TEST_PID_DIR/pid_rank<R>.txt when set.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class StallingMLP(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.calls = 0
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"  # torchrun or srun
        me = rank == os.environ.get("DTRAIN_TEST_STALL_RANK", "1")
        self.at = int(os.environ.get("DTRAIN_TEST_STALL_AT", "3")) if me else -1
        self.sleep_s = float(os.environ.get("DTRAIN_TEST_STALL_S", "60"))
        self.die = os.environ.get("DTRAIN_TEST_DIE") == "1"
        # Rank 0 too may pause at the same forward (in Python, where a signal handler runs), leaving
        # DTRAIN_TEST_PID_DIR/paused_rank0 while it does.
        self.pause_s = float(os.environ.get("DTRAIN_TEST_PAUSE_RANK0_S", "0")) if rank == "0" else 0.0
        self.pause_at = int(os.environ.get("DTRAIN_TEST_STALL_AT", "3"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.pause_s and self.calls == self.pause_at:
                marker = Path(os.environ["DTRAIN_TEST_PID_DIR"]) / "paused_rank0"
                marker.write_text("1")
                time.sleep(self.pause_s)
            if self.calls == self.at:
                if self.die:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(self.sleep_s)
        return self.fc(x.flatten(1))


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    pid_dir = os.environ.get("DTRAIN_TEST_PID_DIR")
    if pid_dir:
        (Path(pid_dir) / f"pid_rank{os.environ.get('RANK', '0')}.txt").write_text(str(os.getpid()))
    return StallingMLP(math.prod(input_shape), num_classes)
