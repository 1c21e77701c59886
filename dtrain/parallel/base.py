"""The strategy: everything the loop needs to know about how the model is spread over the ranks.

The loop holds the model `wrap` returned and asks the strategy, never the wrapper, whenever the answer
depends on the spread: when gradients are reduced, what the summed loss is scaled by, the gradient's
global norm, the user's module, the full state a checkpoint keeps, and the buffers eval scores with.
Every method takes the wrapped model, as `wrap` returned it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ContextManager, Optional

import torch
from torch import nn


class Strategy(ABC):
    even_eval_batches: bool = False
    """Whether eval must give every rank the same number of batches (a strategy whose forward is itself a
    collective); False: each rank scores its own shard to its end."""
    sharded: bool = False
    """Whether the model and optimizer state are sharded over the ranks: the checkpoint then saves each rank's
    shards through torch.distributed.checkpoint (`sharded_state`) instead of one full state."""
    casts_parameters: bool = False
    """Whether the strategy casts the parameters for compute itself (FSDP2's mixed precision): then the
    precision does not autocast."""
    name: str = ""
    """The strategy's dist.strategy name, for messages."""
    note: Optional[str] = None
    """A line the run's start prints once (rank 0), when the strategy is not what the config asked for."""

    def check(self, module: nn.Module) -> None:
        """Refuse a model this strategy cannot spread, on every rank before any collective (one line)."""

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

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        """This rank's gradient tensors, to be scaled in place (a sharded strategy's shards)."""
        return [p.grad for p in self.unwrap(model).parameters() if p.grad is not None]

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

    def sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": ..., "optimizer": ...} as torch.distributed.checkpoint saves and loads them (parameter names
        as keys): this rank's shards under a sharded strategy, the full tensors otherwise. Every rank calls it."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        stepped = bool(optimizer.state)
        model_state, optim_state = get_state_dict(self.unwrap(model), optimizer)
        if not stepped:
            # get_state_dict makes up a zero step's state (Adam's step=1) to learn its keys; saving it would make
            # the resumed run count one step more than the uninterrupted one.
            optimizer.state.clear()
            optim_state["state"] = {}
        return {"model": model_state, "optimizer": optim_state}

    def load_sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
        """Load a sharded checkpoint's model and optimizer state from the directory `path`, resharded to this
        strategy and world size (any strategy reads any world size's shards). Every rank calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        module = self.unwrap(model)
        # The templates DCP fills in place: every trainable parameter gets made-up state here, so the ones the
        # checkpoint has none for (never given a gradient, or saved before the first step) are left out of the
        # load, which is strict, and of the optimizer after it, as in the run that saved it.
        model_state, optim_state = get_state_dict(module, optimizer)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        absent = [fqn for fqn, entry in optim_state["state"].items()
                  if not any(f"optimizer.state.{fqn}.{key}" in saved for key in entry)]
        for fqn in absent:
            del optim_state["state"][fqn]
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["model"])
        # Not strict only so that the parameters left out above are allowed; the load above already required
        # every other entry of the template.
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        # remove_duplicate=False: a tied parameter's every name; a name get_state_dict shortened (a compiled
        # submodule's prefix dropped) is simply not found, and the load has left it no state anyway.
        params = dict(module.named_parameters(remove_duplicate=False))
        for fqn in absent:
            if fqn in params:
                optimizer.state.pop(params[fqn], None)

    def close(self) -> None:
        """After the run, before the process group is destroyed: let go of whatever would keep the group alive
        (its threads would run into interpreter shutdown, where a finished process can abort). Every rank."""

    def release(self, model: nn.Module) -> nn.Module:
        """The user's module as a plain module that works without the process group (`dtrain.train`'s
        Result.model, taken before the group is destroyed). Every rank calls it."""
        return self.unwrap(model)

    def share_buffers(self, model: nn.Module) -> None:
        """Before eval: give every rank rank 0's buffers. Every rank calls it."""


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's part on this rank: a DTensor's local shard (a view: writing to it writes the DTensor), any
    other tensor itself."""
    return [t._local_tensor if hasattr(t, "_local_tensor") else t for t in tensors]
