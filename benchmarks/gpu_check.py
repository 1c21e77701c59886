"""Every GPU check of the project in one call: what a session lent a GPU runs, once, and reports.

    python benchmarks/gpu_check.py --out DIR        # on a GPU machine: under 10 minutes on one device
    python benchmarks/gpu_check.py --smoke          # tiny windows: checks the script itself (CI, on CPU)

In order, each in its own processes:
1. `pytest -m gpu` over the whole suite: passed, failed and skipped, with the reasons for skips.
2. Throughput at one process: dtrain (`python -m dtrain`, as a user runs it) on the benchmark MLP and CNN
   (benchmarks/bench_data.py) in fp32, bf16 and fp16, K=1 and K=4, against the hand-written loop
   (benchmarks/bench_loops.py) in fp32: samples/s, the ratio, peak memory (CUDA's allocator, from
   dtrain's own train records) and MFU (FLOPs counted by torch's FlopCounterMode on one forward, times
   3 for the backward, over the device's peak for that precision; --peak-tflops to give your own).
3. benchmarks/loop_overhead.py at one process: dtrain's loop against the hand-written one in one process,
   and the cost of the stop check, the non-finite guard and EMA.
4. benchmarks/gpt.py: the built-in GPT through dtrain against nanoGPT's loop written by hand (tokens/s, the
   ratio, MFU, peak memory), at nanoGPT's GPU shakespeare_char size in bf16 on a GPU.
5. benchmarks/fsdp2.py: dist.strategy=fsdp2 against ddp through dtrain. With 2 GPUs or more: a GPT whose DDP
   footprint does not fit each rank's capped share of its GPU, trained by FSDP2 (the cap emulates the shortage),
   and the speed of a small GPT at one rank per GPU, bf16. With one GPU: only the speed part, at one rank, where
   dtrain trains fsdp2 unsharded (it says so). Without CUDA: --quick on CPU (2 gloo ranks).

Without CUDA, whatever needs a GPU is reported as skipped with the reason, and the rest runs in smoke
size, so this script cannot rot before a GPU is lent. The report is printed as Markdown and written to
DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import compare  # noqa: E402

# Dense peak FLOP/s by device name and precision, from the vendors' data sheets (fp32 without TF32,
# which torch leaves off for matmuls by default). Anything else: pass --peak-tflops.
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
    "H100": {"fp32": 67.0, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "bf16": 362.1, "fp16": 362.1},
}
# (warm-up, timed) micro-batches for the throughput runs.
WINDOWS = {"mlp": (32, 1600), "cnn": (16, 480)}
SMOKE_WINDOWS = {"mlp": (4, 16), "cnn": (2, 4)}


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16=torch.cuda.is_bf16_supported())
    return info


def peak_flops(name: Optional[str], precision: str, override: Optional[float]) -> tuple[Optional[float], str]:
    if override:
        return override * 1e12, "--peak-tflops"
    if not name:
        return None, "no peak FLOP/s is known for a CPU, so no MFU"
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision] * 1e12, f"{key} {precision} data sheet"
    return None, f"no peak FLOP/s known for {name}: pass --peak-tflops"


def flops_per_sample(workload: str) -> float:
    """Forward FLOPs of one sample counted by torch, times 3: the backward costs about twice the forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_loops import build

    model = build(workload).cpu()
    x = torch.zeros(8, *((784,) if workload == "mlp" else (3, 32, 32)))
    with FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops() / 8


def run_pytest(out: Path, timeout_s: float) -> dict[str, Any]:
    xml = out / "pytest-gpu.xml"
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", "tests"], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    reasons: dict[str, int] = {}
    if xml.exists():
        import xml.etree.ElementTree as ET

        for case in ET.parse(xml).getroot().iter("testcase"):
            kinds = [child.tag for child in case]
            if "skipped" in kinds:
                counts["skipped"] += 1
                why = case.find("skipped").get("message", "")  # type: ignore[union-attr]
                reasons[why] = reasons.get(why, 0) + 1
            elif "failure" in kinds:
                counts["failed"] += 1
            elif "error" in kinds:
                counts["errors"] += 1
            else:
                counts["passed"] += 1
    # 5: nothing selected. Any other code with no failure counted (pytest crashed, no XML) is a failure too.
    crashed = res.returncode not in (0, 5) and not (counts["failed"] or counts["errors"])
    return {"exit": res.returncode, **counts, "errors": counts["errors"] + crashed, "skip_reasons": reasons,
            "seconds": round(time.monotonic() - start, 1),
            "tail": res.stdout[-3000:] + res.stderr[-2000:] if res.returncode not in (0, 5) else ""}


