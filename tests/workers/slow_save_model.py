"""A model factory whose state_dict, on rank 0, sleeps DTRAIN_TEST_SLOW_SAVE_S the first time it is
taken (the first checkpoint): a save long enough for a signal to land while the other ranks wait in
the checkpoint's collectives. It leaves DTRAIN_TEST_PID_DIR/saving before sleeping, and every rank
writes its pid there. Each training forward takes 20 ms."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    out = Path(os.environ["DTRAIN_TEST_PID_DIR"])
    rank = os.environ.get("RANK", "0")
    (out / f"pid_rank{rank}.txt").write_text(str(os.getpid()))
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    slept = []

    def slow(module: nn.Module, state: Any, prefix: str, local_metadata: Any) -> None:
        if rank == "0" and not slept and module.training:
            slept.append(True)
            (out / "saving").write_text("1")
            time.sleep(float(os.environ.get("DTRAIN_TEST_SLOW_SAVE_S", "10")))

    model._register_state_dict_hook(slow)

    def pace(module: nn.Module, args: Any) -> None:
        if module.training:
            time.sleep(0.02)  # steps of real length: the stop comes ~0.4 s of training after the signal

    model.register_forward_pre_hook(pace)
    return model
