"""train.compile: torch.compile the model in place, and count and time what it compiles.

The user's module is compiled in place (`nn.Module.compile`), inside DDP:
its state_dict keeps its names, checkpoints and model.pt stay the same, and
DDP's gradient hooks fire as the compiled backward produces each gradient.

The first batch compiles one graph; the first batch of another size (the
epoch's short last one, an eval batch) compiles once more with that
dimension dynamic (torch's automatic dynamic shapes), and that graph serves
every later size: after the first epoch nothing recompiles. `CompileWatch`
counts dynamo's compilations and their wall time from torch's compile
callbacks, so the log reports both and step times leave compiling out.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn


class CompileWatch:
    """Compilations so far and the compile seconds not yet reported; inert unless `watch()` was called."""

    def __init__(self) -> None:
        self.enabled = False
        self.count = 0
        """Dynamo compilations (a first compile or a recompile) in this process since watch()."""
        self.pending = 0.0
        """Compile seconds in training since the last take()."""
        self._started = 0.0
        self._paused = False
        self._callbacks: Any = None

    def watch(self) -> None:
        from torch._dynamo import callback_handler
        from torch._dynamo.callback import CallbackTrigger

        def start(args: Any) -> None:
            self._started = time.perf_counter()
            if args.callback_trigger == CallbackTrigger.DYNAMO:
                self.count += 1

        def end(args: Any) -> None:
            if not self._paused:
                self.pending += time.perf_counter() - self._started

        self._callbacks = (start, end)
        callback_handler.register_start_callback(start)
        callback_handler.register_end_callback(end)
        self.enabled = True

    def close(self) -> None:
        """Stop counting: torch keeps its callbacks for the life of the process, and a later run in it
        (dtrain.train called again) must not count into this run's watch."""
        if self._callbacks is None:
            return
        from torch._dynamo import callback_handler

        start, end = self._callbacks
        self._callbacks = None
        # torch._dynamo.reset() (a user's, between runs) clears every callback itself.
        if start in callback_handler.start_callbacks:
            callback_handler.remove_start_callback(start)
        if end in callback_handler.end_callbacks:
            callback_handler.remove_end_callback(end)

    def take(self) -> float:
        """Training's compile seconds since the last take."""
        seconds, self.pending = self.pending, 0.0
        return seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Compiles in here (evaluation's) still count, but their time is not training's."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def compile_in_place(model: nn.Module) -> CompileWatch:
    """Compile `model` with inductor; returns the watch that counts its compilations."""
    watch = CompileWatch()
    watch.watch()
    model.compile()
    return watch
