"""Factories that return something dtrain cannot train with, each wrong in one way (see tests/test_run.py)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def too_few_classes(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """One output short: cross-entropy would fail on the first label past the end, deep in a step."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes - 1))


def one_output(input_shape: Sequence[int]) -> nn.Module:
    """[batch, 1] outputs, for [batch] regression targets: mse would broadcast to [batch, batch]."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 1))


def no_parameters() -> nn.Module:
    return nn.Flatten()


class _LossOnly(nn.Module):
    """Returns a dict with no 'logits': what a model that only computes its own loss gives back."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.linear(x.flatten(1)).sum()}


def returns_a_loss_dict(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return _LossOnly(math.prod(input_shape), num_classes)


def batch_mean_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One number for the whole batch: dtrain cannot weight it per sample."""
    return nn.functional.cross_entropy(outputs, targets)


def regression_data():  # type: ignore[no-untyped-def]
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    return TensorDataset(x[:32], x[:32].sum(dim=1)), TensorDataset(x[32:], x[32:].sum(dim=1))
