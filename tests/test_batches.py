"""The in-memory fast path yields the DataLoader's batches bit for bit, and only for data that allows it.

The reference is plain PyTorch: `DataLoader(dataset, batch_size, sampler=...)`
over the index list of a stock `DistributedSampler`, cut at the resume start.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from dtrain.config import DataConfig, load_config
from dtrain.data.batches import TensorBatches
from dtrain.data.loaders import Loaders, build_loaders
from dtrain.data.types import Datasets
from dtrain.errors import ConfigError, DTrainError
from dtrain.runtime.dist import DistState


def _state(rank: int, world_size: int) -> DistState:
    return DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))


def _loaders(data: Datasets, cfg: DataConfig, rank: int, world_size: int) -> Loaders:
    return build_loaders(data, cfg, seed=3, dist_state=_state(rank, world_size), grad_accum_steps=1)


def _epoch(loaders: Loaders, epoch: int, start: int = 0) -> list[Any]:
    """The train reader's batches of `epoch` from this rank's sample `start` on."""
    loaders.train.sampler.set_epoch(epoch)
    loaders.train.sampler.start = start
    return list(loaders.train.batches)


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(n)
    # Floats of every magnitude, an int label and a 2-D feature, so any reordering or cast shows.
    return TensorDataset(torch.randn(n, 3, 2, generator=g) * 1e3, torch.randint(0, 10, (n,), generator=g),
                         torch.arange(n, dtype=torch.float64))


def _reference(ds: Dataset, n: int, w: int, rank: int, b: int, epoch: int, start: int, seed: int = 3) -> list[Any]:
    sampler = DistributedSampler(ds, num_replicas=w, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)[start:]
    return list(DataLoader(ds, batch_size=b, sampler=order))


def _same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is type(w) and len(g) == len(w)
        for a, b in zip(g, w):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("n, w, b", [(1001, 1, 60), (1001, 3, 20), (1001, 4, 15), (13, 4, 2), (7, 4, 1), (96, 2, 12)])
def test_train_batches_equal_the_dataloaders_for_every_epoch_rank_and_start(n: int, w: int, b: int) -> None:
    ds = _data(n)
    cfg = DataConfig(name="synthetic", batch_size=b)
    for rank, epoch in itertools.product(range(w), (0, 1)):
        loaders = _loaders(Datasets(ds, None), cfg, rank, w)
        assert isinstance(loaders.train.batches, TensorBatches)
        per_rank = len(list(DistributedSampler(ds, num_replicas=w, rank=rank)))
        for start in sorted({0, b, 2 * b + 1 if 2 * b + 1 < per_rank else 0, per_rank - 1, per_rank}):
            want = _reference(ds, n, w, rank, b, epoch, start)
            _same(_epoch(loaders, epoch, start), want)
            assert len(loaders.train.batches) == len(want)  # type: ignore[arg-type]


def test_both_paths_equal_and_fast_path_false_takes_the_dataloader() -> None:
    ds = _data(101)
    for fast in (True, False):
        cfg = DataConfig(name="synthetic", batch_size=8, eval_batch_size=16, fast_path=fast)
        loaders = _loaders(Datasets(ds, ds), cfg, 1, 3)
        train = loaders.train.batches
        assert isinstance(train, TensorBatches) is fast and isinstance(loaders.eval, TensorBatches) is fast
        assert isinstance(train, DataLoader) is not fast
        _same(_epoch(loaders, 2), _reference(ds, 101, 3, 1, 8, 2, 0))
        # eval: this rank's shard, never padded, in order
        _same(list(loaders.eval), list(DataLoader(Subset(ds, range(1, 101, 3)), batch_size=16)))


def test_a_subset_of_a_tensor_dataset_takes_the_fast_path_exactly() -> None:
    ds = Subset(Subset(_data(200), list(range(199, -1, -2))), [5, 0, 3, 90, 7, 11, 12, 13, 50, 51, 52])
    loaders = _loaders(Datasets(ds, None), DataConfig(batch_size=4), 0, 2)
    assert isinstance(loaders.train.batches, TensorBatches)
    _same(_epoch(loaders, 1), _reference(ds, len(ds), 2, 0, 4, 1, 0))


class _Transformed(TensorDataset):
    """A TensorDataset subclass whose items are transformed: the fast path would skip the transform."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(i)
        return x * 2, y


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": torch.full((2,), float(i)), "target": torch.tensor(i % 3)}


class _Batched(_Items):
    """Offers get_batch: the fast path uses it (and counts the calls)."""

    calls = 0

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"input": indices.to(torch.float32)[:, None].expand(-1, 2).contiguous(), "target": indices % 3}


def test_transforms_and_per_sample_datasets_keep_the_dataloader() -> None:
    t = _Transformed(torch.randn(20, 2), torch.zeros(20, dtype=torch.long))
    for ds in (t, _Items(20), Subset(_Items(20), [1, 2, 3])):
        loaders = _loaders(Datasets(ds, ds), DataConfig(batch_size=4), 0, 1)
        assert isinstance(loaders.train.batches, DataLoader) and isinstance(loaders.eval, DataLoader), type(ds)
    # and the transform is applied on that path
    (x, _), = _epoch(_loaders(Datasets(t, None), DataConfig(batch_size=20), 0, 1), 0)
    assert torch.equal(x.sort(dim=0).values, (t.tensors[0] * 2).sort(dim=0).values)


def test_a_dataset_with_get_batch_takes_the_fast_path() -> None:
    ds = _Batched(23)
    loaders = _loaders(Datasets(ds, None), DataConfig(batch_size=5), 1, 2)
    assert isinstance(loaders.train.batches, TensorBatches)
    got = _epoch(loaders, 0)
    assert ds.calls == len(got) == 3
    want = _reference(ds, 23, 2, 1, 5, 0, 0)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)


def test_device_resident() -> None:
    ds = _data(50)
    cfg = DataConfig(batch_size=8, device_resident=True)
    loaders = _loaders(Datasets(ds, ds), cfg, 0, 2)
    _same(_epoch(loaders, 0), _reference(ds, 50, 2, 0, 8, 0, 0))
    # On CPU the data is already on the model's device: nothing is copied.
    assert loaders.train.batches.source.tensors[0].data_ptr() == ds.tensors[0].data_ptr()  # type: ignore[attr-defined]
    with pytest.raises(DTrainError, match="data.device_resident=true needs train data that is a TensorDataset"):
        _loaders(Datasets(_Batched(10), None), cfg, 0, 1)
    with pytest.raises(ConfigError, match="config key 'data.device_resident' has value True; allowed: false with "
                                          "data.fast_path=false"):
        load_config(None, ["data.device_resident=true", "data.fast_path=false"])
