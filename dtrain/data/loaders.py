"""Datasets and the per-rank loaders.

Training uses `DistributedSampler`: rank r takes positions r, r+W, r+2W, ...
of one seeded permutation, so the union of the ranks' i-th batches is the
i-th slice of that permutation: the same global batches at any world size.
It pads that permutation with its own head so every rank gets as many
samples; `TrainShard` says which of a rank's positions are such repeats, and
the step leaves them out, so no sample counts twice.

Evaluation uses `ShardSampler`, which never pads: `DistributedSampler` repeats
samples to even out the ranks, and those repeats would be counted twice in
the eval loss and accuracy.

Data held in tensors (a TensorDataset) skips the DataLoader: `TensorBatches`
(dtrain/data/batches.py) takes each batch of the same sampler with one indexing,
bit-identical to the DataLoader's batches.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sized, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from dtrain.data.batches import TensorBatches, batched_source
from dtrain.config import DataConfig
from dtrain.runtime.dist import DistState
from dtrain.errors import DTrainError
from dtrain.runtime.factories import call_factory, load_callable
from dtrain.runtime.seeding import rank_seed

# The digits split is fixed, whatever train.seed is, so eval numbers of runs
# with different seeds measure the same samples.
DIGITS_SPLIT_SEED = 1234
DIGITS_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class Datasets:
    """A run's data: what a data factory may return instead of a bare (train, eval) pair."""

    train: Dataset
    eval: Optional[Dataset] = None
    """None: no evaluation."""
    input_shape: Optional[tuple[int, ...]] = None
    """One sample's input shape; None: read off the first training sample."""
    num_classes: Optional[int] = None
    """The model's number of outputs (classes, or a regression target's width); None: worked out where the
    data says (integer labels of a TensorDataset, a `classes` attribute, float targets' width)."""


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


def _factory_datasets(cfg: DataConfig, seed: int) -> Datasets:
    fn = load_callable("data.name", cfg.name, "digits | synthetic | mnist | fashion_mnist | cifar10 | "
                                              "a factory 'package.module:function'")
    label = f"data factory {cfg.name}"
    got = call_factory(fn, label, {"root": os.path.expanduser(cfg.root), "seed": seed,
                                   "download": cfg.download}, dict(cfg.kwargs))
    return as_datasets(got, label)


def as_datasets(got: Any, label: str) -> Datasets:
    """A factory's (train, eval) pair or Datasets, checked: map-style datasets with a length."""
    if isinstance(got, Datasets):
        data = got
    elif isinstance(got, (tuple, list)) and len(got) == 2:
        data = Datasets(got[0], got[1])
    else:
        what = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        raise DTrainError(f"{label} returned {what}; expected (train_dataset, eval_dataset) or dtrain.Datasets")
    for role, ds in (("train", data.train), ("eval", data.eval)):
        if ds is None and role == "eval":
            continue
        if isinstance(ds, torch.utils.data.IterableDataset) or not (hasattr(ds, "__getitem__")
                                                                    and hasattr(ds, "__len__")):
            raise DTrainError(f"{label}: the {role} dataset is a {type(ds).__name__}; expected a map-style "
                              "dataset (with __len__ and __getitem__), e.g. a TensorDataset")
    if len(cast(Sized, data.train)) == 0:
        raise DTrainError(f"{label}: the train dataset is empty")
    return data


def describe(data: Datasets, split: Any) -> Datasets:
    """Fill in input_shape and num_classes where the data says them; `split` finds (x, y) in a sample."""
    if data.input_shape is not None and data.num_classes is not None:
        return data
    x, y = split(data.train[0])
    shape = data.input_shape
    if shape is None and isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
    return replace(data, input_shape=shape,
                   num_classes=data.num_classes if data.num_classes is not None else _outputs(data.train, y))


