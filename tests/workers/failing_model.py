"""A model factory for `model.name=tests.workers.failing_model:build` whose forward fails on purpose.

Tests use it to check what a run leaves behind when training raises part-way:
metrics.jsonl keeps its records, TensorBoard's event file is complete and the
W&B run is finished with a non-zero exit code. Knobs come from the
environment, because dtrain calls the factory with (input_shape, num_classes)
only.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch
from torch import nn

FAIL_AT_ENV = "DTRAIN_TEST_FAIL_AT_FORWARD"
"""1-based forward call (training and eval calls both count) that raises."""
FAIL_RANK_ENV = "DTRAIN_TEST_FAIL_RANK"
"""Unset: every rank raises, as a bug in user code would. Set: only that rank
raises (a rank-local fault, e.g. one bad GPU)."""
STALL_S_ENV = "DTRAIN_TEST_STALL_S"
"""Seconds the ranks that do not raise sleep in that same call, so the launcher's
SIGTERM finds them busy in Python rather than in a collective that fails anyway."""


class FailingMLP(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, fail_at: int, raises: bool,
                 stall_s: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        self.fail_at, self.raises, self.stall_s = fail_at, raises, stall_s
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            if self.raises:
                raise RuntimeError(f"failing_model: deliberate failure on forward call {self.calls}")
            time.sleep(self.stall_s)
        return self.net(x)


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    raises = fail_rank is None or fail_rank == os.environ.get("RANK", "0")
    return FailingMLP(input_shape, num_classes, fail_at=int(os.environ.get(FAIL_AT_ENV, "5")), raises=raises,
                      stall_s=float(os.environ.get(STALL_S_ENV, "0")))


def build_or_raise(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Raise in the factory itself on the rank named by DTRAIN_TEST_FAIL_RANK (set-up failure)."""
    if os.environ.get(FAIL_RANK_ENV) == os.environ.get("RANK", "0"):
        raise RuntimeError("failing_model: deliberate failure in the factory")
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
