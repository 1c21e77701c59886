"""GPU-only checks (NCCL, CUDA autocast, fp16 GradScaler). Skipped without CUDA."""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

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
        # Only the per-operation warnings count; the mode also warns once that it is a prototype.
        return loop.step, [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]


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


@contextmanager
def _one_rank_nccl() -> Iterator[torch.device]:
    """An NCCL process group of one rank on GPU 0, built by hand (no launcher, no rendezvous: an in-memory store)."""
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _fsdp2(module: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    from dtrain.parallel.fsdp2 import FSDP2Strategy

    cfg = load_config(None, ["dist.strategy=fsdp2"]).dist
    return FSDP2Strategy(cfg, device, 1, precision).wrap(module)


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@pytest.mark.timeout(120)
def test_fsdp2_bf16_keeps_fp32_weights_computes_in_bf16_and_steps_like_a_bf16_copy() -> None:
    """FSDP2's mixed-precision policy under train.precision=bf16: fp32 parameters and gradients, a bf16 forward. The
    reference is a plain bf16 copy of the same model: the same output, and its bf16 gradient (in fp32) is the step."""
    from workers.fsdp2_models import build

    with _one_rank_nccl() as device:
        torch.manual_seed(0)
        plain = build((16,), 5).to(device)
        ref = copy.deepcopy(plain).to(torch.bfloat16)
        start = {n: p.detach().clone() for n, p in plain.named_parameters()}
        model = _fsdp2(plain, device, "bf16")
        x = torch.randn(8, 16, device=device)
        out = model(x)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert out.dtype == torch.bfloat16
        ref_out = ref(x.to(torch.bfloat16))
        torch.testing.assert_close(out, ref_out)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out.float().square().mean().backward()
        ref_out.float().square().mean().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
        after = _full(model)
        for name, p in ref.named_parameters():
            if p.grad is None:  # the frozen layer
                assert torch.equal(after[name], start[name]), name
                continue
            # The update itself, to bf16's precision: FSDP2's gathered weights may sit at other alignments, for which
            # cuBLAS may pick other kernels than for the copy's.
            torch.testing.assert_close(after[name] - start[name], -0.1 * p.grad.float(), rtol=1.6e-2, atol=1e-6)
            assert not torch.equal(after[name], start[name]), name


@pytest.mark.timeout(120)
def test_fsdp2_fp16_sharded_scaler_skips_a_step_with_an_inf_gradient_and_halves_the_scale() -> None:
    from dtrain.loop.precision import sharded_scaler
    from workers.fsdp2_models import build

    with _one_rank_nccl() as device:
        torch.manual_seed(0)
        model = _fsdp2(build((16,), 5).to(device), device, "fp16")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = sharded_scaler(device)
        x = torch.randn(8, 16, device=device)
        seen = []
        for poison in (True, False):
            before = _full(model)
            opt.zero_grad()
            out = model(x)
            assert out.dtype == torch.float16
            # A small loss: times the scaler's 65536 its fp16 gradients must not overflow by themselves.
            scaler.scale(out.float().mean() * 1e-2).backward()
            if poison:
                grad = next(p.grad for p in model.parameters() if p.grad is not None)
                grad.to_local().view(-1)[0] = float("inf")
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            after = _full(model)
            seen.append((scale, scaler.get_scale(), any(not torch.equal(after[n], before[n]) for n in before)))
        assert seen[0] == (65536.0, 32768.0, False)  # skipped: nothing moved, the scale halved
        assert seen[1] == (32768.0, 32768.0, True)  # a clean step updates and keeps the scale


@pytest.mark.multiproc
@pytest.mark.timeout(400)
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices (one per NCCL rank)")
def test_fsdp2_trains_like_ddp_on_two_gpus(tmp_path: Path) -> None:
    """2 ranks on 2 GPUs (NCCL): fsdp2 against ddp, same data, batch and clipping: the same losses and weights."""
    common = ["data.name=synthetic", "data.train_size=600", "data.eval_size=101", "data.batch_size=10",
              "train.epochs=2", "train.seed=7", "train.grad_clip=0.5", "optim.name=sgd", "optim.lr=0.1",
              "optim.momentum=0.9", "log.every_steps=1", "log.progress=none", "train.device=cuda",
              "model.name=tests.workers.fsdp2_models:build"]
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        runs[strategy] = tmp_path / strategy
        dtrain(2, [*common, f"dist.strategy={strategy}", f"output_dir={runs[strategy]}"], timeout=300)
    assert yaml.safe_load((runs["fsdp2"] / "config.yaml").read_text())["runtime"]["backend"] == "nccl"
    for split in ("train", "eval"):
        a, b = records(runs["ddp"], split), records(runs["fsdp2"], split)
        assert [(r["step"], r["samples"]) for r in a] == [(r["step"], r["samples"]) for r in b], split
        for ra, rb in zip(a, b):
            assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * max(abs(ra["loss"]), 1e-12), (split, ra, rb)
    wa, wb = torch.load(runs["ddp"] / "model.pt"), torch.load(runs["fsdp2"] / "model.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
