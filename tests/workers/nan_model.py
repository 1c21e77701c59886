"""A linear classifier whose training forward returns NaN at one step, and the data it trains on.

For `model.name=tests.workers.nan_model:build data.name=tests.workers.nan_model:data`: 64 samples, so
2 ranks x data.batch_size=32 see the whole set at every step (one step per epoch, no eval set), and
a test can recompute the run in plain PyTorch without knowing the sampler's order. Knobs come from
the environment, since dtrain calls the factory with (input_shape, num_classes) only.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

NAN_AT_ENV = "DTRAIN_TEST_NAN_AT_STEP"
"""1-based training forward (= optimizer step with K=1) whose outputs are NaN."""
NAN_LAST_ENV = "DTRAIN_TEST_NAN_LAST_STEP"
"""The last step whose outputs are NaN (unset: only the first one)."""
NAN_RANK_ENV = "DTRAIN_TEST_NAN_RANK"
NAN_GRAD_ENV = "DTRAIN_TEST_NAN_GRAD"
"""Set: at those steps the outputs stay finite and their gradient is NaN instead (a finite loss)."""


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("nan")
"""Unset: every rank's outputs go NaN at that step; set: only that rank's."""
FEATURES, CLASSES, SAMPLES = 6, 3, 64


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(SAMPLES, FEATURES, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g)


def data():  # type: ignore[no-untyped-def]
    from dtrain import Datasets

    x, y = tensors()
    return Datasets(TensorDataset(x, y), None, input_shape=(FEATURES,), num_classes=CLASSES)


class NaNAt(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, nan_at: int, nan_last: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_shape[0], num_classes)
        self.nan_at, self.nan_last = nan_at, nan_last
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if self.nan_at <= self.calls <= self.nan_last:
                out = _NaNGrad.apply(out) if os.environ.get(NAN_GRAD_ENV) else out * float("nan")
        return out


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    rank = os.environ.get(NAN_RANK_ENV)
    here = rank is None or rank == os.environ.get("RANK", "0")
    first = int(os.environ.get(NAN_AT_ENV, "0")) if here else 0
    return NaNAt(input_shape, num_classes, first, int(os.environ.get(NAN_LAST_ENV, first)))
