"""Exact evaluation: every eval sample counted once, by one model on every rank."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dtrain.loop.state import TrainState
from dtrain.data.source import to_device
from dtrain.loop.task import Task


@torch.no_grad()
def evaluate(state: TrainState, task: Task, loader: DataLoader) -> dict[str, float]:
    """The loss and every metric of `task` as means over the whole eval set, each sample counted once.

    Each rank sums per-sample values over its shard (no padding); one
    all-reduce of [sums..., count] makes them global.
    """
    state.strategy.share_buffers(state.model)  # one model on every rank: rank 0's, the one saved
    model = state.module  # unwrapped: eval needs no gradient hooks
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
