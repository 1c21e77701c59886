"""The user's callbacks named in the config (`callbacks: [{name: package.module:Factory, kwargs: {...}}]`),
built on every rank during set-up, so that a name that does not import or a factory that fails is one line
before anything starts."""

from __future__ import annotations

from typing import Sequence

from dtrain.config.schema import CallbackConfig
from dtrain.errors import DTrainError
from dtrain.loop.hooks import Callback
from dtrain.runtime.factories import call_factory, load_callable


def build_callbacks(specs: Sequence[CallbackConfig]) -> list[Callback]:
    built = []
    for i, spec in enumerate(specs):
        key = f"callbacks[{i}].name"
        factory = load_callable(key, spec.name, "a factory 'package.module:Name' returning a dtrain.Callback")
        cb = call_factory(factory, f"the callback factory {spec.name} ({key})", {}, spec.kwargs)
        if not isinstance(cb, Callback):
            raise DTrainError(f"config key '{key}' has value {spec.name!r}; it returned a {type(cb).__name__}, "
                              "not a dtrain.Callback (subclass dtrain.Callback and override its hooks)")
        built.append(cb)
    return built
