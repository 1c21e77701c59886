"""Run under torchrun: dtrain.train with a callback that asks for things on one rank only.

Rank 0 asks for a checkpoint after step 2; rank 1 asks to stop after step 3. Each rank prints one JSON
line: {"rank", "steps" (the steps it took), "saves" (the steps its on_save came at)}.
"""

import json
import sys
import time

import torch
from torch.utils.data import TensorDataset

import dtrain


class AskAlone(dtrain.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.saves: list[int] = []

    def on_step_end(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        time.sleep(0.005)  # steps of real length, so that the agreement's rounds come every few steps
        self.steps.append(run.step)
        if run.rank == 0 and run.step == 2:
            run.request_save()
        if run.rank == 1 and run.step == 3:
            run.request_stop("rank 1's callback")

    def on_save(self, run: dtrain.Callback) -> None:  # type: ignore[override]
        self.saves.append(run.step)


g = torch.Generator().manual_seed(0)
x, y = torch.randn(4000, 5, generator=g), torch.randint(0, 3, (4000,), generator=g)
cb = AskAlone()
result = dtrain.train(model=torch.nn.Linear(5, 3), train_data=TensorDataset(x, y), loss="cross_entropy",
                      overrides=[f"output_dir={sys.argv[1]}", "train.epochs=1", "data.batch_size=4",
                                 "log.every_steps=1000", "train.device=cpu"], callbacks=[cb])
rank = 0 if result.is_main else 1
print(json.dumps({"rank": rank, "steps": cb.steps, "saves": cb.saves}), flush=True)
