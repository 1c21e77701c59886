"""A rank's readers of the data: the train source and the eval loader, each through a DataLoader or the
in-memory fast path.

Data held in tensors (a TensorDataset) skips the DataLoader: `TensorBatches`
(dtrain/data/batches.py) takes each batch of the same sampler with one indexing,
bit-identical to the DataLoader's batches.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from dtrain.config import DataConfig
from dtrain.data.batches import TensorBatches, batched_source
from dtrain.data.items import named_items
from dtrain.data.samplers import ShardSampler, TrainSampler
from dtrain.data.random_windows import RandomWindows
from dtrain.data.source import SamplerSource, TrainSource
from dtrain.data.tokens import TokenWindows
from dtrain.data.types import Datasets
from dtrain.errors import DTrainError
from dtrain.runtime.dist import DistState
from dtrain.runtime.seeding import rank_seed
from dtrain.runtime.signals import worker_signals


@dataclass
class Loaders:
    train: TrainSource
    """The train source: windows of this rank's batches, and its own place in the epoch."""
    eval: Optional[Any]
    """None when the run has no eval set; else a DataLoader or a TensorBatches."""


def _fast_reader(ds: Dataset, cfg: DataConfig, device: torch.device, role: str) -> Optional[Any]:
    """What the fast path reads `ds` through, or None for the DataLoader path (see dtrain/data/batches.py)."""
    if not cfg.fast_path:
        return None
    reader = batched_source(ds)
    if not cfg.device_resident:
        return reader
    if not hasattr(reader, "to"):
        raise DTrainError(f"data.device_resident=true needs {role} data that is a TensorDataset (or a Subset of "
                          f"one); the {role} dataset is a {type(ds).__name__}: set data.device_resident=false")
    return reader.to(device)  # on CPU the data is already where the model is: nothing moves


def build_loaders(data: Datasets, cfg: DataConfig, seed: int, dist_state: DistState, grad_accum_steps: int,
                  worker_ignores: tuple[str, ...] = (), eval_max_batches: Optional[int] = None) -> Loaders:
    """This rank's train source (`grad_accum_steps` micro-batches per window) and eval loader (over the first
    `eval_max_batches` x data.eval_batch_size samples, or all); DataLoader workers forget the parent's handlers
    of `worker_ignores` (see runtime.signals.worker_signals)."""
    init = None
    if worker_ignores and cfg.num_workers:
        # Set as this rank's process exits: the SIGTERM that multiprocessing then sends its workers
        # (and joins them) must end them at once, not after the grace a Slurm-wide SIGTERM gets.
        init = functools.partial(_worker_init, tuple(worker_ignores), _exiting(os.getpid()))
    train = _train_source(data, cfg, seed, dist_state, grad_accum_steps, init)
    return Loaders(train, _eval_loader(data, cfg, seed, dist_state, init, eval_max_batches))


@functools.lru_cache(maxsize=None)
def _exiting(pid: int) -> Any:
    """One shared byte per process, set as that process exits, and its one exit handler: a notebook or a
    sweep building loaders run after run adds neither again. Keyed by pid: a forked child gets its own."""
    flag = multiprocessing.RawValue("b", 0)
    atexit.register(_set, flag, pid)
    return flag


def _set(flag: Any, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler: its parent is not exiting
        flag.value = 1


def _worker_init(names: tuple[str, ...], ending: Any, worker_id: int) -> None:
    """runtime.signals.worker_signals, but a SIGTERM once the rank is exiting ends the worker now."""
    worker_signals(names, worker_id)
    patient = signal.getsignal(signal.SIGTERM)
    if not callable(patient):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if ending.value:  # a plain shared byte: no lock to take inside a handler
            # Die of the signal itself, as with no handler: the default action, then the same signal again.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        patient(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _train_source(data: Datasets, cfg: DataConfig, seed: int, dist_state: DistState, k: int,
                  init: Optional[Callable[[int], None]]) -> TrainSource:
    # The sampler orders the data alike on every rank; this generator only seeds the
    # workers (torch, random and numpy in each), per rank, so random augmentations
    # differ between ranks and repeat run after run.
    workers_rng = torch.Generator().manual_seed(rank_seed(seed, dist_state.rank, dist_state.world_size))
    tokens = data.train if isinstance(data.train, TokenWindows) else None
    if tokens is not None and cfg.sampling == "random":
        source = RandomWindows(tokens, seed, dist_state.rank, dist_state.world_size, cfg.batch_size, k, workers_rng)
        # Read once now, so ids beyond meta.pkl's vocabulary fail set-up, before the run writes anything.
        tokens.at(source.offsets(0, 0))
        return source
    sampler = TrainSampler(
        data.train, num_replicas=dist_state.world_size, rank=dist_state.rank, shuffle=True, seed=seed,
        drop_last=False)
    if tokens is not None:
        first = list(itertools.islice(iter(sampler), k * cfg.batch_size))  # epoch 0's first window on this rank
        tokens.get_batch(torch.tensor(first, dtype=torch.long))
    reader = _fast_reader(data.train, cfg, dist_state.device, "train")
    batches: Any
    if reader is not None:
        batches = TensorBatches(reader, sampler, cfg.batch_size, dist_state.device if cfg.device_resident else None)
    else:
        batches = DataLoader(named_items(data.train), batch_size=cfg.batch_size, sampler=sampler, drop_last=False,
                             num_workers=cfg.num_workers, pin_memory=dist_state.device.type == "cuda",
                             persistent_workers=cfg.num_workers > 0, generator=workers_rng, worker_init_fn=init)
    return SamplerSource(batches, sampler, cfg.batch_size, k, workers_rng)


def _eval_loader(data: Datasets, cfg: DataConfig, seed: int, dist_state: DistState,
                 init: Optional[Callable[[int], None]], max_batches: Optional[int]) -> Optional[Any]:
    if data.eval is None:
        return None
    dataset = data.eval
    # The first samples of the set, then sharded: the same subset at any number of processes.
    limit = None if max_batches is None else max_batches * cfg.eval_batch_size
    sampler = ShardSampler(dataset, dist_state.rank, dist_state.world_size, limit)
    reader = _fast_reader(dataset, cfg, dist_state.device, "eval")
    if reader is not None:
        return TensorBatches(reader, sampler, cfg.eval_batch_size, dist_state.device if cfg.device_resident else None)
    # Its own generator too: without one, its first iterator (at the first eval) would draw
    # the workers' seed from the global RNG, which a resumed run would then draw again.
    eval_rng = torch.Generator().manual_seed(rank_seed(seed + 1, dist_state.rank, dist_state.world_size))
    return DataLoader(named_items(dataset), batch_size=cfg.eval_batch_size, sampler=sampler,
                      num_workers=cfg.num_workers,
                      pin_memory=dist_state.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                      generator=eval_rng, worker_init_fn=init)
