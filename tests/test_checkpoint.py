"""Checkpoints: committed whole or not at all, resumed exactly, and saved by every rank on a signal to any.

The references are independent runs: the same command left uninterrupted, whose
final weights the interrupted-and-resumed run must equal bit for bit (same
world size) or to the equivalence tolerance (another world size, same global batch).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import store as checkpoint
from dtrain.errors import DTrainError
from helpers import REPO, WORKERS, child_env, dtrain, records, rel_diff, run, torchrun

# ---------------------------------------------------------------- on disk, in-process


def _state(step: int) -> dict:
    return {"train": {"step": step, "model": {"w": torch.full((3,), float(step))}}, "config": {}}


def test_save_commits_and_keeps_the_newest(tmp_path: Path) -> None:
    for step in (3, 6, 9):
        checkpoint.save(str(tmp_path), step, 0, _state(step), keep=2)
    found = checkpoint.committed(str(tmp_path))
    assert [f.step for f in found] == [6, 9]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000000006", "step-000000009"]
    loaded = checkpoint.load(found[-1].path)  # weights_only=True inside
    assert torch.equal(loaded["train"]["model"]["w"], torch.full((3,), 9.0))


def test_only_committed_checkpoints_count(tmp_path: Path) -> None:
    checkpoint.save(str(tmp_path), 4, 0, _state(4), keep=5)
    root = tmp_path / "checkpoints"
    # A save killed before its rename, one killed before commit.json, one whose file was cut short.
    (root / ".step-000000008.tmp").mkdir()
    (root / ".step-000000008.tmp" / "state.pt").write_bytes(b"partial")
    (root / "step-000000010").mkdir()
    (root / "step-000000010" / "state.pt").write_bytes(b"no commit marker")
    torn = root / "step-000000012"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"short")
    (torn / "commit.json").write_text(json.dumps({"step": 12, "files": {"state.pt": 999}}))
    assert [f.step for f in checkpoint.committed(str(tmp_path))] == [4]
    with pytest.raises(DTrainError, match="a committed checkpoint directory"):
        checkpoint.load(str(torn))
    checkpoint.save(str(tmp_path), 14, 0, _state(14), keep=5)
    assert not (root / ".step-000000008.tmp").exists()  # the next save clears a dead one's leftovers


@pytest.mark.multiproc
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real write failure: the file size limit (RLIMIT_FSIZE) stands in for a full disk, in a child process."""
    checkpoint.save(str(tmp_path), 5, 0, _state(5), keep=1)
    code = ("import resource, signal, sys, torch; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from dtrain.checkpoint import store as checkpoint; from dtrain.errors import DTrainError\n"
            "try:\n checkpoint.save(sys.argv[1], 10, 0, {'train': {'w': torch.zeros(10000)}}, keep=1)\n"
            "except DTrainError as e:\n print(e); sys.exit(3)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert res.returncode == 3, res.stderr  # a one-line DTrainError, not a traceback
    assert "cannot write the checkpoint of step 10" in res.stdout and "earlier checkpoints are untouched" in res.stdout
    (found,) = checkpoint.committed(str(tmp_path))
    assert found.step == 5 and checkpoint.load(found.path)["train"]["step"] == 5
    assert os.listdir(tmp_path / "checkpoints") == ["step-000000005"]


# ---------------------------------------------------------------- real jobs

SMALL = ["data.name=synthetic", "data.train_size=300", "data.batch_size=8", "train.grad_accum_steps=2",
         "train.epochs=4", "log.every_steps=1", "log.progress=none", "model.name=tests.workers.dropout_model:build"]
# 2 ranks x 150 samples in batches of 8 (19 batches) in windows of 2: 10 steps an epoch, 40 in all.
STEPS = 40


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMALL uninterrupted on 2 ranks: the reference the signal tests share (it is the same run for each)."""
    ref = tmp_path_factory.mktemp("small") / "uninterrupted"
    dtrain(2, [*SMALL, f"output_dir={ref}"])
    return ref


def _start(nproc: int, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "dtrain", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except FileNotFoundError:
        return 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt")


def _assert_bitwise(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _assert_each_step_once_and_same_as(ref: Path, run: Path, rel: float) -> None:
    got, want = records(run), records(ref)
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert g["samples"] == w["samples"] and rel_diff(g["loss"], w["loss"]) <= rel, (g, w)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
# workers2 keeps the DataLoader (synthetic data would take the fast path, which has no workers).
@pytest.mark.parametrize("extra", [["data.num_workers=2", "data.fast_path=false"], ["train.precision=bf16"]],
                         ids=["workers2", "bf16"])
def test_kill_9_at_random_points_then_rerun_gives_bitwise_the_same_weights(tmp_path: Path, extra: list[str]) -> None:
    """The whole job is SIGKILLed at random points (inside accumulation windows, half-way through a
    checkpoint file), then the same command is run again, until it finishes."""
    args = [*SMALL, *extra, "checkpoint.every_steps=3"]
    ref = tmp_path / "uninterrupted"
    dtrain(2, [*args, f"output_dir={ref}"])
    run = tmp_path / "killed"
    rng = random.Random(" ".join(extra))  # a fixed schedule per case (str seeds do not depend on PYTHONHASHSEED)
    # 40 steps of 2 backwards each: each attempt is killed after a few backwards of its own (an odd
    # count: inside an accumulation window; then any count) or half-way through its first or second
    # checkpoint file, so the job is killed 4 times before the last attempt runs to the end.
    kills = [f"backward:{rng.randint(1, 5) * 2 + 1}", "save:2", f"backward:{rng.randint(2, 12)}", "save:1"]
    for spec in [*kills, ""]:
        cmd = [str(WORKERS / "killer.py"), *args, f"output_dir={run}"]
        res = torchrun(2, cmd, env={"DTRAIN_TEST_KILL": spec} if spec else {})
        if spec:
            assert res.returncode != 0, f"{spec}: the job was not killed"
        else:
            assert res.returncode == 0, res.stderr
    assert checkpoint.finished(str(run)) is not None
    _assert_bitwise(ref, run)
    # Each step's records once, equal to the uninterrupted run's (the loss sums of a window
    # that spans a resume are added in another order: equal to rounding).
    _assert_each_step_once_and_same_as(ref, run, rel=1e-12)
    print(f"{extra}: killed at {kills}; final weights bitwise equal")


def _pids(out: Path) -> dict[int, int]:
    return {r: int((out / f"pid_rank{r}.txt").read_text()) for r in (0, 1) if (out / f"pid_rank{r}.txt").exists()}


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("who, sig", [("rank1", signal.SIGUSR1), ("rank0", signal.SIGTERM), ("all", signal.SIGUSR2)])
def test_a_signal_to_any_ranks_saves_the_same_step_on_all_and_resumes_exactly(tmp_path: Path, who: str,
                                                                                 sig: signal.Signals,
                                                                                 small_reference: Path) -> None:
    ref = small_reference
    run, marks = tmp_path / "signalled", tmp_path / "marks"
    marks.mkdir()
    proc = _start(2, [*SMALL, f"output_dir={run}"], {"DTRAIN_TEST_FORWARD_SLEEP_S": "0.02",
                                                     "DTRAIN_TEST_RNG_OUT": str(marks)})
    while _lines(run / "metrics.jsonl") < 12 and proc.poll() is None:
        time.sleep(0.01)
    pids = _pids(marks)
    sent = time.monotonic()
    for rank in ((0, 1) if who == "all" else (int(who[-1]),)):
        os.kill(pids[rank], sig)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 0, err
    assert out.count("stopped by") == 1 and f"received {sig.name}" in err
    (saved,) = checkpoint.committed(str(run))  # one step, saved once, by every rank together
    assert 10 <= saved.step < STEPS and checkpoint.finished(str(run)) is None
    print(f"{sig.name} to {who}: all ranks out {took:.1f} s after the signal, checkpoint of step {saved.step}")
    dtrain(2, [*SMALL, f"output_dir={run}"])
    _assert_bitwise(ref, run)
    _assert_each_step_once_and_same_as(ref, run, rel=1e-12)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_resume_on_another_world_size_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 x 16 stopped part-way, resumed as 4 x 8: the same sample order, the uninterrupted run's result."""
    common = ["data.name=synthetic", "data.train_size=301", "train.epochs=3", "log.every_steps=1",
              "log.progress=none", "optim.lr=0.1", "model.name=tests.workers.dropout_model:build_no_dropout"]
    ref = tmp_path / "uninterrupted"
    dtrain(2, [*common, "data.batch_size=16", f"output_dir={ref}"])
    run, marks = tmp_path / "moved", tmp_path / "marks"
    marks.mkdir()
    proc = _start(2, [*common, "data.batch_size=16", f"output_dir={run}"],
                  {"DTRAIN_TEST_FORWARD_SLEEP_S": "0.05", "DTRAIN_TEST_RNG_OUT": str(marks)})
    while _lines(run / "metrics.jsonl") < 7 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(_pids(marks)[0], signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    (saved,) = checkpoint.committed(str(run))
    assert saved.step % 10 not in (0,)  # part-way through an epoch (10 steps an epoch)
    refused = dtrain(0, [*common, "data.batch_size=16", f"output_dir={run}"], check=False)  # one process: cheap
    assert refused.returncode != 0 and "its global batch is 32, this run's is 16" in refused.stderr
    dtrain(4, [*common, "data.batch_size=8", f"output_dir={run}"])
    _assert_each_step_once_and_same_as(ref, run, rel=1e-5)
    wa, wb = _weights(ref), _weights(run)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- a full disk during a real run

def _assert_said_by_each_rank(stderr: str, message: str) -> None:
    """Rank 0's write failed and every rank stopped on it: one line, rank 0's (torchrun's closing report
    repeats it as its `traceback :` line, which does not count)."""
    own = "\n".join(ln for ln in stderr.splitlines() if "traceback : " not in ln)
    assert own.count("dtrain: error") == 1, stderr
    assert f"dtrain: error: {message}" in stderr, stderr


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_a_full_disk_while_logging_cuts_metrics_back_to_whole_lines_and_stops_every_rank(tmp_path: Path) -> None:
    """RLIMIT_FSIZE for the whole job: metrics.jsonl reaches it part-way (checkpoints come only at the end)."""
    out, limit = tmp_path / "run", 4096
    limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
               "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[2:]])")
    res = run([sys.executable, "-c", limited, str(limit), "--standalone", "--nproc_per_node=2", "-m", "dtrain",
               "model.name=tests.workers.nan_model:build", "data.name=tests.workers.nan_model:data",
               "data.batch_size=32", "train.epochs=60", "log.every_steps=1", "log.progress=none",
               f"output_dir={out}"], timeout=100)
    assert res.returncode != 0
    path = out / "metrics.jsonl"
    _assert_said_by_each_rank(res.stderr, f"cannot write {path}: File too large")
    text = path.read_text()
    assert text.endswith("\n") and 0 < len(text.encode()) <= limit
    steps = [json.loads(line)["step"] for line in text.splitlines()]  # every line whole
    assert 1 < steps[-1] < 60
    assert not (out / "model.pt").exists() and not checkpoint.committed(str(out))


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_a_full_disk_while_writing_model_pt_leaves_none_and_the_final_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = dtrain(2, ["data.name=synthetic", "model.name=tests.workers.full_disk_model:build", "train.max_steps=3",
                     "log.progress=none", f"output_dir={out}"],
                 env={"DTRAIN_TEST_FULL_AT_STATE_DICT": "2", "DTRAIN_TEST_FULL_BYTES": "1000"}, check=False)
    assert res.returncode != 0  # torchrun's own code for a failed worker
    path = out / "model.pt"
    _assert_said_by_each_rank(res.stderr, f"cannot write {path}: File too large")
    assert not [p.name for p in out.iterdir() if p.name.startswith("model.pt")]  # no model.pt, no temporary
    (final,) = checkpoint.committed(str(out))
    assert final.step == 3 and checkpoint.load(final.path)["train"]["step"] == 3
    assert checkpoint.finished(str(out)) is None
