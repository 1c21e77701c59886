"""The notes' MLP and CIFAR CNN, user factories by import path, and the YAML presets in configs/."""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from torch import nn

from dtrain.config import Config, ConfigError, ModelConfig, load_config
from dtrain.errors import DTrainError
from dtrain.models.builtin import build_model, mlp
from dtrain.run import train
from helpers import REPO, dtrain, records

DIGITS, MNIST, CIFAR = (64,), (1, 28, 28), (3, 32, 32)


def linears(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------- built-in models

@pytest.mark.parametrize("shape, width", [(DIGITS, 64), (MNIST, 784), (CIFAR, 3072)])
def test_mlp_input_width_comes_from_the_dataset(shape: tuple[int, ...], width: int) -> None:
    model = build_model(ModelConfig(name="mlp"), shape, 10)
    assert linears(model) == [(width, 128), (128, 64), (64, 10)]
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_mlp_hidden_widths_follow_the_config() -> None:
    model = build_model(ModelConfig(name="mlp", hidden=[16]), MNIST, 3)
    assert linears(model) == [(784, 16), (16, 3)]


def test_cnn_on_cifar_is_the_notes_architecture() -> None:
    model = build_model(ModelConfig(name="cnn"), CIFAR, 10)
    kinds = [type(m).__name__ for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.Linear))]
    assert kinds == ["Conv2d", "MaxPool2d"] * 3 + ["Flatten", "Linear", "Linear"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 32), (32, 64)]
    assert linears(model) == [(1024, 64), (64, 10)]  # 64 channels x 4 x 4 after three halvings of 32
    assert model(torch.randn(4, *CIFAR)).shape == (4, 10)


def test_cnn_on_mnist_shapes_trains() -> None:
    model = build_model(ModelConfig(name="cnn"), MNIST, 10)
    assert linears(model)[0] == (64 * 3 * 3, 64)  # 28 -> 14 -> 7 -> 3
    out = model(torch.randn(4, *MNIST))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape, needle", [(DIGITS, "use model.name=mlp"), ((1, 4, 4), "at least 8x8")])
