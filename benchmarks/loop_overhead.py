"""dtrain's loop against a hand-written DDP loop on the same data, model and process group.

    python benchmarks/loop_overhead.py                     # one process
    python benchmarks/loop_overhead.py --samples 2000 --repeats 1   # a smoke run: seconds, figures meaningless
    torchrun --standalone --nproc_per_node=2 benchmarks/loop_overhead.py

Both loops run in this process, alternating, over the same DataLoader and a
model of the same shape; the printed ratio is dtrain's samples/s over the
hand-written loop's (1.00 = no overhead). The hand-written loop is the notes'
five steps with nothing else: no logging, no loss accumulation.

A third variant runs fit with the stop-signal check of a real run (one tiny
all-reduce between the ranks at step boundaries about 0.2 s of training apart,
issued in the background; no checkpoint saved),
so its ratio to plain fit is the cost of being preemptible. Two more run fit
with train.on_nonfinite=stop (the default of a real run: device flags, checked
at logging steps) and =skip (plus a device copy of parameters and optimizer
state per step, to undo a bad step without a host sync): their ratios to plain
fit (train.on_nonfinite=ignore) are the cost of watching for NaN. The last runs fit with
ema.decay (dtrain/callbacks/ema.py: one pass over the weights per step, and an eval of the average at
each eval): its ratio to plain fit is the EMA's cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import load_config
from dtrain.data.builtin import build_datasets
from dtrain.data.loaders import build_loaders
from dtrain.runtime.dist import distributed
from dtrain.callbacks.ema import EMA
from dtrain.callbacks.stack import build_duties
from dtrain.loop.engine import FitPlan, fit
from dtrain.runtime.env import detect_launch
from dtrain.loggers import null_logger
from dtrain.models.builtin import build_model
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.runtime.signals import StopSignals
from dtrain.loggers.progress import Progress
from dtrain.setup import build_train_state
from dtrain.loop.task import build_task

EPOCHS, REPEATS = 2, 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000, help="training samples an epoch")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="alternating runs of each variant")
    args = parser.parse_args()
    repeats = args.repeats
    cfg = load_config(None, ["data.name=synthetic", f"data.train_size={args.samples}", "data.batch_size=128",
                             "data.num_features=256", "model.hidden=[512,512]", "log.every_steps=50"])
    with distributed(detect_launch(os.environ), "auto", "auto") as dist_state:
        torch.manual_seed(0)
        data = build_datasets(cfg.data, 0)
        loaders = build_loaders(data, cfg.data, 0, dist_state, cfg.train.grad_accum_steps)

        def hand_written() -> float:
            model = DDP(build_model(cfg.model, data.input_shape, data.num_classes).to(dist_state.device))
            opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
            t = time.perf_counter()
            for epoch in range(EPOCHS):
                loaders.train.sampler.set_epoch(epoch)
                for x, y in loaders.train.batches:
                    x, y = x.to(dist_state.device), y.to(dist_state.device)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if dist_state.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        def dtrain_loop(signals: object = None, on_nonfinite: str = "ignore", ema: bool = False) -> float:
            model = build_model(cfg.model, data.input_shape, data.num_classes)
            per_epoch = loaders.train.steps_per_epoch
            loop, _ = build_train_state(cfg, dist_state, model, EPOCHS * per_epoch)
            plan = FitPlan(EPOCHS, None, cfg.log.every_steps)
            guard = NonFiniteGuard(on_nonfinite, 10, dist_state.device)
            t = time.perf_counter()
            # fit evaluates each epoch; subtract nothing, since eval is part of what a user runs,
            # but keep the eval set small so the comparison is about the train loop.
            # With `signals`, the stop-signal agreement of a real run runs; no checkpoint is due.
            task = build_task("cross_entropy", [], "input", "target")
            extras = [EMA(0.999, task, loaders.eval)] if ema else []
            duties = build_duties(loop, null_logger(), Progress("none", EPOCHS * per_epoch, False), guard=guard,
                                  signals=signals, extras=extras)  # type: ignore[arg-type]
            fit(loop, task, loaders.train, loaders.eval, plan, duties)
            if dist_state.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        hand_written()  # warm-up: allocator, kernels, worker start
        hand, ours, checked, stop, skip, ema = [], [], [], [], [], []  # type: ignore[var-annotated]
        for _ in range(repeats):
            ours.append(dtrain_loop())
            hand.append(hand_written())
            checked.append(dtrain_loop(StopSignals(["SIGUSR1", "SIGUSR2"])))
            stop.append(dtrain_loop(on_nonfinite="stop"))
            skip.append(dtrain_loop(on_nonfinite="skip"))
            ema.append(dtrain_loop(ema=True))
        samples = EPOCHS * len(data.train)
        if dist_state.is_main:
            # The median of alternating runs: a load spike hits one run, not one side.
            h, o = statistics.median(hand), statistics.median(ours)
            print(f"world_size={dist_state.world_size} device={dist_state.device} samples/epoch={len(data.train)} "
                  f"epochs={EPOCHS}")
            print(f"hand-written DDP loop: {samples / h:10.0f} samples/s (median of {repeats})")
            print(f"dtrain fit:            {samples / o:10.0f} samples/s (median of {repeats}, incl. eval + logging)")
            c = statistics.median(checked)
            print(f"dtrain fit + stop check:{samples / c:10.0f} samples/s (median of {repeats})")
            print(f"ratio dtrain / hand-written: {h / o:.3f}")
            print(f"ratio with the per-step stop check / without: {o / c:.3f}")
            print(f"ratio train.on_nonfinite=stop / ignore: {o / statistics.median(stop):.3f}")
            print(f"ratio train.on_nonfinite=skip / ignore: {o / statistics.median(skip):.3f}")
            e = statistics.median(ema)
            steps = EPOCHS * loaders.train.steps_per_epoch
            print(f"ratio with ema.decay / without: {o / e:.3f} ({(e - o) / steps * 1e3:.3f} ms a step, the "
                  "average's evals included)")


if __name__ == "__main__":
    main()
