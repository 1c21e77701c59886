"""What a run optimises and reports: its batches, its model call, its loss and its eval metrics, as one contract.

Every loss and metric here is **per sample**: a function of (outputs, targets)
that returns one value per sample, shape [batch], or a pair `(values, weights)`
of two such tensors. dtrain sums the values and divides by the sum of the
weights (the number of real samples when there are none), globally, across
ranks and the micro-batches of a step, so the exactness rules of the step hold
for every loss, built-in or yours:

* a loss or metric that returns more than one value per sample (per pixel,
  per output) is averaged over everything but the batch dimension first, so
  `mse` is exactly `nn.MSELoss()` of the whole batch;
* a weighted one returns summed values and what they count: `cross_entropy`
  and `causal_lm` return each sample's summed token losses and its number of
  real tokens (targets equal to loss.ignore_index count nowhere), so the loss
  is the mean over every real token of the global batch, however the tokens
  fall into samples, micro-batches and ranks;
* a torch loss module (`nn.MSELoss()`, `nn.CrossEntropyLoss(label_smoothing=0.1)`,
  ...) is used with `reduction='none'`;
* a function that returns one number for the whole batch is refused on the
  first batch: dtrain cannot weight it per sample, and it would be silently
  mis-weighted whenever a batch is short.

The model is called as `model(inputs)`, or with data.input_key=* as
`model(**inputs)` (every key of a dict batch but data.target_key). It may
return the outputs, a dict or an object with `logits` (a Hugging Face output)
or a tuple whose first element is the outputs (`(logits, loss)`).

All checks look at shapes and dtypes only (host metadata), never at values,
so they cost no device sync.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import LOSSES, METRICS
from dtrain.errors import DTrainError

Terms = tuple[torch.Tensor, Optional[torch.Tensor]]
"""Per-sample values [batch] and their weights [batch] (None: one per sample)."""
PerSample = Callable[[torch.Tensor, torch.Tensor], Terms]
ALL_KEYS = "*"
"""data.input_key's value that passes every entry of a dict batch but the targets to the model by name."""
IGNORE_INDEX = -100
"""loss.ignore_index's default: torch's and Hugging Face's padding label."""
# Eval metrics each built-in loss reports besides itself.
DEFAULT_METRICS = {"cross_entropy": ("accuracy",), "mse": ("mae",), "bce_with_logits": ("accuracy",)}


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """[batch, ...] -> [batch]: the mean over everything but the batch dimension."""
    return values if values.dim() == 1 else values.reshape(values.shape[0], -1).mean(dim=1)


def _summed(values: torch.Tensor, real: torch.Tensor) -> Terms:
    """Per-element values and a mask of the real elements -> (sum per sample, real elements per sample)."""
    n = values.shape[0]
    return values.reshape(n, -1).sum(dim=1), real.reshape(n, -1).sum(dim=1, dtype=torch.float32)


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


def _class_dim(loss: str, out: torch.Tensor, y: torch.Tensor) -> Optional[int]:
    """Where the classes are in `out` for these targets: 1 (torch's [batch, classes, ...]), -1 ([batch, time,
    vocab] for [batch, time] labels, a language model's), or None for class probabilities of out's shape.
    When both fit ([batch, n, n] outputs for [batch, n] labels), the language model's layout wins."""
    if out.dim() >= 2 and out.shape[1] == 1:
        # Softmax over one class is 1 whatever the model says: the loss would be 0 and nothing would train.
        raise DTrainError(f"loss.name={loss} needs at least 2 classes, but the model's outputs are {_shape(out)} "
                          f"(one class) for targets {_shape(y)}; for a regression use loss.name=mse (or l1, "
                          "smooth_l1), for a binary label bce_with_logits")
    if y.is_floating_point():
        if y.shape == out.shape:
            return None  # class probabilities (soft labels)
        raise DTrainError(f"loss.name={loss} needs integer class labels as targets, got {_shape(y)} "
                          f"for outputs {_shape(out)}; for a regression use loss.name=mse (or l1, smooth_l1)")
    if out.dim() == 3 and y.shape == out.shape[:-1]:
        return -1
    if out.dim() >= 2 and y.shape == out.shape[:1] + out.shape[2:]:
        return 1
    raise DTrainError(f"loss.name={loss}: outputs {_shape(out)} do not fit class-label targets {_shape(y)}; "
                      "expected outputs [batch, classes, ...] for targets [batch, ...], or [batch, time, "
                      "vocab] for [batch, time]")


