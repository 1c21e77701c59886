"""How the model is spread over the ranks (the strategy): wrapping, gradient sync, clipping, unwrapping.
May import `runtime`, `config` and `errors`."""

from __future__ import annotations

from typing import Callable

from dtrain.config import DistConfig
from dtrain.parallel.base import Strategy
from dtrain.parallel.ddp import DDPStrategy
from dtrain.parallel.single import Alone
from dtrain.runtime.dist import DistState

# The strategies for more than one process, by their dist.strategy name (dtrain/config/choices.py): a new one is
# its own module, an entry here and its name in the config's choices.
STRATEGIES: dict[str, Callable[[DistConfig, DistState], Strategy]] = {
    "ddp": lambda cfg, dist_state: DDPStrategy(cfg, dist_state.device, dist_state.world_size, dist_state.backend),
}


def build_strategy(dist_cfg: DistConfig, dist_state: DistState) -> Strategy:
    """One process is never wrapped (`Alone`); more use the strategy dist.strategy names."""
    if dist_state.world_size == 1:
        return Alone()
    return STRATEGIES[dist_cfg.strategy](dist_cfg, dist_state)


__all__ = ["Strategy", "STRATEGIES", "build_strategy"]
