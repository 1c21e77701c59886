"""Saving and restoring a run's state (checkpoint/saving.py): registered states come back by name, and a
checkpoint that does not fit is one line."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch

from dtrain.checkpoint import store as checkpoint
from dtrain.checkpoint.saving import Checkpointer, load_states, restore
from dtrain.config import load_config
from dtrain.errors import DTrainError
from dtrain.loop.meters import Meter
from dtrain.runtime.dist import DistState


class Counter:
    """A registered object: its whole state is how often it was called, plus a tensor."""

    def __init__(self, calls: int = 0) -> None:
        self.calls, self.seen = calls, torch.zeros(2)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.seen = int(state["calls"]), state["seen"].clone()


class FakeRun:
    """The run's own state, reduced to what saving and restoring ask of it."""

    def __init__(self, dist_state: DistState, step: int = 0) -> None:
        self.dist, self.step, self.epoch, self.loaded = dist_state, step, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch}

    def sharded_state(self) -> None:
        return None  # an unsharded run: everything is in state_dict()

    def load_state_dict(self, state: dict[str, Any], shards: Optional[str] = None) -> None:
        self.loaded = state
        self.step = int(state["step"])


class FakeSource:
    """The train data's part: its place in the epoch and the RNG that seeds its workers."""

    def __init__(self, position: int = 0) -> None:
        self.position, self.workers_rng = position, torch.Generator()

    def state_dict(self) -> dict[str, Any]:
        return {"window_in_epoch": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["window_in_epoch"])


def _save(tmp_path: Path, states: dict[str, Any]) -> tuple[Any, str, DistState]:
    cfg = load_config(None, ["data.name=synthetic", f"output_dir={tmp_path}"])
    ds = DistState("none", 0, 0, 1, "gloo", torch.device("cpu"))
    signals = SimpleNamespace(busy=contextlib.nullcontext)
    saver = Checkpointer(cfg, str(tmp_path), ds, FakeSource(position=2), signals, lambda: None, lambda line: None,  # type: ignore[arg-type]
                         states=states)
    saver.save(FakeRun(ds, step=7), Meter(ds.device))  # type: ignore[arg-type]
    return cfg, checkpoint.committed(str(tmp_path))[-1].path, ds


def test_registered_states_are_saved_by_name_and_given_back(tmp_path: Path) -> None:
    counter = Counter(calls=5)
    counter.seen += 1.5
    cfg, path, ds = _save(tmp_path, {"counter": counter})
    payload = checkpoint.load(path)  # weights_only=True: a registered state must load without allow-listing
    # Every key an older checkpoint has stays as it was, so both resume the same way.
    assert {"format", "train", "meters", "rng", "world_size", "global_batch", "config", "wandb_id"} <= set(payload)
    assert payload["states"]["counter"]["calls"] == 5

    again, untouched = Counter(), Counter(calls=9)
    run = FakeRun(ds)
    restore(run, payload, cfg, FakeSource(), Meter(ds.device), path,  # type: ignore[arg-type]
            states={"counter": again, "added_later": untouched})
    assert run.step == 7
    assert again.calls == 5 and torch.equal(again.seen, torch.full((2,), 1.5))
    # Registered after this checkpoint was saved: it keeps the state it was built with.
    assert untouched.calls == 9


def test_a_checkpoint_from_before_registered_states_still_restores(tmp_path: Path) -> None:
    _, path, _ = _save(tmp_path, {})
    payload = checkpoint.load(path)
    del payload["states"]
    fresh = Counter(calls=3)
    load_states(payload, {"counter": fresh}, path)
    assert fresh.calls == 3


def test_the_data_source_keeps_its_place_and_older_checkpoints_give_it_from_the_train_state(tmp_path: Path) -> None:
    cfg, path, ds = _save(tmp_path, {})  # saved with its source two windows into the epoch
    payload = checkpoint.load(path)
    assert payload["data"] == {"window_in_epoch": 2}
    source = FakeSource()
    restore(FakeRun(ds), payload, cfg, source, Meter(ds.device), path)  # type: ignore[arg-type]
    assert source.position == 2
    # Before the source kept its place, the train state held it.
    del payload["data"]
    payload["train"]["window_in_epoch"] = 3
    restore(FakeRun(ds), payload, cfg, source, Meter(ds.device), path)  # type: ignore[arg-type]
    assert source.position == 3


def test_a_state_that_does_not_load_is_one_line_naming_it(tmp_path: Path) -> None:
    _, path, _ = _save(tmp_path, {"counter": Counter(calls=1)})
    payload = checkpoint.load(path)

    class Strict(Counter):
        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise KeyError("unexpected key 'calls'")

    with pytest.raises(DTrainError) as err:
        load_states(payload, {"counter": Strict()}, path)
    assert f"cannot resume from {path}: the saved state of 'counter' does not load" in str(err.value)
    assert "\n" not in str(err.value)


def test_two_states_under_one_name_are_refused(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", f"output_dir={tmp_path}"])
    ds = DistState("none", 0, 0, 1, "gloo", torch.device("cpu"))
    saver = Checkpointer(cfg, str(tmp_path), ds, None, None, lambda: None, print,  # type: ignore[arg-type]
                         states={"counter": Counter()})
    with pytest.raises(DTrainError, match="two objects registered with the checkpoint under the name 'counter'"):
        saver.register("counter", Counter())


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(tmp_path: Path) -> None:
    import dtrain as api
    from torch import nn
    from torch.utils.data import TensorDataset

    x = torch.randn(64, 4)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    args = ["train.epochs=1", "log.progress=none", "checkpoint.every_steps=1", f"output_dir={tmp_path}"]
    api.train(model=nn.Linear(4, 2), train_data=data, eval_data=data, overrides=args)
    os.remove(tmp_path / "checkpoints" / "finished.json")
    with pytest.raises(DTrainError) as err:
        api.train(model=nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), train_data=data, eval_data=data,
                  overrides=args)
    assert "does not fit this run's model or optimizer" in str(err.value) and "\n" not in str(err.value)


def test_a_config_that_changes_the_math_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.__main__ import main

    args = ["data.name=synthetic", "train.epochs=2", "log.progress=none", "checkpoint.every_steps=5",
            f"output_dir={tmp_path}"]
    assert main(args) == 0
    os.remove(tmp_path / "checkpoints" / "finished.json")  # as if it had been stopped at its last checkpoint
    assert main([*args, "optim.lr=0.2", "data.num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert "the config differs from the checkpoint's in what changes the math: optim.lr (0.05 -> 0.2)" in err
    assert "num_workers" not in err and len(err.strip().splitlines()) == 1
