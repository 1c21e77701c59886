"""The training loop: the notes' five steps on DDP, with precision and accumulation.

Per optimizer step ("window") of up to K micro-batches:
  zero_grad -> for each micro-batch: forward, loss, backward -> (clip) -> step

Two rules make any (world size W, batch B, accumulation K) compute the
gradient of one big batch of the same samples:
  * every micro-batch's summed loss is divided by the number of samples the
    whole window holds on this rank (not by K, not by its own size), so a
    short last window or a small last batch is still weighted per sample;
    DDP then averages over the W ranks, which all hold equally many samples
    (DistributedSampler pads to make it so).
  * the gradient all-reduce runs once per window: the first micro-steps run
    under `no_sync()`, and DDP reduces the accumulated gradients on the last.

Nothing in the hot loop reads a value back to the host: losses accumulate in a
device tensor that is reduced with one collective at each logging step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from dtrain.dist import DistState
from dtrain.loggers import MultiLogger, Record
from dtrain.precision import Precision
from dtrain.progress import Progress


@dataclass
class Loop:
    """Everything a training run changes; `state_dict()` captures all of it."""

    model: DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    dist: DistState
    grad_accum_steps: int = 1
    grad_clip: Optional[float] = None
    step: int = 0
    """Optimizer steps attempted (windows completed); the step of every log record."""
    epoch: int = 0
    """Epochs completed."""
    skipped_steps: int = 0
    """fp16 steps whose gradients overflowed; the scaler skipped them and the schedule did not advance."""

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "step": self.step,
            "epoch": self.epoch,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler") is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


@dataclass
class Meter:
    """Sums of per-sample losses (on the device) and sample counts (on the host).

    Index 0 is the logging window, 1 the epoch. The loss sums stay a device
    tensor until a logging step reads them, so adding never syncs the host;
    one in-place add per micro-step serves both. Counts are host integers
    already, so they cost nothing until they join the logging step's collective.
    """

    device: torch.device
    loss_sums: torch.Tensor = field(init=False)
    counts: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: torch.Tensor, count: int) -> None:
        self.loss_sums += loss_sum.detach()
        self.counts[0] += count
        self.counts[1] += count

    def take(self, row: int, dist_state: DistState, extra: Optional[torch.Tensor] = None) -> list[float]:
        """All-reduce one row's [loss_sum, count] (one collective), reset it, return [loss_sum, count, *extra]."""
        count = torch.tensor([float(self.counts[row])], dtype=torch.float64, device=self.device)
        totals = dist_state.all_reduce_sum(torch.cat([self.loss_sums[row:row + 1], count]))
        self.loss_sums[row].zero_()
        self.counts[row] = 0
        if extra is not None:
            totals = torch.cat([totals, extra.detach().to(totals)])
        return totals.tolist()


def window_sizes(num_samples: int, batch_size: int, num_batches: int, k: int) -> list[int]:
    """Samples per window on one rank, from the sampler's length alone (no data read)."""
    sizes = [min(batch_size, num_samples - b * batch_size) for b in range(num_batches)]
    return [sum(sizes[w:w + k]) for w in range(0, num_batches, k)]


def steps_per_epoch(loader: DataLoader, k: int) -> int:
    return math.ceil(len(loader) / k)


