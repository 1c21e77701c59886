"""A finished run's model again: `python -m dtrain.eval`, `python -m dtrain.predict` and `dtrain.load`.

Every check is against what the run itself recorded (its final eval record) or against plain PyTorch on the
saved weights, never against dtrain's own inference code. One short run, trained in this process, serves the
fast tests; a BatchNorm factory run on 2 ranks serves the multi-process ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtrain
from dtrain.checkpoint import store
from dtrain.config import DataConfig, load_config
from dtrain.data.builtin import synthetic
from dtrain.errors import DTrainError
from dtrain.eval import main as eval_main
from dtrain.predict import main as predict_main
from helpers import predict_on_three_ranks, dtrain as run_dtrain, records, rel_diff, run, torchrun

SEED = 7
DATA = ["data.name=synthetic", "data.train_size=300", "data.eval_size=101", "data.eval_batch_size=16"]
# Task.eval_sums adds each sample's value in float64, so other shards change only float64 rounding.
ACROSS_WORLD_SIZES = 1e-9


def _plain_mlp(state: dict) -> nn.Module:
    """The default MLP written out in plain torch (Flatten, 32-128-64-10), with `state` loaded."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    model.load_state_dict(state)
    return model.eval()


def _eval_x() -> torch.Tensor:
    return synthetic(DataConfig(name="synthetic", train_size=300, eval_size=101), SEED).eval.tensors[0]


