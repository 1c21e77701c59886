"""GPU-only checks (NCCL, CUDA autocast, fp16 GradScaler). Skipped without CUDA."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from dtrain.config import load_config
from dtrain.data.builtin import build_datasets
from dtrain.data.loaders import build_loaders
from dtrain.data.source import Window
from dtrain.runtime.dist import distributed
from dtrain.runtime.env import LaunchInfo
from dtrain.loop.meters import Meter
from dtrain.models.builtin import build_model
from dtrain.setup import build_train_state
from dtrain.loop.step import train_step
from dtrain.loop.task import build_task
from helpers import dtrain, records

CE = build_task("cross_entropy", [], "input", "target")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nccl_one_gpu_trains(tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    dtrain(1, [f"train.precision={precision}", "train.epochs=10", f"output_dir={out}"],
           env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")})
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["backend"] == "nccl" and runtime["device"] == "cuda:0"
    assert runtime["precision"] == precision
    train = records(out, "train")
    assert train[-1]["loss"] < train[0]["loss"] and "peak_memory_gb" in train[0]
    assert records(out, "eval")[-1]["accuracy"] > 0.85


@pytest.mark.timeout(120)
def test_fp16_overflow_skips_the_step_and_lowers_the_scale() -> None:
    cfg = load_config(None, ["data.name=synthetic", "train.precision=fp16", "optim.momentum=0.0"])
    with distributed(LaunchInfo("single", 0, 0, 1, "127.0.0.1", None), "nccl", "cuda") as ds:
        data = build_datasets(cfg.data, 0)
        loaders = build_loaders(data, cfg.data, 0, ds, 1)
        loop, _ = build_train_state(cfg, ds, build_model(cfg.model, data.input_shape, data.num_classes), 100)
        scaler = loop.precision.scaler
        assert scaler is not None
        batch = next(iter(loaders.train.batches))
        window = Window([batch], [len(batch[1])], len(batch[1]), 0.0, 0)
        meter = Meter(ds.device)
        train_step(loop, CE, window, meter)
        assert loop.skipped_steps == 0
        before = {k: v.clone() for k, v in loop.module.state_dict().items()}
        lr_before = loop.optimizer.param_groups[0]["lr"]
        # A scale fp16 cannot hold forces inf gradients.
        scaler.update(new_scale=2.0 ** 120)
        scale = scaler.get_scale()
        train_step(loop, CE, window, meter)
        assert loop.skipped_steps == 1 and scaler.get_scale() < scale
        for k, v in loop.module.state_dict().items():
            assert torch.equal(v, before[k]), k  # the skipped step changed nothing
        assert loop.scheduler.last_epoch == 1 and loop.optimizer.param_groups[0]["lr"] == lr_before


def _syncs_in_five_steps(overrides: list[str], guard_mode: Optional[str] = None) -> tuple[int, list[str]]:
    """The step reached and CUDA's sync-debug warnings over steps 2-6 of train_step (the first step
    is left out: lazy initialisation and optimizer state creation may sync)."""
    from dtrain.loop.nonfinite import NonFiniteGuard

    cfg = load_config(None, ["data.name=synthetic", "train.grad_accum_steps=2", *overrides])
    with distributed(LaunchInfo("single", 0, 0, 1, "127.0.0.1", None), "nccl", "cuda") as ds:
        data = build_datasets(cfg.data, 0)
        loaders = build_loaders(data, cfg.data, 0, ds, cfg.train.grad_accum_steps)
        loop, _ = build_train_state(cfg, ds, build_model(cfg.model, data.input_shape, data.num_classes), 100)
        windows = list(loaders.train.windows(0))
        meter = Meter(ds.device)
        guard = NonFiniteGuard(guard_mode, 10, ds.device) if guard_mode else None
        train_step(loop, CE, windows[0], meter, guard)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for window in windows[1:6]:
                    train_step(loop, CE, window, meter, guard)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return loop.step, [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("precision, allowed", [("fp32", 0), ("bf16", 0), ("fp16", 1)])
def test_host_syncs_per_step(precision: str, allowed: int) -> None:
    """CUDA's sync debug mode warns on every device-to-host sync; count them inside train_step.

    fp32 and bf16 never sync between logging steps; fp16 reads GradScaler's
    found-inf flag once per optimizer step, and nothing else.
    """
    step, syncs = _syncs_in_five_steps([f"train.precision={precision}", "train.grad_clip=1.0"])
    assert step == 6
    assert len(syncs) <= allowed * 5, syncs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, optim", [("stop", "sgd"), ("skip", "sgd"), ("skip", "adamw")])
def test_watching_for_nonfinite_costs_no_host_sync_per_step(mode: str, optim: str) -> None:
    """train.on_nonfinite's guard keeps its flags on the device; with skip, AdamW is built capturable so
    that undoing a step needs no read of its CPU step counter (dtrain/loop/nonfinite.py)."""
    step, syncs = _syncs_in_five_steps([f"train.on_nonfinite={mode}", f"optim.name={optim}"], guard_mode=mode)
    assert step == 6 and not syncs, syncs
