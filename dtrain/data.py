"""Datasets and the per-rank loaders.

Training uses `DistributedSampler`: rank r takes positions r, r+W, r+2W, ...
of one seeded permutation, so the union of the ranks' i-th batches is the
i-th slice of that permutation: the same global batches at any world size.

Evaluation uses `ShardSampler`, which never pads: `DistributedSampler` repeats
samples to even out the ranks, and those repeats would be counted twice in
the eval loss and accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from dtrain.config import DataConfig
from dtrain.dist import DistState
from dtrain.errors import DTrainError

# The digits split is fixed, whatever train.seed is, so eval numbers of runs
# with different seeds measure the same samples.
DIGITS_SPLIT_SEED = 1234
DIGITS_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    eval: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def digits() -> Datasets:
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples): works offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DTrainError("data.name=digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_eval = int(len(x) * DIGITS_EVAL_FRACTION)
    ev, tr = perm[:n_eval], perm[n_eval:]
    return Datasets(TensorDataset(x[tr], y[tr]), TensorDataset(x[ev], y[ev]), (64,), 10)


def synthetic(cfg: DataConfig, seed: int) -> Datasets:
    """Gaussian inputs labelled by a random linear teacher; a function of the seed alone."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.train_size + cfg.eval_size
    x = torch.randn(n, cfg.num_features, generator=g)
    teacher = torch.randn(cfg.num_features, cfg.num_classes, generator=g)
    y = (x @ teacher).argmax(dim=1)
    tr, ev = slice(0, cfg.train_size), slice(cfg.train_size, n)
    return Datasets(TensorDataset(x[tr], y[tr]), TensorDataset(x[ev], y[ev]),
                    (cfg.num_features,), cfg.num_classes)


def build_datasets(cfg: DataConfig, seed: int, dist_state: DistState) -> Datasets:
    if cfg.name == "digits":
        return digits()
    if cfg.name == "synthetic":
        return synthetic(cfg, seed)
    from dtrain.vision import download_files, vision_datasets  # torchvision is an optional extra

    if cfg.download:
        # Rank 0 downloads while the others wait, so they never read half-written
        # files; on several nodes, data.root must be shared storage.
        dist_state.run_on_main(lambda: download_files(cfg.name, cfg.root))
    return vision_datasets(cfg.name, cfg.root)


class ShardSampler(Sampler[int]):
    """Rank r gets indices r, r+W, ...: every sample on exactly one rank, no padding."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)  # type: ignore[arg-type]  # map-style datasets are sized

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Loaders:
    train: DataLoader
    train_sampler: DistributedSampler
    eval: DataLoader


def build_loaders(data: Datasets, cfg: DataConfig, seed: int, dist_state: DistState) -> Loaders:
    sampler: DistributedSampler = DistributedSampler(
        data.train, num_replicas=dist_state.world_size, rank=dist_state.rank, shuffle=True, seed=seed,
        drop_last=False)
    pin = dist_state.device.type == "cuda"
    persistent = cfg.num_workers > 0
    train = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=False,
                       num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=persistent)
    eval_ = DataLoader(data.eval, batch_size=cfg.eval_batch_size,
                       sampler=ShardSampler(data.eval, dist_state.rank, dist_state.world_size),
                       num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=persistent)
    return Loaders(train, sampler, eval_)