def _plain_outputs(state: dict) -> torch.Tensor:
    with torch.no_grad():
        return _plain_mlp(state)(_eval_x())


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, in this process: 10 steps, checkpoints at steps 5 and 10."""
    from dtrain.run import train

    out = tmp_path_factory.mktemp("mlp") / "run"
    train(load_config(None, [*DATA, f"train.seed={SEED}", "train.epochs=1", "checkpoint.every_steps=5",
                             "log.progress=none", f"output_dir={out}"]), environ={})
    return out


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like mlp_run, with an EMA, the best checkpoint by accuracy and evals every 4 steps on 5 batches only."""
    from dtrain.run import train

    out = tmp_path_factory.mktemp("ema") / "run"
    train(load_config(None, [*DATA, f"train.seed={SEED}", "train.epochs=2", "ema.decay=0.8",
                             "checkpoint.monitor=accuracy", "checkpoint.mode=max", "eval.every_steps=4",
                             "eval.max_batches=5", "log.progress=none", f"output_dir={out}"]), environ={})
    return out


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks, a user factory with BatchNorm (each rank's running statistics differ until eval shares them)."""
    out = tmp_path_factory.mktemp("factory") / "run"
    run_dtrain(2, ["data.name=synthetic", "data.train_size=301", "data.eval_size=101", "data.num_features=64",
                   "data.batch_size=10", "data.eval_batch_size=16", f"train.seed={SEED}", "train.epochs=1",
                   "optim.lr=0.1", "model.name=tests.workers.bn_cnn:build", "log.progress=none",
                   f"output_dir={out}"])
    return out


def _final_eval(run_dir: Path) -> dict:
    record = records(run_dir, "eval")[-1]
    finished = json.loads((run_dir / "checkpoints" / "finished.json").read_text())
    assert record["step"] == finished["step"]
    values = {k: v for k, v in record.items() if k not in ("split", "step", "epoch")}
    assert values == finished["eval"]
    return values


def _snapshot(run_dir: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def _eval_here(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = eval_main(args)
    got = capsys.readouterr()
    return code, got.out, got.err


# ---------------------------------------------------------------- one process, in this process

def test_eval_reproduces_the_final_record_bit_for_bit(mlp_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    before = _snapshot(mlp_run)
    code, out, err = _eval_here([str(mlp_run), "--out", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "eval.json").read_text())["eval"]
    assert got == _final_eval(mlp_run)  # bitwise: the same world size as the run
    (line,) = out.splitlines()
    assert line.startswith("dtrain.eval: loss ") and "on 101 samples" in line and "model.pt" in line
    assert _snapshot(mlp_run) == before  # nothing written into the run


def test_eval_of_the_best_and_the_ema_weights_reproduces_their_records(ema_run: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    final = _final_eval(ema_run)
    best_step = json.loads((ema_run / "checkpoints" / "best.json").read_text())["step"]
    last_step = records(ema_run, "eval")[-1]["step"]
    assert best_step != last_step and final["samples"] == 5 * 16  # eval.max_batches

    def record(split: str, step: int) -> dict:
        (row,) = [r for r in records(ema_run, split) if r["step"] == step]
        return {k: v for k, v in row.items() if k not in ("split", "step", "epoch")}

    for choice, want in (("last", final), ("best", record("eval", best_step)),
                         ("ema", record("eval_ema", last_step))):
        code, _, err = _eval_here([str(ema_run), "--checkpoint", choice, "--out", str(tmp_path / "e.json")], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "e.json").read_text())["eval"] == want, choice


def test_eval_on_another_eval_set_named_by_override(mlp_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from tests.workers.inference_data import other_eval

    code, _, err = _eval_here([str(mlp_run), "data.name=tests.workers.inference_data:other_eval",
                               "data.kwargs={size: 77}", "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())["eval"]
    x, y = other_eval(SEED, 77).eval.tensors
    with torch.no_grad():
        logits = _plain_mlp(torch.load(mlp_run / "model.pt"))(x)
    assert got["samples"] == 77
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-12)


def test_load_gives_the_saved_model_on_the_cpu_in_eval_mode(mlp_run: Path) -> None:
    model, cfg = dtrain.load(mlp_run)
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    assert cfg.model.name == "mlp" and cfg.data.eval_size == 101
    with torch.no_grad():
        ours = model(_eval_x())
    torch.testing.assert_close(ours, _plain_outputs(torch.load(mlp_run / "model.pt")), rtol=0, atol=0)


def test_predict_in_one_process_writes_pt_and_npy(mlp_run: Path, tmp_path: Path) -> None:
    assert predict_main([str(mlp_run), str(tmp_path / "p.pt")]) == 0
    assert predict_main([str(mlp_run), str(tmp_path / "p.npy")]) == 0
    saved = torch.load(tmp_path / "p.pt")
    expected = _plain_outputs(torch.load(mlp_run / "model.pt"))
    assert torch.equal(saved["index"], torch.arange(101))
    torch.testing.assert_close(saved["outputs"], expected, rtol=1e-6, atol=1e-6)
    assert numpy.array_equal(numpy.load(tmp_path / "p.npy"), saved["outputs"].numpy())


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def _checkpoint_model(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step-{step:09d}" / "state.pt"
    return torch.load(path, weights_only=True)["train"]["model"]


def _same_weights(model: nn.Module, state: dict) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)


def test_checkpoint_choices(mlp_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(mlp_run, tmp_path / "run")
    step5, step10 = _checkpoint_model(run_dir, 5), _checkpoint_model(run_dir, 10)
    assert not torch.equal(step5["1.weight"], step10["1.weight"])
    assert _same_weights(dtrain.load(run_dir)[0], torch.load(run_dir / "model.pt"))
    assert _same_weights(dtrain.load(run_dir, run_dir / "checkpoints" / "step-000000005")[0], step5)
    torch.save(step5, tmp_path / "weights.pt")
    assert _same_weights(dtrain.load(run_dir, tmp_path / "weights.pt")[0], step5)

    # best: the checkpoint best.json names, unless model_best.pt is there
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps(
        {"step": 5, "checkpoint": "step-000000005", "monitor": "loss", "mode": "min", "value": 1.0}))
    assert _same_weights(dtrain.load(run_dir, "best")[0], step5)
    torch.save(step10, run_dir / "model_best.pt")
    assert _same_weights(dtrain.load(run_dir, "best")[0], step10)

    # ema: the newest checkpoint's EMA state, unless model_ema.pt is there
    ema = {k: v + 1 for k, v in step5.items()}
    payload = torch.load(run_dir / "checkpoints" / "step-000000010" / "state.pt", weights_only=True)
    payload["states"] = {"ema": {"weights": ema}}
    store.save(str(run_dir), 11, 1, payload, keep=5)
    assert _same_weights(dtrain.load(run_dir, "ema")[0], ema)
    torch.save(step5, run_dir / "model_ema.pt")
    assert _same_weights(dtrain.load(run_dir, "ema")[0], step5)

    # last of a run that has not finished: its newest checkpoint, not a model.pt that may be stale
    os.remove(run_dir / "checkpoints" / "finished.json")
    assert _same_weights(dtrain.load(run_dir)[0], payload["train"]["model"])


def _broken(mlp_run: Path, tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "no config":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    run_dir = _copy(mlp_run, tmp_path / "run")
    config = run_dir / "config.yaml"
    if kind == "no weights":
        shutil.rmtree(run_dir / "checkpoints")
        os.remove(run_dir / "model.pt")
    elif kind == "model object":
        config.write_text(config.read_text() + "  model: Net\n")  # what run.py records for dtrain.train(model=Net)
    elif kind == "loss object":
        config.write_text(config.read_text() + "  loss: my_loss\n")
    elif kind == "factory gone":
        text = config.read_text()
        assert "model:\n  name: mlp\n" in text
        config.write_text(text.replace("model:\n  name: mlp\n", "model:\n  name: tests.workers.gone:build\n"))
    return run_dir


FAILURES = [
    ("missing", [], "run directory not found"),
    ("no config", [], "is not a dtrain run: it has no config.yaml"),
    ("no weights", [], "has no weights to load"),
    ("model object", [], "trained on a model handed to dtrain.train (model=Net)"),
    ("factory gone", [], "tests.workers.gone"),
    ("loss object", [], "trained on a loss handed to dtrain.train (loss=my_loss)"),
    ("ok", ["model.hidden=[16]"], "do not fit the model"),
    ("ok", ["train.epocs=1"], "did you mean 'train.epochs'"),
    ("ok", ["--checkpoint", "best"], "has no best weights (no model_best.pt and no checkpoints/best.json"),
    ("ok", ["--checkpoint", "ema"], "has no EMA weights"),
    ("ok", ["--checkpoint", "step-12"], "checkpoint 'step-12' not found"),
]


@pytest.mark.parametrize("kind, args, says", FAILURES, ids=[f"{k}:{' '.join(a)}" for k, a, _ in FAILURES])
def test_a_failure_is_one_line_and_exit_2(mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          kind: str, args: list[str], says: str) -> None:
    run_dir = _broken(mlp_run, tmp_path, kind)
    code, out, err = _eval_here([str(run_dir), *args], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("dtrain.eval: error: ") and says in line, err
    if kind == "loss object":  # a model needs no loss
        assert isinstance(dtrain.load(run_dir)[0], nn.Module)
    elif not args or args[0] == "--checkpoint":  # the same problem through the Python door
        with pytest.raises(DTrainError, match="^" + re.escape(line.split(": error: ", 1)[1])):
            dtrain.load(run_dir, args[1] if args else "last")


def test_predict_refuses_an_unknown_output_format(mlp_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert predict_main([str(mlp_run), str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err.strip() == f"dtrain.predict: error: OUT_FILE '{tmp_path / 'p.csv'}' must end in " \
                                              ".pt or .npy"


# ---------------------------------------------------------------- several processes

def _eval_json(nproc: int, run_dir: Path, out: Path) -> dict:
    if nproc == 1:
        assert eval_main([str(run_dir), "--out", str(out)]) == 0
    else:
        res = torchrun(nproc, ["-m", "dtrain.eval", str(run_dir), "--out", str(out)])
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("dtrain.eval: loss") == 1  # rank 0 alone reports
    return json.loads(out.read_text())["eval"]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("which, nproc", [("mlp", 2), ("mlp", 3), ("factory", 1), ("factory", 2), ("factory", 3)])
def test_eval_reproduces_the_final_record_at_any_world_size(request: pytest.FixtureRequest, tmp_path: Path,
                                                            which: str, nproc: int) -> None:
    run_dir: Path = request.getfixturevalue(f"{which}_run")
    trained_on = 1 if which == "mlp" else 2
    got, want = _eval_json(nproc, run_dir, tmp_path / "eval.json"), _final_eval(run_dir)
    print(f"{which} run (trained on {trained_on}), eval on {nproc}: loss {got['loss']!r} vs the record's "
          f"{want['loss']!r} (rel {rel_diff(got['loss'], want['loss']):.1e}), accuracy {got['accuracy']!r} vs "
          f"{want['accuracy']!r}")
    assert got["samples"] == want["samples"] == 101
    if nproc == trained_on:
        assert got == want
    else:
        assert got["accuracy"] == want["accuracy"]
        assert rel_diff(got["loss"], want["loss"]) <= ACROSS_WORLD_SIZES


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_predict_on_three_ranks_writes_every_sample_once_in_order(mlp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.pt"
    saved = predict_on_three_ranks(mlp_run, out)
    torch.testing.assert_close(saved["outputs"], _plain_outputs(torch.load(mlp_run / "model.pt")),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_failure_from_the_command_line_is_one_line(mlp_run: Path, tmp_path: Path) -> None:
    res = run([sys.executable, "-m", "dtrain.eval", str(tmp_path / "nowhere")], timeout=90)
    assert res.returncode == 2 and res.stderr.strip() == f"dtrain.eval: error: run directory not found: " \
                                                         f"{tmp_path / 'nowhere'}"
    res = torchrun(2, ["-m", "dtrain.eval", str(mlp_run), "--checkpoint", "best"])
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("dtrain.eval: error")]
    assert res.returncode != 0 and len(ours) == 1 and "has no best weights" in ours[0], res.stderr


def test_predict_takes_the_outputs_of_a_model_that_returns_a_tuple(tmp_path: Path) -> None:
    """The model is called as in training: the first element of a tuple is the outputs."""
    from dtrain.run import train
    from tests.workers.tuple_model import Pair

    out = tmp_path / "run"
    train(load_config(None, [*DATA, f"train.seed={SEED}", "train.epochs=1", "log.progress=none",
                             "model.name=tests.workers.tuple_model:build", f"output_dir={out}"]), environ={})
    assert predict_main([str(out), str(tmp_path / "p.pt")]) == 0
    plain = Pair(32, 10)
    plain.load_state_dict(torch.load(out / "model.pt"))
    with torch.no_grad():
        expected = plain.eval()(_eval_x())[0]
    torch.testing.assert_close(torch.load(tmp_path / "p.pt")["outputs"], expected, rtol=1e-6, atol=1e-6)
