"""The main job end to end, as a user starts it, and the process group's lifetime."""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from dtrain.config import load_config
from dtrain.run import train
from helpers import REPO, dtrain, one_line_error, records, run, srun_like, worker


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_default_job_with_four_processes_and_no_arguments(tmp_path: Path) -> None:
    res = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
               "-m", "dtrain"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=240)
    assert res.returncode == 0, res.stderr
    (out,) = (tmp_path / "runs").iterdir()  # a new runs/<date>-<time>
    assert sorted(p.name for p in out.iterdir()) == [".dtrain-run", "checkpoints", "config.yaml", "metrics.jsonl",
                                                     "model.pt"]
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime == {"launcher": "torchrun", "precision": "fp32", "device": "cpu", "backend": "gloo",
                       "world_size": 4, "per_process_batch": 32, "grad_accum_steps": 1, "global_batch": 128}
    rows = records(out)
    # Only rank 0 writes: one record per (split, step), none repeated by other ranks.
    assert max(Counter((r["split"], r["step"]) for r in rows).values()) == 1
    evals = records(out, "eval")
    assert len(evals) == 20 and evals[-1]["samples"] == 359
    assert evals[-1]["accuracy"] >= 0.90
    # 1438 training samples on 4 ranks: the sampler pads to 1440, and the 2 repeats count nowhere.
    assert {r["samples"] for r in records(out, "train_epoch")} == {1438}
    # Rank 0 alone prints progress: the final line once, not four times.
    assert res.stdout.count("final eval") == 1
    print(f"default job, 4 processes: accuracy {evals[-1]['accuracy']:.4f}")


def test_process_group_is_destroyed_on_error(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "model.name=workers.failing_model:build",
                             f"output_dir={tmp_path}/run"])
    with pytest.raises(RuntimeError, match="deliberate failure"):
        train(cfg, environ={})
    assert not dist.is_initialized()


def test_process_group_is_destroyed_after_success(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=3", f"output_dir={tmp_path}/run"])
    result = train(cfg, environ={})
    assert result.state.step == 3 and not dist.is_initialized()


@pytest.mark.multiproc
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
@pytest.mark.parametrize("strategy", [[], ["dist.strategy=fsdp2", "dist.shard=[Linear]"]], ids=["ddp", "fsdp2"])
def test_a_finished_run_leaves_no_process_group_threads(tmp_path: Path, strategy: list[str]) -> None:
    # Without this, the group outlived the run (DDP: torch.distributed.nn.functional, first
    # imported by DDP, pins it in default arguments; FSDP2: DTensor's caches keep the
    # device mesh, which holds the group) and gloo's threads ran into interpreter
    # shutdown, where a successful job sometimes aborted.
    result = worker(2, "threads_after_run.py", [str(tmp_path / "run"), *strategy])
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert any("gloo" in name for name in r["while_held"]), r  # the probe can see gloo's threads
        assert not any("gloo" in name for name in r["after"]), r


@pytest.mark.multiproc
def test_a_native_crash_shows_the_python_stack(tmp_path: Path) -> None:
    # A signal number alone ("exitcode -6") says nothing about where a job died.
    result = run([sys.executable, "-m", "dtrain", "data.name=synthetic",
                  "model.name=tests.workers.aborting_model:build", f"output_dir={tmp_path}/run"])
    assert result.returncode == -6, result
    assert "Fatal Python error: Aborted" in result.stderr
    assert "aborting_model.py" in result.stderr


@pytest.mark.multiproc
def test_runs_with_stderr_closed(tmp_path: Path) -> None:
    # A daemonised job may have no stderr at all; the crash handler must not need one.
    out = tmp_path / "run"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "dtrain", "data.name=synthetic",
                                             "train.max_steps=2", "log.every_steps=1",
                                             f"output_dir={out}"])
    result = run(["sh", "-c", f"exec {cmd} 2>&-"])
    assert result.returncode == 0, result
    assert [r["step"] for r in records(out, "train")] == [1, 2]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_srun_style_launch_trains_like_torchrun(tmp_path: Path) -> None:
    """Two tasks started with srun's variables only (no torchrun): rank/port come from SLURM_*."""
    out = tmp_path / "run"
    # The port is derived from SLURM_JOB_ID, as under a real srun (no MASTER_PORT).
    results = srun_like(2, ["data.name=synthetic", "train.epochs=1", "log.every_steps=4", f"output_dir={out}"],
                        derive_port=True)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["launcher"] == "srun" and runtime["world_size"] == 2
    assert results[0].stdout.count("final eval") == 1 and "final eval" not in results[1].stdout
    assert records(out, "eval")[-1]["samples"] == 200


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_rank0_setup_failure_stops_every_rank_without_waiting_for_the_timeout(tmp_path: Path) -> None:
    """W&B cannot start on rank 0: without a launcher to kill rank 1, it must learn it and exit.

    dist.timeout_s=300 would be the wait if rank 1 went on into its first collective.
    """
    import time

    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path / "home"),
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path)}
    start = time.monotonic()
    results = srun_like(2, ["data.name=synthetic", "log.wandb=true", "dist.timeout_s=300",
                            f"output_dir={tmp_path}/run"], env=env, timeout=100)
    assert time.monotonic() - start < 90
    assert [r.returncode for r in results] == [2, 2]
    assert results[0].stderr.strip().startswith("dtrain: error: W&B could not start a run")
    assert "dtrain: error" not in results[1].stderr  # rank 0's error, relayed: said once, by rank 0


