"""Padded variable-length sequences and a per-token classifier, for the token-weighted loss tests.

Each sample is a sequence of 1 to T real tokens padded to T: inputs padded with id 0, targets with -100
(loss.ignore_index), so a per-sample mean would weight a 1-token sample like a T-token one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

V, T = 11, 8
"""Vocabulary and block size."""


def sequences(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    ids = torch.randint(1, V, (n, T), generator=g)
    real = torch.arange(T)[None] < lengths[:, None]
    return TensorDataset(torch.where(real, ids, 0), torch.where(real, (ids * 3 + 1) % V, -100))


def data(seed: int, size: int = 101) -> tuple[TensorDataset, TensorDataset]:
    return sequences(size, seed), sequences(37, seed + 1)


class Tagger(nn.Module):
    """Logits [batch, time, vocab] for ids [batch, time]; its initial weights are fixed (seed 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, V)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def build() -> nn.Module:
    return Tagger()
