"""The Python door into dtrain: `dtrain.train(...)`, the same loop as `python -m dtrain`.

A script that calls it runs alone (`python my_script.py`) or under any launcher
(`torchrun --nproc_per_node=2 my_script.py`, `srun`, `accelerate launch`): each
process calls `train`, which finds its rank from the environment, exactly as
the command line does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import nn
from torch.utils.data import Dataset

from dtrain.config import Config, load_config
from dtrain.data.types import Datasets, as_datasets
from dtrain.errors import DTrainError


@dataclass
class Result:
    """What `dtrain.train` returns on every rank."""

    eval: Optional[dict[str, float]]
    """The last evaluation: the loss, each metric, and `samples`; None without eval data."""
    model: nn.Module
    """The trained model, unwrapped from the strategy's wrapper, the same on every rank (under
    dist.strategy=fsdp2 gathered whole: a plain module again)."""
    config: Config
    """The config the run used."""
    is_main: bool
    """True on rank 0 (and in a single process): where to print or save once."""
    output_dir: str = ""
    """Where the run wrote its config, metrics, checkpoints and model.pt."""


def train(model: Union[nn.Module, Callable[..., nn.Module], None] = None,
          train_data: Optional[Dataset] = None,
          eval_data: Optional[Dataset] = None,
          loss: Union[str, Callable[..., Any], None] = None,
          config: Union[str, "os.PathLike[str]", Config, None] = None,
          overrides: Sequence[str] = (),
          metrics: Union[Mapping[str, Callable[..., Any]], Sequence[Any], None] = None,
          callbacks: Sequence[Any] = ()) -> Result:
    """Train `model` on `train_data` and return the last eval and the trained model.

    Anything left out comes from the config, as on the command line:
    model: an nn.Module, a factory (called with those of input_shape and num_classes it names), or
        None for model.name.
    train_data / eval_data: map-style datasets yielding (inputs, targets) or dicts; None for data.name.
        eval_data=None with train_data given means no evaluation.
    loss: a built-in name (cross_entropy, mse, l1, smooth_l1, bce_with_logits), a torch loss module
        (used with reduction='none'), or a function of (outputs, targets) returning one loss per sample.
    config: a YAML path, a preset's name (e.g. 'mnist_mlp', see configs/) or a Config object; overrides:
        'key=value' strings on top, as on the CLI.
    metrics: extra eval metrics, {name: function of (outputs, targets) -> one value per sample}.
    callbacks: `dtrain.Callback` objects, called on every rank after dtrain's own (see dtrain/loop/hooks.py).
    """
    from dtrain.setup import Given
    from dtrain.run import train as run_train

    if isinstance(overrides, str):
        raise DTrainError("dtrain.train: overrides must be a list of 'key=value' strings, not one string")

    if isinstance(loss, str):
        overrides = [*overrides, f"loss.name={loss}"]  # a name is config: config.yaml and W&B record it
        loss = None
    cfg = _config(config, overrides)
    given = Given(model=model, loss=loss, callbacks=list(callbacks), returns_model=True)
    if train_data is not None:
        given.data = as_datasets((train_data, eval_data), "dtrain.train(train_data=..., eval_data=...)")
    elif eval_data is not None:
        raise DTrainError("dtrain.train: eval_data without train_data; give both, or neither (data.name)")
    if isinstance(metrics, Mapping):
        given.metrics = [(name, fn) for name, fn in metrics.items()]
    elif metrics is not None:
        given.metrics = [(None, fn) for fn in metrics]
    result = run_train(cfg, given=given)
    model_out = result.model if result.model is not None else result.state.module
    return Result(result.eval, model_out, cfg, result.state.dist.is_main, result.output_dir)


def load(run_dir: Union[str, "os.PathLike[str]"], checkpoint: Union[str, "os.PathLike[str]"] = "last",
         overrides: Sequence[str] = ()) -> tuple[nn.Module, Config]:
    """A finished (or stopped) run's model and config: `(model, config)`, the plain nn.Module in eval mode on the
    CPU with the chosen weights loaded, rebuilt from `<run_dir>/config.yaml` with `overrides` on top.

    checkpoint: last (model.pt of a finished run, else the newest checkpoint) | best (model_best.pt, else the
        checkpoint that checkpoints/best.json names) | ema (model_ema.pt, else the newest checkpoint's EMA) |
        a committed checkpoint directory | a .pt file holding a state dict.
    A run it cannot rebuild (trained on a model object, a factory that no longer imports, weights that do not
    fit) raises DTrainError with a one-line message.
    """
    from dtrain.inference import load_model

    return load_model(os.fspath(run_dir), os.fspath(checkpoint), overrides)


def _config(config: Union[str, "os.PathLike[str]", Config, None], overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        return load_config(None, overrides, base_config=config)
    return load_config(os.fspath(config) if config is not None else None, overrides)


__all__ = ["Result", "train", "load", "Datasets"]
