"""Never train on a damaged checkpoint, and a full disk named as one (dtrain/checkpoint/integrity.py, store.py).

Damage is real bytes changed on disk after the commit (64 zeroed in the middle of state.pt, a file cut short);
a full disk is a real one: a small tmpfs mounted for the test (root only; skipped with the reason otherwise,
and test_checkpoint.py's file-size-limit test covers the write failure there). The references are independent:
sha256 of the bytes on disk, and an uninterrupted run of the same command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dtrain.checkpoint import store as checkpoint
from dtrain.errors import DTrainError
from dtrain.inference import find_weights
from dtrain.run import write_bytes
from helpers import dtrain, records

# ---------------------------------------------------------------- damage, in-process


def _state(step: int, numel: int = 4096) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"train": {"step": step, "model": {"w": torch.randn(numel, generator=g)}}, "config": {}}


def _zero_middle(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(bytes(64))


def _cut(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _state_pt(out: Path, step: int) -> Path:
    return out / "checkpoints" / checkpoint.dir_name(step) / checkpoint.STATE


def test_the_recorded_checksum_is_that_of_the_bytes_on_disk(tmp_path: Path) -> None:
    checkpoint.save(str(tmp_path), 3, 0, _state(3), keep=1)
    commit = json.loads((tmp_path / "checkpoints" / "step-000000003" / "commit.json").read_text())
    data = _state_pt(tmp_path, 3).read_bytes()
    assert commit["files"] == {"state.pt": len(data)}
    assert commit["sha256"] == {"state.pt": hashlib.sha256(data).hexdigest()}


def test_changed_or_cut_checkpoints_are_named_and_passed_over_for_the_newest_intact(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        checkpoint.save(str(tmp_path), step, 0, _state(step), keep=3)
    _zero_middle(_state_pt(tmp_path, 30))
    _cut(_state_pt(tmp_path, 20))
    # Both still look committed by their sizes' count: only the check reads them through.
    assert [f.step for f in checkpoint.committed(str(tmp_path))] == [10, 30]
    good, damaged = checkpoint.newest_intact(str(tmp_path))
    assert good is not None and good.step == 10
    assert [d.problem for d in damaged] == [
        f"{_state_pt(tmp_path, 30)}: checksum mismatch (changed after the commit)",
        f"{_state_pt(tmp_path, 20)}: {_state_pt(tmp_path, 20).stat().st_size} bytes, "
        f"{_state_pt(tmp_path, 20).stat().st_size + 100} when committed (cut or changed after the commit)"]
    with pytest.raises(DTrainError, match="checksum mismatch"):
        checkpoint.load(damaged[0].path)
    assert torch.equal(checkpoint.load(good.path)["train"]["model"]["w"], _state(10)["train"]["model"]["w"])


def test_a_checkpoint_from_before_checksums_loads_and_torch_crcs_still_catch_damage(tmp_path: Path) -> None:
    checkpoint.save(str(tmp_path), 5, 0, _state(5), keep=1)
    commit_path = tmp_path / "checkpoints" / "step-000000005" / "commit.json"
    commit = json.loads(commit_path.read_text())
    del commit["sha256"]  # as dtrain wrote it before checksums
    commit_path.write_text(json.dumps(commit))
    path = str(commit_path.parent)
    assert checkpoint.problem(path) is None and checkpoint.load(path)["train"]["step"] == 5
    _zero_middle(_state_pt(tmp_path, 5))
    assert "checksum mismatch in its record" in (checkpoint.problem(path) or "")
    good, damaged = checkpoint.newest_intact(str(tmp_path))
    assert good is None and [d.path for d in damaged] == [path]


def test_a_damaged_newer_checkpoint_never_gets_a_good_one_deleted(tmp_path: Path) -> None:
    """keep=1, the newest (90) damaged, resumed from 60: a save at 75 (a signal, say) must keep 75."""
    out = str(tmp_path)
    for step in (60, 90):
        checkpoint.save(out, step, 0, _state(step), keep=2)
    _zero_middle(_state_pt(tmp_path, 90))
    checkpoint.save(out, 75, 0, _state(75), keep=1)  # even before the damaged one is set aside
    assert [f.step for f in checkpoint.committed(out)] == [75, 90]
    good, damaged = checkpoint.newest_intact(out)
    assert good is not None and good.step == 75
    aside = checkpoint.set_aside(damaged[0].path)
    assert aside.endswith("step-000000090.damaged") and os.path.isdir(aside)
    checkpoint.save(out, 80, 0, _state(80), keep=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000000080", "step-000000090.damaged"]


def test_resume_from_a_named_damaged_checkpoint_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from dtrain.checkpoint.rundir import decide_start
    from dtrain.config import load_config

    checkpoint.save(str(tmp_path / "old"), 7, 0, _state(7), keep=1)
    named = tmp_path / "old" / "checkpoints" / "step-000000007"
    _zero_middle(named / "state.pt")
    cfg = load_config(None, ["data.name=synthetic", f"resume={named}", f"output_dir={tmp_path / 'new'}"])
    with pytest.raises(DTrainError, match=f"cannot resume from {named}: {named}/state.pt: checksum mismatch"):
        decide_start(cfg)
    assert not (tmp_path / "new").exists()


def test_a_damaged_model_pt_is_refused_by_its_readers(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    weights = {"w": torch.randn(20000), "b": torch.randn(10)}
    torch.save(weights, path)
    assert torch.equal(find_weights(str(tmp_path), str(path)).state["w"], weights["w"])
    _zero_middle(path)
    with pytest.raises(DTrainError, match=f"cannot use {path}: checksum mismatch in its record"):
        find_weights(str(tmp_path), str(path))


# ---------------------------------------------------------------- a full disk: a real small filesystem


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "fs"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); "
                    "test_checkpoint.py's RLIMIT_FSIZE test covers a failed checkpoint write")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _grow(fs: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_one(small_fs: Path) -> None:
    out = str(small_fs / "run")
    checkpoint.save(out, 1, 0, _state(1, numel=1000), keep=1)  # about 5 KB
    with pytest.raises(DTrainError) as caught:
        checkpoint.save(out, 2, 0, _state(2, numel=50_000), keep=1)  # about 200 KB
    line = str(caught.value)
    root = os.path.join(out, "checkpoints")
    assert line == (f"cannot write the checkpoint of step 2: {root}/.step-000000002.tmp/state.pt: No space left on "
                    "device; the earlier checkpoints are untouched")
    assert os.listdir(root) == ["step-000000001"]
    good, damaged = checkpoint.newest_intact(out)
    assert good is not None and good.step == 1 and not damaged
    with pytest.raises(DTrainError, match=f"cannot write {small_fs}/model.pt: No space left on device"):
        write_bytes(str(small_fs / "model.pt"), bytes(200_000))
    assert [n for n in os.listdir(small_fs) if n.startswith("model.pt")] == []
    _grow(small_fs, "1m")  # space is back
    checkpoint.save(out, 2, 0, _state(2, numel=50_000), keep=1)
    assert [f.step for f in checkpoint.committed(out)] == [2]
    assert checkpoint.problem(os.path.join(root, "step-000000002")) is None


def test_a_run_on_a_full_disk_stops_in_one_line_and_the_same_command_resumes_once_there_is_space(
        small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In one process: a checkpoint (about 290 KB) fits once in 480 KB, not twice (keep=1 holds the old one until
    the new one is committed)."""
    from dtrain.__main__ import main

    _grow(small_fs, "480k")
    common = ["data.name=synthetic", "model.hidden=[160,160]", "train.max_steps=12", "checkpoint.every_steps=4",
              "checkpoint.keep=1", "log.every_steps=4", "log.progress=none"]
    args = [*common, f"output_dir={small_fs / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    root = small_fs / "run" / "checkpoints"
    assert err == [f"dtrain: error: cannot write the checkpoint of step 8: {root}/.step-000000008.tmp/state.pt: "
                   "No space left on device; the earlier checkpoints are untouched"]
    assert os.listdir(root) == ["step-000000004"] and checkpoint.problem(str(root / "step-000000004")) is None
    _grow(small_fs, "4m")
    assert main(args) == 0
    assert f"resuming from {root}/step-000000004 (step 4" in capsys.readouterr().out
    assert main([*common, f"output_dir={tmp_path / 'reference'}"]) == 0
    want, got = torch.load(tmp_path / "reference" / "model.pt"), torch.load(small_fs / "run" / "model.pt")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------- a real resume through the command line

RUN = ["data.name=synthetic", "data.train_size=200", "data.batch_size=8", "train.epochs=2", "checkpoint.every_steps=5",
       "checkpoint.keep=3", "log.every_steps=1", "log.progress=none", "model.name=tests.workers.dropout_model:build"]
# 2 ranks x 100 samples in batches of 8: 13 steps an epoch, 26 in all; checkpoints kept: 20, 25, 26.


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.startswith(".dtrain-lock")}