@pytest.mark.multiproc
def test_a_diverged_loss_is_written_as_strict_json(tmp_path: Path) -> None:
    import json

    out = tmp_path / "run"
    train(load_config(None, ["data.name=synthetic", "train.epochs=1", "optim.lr=1e12", "log.every_steps=1",
                             "train.on_nonfinite=ignore",
                             f"output_dir={out}"]), environ={})

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} in metrics.jsonl")

    rows = [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["loss"] is None for r in rows if r["split"] == "train")
    # and the plot command still draws such a run
    res = run([sys.executable, "-m", "dtrain.plot", str(out)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_accelerate_launch_runs_the_same_job(tmp_path: Path) -> None:
    """`accelerate launch` (its torch elastic launcher) gives the same losses as torchrun."""
    pytest.importorskip("accelerate")
    from helpers import dtrain

    args = ["data.name=synthetic", "train.epochs=1", "log.every_steps=4"]
    acc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
               "-m", "dtrain", *args, f"output_dir={tmp_path}/acc"], timeout=150)
    assert acc.returncode == 0, acc.stderr
    runtime = yaml.safe_load((tmp_path / "acc" / "config.yaml").read_text())["runtime"]
    assert runtime["launcher"] == "torchrun" and runtime["world_size"] == 2
    dtrain(2, [*args, f"output_dir={tmp_path}/torchrun"])
    assert [r["loss"] for r in records(tmp_path / "acc")] == [r["loss"] for r in records(tmp_path / "torchrun")]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_randomness_differs_between_ranks_and_repeats_run_after_run(tmp_path: Path) -> None:
    """Dropout masks differ between the 2 ranks; initial weights do not; a second run is bit-identical."""
    def one(tag: str) -> Path:
        out = tmp_path / tag
        out.mkdir()
        dtrain(2, ["data.name=synthetic", "data.train_size=200", "data.num_workers=2", "data.fast_path=false",
                   "train.epochs=2",
                   "model.name=tests.workers.dropout_model:build", f"output_dir={out / 'run'}"],
               env={"DTRAIN_TEST_RNG_OUT": str(out)})
        return out

    a, b = one("a"), one("b")
    masks = [torch.load(a / f"mask_rank{r}.pt") for r in (0, 1)]
    assert masks[0].shape == masks[1].shape and not torch.equal(masks[0], masks[1])
    assert 0.3 < masks[0].float().mean().item() < 0.7  # it really is p=0.5 dropout
    inits = [torch.load(a / f"init_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    for r in (0, 1):
        assert torch.equal(torch.load(b / f"mask_rank{r}.pt"), torch.load(a / f"mask_rank{r}.pt"))
    wa, wb = torch.load(a / "run" / "model.pt"), torch.load(b / "run" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_rank_that_fails_during_set_up_stops_the_others_at_once(tmp_path: Path, failing_rank: int) -> None:
    """One rank's model factory raises: the other must not wait in DDP's first broadcast until the timeout."""
    import time

    start = time.monotonic()
    res = dtrain(2, ["data.name=synthetic", "model.name=tests.workers.failing_model:build_or_raise",
                     "dist.timeout_s=300", f"output_dir={tmp_path / 'run'}"],
                 env={"DTRAIN_TEST_FAIL_RANK": str(failing_rank)}, check=False, timeout=100)
    elapsed = time.monotonic() - start
    assert res.returncode != 0 and elapsed < 60, elapsed
    other = 1 - failing_rank
    line = (f"rank {failing_rank} failed during set-up: model factory tests.workers.failing_model:build_or_raise "
            "raised RuntimeError: failing_model: deliberate failure in the factory")
    assert line in res.stderr, res.stderr
    # the rank that did not fail says which one did (rank 0 prints without a rank tag)
    assert (f"dtrain: error (rank {other}): {line}" if other else f"dtrain: error: {line}") in res.stderr
    print(f"set-up failure on rank {failing_rank}: every rank out after {elapsed:.1f} s")


# ---------------------------------------------------------------- factories that return something unusable

@pytest.mark.multiproc
@pytest.mark.parametrize("args, says", [
    (["model.name=tests.workers.bad_factories:too_few_classes"],
     "model.name=tests.workers.bad_factories:too_few_classes: the model gives 9 outputs per sample (outputs (32, 9)), "
     "but the data has 10 classes; expected outputs [batch, 10] (or more) for loss.name=cross_entropy"),
    (["model.name=tests.workers.bad_factories:one_output", "data.name=tests.workers.bad_factories:regression_data",
      "loss.name=mse"],
     "loss.name=mse: the model's outputs (32, 1) float32 and the targets (32,) float32 must have the same shape "
     "(the outputs of model.name=tests.workers.bad_factories:one_output)"),
    (["model.name=tests.workers.bad_factories:no_parameters"],
     "the model (Flatten, from model.name=tests.workers.bad_factories:no_parameters) has no parameters"),
    (["model.name=tests.workers.bad_factories:returns_a_loss_dict"],
     "model.name=tests.workers.bad_factories:returns_a_loss_dict: the model returned a dict with keys ['loss']; "
     "expected a tensor of outputs"),
    (["loss.name=tests.workers.bad_factories:batch_mean_loss"],
     "loss.name tests.workers.bad_factories:batch_mean_loss returned shape () for a batch of 32; expected one value "
     "per sample"),
], ids=["classes", "regression-shape", "no-parameters", "dict-without-logits", "batch-mean-loss"])
def test_an_unusable_factory_is_one_line_before_training(tmp_path: Path, args: list[str], says: str) -> None:
    out = tmp_path / "run"
    line = one_line_error(["data.name=synthetic", "data.num_workers=0", f"output_dir={out}", *args])
    assert says in line
    assert not out.exists()  # found in set-up: nothing written, nothing trained
