"""Distributed eval counts every sample exactly once, whatever the world size.

With lr=0 the weights stay at their initial values, so the eval must equal a
single-process computation done here with plain torch, on 1, 2 and 3 ranks
(101 samples: 3 ranks get 34/34/33, and DistributedSampler would have padded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dtrain.config import DataConfig
from dtrain.data.builtin import synthetic
from dtrain.models.builtin import mlp
from helpers import dtrain, records

SEED = 11


def _expected() -> tuple[float, float]:
    data = synthetic(DataConfig(name="synthetic", train_size=300, eval_size=101), SEED)
    torch.manual_seed(SEED)  # dtrain seeds, then builds the model: same initial weights
    model = mlp((32,), 10, (128, 64))
    x, y = data.eval.tensors
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).sum().item() / len(y)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [0, 2, 3])
def test_eval_is_exact_on_any_world_size(tmp_path: Path, nproc: int) -> None:
    out = tmp_path / "run"
    dtrain(nproc, ["data.name=synthetic", "data.train_size=300", "data.eval_size=101", "data.eval_batch_size=16",
                   f"train.seed={SEED}", "train.epochs=1", "optim.lr=0.0", "optim.momentum=0.0",
                   f"output_dir={out}"])
    (ev,) = records(out, "eval")
    loss, acc = _expected()
    assert ev["samples"] == 101
    assert ev["loss"] == pytest.approx(loss, rel=1e-6)
    assert ev["accuracy"] == pytest.approx(acc, abs=1e-12)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [0, 2, 3])
def test_batchnorm_model_is_evaluated_as_the_saved_model(tmp_path: Path, nproc: int) -> None:
    """Every rank scores its eval shard with rank 0's buffers: the logged eval is model.pt's.

    After training, each rank's BatchNorm running statistics hold its own last
    batches; the logged eval must still equal a plain-torch evaluation of the
    saved model (rank 0's) on the whole eval set.
    """
    from tests.workers.bn_cnn import build

    out = tmp_path / "run"
    cfg = DataConfig(name="synthetic", train_size=301, eval_size=101, num_features=64)
    dtrain(nproc, ["data.name=synthetic", "data.train_size=301", "data.eval_size=101", "data.num_features=64",
                   "data.batch_size=10", "data.eval_batch_size=16", f"train.seed={SEED}", "train.epochs=2",
                   "optim.lr=0.1", "model.name=tests.workers.bn_cnn:build", f"output_dir={out}"])
    model = build((64,), 10)
    model.load_state_dict(torch.load(out / "model.pt"))
    model.eval()
    x, y = synthetic(cfg, SEED).eval.tensors
    with torch.no_grad():
        logits = model(x)
    loss, acc = F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).sum().item() / len(y)
    ev = records(out, "eval")[-1]
    assert ev["samples"] == 101
    assert ev["loss"] == pytest.approx(loss, rel=1e-6)
    assert ev["accuracy"] == pytest.approx(acc, abs=1e-12)
    print(f"BatchNorm CNN, W={max(nproc, 1)}: eval loss {ev['loss']:.6f} accuracy {ev['accuracy']:.4f} "
          f"(plain torch on model.pt: {loss:.6f} {acc:.4f})")
