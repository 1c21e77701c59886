"""The train source: windows whose real counts take every sample once per epoch and the sampler's repeats
nowhere, and a position that a resumed source picks up window for window, byte for byte.

The reference here is brute force: the padded index list DistributedSampler
builds (its permutation, then its head again up to a multiple of W), read
position by position, with a position counted real exactly when it is below N.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dtrain.config import DataConfig
from dtrain.data.batches import TensorBatches
from dtrain.data.loaders import build_loaders
from dtrain.data.source import SamplerSource, Window, batch_len, to_device
from dtrain.data.types import Datasets
from dtrain.runtime.dist import DistState

GRID = [(n, w, b, k) for n in (1000, 1001, 7, 13) for w, b, k in
        [(1, 60, 1), (3, 20, 1), (3, 10, 2), (4, 15, 1), (2, 10, 3), (4, 1, 1), (4, 2, 3)]]
SEED = 5


def _source(data: TensorDataset, w: int, b: int, k: int, rank: int, fast: bool) -> SamplerSource:
    ds = DistState("test", rank, rank, w, "gloo", torch.device("cpu"))
    source = build_loaders(Datasets(data, None), DataConfig(batch_size=b, fast_path=fast), SEED, ds, k).train
    assert isinstance(source.batches, TensorBatches if fast else DataLoader)
    return source


def _windows(n: int, w: int, b: int, k: int, rank: int, epoch: int = 0, fast: bool = False) -> list[Window]:
    # The sample index as the only feature, so a batch reads back which samples it holds.
    data = TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
    return list(_source(data, w, b, k, rank, fast).windows(epoch))


def _padded(n: int, w: int, epoch: int) -> list[int]:
    """DistributedSampler's epoch order (seed + epoch), padded with its own head to a multiple of W."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    total = -(-n // w) * w
    return (perm * (total // n + 1))[:total]


@pytest.mark.parametrize("fast", [False, True], ids=["dataloader", "fast_path"])
@pytest.mark.parametrize("n, w, b, k", GRID)
def test_real_samples_are_each_sample_once_and_the_counts_match_brute_force(n: int, w: int, b: int, k: int,
                                                                            fast: bool) -> None:
    per_rank = [_windows(n, w, b, k, r, fast=fast) for r in range(w)]
    assert len({len(ws) for ws in per_rank}) == 1, "every rank takes the same number of optimizer steps"
    padded = _padded(n, w, 0)
    seen: list[int] = []
    for i in range(len(per_rank[0])):
        global_real = 0
        for r in range(w):
            win = per_rank[r][i]
            assert win.index == i and win.fetch_s >= 0
            assert win.global_real == per_rank[0][i].global_real, "all ranks divide by the same count"
            for batch, real in zip(win.batches, win.real):
                idx = batch[0].tolist()
                seen += idx[:real]
                global_real += real
        assert per_rank[0][i].global_real == global_real
    assert sorted(seen) == list(range(n))
    # and the real samples are exactly the padded positions below N
    for r in range(w):
        positions = [r + j * w for j in range(len(padded) // w)]
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


def _expected(n: int, w: int, b: int, k: int, rank: int, epoch: int) -> list[tuple[list[list[int]], list[int], int]]:
    """An epoch's windows on `rank` by the sampler's arithmetic alone: (index lists, real counts, global real)."""
    padded = _padded(n, w, epoch)
    mine = [r for r in range(rank, len(padded), w)]  # this rank's padded positions
    batches = [mine[i:i + b] for i in range(0, len(mine), b)]
    out = []
    for i in range(0, len(batches), k):
        window = batches[i:i + k]
        first, stop = i * b, i * b + sum(len(x) for x in window)  # rank-local positions [first, stop)
        out.append(([[padded[p] for p in x] for x in window], [sum(p < n for p in x) for x in window],
                    max(0, min(stop * w, n) - first * w)))
    return out


def _bytes(window: Window) -> list[list[bytes]]:
    return [[t.numpy().tobytes() for t in batch] for batch in window.batches]


def _data(n: int) -> TensorDataset:
    # Floats of every magnitude beside the sample's index, so a reordering or a cast shows in the bytes.
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) * 1e3
    return TensorDataset(x, torch.arange(n))


@pytest.mark.parametrize("fast", [False, True], ids=["dataloader", "fast_path"])
@pytest.mark.parametrize("n, w, b, k", [(23, 1, 4, 2), (23, 2, 3, 2), (23, 3, 2, 1), (50, 3, 4, 3), (7, 3, 1, 2)])
def test_a_source_restored_mid_epoch_yields_the_windows_the_uninterrupted_one_would(n: int, w: int, b: int, k: int,
                                                                                     fast: bool) -> None:
    data = _data(n)
    for rank in range(w):
        whole = _source(data, w, b, k, rank, fast)
        epochs = {e: list(whole.windows(e)) for e in (1, 2)}
        assert whole.position == 0, "an exhausted epoch leaves the source at the next epoch's start"
        for e, got in epochs.items():
            want = _expected(n, w, b, k, rank, e)
            assert len(got) == len(want) == whole.steps_per_epoch
            for win, (indices, real, global_real) in zip(got, want):
                assert [bt[1].tolist() for bt in win.batches] == indices
                assert [bt[0].numpy().tobytes() for bt in win.batches] == \
                       [data.tensors[0][x].numpy().tobytes() for x in indices]
                assert (win.real, win.global_real) == (real, global_real)
        for cut in range(1, whole.steps_per_epoch):
            first = _source(data, w, b, k, rank, fast)
            it = first.windows(1)
            head = [next(it) for _ in range(cut)]
            saved = first.state_dict()
            assert saved == {"window_in_epoch": cut} and [x.index for x in head] == list(range(cut))
            resumed = _source(data, w, b, k, rank, fast)  # a fresh process: nothing but the saved state
            resumed.load_state_dict(saved)
            tail = list(resumed.windows(1)) + list(resumed.windows(2))
            assert [x.index for x in tail] == list(range(cut, whole.steps_per_epoch)) + \
                   list(range(whole.steps_per_epoch))
            want = epochs[1][cut:] + epochs[2]
            assert [_bytes(x) for x in tail] == [_bytes(x) for x in want]
            assert [(x.real, x.global_real) for x in tail] == [(x.real, x.global_real) for x in want]
            # and the interrupted source itself carries on alike
            assert [_bytes(x) for x in it] == [_bytes(x) for x in epochs[1][cut:]]


def test_steps_per_epoch_counts_the_short_last_window() -> None:
    # 1001 samples over 3 ranks: 334 each, 17 batches of 20, 9 windows of 2 (the last holds one batch).
    source = _source(TensorDataset(torch.arange(1001)), 3, 20, 2, 2, fast=True)
    assert source.steps_per_epoch == 9 == len(list(source.windows(0)))


def test_batch_helpers_take_tuples_lists_dicts_and_namedtuples() -> None:
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    assert batch_len((x, y)) == 5 and batch_len([x, y]) == 5 and batch_len({"a": y, "b": x}) == 5
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    moved: Any = to_device({"a": Pair(x, y), "b": [x]}, torch.device("cpu"))
    assert isinstance(moved["a"], Pair) and moved["a"].y is y and moved["b"][0] is x
    with pytest.raises(TypeError):
        batch_len(object())
