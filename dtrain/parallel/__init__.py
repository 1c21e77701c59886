"""How the model is spread over the ranks (the strategy): wrapping, gradient sync, clipping, unwrapping.
May import `runtime`, `config` and `errors`."""

from __future__ import annotations

from typing import Callable

from dtrain.config import DistConfig
from dtrain.parallel.base import Strategy
from dtrain.parallel.ddp import DDPStrategy
from dtrain.parallel.single import Alone
from dtrain.runtime.dist import DistState

# The strategies for more than one process, by name: a new one is its own module and an entry here.
STRATEGIES: dict[str, Callable[[DistConfig, DistState], Strategy]] = {
    "ddp": lambda cfg, ds: DDPStrategy(cfg, ds.device, ds.world_size, ds.backend),
}
MANY = "ddp"
"""The strategy of every run of 2 or more processes, until the config offers a choice (dist.strategy)."""


def build_strategy(dist_cfg: DistConfig, dist_state: DistState) -> Strategy:
    """One process is never wrapped (`Alone`); more use the strategy named in the config."""
    if dist_state.world_size == 1:
        return Alone()
    return STRATEGIES[MANY](dist_cfg, dist_state)


__all__ = ["Strategy", "STRATEGIES", "build_strategy"]
