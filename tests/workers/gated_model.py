"""A model factory whose training forwards, from the DTRAIN_TEST_GATE_AT-th on (default 3), wait until the
file DTRAIN_TEST_GATE exists (at most 120 s): a run that holds its output directory, part-way through
training, for as long as a test needs. Every rank writes its pid to DTRAIN_TEST_PID_DIR/pid_rank<R>.txt,
and rank 0 leaves DTRAIN_TEST_PID_DIR/waiting once it waits."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    out = Path(os.environ["DTRAIN_TEST_PID_DIR"])
    gate = Path(os.environ["DTRAIN_TEST_GATE"])
    at = int(os.environ.get("DTRAIN_TEST_GATE_AT", "3"))
    rank = os.environ.get("RANK", "0")
    (out / f"pid_rank{rank}.txt").write_text(str(os.getpid()))
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    calls = [0]

    def wait(module: nn.Module, args: Any) -> None:
        if not module.training:
            return
        calls[0] += 1
        if calls[0] < at or gate.exists():
            return
        if rank == "0":
            (out / "waiting").write_text("1")
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    model.register_forward_pre_hook(wait)
    return model
