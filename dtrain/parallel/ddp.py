"""The model's data-parallel wrapper: DDP with the dist.* knobs, or nothing at all for one process.

With one process there is nothing to all-reduce, yet DDP still runs its
bookkeeping every step (hooks on every gradient, a one-rank all-reduce per
bucket): about a fifth of the step of the benchmark MLP on a CPU core. `Alone`
offers the two things the loop asks of DDP (`module`, `no_sync`) and is
otherwise the model itself, so one process trains bit for bit as under DDP
(the average over one rank is the gradient itself), only faster.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import DistConfig


class Alone(nn.Module):
    """One process: the model, with DDP's `module` and `no_sync` for the loop."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def no_sync(self) -> Any:
        return nullcontext()


class _StaticGraphDDP(DDP):
    """DDP(static_graph=True) whose first backward always synchronises.

    DDP records the static graph in its first backward and fails an internal
    assert when that one runs under no_sync (the first micro-step of an
    accumulation window). Reducing that micro-step's gradients early is exact:
    the average is linear, and once averaged they are equal on every rank, so
    the window's last all-reduce averages them to themselves. It costs one
    extra all-reduce, once per run.
    """

    recorded = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.recorded = True
        return super().forward(*args, **kwargs)

    def no_sync(self) -> Any:
        return super().no_sync() if self.recorded else nullcontext()


Wrapped = Union[DDP, Alone]

DEFAULT_BUCKET_MB = 25  # DDP's own default bucket size


def wrap_ddp(model: nn.Module, cfg: DistConfig, device: torch.device, world_size: int,
             backend: Optional[str] = None) -> Wrapped:
    """DDP with the dist.* knobs (see their fields in dtrain/config/schema.py); `Alone` for one process.
    `backend`: the process group's (None: NCCL on CUDA, else gloo, dtrain's default)."""
    if world_size == 1:
        return Alone(model)
    kwargs: dict[str, Any] = {}
    if cfg.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = cfg.bucket_cap_mb
    elif (backend or ("nccl" if device.type == "cuda" else "gloo")) == "gloo":
        # gloo: DDP's default makes the first bucket 1 MiB, to start NCCL's all-reduce early in the
        # backward pass. Each gloo all-reduce costs about half a millisecond before any byte moves,
        # so the early start loses more than it wins: naming the size makes every bucket 25 MiB
        # (the benchmark MLP's 2.7 MB in one all-reduce: steps 7% faster on 2 processes).
        kwargs["bucket_cap_mb"] = DEFAULT_BUCKET_MB
    # gradient_as_bucket_view: the .grad tensors are views into DDP's buckets, so the all-reduce
    # needs no copy in or out and the gradients take no second copy of memory.
    cls = _StaticGraphDDP if cfg.static_graph else DDP
    ddp = cls(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
              static_graph=cfg.static_graph, find_unused_parameters=cfg.find_unused_parameters, **kwargs)
    if cfg.grad_compression != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.bf16_compress_hook if cfg.grad_compression == "bf16" else default_hooks.fp16_compress_hook
        ddp.register_comm_hook(None, hook)  # None: the default process group
    return ddp