def cross_entropy(out: torch.Tensor, y: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> Terms:
    dim = _class_dim("cross_entropy", out, y)
    if dim is None:
        return per_sample(F.cross_entropy(out, y, reduction="none")), None
    logits = out.movedim(-1, 1) if dim == -1 else out
    values = F.cross_entropy(logits, y, reduction="none", ignore_index=ignore_index)
    if y.dim() == 1:
        # One label per sample (classification): the per-sample mean, as before, with no weights. Weights would
        # cost every step an all-reduce and a pass over the gradients to learn a total that equals the sample
        # count unless a label is ignore_index (such a sample adds a loss of 0 and still counts as one).
        return values, None
    return _summed(values, y != ignore_index)


def causal_lm(out: torch.Tensor, y: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> Terms:
    """Next-token cross-entropy: position t's logits against label t + 1 (labels are the input ids)."""
    if out.dim() != 3 or y.shape != out.shape[:2] or y.is_floating_point():
        raise DTrainError(f"loss.name=causal_lm needs logits [batch, time, vocab] and integer labels [batch, "
                          f"time], got outputs {_shape(out)} and targets {_shape(y)}")
    logits, labels = out[:, :-1], y[:, 1:]
    values = F.cross_entropy(logits.movedim(-1, 1), labels, reduction="none", ignore_index=ignore_index)
    return _summed(values, labels != ignore_index)


def mse(out: torch.Tensor, y: torch.Tensor) -> Terms:
    _same_shape("mse", out, y)
    return per_sample((out - y) ** 2), None


def l1(out: torch.Tensor, y: torch.Tensor) -> Terms:
    _same_shape("l1", out, y)
    return per_sample((out - y).abs()), None


def smooth_l1(out: torch.Tensor, y: torch.Tensor) -> Terms:
    _same_shape("smooth_l1", out, y)
    return per_sample(F.smooth_l1_loss(out, y, reduction="none")), None


def bce_with_logits(out: torch.Tensor, y: torch.Tensor) -> Terms:
    _same_shape("bce_with_logits", out, y)
    return per_sample(F.binary_cross_entropy_with_logits(out, y, reduction="none")), None


def accuracy(out: torch.Tensor, y: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> Terms:
    """Class labels: argmax matches, over the real targets; binary 0/1 targets of the outputs' shape: logit
    sign matches; class probabilities: argmaxes match."""
    if y.is_floating_point() and y.shape == out.shape and out.dim() >= 2 and out.shape[1] > 1:
        return per_sample((out.argmax(dim=1) == y.argmax(dim=1)).float()), None
    if y.is_floating_point():
        return per_sample(((out > 0) == (y > 0.5)).float()), None
    dim = -1 if out.dim() == 3 and y.shape == out.shape[:-1] else 1
    real = y != ignore_index
    return _summed(((out.argmax(dim=dim) == y) & real).float(), real)


def mae(out: torch.Tensor, y: torch.Tensor) -> Terms:
    return per_sample((out - y).abs()), None


IGNORING = ("cross_entropy", "causal_lm", "accuracy")
"""The built-ins that take loss.ignore_index."""
# Config's LOSSES and METRICS name the functions above: a name added there without one fails here, at import.
BUILTIN: dict[str, PerSample] = {name: globals()[name] for name in (*LOSSES, *METRICS)}


def builtin(name: str, ignore_index: int = IGNORE_INDEX) -> PerSample:
    fn = BUILTIN[name]
    return functools.partial(fn, ignore_index=ignore_index) if name in IGNORING else fn


def checked(fn: Callable[..., Any], label: str) -> PerSample:
    """Wrap a user loss or metric: torch loss modules get reduction='none'; the result must be per sample,
    or a pair (values, weights) of per-sample tensors."""
    if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
        fn = copy.copy(fn)
        fn.reduction = "none"

    def one(values: Any, what: str, n: int) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            raise DTrainError(f"{label} returned {what}{type(values).__name__}; expected a tensor of one value per "
                              "sample, shape [batch], or a pair (values, weights) of them")
        if values.dim() == 0 or values.shape[0] != n:
            raise DTrainError(f"{label} returned {what}shape {tuple(values.shape)} for a batch of {n}; "
                              "expected one value per sample, shape [batch] (a torch loss needs "
                              "reduction='none'): dtrain sums per-sample values and divides by the "
                              "global sample count (or the global sum of the weights) itself")
        return per_sample(values)

    def call(out: torch.Tensor, y: torch.Tensor) -> Terms:
        result = fn(out, y)
        if isinstance(result, tuple) and len(result) == 2:
            return one(result[0], "values of ", out.shape[0]), one(result[1], "weights of ", out.shape[0])
        return one(result, "", out.shape[0]), None

    return call


def _logits(out: Any) -> torch.Tensor:
    """The outputs in what a model returned: itself, its `logits` (a dict, a Hugging Face output), or the first
    element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        what = f"a {type(out).__name__} with keys {sorted(map(str, out))}"
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    elif isinstance(out, (tuple, list)):
        what = f"a {type(out).__name__} whose first element is {type(out[0]).__name__}" if out \
            else f"an empty {type(out).__name__}"
    else:
        what = type(out).__name__
    raise DTrainError(f"the model returned {what}; expected a tensor of outputs, a dict or an object with a "
                      "tensor 'logits' (a Hugging Face output), or a tuple whose first element is the outputs")


@dataclass(frozen=True)
class Task:
    """The loss and eval metrics of a run, and how to find inputs and targets in a batch."""

    loss_name: str
    loss: PerSample
    metrics: dict[str, PerSample] = field(default_factory=dict)
    """Eval metrics besides the loss, by the name they are logged under."""
    input_key: str = "input"
    """A dict batch's key of the inputs; ALL_KEYS: every key but target_key, passed to the model by name."""
    target_key: str = "target"

    @property
    def eval_names(self) -> list[str]:
        return ["loss", *self.metrics]

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of a batch: a pair, or a dict with data.input_key and data.target_key."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, Mapping):
            if self.input_key == ALL_KEYS and self.target_key in batch:
                return {k: v for k, v in batch.items() if k != self.target_key}, batch[self.target_key]
            if self.input_key in batch and self.target_key in batch:
                return batch[self.input_key], batch[self.target_key]
            raise DTrainError(f"a batch is a dict with keys {sorted(map(str, batch))}; expected the keys "
                              f"{self._keys()}")
        what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) \
            else type(batch).__name__
        raise DTrainError(f"a batch is {what}; expected (inputs, targets) pairs, or dicts with the keys "
                          f"{self._keys()}")

    def _keys(self) -> str:
        if self.input_key == ALL_KEYS:
            return f"data.target_key={self.target_key!r} (data.input_key=*: the others go to the model by name)"
        return f"data.input_key={self.input_key!r} and data.target_key={self.target_key!r}"

    def call(self, model: Callable[..., Any], x: Any) -> Any:
        """What the model returns for inputs `x`: with data.input_key=* a dict's entries are keyword arguments."""
        return model(**x) if self.input_key == ALL_KEYS and isinstance(x, Mapping) else model(x)

    @staticmethod
    def outputs(returned: Any) -> torch.Tensor:
        """The outputs in what a model returned: itself, its `logits` (a dict, a Hugging Face output), or the
        first element of a tuple; anything else is one line naming it."""
        return _logits(returned)

    def forward(self, model: Callable[..., Any], x: Any) -> torch.Tensor:
        """The model's outputs for inputs `x`."""
        return _logits(self.call(model, x))

    def loss_terms(self, out: torch.Tensor, y: torch.Tensor, first: Optional[int] = None) -> Terms:
        """(sum of the per-sample loss, sum of its weights or None) over the batch (or its `first` samples),
        in fp32 (autocast outputs may be half)."""
        values, weights = self.loss(_float(out), y)
        if first is not None:
            values, weights = values[:first], None if weights is None else weights[:first]
        return values.sum(), None if weights is None else weights.sum()

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor, first: Optional[int] = None) -> torch.Tensor:
        """Sum of the per-sample loss over the batch (or its `first` samples), before dividing by anything."""
        return self.loss_terms(out, y, first)[0]

    def eval_sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """[[loss, *metrics] summed over the batch, their weights summed] in float64 (a weight of 1 per sample
        for those without weights), and which have weights. float64: each float32 value is exact there, so the
        sums hardly depend on how the set was split into batches and shards (the same eval at any world size)."""
        out = _float(out)
        terms = [self.loss(out, y)] + [m(out, y) for m in self.metrics.values()]
        n = float(y.shape[0])
        sums = torch.stack([torch.stack([v.double().sum(), w.double().sum() if w is not None else v.new_tensor(
            n, dtype=torch.float64)]) for v, w in terms], dim=1)
        return sums, [w is not None for _, w in terms]


def _float(out: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise DTrainError(f"the model returned {type(out).__name__}; expected a tensor of outputs")
    return out.float() if out.is_floating_point() else out


def resolve(spec: Any, key: str, ignore_index: int = IGNORE_INDEX) -> tuple[str, PerSample]:
    """A built-in name, an import path 'package.module:function', or a callable -> (name, function)."""
    from dtrain.runtime.factories import load_callable

    if callable(spec):
        name = getattr(spec, "__name__", None) or type(spec).__name__
        return name, checked(spec, f"{key} {name}")
    if spec in BUILTIN:
        return spec, builtin(spec, ignore_index)
    fn = load_callable(key, spec, f"{' | '.join(LOSSES if key == 'loss.name' else METRICS)} "
                                  "| a function 'package.module:function'")
    return spec.rpartition(":")[2].rpartition(".")[2], checked(fn, f"{key} {spec}")


def build_task(loss: Any, metrics: Sequence[tuple[Optional[str], Any]], input_key: str,
               target_key: str, ignore_index: int = IGNORE_INDEX) -> Task:
    """The Task for a loss (name, path or callable) and extra metrics: (name or None, name, path or callable)."""
    loss_name, loss_fn = resolve(loss, "loss.name", ignore_index)
    chosen: dict[str, PerSample] = {}
    for name in DEFAULT_METRICS.get(loss_name, ()) if isinstance(loss, str) else ():
        chosen[name] = builtin(name, ignore_index)
    for given_name, spec in metrics:
        name, fn = resolve(spec, "loss.metrics", ignore_index)
        name = given_name or name
        if name in ("loss", "samples", "tokens"):
            raise DTrainError(f"loss.metrics: a metric cannot be named {name!r} (the eval record has that field)")
        chosen[name] = fn
    return Task(loss_name, loss_fn, chosen, input_key, target_key)
