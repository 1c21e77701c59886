"""Config loading and validation: pure, plus the CLI's one-line errors in real subprocesses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dtrain.config import Config, load_config
from dtrain.errors import ConfigError, DTrainError
from helpers import run


def test_defaults_are_the_digits_mlp() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.data.name, cfg.model.name, cfg.optim.name) == ("digits", "mlp", "sgd")


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  seed: 3\noptim:\n  lr: 0.2\n")
    cfg = load_config(str(f), ["train.epochs=2", "model.hidden=[16,8]", "train.max_steps=5"])
    assert cfg.train.epochs == 2 and cfg.train.seed == 3 and cfg.optim.lr == 0.2
    assert cfg.model.hidden == [16, 8] and cfg.train.max_steps == 5


def test_override_values_are_typed() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.nesterov=true", "optim.lr=1e-3"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.nesterov is True and cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochz=3", "train.epochz"),
    ("nosuch.key=1", "nosuch"),
    ("train.epochs=0", "train.epochs"),
    ("data.batch_size=-4", "data.batch_size"),
    ("data.name=imagenet", "data.name"),
    ("optim.name=rmsprop", "optim.name"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.precision=fp8", "train.precision"),
    ("dist.backend=mpi", "dist.backend"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_nesterov_without_momentum_is_refused() -> None:
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])


def test_missing_config_file() -> None:
    with pytest.raises(DTrainError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize("args, needle", [
    (["train.epochs=abc"], "train.epochs"),
    (["train.bogus=1"], "train.bogus"),
    (["train.epochs=-1"], "train.epochs"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["train.precision=fp16", "train.device=cpu"], "train.precision"),
])
def test_cli_prints_one_line_and_exits_2(args: list[str], needle: str, tmp_path: Path) -> None:
    # -O strips asserts: validation must not depend on them.
    res = run([sys.executable, "-O", "-m", "dtrain", *args, f"output_dir={tmp_path}/out"], timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    (out / ".dtrain-run").write_text("")  # an earlier dtrain run's (a directory without it is refused anyway)
    res = run([sys.executable, "-m", "dtrain", "data.name=synthetic", f"output_dir={out}"], timeout=60)
    assert res.returncode == 2 and "overwrite=true" in res.stderr
    assert (out / "metrics.jsonl").read_text() == '{"split": "train", "step": 1}\n'


def test_overrides_may_come_before_and_after_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sbatch scripts put output_dir=... first and pass `--config FILE key=value` after it."""
    from dtrain.cli import parse_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 7\n")
    args = parse_args("dtrain", ["output_dir=runs/x", "--config", str(cfg_file), "optim.lr=0.2"])
    assert args.config == str(cfg_file) and args.overrides == ["output_dir=runs/x", "optim.lr=0.2"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.output_dir, cfg.train.epochs, cfg.optim.lr) == ("runs/x", 7, 0.2)


def test_slurm_scripts_are_valid_bash_and_set_up_for_clusters() -> None:
    import subprocess
    from pathlib import Path

    for script in sorted((Path(__file__).resolve().parent.parent / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        text = script.read_text()
        for needle in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                       "--cpus-per-task=", "# source ", 'output_dir="runs/slurm-${SLURM_JOB_ID}" "$@"'):
            assert needle in text, (script.name, needle)
    torchrun_script = (Path(__file__).resolve().parent.parent / "slurm" / "train_torchrun.sbatch").read_text()
    assert "29500" not in torchrun_script and 'trap "" USR1 USR2' in torchrun_script
    assert "NPROC_PER_NODE" in torchrun_script
