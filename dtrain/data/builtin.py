"""The datasets data.name picks: digits and synthetic (built here), token files, the vision sets, or a user's
factory."""

from __future__ import annotations

import os

import torch
from torch.utils.data import TensorDataset

from dtrain.config import DATASETS, DataConfig
from dtrain.data.tokens import token_datasets
from dtrain.data.types import Datasets, as_datasets
from dtrain.data.vision import vision_datasets
from dtrain.errors import DTrainError
from dtrain.runtime.factories import call_factory, load_callable

# The digits split is fixed, whatever train.seed is, so eval numbers of runs
# with different seeds measure the same samples.
DIGITS_SPLIT_SEED = 1234
DIGITS_EVAL_FRACTION = 0.2


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


def factory_datasets(cfg: DataConfig, seed: int) -> Datasets:
    """What the user's factory data.name='package.module:function' returns, checked."""
    fn = load_callable("data.name", cfg.name, f"{' | '.join(DATASETS)} | a factory 'package.module:function'")
    label = f"data factory {cfg.name}"
    got = call_factory(fn, label, {"root": os.path.expanduser(cfg.root), "seed": seed,
                                   "download": cfg.download}, dict(cfg.kwargs))
    return as_datasets(got, label)


def build_datasets(cfg: DataConfig, seed: int) -> Datasets:
    """This rank's datasets; local work only (no collective), so a failure here can be agreed on."""
    if cfg.name == "digits":
        return digits()
    if cfg.name == "synthetic":
        return synthetic(cfg, seed)
    if cfg.name == "tokens":
        return token_datasets(cfg)
    if ":" in cfg.name:
        return factory_datasets(cfg, seed)
    return vision_datasets(cfg.name, cfg.root)
