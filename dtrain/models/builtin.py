"""The notes' models, and user factories loaded by import path."""

from __future__ import annotations

import fnmatch
import functools
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from dtrain.config import MODELS, ModelConfig
from dtrain.errors import ConfigError, DTrainError
from dtrain.models.gpt import build_gpt
from dtrain.runtime.factories import call_factory, load_callable


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


def build_model(cfg: ModelConfig, input_shape: Optional[Sequence[int]], num_classes: Optional[int]) -> nn.Module:
    """The configured model, initialised and frozen as the config says."""
    if cfg.name == "gpt":
        return prepare_model(build_gpt(input_shape, num_classes, dict(cfg.kwargs)), cfg.init, cfg.freeze)
    if cfg.name in MODELS:
        unknown = set(cfg.kwargs) - {"input_shape", "num_classes"}
        if unknown:
            raise ConfigError("model.kwargs", dict(cfg.kwargs), f"input_shape, num_classes with model.name={cfg.name}")
        input_shape = cfg.kwargs.get("input_shape", input_shape)
        num_classes = cfg.kwargs.get("num_classes", num_classes)
        if input_shape is None or num_classes is None:
            what, key = ("input shape", "input_shape") if input_shape is None else ("number of outputs", "num_classes")
            raise _name_error(cfg.name, f"the data does not say its {what}: set model.kwargs={{{key}: ...}}, "
                                        f"or return dtrain.Datasets(..., {key}=...) from the data factory")
        model = mlp(input_shape, num_classes, cfg.hidden) if cfg.name == "mlp" else _cnn(input_shape, num_classes)
        return prepare_model(model, cfg.init, cfg.freeze)
    fn = load_callable("model.name", cfg.name, f"{' | '.join(MODELS)} | a factory 'package.module:function'")
    return from_factory(fn, cfg.name, f"config key 'model.name' has value {cfg.name!r}", cfg, input_shape,
                        num_classes)


def from_factory(fn: Callable[..., Any], name: str, named_as: str, cfg: ModelConfig,
                 input_shape: Optional[Sequence[int]], num_classes: Optional[int]) -> nn.Module:
    """Call a model factory (config path or a callable handed to dtrain.train), check, init and freeze."""
    offered = {"input_shape": tuple(input_shape) if input_shape is not None else None, "num_classes": num_classes}
    model = call_factory(fn, f"model factory {name}", offered, dict(cfg.kwargs))
    if not isinstance(model, nn.Module):
        raise DTrainError(f"{named_as}; the factory returned {type(model).__name__}, not a torch.nn.Module")
    return prepare_model(model, cfg.init, cfg.freeze)


def _cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise _name_error("cnn", f"allowed: image data (C,H,W), got input shape {tuple(input_shape)}; "
                                 "use model.name=mlp")
    if min(input_shape[1:]) < CNN_MIN_SIDE:
        raise _name_error("cnn", f"allowed: images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} "
                                 f"(three 2x2 poolings), got input shape {tuple(input_shape)}")
    return cnn(input_shape, num_classes)


def prepare_model(model: nn.Module, init: str, freeze: Sequence[str]) -> nn.Module:
    """model.init, then model.freeze; the same on every rank, since every rank seeds alike first."""
    if init != "default":
        initialise(model, init)
    frozen = freeze_parameters(model, freeze)
    if frozen and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model.freeze", list(freeze), "globs that leave at least one parameter to train")
    return model


def initialise(model: nn.Module, scheme: str) -> None:
    """The notes' weight init: Linear and Conv weights by `scheme`, their biases zero."""
    # Each of config's MODEL_INITS (but default) is the torch.nn.init function of that name.
    fill: Callable[[torch.Tensor], Any] = getattr(nn.init, f"{scheme}_")
    if scheme.startswith("kaiming"):
        fill = functools.partial(fill, nonlinearity="relu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fill(module.weight)
                if module.bias is not None:
                    module.bias.zero_()


def freeze_parameters(model: nn.Module, globs: Sequence[str]) -> list[str]:
    """requires_grad=False for parameters matched by any glob; a glob matching nothing is an error."""
    names = [n for n, _ in model.named_parameters()]
    frozen: list[str] = []
    for i, glob in enumerate(globs):
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise ConfigError(f"model.freeze[{i}]", glob,
                              f"a glob matching at least one parameter of: {', '.join(names)}")
        frozen += [n for n in hits if n not in frozen]
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
