"""The loops dtrain is compared with, run by benchmarks/compare.py under torchrun (or alone for one process).

    python benchmarks/bench_loops.py {hand,accelerate} {mlp,cnn} WARM TIMED

`hand` is the hand-written DDP loop a user would write (DataLoader over a
DistributedSampler, no_sync for accumulation), and with one process it also
measures the compute floor: forward, backward and step of the plain model on
batches sliced beforehand, nothing else. `accelerate` is the same loop
through Hugging Face Accelerate (prepare, accumulate, backward). Each runs
K=1, then K=4, in this process, on the same data and model as dtrain
(benchmarks/bench_data.py, dtrain's own model builders): WARM micro-batches of
warm-up, then TIMED timed ones. Rank 0 prints one JSON line:
{"K1": {"samples_per_s", "data_fraction"}, "K4": ..., "floor": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_data  # noqa: E402
from dtrain.models.builtin import cnn, mlp  # noqa: E402

BATCH, LR, MOMENTUM = 64, 0.05, 0.9
# One GPU per process where there are GPUs (as dtrain picks), else the CPU.
CUDA = torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else torch.device("cpu")


def build(workload: str) -> nn.Module:
    torch.manual_seed(0)
    return (mlp((784,), 10, [512, 512]) if workload == "mlp" else cnn((3, 32, 32), 10)).to(device())


def batches(loader: DataLoader, sampler: Any) -> Iterator[Any]:
    epoch = 0
    while True:  # epochs without end: the timed window never stops at an epoch's edge
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def timed(step: Callable[[Any], None], source: Iterator[Any], warm: int, count: int, k: int,
          samples_per_micro: int) -> dict[str, float]:
    """Runs warm, then count micro-batches through `step` in windows of k; samples/s and the data wait."""
    for _ in range(warm // k):
        step([next(source) for _ in range(k)])
    if CUDA:  # the warm-up's kernels finish outside the timed window
        torch.cuda.synchronize()
    wait, start = 0.0, time.perf_counter()
    for _ in range(count // k):
        t = time.perf_counter()
        window = [next(source) for _ in range(k)]
        wait += time.perf_counter() - t
        step(window)
    if CUDA:  # the GPU's queue drained: the time is the work's, not its launch's
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": count // k * k * samples_per_micro / elapsed, "data_fraction": wait / elapsed}


def hand(workload: str, warm: int, count: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    if CUDA:
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if CUDA else "gloo")
    data = getattr(bench_data, workload)(0).train
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    out: dict[str, Any] = {}
    for k in (1, 4):
        model = nn.parallel.DistributedDataParallel(build(workload))
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step(window: list[Any]) -> None:
            opt.zero_grad()
            for j, (x, y) in enumerate(window):
                x, y = x.to(device(), non_blocking=True), y.to(device(), non_blocking=True)
                with model.no_sync() if j < len(window) - 1 else nullcontext():
                    (F.cross_entropy(model(x), y) / len(window)).backward()
            opt.step()

        out[f"K{k}"] = timed(step, batches(loader, sampler), warm, count, k, BATCH * world)
    if world == 1:
        out["floor"] = floor(workload, data, warm, count)
    dist.destroy_process_group()
    return out


def floor(workload: str, data: Any, warm: int, count: int) -> dict[str, float]:
    """The compute floor: the plain model on batches sliced beforehand; no loader, no DDP, no loss bookkeeping."""
    x, y = data.tensors
    sliced = [(x[where].to(device(), copy=True), y[where].to(device(), copy=True))
              for i in range(warm + count) for where in [slice(i * BATCH, (i + 1) * BATCH)]]
    model = build(workload)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(window: list[Any]) -> None:
        (xb, yb), = window
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()

    return timed(step, iter(sliced), warm, count, 1, BATCH)


def accelerate(workload: str, warm: int, count: int, world: int) -> dict[str, Any]:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not CUDA)
    data = getattr(bench_data, workload)(0).train
    out: dict[str, Any] = {}
    for k in (1, 4):
        acc.gradient_accumulation_steps = k
        model = build(workload)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        torch.manual_seed(0)
        model, opt, loader = acc.prepare(model, opt, DataLoader(data, batch_size=BATCH, shuffle=True))

        def step(window: list[Any]) -> None:
            for x, y in window:
                with acc.accumulate(model):
                    acc.backward(F.cross_entropy(model(x), y))
                    opt.step()
                    opt.zero_grad()

        out[f"K{k}"] = timed(step, batches(loader, None), warm, count, k, BATCH * world)
        acc.free_memory(model, opt, loader)
    return out


def main() -> None:
    impl, workload, warm, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and impl == "hand":  # alone: a process group of one, like dtrain's: the same loop code
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", os.environ.get("BENCH_PORT", "29517"))
    result = (hand if impl == "hand" else accelerate)(workload, warm, count, world)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
