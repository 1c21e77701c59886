"""Exact evaluation: every eval sample counted once, by one model on every rank."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dtrain.loop.state import TrainState
from dtrain.data.source import to_device
from dtrain.loop.meters import record_sizes
from dtrain.loop.task import Task
from dtrain.errors import DTrainError


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
    for batch, real in even_batches(loader, state):
        x, y = to_device(task.split(batch), state.dist.device)
        with state.precision.autocast():
            out = task.forward(model, x)
        if not real:
            continue
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


def even_batches(loader: Iterable[Any], state: TrainState) -> Iterator[tuple[Any, bool]]:
    """(batch, True) for each batch of this rank's shard; then, under a strategy whose forward is a collective
    (FSDP2 gathers the weights in it), (a repeat of the last batch, False) until this rank has run as many
    forwards as the rank with the most batches: the shards differ by a sample, and a rank that stopped early would
    leave the others waiting in their next forward. The repeats' outputs are thrown away."""
    if not state.strategy.even_eval_batches or state.dist.world_size == 1:
        for batch in loader:
            yield batch, True
        return
    mine = len(loader)  # type: ignore[arg-type]
    # Once per eval, the most and (negated) the fewest batches of any rank: host arithmetic would need every
    # rank's shard. Agreed before any forward, so that a rank with none stops every rank, not only itself.
    counts = torch.tensor([mine, -mine], dtype=torch.int64, device=state.dist.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if fewest == 0 and most > 0:
        raise DTrainError(f"under dist.strategy={state.strategy.name} every forward is a collective, and a rank "
                          f"has no eval sample to run one with: the eval set (after eval.max_batches) holds fewer "
                          f"samples than the {state.dist.world_size} ranks; give it more, or raise eval.max_batches")
    last = None
    for batch in loader:
        last = batch
        yield batch, True
    extra = most - mine
    for _ in range(extra):
        yield last, False
