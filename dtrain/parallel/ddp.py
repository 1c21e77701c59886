"""DDP with the dist.* knobs: every rank holds the whole model, and the gradients are averaged over ranks."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import DistConfig
from dtrain.parallel.base import Strategy


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


DEFAULT_BUCKET_MB = 25  # DDP's own default bucket size


class DDPStrategy(Strategy):
    """`backend`: the process group's (None: NCCL on CUDA, else gloo, dtrain's default)."""

    def __init__(self, cfg: DistConfig, device: torch.device, world_size: int,
                 backend: Optional[str] = None) -> None:
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.backend = backend or ("nccl" if device.type == "cuda" else "gloo")

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP with the dist.* knobs (see their fields in dtrain/config/schema.py). Its construction
        broadcasts rank 0's weights to every rank."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {}
        if cfg.bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = cfg.bucket_cap_mb
        elif self.backend == "gloo":
            # gloo: DDP's default makes the first bucket 1 MiB, to start NCCL's all-reduce early in the
            # backward pass. Each gloo all-reduce costs about half a millisecond before any byte moves,
            # so the early start loses more than it wins: naming the size makes every bucket 25 MiB
            # (the benchmark MLP's 2.7 MB in one all-reduce: steps 7% faster on 2 processes).
            kwargs["bucket_cap_mb"] = DEFAULT_BUCKET_MB
        # gradient_as_bucket_view: the .grad tensors are views into DDP's buckets, so the all-reduce
        # needs no copy in or out and the gradients take no second copy of memory.
        cls = _StaticGraphDDP if cfg.static_graph else DDP
        ddp = cls(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                  gradient_as_bucket_view=True, static_graph=cfg.static_graph,
                  find_unused_parameters=cfg.find_unused_parameters, **kwargs)
        if cfg.grad_compression != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = (default_hooks.bf16_compress_hook if cfg.grad_compression == "bf16"
                    else default_hooks.fp16_compress_hook)
            ddp.register_comm_hook(None, hook)  # None: the default process group
        return ddp

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def sync_gradients(self, model: nn.Module, last: bool) -> ContextManager[Any]:
        # DDP all-reduces in the backward; under no_sync the gradients only accumulate, and the
        # window's last backward reduces their sum.
        return nullcontext() if last else model.no_sync()

    def grad_scale(self, global_real: int) -> float:
        # DDP averages gradients over the ranks; the world size undoes it, so the sum is over the global window.
        return self.world_size / global_real

    def share_buffers(self, model: nn.Module) -> None:
        # DDP keeps the parameters identical, but after a step each rank's buffers (BatchNorm's running
        # statistics, say) hold its own last batch; without this each eval shard would be scored by a
        # different model, and none of them would be the saved one (rank 0's).
        for buf in self.unwrap(model).buffers():
            dist.broadcast(buf, src=0)
