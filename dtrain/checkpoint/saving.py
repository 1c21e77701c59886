"""Continuing a run: `Checkpointer` gathers what every rank must keep (one collective) and has rank 0
commit it; `restore` puts a checkpoint back into a freshly built run on every rank.

Besides the run's own state, a checkpoint holds registered objects' states (`states`, torchtitan's idea):
`{name: object with state_dict() / load_state_dict()}`, saved under payload["states"][name] and given back
by name on resume, so a new component keeps its state without a new payload key here.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Collection, Mapping, Optional, Protocol

import torch.distributed as dist

from dtrain.checkpoint import sharded
from dtrain.checkpoint import store as checkpoint
from dtrain.config import Config, global_batch, resume_conflicts, to_dict
from dtrain.data.source import TrainSource
from dtrain.errors import DTrainError
from dtrain.loop.meters import Meter
from dtrain.loop.state import TrainState
from dtrain.runtime.dist import DistState
from dtrain.runtime.seeding import rank_seed, rng_state, seed_everything, set_rng_state
from dtrain.runtime.signals import StopSignals


class Stateful(Protocol):
    """What may be registered with a checkpoint. Its state holds only tensors, numbers, strings and containers
    of those (the checkpoint is read with weights_only=True)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def load_states(payload: dict[str, Any], states: Mapping[str, Stateful], path: str) -> None:
    """Give each registered object its saved state. One the checkpoint does not hold (it was saved before the
    object was registered) keeps the state it was built with, so older checkpoints still resume."""
    saved = payload.get("states") or {}
    for name, obj in states.items():
        if name not in saved:
            continue
        try:
            obj.load_state_dict(saved[name])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise DTrainError(f"cannot resume from {path}: the saved state of {name!r} does not load "
                              f"({type(exc).__name__}: {first})") from None


def restore(state: TrainState, payload: dict[str, Any], cfg: Config, source: TrainSource, meter: Meter,
            path: str, states: Optional[Mapping[str, Stateful]] = None) -> None:
    """Put a checkpoint back on this rank, after checking that it belongs to this config; `states` are the
    registered objects to give their saved state (`load_states` does it for objects built later)."""
    dist_state = state.dist
    conflicts = resume_conflicts(payload["config"], to_dict(cfg))
    if conflicts:
        raise DTrainError(f"cannot resume from {path}: the config differs from the checkpoint's in what changes "
                          f"the math: {'; '.join(conflicts)}; use resume=never with a new output_dir, or "
                          "overwrite=true, to start over")
    saved_batch, batch = int(payload["global_batch"]), global_batch(cfg, dist_state.world_size)
    if saved_batch != batch:
        raise DTrainError(f"cannot resume from {path}: its global batch is {saved_batch}, this run's is {batch} "
                          f"({cfg.data.batch_size} x {cfg.train.grad_accum_steps} x {dist_state.world_size} "
                          "processes); "
                          "change data.batch_size or train.grad_accum_steps so that they match")
    try:
        state.load_state_dict(payload["train"], sharded.shards_of(path, payload))
    except (RuntimeError, KeyError, ValueError, sharded.checkpoint_exception()) as exc:  # e.g. a factory changed
        exc = sharded.unwrap(exc)  # a sharded load's error carries each rank's own
        first = " ".join(str(exc).split())[:300]
        raise DTrainError(f"cannot resume from {path}: it does not fit this run's model or optimizer "
                          f"({type(exc).__name__}: {first})") from None
    meter.load_global_state(payload["meters"], dist_state.is_main)
    # Checkpoints from before the source kept its own place hold it in the train state.
    source.load_state_dict(payload["data"] if "data" in payload
                           else {"window_in_epoch": payload["train"].get("window_in_epoch", 0)})
    load_states(payload, states or {}, path)
    rngs = payload["rng"]
    if int(payload["world_size"]) == dist_state.world_size:
        set_rng_state(rngs[str(dist_state.rank)], source.workers_rng)
    else:
        # Other ranks than were saved: fresh per-rank streams, still a function of
        # (seed, rank, world size) and of the step, so a rerun repeats them.
        seed = rank_seed(cfg.train.seed + state.step, dist_state.rank, dist_state.world_size)
        seed_everything(seed)
        source.workers_rng.manual_seed(seed)


class Checkpointer:
    """Saves a checkpoint of the whole job: called by every rank at the same step boundary.

    `states`: registered objects whose state is saved too (see the module's docstring); `register` adds one.
    """

    def __init__(self, cfg: Config, output_dir: str, dist_state: DistState, source: TrainSource, signals: StopSignals,
                 run_id: Callable[[], Optional[str]], say: Callable[[str], None],
                 states: Optional[Mapping[str, Stateful]] = None) -> None:
        self.cfg, self.output_dir, self.dist_state, self.source = cfg, output_dir, dist_state, source
        self.signals, self.run_id, self.say = signals, run_id, say
        self.states: dict[str, Stateful] = dict(states or {})
        self.keep_also: Callable[[], Collection[int]] = lambda: ()
        """The steps whose checkpoints retention spares besides the newest checkpoint.keep (the best ones)."""

    def register(self, name: str, obj: Stateful) -> None:
        if name in self.states:
            raise DTrainError(f"two objects registered with the checkpoint under the name {name!r}")
        self.states[name] = obj

    def save(self, state: TrainState, meter: Meter) -> None:
        with self.signals.busy():  # ranks wait in collectives while rank 0 writes: not "blocked"
            self._save(state, meter)

    def _save(self, state: TrainState, meter: Meter) -> None:
        started = time.perf_counter()
        meters = meter.global_state(self.dist_state)  # collective: every rank is here
        # Every rank asks for each state, though rank 0's alone is written: a sharding strategy gathers the
        # model there, and a registered object may gather its own.
        train = state.state_dict()
        shards = state.sharded_state()
        data = self.source.state_dict()
        states = {name: obj.state_dict() for name, obj in self.states.items()}
        mine = rng_state(self.source.workers_rng)
        rngs: list[Any] = [mine]
        if self.dist_state.world_size > 1:
            rngs = [None] * self.dist_state.world_size
            dist.all_gather_object(rngs, mine)

        def payload() -> dict[str, Any]:
            return {"format": 1, "train": train, "data": data, "meters": meters,
                    "rng": {str(r): s for r, s in enumerate(rngs)}, "world_size": self.dist_state.world_size,
                    "global_batch": global_batch(self.cfg, self.dist_state.world_size), "config": to_dict(self.cfg),
                    "wandb_id": self.run_id(), "states": states}

        if shards is not None:  # every rank writes its shard; rank 0 the rest, then commits
            path = sharded.save(self.dist_state, self.output_dir, state.step, state.epoch, shards, payload,
                                self.cfg.checkpoint.keep, self.keep_also)
        else:
            # Rank 0 writes; a failure there (a full disk) reaches every rank as one error.
            path = self.dist_state.run_on_main(
                lambda: checkpoint.save(self.output_dir, state.step, state.epoch, payload(),
                                        self.cfg.checkpoint.keep, self.keep_also()), share_result=False)
        if self.dist_state.is_main:
            size = checkpoint.size_of(path)
            self.say(f"dtrain: checkpoint of step {state.step} saved in {time.perf_counter() - started:.2f} s "
                     f"({size / 2**20:.1f} MiB): {path}")
