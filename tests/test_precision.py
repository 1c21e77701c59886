"""bf16 autocast trains as well as fp32; clipping bounds the update and logs the pre-clip norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dtrain.config import DataConfig
from dtrain.data import synthetic
from dtrain.models import mlp
from helpers import dtrain, records


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
