"""Gradient accumulation reduces gradients once per optimizer step, counted by a DDP comm hook."""

from __future__ import annotations

import json

import pytest

from helpers import worker


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_one_allreduce_per_optimizer_step_with_k4() -> None:
    res = worker(2, "count_allreduce.py", ["4"])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # 200 samples / 2 ranks / batch 8 = 13 micro-batches per rank -> 4 windows (4+4+4+1).
    assert out["micro_steps"] == 13 and out["steps"] == 4
    assert out["rounds"] == out["steps"]
    # The counter does count: without no_sync every backward reduces.
    assert out["control_rounds"] == out["micro_steps"]
    print(f"K=4: {out['rounds']} all-reduces for {out['steps']} optimizer steps; "
          f"without no_sync: {out['control_rounds']} for {out['micro_steps']} micro-steps")
