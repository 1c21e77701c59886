"""The strategy: everything the loop needs to know about how the model is spread over the ranks.

The loop holds the model `wrap` returned and asks the strategy, never the wrapper, whenever the answer
depends on the spread: when gradients are reduced, what the summed loss is scaled by, the gradient's
global norm, the user's module, the full state a checkpoint keeps, and the buffers eval scores with.
Every method takes the wrapped model, as `wrap` returned it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ContextManager

import torch
from torch import nn


class Strategy(ABC):
    even_eval_batches: bool = False
    """Whether eval must give every rank the same number of batches (a strategy whose forward is itself a
    collective); False: each rank scores its own shard to its end."""

    @abstractmethod
    def wrap(self, module: nn.Module) -> nn.Module:
        """The model the loop calls forward on. Called once the ranks agreed that set-up worked; the
        optimizer is built afterwards, from the parameters of `unwrap(wrap(module))`."""

    @abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside the wrapped model (saving, eval, the API's Result.model)."""

    @abstractmethod
    def sync_gradients(self, model: nn.Module, last: bool) -> ContextManager[Any]:
        """A context for one backward of an accumulation window: gradients are reduced over the ranks only
        when `last`; before that they accumulate locally."""

    @abstractmethod
    def grad_scale(self, global_real: int) -> float:
        """What the step multiplies each micro-batch's summed loss by, so that after the strategy's own
        reduction the gradient is that of the mean over the window's `global_real` samples on all ranks."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` in place; the global norm before clipping."""
        return nn.utils.clip_grad_norm_(self.unwrap(model).parameters(), max_norm)

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global gradient norm, without clipping."""
        return nn.utils.get_total_norm([p.grad for p in self.unwrap(model).parameters() if p.grad is not None])

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The user's module's full state dict. Every rank calls it (a sharding strategy gathers here)."""
        return self.unwrap(model).state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.unwrap(model).load_state_dict(state)

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full state, as one process would hold it. Every rank calls it (a sharding strategy
        gathers its shards here, so a checkpoint loads at another world size)."""
        return optimizer.state_dict()

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def share_buffers(self, model: nn.Module) -> None:
        """Before eval: give every rank rank 0's buffers. Every rank calls it."""