def run_throughput(cuda: bool, name: Optional[str], smoke: bool, peak_override: Optional[float]) -> dict[str, Any]:
    windows = SMOKE_WINDOWS if smoke else WINDOWS
    precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
    workloads = ["mlp"] if smoke else ["mlp", "cnn"]
    rows, skipped = [], []
    if not cuda:
        skipped.append("bf16 and fp16 throughput: need a CUDA device (fp16 is refused on CPU)")
    if smoke:
        skipped.append("the CNN workload: smoke size runs the MLP only")
    for workload in workloads:
        warm, timed = windows[workload]
        flops = flops_per_sample(workload)
        hand = compare.run_loop("hand", workload, 1, warm, timed)
        for k in (1, 4):
            base = hand[f"K{k}"]["samples_per_s"]
            rows.append({"workload": workload, "loop": "hand-written", "precision": "fp32", "K": k,
                         "samples_per_s": base})
            for precision in precisions:
                got = compare.run_dtrain(workload, 1, k, warm, timed, [f"train.precision={precision}"])
                peak, source = peak_flops(name, precision, peak_override)
                rows.append({"workload": workload, "loop": "dtrain", "precision": precision, "K": k,
                             "samples_per_s": got["samples_per_s"],
                             "vs_hand_fp32": got["samples_per_s"] / base,
                             "peak_memory_gb": got.get("peak_memory_gb"),
                             "mfu": got["samples_per_s"] * flops / peak if peak else None, "mfu_basis": source})
    return {"rows": rows, "skipped": skipped}


def run_loop_overhead(smoke: bool, timeout_s: float) -> dict[str, Any]:
    args = ["--samples", "2000", "--repeats", "1"] if smoke else ["--repeats", "3"]
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loop_overhead.py"), *args], cwd=REPO,
                         capture_output=True, text=True, env=compare._env(), timeout=timeout_s)
    if res.returncode != 0:
        return {"exit": res.returncode, "tail": res.stderr[-3000:]}
    ratios = {m.group(1): float(m.group(2)) for m in re.finditer(r"^ratio (.+?): ([0-9.]+)", res.stdout, re.M)}
    return {"exit": 0, "ratios": ratios, "output": res.stdout}


def run_gpt(cuda: bool, smoke: bool, out: Path, timeout_s: float) -> dict[str, Any]:
    """benchmarks/gpt.py: dtrain's GPT against nanoGPT's loop by hand; tokens/s, the ratio, MFU, peak memory."""
    args = ["--quick"] if smoke else (["--gpu-size"] if cuda else [])
    path = out / "gpt.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpt.py"), *args, "--json", str(path)], cwd=REPO,
                         capture_output=True, text=True, env=compare._env(), timeout=timeout_s)
    if res.returncode != 0 or not path.exists():
        return {"exit": res.returncode or 1, "tail": res.stdout[-2000:] + res.stderr[-2000:]}
    return {"exit": 0, **json.loads(path.read_text()), "output": res.stdout}


def run_fsdp2(cuda: bool, smoke: bool, out: Path, timeout_s: float) -> dict[str, Any]:
    """benchmarks/fsdp2.py: FSDP2 against DDP through dtrain, the memory each rank holds and the speed cost."""
    import torch

    args = ["--quick"] if smoke else (["--gpu-size"] if cuda else [])
    if cuda and torch.cuda.device_count() < 2:
        args += ["--repeats", "1"]  # one rank: both strategies train the same unsharded process; once says so
    path = out / "fsdp2.json"
    # Its own budget a little inside ours, so that it reports what it measured rather than being killed.
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fsdp2.py"), *args, "--out", str(out),
                          "--budget-s", str(int(0.9 * timeout_s))], cwd=REPO, capture_output=True, text=True,
                         env=compare._env(), timeout=timeout_s)
    if res.returncode != 0 or not path.exists():
        return {"exit": res.returncode or 1, "tail": res.stdout[-2000:] + res.stderr[-2000:]}
    return {"exit": 0, **json.loads(path.read_text()), "output": res.stdout}


