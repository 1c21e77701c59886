"""N processes x batch B x accumulation K must train exactly like one process with the global batch.

Each configuration is a real `torchrun --standalone` job on gloo. The
reference is the 1-process, batch-60, K=1 run; every other run with a global
batch of 60 must log the same per-step and per-epoch losses (relative
difference < 1e-5), the same eval, and end with the same weights (rtol 1e-4).

N=1000 leaves a short last window (1000 = 16 x 60 + 40) and is not divisible
by 3; N=1001 is divisible by none of 2, 3 and 4, so DistributedSampler pads
every multi-rank epoch with repeats, which must count nowhere. (2, 10, 3) on
1001 even gives rank 1 a last micro-batch that is nothing but a repeat.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dtrain, records, rel_diff

pytestmark = pytest.mark.multiproc

SIZES = (1000, 1001)
# (world size W, per-process batch B, accumulation K); all have W*B*K = 60.
RUNS = [(3, 20, 1), (3, 10, 2), (4, 15, 1), (2, 10, 3)]
WORST: dict[tuple[int, int, int, int], float] = {}


def _common(n: int) -> list[str]:
    return ["data.name=synthetic", f"data.train_size={n}", "data.eval_size=101", "train.epochs=2",
            "train.seed=7", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "log.every_steps=1"]


def _train(root: Path, n: int, w: int, b: int, k: int, extra: tuple[str, ...] = ()) -> Path:
    out = root / f"n{n}_w{w}_b{b}_k{k}"
    dtrain(w if w > 1 else 0, [*_common(n), f"data.batch_size={b}", f"train.grad_accum_steps={k}",
                               f"output_dir={out}", *extra])
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("ref")
    return {n: _train(root, n, 1, 60, 1) for n in SIZES}


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
    assert worst < 1e-5, worst
    wa = torch.load(ref / "model.pt")
    wb = torch.load(other / "model.pt")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    return worst


@pytest.mark.parametrize("n", SIZES)
def test_reference_run_is_sane(references: dict[int, Path], n: int) -> None:
    train = records(references[n], "train")
    # 60 per step: 16 full steps and a short one, twice.
    assert len(train) == 34 and [r["samples"] for r in train[:17]] == [60] * 16 + [n - 960]
    assert [r["samples"] for r in records(references[n], "train_epoch")] == [n, n]
    assert train[-1]["loss"] < train[0]["loss"]
    assert records(references[n], "eval")[-1]["samples"] == 101


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("w, b, k", RUNS, ids=[f"W{w}xB{b}xK{k}" for w, b, k in RUNS])
def test_same_losses_and_weights_as_one_big_batch(references: dict[int, Path], tmp_path: Path, n: int,
                                                  w: int, b: int, k: int) -> None:
    worst = _assert_same_run(references[n], _train(tmp_path, n, w, b, k))
    print(f"N={n} W={w} B={b} K={k}: largest relative loss difference {worst:.2e}")


@pytest.mark.timeout(240)
def test_the_dataloader_path_trains_like_the_fast_path(references: dict[int, Path], tmp_path: Path) -> None:
    """The references take the in-memory fast path (the default for synthetic data); the DataLoader must agree."""
    worst = _assert_same_run(references[1001], _train(tmp_path, 1001, 2, 10, 3, ("data.fast_path=false",)))
    print(f"DataLoader path, N=1001 W=2 B=10 K=3: largest relative loss difference {worst:.2e}")