def test_cnn_refuses_inputs_it_cannot_take(shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(DTrainError) as err:
        build_model(ModelConfig(name="cnn"), shape, 10)
    msg = str(err.value)
    assert "model.name" in msg and needle in msg and "\n" not in msg


# ---------------------------------------------------------------- user factories

FACTORY_MODULE = "dtrain_test_factories"
FACTORY_SOURCE = '''
import math
from torch import nn

CALLS = []
VALUE = 3


def make(input_shape, num_classes):
    CALLS.append({"input_shape": input_shape, "num_classes": num_classes})
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def make_with_options(*, input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Linear(width, num_classes))


class Zoo:
    @staticmethod
    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def not_a_module(input_shape, num_classes):
    return "a string"


def wrong_arguments(shape, classes):
    raise AssertionError("must not be called")
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(FACTORY_MODULE)
    yield sys.modules[FACTORY_MODULE]
    sys.modules.pop(FACTORY_MODULE, None)


@pytest.mark.parametrize("attr, expected", [("make", [(784, 10)]), ("make_with_options", [(784, 8), (8, 10)]),
                                            ("Zoo.tiny", [(784, 10)])])
def test_factory_by_import_path(factories: object, attr: str, expected: list[tuple[int, int]]) -> None:
    model = build_model(load_config(None, [f"model.name={FACTORY_MODULE}:{attr}"]).model, MNIST, 10)
    assert linears(model) == expected
    assert model(torch.randn(2, *MNIST)).shape == (2, 10)


def test_factory_gets_the_datasets_shape_in_a_real_run(factories: object, tmp_path: Path) -> None:
    cfg = load_config(None, [f"model.name={FACTORY_MODULE}:make", "data.name=synthetic", "data.train_size=64",
                             "data.eval_size=16", "data.num_features=12", "data.num_classes=3", "train.epochs=1",
                             "train.device=cpu", "log.progress=lines", f"output_dir={tmp_path / 'run'}"])
    final = train(cfg, environ={}).eval
    assert factories.CALLS == [{"input_shape": (12,), "num_classes": 3}]  # type: ignore[attr-defined]
    assert final is not None and final["samples"] == 16


@pytest.mark.parametrize("path, needle", [
    ("no_such_package_zz.models:make", "cannot import 'no_such_package_zz.models'"),
    (f"{FACTORY_MODULE}:missing", "has no callable 'missing'"),
    (f"{FACTORY_MODULE}:VALUE", "has no callable 'VALUE'"),
    (f"{FACTORY_MODULE}:not_a_module", "returned str, not a torch.nn.Module"),
    (f"{FACTORY_MODULE}:wrong_arguments", "cannot be called with []: missing a required argument: 'shape'"),
    (":make", "allowed: mlp | cnn"),
    (f"{FACTORY_MODULE}:", "allowed: mlp | cnn"),
])
def test_bad_factory_paths_are_one_line_errors(factories: object, path: str, needle: str) -> None:
    with pytest.raises(DTrainError) as err:
        # ModelConfig directly: on the command line "pkg:" would already be YAML for a mapping.
        build_model(ModelConfig(name=path), MNIST, 10)
    msg = str(err.value)
    named = f"config key 'model.name' has value {path!r}" in msg or f"model factory {path} " in msg
    assert named and needle in msg and "\n" not in msg


def test_name_without_colon_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=resnet18"])


# ---------------------------------------------------------------- configs/ presets

CONFIGS = REPO / "configs"
PRESETS = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])


def input_shape(cfg: Config) -> tuple[int, ...]:
    if cfg.data.name == "digits":
        return DIGITS
    if cfg.data.name == "synthetic":
        return (cfg.data.num_features,)
    # The datasets' real shapes, written here rather than read from dtrain.data.vision.
    return {"mnist": MNIST, "fashion_mnist": MNIST, "cifar10": CIFAR}[cfg.data.name]


def test_the_presets_are_there() -> None:
    names = {p.stem for p in PRESETS}
    assert {"default", "mnist_mlp", "fashion_mnist_mlp", "cifar10_cnn", "synthetic_tiny"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_its_model_fits_its_data(path: Path) -> None:
    cfg = load_config(str(path))
    if cfg.data.name == "tokens":  # tiny Shakespeare as characters: 65 of them, windows of block_size ids
        model = build_model(cfg.model, (cfg.data.block_size,), 65)
        assert model(torch.randint(0, 65, (2, cfg.data.block_size))).shape == (2, cfg.data.block_size, 65)
        return
    classes = cfg.data.num_classes if cfg.data.name == "synthetic" else 10
    model = build_model(cfg.model, input_shape(cfg), classes)
    assert model(torch.randn(2, *input_shape(cfg))).shape == (2, classes)


@pytest.mark.parametrize("stem, data, model", [("mnist_mlp", "mnist", "mlp"),
                                               ("fashion_mnist_mlp", "fashion_mnist", "mlp"),
                                               ("cifar10_cnn", "cifar10", "cnn"),
                                               ("synthetic_tiny", "synthetic", "mlp")])
def test_presets_are_what_their_names_say(stem: str, data: str, model: str) -> None:
    cfg = load_config(str(CONFIGS / f"{stem}.yaml"))
    assert (cfg.data.name, cfg.model.name) == (data, model)
    # No fixed output_dir: every run of a preset gets a new directory, so none resumes or
    # refuses another by accident.
    assert cfg.output_dir == ""


def test_cifar10_preset_uses_sgd_with_momentum() -> None:
    cfg = load_config(str(CONFIGS / "cifar10_cnn.yaml"))
    assert cfg.optim.name == "sgd" and cfg.optim.momentum > 0


def test_default_preset_is_the_dataclass_defaults() -> None:
    assert load_config(str(CONFIGS / "default.yaml")) == load_config()


def test_default_preset_lists_every_key() -> None:
    # It is the documented reference of all keys: a field added to dtrain/config/schema.py belongs here too.
    def keys(node: object, prefix: str = "") -> set[str]:
        if not isinstance(node, dict):
            return {prefix}
        return set().union(*(keys(v, f"{prefix}{k}.") for k, v in node.items())) if node else {prefix}

    written = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    defaults = dataclasses.asdict(Config())
    assert keys(written) == keys(defaults)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_synthetic_tiny_preset_runs_without_importing_torchvision(tmp_path: Path) -> None:
    cfg = load_config(str(CONFIGS / "synthetic_tiny.yaml"))
    out = tmp_path / "run"
    # Python's own import log on stderr: proof that the optional vision extra stays unloaded.
    result = dtrain(0, ["--config", str(CONFIGS / "synthetic_tiny.yaml"), f"output_dir={out}"],
                    env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "torch" in imported and "dtrain.run" in imported  # the log is really there
    assert not [m for m in imported if m.startswith("torchvision")]
    evals = records(out, "eval")
    assert [r["epoch"] for r in evals] == list(range(1, cfg.train.epochs + 1))
    assert all(r["samples"] == cfg.data.eval_size for r in evals)
    epochs = records(out, "train_epoch")
    assert all(r["samples"] == cfg.data.train_size for r in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert math.isfinite(evals[-1]["loss"])


# ---------------------------------------------------------------- model.init and model.freeze

@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_init_schemes_follow_their_formulas(scheme: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=[512], init=scheme), (784,), 10)
    w = model[1].weight  # 784 -> 512
    fan_in, fan_out = 784, 512
    std = {"xavier_uniform": math.sqrt(2 / (fan_in + fan_out)), "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
           "kaiming_uniform": math.sqrt(2 / fan_in), "kaiming_normal": math.sqrt(2 / fan_in)}[scheme]
    assert w.std().item() == pytest.approx(std, rel=0.02)
    if scheme.endswith("uniform"):
        assert w.abs().max().item() <= std * math.sqrt(3) + 1e-6
    assert all(torch.count_nonzero(m.bias) == 0 for m in model if isinstance(m, nn.Linear))
    torch.manual_seed(0)
    again = build_model(ModelConfig(name="mlp", hidden=[512], init=scheme), (784,), 10)
    assert torch.equal(again[1].weight, w)  # a function of the seed: the same on every rank


def test_default_init_leaves_the_layers_own() -> None:
    torch.manual_seed(0)
    a = build_model(ModelConfig(name="mlp"), (64,), 10)
    torch.manual_seed(0)
    b = mlp((64,), 10, (128, 64))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert torch.count_nonzero(a[1].bias) > 0


def test_freeze_keeps_parameters_fixed_and_out_of_the_optimizer(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from dtrain.__main__ import main

    args = ["data.name=synthetic", "train.epochs=2", "model.freeze=[1.*]", "log.progress=lines", "train.seed=5",
            f"output_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "  frozen: params=4224 (1.weight, 1.bias)" in out  # 32*128 + 128
    assert "default: lr=0.05 weight_decay=0 params=" in out
    torch.manual_seed(5)
    initial = mlp((32,), 10, (128, 64)).state_dict()
    final = torch.load(tmp_path / "model.pt")
    assert torch.equal(final["1.weight"], initial["1.weight"]) and torch.equal(final["1.bias"], initial["1.bias"])
    assert not torch.equal(final["3.weight"], initial["3.weight"])
