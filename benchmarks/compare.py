"""dtrain as a user runs it, against a hand-written DDP loop and against Accelerate, side by side.

    python benchmarks/compare.py            # about 15 minutes on 2 CPU cores
    python benchmarks/compare.py --quick    # a few minutes: shorter timed windows

Workloads: the MLP 784-512-512-10 on 60,000 in-memory samples and dtrain's
`cnn` on 3x32x32 images (benchmarks/bench_data.py), batch 64 per process, SGD
with momentum, at 1 and 2 processes (torchrun, gloo), with K=1 and K=4
micro-batches per optimizer step. dtrain runs as `python -m dtrain` /
`torchrun -m dtrain` with its defaults (the in-memory fast path is automatic),
and with `dist.grad_compression=bf16` for the MLP on 2 processes; its
throughput and data-wait fraction are read from its own metrics.jsonl (train
records after the warm-up window). The other loops are benchmarks/bench_loops.py.
Every process gets one thread (OMP_NUM_THREADS=1): 1 process uses one core and
2 processes two, so scaling efficiency says what the second core bought.

All runs of one repeat are launched one after another, repeat after repeat
(interleaved, so a slow spell of the machine hits every variant alike); the
tables show medians over the repeats (at least 3). The compute floor is the
plain model's forward, backward and step on batches sliced beforehand, in one
process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# (warm-up micro-batches, timed micro-batches): the warm-up is dtrain's first log window.
WINDOWS = {"mlp": (16, 320), "cnn": (4, 48)}
QUICK_WINDOWS = {"mlp": (16, 96), "cnn": (4, 16)}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(world: int, args: list[str]) -> str:
    prefix = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={world}"]
    res = subprocess.run([*prefix, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(args)}\n{res.stderr[-3000:]}")
    return res.stdout


def run_dtrain(workload: str, world: int, k: int, warm: int, timed: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        steps_warm, steps_timed = warm // k, timed // k
        args = ["-m", "dtrain", f"data.name=benchmarks.bench_data:{workload}", f"model.name={workload}",
                "data.batch_size=64", f"train.grad_accum_steps={k}", f"train.max_steps={steps_warm + steps_timed}",
                f"log.every_steps={steps_warm}", "optim.lr=0.05", "optim.momentum=0.9", "log.progress=none",
                "train.save_model=false", f"output_dir={out}", *extra]
        if workload == "mlp":
            args.append("model.hidden=[512,512]")
        _launch(world, args)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][1:]  # the first window is the warm-up
    seconds = [r["samples"] / r["samples_per_s"] for r in train]
    peaks = [r["peak_memory_gb"] for r in train if "peak_memory_gb" in r]  # logged on CUDA only
    return {"samples_per_s": sum(r["samples"] for r in train) / sum(seconds),
            "data_fraction": sum(r["data_time_fraction"] * s for r, s in zip(train, seconds)) / sum(seconds),
            **({"peak_memory_gb": max(peaks)} if peaks else {})}


def run_loop(impl: str, workload: str, world: int, warm: int, timed: int) -> dict[str, Any]:
    out = _launch(world, [str(REPO / "benchmarks" / "bench_loops.py"), impl, workload, str(warm), str(timed)])
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, 1 thread per process"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timed windows (a few minutes in all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="mlp,cnn")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="print the tables of earlier --json files instead of running (several: their repeats "
                             "pooled)")
    args = parser.parse_args()
    if args.report:
        pooled: dict[tuple[str, int, int, str], list[dict[str, float]]] = {}
        for path in args.report:  # each file's repeats in order, so a repeat's runs stay paired
            for key, runs in json.loads(Path(path).read_text()).items():
                w, p, k, name = key.split(" ", 3)
                pooled.setdefault((w, int(p), int(k), name), []).extend(runs)
        report(pooled, "(from " + ", ".join(args.report) + ")")
        return
    windows = QUICK_WINDOWS if args.quick else WINDOWS
    samples: dict[tuple[str, int, int, str], list[dict[str, float]]] = {}
    started = time.monotonic()
    for rep in range(max(3, args.repeats)):  # medians of at least 3
        for workload in args.workloads.split(","):
            warm, timed = windows[workload]
            for world in (1, 2):
                for k in (1, 4):
                    samples.setdefault((workload, world, k, "dtrain"), []).append(
                        run_dtrain(workload, world, k, warm, timed, []))
                    if workload == "mlp" and world == 2:
                        samples.setdefault((workload, world, k, "dtrain bf16"), []).append(
                            run_dtrain(workload, world, k, warm, timed, ["dist.grad_compression=bf16"]))
                for impl in ("hand", "accelerate"):
                    got = run_loop(impl, workload, world, warm, timed)
                    for key, value in got.items():
                        k = 1 if key in ("K1", "floor") else 4
                        samples.setdefault((workload, world, k, impl if key != "floor" else "floor"), []).append(value)
        print(f"repeat {rep + 1} done after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    report(samples, machine())
    if args.json:
        Path(args.json).write_text(json.dumps({" ".join(map(str, k)): v for k, v in samples.items()}, indent=1))


def report(samples: dict[tuple[str, int, int, str], list[dict[str, float]]], where: str) -> None:
    def med(key: tuple[str, int, int, str], field: str = "samples_per_s") -> float:
        runs = samples.get(key)
        return statistics.median(r[field] for r in runs) if runs else float("nan")

    def ratio(a: tuple[str, int, int, str], b: tuple[str, int, int, str], times: float = 1.0) -> float:
        """The median of the repeats' own ratios: a slow spell of the machine hits both runs of a repeat."""
        pairs = zip(samples.get(a, []), samples.get(b, []))
        return statistics.median([x["samples_per_s"] / (times * y["samples_per_s"]) for x, y in pairs] or [math.nan])

    print(f"\nMachine: {where}. Samples/s: medians of {len(next(iter(samples.values())))} interleaved runs; "
          "ratios: medians of each repeat's own ratio.\n")
    print("| model | procs | K | dtrain | hand-written | Accelerate | dtrain / hand | dtrain / Accelerate | "
          "dtrain / floor | data wait dtrain / hand / Acc. |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload in dict.fromkeys(k[0] for k in samples):
        floor = med((workload, 1, 1, "floor"))
        for world in (1, 2):
            for k in (1, 4):
                names = ["dtrain"] + (["dtrain bf16"] if (workload, world, k, "dtrain bf16") in samples else [])
                for name in names:
                    d, h, a = (med((workload, world, k, n)) for n in (name, "hand", "accelerate"))
                    mine = (workload, world, k, name)
                    vs_hand = ratio(mine, (workload, world, k, "hand"))
                    vs_acc = ratio(mine, (workload, world, k, "accelerate"))
                    vs_floor = ratio(mine, (workload, 1, 1, "floor"), world)
                    waits = " / ".join(f"{med((workload, world, k, n), 'data_fraction'):.1%}"
                                       for n in (name, "hand", "accelerate"))
                    print(f"| {workload} | {world} | {k} | {d:,.0f}{'' if name == 'dtrain' else ' (bf16)'} | "
                          f"{h:,.0f} | {a:,.0f} | {vs_hand:.2f} | {vs_acc:.2f} | {vs_floor:.2f} | "
                          f"{waits} |")
        print(f"| {workload} | 1 | floor | {floor:,.0f} | | | | | 1.00 | |")
    print("\nScaling efficiency, 2 processes over twice 1 process (samples/s):\n")
    print("| model | K | dtrain | hand-written | Accelerate |")
    print("| --- | --- | --- | --- | --- |")
    for workload in dict.fromkeys(k[0] for k in samples):
        for k in (1, 4):
            cells = [med((workload, 2, k, n)) / (2 * med((workload, 1, k, n)))
                     for n in ("dtrain", "hand", "accelerate")]
            print(f"| {workload} | {k} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
