"""A tiny language model for token-data tests: an embedding and a linear head, [B, T] ids -> [B, T, V] logits,
and a per-window next-token loss that does not depend on the built-in cross_entropy's shape rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bigram(nn.Module):
    def __init__(self, vocab: int, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    assert len(input_shape) == 1  # one window of ids; the test reads a wrong shape as a failure
    return Bigram(num_classes)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One value per window: the mean over its tokens."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)
