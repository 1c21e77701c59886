"""Continuing a run: `Checkpointer` gathers what every rank must keep (one collective) and has rank 0
commit it; `restore` puts a checkpoint back into a freshly built run on every rank."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import torch.distributed as dist

from dtrain.checkpoint import store as checkpoint
from dtrain.config import Config, global_batch, resume_conflicts, to_dict
from dtrain.data.loaders import Loaders
from dtrain.errors import DTrainError
from dtrain.loop.meters import Meter
from dtrain.loop.state import TrainState
from dtrain.runtime.dist import DistState
from dtrain.runtime.seeding import rank_seed, rng_state, seed_everything, set_rng_state
from dtrain.runtime.signals import StopSignals


def restore(state: TrainState, payload: dict[str, Any], cfg: Config, loaders: Loaders, meter: Meter,
            path: str) -> None:
    """Put a checkpoint back on this rank, after checking that it belongs to this config."""
    ds = state.dist
    conflicts = resume_conflicts(payload["config"], to_dict(cfg))
    if conflicts:
        raise DTrainError(f"cannot resume from {path}: the config differs from the checkpoint's in what changes "
                          f"the math: {'; '.join(conflicts)}; use resume=never with a new output_dir, or "
                          "overwrite=true, to start over")
    saved_batch, batch = int(payload["global_batch"]), global_batch(cfg, ds.world_size)
    if saved_batch != batch:
        raise DTrainError(f"cannot resume from {path}: its global batch is {saved_batch}, this run's is {batch} "
                          f"({cfg.data.batch_size} x {cfg.train.grad_accum_steps} x {ds.world_size} processes); "
                          "change data.batch_size or train.grad_accum_steps so that they match")
    try:
        state.load_state_dict(payload["train"])
    except (RuntimeError, KeyError, ValueError) as exc:  # e.g. a model factory changed since the save
        first = " ".join(str(exc).split())[:300]
        raise DTrainError(f"cannot resume from {path}: it does not fit this run's model or optimizer "
                          f"({type(exc).__name__}: {first})") from None
    meter.load_global_state(payload["meters"], ds.is_main)
    rngs = payload["rng"]
    if int(payload["world_size"]) == ds.world_size:
        set_rng_state(rngs[str(ds.rank)], loaders.workers_rng)
    else:
        # Other ranks than were saved: fresh per-rank streams, still a function of
        # (seed, rank, world size) and of the step, so a rerun repeats them.
        seed = rank_seed(cfg.train.seed + state.step, ds.rank, ds.world_size)
        seed_everything(seed)
        loaders.workers_rng.manual_seed(seed)


class Checkpointer:
    """Saves a checkpoint of the whole job: called by every rank at the same step boundary."""

    def __init__(self, cfg: Config, output_dir: str, ds: DistState, loaders: Loaders, signals: StopSignals,
                 run_id: Callable[[], Optional[str]], say: Callable[[str], None]) -> None:
        self.cfg, self.output_dir, self.ds, self.loaders = cfg, output_dir, ds, loaders
        self.signals, self.run_id, self.say = signals, run_id, say

    def save(self, state: TrainState, meter: Meter) -> None:
        with self.signals.busy():  # ranks wait in collectives while rank 0 writes: not "blocked"
            self._save(state, meter)

    def _save(self, state: TrainState, meter: Meter) -> None:
        started = time.perf_counter()
        meters = meter.global_state(self.ds)  # collective: every rank is here
        mine = rng_state(self.loaders.workers_rng)
        rngs: list[Any] = [mine]
        if self.ds.world_size > 1:
            rngs = [None] * self.ds.world_size
            dist.all_gather_object(rngs, mine)

        def write() -> str:
            payload = {"format": 1, "train": state.state_dict(), "meters": meters,
                       "rng": {str(r): s for r, s in enumerate(rngs)}, "world_size": self.ds.world_size,
                       "global_batch": global_batch(self.cfg, self.ds.world_size), "config": to_dict(self.cfg),
                       "wandb_id": self.run_id()}
            return checkpoint.save(self.output_dir, state.step, state.epoch, payload, self.cfg.checkpoint.keep)

        # Rank 0 writes; a failure there (a full disk) reaches every rank as one error.
        path = self.ds.run_on_main(write, share_result=False)
        if self.ds.is_main:
            size = os.path.getsize(os.path.join(path, checkpoint.STATE))
            self.say(f"dtrain: checkpoint of step {state.step} saved in {time.perf_counter() - started:.2f} s "
                     f"({size / 2**20:.1f} MiB): {path}")
