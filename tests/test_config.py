"""Config loading and validation: pure, plus the CLI's one-line errors in real subprocesses."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest

from dtrain.config import Config, load_config, to_yaml
from dtrain.config.typed import leaf_types
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
    with pytest.raises(DTrainError, match="config file '/nonexistent/x.yaml' not found"):
        load_config("/nonexistent/x.yaml")


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


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


@pytest.mark.multiproc
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
    assert args.config == [str(cfg_file)] and args.overrides == ["output_dir=runs/x", "optim.lr=0.2"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.output_dir, cfg.train.epochs, cfg.optim.lr) == ("runs/x", 7, 0.2)


@pytest.mark.multiproc
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


# --- values --------------------------------------------------------------------------------------

FLOAT_KEYS = [k for k, t in leaf_types(Config).items() if t in (float, Optional[float])]
INT_KEYS = [k for k, t in leaf_types(Config).items() if t in (int, Optional[int])]


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


def test_a_key_given_twice_on_the_command_line_takes_the_later() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.1", "train.epochs=5", "model.hidden=[4]",
                             "model.hidden=[8, 2]"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.model.hidden) == (5, 0.1, [8, 2])


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train.epocs' has value '3'; allowed: a known key; did you "
                                          r"mean 'train.epochs'\? the keys there are epochs, "):
        load_config(None, ["train.epocs=3"])
    with pytest.raises(ConfigError, match=r"^config key 'optimm' .*did you mean 'optim'\?"):
        load_config(None, ["optimm.lr=3"])


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


# --- every leaf key, every wrong type --------------------------------------------------------------

OMEGACONF_WORDS = ("Node", "ListConfig", "DictConfig", "omegaconf", "OmegaConf", "Incompatible value",
                   "is not a valid", "full_key", "object_type")


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


LEAVES = [(key, text) for key, tp in leaf_types(Config).items() for text in wrong_values(tp)]


def nested_yaml(key: str, text: str) -> str:
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{name}:" for i, name in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{leaf}: {text}"]) + "\n"


@pytest.mark.parametrize("key, text", LEAVES, ids=[f"{k}={t}" for k, t in LEAVES])
def test_every_key_refuses_wrong_types_in_one_line(key: str, text: str, tmp_path: Path) -> None:
    path = write(tmp_path, nested_yaml(key, text))
    for source in ("command line", "file"):
        with pytest.raises(ConfigError) as err:
            load_config(path) if source == "file" else load_config(None, [f"{key}={text}"])
        msg = str(err.value)
        assert msg.startswith(f"config key '{key}' has value "), (source, msg)
        assert "; allowed: " in msg and "\n" not in msg, (source, msg)
        assert not any(word in msg for word in OMEGACONF_WORDS), (source, msg)
        if source == "file":
            assert msg.endswith(f"(in {path} line {key.count('.') + 1})"), msg


def test_the_table_covers_every_section() -> None:
    sections = {key.split(".")[0] for key, _ in LEAVES}
    assert sections == {f.name for f in dataclasses.fields(Config)}
    assert len(LEAVES) > 5 * len(leaf_types(Config))
