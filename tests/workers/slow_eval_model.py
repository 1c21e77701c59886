"""`model.name=tests.workers.slow_eval_model:build`: dtrain's default MLP whose first eval pass after training
started is slow (not the set-up check's eval-mode forward, which comes before any training step).

The weights are exactly those of `model.name=mlp` (the same layers built in
the same order after dtrain seeds torch), so runs with and without the delay
train identically. The delay makes it visible whether a logging window that
spans an epoch end counts the eval as training time.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch
from torch import nn

from dtrain.models.builtin import mlp

EVAL_SLEEP_ENV = "DTRAIN_TEST_EVAL_SLEEP_S"


class SlowFirstEval(nn.Module):
    def __init__(self, inner: nn.Module, sleep_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.sleep_s = sleep_s
        self.slept = False
        self.trained = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trained = self.trained or self.training
        if not self.training and self.trained and not self.slept:
            self.slept = True
            time.sleep(self.sleep_s)
        return self.inner(x)


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return SlowFirstEval(mlp(input_shape, num_classes), float(os.environ.get(EVAL_SLEEP_ENV, "0")))
