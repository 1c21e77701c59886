"""A data factory (`data.name=tests.workers.failing_data:build`) whose train dataset fails on one item, on
one rank: a bad file in a real dataset, read in a DataLoader worker (data.num_workers > 0).

DTRAIN_TEST_FAIL_RANK picks the rank (default 1) and DTRAIN_TEST_BAD_CALL which of its `__getitem__`
calls raises ValueError("bad image file <index>.png"): the index it was asked for is in the message, so a
test can check the index dtrain names against it.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from dtrain import Datasets


class Samples(Dataset):
    """Gaussian inputs with a fixed label rule; call `bad_call` (1-based, counted in the process that reads)
    raises on the failing rank."""

    def __init__(self, n: int, bad_call: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.bad_call = bad_call
        self.calls = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.bad_call:
            raise ValueError(f"bad image file {index}.png")
        return self.x[index], self.y[index]


def build(n: int = 256) -> Datasets:
    failing = os.environ.get("RANK", "0") == os.environ.get("DTRAIN_TEST_FAIL_RANK", "1")
    return Datasets(Samples(n, int(os.environ.get("DTRAIN_TEST_BAD_CALL", "40")) if failing else -1), None, (8,), 2)
