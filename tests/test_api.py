"""Your own model, data, loss and metrics: the Python API, the examples, user factories, one-line refusals."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dtrain
from dtrain.__main__ import main
from helpers import REPO, dtrain as run_dtrain, records, rel_diff, run
from test_logging import read_wandb_run, tensorboard_points, wandb_env, wandb_points

EXAMPLES = REPO / "examples"
USER = "tests.workers.user_code"


def _user_lines(path: Path) -> int:
    """Lines of user code: no blank lines, comments or the module docstring."""
    text = re.sub(r'^""".*?"""\n', "", path.read_text(), flags=re.S)
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


# ---------------------------------------------------------------- the regression example

def _plain_regression_mse() -> float:
    """The notes' loop in plain PyTorch: same data, model, seed and hyperparameters, one process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(1000, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(x[:800], y[:800]), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        return nn.functional.mse_loss(model(x[800:]), y[800:]).item()


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [0, 2])
def test_regression_example_trains_like_plain_pytorch(tmp_path: Path, nproc: int) -> None:
    script = str(EXAMPLES / "regression.py")
    cmd = [sys.executable, script] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    res = run(cmd, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("eval MSE")]  # rank 0 alone prints it
    ours, plain = float(line.split()[-1]), _plain_regression_mse()
    print(f"regression example (W={max(nproc, 1)}): eval MSE {ours:.4f}, plain PyTorch {plain:.4f}; "
          f"{_user_lines(EXAMPLES / 'regression.py')} lines of user code")
    if nproc == 0:  # the same hyperparameters: within 10%
        assert abs(ours - plain) <= 0.1 * plain
    else:  # two ranks double the global batch (half the steps): it still trains to the noise floor
        assert ours < 1.5 * plain
    (out,) = (tmp_path / "runs").iterdir()
    assert records(out, "eval")[-1]["mae"] > 0


def test_examples_are_short() -> None:
    assert _user_lines(EXAMPLES / "regression.py") < 15
    assert _user_lines(EXAMPLES / "resnet_imagefolder.py") < 15


# ---------------------------------------------------------------- resnet18 on an ImageFolder

def _image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for split, n in (("train", 12), ("val", 5)):
        for cls, tint in (("cats", 0), ("dogs", 2)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(40, 40, 3, generator=g) * 120).to(torch.uint8)
                pixels[..., tint] += 120
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc", [0, 2])
def test_resnet_imagefolder_example_runs(tmp_path: Path, nproc: int) -> None:
    images = _image_folder(tmp_path / "images")
    script = str(EXAMPLES / "resnet_imagefolder.py")
    args = [str(images), "train.epochs=2", "data.batch_size=6"]
    cmd = [sys.executable, script, *args] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    res = run(cmd, cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=280)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("eval accuracy") == 1
    (out,) = (tmp_path / "runs").iterdir()
    ev = records(out, "eval")
    assert len(ev) == 2 and ev[-1]["samples"] == 10


# ---------------------------------------------------------------- the CLI with user code

REGRESSION = [f"data.name={USER}:regression", "loss.name=mse", "train.epochs=2", "train.seed=3", "optim.lr=0.05",
              "log.every_steps=1"]


