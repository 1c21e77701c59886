"""Presets by name (`--config mnist_mlp`) from the package, written once in configs/; paths work as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.config import load_config, presets
from dtrain.errors import ConfigError, DTrainError
from helpers import REPO


def test_every_file_in_configs_is_a_preset_by_name() -> None:
    written = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert not list((REPO / "configs").glob("*.yml"))  # the wheel ships *.yaml (pyproject.toml's package-data)
    assert written and presets.names() == written
    for name in written:
        assert load_config(name) == load_config(str(REPO / "configs" / f"{name}.yaml"))


def test_a_name_is_read_from_the_package_and_a_path_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("synthetic_tiny", ["train.epochs=5"]).train.epochs == 5
    assert load_config(["synthetic_tiny", "mnist_mlp"]).data.name == "mnist"  # merged in order, as files are
    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 7\n")
    assert load_config("mine.yaml").train.epochs == 7
    # A file whose name is a bare word was read before presets existed: it still is.
    (tmp_path / "synthetic_tiny").write_text("train:\n  epochs: 9\n")
    assert load_config("synthetic_tiny").train.epochs == 9


def test_an_unknown_name_lists_the_presets_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("mnist")
    assert str(info.value) == ("config 'mnist' is neither a preset nor a file; presets: cifar10_cnn, default, "
                               "fashion_mnist_mlp, mnist_mlp, shakespeare_char, shakespeare_char_cpu, synthetic_tiny "
                               "(or a path to a YAML file)")


def test_messages_name_the_file_a_user_can_open() -> None:
    # In a clone that is configs/ itself, not the package's link to it.
    assert presets.resolve("mnist_mlp") == str((REPO / "configs" / "mnist_mlp.yaml").resolve())


def test_a_presets_path_outside_a_clone_names_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DTrainError, match=r"^config file 'configs/mnist_mlp.yaml' not found "
                                          r"\(the preset by name: mnist_mlp\)$"):
        load_config("configs/mnist_mlp.yaml")
    with pytest.raises(DTrainError, match=r"^config file 'mine.yaml' not found$"):
        load_config("mine.yaml")
