"""A model factory with BatchNorm, for `model.name=tests.workers.bn_cnn:build` on 64-feature synthetic data.

The 64 features are read as a 1x8x8 image: conv, BatchNorm, ReLU, pool, linear.
BatchNorm's running statistics are buffers that each rank updates from its own
batches, which is what makes evaluation on several ranks need one model.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    (features,) = input_shape
    if features != 64:
        raise ValueError("bn_cnn expects data.num_features=64 (an 8x8 image)")
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, num_classes),
    )
