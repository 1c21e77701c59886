"""benchmarks/gpu_check.py, the one call a session lent a GPU makes: on this CPU machine it must run to
the end, say what it skipped and why, and produce the figures it can, so that it has not rotted by
the time a GPU is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, child_env

sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def test_mfu_counts_the_mlps_multiply_adds_three_times() -> None:
    # 784-512-512-10: one multiply-add (2 FLOPs) per weight forward, twice that backward.
    weights = 784 * 512 + 512 * 512 + 512 * 10
    assert gpu_check.flops_per_sample("mlp") == pytest.approx(3 * 2 * weights)


def test_peak_flops_from_the_table_an_override_or_none_on_cpu() -> None:
    assert gpu_check.peak_flops("NVIDIA H200", "bf16", None) == (989.4e12, "H200 bf16 data sheet")
    assert gpu_check.peak_flops("NVIDIA H200", "bf16", 100.0)[0] == 100e12
    assert gpu_check.peak_flops(None, "fp32", None)[0] is None
    peak, why = gpu_check.peak_flops("Some Future GPU", "fp32", None)
    assert peak is None and "--peak-tflops" in why


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; on a GPU the script is run for real")
def test_runs_on_cpu_and_says_what_it_skipped(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    t = got["pytest"]
    assert t["skipped"] >= 5 and t["passed"] == t["failed"] == t["errors"] == 0, t
    assert set(t["skip_reasons"]) == {"needs a CUDA device"}, t
    rows = got["throughput"]["rows"]
    assert {(r["loop"], r["K"]) for r in rows} == {("hand-written", 1), ("hand-written", 4), ("dtrain", 1),
                                                   ("dtrain", 4)}
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["mfu"] is None and "CPU" in r["mfu_basis"] for r in rows if r["loop"] == "dtrain")
    assert set(got["loop_overhead"]["ratios"]) >= {"dtrain / hand-written", "with ema.decay / without"}
    assert "skipped: bf16 and fp16 throughput: need a CUDA device" in res.stdout
    assert "pytest -m gpu: 0 passed, 0 failed, 0 errors" in res.stdout
    gpt = got["gpt"]
    assert gpt["exit"] == 0 and gpt["ratio"] > 0 and all(r["tokens_per_s"] > 0 for r in gpt["runs"]["dtrain"])
    assert "ratio dtrain / by hand" in res.stdout
    # benchmarks/fsdp2.py --quick: under the same per-rank cap FSDP2 trains and DDP runs out of memory.
    fsdp2 = got["fsdp2"]
    assert fsdp2["exit"] == 0, fsdp2
    runs = fsdp2["memory"]["runs"]
    assert runs["fsdp2"]["exit"] == 0 and runs["fsdp2"]["samples_per_s"] > 0, runs["fsdp2"]
    assert runs["ddp"]["exit"] != 0 and runs["ddp"]["oom"], runs["ddp"]
    assert fsdp2["speed"]["ratio"] > 0
    assert "| ddp | out of memory (needs about" in res.stdout and "EMULATED out of memory" in res.stdout
