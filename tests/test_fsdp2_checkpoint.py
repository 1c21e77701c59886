"""dist.strategy=fsdp2's sharded checkpoints: committed whole or not at all, resumed exactly, at another world
size and under another strategy, checked on resume, read by dtrain.eval/predict, and the same under every launcher.

Every run is a real job (torchrun --standalone on gloo, `accelerate launch`, a script calling dtrain.train, a
Slurm job). The references are independent: the same command left uninterrupted, whose final weights a
killed-and-rerun job must equal bit for bit at the same world size, or to test_equivalence's tolerance at another
world size (same global batch); the run's own eval records; plain PyTorch on the saved weights.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from dtrain.checkpoint import store as checkpoint
from dtrain.checkpoint.integrity import file_digest
from dtrain.config import DataConfig
from dtrain.data.builtin import synthetic
from helpers import predict_on_three_ranks, REPO, WORKERS, dtrain, records, rel_diff, run, torchrun
from slurm_cluster import SlurmCluster, running
from test_checkpoint import _assert_bitwise, _assert_each_step_once_and_same_as
from test_slurm import assert_same_as_reference, job_env, slurm_log, wait_for

pytestmark = pytest.mark.multiproc

FSDP2 = ["dist.strategy=fsdp2", "dist.shard=[Linear]"]  # both of the model's Linear layers are shard units
SEED = 3
# The kill/damage/eval/launcher runs: a dropout model (so the per-rank RNG streams must be restored too) with a
# spare layer that never gets a gradient (so no Adam state; every resume must go without it), Adam,
# K=2. 2 ranks x 150 samples in batches of 8 (19) in windows of 2: 10 steps an epoch, 40 in all; a sharded
# checkpoint every 3 steps, the newest 3 kept: 36, 39 and the final 40 at the end.
KILL = ["data.name=synthetic", "data.train_size=300", "data.eval_size=101", "data.eval_batch_size=16",
        "data.batch_size=8", "train.grad_accum_steps=2", "train.epochs=4", f"train.seed={SEED}", "log.every_steps=1",
        "log.progress=none", "optim.name=adam", "optim.lr=0.01",
        "model.name=tests.workers.dropout_model:build_with_spare", "checkpoint.every_steps=3", "checkpoint.keep=3",
        *FSDP2]
# The runs compared across world sizes and strategies: no dropout (its masks depend on the rank layout), Adam,
# a global batch of 24 (2 x 12 = 1 x 24 = 3 x 8); 301 samples: 13 steps an epoch, 39 in all; a checkpoint every 4.
MOVE = ["data.name=synthetic", "data.train_size=301", "data.eval_size=101", "data.eval_batch_size=16",
        "train.epochs=3", f"train.seed={SEED}", "log.every_steps=1", "log.progress=none", "optim.name=adam",
        "optim.lr=0.01", "model.name=tests.workers.dropout_model:build_no_dropout", "checkpoint.every_steps=4",
        "dist.shard=[Linear]"]
MOVE_STOP = 18  # killed at the 18th backward (K=1: step 18, part-way through epoch 2): resumed from step 16
GLOBAL_BATCH = 24


def _killer(nproc: int, args: list[str], spec: str) -> subprocess.CompletedProcess:
    return torchrun(nproc, [str(WORKERS / "killer.py"), *args], env={"DTRAIN_TEST_KILL": spec} if spec else {})


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _assert_equivalent(ref: Path, got: Path) -> float:
    """test_equivalence's bounds: each step logged once with the same samples, losses rel 1e-5, weights rtol 1e-4
    atol 1e-6. The largest weight difference."""
    _assert_each_step_once_and_same_as(ref, got, rel=1e-5)
    wa, wb = torch.load(ref / "model.pt"), torch.load(got / "model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    return _max_diff(ref, got)


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KILL uninterrupted on 2 ranks: what the killed, damaged, evaluated and otherwise launched runs must equal."""
    ref = tmp_path_factory.mktemp("kill") / "uninterrupted"
    dtrain(2, [*KILL, f"output_dir={ref}"])
    assert [f.step for f in checkpoint.committed(str(ref))] == [36, 39, 40]
    assert (Path(checkpoint.committed(str(ref))[-1].path) / "shards" / "__1_0.distcp").is_file()
    return ref


