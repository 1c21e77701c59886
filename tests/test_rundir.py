"""Where a run starts (checkpoint/rundir.py): a new directory, an earlier run's newest checkpoint, or a run
already finished; overwrite=true replaces only what dtrain wrote, and only once the new run is set up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from dtrain.checkpoint import store as checkpoint
from dtrain.config import load_config
from dtrain.errors import DTrainError
from dtrain.run import train
from helpers import REPO, one_line_error, records, run

# ---------------------------------------------------------------- continue, report, or refuse


def test_a_finished_run_is_reported_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.__main__ import main

    args = ["data.name=synthetic", "train.epochs=1", "log.progress=none", f"output_dir={tmp_path}"]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(args) == 0
    assert "finished at step 32; nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_second_run_into_same_dir_keeps_the_first(tmp_path: Path) -> None:
    """A finished run is reported and left as it is; an earlier run without checkpoints is refused."""
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=2", f"output_dir={tmp_path}/run"])
    first = train(cfg, environ={})
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train(cfg, environ={})
    assert again.eval == first.eval and again.state.step == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert not dist.is_initialized()

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(before)  # a run whose checkpoints are gone
    (other / ".dtrain-run").write_text("")  # dtrain's own
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=2", f"output_dir={other}"])
    with pytest.raises(DTrainError, match="overwrite=true"):
        train(cfg, environ={})
    assert (other / "metrics.jsonl").read_text() == before
    assert not dist.is_initialized()


@pytest.mark.multiproc
def test_two_runs_without_output_dir_never_collide(tmp_path: Path) -> None:
    for _ in range(2):
        res = run([sys.executable, "-m", "dtrain", "data.name=synthetic", "train.epochs=1"], cwd=tmp_path,
                  env={"PYTHONPATH": str(REPO)})
        assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_resume_from_an_older_checkpoint_into_the_same_dir_is_refused(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.__main__ import main

    args = ["data.name=synthetic", "train.epochs=1", "log.progress=none", "checkpoint.every_steps=10",
            "checkpoint.keep=5", f"output_dir={tmp_path}"]
    assert main(args) == 0
    older = checkpoint.committed(str(tmp_path))[0].path
    assert main([*args, f"resume={older}"]) == 2
    err = capsys.readouterr().err
    assert "config key 'resume'" in err and "resume from it into a new output_dir" in err
    assert main([*args[:-1], f"output_dir={tmp_path / 'branch'}", f"resume={older}"]) == 0  # a branch is fine


def test_an_attempt_that_died_before_its_first_checkpoint_restarts_and_keeps_its_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.__main__ import main

    args = ["data.name=synthetic", "train.epochs=1", "log.progress=none", f"output_dir={tmp_path}"]
    assert main(args) == 0
    # As a job killed before its first checkpoint leaves it: a log, a config, no checkpoint.
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    first_log = (tmp_path / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert (tmp_path / "metrics.attempt-1.jsonl").read_text() == first_log
    assert records(tmp_path, "train_epoch")[0]["samples"] == 1000
    # The same leftovers with another config are someone else's run: refused, nothing touched.
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    capsys.readouterr()
    assert main([*args, "optim.lr=0.2"]) == 2
    assert "overwrite=true" in capsys.readouterr().err


# ---------------------------------------------------------------- a new directory, or a replaced run

def test_overwrite_replaces_the_whole_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["data.name=synthetic", "train.max_steps=2", "log.tensorboard=true", f"output_dir={out}"]
    train(load_config(None, [*args, "ema.decay=0.9", "checkpoint.monitor=loss"]), environ={})
    assert (out / "model_ema.pt").exists() and (out / "model_best.pt").exists()
    (out / "curves.png").write_bytes(b"stale")
    train(load_config(None, [*args, "overwrite=true", "train.max_steps=3"]), environ={})
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # Nothing of the earlier run stays beside the new one's files: no average, no best weights of another run.
    assert not (out / "curves.png").exists() and not (out / "model_ema.pt").exists()
    assert not (out / "model_best.pt").exists() and not (out / "checkpoints" / "best.json").exists()
    assert records(out, "train")[-1]["step"] == 3 and len(records(out, "eval")) == 1


@pytest.mark.multiproc
def test_unusable_output_dir_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run([sys.executable, "-m", "dtrain", "data.name=synthetic", f"output_dir={blocker}/sub"], timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "output_dir" in lines[0] and "writable directory" in lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _earlier_run(out: Path) -> dict[str, bytes]:
    train(load_config(None, ["data.name=synthetic", "train.max_steps=2", "checkpoint.every_steps=1",
                             f"output_dir={out}"]), environ={})
    files = _tree(out)
    assert {"config.yaml", "model.pt", "metrics.jsonl", "checkpoints/finished.json"} <= files.keys()
    return files


@pytest.mark.multiproc
@pytest.mark.parametrize("bad, says", [
    (["model.name=tests.workers.no_such_module:build"], "cannot import 'tests.workers.no_such_module'"),
    (["data.name=mnist", "data.root=/nonexistent/data"], "MNIST"),
    (["model.name=tests.workers.failing_model:build_or_raise"], "deliberate failure in the factory"),
], ids=["model-typo", "missing-dataset", "failing-factory"])
def test_overwrite_of_a_run_that_cannot_start_deletes_nothing(tmp_path: Path, bad: list[str], says: str) -> None:
    out = tmp_path / "run"
    before = _earlier_run(out)
    line = one_line_error(["data.name=synthetic", f"output_dir={out}", "overwrite=true", *bad],
                            env={"DTRAIN_TEST_FAIL_RANK": "0"})
    assert says in line
    assert _tree(out) == before


def _read_only(path: Path) -> None:
    """Read-only even for root: the immutable attribute (root ignores permission bits)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only for root here (chattr +i)")


def _writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.mark.multiproc
def test_overwrite_with_a_read_only_folder_in_the_old_run_deletes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = _earlier_run(out)
    locked = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir())[-1]  # deleted last
    _read_only(locked)
    try:
        line = one_line_error(["data.name=synthetic", f"output_dir={out}", "overwrite=true"])
        assert "config key 'output_dir'" in line and f"{locked} is not" in line
        assert _tree(out) == before
    finally:
        _writable_again(locked)


@pytest.mark.multiproc
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_a_directory_dtrain_did_not_write_is_never_replaced(tmp_path: Path, overwrite: str) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my: own config\n")
    (out / "model.pt").write_bytes(b"my own weights")
    before = _tree(out)
    line = one_line_error(["data.name=synthetic", "train.max_steps=1", f"output_dir={out}",
                             f"overwrite={overwrite}"])
    assert "config key 'output_dir'" in line and "'config.yaml', which dtrain did not write" in line
    assert _tree(out) == before


@pytest.mark.multiproc
def test_a_run_into_an_empty_or_new_directory_marks_it_and_a_failed_one_leaves_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    train(load_config(None, ["data.name=synthetic", "train.max_steps=1", f"output_dir={empty}"]), environ={})
    assert (empty / ".dtrain-run").exists() and (empty / "model.pt").exists()
    # a run whose set-up fails creates nothing, so the corrected rerun is not refused
    new = tmp_path / "new"
    one_line_error(["data.name=synthetic", "model.name=tests.workers.no_such_module:build", f"output_dir={new}"])
    assert not new.exists()
    train(load_config(None, ["data.name=synthetic", "train.max_steps=1", f"output_dir={new}"]), environ={})
    assert (new / "model.pt").exists()
