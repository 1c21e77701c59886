"""train.on_nonfinite: a NaN at a known step stops every rank there, is skipped, or is ignored.

The model (tests/workers/nan_model.py) returns NaN at step K on one rank only; every
step sees the whole 64-sample set on 2 ranks, so the references are plain PyTorch
full-batch loops written here: the same SGD, taking or leaving out step K.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from dtrain.checkpoint import store as checkpoint
from dtrain.config import load_config
from dtrain.errors import DTrainError
from dtrain.run import train
from helpers import dtrain, records
from workers import nan_model

NAN_STEP = 5
STEPS = 8
LR, MOMENTUM = 0.5, 0.9


def _args(out: Path, mode: str, *extra: str, nproc: int = 2) -> list[str]:
    return ["model.name=tests.workers.nan_model:build", "data.name=tests.workers.nan_model:data",
            f"data.batch_size={nan_model.SAMPLES // nproc}", f"train.epochs={STEPS}", f"optim.lr={LR}",
            f"optim.momentum={MOMENTUM}",
            "log.progress=none", f"train.on_nonfinite={mode}", f"output_dir={out}", *extra]


def _reference(steps: int, skip: Optional[int] = None, optimizer: str = "sgd") -> dict[str, torch.Tensor]:
    """Plain PyTorch: seed, build, full-batch steps; step `skip` computes its gradient and is not taken."""
    x, y = nan_model.tensors()
    torch.manual_seed(0)  # train.seed: dtrain seeds right before building the model
    model = nn.Linear(nan_model.FEATURES, nan_model.CLASSES)
    opt = (torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=LR))
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step != skip:
            opt.step()
    return {f"linear.{k}": v for k, v in model.state_dict().items()}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_stop_names_the_first_nonfinite_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """NaN on rank 1 at step 5; logs at 4 and 8, checkpoints every 3: the save due at step 6 must not happen."""
    out = tmp_path / "run"
    res = dtrain(2, _args(out, "stop", "log.every_steps=4", "checkpoint.every_steps=3"),
                 env={nan_model.NAN_AT_ENV: str(NAN_STEP), nan_model.NAN_RANK_ENV: "1"}, check=False)
    assert res.returncode != 0
    logged = records(out, "train")
    assert [r["step"] for r in logged] == [4] and math.isfinite(logged[0]["loss"])
    # one line, rank 0's: every rank stops on the same agreed values, so the others say nothing
    message = (f"the loss or gradient is not finite since step {NAN_STEP} (seen at the check of step 6); the last "
               f"finite train loss logged was {logged[0]['loss']:.6g} at step 4; stopped without writing weights "
               "or a checkpoint (train.on_nonfinite=stop)")
    own = "\n".join(ln for ln in res.stderr.splitlines() if "traceback : " not in ln)  # not torchrun's report
    assert own.count("dtrain: error") == 1, res.stderr
    assert f"dtrain: error: {message}" in res.stderr, res.stderr
    assert not (out / "model.pt").exists()
    assert not (out / "checkpoints" / "finished.json").exists()
    (kept,) = checkpoint.committed(str(out))
    assert kept.step == 3
    weights = checkpoint.load(kept.path)["train"]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    _assert_close(weights, _reference(3))


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", [[], ["dist.strategy=fsdp2", "dist.shard=[Linear]"]], ids=["ddp", "fsdp2"])
def test_skip_leaves_out_exactly_that_step_on_every_rank(tmp_path: Path, strategy: list[str]) -> None:
    """Under fsdp2 the NaN reaches every rank's shard through the reduce-scatter, and the undo restores each
    rank's own shard of the weights and momentum."""
    out = tmp_path / "run"
    res = dtrain(2, _args(out, "skip", "log.every_steps=4", *strategy),
                 env={nan_model.NAN_AT_ENV: str(NAN_STEP), nan_model.NAN_RANK_ENV: "1"})
    assert res.returncode == 0
    _assert_close(torch.load(out / "model.pt"), _reference(STEPS, skip=NAN_STEP))
    logged = records(out, "train")
    assert [(r["step"], r["skipped_steps"], r["samples"]) for r in logged] == [(4, 0, 256), (8, 1, 192)]
    assert all(math.isfinite(r["loss"]) for r in logged)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_ignore_trains_on_through_the_nan(tmp_path: Path) -> None:
    out = tmp_path / "run"
    dtrain(2, _args(out, "ignore", "log.every_steps=4"),
           env={nan_model.NAN_AT_ENV: str(NAN_STEP), nan_model.NAN_RANK_ENV: "1"})
    weights = torch.load(out / "model.pt")
    assert all(torch.isnan(w).all() for w in weights.values())
    assert [r["loss"] is None for r in records(out, "train")] == [False, True]


