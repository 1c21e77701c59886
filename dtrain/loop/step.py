"""One optimizer step: the notes' five steps on DDP, over a window of K micro-batches.

  zero_grad -> for each micro-batch: forward, loss, backward -> (clip) -> step

Two rules make any (world size W, batch B, accumulation K) compute the
gradient of one big batch of the same samples:
  * a window's gradient is the sum of per-sample losses over the real samples
    of the global window (all ranks) divided by their global count. Each rank
    scales its summed loss by W / count, because DDP then averages over the W
    ranks. The count comes from the micro-batches actually fetched and the
    sampler's padding rule (`TrainShard`), all host arithmetic: no collective.
    Samples the sampler repeated to even out the ranks stay in the batch (every
    rank keeps the shapes rank 0 has) but their per-sample losses are left out
    of the sum, so they add nothing to the loss or the gradient. (A layer that
    mixes samples, BatchNorm in training, still sees them in its batch
    statistics on ranks other than 0.)
  * the gradient all-reduce runs once per window: the first micro-steps run
    under `no_sync()`, and DDP reduces the accumulated gradients on the last.

Nothing here reads a value back to the host, except GradScaler's one found-inf
read per step with fp16. Non-finite losses and gradients (train.on_nonfinite) are
flagged on the device by `nonfinite.NonFiniteGuard`, and with skip undone there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from dtrain.data.loaders import TrainShard
from dtrain.loop.meters import Meter, Timer
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task


def batch_len(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    raise TypeError(f"cannot tell how many samples a batch of type {type(batch).__name__} holds")


@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank, and which of their samples are real."""

    batches: list[Any]
    real: list[int]
    """Real samples at the head of each micro-batch; the rest are the sampler's repeats."""
    global_real: int
    """Real samples in the window on all ranks together: the divisor of the summed loss."""


def epoch_windows(loader: DataLoader, shard: TrainShard, k: int,
                  timer: Optional[Timer] = None, start: int = 0) -> Iterator[Window]:
    """One epoch of this rank's loader as windows of up to k micro-batches.

    A window's micro-batches are all fetched before its first forward, so its
    sample count, and so the loss scale, comes from what was read. `start` is
    the rank's position the loader begins at (a resumed epoch).
    """
    it = iter(loader)
    position = start  # this rank's position in the epoch, counted from the batches fetched
    exhausted = False
    while not exhausted:
        t = time.perf_counter()
        batches: list[Any] = []
        for _ in range(k):
            try:
                batches.append(next(it))
            except StopIteration:
                exhausted = True
                break
        if timer is not None:
            timer.data += time.perf_counter() - t
        if not batches:
            return
        real, start = [], position
        for b in batches:
            n = batch_len(b)
            real.append(shard.real_between(position, position + n))
            position += n
        yield Window(batches, real, shard.global_real_between(start, position))


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch, moved to the device without blocking the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def train_step(state: TrainState, task: Task, window: Window, meter: Meter,
               guard: Optional[NonFiniteGuard] = None) -> Optional[torch.Tensor]:
    """One optimizer step over a window; returns the pre-clip grad norm (a device tensor) or None.

    With an active `guard` the step's loss and gradient norm go to its device flags, and with
    train.on_nonfinite=skip a step with a non-finite gradient is undone on the device.
    """
    model, opt, precision = state.model, state.optimizer, state.precision
    watch = guard if guard is not None and guard.active else None
    skip = guard if guard is not None and guard.skips else None
    strategy = state.strategy
    scale = strategy.grad_scale(window.global_real)  # the summed loss becomes the global window's mean
    opt.zero_grad(set_to_none=True)
    last = len(window.batches) - 1
    losses: list[torch.Tensor] = []  # the micro-steps' loss sums, for the guard
    for j, (batch, real) in enumerate(zip(window.batches, window.real)):
        x, y = to_device(task.split(batch), state.dist.device)
        # The repeats are always at the batch's end: summing the first `real` per-sample losses
        # leaves them out (a batch of repeats only still runs backward: DDP needs every rank's).
        keep = real if real < batch_len(batch) else None
        # Gradients are reduced over the ranks once per window, in its last backward.
        with strategy.sync_gradients(model, j == last):
            with precision.autocast():
                out = model(x)
                loss_sum = task.loss_sum(out, y, keep)
            precision.backward(loss_sum * scale)
        if watch is not None:
            losses.append(loss_sum.detach())
        if skip is None:
            meter.add(loss_sum, real)

    grad_norm = None
    if state.grad_clip is not None:
        precision.unscale_(opt)  # clip the true gradients, not the scaled ones
        grad_norm = strategy.clip_grad_norm(model, state.grad_clip)
    state.step += 1
    if skip is not None:  # decided on the all-reduced gradient, so every rank skips the same steps
        step_loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        norm = grad_norm if grad_norm is not None else strategy.grad_norm(model)
        ok = skip.observe(state.step, step_loss, norm)
        meter.add_unless_skipped(step_loss, sum(window.real), ok)  # the loss counts only if the step stands
        with skip.undo_unless(ok, opt):
            stepped = precision.step(opt)
    else:
        if watch is not None:
            watch.note(state.step, losses, grad_norm)  # list appends: checked at the next logging step
        stepped = precision.step(opt)
    if stepped:
        state.scheduler.step()
    else:
        state.skipped_steps += 1  # an fp16 overflow: the schedule does not advance either
    return grad_norm
