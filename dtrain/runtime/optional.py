"""Optional dependencies (the pip extras): imported when a feature asks for them, one line when missing."""

from __future__ import annotations

import importlib
from typing import Any

from dtrain.errors import DTrainError


def optional_import(module: str, extra: str) -> Any:
    """`module`, or a DTrainError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DTrainError(f"{module} is not installed; pip install 'dtrain[{extra}]'") from None
