"""The loop and its callback seam, in one process: when each hook runs, and what requests do.

The expected steps are arithmetic written here: 20 samples in batches of 4 are 5 steps an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.callbacks.stack import build_duties
from dtrain.config import load_config
from dtrain.data.loaders import build_loaders
from dtrain.data.types import Datasets
from dtrain.errors import DTrainError
from dtrain.loggers import null_logger
from dtrain.loggers.progress import Progress
from dtrain.loop.engine import FitPlan, fit
from dtrain.loop.hooks import Callback, RunView
from dtrain.setup import build_train_state
from dtrain.runtime.dist import DistState
from dtrain.runtime.faults import WHERE_ATTR
from helpers import worker

N, B, EPOCHS, LOG_EVERY = 20, 4, 2, 2
PER_EPOCH = N // B


class Recorder(Callback):
    """Writes down every hook with the step it came at; acts on requests given as {step: what}."""

    def __init__(self, asks: Optional[dict[int, str]] = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.records: list[tuple[str, int, dict[str, float]]] = []
        self.asks = asks or {}
        self.models: list[nn.Module] = []

    def on_fit_start(self, run: RunView) -> None:
        self.calls.append(("fit_start", run.step))
        self.models.append(run.model)

    def on_step_end(self, run: RunView) -> None:
        self.calls.append(("step_end", run.step))
        what = self.asks.get(run.step)
        if what == "stop":
            run.request_stop("the test")
        elif what == "pause":
            run.request_stop("the test", pause=True)
        elif what == "save":
            run.request_save()
        elif what == "eval":
            run.request_eval(all_ranks=True)
        elif what == "raise":
            raise ValueError("a callback broke")

    def on_log(self, run: RunView) -> None:
        self.calls.append(("log", run.step))
        assert run.record is not None
        self.records.append((run.record.split, run.step, dict(run.record.values)))

    def on_epoch_end(self, run: RunView) -> None:
        self.calls.append(("epoch_end", run.step))

    def on_eval_end(self, run: RunView) -> None:
        self.calls.append(("eval_end", run.step))
        assert run.record is not None
        self.records.append((run.record.split, run.step, dict(run.record.values)))

    def on_boundary(self, run: RunView) -> None:
        self.calls.append(("boundary", run.step))

    def on_save(self, run: RunView) -> None:
        self.calls.append(("save", run.step))

    def on_fit_end(self, run: RunView) -> None:
        self.calls.append(("fit_end", run.step))

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        self.calls.append(("exception", run.step))


class FakeCheckpointer:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def save(self, state: Any, meter: Any) -> None:
        self.steps.append(state.step)


def _fit(callbacks: list[Callback], checkpointer: Optional[FakeCheckpointer] = None,
         every_steps: Optional[int] = None, max_steps: Optional[int] = None) -> tuple[Any, Any]:
    cfg = load_config(None, [f"data.batch_size={B}", f"data.eval_batch_size={B}", f"train.epochs={EPOCHS}",
                             f"log.every_steps={LOG_EVERY}", "model.hidden=[8]"])
    dist_state = DistState("test", 0, 0, 1, "gloo", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N + 6, 3, generator=g), torch.randint(0, 2, (N + 6,), generator=g)
    data = Datasets(TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:]), (3,), 2)
    loaders = build_loaders(data, cfg.data, 0, dist_state, 1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state, _ = build_train_state(cfg, dist_state, model, EPOCHS * PER_EPOCH)
    from dtrain.loop.task import build_task

    duties = build_duties(state, null_logger(), Progress("none", EPOCHS * PER_EPOCH, False),
                          checkpointer=checkpointer, every_steps=every_steps, callbacks=callbacks)
    result = fit(state, build_task("cross_entropy", [], "input", "target"), loaders.train, loaders.eval,
                 FitPlan(EPOCHS, max_steps, LOG_EVERY), duties)
    state.source = loaders.train  # for the tests' eyes only
    return result, state


def test_hooks_come_in_the_loops_order_at_the_steps_arithmetic_says() -> None:
    rec = Recorder()
    result, state = _fit([rec])
    assert result.stopped_by is None and state.step == EPOCHS * PER_EPOCH
    names = [c[0] for c in rec.calls]
    assert names[0] == "fit_start" and names[-1] == "fit_end"
    steps_of = {name: [s for n, s in rec.calls if n == name] for name in set(names)}
    assert steps_of["step_end"] == list(range(1, EPOCHS * PER_EPOCH + 1))
    assert steps_of["log"] == [s for s in range(1, EPOCHS * PER_EPOCH + 1) if s % LOG_EVERY == 0]
    assert steps_of["epoch_end"] == steps_of["eval_end"] == [PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    # A boundary after every step but an epoch's last, whose comes after its eval; none after the run's end.
    assert steps_of["boundary"] == list(range(1, EPOCHS * PER_EPOCH))
    assert names.index("eval_end") < names.index("boundary", names.index("epoch_end"))
    # The logging callback goes first: a user's on_log sees the train record of the step.
    train = [(s, v) for split, s, v in rec.records if split == "train"]
    assert [s for s, _ in train] == steps_of["log"] and all(v["samples"] == LOG_EVERY * B for _, v in train)
    evals = [v for split, _, v in rec.records if split == "eval"]
    assert [v["samples"] for v in evals] == [6, 6] and result.eval == evals[-1]
    assert rec.models == [state.module]  # the user's model, unwrapped


def test_the_logged_lr_is_the_one_the_step_used_even_when_a_callback_set_it() -> None:
    class Ramp(Callback):
        def on_step_end(self, run: RunView) -> None:
            for group in run.state.optimizer.param_groups:
                group["lr"] = 0.5 * run.step  # the next step's, set after the schedule stepped

    rec = Recorder()
    _fit([Ramp(), rec])
    logged = {s: v["lr"] for split, s, v in rec.records if split == "train"}
    assert logged == {s: 0.5 * (s - 1) for s in range(LOG_EVERY, EPOCHS * PER_EPOCH + 1, LOG_EVERY)}


def test_max_steps_mid_epoch_ends_that_epoch_with_its_records() -> None:
    rec = Recorder()
    result, state = _fit([rec], max_steps=3)
    assert state.step == 3 and state.epoch == 1  # the cut epoch counts as ended, as its records say
    assert state.source.state_dict() == {"window_in_epoch": 0}  # so a resume starts the next one at its start
    assert [s for n, s in rec.calls if n in ("epoch_end", "eval_end", "log")] == [2, 3, 3, 3]


@pytest.mark.parametrize("how", ["stop", "pause"])
def test_requests_eval_save_and_stop_act_at_the_next_boundary(how: str) -> None:
    rec = Recorder({2: "save", 3: "eval", 7: how})
    saver = FakeCheckpointer()
    result, state = _fit([rec], saver, every_steps=4)
    # One process: a request is agreed at once. Saves: the request at 2, the cadence at 4, the stop at 7.
    assert saver.steps == [2, 4, 7]
    assert result.stopped_by == "the test" and state.step == 7
    # A callback's stop finishes the run (on_fit_end comes); a pause (a signal's) leaves it to be resumed.
    assert result.paused is (how == "pause")
    assert (("fit_end", 7) in rec.calls) is (how == "stop")
    evals = [(s, v["samples"]) for split, s, v in rec.records if split == "eval"]
    assert evals == [(3, 6), (PER_EPOCH, 6)]  # the asked-for one mid-epoch, then the epoch's own


def test_a_stop_asked_on_every_rank_saves_that_step_and_ends_there() -> None:
    class StopAndSave(Callback):
        def on_step_end(self, run: RunView) -> None:
            if run.step == 3:
                run.request_stop("done early", all_ranks=True)

    saver = FakeCheckpointer()
    result, state = _fit([StopAndSave()], saver)
    assert (result.stopped_by, state.step, saver.steps) == ("done early", 3, [3])


def test_a_user_callback_that_raises_stops_the_run_naming_the_callback_the_hook_and_the_step() -> None:
    rec = Recorder({4: "raise"})
    with pytest.raises(DTrainError, match=r"^Recorder.on_step_end raised ValueError at step 4: a callback broke "
                                          r"\(at test_engine.py:\d+\)$") as info:
        _fit([rec])
    assert rec.calls[-2:] == [("boundary", 4), ("exception", 4)]  # stopped at the boundary of that step
    assert getattr(info.value, WHERE_ATTR) == "a callback at step 4"


def test_dtrains_own_duties_raise_at_once() -> None:
    class Broken(Recorder):
        pass

    from dtrain.loop.hooks import Hooks

    broken = Broken({4: "raise"})
    hooks = Hooks([broken], [])
    with pytest.raises(ValueError, match="a callback broke") as info:
        for step in range(1, 6):
            hooks.step_end(type("Run", (), {"step": step, "record": None})())  # type: ignore[arg-type]
    assert getattr(info.value, WHERE_ATTR) == "a callback's on_step_end after step 4"


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc", [2, 3])
def test_a_request_made_on_one_rank_is_acted_on_by_every_rank_at_the_same_step(tmp_path: Path, nproc: int) -> None:
    out = tmp_path / "run"
    result = worker(nproc, "callback_requests.py", [str(out)])
    rows = {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)}
    first = rows[0]
    for r in range(1, nproc):  # every rank did the same, at the same steps
        assert {k: rows[r][k] for k in ("steps", "saves", "evals", "ended")} == \
            {k: first[k] for k in ("steps", "saves", "evals", "ended")}
    steps, saves, evals = first["steps"], first["saves"], first["evals"]
    last = steps[-1]
    # Each request is agreed at the round after it (rounds come every ~0.2 s of steps, at most 100 steps).
    assert steps == list(range(1, last + 1)) and 100 < last < 4000 // (4 * nproc)  # stopped before the end
    # The last rank's save, agreed after step 2, then the stop's own save at the last step.
    assert len(saves) == 2 and 2 < saves[0] < last and saves[1] == last
    assert len(evals) == 1 and 40 < evals[0] < last  # its eval, agreed after step 40
    assert first["ended"]  # a callback's stop finishes the run
    committed = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert committed[-1] == f"step-{last:09d}"
    assert f"stopped by a signal or a callback on another rank at step {last}; the run is finished" in result.stdout
    finished = json.loads((out / "checkpoints" / "finished.json").read_text())
    assert finished["step"] == last and (out / "model.pt").exists()
    print(f"{nproc} ranks: save asked at 2 -> {saves[0]}, eval at 40 -> {evals[0]}, stop at 100 -> {last}")


class Counting(Callback):
    """Counts the steps it saw; stops the first attempt after step 3."""

    def __init__(self, stop_at: Optional[int] = None) -> None:
        self.seen, self.stop_at, self.loaded = 0, stop_at, None

    def on_step_end(self, run: RunView) -> None:
        self.seen += 1
        if run.step == self.stop_at:
            run.request_stop("the first attempt", all_ranks=True, pause=True)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.seen = state["seen"]


def test_a_callbacks_state_is_kept_in_the_checkpoint_and_given_back_on_resume(tmp_path: Path) -> None:
    import dtrain

    x, y = torch.randn(N, 3, generator=torch.Generator().manual_seed(1)), torch.arange(N) % 2
    args = dict(model=lambda: nn.Linear(3, 2), train_data=TensorDataset(x, y), loss="cross_entropy",
                overrides=[f"output_dir={tmp_path}", f"data.batch_size={B}", f"train.epochs={EPOCHS}",
                           "log.progress=none"])
    first = Counting(stop_at=3)
    dtrain.train(**args, callbacks=[first])  # type: ignore[arg-type]
    assert first.seen == 3
    again = Counting()
    dtrain.train(**args, callbacks=[again])  # type: ignore[arg-type]
    assert again.loaded == {"seen": 3}
    assert again.seen == EPOCHS * PER_EPOCH  # every step counted once over the two attempts
