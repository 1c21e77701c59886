"""Another eval set for a model trained on 32-feature, 10-class synthetic data: `python -m dtrain.eval RUN
data.name=tests.workers.inference_data:other_eval` scores the run's model on it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dtrain.data.types import Datasets


def other_eval(seed: int, size: int = 77) -> Datasets:
    g = torch.Generator().manual_seed(seed + 1000)
    x = 2 * torch.randn(size, 32, generator=g)
    y = torch.randint(0, 10, (size,), generator=g)
    return Datasets(TensorDataset(x, y), TensorDataset(x, y), input_shape=(32,), num_classes=10)