def _as_if_killed_after(src: Path, dst: Path, newest: int) -> None:
    """A copy of a finished run as it was when killed right after committing `newest`: no model.pt, not finished,
    no later checkpoint (what the rerun logs after it is rewritten anyway)."""
    shutil.copytree(src, dst)
    (dst / "model.pt").unlink()
    (dst / "checkpoints" / "finished.json").unlink()
    for found in checkpoint.committed(str(dst)):
        if found.step > newest:
            shutil.rmtree(found.path)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_resume_falls_back_past_damaged_checkpoints_in_one_line_or_stops_if_none_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / "uninterrupted"
    dtrain(2, [*RUN, f"output_dir={ref}"])
    assert [f.step for f in checkpoint.committed(str(ref))] == [20, 25, 26]

    # The newest two damaged after their commit: one changed, one cut. The rerun goes back to 20 and ends where
    # the uninterrupted run did, bit for bit.
    run = tmp_path / "damaged"
    _as_if_killed_after(ref, run, 26)
    ckpts = run / "checkpoints"
    _zero_middle(ckpts / "step-000000026" / "state.pt")
    _cut(ckpts / "step-000000025" / "state.pt")
    started = time.monotonic()
    res = dtrain(2, [*RUN, f"output_dir={run}"])
    print(f"fallback run: {time.monotonic() - started:.1f} s")
    cut = ckpts / "step-000000025" / "state.pt"
    size = len((ref / "checkpoints" / "step-000000025" / "state.pt").read_bytes())
    line = (f"dtrain: {ckpts}/step-000000026/state.pt: checksum mismatch (changed after the commit); {cut}: "
            f"{size - 100} bytes, {size} when committed (cut or changed after the commit); resuming from "
            "step-000000020 instead (step-000000026, step-000000025 set aside as <name>.damaged)")
    assert res.stderr.count("resuming from step-000000020 instead") == 1 and line in res.stderr.splitlines(), \
        res.stderr
    assert f"dtrain: resuming from {ckpts}/step-000000020 (step 20" in res.stdout
    want, got = torch.load(ref / "model.pt"), torch.load(run / "model.pt")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [(r["split"], r["step"]) for r in records(run)] == [(r["split"], r["step"]) for r in records(ref)]
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "finished.json", "step-000000020", "step-000000025", "step-000000025.damaged", "step-000000026",
        "step-000000026.damaged"]

    # Only damaged checkpoints: one line, a nonzero exit, nothing trained, deleted or renamed.
    from dtrain.__main__ import main

    lone = tmp_path / "lone"
    _as_if_killed_after(ref, lone, 20)
    _zero_middle(lone / "checkpoints" / "step-000000020" / "state.pt")
    before = _tree(lone)
    capsys.readouterr()
    assert main([*RUN, f"output_dir={lone}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dtrain: error: {lone}/checkpoints/step-000000020/state.pt: checksum mismatch (changed after the "
                   "commit); no intact checkpoint is left to resume from, so nothing was trained (restore it from a "
                   "copy, or start over with overwrite=true or a new output_dir)"]
    assert _tree(lone) == before
