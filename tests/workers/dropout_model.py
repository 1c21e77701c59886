"""A model factory with dropout that records, per rank, its initial weights and its first dropout mask.

For `model.name=tests.workers.dropout_model:build` with DTRAIN_TEST_RNG_OUT set
to a directory: the factory writes init_rank<R>.pt, and the first training
forward writes mask_rank<R>.pt. The mask is drawn from the global torch RNG
exactly as nn.Dropout draws it, so it shows what dropout sees on that rank.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OUT_ENV = "DTRAIN_TEST_RNG_OUT"
SLEEP_ENV = "DTRAIN_TEST_FORWARD_SLEEP_S"
"""Seconds each training forward sleeps: stretches a tiny run so a test can interrupt it part-way."""


def _out(name: str) -> Path:
    return Path(os.environ[OUT_ENV]) / f"{name}_rank{os.environ.get('RANK', '0')}.pt"


class DropoutMLP(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 64), nn.Linear(64, num_classes)
        self.recorded = False
        self.p = 0.5
        self.sleep_s = float(os.environ.get(SLEEP_ENV, "0"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        if self.training and self.sleep_s:
            time.sleep(self.sleep_s)
        if self.training:
            keep = F.dropout(torch.ones_like(h), p=self.p, training=True)
            if not self.recorded and OUT_ENV in os.environ:
                torch.save(keep != 0, _out("mask"))
                self.recorded = True
            h = h * keep
        return self.fc2(h)


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    model = DropoutMLP(math.prod(input_shape), num_classes)
    if OUT_ENV in os.environ:
        torch.save(model.state_dict(), _out("init"))
        _out("pid").with_suffix(".txt").write_text(str(os.getpid()))
    return model


def build_no_dropout(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The same model without dropout (for runs compared across world sizes), still sleeping and recording pids."""
    model = build(input_shape, num_classes)
    model.p = 0.0  # type: ignore[assignment]
    return model


def build_with_spare(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """`build`, plus a layer the forward never uses (a head kept for later, a branch not taken): it never gets a
    gradient, so Adam never gives it state, and a checkpoint must save and resume it without any."""
    model = build(input_shape, num_classes)
    model.spare = nn.Linear(4, 3)
    return model
