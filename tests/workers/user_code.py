"""User code as a user would write it, named from configs in the tests: data factories, losses, metrics."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


def regression(seed: int, size: int = 1000):
    """The notes' regression data (a linear target plus noise), a function of the seed alone."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(size, 1, generator=g)
    cut = size * 4 // 5
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def cifar_like(seed: int, size: int = 64):
    """CIFAR-shaped images (3x32x32) with 10 classes; labels depend on the mean colour."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size + 32, 3, 32, 32, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 40).long().clamp(-5, 4) + 5
    return TensorDataset(x[:size], y[:size]), TensorDataset(x[size:], y[size:])


class DictData(Dataset):
    """Samples as dicts, the way tokenised text datasets come."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 32, generator=g)
        self.y = (self.x @ torch.randn(32, 10, generator=g)).argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "label": self.y[i]}


def dicts(seed: int):
    return DictData(300, seed), DictData(50, seed + 1)


def one_dataset(seed: int):
    return regression(seed)[0]


def iterable(seed: int):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    return Stream(), Stream()


def triples(seed: int):
    x = torch.randn(40, 4)
    return TensorDataset(x, x[:, 0].long().clamp(0, 1), x), TensorDataset(x, x[:, 0].long().clamp(0, 1), x)


def raising(root: str):
    raise FileNotFoundError(f"no images under {root}")


def huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user loss: one value per sample."""
    return torch.nn.functional.huber_loss(outputs, targets, reduction="none", delta=0.5).mean(dim=1)


def batch_mean_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mistake the contract catches: one number for the whole batch."""
    return ((outputs - targets) ** 2).mean()


def max_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user metric: the largest absolute error of each sample."""
    return (outputs - targets).abs().amax(dim=1)


def not_a_module(input_shape, num_classes):  # type: ignore[no-untyped-def]
    return "a string"
