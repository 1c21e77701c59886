"""Logging end to end: metrics.jsonl, W&B, TensorBoard, the console, the plot, and failures.

Every run is a real `python -m dtrain` (under torchrun with gloo for two
processes). W&B runs in offline mode and is read back from the run's .wandb
file; TensorBoard is read with its own EventAccumulator. The numbers on the
dashboards are checked against metrics.jsonl, and metrics.jsonl against
values recomputed here from other runs of the same training.

The two main runs train the same 200 synthetic samples for 2 epochs with the
same seed and model, so their trajectories are comparable:
  logged_run  2 processes, batch 32, a record every 3 steps, W&B + TensorBoard,
              stdout a pipe
  tty_run     1 process,  batch 64, a record every step, under a pseudo-terminal
Batch 32 on 2 ranks and batch 64 on 1 rank see the same global batches
(DistributedSampler deals one permutation out to the ranks), 8 steps in all,
so the per-step records of tty_run recompute logged_run's windows.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest
import yaml

from helpers import REPO, child_env, dtrain, records, rel_diff, run

N_TRAIN = 200
BATCH = 32
WORLD = 2
EPOCHS = 2
SEED = 7
STEPS_PER_EPOCH = 4  # 100 samples per rank in batches of 32: 32, 32, 32, 4
LR = 0.05
EVAL_SLEEP_S = 1.5

COMMON = ["data.name=synthetic", f"data.train_size={N_TRAIN}", "data.eval_size=100", f"train.seed={SEED}",
          f"train.epochs={EPOCHS}", f"optim.lr={LR}", "model.name=tests.workers.slow_eval_model:build",
          # Far above any gradient norm: clipping is on (grad_norm gets logged) but
          # scales by exactly 1, so these runs train like unclipped ones.
          "train.grad_clip=1000000.0"]

# The dashboard names the issue asks for, written out here rather than taken
# from dtrain.loggers.base.DASHBOARD_NAMES, so a wrong entry there shows up.
EXPECTED_NAMES = {
    ("train", "loss"): "train/loss",
    ("train", "lr"): "train/lr",
    ("train", "grad_norm"): "train/grad_norm",
    ("train", "samples_per_s"): "train/samples_per_s",
    ("train", "step_time_s"): "train/step_time_s",
    ("train", "data_time_fraction"): "train/data_time_fraction",
    ("train", "startup_s"): "train/startup_s",
    ("train_epoch", "loss"): "train/epoch_loss",
    ("eval", "loss"): "eval/loss",
    ("eval", "accuracy"): "eval/accuracy",
}
TRAIN_KEYS = {"split", "step", "epoch", "loss", "samples", "lr", "grad_norm", "samples_per_s", "step_time_s",
              "data_time_fraction"}

Points = dict[str, list[tuple[int, float]]]


# --- reading what the loggers wrote ------------------------------------------------------------

# W&B 0.31 offline writes no summary JSON and ships no Python reader for its
# transaction log. run-<id>.wandb is a LevelDB-style log (the format of
# wandb's old sdk/internal/datastore.py, now written by wandb-core): a 7-byte
# header ":W&B", 0xBEE1, version 0, then 32 KiB blocks of chunks, each
# crc32 (zlib, seeded with the chunk type byte) | length u16 | type u8 | data;
# a block's last < 7 bytes are zero padding. Chunks FULL, or FIRST MIDDLE* LAST,
# carry one serialized wandb_internal_pb2.Record each.
WANDB_BLOCK = 32768
WANDB_CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    payloads: list[bytes] = []
    pending: Optional[bytes] = None
    pos = 7
    while pos < len(data):
        room = WANDB_BLOCK - pos % WANDB_BLOCK
        if room < WANDB_CHUNK_HEADER:
            pos += room
            continue
        assert pos + WANDB_CHUNK_HEADER <= len(data), f"{path}: truncated chunk header at byte {pos}"
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + WANDB_CHUNK_HEADER])
        chunk = data[pos + WANDB_CHUNK_HEADER:pos + WANDB_CHUNK_HEADER + length]
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad checksum at byte {pos}"
        pos += WANDB_CHUNK_HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind in (MIDDLE, LAST):
            assert pending is not None, f"{path}: chunk type {kind} without a FIRST"
            pending += chunk
            if kind == LAST:
                payloads.append(pending)
                pending = None
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at byte {pos}")
    assert pending is None, f"{path}: ends inside a record"
    out = []
    for payload in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        out.append(rec)
    return out


@dataclass
class WandbRun:
    history: list[tuple[int, dict[str, Any]]]
    """(step, row) per history record, in file order."""
    config: dict[str, Any]
    exit_code: Optional[int]
    """None when the run was never finished."""


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(wandb_dir: Path) -> WandbRun:
    """The one offline run under `wandb_dir`; fails if there is not exactly one."""
    run_dirs = sorted(wandb_dir.rglob("offline-run-*"))
    assert len(run_dirs) == 1, f"expected one W&B run, found {[str(d) for d in run_dirs]}"
    return read_wandb_run_dir(run_dirs[0])


def read_wandb_run_dir(run_dir: Path) -> WandbRun:
    """One offline-run-<time>-<id> directory (one process's part of a run)."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, f"expected one .wandb file in {run_dir}, found {files}"
    history: list[tuple[int, dict[str, Any]]] = []
    config: dict[str, Any] = {}
    exit_code: Optional[int] = None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append((rec.history.step.num,
                            {_item_key(i): json.loads(i.value_json) for i in rec.history.item}))
        elif kind == "run":
            config.update({_item_key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    config.pop("_wandb", None)
    return WandbRun(history, config, exit_code)


def wandb_points(wb: WandbRun) -> Points:
    points: Points = {}
    for step, row in wb.history:
        for name, value in row.items():
            if not name.startswith("_") and name != "epoch":
                points.setdefault(name, []).append((step, float(value)))
    return points


def tensorboard_points(log_dir: Path) -> Points:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_file(log_dir: Path) -> Path:
    files = list(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file in {log_dir}, found {files}"
    return files[0]


def assert_tfrecords_complete(path: Path) -> int:
    """Every TFRecord in the event file is whole and checksummed; returns how many there are.

    A writer that is killed before it closes can leave a record cut short;
    EventAccumulator skips such a tail silently, so check the framing here:
    length u64 | masked crc32c(length) | data | masked crc32c(data).
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    pos, count = 0, 0
    while pos < len(data):
        header = data[pos:pos + 8]
        assert len(header) == 8, f"{path}: truncated record header at byte {pos}"
        (length,) = struct.unpack("<Q", header)
        assert data[pos + 8:pos + 12] == struct.pack("<I", masked_crc32c(header)), f"{path}: bad length crc"
        body = data[pos + 12:pos + 12 + length]
        assert len(body) == length, f"{path}: truncated record at byte {pos}"
        tail = data[pos + 12 + length:pos + 16 + length]
        assert tail == struct.pack("<I", masked_crc32c(body)), f"{path}: bad data crc at byte {pos}"
        pos += 16 + length
        count += 1
    return count


def jsonl_points(rows: list[dict[str, Any]]) -> Points:
    points: Points = {}
    for row in rows:
        for key, value in row.items():
            name = EXPECTED_NAMES.get((row["split"], key))
            if name is not None:
                points.setdefault(name, []).append((row["step"], float(value)))
    return points


def assert_same_points(got: Points, want: Points, rel: float, what: str) -> None:
    assert set(got) == set(want), f"{what}: metric names {sorted(got)} != metrics.jsonl's {sorted(want)}"
    for name, want_points in want.items():
        got_points = got[name]
        assert [s for s, _ in got_points] == [s for s, _ in want_points], f"{what} {name}: steps differ"
        for (step, g), (_, w) in zip(got_points, want_points):
            assert rel_diff(g, w) <= rel, f"{what} {name} at step {step}: {g!r} != metrics.jsonl {w!r}"


# --- the runs ----------------------------------------------------------------------------------

def wandb_env(root: Path) -> dict[str, str]:
    """Offline W&B with every directory it writes under `root`."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_DATA_DIR": str(root / "wandb-data")}


@dataclass
class Run:
    out: Path
    root: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("logged")
    out = root / "run"
    res = dtrain(WORLD, [*COMMON, f"data.batch_size={BATCH}", "log.every_steps=3", "log.wandb=true",
                         "log.tensorboard=true", f"output_dir={out}"],
                 env={**wandb_env(root), "DTRAIN_TEST_EVAL_SLEEP_S": str(EVAL_SLEEP_S)})
    return Run(out, root, res.stdout, res.stderr)


def run_in_pty(cmd: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a pseudo-terminal; return (exit code, what it printed)."""
    master, slave = pty.openpty()
    # A terminal 120 columns wide: a fresh pty reports 0x0, which would leave tqdm no room for a bar.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=child_env(),
                            cwd=REPO, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n"
                                     + b"".join(chunks).decode(errors="replace"))
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def tty_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("tty")
    out = root / "run"
    code, output = run_in_pty([sys.executable, "-m", "dtrain", *COMMON, f"data.batch_size={BATCH * WORLD}",
                               "log.every_steps=1", f"output_dir={out}"], timeout=120)
    assert code == 0, output
    return Run(out, root, output, "")


# --- metrics.jsonl -----------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_metrics_jsonl_records_every_metric(logged_run: Run) -> None:
    rows = records(logged_run.out)
    # Windows end at multiples of every_steps and at the very end; the
    # window at step 6 spans the epoch end (steps 4, 5, 6).
    assert [(r["split"], r["step"], r["epoch"]) for r in rows] == [
        ("train", 3, 1), ("train_epoch", 4, 1), ("eval", 4, 1),
        ("train", 6, 2), ("train", 8, 2), ("train_epoch", 8, 2), ("eval", 8, 2)]
    train = [r for r in rows if r["split"] == "train"]
    # The first record also says how long the process took from launch to its first optimizer step.
    assert 0 < train[0]["startup_s"] < 120
    for r in train:
        assert set(r) - ({"startup_s"} if r is train[0] else set()) == TRAIN_KEYS  # CPU and fp32: no peak memory
        assert r["lr"] == LR
        assert 0 < r["grad_norm"] < math.inf
        assert 0 <= r["data_time_fraction"] <= 1
    # The windows tile the run: every sample of every epoch is counted once, on whichever rank.
    assert sum(r["samples"] for r in train) == EPOCHS * N_TRAIN
    for r in rows:
        if r["split"] in ("train_epoch", "eval"):
            assert r["samples"] == (N_TRAIN if r["split"] == "train_epoch" else 100)
    # Throughput and step time describe the same wall time.
    previous = 0
    for r in train:
        steps = r["step"] - previous
        previous = r["step"]
        assert rel_diff(r["samples_per_s"] * r["step_time_s"] * steps, r["samples"]) < 1e-9
    # The first eval sleeps EVAL_SLEEP_S inside the 3-step window ending at
    # step 6; were it counted as training, that window's step time would be
    # at least EVAL_SLEEP_S / 3 = 0.5 s. A step of this model takes milliseconds.
    assert max(r["step_time_s"] for r in train) < EVAL_SLEEP_S / 6, train


# --- W&B ---------------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_wandb_offline_one_run_matches_metrics_jsonl(logged_run: Run) -> None:
    wb = read_wandb_run(logged_run.root / "wandb")  # asserts exactly one run for the 2 processes
    rows = records(logged_run.out)

    # json repr round-trips floats, so W&B holds the very values of metrics.jsonl.
    points = wandb_points(wb)
    want = jsonl_points(rows)
    assert_same_points(points, want, rel=1e-9, what="W&B")
    assert points["train/loss"] == [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    assert points["eval/accuracy"][-1] == (8, records(logged_run.out, "eval")[-1]["accuracy"])

    steps = [s for s, _ in wb.history]
    assert steps == sorted(set(steps)), f"W&B steps must only increase: {steps}"
    assert steps == sorted({r["step"] for r in rows})  # the step axis is the optimizer step
    assert all(row["_step"] == step for step, row in wb.history)

    resolved = yaml.safe_load((logged_run.out / "config.yaml").read_text())
    assert wb.config == resolved
    assert wb.config["train"]["seed"] == SEED and wb.config["data"]["name"] == "synthetic"
    assert wb.config["runtime"]["world_size"] == WORLD
    assert wb.exit_code == 0


# --- TensorBoard -------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_tensorboard_matches_metrics_jsonl(logged_run: Run) -> None:
    log_dir = logged_run.out / "tensorboard"
    assert assert_tfrecords_complete(event_file(log_dir)) > 0
    rows = records(logged_run.out)
    points = tensorboard_points(log_dir)
    # TensorBoard stores float32.
    assert_same_points(points, jsonl_points(rows), rel=1e-6, what="TensorBoard")
    train = [r for r in rows if r["split"] == "train"]
    assert [s for s, _ in points["train/loss"]] == [r["step"] for r in train]
    assert points["eval/accuracy"][-1][1] == pytest.approx(rows[-1]["accuracy"], rel=1e-6)


# --- train-loss honesty ------------------------------------------------------------------------

def per_rank_batches(n: int, world: int, batch: int) -> list[int]:
    """Batch sizes one rank sees in an epoch: DistributedSampler gives each rank ceil(n / world) samples."""
    per_rank = -(-n // world)
    return [min(batch, per_rank - i) for i in range(0, per_rank, batch)]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_step_records_count_global_samples_and_epoch_loss_is_their_weighted_mean(tty_run: Run) -> None:
    rows = records(tty_run.out)
    sizes = per_rank_batches(N_TRAIN, WORLD, BATCH)
    assert sizes == [32, 32, 32, 4]
    for epoch in range(1, EPOCHS + 1):
        train = [r for r in rows if r["split"] == "train" and r["epoch"] == epoch]
        assert [r["step"] for r in train] == [(epoch - 1) * STEPS_PER_EPOCH + i + 1 for i in range(len(sizes))]
        # The global batch: what 2 ranks with batch 32 hold together, step by step.
        assert [r["samples"] for r in train] == [s * WORLD for s in sizes]
        (epoch_row,) = [r for r in rows if r["split"] == "train_epoch" and r["epoch"] == epoch]
        weighted = sum(r["loss"] * r["samples"] for r in train) / sum(r["samples"] for r in train)
        assert epoch_row["samples"] == sum(r["samples"] for r in train) == N_TRAIN
        assert rel_diff(epoch_row["loss"], weighted) < 1e-12, (epoch_row["loss"], weighted)
        # Not a plain mean of the steps: the 8-sample last step would count as much as a 64-sample one.
        assert rel_diff(epoch_row["loss"], sum(r["loss"] for r in train) / len(train)) > 1e-9


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_two_rank_window_loss_is_sample_weighted_mean_over_all_ranks(logged_run: Run, tty_run: Run) -> None:
    """Each 3-step window of the 2-process run, recomputed from the 1-process run's per-step records.

    The two runs train on the same global batches, so they agree up to float
    noise (1e-5 allows for it); a loss or a sample count from rank 0 alone,
    or a plain mean of the steps, would be off by far more. The window
    across the epoch end (steps 4, 5, 6) is included.
    """
    per_step = {r["step"]: r for r in records(tty_run.out, "train")}
    sizes = per_rank_batches(N_TRAIN, WORLD, BATCH) * EPOCHS
    previous = 0
    for window in records(logged_run.out, "train"):
        steps = [per_step[s] for s in range(previous + 1, window["step"] + 1)]
        # per-process batch x world size, summed over the window's steps
        assert window["samples"] == sum(WORLD * sizes[s - 1] for s in range(previous + 1, window["step"] + 1))
        previous = window["step"]
        assert window["samples"] == sum(r["samples"] for r in steps)
        weighted = sum(r["loss"] * r["samples"] for r in steps) / window["samples"]
        assert rel_diff(window["loss"], weighted) < 1e-5, (window, weighted)
        assert window["lr"] == steps[-1]["lr"]  # the lr of the window's last step
    assert previous == EPOCHS * STEPS_PER_EPOCH
    for epoch_row in records(logged_run.out, "train_epoch"):
        steps = [r for r in per_step.values() if r["epoch"] == epoch_row["epoch"]]
        weighted = sum(r["loss"] * r["samples"] for r in steps) / sum(r["samples"] for r in steps)
        assert epoch_row["samples"] == N_TRAIN
        assert rel_diff(epoch_row["loss"], weighted) < 1e-5, (epoch_row, weighted)


# --- the console -------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_progress_bar_on_a_terminal(tty_run: Run) -> None:
    out = tty_run.stdout
    total = EPOCHS * STEPS_PER_EPOCH
    assert "\r" in out  # the bar redraws in place
    assert re.search(rf"\d+%\|.*\| {total}/{total} \[", out), out  # tqdm's finished bar
    assert "step/s" in out
    # Eval results still get a line of their own above the bar; per-window lines do not.
    # (Not anchored at line starts: tqdm clears the bar with "\r" before each line it writes.)
    assert re.search(r"eval\s+epoch\s+2\s+step\s+8\s+loss", out), out
    assert not re.search(r"train\s+epoch\s+\d+\s+step", out), out


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_plain_lines_when_stdout_is_not_a_terminal(logged_run: Run) -> None:
    out = logged_run.stdout
    assert "\r" not in out and "%|" not in out
    lines = [line for line in out.splitlines() if re.match(r"train\s+epoch", line)]
    # One line per train record (steps 3, 6, 8), printed by rank 0 only.
    assert len(lines) == 3, out
    assert all(" eta " in line for line in lines)
    assert len(re.findall(r"^eval\s+epoch", out, re.M)) == EPOCHS


# --- dtrain.plot -------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_plot_writes_curves_png(tty_run: Run) -> None:
    import matplotlib.image

    res = run([sys.executable, "-m", "dtrain.plot", str(tty_run.out)], timeout=60)
    assert res.returncode == 0, res.stderr
    png = tty_run.out / "curves.png"
    assert res.stdout.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
    assert float(image[..., :3].std()) > 0.05  # curves and text, not a blank canvas


@pytest.mark.parametrize("case", ["no_dir", "no_metrics", "empty_metrics", "no_matplotlib"])
def test_plot_errors_are_one_line(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.plot import main

    run_dir = tmp_path / "run"
    if case != "no_dir":
        run_dir.mkdir()
    if case == "empty_metrics":
        (run_dir / "metrics.jsonl").write_text("")
    if case == "no_matplotlib":
        (run_dir / "metrics.jsonl").write_text('{"split": "train", "step": 1, "epoch": 1, "loss": 1.0}\n')
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    expected = {
        "no_dir": "run directory not found",
        "no_metrics": "no metrics.jsonl in",
        "empty_metrics": "holds no records yet",
        "no_matplotlib": "matplotlib is not installed; pip install 'dtrain[plot]'",
    }[case]
    assert main([str(run_dir)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("dtrain.plot: error: ") and expected in lines[0], err
    assert not (run_dir / "curves.png").exists()


# --- failures ----------------------------------------------------------------------------------

FAIL_AT_FORWARD = 7  # the set-up check of the first batch, steps 1-4, the one eval batch, then epoch 2's first step
STALL_S = 60
FAIL_OVERRIDES = ["data.name=synthetic", f"data.train_size={N_TRAIN}", "data.eval_size=100", f"train.epochs={EPOCHS}",
                  "log.every_steps=2", "model.name=tests.workers.failing_model:build", "log.wandb=true",
                  "log.tensorboard=true"]


def assert_closed_after_failure(res: subprocess.CompletedProcess, root: Path, out: Path) -> None:
    """What a failed run must leave: its records so far, a whole event file, a finished, failed W&B run."""
    assert res.returncode != 0
    assert f"deliberate failure on forward call {FAIL_AT_FORWARD}" in res.stderr
    rows = records(out)
    assert [(r["split"], r["step"]) for r in rows] == [("train", 2), ("train", 4), ("train_epoch", 4), ("eval", 4)]
    want = jsonl_points(rows)

    log_dir = out / "tensorboard"
    assert assert_tfrecords_complete(event_file(log_dir)) > 0
    assert_same_points(tensorboard_points(log_dir), want, rel=1e-6, what="TensorBoard")

    wb = read_wandb_run(root / "wandb")
    assert wb.exit_code is not None, "the W&B run was never finished"
    assert wb.exit_code != 0
    assert_same_points(wandb_points(wb), want, rel=1e-9, what="W&B")


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_run_that_raises_still_closes_its_loggers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = dtrain(0, [*FAIL_OVERRIDES, f"data.batch_size={BATCH * WORLD}", f"output_dir={out}"],
                 env={**wandb_env(tmp_path), "DTRAIN_TEST_FAIL_AT_FORWARD": str(FAIL_AT_FORWARD)}, check=False)
    assert_closed_after_failure(res, tmp_path, out)


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_rank_zero_closes_its_loggers_when_another_rank_fails(tmp_path: Path) -> None:
    """Rank 1 raises while rank 0 sleeps in Python, so rank 0 learns of it only from torchrun's SIGTERM.

    It must still finish the W&B run (as failed) and close the event file,
    and must not sleep through its STALL_S.
    """
    out = tmp_path / "run"
    env = {**wandb_env(tmp_path), "DTRAIN_TEST_FAIL_AT_FORWARD": str(FAIL_AT_FORWARD), "DTRAIN_TEST_FAIL_RANK": "1",
           "DTRAIN_TEST_STALL_S": str(STALL_S)}
    t0 = time.monotonic()
    # torchrun's SIGTERM is first taken as a request to save at the next step boundary; rank 0
    # would never get there (rank 1 is gone), and rank 1 said so in the store before it exited,
    # so rank 0 stops without saving at once, not after checkpoint.stop_grace_s.
    res = dtrain(WORLD, [*FAIL_OVERRIDES, f"data.batch_size={BATCH}", "checkpoint.stop_grace_s=5",
                         f"output_dir={out}"], env=env, check=False, timeout=150)
    wall = time.monotonic() - t0
    assert wall < STALL_S, f"rank 0 slept through its stall ({wall:.0f}s): SIGTERM did not end it"
    assert_closed_after_failure(res, tmp_path, out)
    assert "received SIGTERM" in res.stderr
    assert ("rank 1 failed: RuntimeError: failing_model: deliberate failure on forward call "
            f"{FAIL_AT_FORWARD}, so no step boundary will come; stopping without a checkpoint") in res.stderr


# --- missing extras ----------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("module, flag", [("wandb", "log.wandb"), ("tensorboard", "log.tensorboard")])
def test_missing_extra_is_a_one_line_error(tmp_path: Path, module: str, flag: str) -> None:
    out = tmp_path / "run"
    # None in sys.modules makes `import wandb` raise ImportError, as if it were not installed.
    code = (f"import sys; sys.modules[{module!r}] = None; from dtrain.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))")
    res = run([sys.executable, "-c", code, "data.name=synthetic", "data.train_size=64", "train.epochs=1",
               f"{flag}=true", f"output_dir={out}"], env=wandb_env(tmp_path), timeout=90)
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == [f"dtrain: error: {module} is not installed; "
                                               f"pip install 'dtrain[{module}]'"], res.stderr
    # Nothing that would make the rerun after `pip install` need overwrite=true.
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_broken_wandb_install_is_a_one_line_error(tmp_path: Path) -> None:
    """A wandb that is found but fails to import (a broken install) is caught when the loggers open."""
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'wandb_core_dependency'\")\n")
    out = tmp_path / "run"
    res = dtrain(0, ["data.name=synthetic", "data.train_size=64", "train.epochs=1", "log.wandb=true",
                     f"output_dir={out}"],
                 env={"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "site")])}, check=False, timeout=90)
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == ["dtrain: error: wandb is not installed; pip install 'dtrain[wandb]'"]
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc", [0, 2])
def test_wandb_without_an_account_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      nproc: int) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    # HOME holds no ~/.netrc login; the base URL is a closed local port, so even a
    # W&B that went looking for a server would fail at once, never reach the network.
    env = {**wandb_env(tmp_path), "WANDB_MODE": "online", "HOME": str(tmp_path / "home"),
           "WANDB_BASE_URL": "http://127.0.0.1:9"}
    res = dtrain(nproc, ["data.name=synthetic", "data.train_size=64", "train.epochs=1", "log.wandb=true",
                         f"output_dir={out}", "dist.timeout_s=60"], env=env, check=False, timeout=90)
    if nproc == 0:
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
    else:
        # Under torchrun every rank stops with the same one line (rank 1 learns it from rank 0)
        # well before the collective timeout, not with a gloo traceback; torchrun may stop
        # rank 0 before it prints, once rank 1 has exited.
        assert res.returncode != 0, res
        lines = [ln.replace(" (rank 1)", "") for ln in res.stderr.splitlines() if ln.startswith("dtrain: error")]
        assert lines and len(set(lines)) == 1 and "[rank1]: Traceback" not in res.stderr, res.stderr
        lines = lines[:1]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: W&B could not start a run: "), res.stderr
    assert "WANDB_MODE=offline" in lines[0]
    assert not (out / "metrics.jsonl").exists()


# --- CUDA --------------------------------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_peak_memory_is_logged_on_cuda(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "run"
    dtrain(0, ["data.name=synthetic", "data.train_size=256", "train.epochs=1", "train.device=cuda",
               "log.every_steps=2", "log.tensorboard=true", f"output_dir={out}"])
    train = records(out, "train")
    assert train and all(0 < r["peak_memory_gb"] < 1000 for r in train)
    tb = tensorboard_points(out / "tensorboard")
    assert [s for s, _ in tb["train/peak_memory_gb"]] == [r["step"] for r in train]


@pytest.mark.multiproc
def test_wandb_dying_mid_run_is_one_line_and_training_goes_on(tmp_path: Path) -> None:
    """Slurm signals every process of a step, W&B's service among them: the run must not lose its
    checkpoint or end in W&B's tracebacks. Here the service gets SIGTERM at the 5th step of 2 ranks."""
    out = tmp_path / "run"
    res = dtrain(2, ["data.name=synthetic", "data.train_size=256", "data.batch_size=16", "train.epochs=2",
                     "log.every_steps=1", "log.progress=none", "log.wandb=true", "checkpoint.every_steps=4",
                     "model.name=tests.workers.wandb_killer:build", f"output_dir={out}"],
                 env={**wandb_env(tmp_path), "DTRAIN_TEST_KILL_WANDB_AT": "5"})
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if "W&B stopped working" in ln]
    assert "Traceback" not in res.stderr and "ConnectionResetError" in line, res.stderr
    rows = records(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 17))  # 8 steps an epoch
    assert (out / "model.pt").exists() and (out / "checkpoints" / "finished.json").exists()
