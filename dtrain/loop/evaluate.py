"""Exact evaluation: every eval sample counted once, by one model on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from dtrain.loop.state import TrainState
from dtrain.loop.step import to_device
from dtrain.loop.task import Task


def share_buffers(module: nn.Module, world_size: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics, say).

    DDP keeps the parameters identical, but after a step each rank's buffers
    hold its own last batch; without this each eval shard would be scored by a
    different model, and none of them would be the saved one (rank 0's).
    """
    if world_size == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(state: TrainState, task: Task, loader: DataLoader) -> dict[str, float]:
    """The loss and every metric of `task` as means over the whole eval set, each sample counted once.

    Each rank sums per-sample values over its shard (no padding); one
    all-reduce of [sums..., count] makes them global.
    """
    model = state.module  # unwrapped: eval needs no DDP hooks
    share_buffers(model, state.dist.world_size)
    model.eval()
    names = task.eval_names
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=state.dist.device)
    for batch in loader:
        x, y = to_device(task.split(batch), state.dist.device)
        with state.precision.autocast():
            out = model(x)
        sums[:-1] += task.eval_sums(out, y)
        sums[-1] += y.shape[0]
    *totals, count = state.dist.all_reduce_sum(sums).tolist()
    model.train()
    result: dict[str, float] = {name: total / count if count else float("nan") for name, total in zip(names, totals)}
    result["samples"] = int(count)
    return result
