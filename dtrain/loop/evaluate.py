"""Exact evaluation: every eval sample counted once, by one model on every rank."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from dtrain.loop.state import TrainState
from dtrain.data.source import to_device
from dtrain.loop.meters import record_sizes
from dtrain.loop.task import Task


@torch.no_grad()
def evaluate(state: TrainState, task: Task, loader: DataLoader) -> dict[str, float]:
    """The loss and every metric of `task` as means over the whole eval set, each sample counted once.

    Each rank sums per-sample values and their weights (the sample count, or a weighted metric's own:
    tokens) over its shard (no padding); one all-reduce of [sums..., weights..., count] makes them global.
    A weighted loss's total weight is reported as `tokens` beside `samples`.
    """
    state.strategy.share_buffers(state.model)  # one model on every rank: rank 0's, the one saved
    model = state.module  # unwrapped: eval needs no gradient hooks
    model.eval()
    names = task.eval_names
    sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64, device=state.dist.device)
    weighted = [False] * len(names)
    for batch in loader:
        x, y = to_device(task.split(batch), state.dist.device)
        with state.precision.autocast():
            out = task.forward(model, x)
        batch_sums, weighted = task.eval_sums(out, y)
        sums[:-1] += batch_sums.reshape(-1)
        sums[-1] += y.shape[0]
    *totals, count = state.dist.all_reduce_sum(sums).tolist()
    model.train()
    values, weights = totals[:len(names)], totals[len(names):]
    result: dict[str, float] = {name: total / weight if weight else float("nan")
                                for name, total, weight in zip(names, values, weights)}
    result.update(record_sizes(int(count), weights[0] if weighted[0] else None))
    return result
