"""A model factory that, on its Nth training forward, sends SIGTERM to this process's W&B service.

That is what Slurm does at a preemption or `scancel`: it signals every process of the job
step, wandb-core among them, and wandb-core (a Go program) exits. The training process itself
is left alone here, so a test sees what dtrain does when W&B dies under it mid-run.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

AT_ENV = "DTRAIN_TEST_KILL_WANDB_AT"


def wandb_services() -> list[int]:
    """PIDs of wandb-core processes whose parent is this process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"wandb-core" in cmd:
            found.append(int(stat.parent.name))
    return found


class KillsWandb(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.calls = 0
        self.at = int(os.environ[AT_ENV])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at and os.environ.get("RANK", "0") == "0":  # W&B runs on rank 0 only
                pids = wandb_services()
                if not pids:
                    raise RuntimeError("wandb_killer: no wandb-core child process found")
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
        return self.fc(x.flatten(1))


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return KillsWandb(math.prod(input_shape), num_classes)
