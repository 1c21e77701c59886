"""User code named in the config: 'package.module:function', loaded and called with what it asks for."""

from __future__ import annotations

import importlib
import inspect
import os
import traceback
from typing import Any, Callable, Mapping

from dtrain.errors import DTrainError


def load_callable(key: str, path: str, allowed: str) -> Callable[..., Any]:
    """Resolve 'package.module:function' (the function may be a dotted attribute path)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise DTrainError(f"config key '{key}' has value {path!r}; allowed: {allowed}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # ImportError only: an error raised by the user's module while it runs is a
        # bug in that module, and its traceback is what the user needs.
        raise DTrainError(f"config key '{key}' has value {path!r}; cannot import {module_name!r}: "
                          f"{' '.join(str(exc).split())}") from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise DTrainError(f"config key '{key}' has value {path!r}; {module_name} has no callable {attr!r}")
    return fn  # type: ignore[return-value]


def named_parameters(fn: Callable[..., Any]) -> set[str]:
    """The keyword arguments `fn` names explicitly (a **kwargs catch-all names none)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to inspect (some builtins)
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call_factory(fn: Callable[..., Any], label: str, offered: Mapping[str, Any], extra: Mapping[str, Any]) -> Any:
    """Call `fn` with the offered keyword arguments it names, plus all of `extra` (the user's own).

    An offered value of None is one dtrain does not know; a factory that names
    it without a default is told so in one line. Whatever the factory raises
    becomes one line naming it and where it raised.
    """
    names = named_parameters(fn)
    kwargs = {k: v for k, v in offered.items() if k in names and k not in extra and v is not None}
    try:
        sig = inspect.signature(fn)
        missing = [p.name for p in sig.parameters.values()
                   if p.name in offered and p.name not in kwargs and p.name not in extra
                   and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise DTrainError(f"{label} needs {', '.join(missing)}, which dtrain cannot tell from the data; "
                              "give it in the kwargs")
        sig.bind(**kwargs, **extra)
    except TypeError as exc:
        raise DTrainError(f"{label} cannot be called with {sorted({**kwargs, **extra})}: {exc}") from None
    except ValueError:
        pass  # no signature: let the call decide
    try:
        return fn(**kwargs, **extra)
    except DTrainError:
        raise
    except Exception as exc:
        raise DTrainError(f"{label} raised {type(exc).__name__}: {' '.join(str(exc).split())}{_where(exc)}") \
            from exc


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {os.path.basename(last.filename)}:{last.lineno})"
