"""The main job end to end, as a user starts it, and the process group's lifetime."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from dtrain.config import load_config
from dtrain.errors import DTrainError
from dtrain.run import train
from helpers import REPO, records, run


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_default_job_with_four_processes_and_no_arguments(tmp_path: Path) -> None:
    res = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
               "-m", "dtrain"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=240)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "runs" / "default"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "model.pt"]
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime == {"launcher": "torchrun", "precision": "fp32", "device": "cpu", "backend": "gloo",
                       "world_size": 4, "per_process_batch": 32, "grad_accum_steps": 1, "global_batch": 128}
    rows = records(out)
    # Only rank 0 writes: one record per (split, step), none repeated by other ranks.
    assert max(Counter((r["split"], r["step"]) for r in rows).values()) == 1
    evals = records(out, "eval")
    assert len(evals) == 20 and evals[-1]["samples"] == 359
    assert evals[-1]["accuracy"] >= 0.90
    # Rank 0 alone prints progress: the final line once, not four times.
    assert res.stdout.count("final eval") == 1
    print(f"default job, 4 processes: accuracy {evals[-1]['accuracy']:.4f}")


def test_process_group_is_destroyed_on_error(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "model.name=workers.failing_model:build",
                             f"output_dir={tmp_path}/run"])
    with pytest.raises(Exception):
        train(cfg, environ={})
    assert not dist.is_initialized()


def test_process_group_is_destroyed_after_success(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=3", f"output_dir={tmp_path}/run"])
    result = train(cfg, environ={})
    assert result.loop.step == 3 and not dist.is_initialized()


def test_second_run_into_same_dir_is_refused_and_keeps_the_first(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=synthetic", "train.max_steps=2", f"output_dir={tmp_path}/run"])
    train(cfg, environ={})
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(DTrainError, match="overwrite=true"):
        train(cfg, environ={})
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert not dist.is_initialized()