def report(result: dict[str, Any]) -> str:
    dev, lines = result["device"], []
    where = (f"{dev['name']} ({dev['memory_gb']} GiB, {dev['count']} device(s))" if dev["cuda"]
             else "no CUDA device: GPU parts skipped, the rest at smoke size")
    lines.append(f"# GPU check: {where}, torch {dev['torch']}, {result['seconds']:.0f} s\n")
    t = result["pytest"]
    lines.append(f"pytest -m gpu: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                 f"{t['skipped']} skipped ({t['seconds']} s)")
    lines += [f"- skipped {n}: {why}" for why, n in t["skip_reasons"].items()]
    if "problem" in t:
        lines.append(f"- problem: {t['problem']}")
    if t["tail"]:
        lines.append("```\n" + t["tail"] + "\n```")
    lines.append("\n| workload | loop | precision | K | samples/s | / hand fp32 | peak memory GB | MFU |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["throughput"]["rows"]:
        ratio = f"{r['vs_hand_fp32']:.3f}" if "vs_hand_fp32" in r else ""
        mem = f"{r['peak_memory_gb']:.2f}" if r.get("peak_memory_gb") is not None else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        lines.append(f"| {r['workload']} | {r['loop']} | {r['precision']} | {r['K']} | {r['samples_per_s']:,.0f} | "
                     f"{ratio} | {mem} | {mfu} |")
    bases = {r["mfu_basis"] for r in result["throughput"]["rows"] if "mfu_basis" in r}
    lines += [f"- MFU: {b}" for b in sorted(bases)]
    lines += [f"- skipped: {s}" for s in result["throughput"]["skipped"]]
    lines += [f"- throughput problem: {result['throughput']['problem']}"] if "problem" in result["throughput"] else []
    overhead = result["loop_overhead"]
    lines.append("\nloop_overhead.py, one process:")
    lines += ([f"- {k}: {v:.3f}" for k, v in overhead["ratios"].items()] if overhead["exit"] == 0
              else [f"- failed (exit {overhead['exit']}): {overhead.get('problem', '')}\n```\n{overhead['tail']}\n```"])
    gpt = result["gpt"]
    lines.append("\nbenchmarks/gpt.py (dtrain's GPT against nanoGPT's loop by hand, one process):")
    lines += ([f"- {line}" for line in gpt["output"].splitlines()] if gpt["exit"] == 0
              else [f"- failed (exit {gpt['exit']}): {gpt.get('problem', '')}\n```\n{gpt['tail']}\n```"])
    fsdp2 = result["fsdp2"]
    lines.append("\nbenchmarks/fsdp2.py (fsdp2 against ddp through dtrain):")
    lines += ([("##" + line if line.startswith("#") else line) for line in fsdp2["output"].splitlines()]
              if fsdp2["exit"] == 0
              else [f"- failed (exit {fsdp2['exit']}): {fsdp2.get('problem', '')}\n```\n{fsdp2['tail']}\n```"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where gpu_check.json goes (default $OUT)")
    parser.add_argument("--smoke", action="store_true", help="tiny windows (implied without CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU, if not in the table")
    parser.add_argument("--budget-s", type=float, default=540, help="the whole check's time limit (default 540 s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    dev = device_info()
    smoke = args.smoke or not dev["cuda"]
    result: dict[str, Any] = {"device": dev, "smoke": smoke, "seconds": 0.0}
    deadline = start + args.budget_s

    def phase(name: str, share: float, run: Callable[[float], Any], empty: Any, keep: float = 0.0) -> None:
        """One phase within its share of what is left of the budget, less `keep` seconds held back for the phases
        after it; its result saved at once, so a device lost or a phase timed out later still leaves what was
        measured."""
        left = deadline - time.monotonic()
        try:
            if left < 30:
                raise TimeoutError(f"skipped: {left:.0f} s of the budget left")
            result[name] = run(max(30.0, min(share * left, left - keep)))
        except (subprocess.TimeoutExpired, TimeoutError, SystemExit) as exc:
            result[name] = {**empty, "problem": f"{type(exc).__name__}: {exc}"[:2000]}
        result["seconds"] = time.monotonic() - start
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    phase("pytest", 0.4, lambda s: run_pytest(out, s),
          {"exit": -1, "passed": 0, "failed": 0, "errors": 1, "skipped": 0, "skip_reasons": {}, "seconds": 0,
           "tail": ""})
    phase("throughput", 0.5, lambda s: run_throughput(dev["cuda"], dev.get("name"), smoke, args.peak_tflops),
          {"rows": [], "skipped": []})
    phase("loop_overhead", 0.4, lambda s: run_loop_overhead(smoke, s), {"exit": -1, "tail": ""})
    # Held back for fsdp2 after it: its memory part runs only with 2 GPUs; one GPU took 42 s on an H200.
    fsdp2_keep = 150 if dev.get("count", 0) >= 2 else 60
    phase("gpt", 1.0, lambda s: run_gpt(dev["cuda"], smoke, out, s), {"exit": -1, "tail": ""}, keep=fsdp2_keep)
    phase("fsdp2", 1.0, lambda s: run_fsdp2(dev["cuda"], smoke, out, s), {"exit": -1, "tail": ""})
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(report(result), flush=True)
    failed = (result["pytest"]["failed"] + result["pytest"]["errors"] or result["loop_overhead"]["exit"]
              or result["gpt"]["exit"] or result["fsdp2"]["exit"] or "problem" in result["throughput"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