def _outputs(train: Dataset, y: Any) -> Optional[int]:
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    if isinstance(y, (int, float)) and not isinstance(y, bool):
        y = torch.tensor(y)
    if not isinstance(y, torch.Tensor):
        return None
    if y.is_floating_point():
        return max(1, y.numel())  # a regression target: one output per target value
    if isinstance(train, TensorDataset):
        return int(train.tensors[-1].max().item()) + 1
    targets = getattr(train, "targets", None)  # torchvision's convention
    if targets is not None:
        return int(torch.as_tensor(targets).max().item()) + 1
    return None


def fetch_datasets(cfg: DataConfig, seed: int, dist_state: DistState) -> None:
    """Download what data.download asks for: a step every rank takes together (it holds collectives).

    Rank 0 downloads while the others wait, so nobody reads half-written files;
    then the first rank of each other node fetches whatever its node still
    lacks: nothing when data.root is shared storage, its own copy when it is
    node-local.
    """
    if not cfg.download or cfg.name in ("digits", "synthetic"):
        return
    if ":" in cfg.name:
        # A user factory with download=true: built once on each node's first rank
        # before any other rank builds it, so nobody reads what it is still writing.
        def build_first() -> None:
            _factory_datasets(cfg, seed)

        dist_state.run_on_node_main(build_first)
        return
    from dtrain.data.vision import download_files  # torchvision is an optional extra

    dist_state.run_on_node_main(lambda: download_files(cfg.name, cfg.root))


def build_datasets(cfg: DataConfig, seed: int) -> Datasets:
    """This rank's datasets; local work only (no collective), so a failure here can be agreed on."""
    if cfg.name == "digits":
        return digits()
    if cfg.name == "synthetic":
        return synthetic(cfg, seed)
    if ":" in cfg.name:
        return _factory_datasets(cfg, seed)
    from dtrain.data.vision import vision_datasets

    return vision_datasets(cfg.name, cfg.root)


@dataclass(frozen=True)
class TrainShard:
    """Which of this rank's sampler positions hold real samples, by host arithmetic alone.

    DistributedSampler (drop_last=False) pads the epoch's permutation of N
    samples to a multiple of W by repeating its head; rank r's j-th index is
    position r + j*W of the padded list, a repeat exactly when r + j*W >= N.
    So a rank's repeats are always at the end of its list, and the real
    samples of rank-local positions [start, stop) on all ranks together are
    the padded positions [start*W, stop*W) below N.
    """

    dataset_size: int
    rank: int
    world_size: int

    @property
    def real(self) -> int:
        """Real samples this rank gets per epoch."""
        return len(range(self.rank, self.dataset_size, self.world_size))

    def real_between(self, start: int, stop: int) -> int:
        """Real samples at this rank's positions [start, stop)."""
        return max(0, min(stop, self.real) - start)

    def global_real_between(self, start: int, stop: int) -> int:
        """Real samples at positions [start, stop) of every rank together."""
        return max(0, min(stop * self.world_size, self.dataset_size) - start * self.world_size)


class ShardSampler(Sampler[int]):
    """Rank r gets indices r, r+W, ...: every sample on exactly one rank, no padding."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)  # type: ignore[arg-type]  # map-style datasets are sized

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way, for a resumed run.

    The epoch's index list is built as always (indices only, no data read) and
    the first `start` of this rank's indices are skipped, so a resumed run reads
    exactly the samples the interrupted one had not reached, and none twice.
    """

    start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


# torch and multiprocessing stop workers with SIGTERM (and a join without timeout at exit):
# a worker that ignored it, or took it for "save and stop", would hang its rank's exit.
_WORKERS_MUST_HEED = ("SIGINT", "SIGHUP")
WORKER_SIGTERM_GRACE_S = 60.0
"""How long a DataLoader worker outlives a SIGTERM: its rank stops at the next step boundary and
then ends its workers the normal way, so this only bounds a worker that is stuck in user code."""


