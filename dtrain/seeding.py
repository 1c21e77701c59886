"""Seeds: one for what every rank must share, one per rank for what must differ.

The initial weights come from `train.seed` itself, identical on every rank.
Everything random after that (dropout masks, DataLoader worker seeds and so
random augmentations) draws from a per-rank seed, or the W ranks would apply
the same mask at the same batch position and the global batch would hold W
times less randomness than its size suggests. The per-rank seed is a hash of
(seed, rank, world size): the same run after run, independent across ranks.
"""

from __future__ import annotations

import hashlib
import random
import sys

import torch


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    digest = hashlib.sha256(f"dtrain:{seed}:{rank}:{world_size}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """torch (CPU and every CUDA device), Python's `random`, and numpy's global RNG if numpy is loaded."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
