"""What each key accepts (dtrain/config/typed.py, validate.py): values of its annotated type, in range, one of its
choices; anything else is one line naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Optional

import pytest

from dtrain.config import Config, load_config
from dtrain.errors import ConfigError


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


# --- numbers ---------------------------------------------------------------------------------------

def leaves(cls: type, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the config with its annotated type, read from the dataclasses themselves."""
    hints = typing.get_type_hints(cls)
    found: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found.update(leaves(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            found[f"{prefix}{f.name}"] = tp
    return found


FLOAT_KEYS = [k for k, t in leaves(Config).items() if t in (float, Optional[float])]
INT_KEYS = [k for k, t in leaves(Config).items() if t in (int, Optional[int])]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", ".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_numbers_are_refused(key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config key '{key}' has value .*; allowed: a finite number"):
        load_config(None, [f"{key}={text}"])


def test_optim_lr_inf_is_refused_in_a_list_and_in_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config key 'optim.betas' .*item 1: a finite number"):
        load_config(None, ["optim.name=adam", "optim.betas=[0.9, .nan]"])
    with pytest.raises(ConfigError, match=r"^config key 'optim.param_groups\[0\].lr' has value inf"):
        load_config(None, ["optim.param_groups=[{params: '1.*', lr: .inf}]"])


@pytest.mark.parametrize("key", INT_KEYS)
def test_integers_must_fit_in_64_bits(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config key '{key}' has value 9223372036854775808; "
                                          "allowed: an integer that fits in 64 bits"):
        load_config(None, [f"{key}={2**63}"])
    cfg = load_config(None, [f"{key}={2**63 - 1}"]) if key == "train.max_steps" else None
    assert cfg is None or cfg.train.max_steps == 2**63 - 1


def test_empty_values_mean_unset_only_for_optional_keys() -> None:
    cfg = load_config(None, ["train.max_steps=5", "train.max_steps=", "log.project=p", "log.project="])
    assert cfg.train.max_steps is None and cfg.log.project is None
    assert load_config(None, ["output_dir=x", "output_dir="]).output_dir == ""  # a string key: the empty string
    with pytest.raises(ConfigError, match=r"^config key 'optim.lr' has value None; allowed: a finite number "
                                          r"\(null and an empty value mean unset, which this key does not allow\)$"):
        load_config(None, ["optim.lr="])
    with pytest.raises(ConfigError, match="^config key 'train.epochs' has value None"):
        load_config(None, ["train.epochs=null"])


def test_string_keys_take_the_text_as_written() -> None:
    cfg = load_config(None, ["log.run_name=007", "log.project=#1", "data.root=a: b", "log.entity='q'"])
    assert (cfg.log.run_name, cfg.log.project, cfg.data.root, cfg.log.entity) == ("007", "#1", "a: b", "q")


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train.epocs' has value '3'; allowed: a known key; did you "
                                          r"mean 'train.epochs'\? the keys there are epochs, "):
        load_config(None, ["train.epocs=3"])
    with pytest.raises(ConfigError, match=r"^config key 'optimm' .*did you mean 'optim'\?"):
        load_config(None, ["optimm.lr=3"])


# --- every leaf key, every wrong type --------------------------------------------------------------

def wrong_values(tp: object) -> list[str]:
    """YAML texts that are not of type `tp` (written here, by type, not taken from dtrain)."""
    inner = tp
    optional = typing.get_origin(tp) is typing.Union
    if optional:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    values = {
        str: ["[a, b]", "{a: 1}"],
        int: ["[1]", "{a: 1}", "abc", "'3'", "1.5", "true", "18446744073709551616"],
        float: ["[1.0]", "{a: 1}", "abc", "'0.1'", "true", ".inf", ".nan"],
        bool: ["[true]", "{a: 1}", "abc", "1", "'true'"],
    }.get(inner)  # type: ignore[call-overload]
    if values is None:
        origin = typing.get_origin(inner)
        values = {list: ["{a: 1}", "abc", "3"], dict: ["[1]", "abc", "3"]}[origin]
    return values if optional else [*values, "null"]


LEAVES = [(key, text) for key, tp in leaves(Config).items() for text in wrong_values(tp)]


def nested_yaml(key: str, text: str) -> str:
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{name}:" for i, name in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{leaf}: {text}"]) + "\n"


@pytest.mark.parametrize("key, text", LEAVES, ids=[f"{k}={t}" for k, t in LEAVES])
def test_every_key_refuses_wrong_types_in_one_line(key: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(nested_yaml(key, text))
    for source in ("command line", "file"):
        with pytest.raises(ConfigError) as err:
            load_config(path) if source == "file" else load_config(None, [f"{key}={text}"])
        msg = str(err.value)
        assert msg.startswith(f"config key '{key}' has value "), (source, msg)
        assert "; allowed: " in msg and "\n" not in msg, (source, msg)
        if source == "file":
            assert msg.endswith(f"(in {path} line {key.count('.') + 1})"), msg
