"""dtrain: data-parallel training on PyTorch DDP, exact at any scale, launched any way.

    import dtrain
    result = dtrain.train(model=net, train_data=train_set, eval_data=test_set, loss="mse")

Importing dtrain imports no torch; `dtrain.train` and friends load it when first used.
"""

from __future__ import annotations

from typing import Any

# First, before anything slow: it notes this process's parent, which under a launcher is the launcher
# (see the module), while that is still certain.
from dtrain.runtime import orphan as _orphan  # noqa: F401

__version__ = "0.1.0"
__all__ = ["train", "load", "load_config", "Config", "Result", "Datasets", "DTrainError", "Callback"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m dtrain --help` and config errors never wait for torch.
    if name in ("train", "load", "Result"):
        from dtrain import api

        return getattr(api, name)
    if name in ("load_config", "Config"):
        from dtrain import config

        return getattr(config, name)
    if name == "Datasets":
        from dtrain.data.types import Datasets

        return Datasets
    if name == "Callback":
        from dtrain.loop.hooks import Callback

        return Callback
    if name == "DTrainError":
        from dtrain.errors import DTrainError

        return DTrainError
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
