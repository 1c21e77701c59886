"""One process: nothing to spread, so the model is not wrapped at all.

DDP around one process would still run its bookkeeping every step (hooks on
every gradient, a one-rank all-reduce per bucket): about a fifth of the step
of the benchmark MLP on a CPU core. The bare model trains bit for bit as
under DDP (the average over one rank is the gradient itself), only faster.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

from torch import nn

from dtrain.parallel.base import Strategy


class Alone(Strategy):
    def __init__(self, note: Optional[str] = None) -> None:
        self.note = note

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync_gradients(self, model: nn.Module, last: bool) -> ContextManager[Any]:
        return nullcontext()

    def grad_scale(self, global_real: int) -> float:
        return 1 / global_real
