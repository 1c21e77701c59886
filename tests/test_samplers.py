"""Samplers: the same global batches at any world size, a new order each epoch, exact eval shards, and the
padding arithmetic that says which positions are repeats."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from dtrain.config import DataConfig
from dtrain.data.loaders import build_loaders
from dtrain.data.samplers import ShardSampler, TrainShard
from dtrain.data.types import Datasets
from dtrain.runtime.dist import DistState


def _global_batches(world_size: int, batch: int, epoch: int, n: int = 96, fast: bool = True) -> list[list[int]]:
    """Labels are the sample indices, so each global batch is read back as a set of indices."""
    cfg = DataConfig(name="synthetic", batch_size=batch, fast_path=fast)
    data = Datasets(TensorDataset(torch.zeros(n, 1), torch.arange(n)), None, (1,), 2)
    per_rank = []
    for rank in range(world_size):
        ds = DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))
        source = build_loaders(data, cfg, seed=3, dist_state=ds, grad_accum_steps=1).train
        per_rank.append([w.batches[0][1].tolist() for w in source.windows(epoch)])
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
    shards = [list(ShardSampler(data, r, 3)) for r in range(3)]  # type: ignore[arg-type]
    assert sorted(sum(shards, [])) == data and [len(s) for s in shards] == [34, 34, 33]


def test_train_shard_arithmetic() -> None:
    s = TrainShard(1001, 3, 4)
    assert s.real == 250 and s.real_between(245, 260) == 5 and s.real_between(250, 251) == 0
    assert TrainShard(1001, 0, 4).real == 251
    assert s.global_real_between(240, 251) == 1001 - 960