def _worker_signals(names: tuple[str, ...], worker_id: int) -> None:
    """In each DataLoader worker: forget the parent's stop-signal handlers (a forked worker
    inherits them). Slurm signals every process of a step: at a time limit, a preemption or a
    requeue the workers get the same SIGTERM (or --signal's USR1) as their rank, and a worker that
    died of it would fail the rank's next batch before the rank reaches the step boundary where it
    saves. So USR1/USR2 are ignored, and SIGTERM ends the worker only after a grace period."""
    for name in names:
        sig = getattr(signal, name)
        if name == "SIGTERM":
            signal.signal(sig, _delayed_exit)
        else:
            signal.signal(sig, signal.SIG_DFL if name in _WORKERS_MUST_HEED else signal.SIG_IGN)


def _delayed_exit(signum: int, frame: Any) -> None:
    if not getattr(_delayed_exit, "armed", False):
        _delayed_exit.armed = True  # type: ignore[attr-defined]
        timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()


@dataclass
class Loaders:
    train: Any
    """A DataLoader, or a TensorBatches (the in-memory fast path) that iterates alike."""
    train_sampler: TrainSampler
    train_shard: TrainShard
    eval: Optional[Any]
    """None when the run has no eval set; else a DataLoader or a TensorBatches."""
    workers_rng: torch.Generator
    """Seeds the train loader's workers; part of this rank's random state in a checkpoint."""

    @property
    def fast_path(self) -> bool:
        return isinstance(self.train, TensorBatches)


def _fast_source(ds: Dataset, cfg: DataConfig, device: torch.device, role: str) -> Optional[Any]:
    """What the fast path reads `ds` through, or None for the DataLoader path (see dtrain/data/batches.py)."""
    if not cfg.fast_path:
        return None
    source = batched_source(ds)
    if not cfg.device_resident:
        return source
    if not hasattr(source, "to"):
        raise DTrainError(f"data.device_resident=true needs {role} data that is a TensorDataset (or a Subset of "
                          f"one); the {role} dataset is a {type(ds).__name__}: set data.device_resident=false")
    return source.to(device)  # on CPU the data is already where the model is: nothing moves


def build_loaders(data: Datasets, cfg: DataConfig, seed: int, dist_state: DistState,
                  worker_ignores: tuple[str, ...] = ()) -> Loaders:
    sampler = TrainSampler(
        data.train, num_replicas=dist_state.world_size, rank=dist_state.rank, shuffle=True, seed=seed,
        drop_last=False)
    shard = TrainShard(len(cast(Sized, data.train)), dist_state.rank, dist_state.world_size)
    pin = dist_state.device.type == "cuda"
    persistent = cfg.num_workers > 0
    # The sampler orders the data alike on every rank; this generator only seeds the
    # workers (torch, random and numpy in each), per rank, so random augmentations
    # differ between ranks and repeat run after run.
    workers_rng = torch.Generator().manual_seed(rank_seed(seed, dist_state.rank, dist_state.world_size))
    init = functools.partial(_worker_signals, tuple(worker_ignores)) if worker_ignores and cfg.num_workers else None
    device = dist_state.device if cfg.device_resident else None
    source = _fast_source(data.train, cfg, dist_state.device, "train")
    train: Any
    if source is not None:
        train = TensorBatches(source, sampler, cfg.batch_size, device)
    else:
        train = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=False,
                           num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=persistent,
                           generator=workers_rng, worker_init_fn=init)
    eval_: Optional[Any] = None
    if data.eval is not None:
        eval_sampler = ShardSampler(data.eval, dist_state.rank, dist_state.world_size)
        eval_source = _fast_source(data.eval, cfg, dist_state.device, "eval")
        if eval_source is not None:
            eval_ = TensorBatches(eval_source, eval_sampler, cfg.eval_batch_size, device)
        else:
            # Its own generator too: without one, its first iterator (at the first eval) would draw
            # the workers' seed from the global RNG, which a resumed run would then draw again.
            eval_rng = torch.Generator().manual_seed(rank_seed(seed + 1, dist_state.rank, dist_state.world_size))
            eval_ = DataLoader(data.eval, batch_size=cfg.eval_batch_size, sampler=eval_sampler,
                               num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=persistent,
                               generator=eval_rng, worker_init_fn=init)
    return Loaders(train, sampler, shard, eval_, workers_rng)
