"""Typed run configuration: dataclass defaults <- YAML files <- `key=value` overrides, and written back.

dtrain/config/yamlfile.py reads the files (plain values only, duplicate keys refused),
dtrain/config/typed.py checks each value against its field's type as it merges, and
dtrain/config/validate.py adds the range and choice checks that types cannot express. Every
failure is a one-line `ConfigError` naming the key, the value and what is allowed. Nothing
here imports torch: the command line answers before it loads.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Optional, Sequence, Union

from dtrain.config import presets, typed, yamlfile
from dtrain.config.schema import Config
from dtrain.config.validate import validate
from dtrain.errors import ConfigError, DTrainError


class ConfigFileError(ConfigError):
    """A config file that cannot be read as a mapping of plain values; the same on every rank."""

    def __init__(self, path: str, problem: str, line: Optional[int] = None) -> None:
        at = f" line {line}" if line else ""
        super().__init__("", path, problem, f"config file '{path}'{at}: {problem}")


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file ({} when it is empty); one-line errors for anything else."""
    try:
        tree = yamlfile.read(path)
    except FileNotFoundError:
        # Not a ConfigFileError: another node may lack a file that rank 0 has, so every rank says it.
        raise DTrainError(f"config file '{path}' not found{presets.hint(path)}") from None
    except IsADirectoryError:
        raise ConfigFileError(path, "a directory; allowed: a YAML file") from None
    except OSError as exc:
        raise DTrainError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    except yamlfile.YamlProblem as exc:
        raise ConfigFileError(path, exc.problem, exc.line) from None
    if tree is None:
        return {}  # empty, or only comments: no values
    if not isinstance(tree, dict):
        kind = "a list" if isinstance(tree, list) else f"the single value {typed.show(tree)}"
        raise ConfigFileError(path, f"holds {kind}; allowed: a mapping of sections and keys, e.g. "
                              "'train: {epochs: 3}'")
    # A run's config.yaml records the launch that happened (world size, precision...) under runtime:.
    # It describes, it does not configure, so the file can be fed back as it is.
    tree.pop("runtime", None)
    return tree


def load_config(config_file: Union[str, "os.PathLike[str]", Sequence[str], None] = None,
                overrides: Sequence[str] = (), base_config: Optional[Config] = None) -> Config:
    """Build the run's config: defaults (or `base_config`) <- YAML files, in order <- overrides, in order
    (a key given twice: the later wins); DTrainError on bad input. Imports no torch.
    A file is a path, or a preset's name (`mnist_mlp`: configs/mnist_mlp.yaml, as the package carries it)."""
    if config_file is None:
        files: list[str] = []
    elif isinstance(config_file, (str, os.PathLike)):
        files = [os.fspath(config_file)]
    else:
        files = [os.fspath(f) for f in config_file]
    if base_config is not None:
        cfg = copy.deepcopy(base_config)
        typed.check(cfg)  # built in Python: no file or parser has typed it
    else:
        cfg = Config()
    origins: dict[str, str] = {}  # key -> where a file set it, for the range checks' messages
    for path in files:
        path = presets.resolve(os.path.expanduser(path))
        typed.merge(cfg, read_config_file(path), "", origins, path)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            hint = f"; for a YAML file, --config {item}" if item.endswith((".yaml", ".yml")) else ""
            raise ConfigError(key, None, "", f"config key '{key}' has no value; allowed: key=value overrides, "
                              f"e.g. train.epochs=3{hint}")
        typed.set_override(cfg, key.strip(), text, origins)
    _expand_paths(cfg)
    try:
        validate(cfg)
    except ConfigError as exc:
        where = origins.get(exc.key.split("[")[0], "")
        if where:
            raise ConfigError(exc.key, exc.value, exc.allowed, f"{exc} ({where})") from None
        raise
    return cfg


def _expand_paths(cfg: Config) -> None:
    """`~` in a path means the home directory wherever it is written (file, command line, API)."""
    cfg.data.root = os.path.expanduser(cfg.data.root)
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if cfg.resume not in ("auto", "never"):
        cfg.resume = os.path.expanduser(cfg.resume)


def to_dict(cfg: Config, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Plain nested dicts and lists, e.g. for W&B's run config; `extra` adds top-level sections."""
    return {**dataclasses.asdict(cfg), **(extra or {})}


def to_yaml(cfg: Config, extra: Optional[dict[str, Any]] = None) -> str:
    """What `load_config` reads back as the same config (a `runtime:` section in `extra` is ignored there)."""
    return yamlfile.dump(to_dict(cfg, extra))
