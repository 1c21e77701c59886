"""The benchmark's data, as a dtrain data factory (data.name=benchmarks.bench_data:mlp) and for the other loops.

Random tensors of the real shapes: the step costs the same as on MNIST or
CIFAR-10, and nothing needs a download. A function of the seed alone, so
every process and every loop sees the same samples.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dtrain.data.types import Datasets

MLP_SAMPLES = 60_000
CNN_SAMPLES = 8_192
EVAL_SAMPLES = 256


def _tensors(n: int, shape: tuple[int, ...], seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def mlp(seed: int = 0) -> Datasets:
    """60,000 MNIST-sized samples (784 features, 10 classes), in memory."""
    return Datasets(_tensors(MLP_SAMPLES, (784,), seed), _tensors(EVAL_SAMPLES, (784,), seed + 1), (784,), 10)


def cnn(seed: int = 0) -> Datasets:
    """CIFAR-10-shaped images (3x32x32, 10 classes), in memory."""
    return Datasets(_tensors(CNN_SAMPLES, (3, 32, 32), seed), _tensors(EVAL_SAMPLES, (3, 32, 32), seed + 1),
                    (3, 32, 32), 10)
