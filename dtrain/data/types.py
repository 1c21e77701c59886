"""What a run's data is: the `Datasets` a factory returns, its checks, and the shapes read off it.

The bottom of `dtrain.data`: the built-ins, vision and the loaders import it; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sized, cast

import torch
from torch.utils.data import Dataset, TensorDataset

from dtrain.errors import DTrainError


@dataclass(frozen=True)
class Datasets:
    """A run's data: what a data factory may return instead of a bare (train, eval) pair."""

    train: Dataset
    eval: Optional[Dataset] = None
    """None: no evaluation."""
    input_shape: Optional[tuple[int, ...]] = None
    """One sample's input shape; None: read off the first training sample."""
    num_classes: Optional[int] = None
    """The model's number of outputs (classes, or a regression target's width); None: worked out where the
    data says (integer labels of a TensorDataset, a `classes` attribute, float targets' width)."""


def as_datasets(got: Any, label: str) -> Datasets:
    """A factory's (train, eval) pair or Datasets, checked: map-style datasets with a length."""
    if isinstance(got, Datasets):
        data = got
    elif isinstance(got, (tuple, list)) and len(got) == 2:
        data = Datasets(got[0], got[1])
    else:
        what = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        raise DTrainError(f"{label} returned {what}; expected (train_dataset, eval_dataset) or dtrain.Datasets")
    for role, ds in (("train", data.train), ("eval", data.eval)):
        if ds is None and role == "eval":
            continue
        if isinstance(ds, torch.utils.data.IterableDataset) or not (hasattr(ds, "__getitem__")
                                                                    and hasattr(ds, "__len__")):
            raise DTrainError(f"{label}: the {role} dataset is a {type(ds).__name__}; expected a map-style "
                              "dataset (with __len__ and __getitem__), e.g. a TensorDataset")
    if len(cast(Sized, data.train)) == 0:
        raise DTrainError(f"{label}: the train dataset is empty")
    return data


def fill_in_shapes(data: Datasets, split: Callable[[Any], tuple[Any, Any]]) -> Datasets:
    """Fill in input_shape and num_classes where the data says them; `split` finds (x, y) in a sample."""
    if data.input_shape is not None and data.num_classes is not None:
        return data
    x, y = split(data.train[0])
    shape = data.input_shape
    if shape is None and isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
    return replace(data, input_shape=shape,
                   num_classes=data.num_classes if data.num_classes is not None else _outputs(data.train, y))


def _outputs(train: Dataset, y: Any) -> Optional[int]:
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    if isinstance(y, (int, float)) and not isinstance(y, bool):
        y = torch.tensor(y)
    if not isinstance(y, torch.Tensor):
        return None
    if y.is_floating_point():
        return max(1, y.numel())  # a regression target: one output per target value
    if isinstance(train, TensorDataset):
        return int(train.tensors[-1].max().item()) + 1
    targets = getattr(train, "targets", None)  # torchvision's convention
    if targets is not None:
        return int(torch.as_tensor(targets).max().item()) + 1
    return None