def test_without_a_nan_every_mode_trains_like_the_reference(tmp_path: Path) -> None:
    """The reference loop is right (and the guard changes nothing) when nothing goes wrong."""
    for mode in ("stop", "skip"):
        result = train(load_config(None, _args(tmp_path / mode, mode, "log.every_steps=3", nproc=1)), environ={})
        _assert_close({k: v for k, v in result.state.module.state_dict().items()}, _reference(STEPS))


def test_skip_of_the_first_adam_step_leaves_no_optimizer_state(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam creates its state in the first step: skipped there, it must be as if that step never was."""
    monkeypatch.setenv(nan_model.NAN_AT_ENV, "1")
    result = train(load_config(None, _args(tmp_path / "run", "skip", "optim.name=adam",
                                           "log.every_steps=2", nproc=1)), environ={})
    _assert_close(dict(result.state.module.state_dict()), _reference(STEPS, skip=1, optimizer="adam"))
    steps = {int(s["step"]) for s in result.state.optimizer.state_dict()["state"].values()}
    assert steps == {STEPS - 1}


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN from step 2 on: steps 2, 3, 4 are skipped, and the check at step 4 stops the run."""
    monkeypatch.setenv(nan_model.NAN_AT_ENV, "2")
    monkeypatch.setenv(nan_model.NAN_LAST_ENV, "99")
    out = tmp_path / "run"
    with pytest.raises(DTrainError) as info:
        train(load_config(None, _args(out, "skip", "log.every_steps=4", "train.max_skipped_steps=3", nproc=1)),
              environ={})
    assert str(info.value).startswith("3 steps in a row had a non-finite gradient and were skipped (seen at the "
                                      "check of step 4)"), info.value
    assert str(info.value).endswith("(train.max_skipped_steps=3)")
    assert not (out / "model.pt").exists() and not checkpoint.committed(str(out))
    assert [(r["step"], r["skipped_steps"], r["samples"]) for r in records(out, "train")] == [(4, 3, 64)]


@pytest.mark.parametrize("clip, named", [(None, NAN_STEP + 1), (1e9, NAN_STEP)], ids=["loss-only", "clip-norm"])
def test_stop_on_a_nan_gradient_with_a_finite_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   clip: Optional[float], named: int) -> None:
    """stop reads the loss (and the norm clipping computes): a NaN gradient alone shows in the next step's loss."""
    monkeypatch.setenv(nan_model.NAN_AT_ENV, str(NAN_STEP))
    monkeypatch.setenv(nan_model.NAN_GRAD_ENV, "1")
    extra = [f"train.grad_clip={clip}"] if clip else []
    with pytest.raises(DTrainError, match=rf"not finite since step {named} \(seen at the check of step 8\)"):
        train(load_config(None, _args(tmp_path / "run", "stop", "log.every_steps=8", *extra, nproc=1)), environ={})
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("fold_at", [512, 3], ids=["one-fold", "folded-every-3"])
def test_stop_keeps_losses_on_the_host_side_and_finds_the_first_bad_one(monkeypatch: pytest.MonkeyPatch,
                                                                        fold_at: int) -> None:
    """stop notes each step's loss tensors without a device op; the check finds the earliest bad step, also
    when the list was folded on the way (long logging windows), and the loss sums match plain arithmetic."""
    from dtrain.runtime.dist import DistState
    from dtrain.loop.meters import Meter
    from dtrain.loop.nonfinite import NonFiniteGuard

    monkeypatch.setattr(NonFiniteGuard, "FOLD_AT", fold_at)
    monkeypatch.setattr(Meter, "FOLD_AT", fold_at)
    single = DistState("test", 0, 0, 1, "gloo", torch.device("cpu"))
    guard = NonFiniteGuard("stop", 3, torch.device("cpu"))
    meter = Meter(torch.device("cpu"))
    values = [0.5, 1.25, 3.0, 0.125, 2.0, 7.5, 0.25]
    for step, v in enumerate(values[:4], start=1):  # two micro-steps a step, the second one 1.0
        guard.note(step, [torch.tensor(v), torch.tensor(1.0)], None)
        meter.add(torch.tensor(v), 2)
    assert len(guard._values) < fold_at
    assert guard.pending().tolist() == [0.0]
    assert guard.settle(0.0, single, 4) == (0, None)
    for step, v in enumerate(values[4:], start=5):
        grad_norm = torch.tensor(math.inf if step == 6 else 1.0)  # clipping's norm is watched too
        guard.note(step, [torch.tensor(v)], grad_norm)
        meter.add(torch.tensor(v), 2)
    guard.note(8, [torch.tensor(math.nan)], torch.tensor(1.0))
    assert guard.pending().tolist() == [1.0]
    _, error = guard.settle(1.0, single, 8)
    assert error is not None and "not finite since step 6 (seen at the check of step 8)" in str(error)
    totals = meter.take_window(single)
    assert (totals.loss_sum, totals.samples) == (sum(values), 2 * len(values))
