"""Exact evaluation: every eval sample counted once, by one model on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dtrain.state import TrainState
from dtrain.step import _to


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
def evaluate(state: TrainState, loader: DataLoader) -> dict[str, float]:
    """Exact loss and accuracy over the whole eval set, each sample counted once."""
    model = state.module  # unwrapped: eval needs no DDP hooks
    share_buffers(model, state.dist.world_size)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=state.dist.device)
    for batch in loader:
        x, y = _to(batch, state.dist.device)
        with state.precision.autocast():
            logits = model(x)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += y.shape[0]
    loss_sum, correct, count = state.dist.all_reduce_sum(sums).tolist()
    model.train()
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": int(count)}
