"""N processes x batch B x accumulation K must train exactly like one process with the global batch.

Each configuration is a real `torchrun --standalone` job on gloo. The
reference is the 1-process, batch-64, K=1 run; every other run must log the
same per-step losses (relative difference < 1e-4), the same eval and end with
the same weights. train_size=1000 is not a multiple of 64, so the last window
of each epoch is short: this checks the per-sample loss normalisation too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dtrain, records, rel_diff

COMMON = ["data.name=synthetic", "data.train_size=1000", "data.eval_size=101", "train.epochs=2",
          "train.seed=7", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "log.every_steps=1"]

# (world size W, per-process batch B, accumulation K); all have W*B*K = 64.
RUNS = [(2, 32, 1), (4, 16, 1), (1, 16, 4), (2, 16, 2), (2, 8, 4)]


def _train(root: Path, w: int, b: int, k: int, extra: tuple[str, ...] = ()) -> Path:
    out = root / f"w{w}_b{b}_k{k}"
    dtrain(w, [*COMMON, f"data.batch_size={b}", f"train.grad_accum_steps={k}", f"output_dir={out}", *extra])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("ref"), 1, 64, 1)


def _assert_same_run(ref: Path, other: Path) -> float:
    worst = 0.0
    for split in ("train", "train_epoch", "eval"):
        a, b = records(ref, split), records(other, split)
        assert [(r["step"], r["epoch"], r["samples"]) for r in a] == \
               [(r["step"], r["epoch"], r["samples"]) for r in b], split
        for ra, rb in zip(a, b):
            worst = max(worst, rel_diff(ra["loss"], rb["loss"]))
            if split == "eval":
                assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-12)
    assert worst < 1e-4, worst
    wa = torch.load(ref / "model.pt")
    wb = torch.load(other / "model.pt")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    return worst


def test_reference_run_is_sane(reference: Path) -> None:
    train = records(reference, "train")
    # 1000 samples at 64 per step: 15 full steps and one of 40, twice.
    assert len(train) == 32 and [r["samples"] for r in train[:16]] == [64] * 15 + [40]
    assert train[-1]["loss"] < train[0]["loss"]
    assert records(reference, "eval")[-1]["samples"] == 101


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("w, b, k", RUNS, ids=[f"W{w}xB{b}xK{k}" for w, b, k in RUNS])
def test_same_losses_and_weights_as_one_big_batch(reference: Path, tmp_path: Path, w: int, b: int, k: int) -> None:
    worst = _assert_same_run(reference, _train(tmp_path, w, b, k))
    print(f"W={w} B={b} K={k}: largest relative loss difference {worst:.2e}")
