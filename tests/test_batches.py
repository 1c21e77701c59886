"""The in-memory fast path yields the DataLoader's batches bit for bit, and only for data that allows it.

The reference is plain PyTorch: `DataLoader(dataset, batch_size, sampler=...)`
over the index list of a stock `DistributedSampler`, cut at the resume start.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from dtrain.data.batches import TensorBatches
from dtrain.config import DataConfig, load_config
from dtrain.data.loaders import Datasets, build_loaders
from dtrain.runtime.dist import DistState
from dtrain.errors import ConfigError, DTrainError


def _state(rank: int, world_size: int) -> DistState:
    return DistState("test", rank, rank, world_size, "gloo", torch.device("cpu"))


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
        loaders = build_loaders(Datasets(ds, None), cfg, seed=3, dist_state=_state(rank, w))
        assert isinstance(loaders.train, TensorBatches) and loaders.fast_path
        per_rank = len(list(DistributedSampler(ds, num_replicas=w, rank=rank)))
        for start in sorted({0, b, 2 * b + 1 if 2 * b + 1 < per_rank else 0, per_rank - 1, per_rank}):
            loaders.train_sampler.set_epoch(epoch)
            loaders.train_sampler.start = start
            want = _reference(ds, n, w, rank, b, epoch, start)
            _same(list(loaders.train), want)
            assert len(loaders.train) == len(want)


def test_both_paths_equal_and_fast_path_false_takes_the_dataloader() -> None:
    ds = _data(101)
    for fast in (True, False):
        cfg = DataConfig(name="synthetic", batch_size=8, eval_batch_size=16, fast_path=fast)
        loaders = build_loaders(Datasets(ds, ds), cfg, seed=3, dist_state=_state(1, 3))
        assert isinstance(loaders.train, TensorBatches) is fast and isinstance(loaders.eval, TensorBatches) is fast
        assert isinstance(loaders.train, DataLoader) is not fast
        loaders.train_sampler.set_epoch(2)
        _same(list(loaders.train), _reference(ds, 101, 3, 1, 8, 2, 0))
        # eval: this rank's shard, never padded, in order
        _same(list(loaders.eval), list(DataLoader(Subset(ds, range(1, 101, 3)), batch_size=16)))


def test_a_subset_of_a_tensor_dataset_takes_the_fast_path_exactly() -> None:
    ds = Subset(Subset(_data(200), list(range(199, -1, -2))), [5, 0, 3, 90, 7, 11, 12, 13, 50, 51, 52])
    loaders = build_loaders(Datasets(ds, None), DataConfig(batch_size=4), seed=3, dist_state=_state(0, 2))
    assert loaders.fast_path
    loaders.train_sampler.set_epoch(1)
    _same(list(loaders.train), _reference(ds, len(ds), 2, 0, 4, 1, 0))


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
        loaders = build_loaders(Datasets(ds, ds), DataConfig(batch_size=4), seed=3, dist_state=_state(0, 1))
        assert isinstance(loaders.train, DataLoader) and isinstance(loaders.eval, DataLoader), type(ds)
    # and the transform is applied on that path
    loaders = build_loaders(Datasets(t, None), DataConfig(batch_size=20), seed=3, dist_state=_state(0, 1))
    loaders.train_sampler.set_epoch(0)
    (x, _), = list(loaders.train)
    assert torch.equal(x.sort(dim=0).values, (t.tensors[0] * 2).sort(dim=0).values)


def test_a_dataset_with_get_batch_takes_the_fast_path() -> None:
    ds = _Batched(23)
    loaders = build_loaders(Datasets(ds, None), DataConfig(batch_size=5), seed=3, dist_state=_state(1, 2))
    assert loaders.fast_path
    loaders.train_sampler.set_epoch(0)
    got = list(loaders.train)
    assert ds.calls == len(got) == 3
    want = _reference(ds, 23, 2, 1, 5, 0, 0)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)


def test_device_resident() -> None:
    ds = _data(50)
    cfg = DataConfig(batch_size=8, device_resident=True)
    loaders = build_loaders(Datasets(ds, ds), cfg, seed=3, dist_state=_state(0, 2))
    loaders.train_sampler.set_epoch(0)
    _same(list(loaders.train), _reference(ds, 50, 2, 0, 8, 0, 0))
    # On CPU the data is already on the model's device: nothing is copied.
    assert loaders.train.source.tensors[0].data_ptr() == ds.tensors[0].data_ptr()
    with pytest.raises(DTrainError, match="data.device_resident=true needs train data that is a TensorDataset"):
        build_loaders(Datasets(_Batched(10), None), cfg, seed=3, dist_state=_state(0, 1))
    with pytest.raises(ConfigError, match="config key 'data.device_resident' has value True; allowed: false with "
                                          "data.fast_path=false"):
        load_config(None, ["data.device_resident=true", "data.fast_path=false"])


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_decoded_vision_batches_equal_torchvisions_own_items(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """dtrain's MNIST/FashionMNIST/CIFAR-10 take the fast path; a batch equals torchvision's ToTensor + Normalize
    items, collated, bit for bit."""
    torchvision = pytest.importorskip("torchvision")
    from torch.utils.data import default_collate
    from torchvision import transforms

    from dtrain.data.loaders import build_datasets
    from test_vision import STATS, write

    write(name, tmp_path, monkeypatch)
    data = build_datasets(DataConfig(name=name, root=str(tmp_path)), seed=0)
    mean, std = STATS[name]
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for train, ours in ((True, data.train), (False, data.eval)):
        theirs = cls(str(tmp_path), train=train, transform=tf)
        idx = torch.randperm(len(theirs), generator=torch.Generator().manual_seed(0))[:13]
        want = default_collate([theirs[i] for i in idx.tolist()])
        _same([ours.get_batch(idx)], [want])
        _same([default_collate([ours[i] for i in idx.tolist()])], [want])  # the DataLoader path, too
    loaders = build_loaders(data, DataConfig(batch_size=8), seed=3, dist_state=_state(0, 2))
    assert loaders.fast_path and isinstance(loaders.eval, TensorBatches)
