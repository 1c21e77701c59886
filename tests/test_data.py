"""Samplers: the same global batches at any world size, a new order each epoch, exact eval shards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from dtrain.config import DataConfig
from dtrain.data.loaders import ShardSampler, build_loaders, digits, synthetic
from dtrain.runtime.dist import DistState


def _global_batches(world_size: int, batch: int, epoch: int, n: int = 96, fast: bool = True) -> list[list[int]]:
    """Labels are the sample indices, so each global batch is read back as a set of indices."""
    cfg = DataConfig(name="synthetic", batch_size=batch, fast_path=fast)
    data = synthetic(DataConfig(name="synthetic", train_size=n, eval_size=8), seed=3)
    data = type(data)(TensorDataset(torch.zeros(n, 1), torch.arange(n)), data.eval, (1,), 2)
    per_rank = []
    for rank in range(world_size):
        ds = DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))
        loaders = build_loaders(data, cfg, seed=3, dist_state=ds)
        loaders.train_sampler.set_epoch(epoch)
        per_rank.append([y.tolist() for _, y in loaders.train])
    return [sorted(sum((r[i] for r in per_rank), [])) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "dataloader"])
def test_same_global_batches_at_any_world_size(fast: bool) -> None:
    one = _global_batches(1, 24, epoch=0, fast=fast)
    assert _global_batches(2, 12, epoch=0, fast=fast) == one
    assert _global_batches(4, 6, epoch=0, fast=fast) == one
    # and they are the consecutive slices of torch's seeded permutation (seed + epoch)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(3)).tolist()
    assert one == [sorted(perm[i:i + 24]) for i in range(0, 96, 24)]


def test_each_epoch_reshuffles_alike_on_every_world_size() -> None:
    e0, e1 = _global_batches(1, 24, epoch=0), _global_batches(1, 24, epoch=1)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(96))
    assert _global_batches(4, 6, epoch=1) == e1


def test_shard_sampler_covers_each_index_once() -> None:
    data = list(range(101))
    shards = [list(ShardSampler(data, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == data and [len(s) for s in shards] == [34, 34, 33]


def test_synthetic_is_a_function_of_the_seed() -> None:
    cfg = DataConfig(name="synthetic", train_size=50, eval_size=10)
    a, b, c = synthetic(cfg, 1), synthetic(cfg, 1), synthetic(cfg, 2)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert len(a.train) == 50 and len(a.eval) == 10


def test_digits_ships_offline_with_a_fixed_split() -> None:
    d = digits()
    assert d.input_shape == (64,) and len(d.train) + len(d.eval) == 1797 and len(d.eval) == 359
    x, _ = d.train.tensors
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(digits().eval.tensors[1], d.eval.tensors[1])


class _Noise(torch.utils.data.Dataset):
    """Each item is what a random augmentation in a worker would draw: torch, random and numpy."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())])


def _worker_draws(rank: int, world_size: int = 2, seed: int = 3) -> torch.Tensor:
    from dtrain.data.loaders import Datasets

    cfg = DataConfig(name="synthetic", batch_size=2, num_workers=2)
    data = Datasets(_Noise(), _Noise(), (3,), 2)
    ds = DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))
    loaders = build_loaders(data, cfg, seed=seed, dist_state=ds)
    loaders.train_sampler.set_epoch(0)
    return torch.cat(list(loaders.train))


def test_worker_randomness_differs_between_ranks_and_repeats() -> None:
    r0, r1 = _worker_draws(0), _worker_draws(1)
    for source in range(3):  # torch, random, numpy: each differs between the ranks
        assert not torch.equal(r0[:, source], r1[:, source]), source
    assert torch.equal(_worker_draws(0), r0) and torch.equal(_worker_draws(1), r1)
    assert not torch.equal(_worker_draws(0, seed=4), r0)
