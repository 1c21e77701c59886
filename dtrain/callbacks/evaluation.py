"""eval.every_steps: an evaluation inside epochs as well as at their end, asked on every rank at the same step
(from the step count), so it needs no agreement."""

from __future__ import annotations

from dtrain.loop.hooks import Callback, RunView


class EvalEvery(Callback):
    requests_alone = False

    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def on_boundary(self, run: RunView) -> None:
        if run.step % self.every_steps == 0:
            run.request_eval(all_ranks=True)
