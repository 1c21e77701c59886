"""What a run optimises and reports: its batches, its loss and its eval metrics, as one contract.

Every loss and metric here is **per sample**: a function of (outputs, targets)
that returns one value per sample, shape [batch]. dtrain sums them and divides
by the number of real samples (globally, across ranks and micro-batches), so
the exactness rules of the step hold for every loss, built-in or yours:

* a loss or metric that returns more than one value per sample (per pixel,
  per output) is averaged over everything but the batch dimension first, so
  `mse` is exactly `nn.MSELoss()` of the whole batch;
* a torch loss module (`nn.MSELoss()`, `nn.CrossEntropyLoss(label_smoothing=0.1)`,
  ...) is used with `reduction='none'`;
* a function that returns one number for the whole batch is refused on the
  first batch: dtrain cannot weight it per sample, and it would be silently
  mis-weighted whenever a batch is short.

All checks look at shapes and dtypes only (host metadata), never at values,
so they cost no device sync.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import LOSSES, METRICS
from dtrain.errors import DTrainError

PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Eval metrics each built-in loss reports besides itself.
DEFAULT_METRICS = {"cross_entropy": ("accuracy",), "mse": ("mae",), "bce_with_logits": ("accuracy",)}


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """[batch, ...] -> [batch]: the mean over everything but the batch dimension."""
    return values if values.dim() == 1 else values.reshape(values.shape[0], -1).mean(dim=1)


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__


def _same_shape(loss: str, out: torch.Tensor, y: torch.Tensor) -> None:
    # Broadcasting [B, 1] against [B] silently computes a [B, B] loss: refuse any mismatch.
    if out.shape != y.shape:
        raise DTrainError(f"loss.name={loss}: the model's outputs {_shape(out)} and the targets {_shape(y)} "
                          "must have the same shape")
    if not y.is_floating_point():
        raise DTrainError(f"loss.name={loss}: targets must be floating point, got {_shape(y)}"
                          + (" (class labels? use loss.name=cross_entropy)" if loss != "bce_with_logits" else ""))


def _class_targets(loss: str, out: torch.Tensor, y: torch.Tensor) -> None:
    if out.dim() >= 2 and out.shape[1] == 1:
        # Softmax over one class is 1 whatever the model says: the loss would be 0 and nothing would train.
        raise DTrainError(f"loss.name={loss} needs at least 2 classes, but the model's outputs are {_shape(out)} "
                          f"(one class) for targets {_shape(y)}; for a regression use loss.name=mse (or l1, "
                          "smooth_l1), for a binary label bce_with_logits")
    if y.is_floating_point():
        if y.shape == out.shape:
            return  # class probabilities (soft labels)
        raise DTrainError(f"loss.name={loss} needs integer class labels as targets, got {_shape(y)} "
                          f"for outputs {_shape(out)}; for a regression use loss.name=mse (or l1, smooth_l1)")
    if out.dim() < 2 or y.shape != out.shape[:1] + out.shape[2:]:
        raise DTrainError(f"loss.name={loss}: outputs {_shape(out)} do not fit class-label targets {_shape(y)}; "
                          "expected outputs [batch, classes, ...] for targets [batch, ...]")


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _class_targets("cross_entropy", out, y)
    return per_sample(F.cross_entropy(out, y, reduction="none"))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _same_shape("mse", out, y)
    return per_sample((out - y) ** 2)


def l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _same_shape("l1", out, y)
    return per_sample((out - y).abs())


def smooth_l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _same_shape("smooth_l1", out, y)
    return per_sample(F.smooth_l1_loss(out, y, reduction="none"))


def bce_with_logits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _same_shape("bce_with_logits", out, y)
    return per_sample(F.binary_cross_entropy_with_logits(out, y, reduction="none"))


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class labels: argmax matches; binary 0/1 targets of the outputs' shape: logit sign matches."""
    if y.is_floating_point() and y.shape == out.shape and out.dim() >= 2 and out.shape[1] > 1:
        return per_sample((out.argmax(dim=1) == y.argmax(dim=1)).float())  # class probabilities
    if y.is_floating_point():
        return per_sample(((out > 0) == (y > 0.5)).float())
    return per_sample((out.argmax(dim=1) == y).float())


