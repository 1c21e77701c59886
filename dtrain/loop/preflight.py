"""Before training: the model and the loss, once, on a first batch of training samples.

A factory that returns something unusable (outputs of the wrong number of classes or
the wrong shape for the targets, a forward that raises, a loss that is not per sample)
is then one line naming it and what was expected, during set-up, where every rank
agrees on it, instead of a deep traceback on the first step. It runs once, in eval
mode and without gradients (no dropout mask drawn, no BatchNorm statistic moved, the
per-rank seeds are set after it), so training is exactly what it would be without it,
and the steps pay nothing for it.
"""

from __future__ import annotations

import os
import traceback
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import default_collate

from dtrain.data.types import Datasets
from dtrain.errors import DTrainError
from dtrain.data.source import to_device
from dtrain.loop.task import Task

CLASS_LOSSES = ("cross_entropy", "causal_lm")
"""Built-in losses whose model outputs are [batch, classes, ...] (or [batch, time, vocab])."""


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _why(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}{where}"


def check_first_batch(model: nn.Module, task: Task, data: Datasets, device: torch.device, model_label: str,
                      batch_size: int, autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Raise a one-line DTrainError if `model` and `task` cannot train on `data`'s first `batch_size` samples."""
    n = min(batch_size, len(data.train))  # type: ignore[arg-type]
    if n == 0:
        return
    loss_label = f"loss.name={task.loss_name}"
    try:
        batch = default_collate([data.train[i] for i in range(n)])
    except Exception:
        return  # samples the default loader cannot batch: its own error at the first step says so
    x, y = to_device(task.split(batch), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():  # as training runs it: a bf16 model needs bf16 autocast
            try:
                raw = task.call(model, x)
            except DTrainError:
                raise
            except Exception as exc:
                raise DTrainError(f"{model_label}: the model's forward on a batch of {n} training samples "
                                  f"(inputs {_shape(x)}) raised {_why(exc)}") from None
            try:
                out = task.outputs(raw)
            except DTrainError as exc:
                raise DTrainError(f"{model_label}: {exc} (for {loss_label})") from None
            if out.dim() == 0 or out.shape[0] != n:
                raise DTrainError(f"{model_label}: the model returned outputs {_shape(out)} for a batch of {n}; "
                                  "expected the batch first, [batch, ...]")
            classes = data.num_classes
            # Fewer outputs than classes cannot train (a label indexes past the logits); more can: the
            # class count may be inferred from the labels present, and a user may size a head on purpose.
            # A language model's logits are [batch, time, vocab]: the classes are last.
            last = out.dim() == 3 and isinstance(y, torch.Tensor) and y.shape == out.shape[:-1]
            given = out.shape[-1 if last else 1] if out.dim() >= 2 else 0
            if task.loss_name in CLASS_LOSSES and classes is not None and out.dim() >= 2 and given < classes:
                raise DTrainError(f"{model_label}: the model gives {given} outputs per "
                                  f"{'position' if last else 'sample'} (outputs {_shape(out)}), but the data has "
                                  f"{classes} classes; expected outputs "
                                  f"[batch, {'time, ' if last else ''}{classes}] (or more) for {loss_label}")
            try:
                values, _ = task.loss(out.float() if out.is_floating_point() else out, y)
            except DTrainError as exc:
                raise DTrainError(f"{exc} (the outputs of {model_label})") from None
            except Exception as exc:
                raise DTrainError(f"{loss_label} on the outputs {_shape(out)} of {model_label} and the targets "
                                  f"{_shape(y)} raised {_why(exc)}") from None
            if values.shape != (n,):
                raise DTrainError(f"{loss_label} returned shape {_shape(values)} for a batch of {n}; expected "
                                  f"one value per sample, ({n},)")
    finally:
        model.train(was_training)