# ---------------------------------------------------------------- kill -9, then the same command again

def _assert_only_intact_checkpoints_listed(run_dir: Path) -> list[int]:
    listed = checkpoint.committed(str(run_dir))
    for found in listed:
        assert checkpoint.problem(found.path) is None, found  # every file as committed, checksums included
    return [f.step for f in listed]


@pytest.mark.timeout(600)
def test_kill_9_in_a_window_or_a_shard_write_then_rerun_gives_bitwise_the_same_weights(
        tmp_path: Path, kill_reference: Path) -> None:
    """The whole job SIGKILLed: after the first backward of a window (its gradient accumulated, not yet
    reduce-scattered), half-way through rank 0's and rank 1's shard files (.distcp), half-way through rank 0's
    state.pt (after every shard was written); then the same command again, until it finishes."""
    ref, run_dir = kill_reference, tmp_path / "killed"
    rng = random.Random("fsdp2")  # a fixed schedule (str seeds do not depend on PYTHONHASHSEED)
    kills = [f"backward:{rng.randint(2, 10) * 2}", "shard:3", "shard:2@1", "save:1"]
    full = json.loads((Path(checkpoint.committed(str(ref))[0].path) / checkpoint.COMMIT).read_text())["files"]
    cut = []
    for spec in [*kills, ""]:
        res = _killer(2, [*KILL, f"output_dir={run_dir}"], spec)
        if not spec:
            assert res.returncode == 0, res.stderr
            break
        assert res.returncode != 0, f"{spec}: the job was not killed"
        steps = _assert_only_intact_checkpoints_listed(run_dir)
        if not spec.startswith("backward"):
            # The save caught part-way: its temporary directory holds the file cut to half its length (a rank's
            # shard, or state.pt once every shard is whole); its step is not listed, whatever else was written.
            (tmp,) = (run_dir / "checkpoints").glob(".step-*.tmp")
            name = f"shards/__{spec.partition('@')[2] or '0'}_0.distcp" if spec.startswith("shard") else "state.pt"
            size, whole = (tmp / name).stat().st_size, full[name]
            assert 0 < size < whole * 0.6, (name, size, whole)  # about half (a state.pt's length varies a little)
            step = int(tmp.name[len(".step-"):-len(".tmp")])
            assert step not in steps and not (run_dir / "checkpoints" / checkpoint.dir_name(step)).exists()
            cut.append((spec, step, steps))
    assert checkpoint.finished(str(run_dir)) is not None
    _assert_bitwise(ref, run_dir)
    _assert_each_step_once_and_same_as(ref, run_dir, rel=1e-12)
    print(f"killed at {kills}; saves cut (spec, step, committed then): {cut}; final weights bitwise equal")


# ---------------------------------------------------------------- another world size