def _to(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class Timer:
    """Host wall time between logging steps, and the part spent waiting on the loader."""

    start: float = field(default_factory=time.perf_counter)
    data: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0


def epoch_windows(loader: DataLoader, sampler: DistributedSampler, batch_size: int, k: int,
                  timer: Optional[Timer] = None) -> Iterator[tuple[list[Any], int]]:
    """One epoch as (micro-batches, samples in the window on this rank) per optimizer step.

    The window sizes come from the sampler's length, so the loss scale of a
    short last window is known before its batches are read.
    """
    batches_left = len(loader)
    it = iter(loader)
    for window in window_sizes(len(sampler), batch_size, batches_left, k):
        n_micro = min(k, batches_left)
        batches_left -= n_micro
        t = time.perf_counter()
        micro = [next(it) for _ in range(n_micro)]
        if timer is not None:
            timer.data += time.perf_counter() - t
        yield micro, window


def train_step(loop: Loop, micro_batches: list[Any], window_samples: int, meter: Meter) -> Optional[torch.Tensor]:
    """One optimizer step over a window of micro-batches; returns the pre-clip grad norm or None."""
    model, opt, scaler = loop.model, loop.optimizer, loop.precision.scaler
    opt.zero_grad(set_to_none=True)
    last = len(micro_batches) - 1
    for j, batch in enumerate(micro_batches):
        x, y = _to(batch, loop.dist.device)
        # Skip DDP's all-reduce on all but the window's last backward.
        with model.no_sync() if j < last else nullcontext():
            with loop.precision.autocast():
                logits = model(x)
                loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
            loss = loss_sum / window_samples
            (scaler.scale(loss) if scaler is not None else loss).backward()
        meter.add(loss_sum, y.shape[0])

    grad_norm = None
    if loop.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
    loop.step += 1
    if scaler is not None:
        # GradScaler.step already reads found_inf on the host, so comparing
        # scales here costs no extra sync.
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale_before:
            loop.skipped_steps += 1
            return grad_norm
    else:
        opt.step()
    loop.scheduler.step()
    return grad_norm


@torch.no_grad()
def evaluate(loop: Loop, loader: DataLoader) -> dict[str, float]:
    """Exact loss and accuracy over the whole eval set, each sample counted once."""
    model = loop.module  # unwrapped: eval needs no DDP hooks or buffer broadcasts
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=loop.dist.device)
    for batch in loader:
        x, y = _to(batch, loop.dist.device)
        with loop.precision.autocast():
            logits = model(x)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += y.shape[0]
    loss_sum, correct, count = loop.dist.all_reduce_sum(sums).tolist()
    model.train()
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": int(count)}


@dataclass
class FitPlan:
    epochs: int
    max_steps: Optional[int]
    log_every: int
    batch_size: int

    def total_steps(self, per_epoch: int) -> int:
        total = self.epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)


def fit(loop: Loop, train_loader: DataLoader, sampler: DistributedSampler, eval_loader: DataLoader,
        plan: FitPlan, logger: MultiLogger, progress: Progress) -> Optional[dict[str, float]]:
    """Train until `plan.epochs` or `plan.max_steps`, evaluating at each epoch end."""
    k = loop.grad_accum_steps
    meter = Meter(loop.dist.device)
    timer = Timer()
    grad_norm: Optional[torch.Tensor] = None
    lr = 0.0
    result: Optional[dict[str, float]] = None
    loop.model.train()

    def log_window() -> None:
        extra = grad_norm.reshape(1) if grad_norm is not None else None
        vals = meter.take(0, loop.dist, extra)  # the one collective, and the one host sync
        elapsed = max(time.perf_counter() - timer.start, 1e-12)
        values: dict[str, float] = {"loss": vals[0] / vals[1], "samples": int(vals[1]), "lr": lr}
        if grad_norm is not None:
            values["grad_norm"] = vals[2]
        values["samples_per_s"] = vals[1] / elapsed
        values["step_time_s"] = elapsed / max(timer.steps, 1)
        values["data_time_fraction"] = timer.data / elapsed
        if loop.dist.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(loop.dist.device) / 2**30
        if loop.precision.scaler is not None:
            values["skipped_steps"] = loop.skipped_steps
        record = Record("train", loop.step, loop.epoch + 1, values)
        logger.log(record)
        progress.show(record)
        timer.reset()

    def done(epochs_completed: int) -> bool:
        return epochs_completed >= plan.epochs or (plan.max_steps is not None and loop.step >= plan.max_steps)

    while not done(loop.epoch):
        sampler.set_epoch(loop.epoch)  # a new shuffle each epoch, the same on every rank
        for micro, window in epoch_windows(train_loader, sampler, plan.batch_size, k, timer):
            lr = loop.optimizer.param_groups[0]["lr"]  # the lr this step uses
            grad_norm = train_step(loop, micro, window, meter)
            timer.steps += 1
            progress.step(loop.epoch + 1)
            if loop.step % plan.log_every == 0:
                log_window()
            if plan.max_steps is not None and loop.step >= plan.max_steps:
                break
        if done(loop.epoch + 1) and timer.steps > 0:
            log_window()  # the partial logging window at the very end
        paused = time.perf_counter()
        epoch_sum, epoch_count = meter.take(1, loop.dist)
        logger.log(Record("train_epoch", loop.step, loop.epoch + 1,
                          {"loss": epoch_sum / epoch_count, "samples": int(epoch_count)}))
        result = evaluate(loop, eval_loader)
        record = Record("eval", loop.step, loop.epoch + 1, result)
        logger.log(record)
        progress.show(record)
        # A window that spans the epoch end must not count the eval as train
        # time, or its samples_per_s and step_time_s would drop at every epoch.
        timer.start += time.perf_counter() - paused
        loop.epoch += 1
    return result
