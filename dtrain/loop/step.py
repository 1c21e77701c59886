"""One optimizer step: the notes' five steps over a window of K micro-batches, on every rank alike.

  zero_grad -> for each micro-batch: forward, loss, backward -> (clip) -> step

Two rules make any (world size W, batch B, accumulation K) compute the
gradient of one big batch of the same samples:
  * a window's gradient is the sum of per-sample losses over the real samples
    of the global window (all ranks) divided by their global count. Each rank
    scales its summed loss by the strategy's `grad_scale` (W / count under
    DDP, which then averages over the W ranks). The count comes from the
    micro-batches actually fetched and the sampler's padding rule
    (`TrainShard`), all host arithmetic: no collective.
    Samples the sampler repeated to even out the ranks stay in the batch (every
    rank keeps the shapes rank 0 has) but their per-sample losses are left out
    of the sum, so they add nothing to the loss or the gradient. (A layer that
    mixes samples, BatchNorm in training, still sees them in its batch
    statistics on ranks other than 0.)
  * the gradient all-reduce runs once per window: the strategy's
    `sync_gradients` holds it back on the first micro-steps, and the
    accumulated gradients are reduced on the last.

Nothing here reads a value back to the host, except GradScaler's one found-inf
read per step with fp16. Non-finite losses and gradients (train.on_nonfinite) are
flagged on the device by `nonfinite.NonFiniteGuard`, and with skip undone there.
"""

from __future__ import annotations

from typing import Optional

import torch

from dtrain.data.source import Window, batch_len, to_device
from dtrain.loop.meters import Meter
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task


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
        state.applied = ok if stepped else False
    else:
        if watch is not None:
            watch.note(state.step, losses, grad_norm)  # list appends: checked at the next logging step
        stepped = precision.step(opt)
        state.applied = stepped
    if stepped:
        state.scheduler.step()
    else:
        state.skipped_steps += 1  # an fp16 overflow: the schedule does not advance either
    return grad_norm
