"""The notes' models, and user factories loaded by import path."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Sequence

import torch
from torch import nn

from dtrain.config import ModelConfig
from dtrain.errors import DTrainError


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden width, then a Linear to the class logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# Each of the CNN's three 2x2 max-pools halves the side; below 8 one of them gets an empty input.
CNN_MIN_SIDE = 8


def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The small CIFAR CNN: three conv5x5+ReLU+maxpool blocks, flatten, 1024 -> 64 -> classes.

    On 3x32x32 inputs the flattened width is 64*4*4 = 1024; other input sizes
    get the width that their shape gives.
    """
    channels = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(features, nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes))


def _name_error(path: str, why: str) -> DTrainError:
    return DTrainError(f"config key 'model.name' has value {path!r}; {why}")


def load_factory(path: str) -> Callable[..., nn.Module]:
    """Resolve 'package.module:function' (the function may be a dotted attribute path)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise _name_error(path, "allowed: mlp | cnn | a factory 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # ImportError only: an error raised by the user's module while it runs is a
        # bug in that module, and its traceback is what the user needs.
        raise _name_error(path, f"cannot import {module_name!r}: {' '.join(str(exc).split())}") from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise _name_error(path, f"{module_name} has no callable {attr!r}")
    try:
        inspect.signature(fn).bind(input_shape=(1,), num_classes=2)
    except TypeError:
        raise _name_error(path, f"{attr} must accept the keyword arguments input_shape and num_classes") \
            from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    return fn  # type: ignore[return-value]


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden)
    if cfg.name == "cnn":
        if len(input_shape) != 3:
            raise _name_error("cnn", f"allowed: image data (C,H,W), got input shape {tuple(input_shape)}; "
                                     "use model.name=mlp")
        if min(input_shape[1:]) < CNN_MIN_SIDE:
            raise _name_error("cnn", f"allowed: images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} "
                                     f"(three 2x2 poolings), got input shape {tuple(input_shape)}")
        return cnn(input_shape, num_classes)
    model = load_factory(cfg.name)(input_shape=tuple(input_shape), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise _name_error(cfg.name, f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
