"""checkpoint.monitor / mode / keep_best: keep the k best checkpoints by an eval value, and model_best.pt.

After an eval whose value ranks among the k best so far, every rank saves a checkpoint at that step (the
value is the global eval's, so all ranks ask alike). The list of the best is registered with the checkpoint,
so the checkpoint of step s already counts s among the best; once it is committed, rank 0 writes
model_best.pt (the weights) and then checkpoints/best.json (which checkpoint, and its value), each whole or
not at all. Retention spares every best checkpoint and the one best.json names until the pointer moves on,
and the newest is never deleted; a kill between the commit and the pointers is repaired when the run resumes
(the pointers are rewritten from the list the checkpoint holds).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import torch

from dtrain.callbacks.monitor import eval_value
from dtrain.checkpoint import sharded, store
from dtrain.errors import DTrainError
from dtrain.loop.hooks import Callback, RunView
from dtrain.runtime.files import write_atomic

BEST, MODEL_BEST = store.BEST, store.MODEL_BEST


class BestCheckpoints(Callback):
    requests_alone = False

    def __init__(self, output_dir: str, monitor: str, mode: str = "min", keep_best: int = 1) -> None:
        self.output_dir, self.monitor, self.mode, self.keep_best = output_dir, monitor, mode, keep_best
        self.best: list[tuple[float, int]] = []
        """(value, step) of the best checkpoints, best first."""
        self._pointed: Optional[int] = None
        """The step best.json names on disk (rank 0's knowledge; None: not read or not written yet)."""

    def keep_also(self) -> set[int]:
        """The steps whose checkpoints retention must spare."""
        steps = {step for _, step in self.best}
        return steps | ({self._pointed} if self._pointed is not None else set())

    def _rank(self, entry: tuple[float, int]) -> tuple[float, int]:
        value, step = entry
        return (value if self.mode == "min" else -value, step)  # ties: the earlier step stays ahead

    def on_eval_end(self, run: RunView) -> None:
        value = eval_value(run, self.monitor)
        if value is None or value != value:  # NaN never ranks
            return
        entry = (value, run.step)
        ranked = sorted([e for e in self.best if e[1] != run.step] + [entry], key=self._rank)[:self.keep_best]
        if entry in ranked:
            self.best = ranked
            run.request_save(all_ranks=True)

    def on_fit_start(self, run: RunView) -> None:
        # Rank 0 looks and writes; a failure there (a full disk) reaches every rank as one line.
        run.state.dist.run_on_main(self._repair, share_result=False)

    def _repair(self) -> None:
        pointer = _read_pointer(self.output_dir)
        self._pointed = pointer.get("step")
        if not self.best or pointer.get("best") == self._listed():
            return
        # Killed between a best checkpoint's commit and its pointers: rewrite them from the checkpoints.
        weights = None
        if self._pointed != self.best[0][1]:
            path = os.path.join(store.checkpoints_dir(self.output_dir), store.dir_name(self.best[0][1]))
            weights = sharded.full_model(path, store.load(path))  # a sharded checkpoint's, put together here
        self._write_pointers(weights)

    def on_save(self, run: RunView) -> None:
        if all(step != run.step for _, step in self.best):
            return
        new_best = self.best[0][1] == run.step
        # Every rank asks: a sharded model's weights are gathered.
        weights = run.state.strategy.model_state(run.state.model) if new_best else None
        run.state.dist.run_on_main(lambda: self._write_pointers(weights), share_result=False)

    def _write_pointers(self, weights: Optional[dict[str, Any]]) -> None:
        """model_best.pt (when the best changed), then best.json: the pointer moves only once the weights are
        there."""
        value, step = self.best[0]
        pointer = {"step": step, "checkpoint": store.dir_name(step), "monitor": self.monitor, "mode": self.mode,
                   "value": value, "best": self._listed()}
        files = [(os.path.join(self.output_dir, MODEL_BEST), weights),
                 (os.path.join(store.checkpoints_dir(self.output_dir), BEST), pointer)]
        for path, content in files:
            if content is None:
                continue
            if path.endswith(".json"):
                data = json.dumps(content, allow_nan=True).encode()
            else:
                buf = io.BytesIO()
                torch.save(content, buf)
                data = buf.getvalue()
            try:
                write_atomic(path, data)
            except OSError as exc:
                raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._pointed = step

    def _listed(self) -> list[dict[str, Any]]:
        return [{"step": s, "value": v} for v, s in self.best]

    def state_dict(self) -> dict[str, Any]:
        return {"best": [[v, s] for v, s in self.best], "monitor": self.monitor, "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("monitor"), state.get("mode")) != (self.monitor, self.mode):
            return  # ranked by another value or order: this run's best begin again (the old pointer is spared)
        self.best = [(float(v), int(s)) for v, s in state["best"]][:self.keep_best]


def _read_pointer(output_dir: str) -> dict[str, Any]:
    """best.json as written, or {} when there is none (or it cannot be read: it is rewritten then)."""
    try:
        with open(os.path.join(store.checkpoints_dir(output_dir), BEST), encoding="utf-8") as f:
            pointer = json.load(f)
        return pointer if isinstance(pointer, dict) else {}
    except (OSError, ValueError):
        return {}
