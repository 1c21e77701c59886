"""early_stop.*: the run stops at the eval the rule written here picks from the logged (global) eval values,
ends finished, and a rerun says so instead of training on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dtrain
from dtrain.callbacks.early_stop import EarlyStopping
from dtrain.loop.record import Record

N, B = 48, 4


def diverging_data(n: int = N, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train labels follow the first feature; the eval set's are the opposite: eval loss rises as it learns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 20, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], 1 - y[n:])


def expected_stop(values: list[tuple[int, float]], patience: int, mode: str, min_delta: float) -> Optional[int]:
    """The step of the eval after which the rule stops, from (step, value) pairs; None if it never does."""
    best, bad = None, 0
    for step, v in values:
        is_number = v == v  # a NaN never counts as an improvement
        better = is_number and (best is None or (v < best - min_delta if mode == "min" else v > best + min_delta))
        if better:
            best, bad = v, 0
        else:
            bad += 1
            if bad >= patience:
                return step
    return None


def _records(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_the_run_stops_at_the_eval_the_rule_picks_and_ends_finished(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    train, held = diverging_data()
    args = dict(model=lambda: nn.Linear(3, 2), train_data=train, eval_data=held, loss="cross_entropy",
                overrides=[f"output_dir={tmp_path}", f"data.batch_size={B}", "train.epochs=5", "log.progress=none",
                           "eval.every_steps=3", "early_stop.monitor=loss", "early_stop.patience=2",
                           "optim.lr=0.3", "log.every_steps=1"])
    result = dtrain.train(**args)  # type: ignore[arg-type]
    evals = _records(tmp_path, "eval")
    stop = expected_stop([(r["step"], r["loss"]) for r in evals], 2, "min", 0.0)
    assert stop is not None and stop < 5 * N // B  # it did stop early
    assert evals[-1]["step"] == stop  # no eval after the stop
    assert max(r["step"] for r in _records(tmp_path, "train")) == stop  # no step after it
    assert all(r["samples"] == len(held) for r in evals)
    finished = json.loads((tmp_path / "checkpoints" / "finished.json").read_text())
    assert finished["step"] == stop and finished["stopped_by"].startswith("early stopping: eval loss")
    assert (tmp_path / "model.pt").exists()
    assert result.eval == {k: v for k, v in evals[-1].items() if k not in ("split", "step", "epoch")}
    assert "the run is finished" in capsys.readouterr().out
    # The same command again: reported finished, nothing trained.
    dtrain.train(**args)  # type: ignore[arg-type]
    said = capsys.readouterr().out
    assert f"finished at step {stop} (stopped by early stopping" in said and "nothing to do" in said
    assert len(_records(tmp_path, "eval")) == len(evals)


@pytest.mark.parametrize("mode, values, patience, delta", [
    ("min", [3.0, 2.0, 2.5, 2.4, 1.0, 1.1, 1.2], 2, 0.0),
    ("max", [0.1, 0.2, 0.2, 0.25, 0.26, 0.3], 2, 0.02),
    ("min", [1.0, float("nan"), 0.9, 0.95, float("nan")], 2, 0.0),
    ("min", [float("nan")] * 3, 2, 0.0),  # never a number: stops all the same
])
def test_the_callback_counts_as_the_rule_does(mode: str, values: list[float], patience: int, delta: float) -> None:
    cb = EarlyStopping("loss", mode, patience, delta)
    asked: list[int] = []

    class Run:
        record: Record
        step: int

        def request_stop(self, reason: str, all_ranks: bool = False) -> None:
            assert all_ranks  # decided from the global eval: no agreement round
            asked.append(self.step)

    run = Run()
    for i, v in enumerate(values, start=1):
        run.step, run.record = 10 * i, Record("eval", 10 * i, 1, {"loss": v})
        cb.on_eval_end(run)  # type: ignore[arg-type]
        if asked:
            break
    want = expected_stop([(10 * i, v) for i, v in enumerate(values, start=1)], patience, mode, delta)
    assert asked == ([want] if want is not None else [])
    # Another record (the EMA's, a train record) is not an eval of the monitored weights.
    before = cb.state_dict()
    run.record = Record("eval_ema", 999, 1, {"loss": -1.0})
    cb.on_eval_end(run)  # type: ignore[arg-type]
    assert cb.state_dict() == before


def test_a_monitor_the_run_does_not_compute_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    train, held = diverging_data()
    with pytest.raises(dtrain.DTrainError, match=r"config key 'early_stop.monitor' has value 'acc'; allowed: "
                                                 r"one of this run's eval values: loss \| accuracy"):
        dtrain.train(model=lambda: nn.Linear(3, 2), train_data=train, eval_data=held, loss="cross_entropy",
                     overrides=[f"output_dir={tmp_path / 'run'}", "early_stop.monitor=acc",
                                "loss.metrics=[accuracy]"])
    with pytest.raises(dtrain.DTrainError, match="checkpoint.monitor.*without eval data"):
        dtrain.train(model=lambda: nn.Linear(3, 2), train_data=train, loss="cross_entropy",
                     overrides=[f"output_dir={tmp_path / 'run'}", "checkpoint.monitor=loss"])
    assert not (tmp_path / "run").exists()