@pytest.fixture(scope="module")
def move_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MOVE on 2 ranks under fsdp2: uninterrupted, and killed part-way (its newest checkpoint: step 16)."""
    root = tmp_path_factory.mktemp("move")
    ref, stopped = root / "uninterrupted", root / "stopped"
    dtrain(2, [*MOVE, "dist.strategy=fsdp2", "data.batch_size=12", f"output_dir={ref}"])
    res = _killer(2, [*MOVE, "dist.strategy=fsdp2", "data.batch_size=12", f"output_dir={stopped}"],
                  f"backward:{MOVE_STOP}")
    assert res.returncode != 0
    assert checkpoint.committed(str(stopped))[-1].step == 16
    return {"ref": ref, "stopped": stopped}


def _resume_copy(stopped: Path, dst: Path) -> Path:
    shutil.copytree(stopped, dst)
    return dst


@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc", [1, 3])
def test_a_2_rank_fsdp2_checkpoint_resumes_on_another_world_size_with_its_optimizer_state(
        tmp_path: Path, move_runs: dict[str, Path], nproc: int) -> None:
    """Saved at 2 x 12, resumed as 1 x 24 (unsharded) or 3 x 8 (the shards cut anew): the model, Adam's moments
    and the sample order carry over, so the run ends where the uninterrupted 2-rank run did."""
    ref = move_runs["ref"]
    run_dir = _resume_copy(move_runs["stopped"], tmp_path / f"on{nproc}")
    res = dtrain(nproc, [*MOVE, "dist.strategy=fsdp2", f"data.batch_size={GLOBAL_BATCH // nproc}",
                         f"output_dir={run_dir}"])
    assert f"dtrain: resuming from {run_dir}/checkpoints/step-000000016 (step 16" in res.stdout
    worst = _assert_equivalent(ref, run_dir)
    first = [r for r in records(run_dir, "train") if r["step"] == 17][0]
    want = [r for r in records(ref, "train") if r["step"] == 17][0]
    print(f"2 -> {nproc} ranks: max weight diff {worst:.2e}; step 17 loss {first['loss']!r} vs {want['loss']!r}")


def _reset_optimizer_state(ckpt: Path) -> None:
    """Rewrite a sharded checkpoint with Adam's state as a fresh optimizer has it (zero moments, step 0), the
    model and everything else as saved, and commit.json's sizes and checksums to match."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shards = ckpt / "shards"
    entries = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
             for k, m in entries.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(shards)), no_dist=True)
        moments = [k for k in state if k.startswith("optimizer.state.")]
        assert moments and any(state[k].abs().sum() > 0 for k in moments if k.endswith("exp_avg"))
        for k in moments:
            state[k] = torch.zeros_like(state[k])
        shutil.rmtree(shards)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(shards)), no_dist=True)
    commit = json.loads((ckpt / checkpoint.COMMIT).read_text())
    for table in ("files", "sha256"):
        commit[table] = {k: v for k, v in commit[table].items() if not k.startswith("shards/")}
    for path in shards.iterdir():
        commit["files"][f"shards/{path.name}"] = path.stat().st_size
        commit["sha256"][f"shards/{path.name}"] = file_digest(str(path))
    (ckpt / checkpoint.COMMIT).write_text(json.dumps(commit))


@pytest.mark.timeout(400)
def test_the_resharding_comparison_fails_when_the_optimizer_state_is_dropped(
        tmp_path: Path, move_runs: dict[str, Path]) -> None:
    """The check above can fail: the same checkpoint with Adam's state reset resumes from the right weights and
    samples (step 17's loss agrees), then leaves the uninterrupted run's path."""
    ref = move_runs["ref"]
    run_dir = _resume_copy(move_runs["stopped"], tmp_path / "no_optim")
    _reset_optimizer_state(Path(checkpoint.committed(str(run_dir))[-1].path))
    dtrain(1, [*MOVE, "dist.strategy=fsdp2", f"data.batch_size={GLOBAL_BATCH}", f"output_dir={run_dir}"])
    got = {r["step"]: r["loss"] for r in records(run_dir, "train")}
    want = {r["step"]: r["loss"] for r in records(ref, "train")}
    assert rel_diff(got[17], want[17]) <= 1e-5
    worst_loss = max(rel_diff(got[s], want[s]) for s in want if s > 17)
    worst = _max_diff(ref, run_dir)
    assert worst_loss > 1e-3 and worst > 1e-3, (worst_loss, worst)
    print(f"Adam's state dropped: loss rel up to {worst_loss:.2e}, weights differ by up to {worst:.2e}")


# ---------------------------------------------------------------- DDP <-> FSDP2

@pytest.mark.timeout(400)
@pytest.mark.parametrize("saved, resumed", [("fsdp2", "ddp"), ("ddp", "fsdp2")])
def test_a_checkpoint_of_one_strategy_continues_under_the_other_with_adams_state(
        tmp_path: Path, move_runs: dict[str, Path], saved: str, resumed: str) -> None:
    """An FSDP2 checkpoint (shards keyed by name) under DDP, and a DDP one (the whole state in state.pt, Adam's
    state keyed by index) under FSDP2, at 2 ranks: the run ends where the uninterrupted one did."""
    ref = move_runs["ref"]
    if saved == "fsdp2":
        run_dir = _resume_copy(move_runs["stopped"], tmp_path / "run")
    else:
        run_dir = tmp_path / "run"
        res = _killer(2, [*MOVE, "dist.strategy=ddp", "data.batch_size=12", f"output_dir={run_dir}"],
                      f"backward:{MOVE_STOP}")
        assert res.returncode != 0
    newest = Path(checkpoint.committed(str(run_dir))[-1].path)
    payload = checkpoint.load(str(newest))
    assert checkpoint.step_of(str(newest)) == 16
    if saved == "ddp":  # a whole checkpoint, Adam's moments in it
        assert not (newest / "shards").exists() and not payload.get("sharded")
        assert len(payload["train"]["optimizer"]["state"]) == 4
    else:
        assert payload["sharded"] == "shards" and "model" not in payload["train"]
    res = dtrain(2, [*MOVE, f"dist.strategy={resumed}", "data.batch_size=12", f"output_dir={run_dir}"])
    assert f"dtrain: resuming from {newest} (step 16" in res.stdout
    worst = _assert_equivalent(ref, run_dir)
    print(f"{saved} checkpoint -> {resumed}: max weight diff vs the uninterrupted fsdp2 run {worst:.2e}")


