"""Loading a config (dtrain/config/load.py, yamlfile.py): defaults <- YAML files <- overrides, each failure one
line naming the file and line, and a written config that reads back the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.config import Config, load_config, to_yaml
from dtrain.errors import ConfigError, DTrainError


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


# --- YAML files --------------------------------------------------------------------------------

def write(tmp_path: Path, text: "str | bytes", name: str = "c.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, needle, line", [
    ("train:\n  epochs: [3\n", "expected ',' or ']'", 3),
    ("train:\n epochs: 3\n  seed: 1\n", "mapping values are not allowed", 3),
    (b"train:\n  epochs: 3\n\xff\xfe\x00garbage", "not UTF-8 text", 3),
    ("train:\n  epochs: 3\x00\n", "a character YAML does not allow (0x00)", 2),
    ("- 1\n- 2\n", "holds a list; allowed: a mapping", None),
    ("3\n", "holds the single value 3; allowed: a mapping", None),
    ("just words\n", "holds the single value 'just words'", None),
    ("train:\n  epochs: 3\n  seed: 1\n  epochs: 4\n", "duplicate key 'epochs' (first on line 2)", 4),
    ("optim: {lr: 0.1, lr: 0.2}\n", "duplicate key 'lr'", 1),
    ("a: 1\n---\nb: 2\n", "expected a single document", 2),
    ("train:\n  seed: !!python/name:os.getpid\n", "the tag '!!python/name:os.getpid' is not read", 2),
    ("train:\n  seed: !!binary aGk=\n", "the tag '!!binary' is not read", 2),
    ("train:\n  seed: !mine 3\n", "the tag '!mine' is not read", 2),
    ("when: 2024-01-01\ntrain: !!set {a}\n", "the tag '!!set' is not read", 2),
])
def test_bad_yaml_files_are_one_line_naming_file_and_line(tmp_path: Path, text, needle, line) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    at = f" line {line}" if line else ""
    assert msg.startswith(f"config file '{path}'{at}: ") and needle in msg and "\n" not in msg, msg


def test_a_yaml_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"train:\n  seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not read"):
        load_config(path)
    assert not marker.exists()


def test_empty_and_comment_only_files_set_nothing(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()
    assert load_config(write(tmp_path, "# all commented out\ntrain:\n  # epochs: 3\n", "c.yaml")) == Config()


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DTrainError, match=f"^config file '{tmp_path}/nope.yaml' not found$"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=f"^config file '{tmp_path}': a directory; allowed: a YAML file$"):
        load_config(str(tmp_path))


def test_yaml_values_follow_yaml_1_2(tmp_path: Path) -> None:
    # PyYAML alone reads 1e-3 as a string and 010 as 8; `yes` is a string, dates stay text.
    cfg = load_config(write(tmp_path, "optim: {name: adam, lr: 1e-3, eps: 1.5E-7}\ntrain: {seed: 010}\n"
                                      "log: {run_name: 2024-01-01, project: yes}\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.train.seed) == (0.001, 1.5e-7, 10)
    assert (cfg.log.run_name, cfg.log.project) == ("2024-01-01", "yes")


def test_a_bad_value_in_a_file_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  seed: 1\n  epochs: 0\noptim:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=rf"^config key 'optim.lr' has value 'abc'; allowed: a finite number "
                                          rf"\(in {path} line 5\)$"):
        load_config(path)
    path = write(tmp_path, "train:\n  seed: 1\n  epochs: 0\n")  # a range check, after merging
    with pytest.raises(ConfigError, match=rf"^config key 'train.epochs' has value 0; .* \(in {path} line 3\)$"):
        load_config(path)


def test_config_files_merge_in_order(tmp_path: Path) -> None:
    a = write(tmp_path, "train: {epochs: 3, seed: 5}\nmodel: {kwargs: {a: 1, b: {c: 2}}}\n", "a.yaml")
    b = write(tmp_path, "train: {epochs: 4}\nmodel: {kwargs: {b: {d: 3}}}\noptim: {lr: 0.5}\n", "b.yaml")
    cfg = load_config([a, b], ["train.seed=6", "train.seed=7"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.optim.lr) == (4, 7, 0.5)
    assert cfg.model.kwargs == {"a": 1, "b": {"c": 2, "d": 3}}
    assert load_config([b, a]).train.epochs == 3


def test_a_key_given_twice_on_the_command_line_takes_the_later() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.1", "train.epochs=5", "model.hidden=[4]",
                             "model.hidden=[8, 2]"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.model.hidden) == (5, 0.1, [8, 2])


def test_override_without_a_value() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train.epochs' has no value; allowed: key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"for a YAML file, --config my.yaml$"):
        load_config(None, ["my.yaml"])


def test_tilde_is_the_home_directory_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(write(tmp_path, "output_dir: ~/runs/a\ndata: {root: ~/data}\n"), ["resume=~/ck/step-1"])
    assert (cfg.output_dir, cfg.data.root, cfg.resume) == (f"{tmp_path}/runs/a", f"{tmp_path}/data",
                                                          f"{tmp_path}/ck/step-1")
    assert load_config(None, ["resume=never"]).resume == "never"


def test_a_written_config_reads_back_the_same(tmp_path: Path) -> None:
    # Strings that look like other values must come back as strings: to_yaml quotes them.
    cfg = load_config(None, ["log.run_name=1e3", "log.project=yes", "log.entity=010", "log.tags=['null', 'true']",
                             "model.kwargs={a: [1, 2.5, null], b: 'x'}", "optim.param_groups=[{params: '1.*'}]"])
    path = write(tmp_path, to_yaml(cfg, {"runtime": {"world_size": 2}}))
    assert load_config(path) == cfg
