"""Run under torchrun: dtrain.train with a callback that asks for things on the last rank only.

The last rank asks for a checkpoint after step 2, an eval after step 40 and a stop after step 100, each once.
Each rank writes <output_dir>.rank<R>.json: {"rank", "steps" (the steps it took), "saves" (the steps its on_save came
at), "evals" (the steps of the evals it saw), "ended" (whether on_fit_end came)}.
"""

import json
import os
import sys
import time

import torch
from torch.utils.data import TensorDataset

import dtrain


class AskAlone(dtrain.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.saves: list[int] = []
        self.evals: list[int] = []
        self.ended = False

    def on_step_end(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        time.sleep(0.005)  # steps of real length, so that the agreement's rounds come every few steps
        self.steps.append(run.step)
        if run.rank == run.world_size - 1:
            if run.step == 2:
                run.request_save()
            elif run.step == 40:
                run.request_eval()
            elif run.step == 100:
                run.request_stop("the last rank's callback")

    def on_save(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        self.saves.append(run.step)

    def on_eval_end(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        self.evals.append(run.step)
        assert run.record.values["samples"] == 301  # the global eval, on every rank

    def on_fit_end(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        self.ended = True


g = torch.Generator().manual_seed(0)
x, y = torch.randn(4301, 5, generator=g), torch.randint(0, 3, (4301,), generator=g)
cb = AskAlone()
result = dtrain.train(model=torch.nn.Linear(5, 3), train_data=TensorDataset(x[:4000], y[:4000]),
                      eval_data=TensorDataset(x[4000:], y[4000:]), loss="cross_entropy",
                      overrides=[f"output_dir={sys.argv[1]}", "train.epochs=1", "data.batch_size=4",
                                 "log.every_steps=1000", "train.device=cpu"], callbacks=[cb])

rank = int(os.environ.get("RANK", "0"))
with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:  # a file each: printed lines of two ranks interleave
    json.dump({"rank": rank, "steps": cb.steps, "saves": cb.saves, "evals": cb.evals, "ended": cb.ended}, f)