# ---------------------------------------------------------------- a damaged shard

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.timeout(300)
def test_a_damaged_shard_is_found_on_resume_and_the_run_falls_back_to_the_previous_checkpoint(
        tmp_path: Path, kill_reference: Path) -> None:
    ref, run_dir = kill_reference, tmp_path / "damaged"
    # The run as it was when killed right after committing step 39: no model.pt, not finished, no step 40.
    shutil.copytree(ref, run_dir)
    (run_dir / "model.pt").unlink()
    (run_dir / "checkpoints" / checkpoint.FINISHED).unlink()
    shutil.rmtree(run_dir / "checkpoints" / checkpoint.dir_name(40))
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step-000000039" / "shards" / "__1_0.distcp"
    _flip_a_byte(shard)
    flipped = shard.read_bytes()
    assert checkpoint.is_committed(str(shard.parent.parent))  # the size still matches: only the checksum tells
    started = time.monotonic()
    res = dtrain(2, [*KILL, f"output_dir={run_dir}"])
    took = time.monotonic() - started
    line = (f"dtrain: {shard}: checksum mismatch (changed after the commit); resuming from step-000000036 instead "
            "(step-000000039 set aside as <name>.damaged)")
    said = [ln for ln in res.stderr.splitlines() if "resuming from step-000000036 instead" in ln]
    assert said == [line], res.stderr
    assert f"dtrain: resuming from {ckpts}/step-000000036 (step 36" in res.stdout
    assert (ckpts / "step-000000039.damaged" / "shards" / "__1_0.distcp").read_bytes() == flipped  # kept for a look
    _assert_bitwise(ref, run_dir)
    assert [(r["split"], r["step"]) for r in records(run_dir)] == [(r["split"], r["step"]) for r in records(ref)]
    print(f"fallback line: {line}\nrerun: {took:.1f} s")


# ---------------------------------------------------------------- dtrain.eval and dtrain.predict

@pytest.fixture(scope="module")
def sharded_only(kill_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run without model.pt: its weights are only in its sharded checkpoints."""
    run_dir = tmp_path_factory.mktemp("sharded_only") / "run"
    shutil.copytree(kill_reference, run_dir)
    (run_dir / "model.pt").unlink()
    return run_dir


def _final_eval(run_dir: Path) -> dict:
    record = records(run_dir, "eval")[-1]
    assert record["step"] == 40
    return {k: v for k, v in record.items() if k not in ("split", "step", "epoch")}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc, choice", [(2, "last"), (3, "state.pt")])
def test_eval_of_a_sharded_checkpoint_reproduces_the_runs_last_eval(
        tmp_path: Path, sharded_only: Path, nproc: int, choice: str) -> None:
    """Under torchrun, so the eval itself runs under FSDP2: bit for bit at the run's world size (2); at 3 the
    same accuracy and the loss within float32 rounding of the forwards: the weights are gathered from 3 shards
    (padded otherwise than from 2), so a sample's logits may round differently in their last bit (measured: 3.2e-9
    relative on the mean loss), where a sample missed or scored twice would move it by about 1e-2."""
    path = sharded_only / "checkpoints" / "step-000000040" / checkpoint.STATE
    which = "last" if choice == "last" else str(path)
    out = tmp_path / "eval.json"
    res = torchrun(nproc, ["-m", "dtrain.eval", str(sharded_only), "--checkpoint", which, "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("dtrain.eval: loss") == 1
    assert f"weights {path if choice != 'last' else path.parent}" in res.stdout, res.stdout
    got, want = json.loads(out.read_text())["eval"], _final_eval(sharded_only)
    assert got["samples"] == want["samples"] == 101
    if nproc == 2:
        assert got == want
    else:
        assert got["accuracy"] == want["accuracy"] and rel_diff(got["loss"], want["loss"]) <= 1e-6
    print(f"eval on {nproc} ranks, --checkpoint {choice}: loss {got['loss']!r} vs the record's {want['loss']!r}")


@pytest.mark.timeout(300)
def test_predict_of_a_sharded_checkpoint_gives_plain_torchs_outputs(
        tmp_path: Path, sharded_only: Path, kill_reference: Path) -> None:
    out = tmp_path / "p.pt"
    saved = predict_on_three_ranks(sharded_only, out)
    # The dropout model in eval mode, written out in plain torch, with the uninterrupted run's model.pt.
    plain = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    weights = torch.load(kill_reference / "model.pt")
    assert weights.keys() == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "spare.weight", "spare.bias"}
    plain.load_state_dict({k.replace("fc1", "1").replace("fc2", "3"): v for k, v in weights.items()
                           if not k.startswith("spare")})
    x = synthetic(DataConfig(name="synthetic", train_size=300, eval_size=101), SEED).eval.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(saved["outputs"], plain(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- other launchers

API_SCRIPT = """\
import sys

