"""Steering the run across ranks and attempts: a user's hook failing on one rank, callbacks named in the config,
early stopping decided from the global eval at 2 and 3 ranks, and every duty's state surviving kill -9.

References are independent: the stopping rule applied here to the logged global evals, and the same command
left uninterrupted, whose files the killed-and-rerun job must equal bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import store
from helpers import WORKERS, dtrain, records, torchrun
from test_early_stop import expected_stop

CB = "tests.workers.steer_callbacks"
DIVERGING = [f"data.name={CB}:diverging", "data.batch_size=4", "log.progress=none", "log.every_steps=5",
             "loss.metrics=[accuracy]"]


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_a_hook_failing_on_one_rank_stops_every_rank_at_the_same_step_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = f"callbacks=[{{name: '{CB}:FailOnRank', kwargs: {{rank: 1, step: 5, out: '{out}'}}}}]"
    res = dtrain(2, [*DIVERGING, "train.epochs=2", spec, f"output_dir={out}"], check=False)
    assert res.returncode != 0
    stopped = [int(Path(f"{out}.stopped{r}").read_text()) for r in (0, 1)]
    assert stopped[0] == stopped[1] >= 5  # the same step on both: the boundary where they agreed
    said = "FailOnRank.on_step_end raised ValueError at step 5: broken on rank 1"
    lines = [line for line in res.stderr.splitlines() if line.startswith("dtrain: ")]
    assert any(line.startswith("dtrain: error (rank 1): " + said) for line in lines), res.stderr
    assert any(line.startswith(f"dtrain: error: rank 1 failed in a callback (every rank stopped at step "
                               f"{stopped[0]}): {said}") for line in lines), res.stderr
    assert len(lines) == 2  # one line from each rank; (torchrun's own report follows them)


@pytest.mark.multiproc
@pytest.mark.parametrize("entry, says", [
    ("{name: tests.workers.no_such_module:X}", "cannot import 'tests.workers.no_such_module'"),
    (f"{{name: '{CB}:not_a_callback'}}", "it returned a object, not a dtrain.Callback"),
    (f"{{name: '{CB}:StepCounter', kwargs: {{nope: 1}}}}", "cannot be called with ['nope']"),
])
def test_a_bad_callbacks_entry_is_one_line_and_exit_2_before_anything_is_written(tmp_path: Path, entry: str,
                                                                                  says: str) -> None:
    out = tmp_path / "run"
    res = dtrain(0, [*DIVERGING, f"callbacks=[{entry}]", f"output_dir={out}"], check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "callbacks[0].name" in lines[0] and says in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc", [2, 3])
def test_early_stopping_is_decided_from_the_global_eval_at_every_world_size(tmp_path: Path, nproc: int) -> None:
    out = tmp_path / "run"
    dtrain(nproc, [*DIVERGING, "train.epochs=3", "eval.every_steps=2", "early_stop.monitor=accuracy",
                   "early_stop.mode=max", "early_stop.patience=2", "optim.lr=0.05", f"output_dir={out}"])
    evals = [r for r in records(out) if r["split"] == "eval"]
    assert all(r["samples"] == 41 for r in evals)  # global: every eval sample once, not rank 0's share
    stop = expected_stop([(r["step"], r["accuracy"]) for r in evals], 2, "max", 0.0)
    assert stop is not None and evals[-1]["step"] == stop
    finished = json.loads((out / "checkpoints" / "finished.json").read_text())
    assert finished["step"] == stop and finished["stopped_by"].startswith("early stopping: eval accuracy")
    print(f"{nproc} ranks: stopped at step {stop} after evals at {[r['step'] for r in evals]}")


def _same_tensors(a: Path, b: Path) -> None:
    wa, wb = torch.load(a), torch.load(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def _final_states(run: Path) -> dict:
    newest = store.committed(str(run))[-1]
    return store.load(newest.path)["states"]


@pytest.mark.multiproc
@pytest.mark.timeout(500)
def test_kill_9_at_random_points_then_rerun_ends_with_the_same_decisions_and_bitwise_weights(tmp_path: Path) -> None:
    """Early stopping, the best checkpoints, the EMA and a user callback (from the config) all keep state; the job
    is killed inside steps, half-way through a checkpoint file, between a best checkpoint and its pointer, and
    between the early stop's checkpoint and model.pt."""
    args = [*DIVERGING, "train.epochs=3", "eval.every_steps=3", "early_stop.monitor=loss", "early_stop.patience=7",
            "checkpoint.monitor=accuracy", "checkpoint.mode=max", "checkpoint.keep_best=2", "checkpoint.keep=1",
            "checkpoint.every_steps=5", "ema.decay=0.9", "optim.lr=0.01",
            f"callbacks=[{{name: '{CB}:StepCounter'}}]", "model.name=tests.workers.dropout_model:build"]
    ref = tmp_path / "uninterrupted"
    dtrain(2, [*args, f"output_dir={ref}"])
    run = tmp_path / "killed"
    # The last kill comes after the early stop's checkpoint, before model.pt: the rerun must end, not train on.
    kills = ["pointer:1", "backward:7", "save:2", "model:1"]
    for spec in [*kills, ""]:
        res = torchrun(2, [str(WORKERS / "killer.py"), *args, f"output_dir={run}"],
                       env={"DTRAIN_TEST_KILL": spec} if spec else {})
        assert (res.returncode != 0) if spec else (res.returncode == 0), (spec, res.stderr[-2000:])
    a, b = (json.loads((d / "checkpoints" / "finished.json").read_text()) for d in (ref, run))
    assert a["stopped_by"] is not None and a["stopped_by"].startswith("early stopping")
    assert (a["step"], a["stopped_by"]) == (b["step"], b["stopped_by"])  # the same decision at the same step
    assert a["step"] < 3 * 30  # it did stop early
    for name in ("model.pt", "model_ema.pt", "model_best.pt"):
        _same_tensors(ref / name, run / name)
    pa, pb = (json.loads((d / "checkpoints" / "best.json").read_text()) for d in (ref, run))
    assert pa == pb
    assert sorted(os.listdir(ref / "checkpoints")) == sorted(os.listdir(run / "checkpoints"))
    got, want = records(run, "eval"), records(ref, "eval")
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in want]
    assert [r["step"] for r in records(run, "eval_ema")] == [r["step"] for r in records(ref, "eval_ema")]
    sa, sb = _final_states(ref), _final_states(run)
    assert sa["callback.0.StepCounter"] == sb["callback.0.StepCounter"] == {
        "steps": a["step"], "evals": [r["step"] for r in want]}
    assert sa["early_stop"] == sb["early_stop"] and sa["best"] == sb["best"]
    print(f"killed at {kills}; stopped at step {a['step']} by {a['stopped_by']!r}; files bitwise equal")