@pytest.fixture(scope="module")
def mse_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mse") / "w1_b64_k1"
    run_dtrain(0, [*REGRESSION, "data.batch_size=64", f"output_dir={out}"])
    return out


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("w, b, k", [(2, 16, 2), (4, 16, 1)])
def test_mse_on_a_user_factory_is_exact_at_any_scale(mse_reference: Path, tmp_path: Path, w: int, b: int,
                                                     k: int) -> None:
    out = tmp_path / "run"
    run_dtrain(w, [*REGRESSION, f"data.batch_size={b}", f"train.grad_accum_steps={k}", f"output_dir={out}"])
    worst = 0.0
    for split in ("train", "train_epoch", "eval"):
        a, c = records(mse_reference, split), records(out, split)
        assert [(r["step"], r["samples"]) for r in a] == [(r["step"], r["samples"]) for r in c]
        worst = max([worst] + [rel_diff(ra["loss"], rc["loss"]) for ra, rc in zip(a, c)])
    assert worst < 1e-5
    assert records(out, "train_epoch")[0]["samples"] == 800  # the factory's 4/5 split
    wa, wc = torch.load(mse_reference / "model.pt"), torch.load(out / "model.pt")
    for name in wa:
        torch.testing.assert_close(wc[name], wa[name], rtol=1e-4, atol=1e-6)
    assert set(records(out, "eval")[0]) >= {"loss", "mae", "samples"}
    print(f"mse W={w} B={b} K={k}: largest relative loss difference {worst:.2e}")


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_user_loss_and_metric_reach_every_logger(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_dtrain(2, [f"data.name={USER}:regression", f"loss.name={USER}:huber", f"loss.metrics=[{USER}:max_error,mae]",
                   "train.epochs=2", "log.wandb=true", "log.tensorboard=true", f"output_dir={out}"],
               env=wandb_env(tmp_path))
    ev = records(out, "eval")
    assert all(set(r) == {"split", "step", "epoch", "loss", "max_error", "mae", "samples"} for r in ev)
    assert ev[-1]["max_error"] >= ev[-1]["mae"] > 0
    for points, rel in ((wandb_points(read_wandb_run(tmp_path / "wandb")), 1e-9),
                        (tensorboard_points(out / "tensorboard"), 1e-6)):
        for name in ("loss", "max_error", "mae"):
            got = points[f"eval/{name}"]
            assert [s for s, _ in got] == [r["step"] for r in ev]
            assert all(rel_diff(v, r[name]) <= rel for (_, v), r in zip(got, ev)), name
    assert records(out, "train")[0]["loss"] > 0  # the train records carry the user's loss


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_torchvision_resnet18_through_model_name_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_dtrain(2, [f"data.name={USER}:cifar_like", "data.kwargs={size: 48}", "model.name=torchvision.models:resnet18",
                   "model.kwargs={num_classes: 10}", "data.batch_size=8", "train.epochs=1", "optim.lr=0.01",
                   f"output_dir={out}"], timeout=280)
    (ev,) = records(out, "eval")
    assert ev["samples"] == 32 and 0 <= ev["accuracy"] <= 1
    state = torch.load(out / "model.pt")
    assert state["fc.weight"].shape == (10, 512) and "bn1.running_mean" in state


def test_dict_batches_with_configured_keys(tmp_path: Path) -> None:
    assert main([f"data.name={USER}:dicts", "data.input_key=features", "data.target_key=label", "train.epochs=3",
                 "model.kwargs={num_classes: 10}",
                 "log.progress=none", f"output_dir={tmp_path}"]) == 0
    ev = records(tmp_path, "eval")
    assert ev[-1]["samples"] == 50 and ev[-1]["accuracy"] > ev[0]["accuracy"] - 0.2


# ---------------------------------------------------------------- wrong user code: one line, exit 2

@pytest.mark.parametrize("args, needle", [
    ([f"data.name={USER}:one_dataset"], f"data factory {USER}:one_dataset returned TensorDataset; "
                                        "expected (train_dataset, eval_dataset) or dtrain.Datasets"),
    ([f"data.name={USER}:iterable"], "the train dataset is a Stream; expected a map-style dataset"),
    ([f"data.name={USER}:raising"], f"data factory {USER}:raising raised FileNotFoundError: no images under"),
    ([f"data.name={USER}:triples"], "a batch is a tuple of 3; expected (inputs, targets) pairs"),
    ([f"data.name={USER}:regression", f"loss.name={USER}:batch_mean_loss", "model.name=mlp"],
     f"loss.name {USER}:batch_mean_loss returned shape () for a batch of 32"),
    ([f"data.name={USER}:regression"],  # cross_entropy by default, on float targets
     "loss.name=cross_entropy needs at least 2 classes, but the model's outputs are (32, 1) float32"),
    ([f"data.name={USER}:regression", "loss.name=mse", "model.name=torch.nn:Identity"],
     "has no parameters: nothing to train"),
    (["data.name=synthetic", f"model.name={USER}:not_a_module"],
     "the factory returned str, not a torch.nn.Module"),
    (["data.name=synthetic", "model.name=torchvision.models:resnet18", "model.kwargs={num_clases: 10}"],
     "model factory torchvision.models:resnet18 raised TypeError"),
    (["model.freeze=[nothing.*]"], "config key 'model.freeze[0]' has value 'nothing.*'"),
])
def test_wrong_user_code_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     needle: str) -> None:
    assert main([*args, "train.epochs=1", "log.progress=none", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dtrain: error: "), err
    assert needle in err, err


# ---------------------------------------------------------------- the Python API in-process

def test_api_takes_objects_config_and_overrides(tmp_path: Path) -> None:
    x = torch.randn(90, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    cfg = dtrain.load_config(None, ["train.epochs=4", "log.progress=none"])
    seen = []

    def factory(input_shape, num_classes):  # type: ignore[no-untyped-def]
        seen.append((input_shape, num_classes))
        return nn.Linear(input_shape[0], num_classes)

    result = dtrain.train(model=factory, train_data=TensorDataset(x[:60], y[:60]),
                          eval_data=TensorDataset(x[60:], y[60:]), loss=nn.CrossEntropyLoss(),
                          metrics={"acc": "accuracy"}, config=cfg, overrides=[f"output_dir={tmp_path}", "optim.lr=0.2"])
    assert seen == [((4,), 2)]
    assert isinstance(result.model, nn.Linear) and result.is_main and result.config.optim.lr == 0.2
    assert result.eval is not None and set(result.eval) == {"loss", "acc", "samples"} and result.eval["acc"] > 0.8
    assert records(tmp_path, "train_epoch")[0]["samples"] == 60


def test_api_without_eval_data_trains_without_eval(tmp_path: Path) -> None:
    x = torch.randn(40, 3)
    result = dtrain.train(model=nn.Linear(3, 1), train_data=TensorDataset(x, x.sum(1, keepdim=True)), loss="mse",
                          overrides=["train.epochs=2", "log.progress=none", f"output_dir={tmp_path}"])
    assert result.eval is None and records(tmp_path, "eval") == []
    assert len(records(tmp_path, "train_epoch")) == 2


def test_the_result_says_where_the_run_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no output_dir: the run picks runs/<date>-<time> under the working directory
    x = torch.randn(16, 3)
    result = dtrain.train(model=nn.Linear(3, 1), train_data=TensorDataset(x, x.sum(1, keepdim=True)), loss="mse",
                          overrides=["train.epochs=1", "log.progress=none"])
    made = [p for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and Path(result.output_dir).resolve() == made[0].resolve()
    assert (made[0] / "metrics.jsonl").exists() and (made[0] / "model.pt").exists()


@pytest.mark.multiproc
def test_importing_dtrain_imports_no_torch() -> None:
    res = run([sys.executable, "-c", "import sys, dtrain; dtrain.load_config; print('torch' in sys.modules)"])
    assert res.stdout.strip() == "False", res.stderr


def test_a_bf16_model_trains_under_bf16_autocast_past_the_first_batch_check(tmp_path: Path) -> None:
    """The set-up check runs the model as training will (under train.precision's autocast): a model
    kept in bf16 is fine with precision=bf16, though float32 inputs could not go through it bare."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    model = nn.Linear(8, 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        model(x)  # float32 inputs into bf16 weights, without autocast
    before = model.weight.detach().clone()
    result = dtrain.train(model=model, train_data=TensorDataset(x, y), loss=nn.CrossEntropyLoss(),
                          overrides=["train.epochs=1", "train.precision=bf16", "log.progress=none",
                                     f"output_dir={tmp_path}"])
    assert result.model.weight.dtype == torch.bfloat16
    trained = result.model.weight.detach()
    assert not torch.equal(trained, before) and bool(torch.isfinite(trained).all())  # it really stepped
