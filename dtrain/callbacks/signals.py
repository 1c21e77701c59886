"""Stop signals (checkpoint.signals): a signal on any rank asks for a checkpoint and a stop at the next
step boundary; the ranks agree on it there, so every rank saves the same step."""

from __future__ import annotations

from dtrain.loop.hooks import Callback, RunView
from dtrain.runtime.signals import StopSignals


class StopOnSignal(Callback):
    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.requests_alone = bool(signals.names)  # a signal may reach one rank only

    def on_boundary(self, run: RunView) -> None:
        if self.signals.received is not None:
            run.request_stop(self.signals.received, pause=True)
            run.request_save()

    def on_save(self, run: RunView) -> None:
        if run.stopping is not None:
            self.signals.acknowledge()  # the ranks met at a boundary and agreed: no deadline any more
