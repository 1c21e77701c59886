"""How the model is spread over the ranks (the strategy): wrapping, gradient sync, clipping, unwrapping.
May import `runtime`, `config` and `errors`."""

from __future__ import annotations

from typing import Callable

from dtrain.config import DistConfig
from dtrain.parallel.base import Strategy
from dtrain.parallel.ddp import DDPStrategy
from dtrain.parallel.fsdp2 import FSDP2Strategy
from dtrain.parallel.single import Alone
from dtrain.runtime.dist import DistState

# The strategies for more than one process, by their dist.strategy name (dtrain/config/choices.py): a new one is
# its own module, an entry here and its name in the config's choices.
STRATEGIES: dict[str, Callable[[DistConfig, DistState, str], Strategy]] = {
    "ddp": lambda cfg, dist_state, _: DDPStrategy(cfg, dist_state.device, dist_state.world_size, dist_state.backend),
    "fsdp2": lambda cfg, dist_state, precision: FSDP2Strategy(cfg, dist_state.device, dist_state.world_size,
                                                              precision),
}


def forwards_are_collective(dist_cfg: DistConfig, world_size: int) -> bool:
    """Whether every forward of this run is a collective (so every rank must run each eval forward)."""
    kinds: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy}
    return world_size > 1 and kinds[dist_cfg.strategy].even_eval_batches


def build_strategy(dist_cfg: DistConfig, dist_state: DistState, precision: str = "fp32") -> Strategy:
    """One process is never wrapped (`Alone`); more use the strategy dist.strategy names (`precision`: the run's
    train.precision, for a strategy that casts the parameters itself)."""
    if dist_state.world_size == 1:
        if dist_cfg.strategy == "fsdp2":
            # A job requeued onto one device with the same config still runs, and resumes its sharded checkpoint.
            return Alone("dtrain: dist.strategy=fsdp2 at one process has nothing to shard across: training "
                         "unsharded, as a single process")
        return Alone()
    return STRATEGIES[dist_cfg.strategy](dist_cfg, dist_state, precision)


__all__ = ["Strategy", "STRATEGIES", "build_strategy", "forwards_are_collective"]