def mae(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sample((out - y).abs())


# Config's LOSSES and METRICS name the functions above: a name added there without one fails here, at import.
BUILTIN: dict[str, PerSample] = {name: globals()[name] for name in (*LOSSES, *METRICS)}


def checked(fn: Callable[..., Any], label: str) -> PerSample:
    """Wrap a user loss or metric: torch loss modules get reduction='none'; the result must be per sample."""
    if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
        fn = copy.copy(fn)
        fn.reduction = "none"

    def call(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = fn(out, y)
        if not isinstance(values, torch.Tensor):
            raise DTrainError(f"{label} returned {type(values).__name__}; expected a tensor of one value per "
                              "sample, shape [batch]")
        if values.dim() == 0 or values.shape[0] != out.shape[0]:
            raise DTrainError(f"{label} returned shape {tuple(values.shape)} for a batch of {out.shape[0]}; "
                              "expected one value per sample, shape [batch] (a torch loss needs "
                              "reduction='none'): dtrain sums per-sample values and divides by the "
                              "global sample count itself")
        return per_sample(values)

    return call


@dataclass(frozen=True)
class Task:
    """The loss and eval metrics of a run, and how to find inputs and targets in a batch."""

    loss_name: str
    loss: PerSample
    metrics: dict[str, PerSample] = field(default_factory=dict)
    """Eval metrics besides the loss, by the name they are logged under."""
    input_key: str = "input"
    target_key: str = "target"

    @property
    def eval_names(self) -> list[str]:
        return ["loss", *self.metrics]

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of a batch: a pair, or a dict with data.input_key and data.target_key."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, Mapping):
            if self.input_key in batch and self.target_key in batch:
                return batch[self.input_key], batch[self.target_key]
            raise DTrainError(f"a batch is a dict with keys {sorted(map(str, batch))}; expected the keys "
                              f"data.input_key={self.input_key!r} and data.target_key={self.target_key!r}")
        what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) \
            else type(batch).__name__
        raise DTrainError(f"a batch is {what}; expected (inputs, targets) pairs, or dicts with the keys "
                          f"data.input_key={self.input_key!r} and data.target_key={self.target_key!r}")

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor, first: Optional[int] = None) -> torch.Tensor:
        """Sum of the per-sample loss over the batch (or its `first` samples), in fp32 (autocast outputs
        may be half)."""
        losses = self.loss(_float(out), y)
        return (losses if first is None else losses[:first]).sum()

    def eval_sums(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[loss, *metrics] summed over the batch in float64: each float32 value is exact there, so the sums
        hardly depend on how the set was split into batches and shards (the same eval at any world size)."""
        out = _float(out)
        values = [self.loss(out, y)] + [m(out, y) for m in self.metrics.values()]
        return torch.stack([v.double().sum() for v in values])


def _float(out: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise DTrainError(f"the model returned {type(out).__name__}; expected a tensor of outputs")
    return out.float() if out.is_floating_point() else out


def resolve(spec: Any, key: str) -> tuple[str, PerSample]:
    """A built-in name, an import path 'package.module:function', or a callable -> (name, function)."""
    from dtrain.runtime.factories import load_callable

    if callable(spec):
        name = getattr(spec, "__name__", None) or type(spec).__name__
        return name, checked(spec, f"{key} {name}")
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    fn = load_callable(key, spec, f"{' | '.join(LOSSES if key == 'loss.name' else METRICS)} "
                                  "| a function 'package.module:function'")
    return spec.rpartition(":")[2].rpartition(".")[2], checked(fn, f"{key} {spec}")


def build_task(loss: Any, metrics: Sequence[tuple[Optional[str], Any]], input_key: str,
               target_key: str) -> Task:
    """The Task for a loss (name, path or callable) and extra metrics: (name or None, name, path or callable)."""
    loss_name, loss_fn = resolve(loss, "loss.name")
    chosen: dict[str, PerSample] = {}
    for name in DEFAULT_METRICS.get(loss_name, ()) if isinstance(loss, str) else ():
        chosen[name] = BUILTIN[name]
    for given_name, spec in metrics:
        name, fn = resolve(spec, "loss.metrics")
        name = given_name or name
        if name == "loss" or name == "samples":
            raise DTrainError(f"loss.metrics: a metric cannot be named {name!r} (the eval record has that field)")
        chosen[name] = fn
    return Task(loss_name, loss_fn, chosen, input_key, target_key)
