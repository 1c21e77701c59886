"""The wheel works anywhere: built from the sources, installed (not editable) into a fresh virtual environment
and run from a directory outside the clone, presets by name included."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

SCRIPT = """\
import sys
import dtrain

by_name = dtrain.train(config="synthetic_tiny", overrides=["train.max_steps=2", "output_dir=api_name"])
by_path = dtrain.train(config=sys.argv[1], overrides=["output_dir=api_path"])
print(dtrain.__file__, by_name.config.data.name, by_path.config.train.max_steps, sorted(by_path.eval))
"""

PTH = "dependencies.pth"
MINE = """\
data: {name: synthetic, train_size: 64, eval_size: 32, num_features: 8, num_classes: 3}
model: {hidden: [8]}
train: {max_steps: 3, device: cpu}
log: {progress: none}
"""


def call(cmd: list, cwd: Path, timeout: float = 120) -> str:
    # Not helpers.run: its environment puts the clone on PYTHONPATH, which is what this test must not have.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
    return res.stdout


def build_wheel(tmp: Path) -> Path:
    # Built from a copy: pip writes build/ and an egg-info into the source tree, which the clone under test
    # (and any other test running from it) must not see. The link dtrain/presets -> ../configs is copied as a link.
    src = tmp / "src"
    shutil.copytree(REPO / "dtrain", src / "dtrain", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "configs", src / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # With setuptools here (Python < 3.12 venvs have it) nothing is downloaded; without it pip fetches one.
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    call([sys.executable, "-m", "pip", "wheel", src, "--no-deps", *offline, "-q", "-w", tmp / "dist"], cwd=src)
    (wheel,) = (tmp / "dist").glob("dtrain-*.whl")
    return wheel


def make_venv(tmp: Path, wheel: Path) -> Path:
    """A fresh environment holding the wheel; torch and the other dependencies are this environment's."""
    venv = tmp / "venv"
    call([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    call([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], cwd=tmp)
    # --system-site-packages would give the base interpreter's packages, not this venv's torch. A .pth line
    # adds a directory to sys.path without running the .pth files in it, so the editable install's finder
    # there stays out; the venv's own site-packages comes first.
    dirs = {str(Path(importlib.util.find_spec(name).origin).parent.parent)
            for name in ("torch", "yaml", "sklearn", "tqdm")}  # where this environment has the dependencies
    purelib = call([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip()
    Path(purelib, PTH).write_text("\n".join(sorted(dirs)) + "\n")
    return venv


def dependencies(venv: Path) -> list[str]:
    (pth,) = venv.glob(f"lib/*/site-packages/{PTH}")
    return pth.read_text().split()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_the_wheel_runs_from_outside_the_clone(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    shipped = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dtrain/presets/"))
    assert shipped == sorted(f"dtrain/presets/{p.name}" for p in (REPO / "configs").glob("*.yaml"))

    venv = make_venv(tmp_path, wheel)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = call([python, "-c", "import dtrain, json, sys; print(json.dumps([dtrain.__file__, sys.path]))"], cwd=away)
    installed, path = json.loads(where)
    assert installed.startswith(str(venv)) and installed.endswith("dtrain/__init__.py"), installed
    clone = [p for p in path if p.startswith(str(REPO)) and not p.startswith(str(tmp_path))]
    assert not [p for p in clone if p not in dependencies(venv)], path

    help_text = call([bin_dir / "dtrain", "--help"], cwd=away)
    assert "synthetic_tiny" in help_text and "mnist_mlp" in help_text

    args = ["--config", "synthetic_tiny", "train.max_steps=2", "output_dir=main"]
    shown = call([bin_dir / "dtrain", "--show-config", *args], cwd=away)
    assert not (away / "main").exists()
    call([python, "-m", "dtrain", *args], cwd=away)
    assert (away / "main" / "model.pt").is_file() and (away / "main" / "metrics.jsonl").is_file()
    written = (away / "main" / "config.yaml").read_text()
    assert written.startswith(shown) and written[len(shown):].startswith("runtime:")  # the run's config, exactly

    call([python, "-m", "dtrain.lr_find", "--config", "synthetic_tiny", "lr_find.num_steps=3", "output_dir=lr"],
         cwd=away)
    assert (away / "lr" / "lr_find" / "lr_find.csv").is_file() and (away / "lr" / "lr_find" / "lr_find.json").is_file()

    (away / "mine.yaml").write_text(MINE)  # a path still works, as it did
    (away / "script.py").write_text(SCRIPT)
    out = call([python, "script.py", "mine.yaml"], cwd=away)
    assert out.splitlines()[-1].split()[:3] == [installed, "synthetic", "3"], out
    assert (away / "api_name" / "model.pt").is_file() and (away / "api_path" / "model.pt").is_file()
