"""`python -m dtrain --help` teaches (sections, presets, commands, the reference) and `--show-config` prints
the resolved config; both answer without torch and write nothing."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from dtrain.__main__ import main
from dtrain.config import Config, load_config, presets, to_yaml
from helpers import run
from test_cli import imported_modules


def test_help_lists_every_section_the_presets_the_commands_and_the_reference(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    lines = out.splitlines()
    for f in dataclasses.fields(Config):
        if f.name not in ("output_dir", "overwrite", "resume"):
            (line,) = [ln for ln in lines if ln.startswith(f"  {f.name} ")]
            assert len(line.split()) > 2, f"section {f.name} has no line"
    assert "  top-level keys: output_dir, overwrite, resume" in lines
    assert all(name in out for name in presets.names())
    for command in ("dtrain.lr_find", "dtrain.eval", "dtrain.predict", "dtrain.plot"):
        assert f"python -m {command} " in out
    assert "docs/reference/config.md" in out and "--show-config" in out


def test_show_config_prints_what_the_run_would_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", "synthetic_tiny", "optim.lr=0.05", "train.max_steps=3"]
    assert main(["--show-config", *args]) == 0
    out = capsys.readouterr().out
    expected = load_config("synthetic_tiny", args[2:])
    assert out == to_yaml(expected) and "runtime" not in out
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config("shown.yaml") == expected  # fed back as a file, the same config
    assert [p.name for p in tmp_path.iterdir()] == ["shown.yaml"]  # nothing else written


def test_show_config_with_a_bad_key_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--show-config", "train.bogus=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("dtrain: error: config key 'train.bogus' has value '1'")
    assert len(captured.err.splitlines()) == 1


@pytest.mark.multiproc
@pytest.mark.parametrize("args", [["--help"], ["--show-config", "--config", "synthetic_tiny", "train.max_steps=2"]])
def test_help_and_show_config_never_import_torch(args: list[str], tmp_path: Path) -> None:
    res = run([sys.executable, "-X", "importtime", "-m", "dtrain", *args], cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    imported = imported_modules(res.stderr)
    assert "dtrain.usage" in imported  # the log is really there
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
    assert list(tmp_path.iterdir()) == []
