"""The loaders' DataLoader workers: their randomness differs between ranks and repeats run after run."""

from __future__ import annotations

import torch

from dtrain.config import DataConfig
from dtrain.data.loaders import build_loaders
from dtrain.data.types import Datasets
from dtrain.runtime.dist import DistState


class _Noise(torch.utils.data.Dataset):
    """Each item is what a random augmentation in a worker would draw: torch, random and numpy."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())])


def _worker_draws(rank: int, world_size: int = 2, seed: int = 3) -> torch.Tensor:
    cfg = DataConfig(name="synthetic", batch_size=2, num_workers=2)
    data = Datasets(_Noise(), _Noise(), (3,), 2)
    ds = DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))
    source = build_loaders(data, cfg, seed=seed, dist_state=ds, grad_accum_steps=1).train
    return torch.cat([w.batches[0] for w in source.windows(0)])


def test_worker_randomness_differs_between_ranks_and_repeats() -> None:
    r0, r1 = _worker_draws(0), _worker_draws(1)
    for source in range(3):  # torch, random, numpy: each differs between the ranks
        assert not torch.equal(r0[:, source], r1[:, source]), source
    assert torch.equal(_worker_draws(0), r0) and torch.equal(_worker_draws(1), r1)
    assert not torch.equal(_worker_draws(0, seed=4), r0)
