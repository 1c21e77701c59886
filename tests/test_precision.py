"""bf16 autocast trains as well as fp32; clipping bounds the update and logs the pre-clip norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dtrain.config import DataConfig
from dtrain.data.builtin import synthetic
from dtrain.models.builtin import mlp
from dtrain.loop.task import build_task
from helpers import dtrain, records

CE = build_task("cross_entropy", [], "input", "target")


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_bf16_matches_fp32_accuracy_on_default_config(tmp_path: Path) -> None:
    acc = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        dtrain(2, [f"train.precision={precision}", f"output_dir={out}", "log.every_steps=50"])
        runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
        assert runtime["precision"] == precision and runtime["world_size"] == 2
        acc[precision] = records(out, "eval")[-1]["accuracy"]
        losses = [r["loss"] for r in records(out, "train")]
    print(f"default config, 2 processes: fp32 accuracy {acc['fp32']:.4f}, bf16 accuracy {acc['bf16']:.4f}")
    assert acc["fp32"] >= 0.9
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.02
    # bf16 really ran: its losses are not fp32's bit for bit.
    fp32_losses = [r["loss"] for r in records(tmp_path / "fp32", "train")]
    assert losses != fp32_losses


SEED, LR, CLIP = 5, 1.0, 0.01


def _first_step_gradient_norm() -> float:
    """The full-batch gradient norm of the initial model on the first global batch, in plain torch."""
    data = synthetic(DataConfig(name="synthetic", train_size=256, eval_size=32), SEED)
    torch.manual_seed(SEED)
    model = mlp((32,), 10, (128, 64))
    # DistributedSampler shuffles with a generator seeded by seed + epoch.
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(SEED))
    x, y = data.train.tensors
    idx = perm[:64]
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("nproc, batch, k", [(0, 64, 1), (2, 16, 2)])
def test_clipping_logs_pre_clip_norm_and_bounds_the_update(tmp_path: Path, nproc: int, batch: int, k: int) -> None:
    out = tmp_path / "run"
    dtrain(nproc, ["data.name=synthetic", "data.train_size=256", "data.eval_size=32", f"train.seed={SEED}",
                   f"data.batch_size={batch}", f"train.grad_accum_steps={k}", "train.max_steps=1",
                   f"optim.lr={LR}", "optim.momentum=0.0", f"train.grad_clip={CLIP}", "log.every_steps=1",
                   "train.save_model=true", f"output_dir={out}"])
    (rec,) = records(out, "train")
    expected = _first_step_gradient_norm()
    assert expected > CLIP * 10  # the clip is active
    assert rec["grad_norm"] == pytest.approx(expected, rel=1e-4)
    torch.manual_seed(SEED)
    before = mlp((32,), 10, (128, 64)).state_dict()
    after = torch.load(out / "model.pt")
    delta = torch.cat([(after[n] - before[n]).flatten() for n in before]).norm().item()
    assert delta == pytest.approx(LR * CLIP, rel=1e-4)


# ---------------------------------------------------------------- the scaler's host reads, on CPU
# GradScaler also runs on CPU ("cpu" device), so its logic in the step is tested here; the
# CUDA-only test in test_gpu.py counts real syncs with CUDA's sync debug mode.

def _scaled_state(scale: float):  # -> (TrainState, list[Window]); a fp32 model under a CPU GradScaler
    from dtrain.config import load_config
    from dtrain.data.builtin import build_datasets
    from dtrain.data.loaders import build_loaders
    from dtrain.runtime.dist import distributed
    from dtrain.runtime.env import LaunchInfo
    from dtrain.loop.precision import Precision
    from dtrain.setup import build_train_state

    cfg = load_config(None, ["data.name=synthetic", "data.train_size=256", "train.grad_accum_steps=2",
                             "train.grad_clip=1.0", "optim.momentum=0.0"])
    ctx = distributed(LaunchInfo("single", 0, 0, 1, "127.0.0.1", None), "gloo", "cpu")
    ds = ctx.__enter__()
    data = build_datasets(cfg.data, 0)
    loaders = build_loaders(data, cfg.data, 0, ds, cfg.train.grad_accum_steps)
    torch.manual_seed(0)
    state, _ = build_train_state(cfg, ds, mlp(data.input_shape, data.num_classes), 100)
    state.precision = Precision("fp32", ds.device, torch.amp.GradScaler("cpu", init_scale=scale))
    return ctx, state, list(loaders.train.windows(0))


def test_a_scaled_step_reads_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtrain.loop.meters import Meter
    from dtrain.loop.step import train_step

    ctx, state, windows = _scaled_state(2.0 ** 8)
    try:
        meter = Meter(state.dist.device)
        train_step(state, CE, windows[0], meter)
        reads = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _name=name, _orig=original):  # type: ignore[no-untyped-def]
                reads.append(_name)
                return _orig(self, *a)

            monkeypatch.setattr(torch.Tensor, name, counted)
        for window in windows[1:4]:
            train_step(state, CE, window, meter)
        monkeypatch.undo()
        assert len(reads) == 3, reads  # one found-inf read per optimizer step, nothing else
        assert state.step == 4 and state.skipped_steps == 0 and state.scheduler.last_epoch == 4
    finally:
        ctx.__exit__(None, None, None)


def test_an_overflowing_scaled_step_is_skipped_and_counted() -> None:
    from dtrain.loop.meters import Meter
    from dtrain.loop.step import train_step

    ctx, state, windows = _scaled_state(2.0 ** 8)
    try:
        meter = Meter(state.dist.device)
        train_step(state, CE, windows[0], meter)
        before = {k: v.clone() for k, v in state.module.state_dict().items()}
        scaler = state.precision.scaler
        assert scaler is not None
        scaler.update(new_scale=float("inf"))  # every scaled gradient overflows
        train_step(state, CE, windows[1], meter)
        assert state.step == 2 and state.skipped_steps == 1
        assert state.scheduler.last_epoch == 1  # the schedule did not advance
        assert all(torch.equal(v, before[k]) for k, v in state.module.state_dict().items())
        scaler.update(new_scale=2.0 ** 8)
        train_step(state, CE, windows[2], meter)
        assert state.skipped_steps == 1 and state.scheduler.last_epoch == 2
    finally:
        ctx.__exit__(None, None, None)
