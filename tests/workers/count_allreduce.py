"""Run under torchrun: count DDP gradient all-reduces per optimizer step with a comm hook.

Prints one JSON line on rank 0: {"steps", "rounds", "control_steps", "control_rounds", "k"}.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import json
import os
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dtrain.config import load_config
from dtrain.data.builtin import build_datasets
from dtrain.data.loaders import build_loaders
from dtrain.runtime.dist import distributed
from dtrain.callbacks.stack import build_duties
from dtrain.loop.engine import FitPlan, fit
from dtrain.runtime.env import detect_launch
from dtrain.loggers import null_logger
from dtrain.models.builtin import build_model
from dtrain.loggers.progress import Progress
from dtrain.setup import build_train_state
from dtrain.loop.task import build_task


class Counter:
    """Counts all-reduce rounds: calls for bucket 0, which every round reduces once."""

    def __init__(self) -> None:
        self.rounds = 0



def counting_hook(state: Counter, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    if bucket.index() == 0:
        state.rounds += 1
    return allreduce_hook(None, bucket)


def main() -> None:
    k = int(sys.argv[1])
    cfg = load_config(None, ["data.name=synthetic", "data.train_size=200", "data.batch_size=8",
                             f"train.grad_accum_steps={k}", "train.epochs=1"])
    with distributed(detect_launch(os.environ), "gloo", "cpu") as ds:
        torch.manual_seed(0)
        data = build_datasets(cfg.data, 0)
        loaders = build_loaders(data, cfg.data, 0, ds, k)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        per_epoch = loaders.train.steps_per_epoch
        loop, _ = build_train_state(cfg, ds, model, per_epoch)

        counter = Counter()
        loop.model.register_comm_hook(counter, counting_hook)
        plan = FitPlan(1, None, 1000)
        duties = build_duties(loop, null_logger(), Progress("none", per_epoch, False))
        fit(loop, build_task("cross_entropy", [], "input", "target"), loaders.train, loaders.eval, plan, duties)
        steps, rounds = loop.step, counter.rounds

        # Control: the same micro-steps without no_sync must reduce on every backward.
        control = Counter()
        loop2, _ = build_train_state(cfg, ds, build_model(cfg.model, data.input_shape, data.num_classes), per_epoch)
        loop2.model.register_comm_hook(control, counting_hook)
        micro = 0
        for x, y in loaders.train.batches:
            loss = torch.nn.functional.cross_entropy(loop2.model(x), y)
            loss.backward()
            micro += 1
        if ds.is_main:
            print(json.dumps({"k": k, "steps": steps, "rounds": rounds, "micro_steps": micro,
                              "control_rounds": control.rounds}), flush=True)


if __name__ == "__main__":
    main()
