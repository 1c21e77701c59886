"""The notes' models, and user factories loaded by import path."""

from __future__ import annotations

import importlib
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


def load_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DTrainError(f"config key 'model.name' has value {path!r}; cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DTrainError(f"config key 'model.name' has value {path!r}; {module_name} has no callable {attr!r}")
    return fn


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden)
    if cfg.name == "cnn":
        if len(input_shape) != 3:
            raise DTrainError(f"config key 'model.name' has value 'cnn'; allowed: image data (C,H,W), "
                              f"got input shape {tuple(input_shape)}; use model.name=mlp")
        return cnn(input_shape, num_classes)
    model = load_factory(cfg.name)(input_shape=tuple(input_shape), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise DTrainError(f"model factory {cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