import dtrain

if __name__ == "__main__":
    dtrain.train(overrides=sys.argv[1:])
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["accelerate", "api"])
def test_accelerate_launch_and_the_python_api_train_fsdp2_as_the_cli_does(
        tmp_path: Path, kill_reference: Path, launcher: str) -> None:
    out = tmp_path / "run"
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
        res = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
                   "-m", "dtrain", *KILL, f"output_dir={out}"], timeout=250)
    else:
        script = tmp_path / "train_api.py"
        script.write_text(API_SCRIPT)
        res = torchrun(2, [str(script), *KILL, f"output_dir={out}"], timeout=250)
    assert res.returncode == 0, res.stderr
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dist"]["strategy"] == "fsdp2" and saved["runtime"]["world_size"] == 2
    assert (Path(checkpoint.committed(str(out))[-1].path) / "shards" / "__1_0.distcp").is_file()
    _assert_bitwise(kill_reference, out)
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(kill_reference)]


# ---------------------------------------------------------------- a requeued Slurm job

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running(tmp_path_factory.mktemp("slurm"))


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_a_requeued_fsdp2_slurm_job_resumes_to_the_uninterrupted_weights(
        cluster: SlurmCluster, kill_reference: Path, tmp_path: Path) -> None:
    """train.sbatch (srun, one task per rank) with dist.strategy=fsdp2, `scontrol requeue`d part-way: every rank
    gets SIGTERM, they write their shards of the same step within KillWait, and the job comes back and finishes."""
    env = job_env(cluster, tmp_path, sleep_s=0.1)
    # No periodic checkpoint (it does not change the math): the job resumes from the shards the signal wrote.
    job = cluster.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", "--exclusive",
                          str(REPO / "slurm" / "train.sbatch"), *KILL, "checkpoint.every_steps=null"], env, tmp_path)
    run_dir, log = tmp_path / "runs" / f"slurm-{job}", tmp_path / f"slurm-{job}.out"
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 15, 150, "15 steps", cluster, log)
    cluster.scontrol("requeue", str(job))
    wait_for(lambda: "stopped by SIGTERM" in slurm_log(tmp_path, job), 60, "the save", cluster, log)
    wait_for(lambda: "resuming from" in slurm_log(tmp_path, job), 120, "the resume", cluster, log)
    info = cluster.wait_done(job, timeout=240)
    text = slurm_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    (line,) = [ln for ln in text.splitlines() if "stopped by SIGTERM" in ln]
    step = int(line.split(" at step ")[1].split()[0])
    assert 7 <= step < 40 and f"resuming from runs/slurm-{job}/checkpoints/step-{step:09d} (step {step}" in text, text
    assert "Traceback" not in text, text
    assert_same_as_reference(run_dir, kill_reference)
    print(f"requeued: the signal's sharded checkpoint at step {step}, resumed from it; final weights bitwise equal")
