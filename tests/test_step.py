"""Windows and their sample counts: every real sample once per epoch, the sampler's repeats nowhere.

The reference here is brute force: the padded index list DistributedSampler
builds (its permutation, then its head again up to a multiple of W), read
position by position, with a position counted real exactly when it is below N.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dtrain.data.batches import TensorBatches, batched_source
from dtrain.data.loaders import TrainShard
from dtrain.loop.step import Window, batch_len, epoch_windows, to_device

GRID = [(n, w, b, k) for n in (1000, 1001, 7, 13) for w, b, k in
        [(1, 60, 1), (3, 20, 1), (3, 10, 2), (4, 15, 1), (2, 10, 3), (4, 1, 1), (4, 2, 3)]]


def _windows(n: int, w: int, b: int, k: int, rank: int, epoch: int = 0, fast: bool = False) -> list[Window]:
    # The sample index as the only feature, so a batch reads back which samples it holds.
    data = TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
    sampler = DistributedSampler(data, num_replicas=w, rank=rank, shuffle=True, seed=5, drop_last=False)
    sampler.set_epoch(epoch)
    loader = TensorBatches(batched_source(data), sampler, b) if fast else DataLoader(data, batch_size=b,
                                                                                      sampler=sampler)
    return list(epoch_windows(loader, TrainShard(n, rank, w), k))


@pytest.mark.parametrize("fast", [False, True], ids=["dataloader", "fast_path"])
@pytest.mark.parametrize("n, w, b, k", GRID)
def test_real_samples_are_each_sample_once_and_the_counts_match_brute_force(n: int, w: int, b: int, k: int,
                                                                            fast: bool) -> None:
    per_rank = [_windows(n, w, b, k, r, fast=fast) for r in range(w)]
    assert len({len(ws) for ws in per_rank}) == 1, "every rank takes the same number of optimizer steps"
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(n, generator=g).tolist()
    total = -(-n // w) * w
    padded = (perm * (total // n + 1))[:total]
    seen: list[int] = []
    for i in range(len(per_rank[0])):
        global_real = 0
        for r in range(w):
            win = per_rank[r][i]
            assert win.global_real == per_rank[0][i].global_real, "all ranks divide by the same count"
            for batch, real in zip(win.batches, win.real):
                idx = batch[0].tolist()
                seen += idx[:real]
                global_real += real
        assert per_rank[0][i].global_real == global_real
    assert sorted(seen) == list(range(n))
    # and the real samples are exactly the padded positions below N
    for r in range(w):
        positions = [r + j * w for j in range(total // w)]
        flat = [x for win in per_rank[r] for bt in win.batches for x in bt[0].tolist()]
        assert flat == [padded[p] for p in positions]
        real_flags = [x for win in per_rank[r] for bt, real in zip(win.batches, win.real)
                      for x in [True] * real + [False] * (len(bt[0]) - real)]
        assert real_flags == [p < n for p in positions]


def test_global_windows_hold_the_same_samples_at_any_world_size() -> None:
    """N=1001: each step's real samples (all ranks) are the same set for every W x B x K of global batch 60."""
    def step_sets(w: int, b: int, k: int) -> list[list[int]]:
        per_rank = [_windows(1001, w, b, k, r, epoch=3) for r in range(w)]
        return [sorted(x for r in range(w) for bt, real in zip(per_rank[r][i].batches, per_rank[r][i].real)
                       for x in bt[0].tolist()[:real]) for i in range(len(per_rank[0]))]

    one = step_sets(1, 60, 1)
    assert [len(s) for s in one] == [60] * 16 + [41]
    for w, b, k in [(3, 20, 1), (3, 10, 2), (4, 15, 1), (2, 10, 3)]:
        assert step_sets(w, b, k) == one, (w, b, k)


def test_a_micro_batch_of_repeats_only_counts_zero() -> None:
    # N=1001, W=2, B=10, K=3: rank 1 holds 500 real samples and one repeat, alone in its last batch.
    last = _windows(1001, 2, 10, 3, rank=1)[-1]
    assert [batch_len(bt) for bt in last.batches] == [10, 10, 1]
    assert last.real == [10, 10, 0] and last.global_real == 41


def test_train_shard_arithmetic() -> None:
    s = TrainShard(1001, 3, 4)
    assert s.real == 250 and s.real_between(245, 260) == 5 and s.real_between(250, 251) == 0
    assert TrainShard(1001, 0, 4).real == 251
    assert s.global_real_between(240, 251) == 1001 - 960


def test_batch_helpers_take_tuples_lists_dicts_and_namedtuples() -> None:
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    assert batch_len((x, y)) == 5 and batch_len([x, y]) == 5 and batch_len({"a": y, "b": x}) == 5
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    moved = to_device({"a": Pair(x, y), "b": [x]}, torch.device("cpu"))
    assert isinstance(moved["a"], Pair) and moved["a"].y is y and moved["b"][0] is x
    with pytest.raises(TypeError):
        batch_len(object())
