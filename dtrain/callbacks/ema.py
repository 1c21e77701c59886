"""ema.decay: an exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights.

Updated after each optimizer step whose update stood: a step the fp16 GradScaler skipped is left out on the
host (it already read that), and one undone by train.on_nonfinite=skip on the device (a factor of 1 and 0
from the step's own flag, never read back). Floating-point entries of the model's state (parameters and
float buffers such as BatchNorm's running statistics) are averaged; integer ones are copied. Every rank holds
the same average (the weights are the same on every rank under DDP). At each eval the average is put into
the model, evaluated exactly as the weights are (records of split eval_ema), and the weights put back.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dtrain.loggers import MultiLogger
from dtrain.loggers.progress import Progress
from dtrain.loop.evaluate import evaluate
from dtrain.loop.hooks import Callback, RunView
from dtrain.loop.record import Record
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task


class EMA(Callback):
    requests_alone = False

    def __init__(self, decay: float, task: Optional[Task] = None, eval_data: Any = None,
                 logger: Optional[MultiLogger] = None, progress: Optional[Progress] = None) -> None:
        self.decay = decay
        self.task, self.eval_data, self.logger, self.progress = task, eval_data, logger, progress
        self.names: list[str] = []
        self.averaged: list[torch.Tensor] = []
        """The average of the floating-point entries; then `copied`, the integer ones."""
        self.copied: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []
        self._live_copied: list[torch.Tensor] = []
        self._saved: Optional[dict[str, torch.Tensor]] = None
        self._scratch: list[torch.Tensor] = []

    def bind(self, state: TrainState) -> None:
        """Start from the model's weights, or from the average a checkpoint gave back."""
        entries = state.module.state_dict()
        floats = [n for n, t in entries.items() if t.is_floating_point()]
        ints = [n for n, t in entries.items() if not t.is_floating_point()]
        self.names = floats + ints
        self._live = [entries[n] for n in floats]
        self._live_copied = [entries[n] for n in ints]
        source = self._saved if self._saved is not None else entries
        missing = [n for n in self.names if n not in source]
        if missing:
            raise ValueError(f"the saved EMA lacks {', '.join(missing[:5])}")
        self.averaged = [source[n].detach().to(entries[n].device, copy=True) for n in floats]
        self.copied = [source[n].detach().to(entries[n].device, copy=True) for n in ints]
        self._saved = None

    def on_fit_start(self, run: RunView) -> None:
        self.bind(run.state)

    @torch.no_grad()
    def on_step_end(self, run: RunView) -> None:
        applied = run.state.applied
        if applied is False:
            return
        if isinstance(applied, torch.Tensor):
            # Factors 1 and 0 for a step undone on the device: the average stays as it was, with no host read.
            keep = torch.where(applied, self.decay, 1.0)
            take = torch.where(applied, 1.0 - self.decay, 0.0)
            if len(self._scratch) != len(self._live):
                self._scratch = [torch.empty_like(t) for t in self._live]  # once: no allocation per step
            torch._foreach_copy_(self._scratch, self._live)
            torch._foreach_mul_(self._scratch, take)
            torch._foreach_mul_(self.averaged, keep)
            torch._foreach_add_(self.averaged, self._scratch)
        else:
            torch._foreach_mul_(self.averaged, self.decay)
            torch._foreach_add_(self.averaged, self._live, alpha=1.0 - self.decay)
        if self.copied:
            torch._foreach_copy_(self.copied, self._live_copied)

    def on_eval_end(self, run: RunView) -> None:
        record = run.record
        if record is None or record.split != "eval" or self.task is None or self.eval_data is None:
            return
        state = run.state
        with state.compile_watch.paused(), self.swapped():
            result = evaluate(state, self.task, self.eval_data)
        ema_record = Record("eval_ema", record.step, record.epoch, result)
        if self.logger is not None:
            self.logger.log(ema_record)
        if self.progress is not None:
            self.progress.show(ema_record)

    def swapped(self) -> "_Swap":
        """Within it, the model holds the average; the weights are put back bitwise after."""
        return _Swap(self)

    def weights(self) -> dict[str, torch.Tensor]:
        """The average as a state dict of the plain model, on the CPU (model_ema.pt)."""
        return {n: t.detach().cpu() for n, t in zip(self.names, [*self.averaged, *self.copied])}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "weights": dict(zip(self.names, [*self.averaged, *self.copied]))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state["weights"])  # placed on the model's devices when bound, at the fit's start


class _Swap:
    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self._backup: list[torch.Tensor] = []

    def __enter__(self) -> None:
        live = [*self.ema._live, *self.ema._live_copied]
        with torch.no_grad():
            self._backup = [t.clone() for t in live]
            torch._foreach_copy_(live, [*self.ema.averaged, *self.ema.copied])

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            torch._foreach_copy_([*self.ema._live, *self.ema._live_copied], self._backup)
        self._backup = []
