"""The LR range test: its arithmetic, its outputs, and that its suggestion really trains."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import pytest

from dtrain.config import Config, LRFindConfig, load_config
from dtrain.errors import DTrainError
from dtrain.lr_find import Smoother, lr_at, lr_find, suggest
from dtrain.lr_find import main as lr_find_main
from dtrain.run import train
from helpers import records, rel_diff, run, torchrun


def _cfg(out: Path, overrides: Sequence[str] = ()) -> Config:
    return load_config(None, [f"output_dir={out}", *overrides])


def _csv(out: Path) -> list[dict[str, float]]:
    with open(out / "lr_find" / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"]
    return [{k: float(v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------- arithmetic


def test_lr_ramp_is_exponential_from_start_to_end() -> None:
    cfg = LRFindConfig(start_lr=1e-4, end_lr=1.0, num_steps=5)
    assert [lr_at(cfg, i) for i in range(5)] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0], rel=1e-12)


def test_smoother_is_bias_corrected_ema() -> None:
    w, xs = 0.3, [5.0, 1.0, 4.0, 2.0, 8.0]
    s = Smoother(w)
    for n in range(1, len(xs) + 1):
        # Weighted mean of the first n values with weights w(1-w)^age, normalised to sum 1.
        weights = [w * (1 - w) ** (n - 1 - j) for j in range(n)]
        want = sum(wt * x for wt, x in zip(weights, xs[:n])) / sum(weights)
        assert s.update(xs[n - 1]) == pytest.approx(want, rel=1e-12)


def _curve(drop_at: float, blow_at: float) -> tuple[list[float], list[float]]:
    """A smooth loss: falls by 1.5 around `drop_at` (a logistic in log lr), rises past `blow_at`."""
    lrs = [10 ** (-5 + 6 * i / 199) for i in range(200)]
    loss = [2.3 - 1.5 / (1 + math.exp(-4 * math.log(lr / drop_at))) + max(0.0, math.log(lr / blow_at)) ** 2
            for lr in lrs]
    return lrs, loss


def test_suggestion_is_the_steepest_point_when_it_lies_well_below_the_minimum() -> None:
    lrs, loss = _curve(drop_at=1e-3, blow_at=0.5)
    s = suggest(lrs, loss)
    assert s.lr == pytest.approx(1e-3, rel=0.05) and s.lr == s.steepest_lr
    assert s.min_loss_lr > 0.3


def test_suggestion_is_a_tenth_of_the_minimum_when_the_drop_is_late() -> None:
    # Falling steepest right before the blow-up: the steepest point is too close to divergence.
    lrs, loss = _curve(drop_at=0.3, blow_at=0.5)
    s = suggest(lrs, loss)
    assert s.steepest_lr > s.min_loss_lr / 10
    assert s.lr == pytest.approx(s.min_loss_lr / 10) and s.lr < 0.3 / 2


def test_suggestion_when_the_loss_only_rises_is_the_start() -> None:
    lrs = [1e-3 * 2 ** i for i in range(10)]
    s = suggest(lrs, [1.0 + i for i in range(10)])
    assert s.lr == lrs[0] and "never decreased" in s.reason


def test_suggestion_ignores_a_non_finite_tail() -> None:
    lrs, loss = _curve(drop_at=1e-3, blow_at=0.5)
    loss[-1] = math.nan
    assert suggest(lrs, loss).lr == pytest.approx(1e-3, rel=0.05)


def test_too_few_losses_is_a_one_line_error() -> None:
    with pytest.raises(DTrainError, match="finite losses"):
        suggest([1e-3, 1e-2, 1e-1], [1.0, math.inf, math.nan])


# ---------------------------------------------------------------- in-process runs


def test_starts_from_the_weights_and_batches_of_a_training_run(tmp_path: Path) -> None:
    """Step 1 of the test and step 1 of training see the same weights and the same batch."""
    lr_find(_cfg(tmp_path / "lf", ["lr_find.num_steps=3"]), environ={})
    train(_cfg(tmp_path / "run", ["train.max_steps=1", "log.every_steps=1"]), environ={})
    first_train = records(tmp_path / "run", "train")[0]["loss"]
    assert _csv(tmp_path / "lf")[0]["loss"] == pytest.approx(first_train, rel=1e-6)


SMALL = ["data.name=synthetic", "data.train_size=64", "data.batch_size=16", "data.eval_size=8"]


def test_runs_across_epochs_and_records_every_step(tmp_path: Path) -> None:
    # 4 optimizer steps per epoch; 15 steps take four epochs.
    lr_find(_cfg(tmp_path, [*SMALL, "lr_find.num_steps=15", "lr_find.start_lr=1e-4", "lr_find.end_lr=1e-2"]),
            environ={})
    rows = _csv(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 * 100 ** (i / 14) for i in range(15)], rel=1e-9)
    # The smoothed column is the bias-corrected EMA of the raw one (weight 0.05 by default).
    s = Smoother(0.05)
    assert [r["smoothed_loss"] for r in rows] == pytest.approx([s.update(r["loss"]) for r in rows], rel=1e-9)
    summary = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["steps"] == 15


def test_stops_when_the_loss_diverges(tmp_path: Path) -> None:
    lr_find(_cfg(tmp_path, [*SMALL, "optim.momentum=0.9", "lr_find.num_steps=60", "lr_find.end_lr=1e5",
                            "lr_find.smoothing=0.3"]), environ={})
    rows = _csv(tmp_path)
    summary = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert len(rows) < 60 and summary["steps"] == len(rows)
    assert "diverged" in summary["stop_reason"] or "not finite" in summary["stop_reason"]
    last, best = rows[-1]["smoothed_loss"], min(r["smoothed_loss"] for r in rows[:-1])
    assert not math.isfinite(last) or last > 4 * best
    # Every earlier step was within the limit, else the test would have stopped there.
    running_best = math.inf
    for r in rows[:-1]:
        assert r["smoothed_loss"] <= 4 * running_best
        running_best = min(running_best, r["smoothed_loss"])


def test_leaves_the_run_directory_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"split": "train"}\n')
    (run_dir / "config.yaml").write_text("mine: true\n")
    args = [f"output_dir={run_dir}", *SMALL, "lr_find.num_steps=5"]
    assert lr_find_main(args) == 0
    assert (run_dir / "metrics.jsonl").read_text() == '{"split": "train"}\n'
    assert (run_dir / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "lr_find", "metrics.jsonl"]
    capsys.readouterr()
    # A second test refuses to replace the first one's results unless asked to.
    assert lr_find_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain.lr_find: error:") and "overwrite=true" in err[0]
    assert lr_find_main([*args, "overwrite=true"]) == 0


# ---------------------------------------------------------------- real processes


SUGGESTED = re.compile(r"^dtrain\.lr_find: suggested lr (\S+) ", re.M)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_suggestion_trains_the_default_config(tmp_path: Path) -> None:
    out = tmp_path / "lf"
    result = run([sys.executable, "-m", "dtrain.lr_find", f"output_dir={out}"], timeout=120)
    assert result.returncode == 0, result.stderr
    printed = SUGGESTED.findall(result.stdout)
    assert len(printed) == 1, result.stdout
    summary = json.loads((out / "lr_find" / "lr_find.json").read_text())
    lr = summary["suggested_lr"]
    assert float(printed[0]) == pytest.approx(lr, rel=1e-3)
    assert 1e-5 < lr < summary["min_loss_lr"]
    assert (out / "lr_find" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find"]

    run_dir = tmp_path / "run"
    final = train(_cfg(run_dir, [f"optim.lr={lr}", "train.max_steps=60", "log.every_steps=10"]), environ={}).eval
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert losses[-1] < 0.5 * losses[0], losses  # ln(10) = 2.30 -> well below 1.15
    assert final is not None and final["accuracy"] > 0.6


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_two_ranks_average_the_loss_and_only_rank_0_writes(tmp_path: Path) -> None:
    common = ["lr_find.num_steps=8", "lr_find.end_lr=1.0"]
    two = tmp_path / "w2"
    result = torchrun(2, ["-m", "dtrain.lr_find", f"output_dir={two}", "data.batch_size=16", *common],
                      timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(SUGGESTED.findall(result.stdout)) == 1, result.stdout
    assert sorted(p.name for p in (two / "lr_find").iterdir()) == [
        "config.yaml", "lr_find.csv", "lr_find.json", "lr_find.png"]
    assert json.loads((two / "lr_find" / "lr_find.json").read_text())["world_size"] == 2

    one = tmp_path / "w1"
    lr_find(_cfg(one, ["data.batch_size=32", *common]), environ={})
    a, b = _csv(one), _csv(two)
    assert len(a) == len(b) == 8
    # The same 32 samples per step, split over two ranks: equal only if the loss is all-reduced.
    for ra, rb in zip(a, b):
        assert ra["lr"] == rb["lr"]
        assert rel_diff(ra["loss"], rb["loss"]) < 1e-4, (ra, rb)
