"""The command line as a user meets it: answers before torch loads, files merged in order,
one line per job for a config error, and a run's config.yaml fed back reproduces the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import records, run, torchrun

BROKEN = "train:\n  epochs: [3\n"


def imported_modules(stderr: str) -> list[str]:
    """Module names from `-X importtime`'s log (one line per import, on stderr)."""
    return [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def other_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


@pytest.mark.multiproc
@pytest.mark.parametrize("args, rc, needle", [
    (["-m", "dtrain", "--help"], 0, ""),
    (["-m", "dtrain", "train.epochs=abc"], 2, "config key 'train.epochs' has value 'abc'"),
    (["-m", "dtrain", "optim.lr=inf"], 2, "config key 'optim.lr' has value 'inf'; allowed: a finite number"),
    (["-m", "dtrain", "--config", "{broken}"], 2, "line 3: while parsing a flow sequence"),
    (["-m", "dtrain", "--config", "{missing}"], 2, "not found"),
    (["-m", "dtrain", "--config", "mnist"], 2, "config 'mnist' is neither a preset nor a file; presets: "),
    (["-m", "dtrain", "--show-config", "train.bogus=1"], 2, "config key 'train.bogus' has value '1'"),
    (["-m", "dtrain.lr_find", "--help"], 0, ""),
    (["-m", "dtrain.lr_find", "lr_find.num_steps=1"], 2, "config key 'lr_find.num_steps' has value 1"),
    (["-m", "dtrain.plot", "--help"], 0, ""),
])
def test_help_and_config_errors_never_import_torch(args: list[str], rc: int, needle: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    args = [a.format(broken=broken, missing=tmp_path / "missing.yaml") for a in args]
    res = run([sys.executable, "-X", "importtime", *args, f"output_dir={tmp_path}/out"] if rc else
              [sys.executable, "-X", "importtime", *args], timeout=60)
    assert res.returncode == rc, res.stderr[-2000:]
    imported = imported_modules(res.stderr)
    assert "dtrain.cli" in imported  # the log is really there
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
    if rc:
        (line,) = other_lines(res.stderr)
        assert needle in line and line.startswith(f"{args[1]}: error: "), line
        assert not (tmp_path / "out").exists()
    else:
        assert "usage:" in res.stdout


@pytest.mark.multiproc
def test_two_config_files_merge_in_order_around_overrides(tmp_path: Path) -> None:
    # The range check on sched.min_lr (at most optim.lr) reports the merged values without training.
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim:\n  lr: 0.1\nsched:\n  min_lr: 0.05\n")
    b.write_text("sched:\n  min_lr: 0.5\n")
    res = run([sys.executable, "-m", "dtrain", "train.epochs=2", "--config", str(a), "optim.lr=0.3",
               "--config", str(b), f"output_dir={tmp_path}/out"], timeout=60)
    assert res.returncode == 2
    # b's min_lr won over a's; the override optim.lr=0.3 (given between them) won over a's 0.1.
    assert other_lines(res.stderr) == [
        f"dtrain: error: config key 'sched.min_lr' has value 0.5; allowed: a number in [0, optim.lr=0.3] "
        f"(in {b} line 2)"]
    res = run([sys.executable, "-m", "dtrain", "--config", str(b), "--config", str(a), "optim.lr=0.01",
               f"output_dir={tmp_path}/out"], timeout=60)
    assert other_lines(res.stderr) == [
        f"dtrain: error: config key 'sched.min_lr' has value 0.05; allowed: a number in [0, optim.lr=0.01] "
        f"(in {a} line 4)"]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_config_error_is_printed_once_per_job(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    for args in (["train.epochs=abc"], ["--config", str(broken)]):
        res = torchrun(2, ["-m", "dtrain", *args, f"output_dir={tmp_path}/out"], timeout=120)
        assert res.returncode != 0
        # torchrun's closing report repeats rank 0's line as its `traceback :`: that one is not ours.
        errors = [ln for ln in res.stderr.splitlines() if "dtrain: error" in ln and "traceback : " not in ln]
        assert len(errors) == 1 and errors[0].startswith("dtrain: error: "), res.stderr[-3000:]


@pytest.mark.parametrize("args, printed", [
    (["train.epochs=abc"], False),
    (["--config", "{broken}"], False),
    (["--config", "{missing}"], True),  # storage differs between nodes: each rank that misses it says so
])
def test_which_errors_a_rank_other_than_0_prints(args: list[str], printed: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.cli import run_cli

    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    monkeypatch.setenv("RANK", "1")
    args = [a.format(broken=broken, missing=tmp_path / "missing.yaml") for a in args]
    assert run_cli("dtrain", args, "no.such.module:never_called") == 2
    err = capsys.readouterr().err
    assert err == (f"dtrain: error (rank 1): config file '{tmp_path}/missing.yaml' not found\n" if printed else "")


TINY = ["data.name=synthetic", "data.train_size=96", "data.eval_size=40", "data.batch_size=16",
        "model.hidden=[16]", "train.epochs=2", "train.seed=3", "optim.lr=0.1", "log.progress=none",
        "log.every_steps=2"]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_runs_config_yaml_fed_back_reproduces_the_run(tmp_path: Path) -> None:
    first = run([sys.executable, "-m", "dtrain", *TINY], cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    (run_a,) = (tmp_path / "runs").iterdir()
    written = yaml.safe_load((run_a / "config.yaml").read_text())
    assert written["output_dir"] == "" and written["runtime"]["world_size"] == 1  # as asked, plus the launch

    second = run([sys.executable, "-m", "dtrain", "--config", str(run_a / "config.yaml")], cwd=tmp_path, timeout=120)
    assert second.returncode == 0, second.stderr
    (run_b,) = [p for p in (tmp_path / "runs").iterdir() if p != run_a]  # a new run, not "finished"
    eval_a, eval_b = records(run_a, "eval"), records(run_b, "eval")
    assert len(eval_a) == 2 and eval_a == eval_b  # every logged eval value, bit for bit
    weights_a = torch.load(run_a / "model.pt", weights_only=True)
    weights_b = torch.load(run_b / "model.pt", weights_only=True)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (run_b / "config.yaml").read_text() == (run_a / "config.yaml").read_text()


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_config_yaml_with_its_own_output_dir_continues_that_run(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    first = run([sys.executable, "-m", "dtrain", *TINY, f"output_dir={out}"], timeout=120)
    assert first.returncode == 0, first.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    again = run([sys.executable, "-m", "dtrain", "--config", str(out / "config.yaml")], timeout=120)
    assert again.returncode == 0 and f"the run in {out} finished at step 12" in again.stdout, again.stdout


@pytest.mark.multiproc
@pytest.mark.parametrize("args, needle", [
    (["train.epochs=abc"], "train.epochs"),
    (["train.bogus=1"], "train.bogus"),
    (["train.epochs=-1"], "train.epochs"),
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' not found"),
    (["train.precision=fp16", "train.device=cpu"], "train.precision"),
])
def test_cli_prints_one_line_and_exits_2(args: list[str], needle: str, tmp_path: Path) -> None:
    # -O strips asserts: validation must not depend on them.
    res = run([sys.executable, "-O", "-m", "dtrain", *args, f"output_dir={tmp_path}/out"], timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_overrides_may_come_before_and_after_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sbatch scripts put output_dir=... first and pass `--config FILE key=value` after it."""
    from dtrain.cli import parse_args
    from dtrain.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 7\n")
    args = parse_args("dtrain", ["output_dir=runs/x", "--config", str(cfg_file), "optim.lr=0.2"])
    assert args.config == [str(cfg_file)] and args.overrides == ["output_dir=runs/x", "optim.lr=0.2"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.output_dir, cfg.train.epochs, cfg.optim.lr) == ("runs/x", 7, 0.2)
