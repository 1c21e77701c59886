"""Optimizers, per-layer parameter groups, LR schedules and the Loop's state round trip.

Expected values are computed here from the formulas in docs/guides/lr-finder.md, never by
calling dtrain's own schedule code, so a wrong formula in dtrain fails.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from torch import nn

from dtrain.__main__ import main as dtrain_main
from dtrain.config import Config, OptimConfig, ParamGroupConfig, SchedConfig, load_config
from dtrain.data.builtin import build_datasets
from dtrain.data.loaders import build_loaders
from dtrain.data.source import Window
from dtrain.runtime.dist import DistState, distributed
from dtrain.loop.meters import Meter
from dtrain.loop.state import TrainState
from dtrain.loop.step import train_step
from dtrain.runtime.env import LaunchInfo
from dtrain.errors import ConfigError
from dtrain.models.builtin import build_model, mlp
from dtrain.loop.optim import build_optimizer, lr_multiplier, param_groups
from dtrain.run import train
from dtrain.setup import build_train_state
from dtrain.loop.task import build_task
from helpers import dtrain, records

CE = build_task("cross_entropy", [], "input", "target")

SINGLE = LaunchInfo("single", 0, 0, 1, "127.0.0.1", None)


# ---------------------------------------------------------------- closed forms


def expected_lr(name: str, i: int, base: float, total: int, warm: int, min_lr: float = 0.0,
                step_size: int = 100, gamma: float = 0.1) -> float:
    """The lr of 0-based optimizer step i, written out from the documented schedule.

    Warm-up: base * (i + 1) / warm for i < warm. The decay starts at the peak
    step p = max(warm - 1, 0) and, for cosine and linear, reaches min_lr at
    step total - 1.
    """
    if i < warm:
        return base * (i + 1) / warm
    p = max(warm - 1, 0)
    t = i - p
    if name == "constant":
        return base
    if name == "step":
        return base * gamma ** (t // step_size)
    frac = min(1.0, t / max(1, total - 1 - p))
    if name == "cosine":
        return min_lr + (base - min_lr) * (1 + math.cos(math.pi * frac)) / 2
    if name == "linear":
        return base + (min_lr - base) * frac
    raise ValueError(name)


CASES = [
    ("constant", 0, {}), ("constant", 4, {}),
    ("step", 0, {"step_size": 3, "gamma": 0.5}), ("step", 2, {"step_size": 4, "gamma": 0.1}),
    ("cosine", 0, {}), ("cosine", 3, {"min_lr": 0.01}), ("cosine", 1, {}),
    ("linear", 0, {"min_lr": 0.02}), ("linear", 5, {}),
]


@pytest.mark.parametrize("name,warm,kw", CASES)
def test_lr_multiplier_matches_closed_form(name: str, warm: int, kw: dict[str, Any]) -> None:
    base, total = 0.1, 20
    cfg = SchedConfig(name=name, warmup_steps=warm, **kw)
    f = lr_multiplier(cfg, base, total)
    for i in range(total + 3):  # a few past the end: cosine/linear must stay at min_lr
        want = expected_lr(name, i, base, total, warm, cfg.min_lr, cfg.step_size, cfg.gamma)
        assert base * f(i) == pytest.approx(want, rel=1e-12, abs=1e-15), (name, warm, i)


def test_schedule_endpoints() -> None:
    """The properties docs/guides/lr-finder.md promises, independent of the exact formula."""
    base, total = 0.2, 50
    cos = lr_multiplier(SchedConfig(name="cosine", warmup_steps=5, min_lr=0.02), base, total)
    peak = [base * cos(i) for i in range(total)]
    assert peak[0] == pytest.approx(base / 5)  # the first step already moves the weights
    assert peak[4] == pytest.approx(base) and max(peak) == pytest.approx(base)
    assert sum(1 for v in peak if v == pytest.approx(base)) == 1  # one peak step, no plateau
    assert peak[-1] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(peak[4:], peak[5:]))  # monotone decay after the peak


def test_group_lrs_follow_the_schedule_in_proportion() -> None:
    model = mlp((8,), 3, [4])
    cfg = OptimConfig(lr=0.1, param_groups=[ParamGroupConfig(params="3.*", lr=0.4)])
    opt, _ = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(SchedConfig(name="linear"), 0.1, 10))
    for _ in range(6):
        opt.step()
        sched.step()
        default, head = (g["lr"] for g in opt.param_groups)
        assert head == pytest.approx(4 * default)


# ---------------------------------------------------------------- param groups


def _named_counts(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters()}


def test_param_groups_resolution_counts() -> None:
    model = mlp((64,), 10, [128, 64])  # Flatten, Linear(1), ReLU, Linear(3), ReLU, Linear(5)
    n = _named_counts(model)
    cfg = OptimConfig(lr=0.05, weight_decay=0.01, param_groups=[
        ParamGroupConfig(params="1.*", lr=0.0),
        ParamGroupConfig(params="5.weight", weight_decay=0.5)])
    groups, infos = param_groups(cfg, model)
    summary = {g.name: (g.lr, g.weight_decay, g.num_params) for g in infos}
    assert summary == {
        "default": (0.05, 0.01, n["3.weight"] + n["3.bias"] + n["5.bias"]),
        "1.*": (0.0, 0.01, 64 * 128 + 128),
        "5.weight": (0.05, 0.5, 64 * 10),
    }
    # The torch groups hold every trainable parameter exactly once.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.05, 0.01), (0.0, 0.01), (0.05, 0.5)]


def test_no_decay_bias_norm_puts_vectors_at_zero_decay() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    cfg = OptimConfig(weight_decay=0.1, no_decay_bias_norm=True,
                      param_groups=[ParamGroupConfig(params="2.*", lr=0.3, weight_decay=0.2)])
    opt, infos = build_optimizer(cfg, model)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.endswith("bias") or name.startswith("1."):  # biases and the LayerNorm scale
            assert wd_of[id(p)] == 0.0, name
        else:
            assert wd_of[id(p)] == (0.2 if name.startswith("2.") else 0.1), name
        assert lr_of[id(p)] == (0.3 if name.startswith("2.") else cfg.lr), name
    assert {g.name: g.num_params for g in infos} == {
        "default": 4 * 6, "default (no decay)": 6 + 6 + 6, "2.*": 6 * 2, "2.* (no decay)": 2}


def test_overlapping_globs_name_the_parameter() -> None:
    cfg = OptimConfig(param_groups=[ParamGroupConfig(params="1.*"), ParamGroupConfig(params="*.weight")])
    with pytest.raises(ConfigError) as err:
        param_groups(cfg, mlp((64,), 10))
    msg = str(err.value)
    assert "optim.param_groups[1].params" in msg and "'1.weight'" in msg and "'1.*'" in msg
    assert "\n" not in msg


def test_glob_matching_nothing_is_named() -> None:
    cfg = OptimConfig(param_groups=[ParamGroupConfig(params="1.*"), ParamGroupConfig(params="head.*")])
    with pytest.raises(ConfigError) as err:
        param_groups(cfg, mlp((64,), 10))
    assert "optim.param_groups[1].params" in str(err.value) and "'head.*'" in str(err.value)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("overrides,key,words", [
    (["optim.name=adam", "optim.momentum=0.5"], "optim.momentum", "applies to sgd only"),
    (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov", "applies to sgd only"),
    (["optim.name=adam", "optim.dampening=0.1"], "optim.dampening", "applies to sgd only"),
    (["optim.name=sgd", "optim.betas=[0.8,0.9]"], "optim.betas", "applies to adam and adamw only"),
    (["optim.eps=1e-6"], "optim.eps", "applies to adam and adamw only"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov", "momentum > 0"),
    (["optim.nesterov=true", "optim.dampening=0.5"], "optim.nesterov", "dampening = 0"),
    (["optim.lr=-0.1"], "optim.lr", ">= 0"),
    (["optim.name=rmsprop"], "optim.name", "sgd | adam | adamw"),
    (["optim.name=adam", "optim.betas=[0.9,1.0]"], "optim.betas", "[0, 1)"),
    (["optim.param_groups=[{params: '1.*'}, {params: '1.*'}]"], "optim.param_groups[1].params", "different"),
    (["optim.param_groups=[{params: '1.*', lr: -1}]"], "optim.param_groups[0].lr", ">= 0"),
    (["sched.name=exp"], "sched.name", "cosine"),
    (["sched.warmup_steps=-1"], "sched.warmup_steps", ">= 0"),
    (["sched.min_lr=1.0"], "sched.min_lr", "optim.lr"),
    (["lr_find.end_lr=1e-6"], "lr_find.end_lr", "start_lr"),
    (["lr_find.smoothing=0"], "lr_find.smoothing", "(0, 1]"),
])
def test_invalid_optim_config_is_refused(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key and words in str(err.value)


def test_valid_optimizer_settings_pass() -> None:
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.8,0.95]", "optim.eps=1e-6",
                             "optim.weight_decay=0.05"])
    assert cfg.optim.betas == [0.8, 0.95]
    cfg = load_config(None, ["optim.nesterov=true", "optim.momentum=0.8", "optim.dampening=0"])
    assert cfg.optim.nesterov


def test_param_groups_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    # The dotlist value is YAML flow syntax: a space after each ':' is required.
    cli = load_config(None, ["optim.param_groups=[{params: '1.*', lr: 0.0}, {params: 5.*, weight_decay: 0.1}]"])
    assert cli.optim.param_groups == [ParamGroupConfig("1.*", 0.0, None), ParamGroupConfig("5.*", None, 0.1)]
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  param_groups:\n    - {params: '1.*', lr: 0.0}\n"
                 "    - params: '5.*'\n      weight_decay: 0.1\n")
    assert load_config(str(f)).optim.param_groups == cli.optim.param_groups


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert dtrain_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_unknown_and_sgd_only_keys_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "optim.foo" in _main_error(["optim.foo=1"], capsys)
    assert "applies to sgd only" in _main_error(["optim.name=adam", "optim.momentum=0.5"], capsys)


BAD_GLOBS = [
    ("[{params: '1.*', lr: 0.0}, {params: '*.weight'}]", "optim.param_groups[1].params", "'1.weight'"),
    ("[{params: '1.*', lr: 0.0}, {params: 'head.*'}]", "optim.param_groups[1].params", "'head.*'"),
]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_bad_globs_exit_2_with_one_line(tmp_path: Path) -> None:
    # Both runs at once: each spends its time importing torch, not in dtrain.
    with ThreadPoolExecutor(len(BAD_GLOBS)) as pool:
        results = list(pool.map(
            lambda i: dtrain(0, [f"optim.param_groups={BAD_GLOBS[i][0]}", f"output_dir={tmp_path / str(i)}"],
                             check=False),
            range(len(BAD_GLOBS))))
    for i, ((_, key, named), result) in enumerate(zip(BAD_GLOBS, results)):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dtrain: error:"), result.stderr
        assert key in lines[0] and named in lines[0], lines[0]
        assert not (tmp_path / str(i) / "metrics.jsonl").exists()  # refused before training


# ---------------------------------------------------------------- training runs


def _cfg(tmp_path: Path, overrides: Sequence[str]) -> Config:
    return load_config(None, [f"output_dir={tmp_path}", "log.progress=lines", *overrides])


def test_group_with_lr_zero_is_frozen(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ["optim.param_groups=[{params: '1.*', lr: 0.0}]", "optim.weight_decay=0.01",
                          "train.max_steps=30", "sched.name=cosine", "sched.warmup_steps=3"])
    # A training run's initial weights: the seed, then the model (data building draws no randoms).
    torch.manual_seed(cfg.train.seed)
    initial = {n: p.detach().clone() for n, p in build_model(cfg.model, (64,), 10).named_parameters()}
    final = dict(train(cfg, environ={}).state.module.named_parameters())
    assert set(final) == set(initial)
    for name, p in final.items():
        if name.startswith("1."):
            assert torch.equal(p.detach(), initial[name]), name
        else:
            assert (p.detach() - initial[name]).abs().max() > 1e-3, name
    assert records(tmp_path, "train")[-1]["loss"] < records(tmp_path, "train")[0]["loss"]


RUNS = {
    "sgd": ["optim.name=sgd"],
    "sgd_nesterov": ["optim.name=sgd", "optim.nesterov=true"],
    "adam": ["optim.name=adam", "optim.lr=0.002"],
    "adamw": ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.01"],
    # A decaying schedule spends about half its steps well below the peak, so it starts higher.
    "constant_warmup": ["sched.name=constant", "sched.warmup_steps=5"],
    "step_warmup": ["optim.lr=0.1", "sched.name=step", "sched.step_size=20", "sched.gamma=0.5",
                    "sched.warmup_steps=5"],
    "cosine_warmup": ["optim.lr=0.1", "sched.name=cosine", "sched.warmup_steps=5", "sched.min_lr=0.001"],
    "linear_warmup": ["optim.lr=0.1", "sched.name=linear", "sched.warmup_steps=5"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_optimizer_and_schedule_trains_digits(tmp_path: Path, name: str) -> None:
    cfg = _cfg(tmp_path, [*RUNS[name], "train.max_steps=60", "log.every_steps=10"])
    train(cfg, environ={})
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 6
    # Untrained, the loss is ~ln(10) = 2.30; "clearly lower" means a real drop, not noise.
    assert losses[0] > 2.0 and losses[-1] < 0.6 * losses[0], losses


LR_COMMON = ["data.name=synthetic", "data.train_size=512", "data.eval_size=64", "train.epochs=3",
             "optim.lr=0.08", "sched.name=cosine", "sched.warmup_steps=3", "sched.min_lr=0.004",
             "log.every_steps=1", "train.seed=3"]


@pytest.mark.multiproc
@pytest.mark.timeout(200)
def test_logged_lr_is_the_same_at_any_world_size_and_accumulation(tmp_path: Path) -> None:
    # All three have a global batch of 64: 8 optimizer steps per epoch, 24 in all.
    one = tmp_path / "w1_b64_k1"
    train(_cfg(one, [*LR_COMMON, "data.batch_size=64"]), environ={})
    accum = tmp_path / "w1_b16_k4"
    train(_cfg(accum, [*LR_COMMON, "data.batch_size=16", "train.grad_accum_steps=4"]), environ={})
    four = tmp_path / "w4_b16_k1"
    dtrain(4, [*LR_COMMON, "data.batch_size=16", f"output_dir={four}"], timeout=180)

    total = 24
    want = [expected_lr("cosine", i, 0.08, total, 3, 0.004) for i in range(total)]
    for run in (one, accum, four):
        got = [(r["step"], r["lr"]) for r in records(run, "train")]
        assert [s for s, _ in got] == list(range(1, total + 1)), run.name
        assert [lr for _, lr in got] == pytest.approx(want, rel=1e-12), run.name
    # Spot values, by hand: warm-up thirds, then the peak, then min_lr on the last step.
    lrs = [r["lr"] for r in records(four, "train")]
    assert lrs[:3] == pytest.approx([0.08 / 3, 0.16 / 3, 0.08]) and lrs[-1] == pytest.approx(0.004)


# ---------------------------------------------------------------- Loop state


def _batches(cfg: Config, ds: DistState, n: int) -> list[Window]:
    data = build_datasets(cfg.data, cfg.train.seed)
    loaders = build_loaders(data, cfg.data, cfg.train.seed, ds, cfg.train.grad_accum_steps)
    windows = list(loaders.train.windows(0))
    assert len(windows) >= n
    return windows[:n]


def _fresh_loop(cfg: Config, ds: DistState, seed: int, total: int) -> TrainState:
    torch.manual_seed(seed)
    model = build_model(cfg.model, (cfg.data.num_features,), cfg.data.num_classes)
    return build_train_state(cfg, ds, model, total)[0]


def test_loop_state_round_trips(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ["data.name=synthetic", "data.train_size=400", "data.batch_size=16",
                          "train.grad_accum_steps=2", "optim.name=adam", "optim.lr=0.01",
                          "sched.name=cosine", "sched.warmup_steps=2", "train.grad_clip=1.0"])
    total = 12
    with distributed(SINGLE, "gloo", "cpu") as ds:
        batches = _batches(cfg, ds, total)
        loop = _fresh_loop(cfg, ds, 0, total)
        meter = Meter(ds.device)
        for window in batches[:5]:
            train_step(loop, CE, window, meter)
        buf = io.BytesIO()
        torch.save(loop.state_dict(), buf)  # a real checkpoint: no tensor shared with the loop

        for window in batches[5:]:
            train_step(loop, CE, window, meter)
        # Other initial weights, so only load_state_dict can make the two agree.
        resumed = _fresh_loop(cfg, ds, 123, total)
        buf.seek(0)
        resumed.load_state_dict(torch.load(buf))
        assert resumed.step == 5
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr("cosine", 5, 0.01, total, 2))
        for window in batches[5:]:
            train_step(resumed, CE, window, meter)

        assert resumed.step == loop.step == total
        assert resumed.scheduler.get_last_lr() == loop.scheduler.get_last_lr()
        for (name, a), b in zip(loop.module.named_parameters(), resumed.module.parameters()):
            assert torch.equal(a, b), name
        sa, sb = loop.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_skip_mode_keeps_adams_step_counter_beside_the_parameters(name: str) -> None:
    """train.on_nonfinite=skip on a GPU asks for capturable Adam: its step counter lives on the device,
    so undoing a step needs no read of a flag back to the host (dtrain/loop/nonfinite.py)."""
    cfg = load_config(None, [f"optim.name={name}"]).optim
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(cfg, model, device_steps=True)[0].defaults["capturable"] is True
    assert build_optimizer(cfg, model)[0].defaults["capturable"] is False
