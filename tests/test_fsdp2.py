"""dist.strategy=fsdp2 trains like DDP, and so like one process with the global batch.

Every run is a real `torchrun --standalone` job on gloo. The references are independent runs: one process with the
global batch (no strategy at all) and DDP at the same world size, batch and accumulation. The model
(tests/workers/fsdp2_models.py) has a ModuleList of blocks (the shard units), parameters outside them, a frozen
layer, and rows (35, 7) that neither 2 nor 3 ranks divide; 1000 samples at a global batch of 60 leave a short
last window and do not divide by 3 either; clipping at 0.5 bites. Tolerances are test_equivalence's.
Each rank's factory builds other weights (seeded by its rank): DDP starts every rank from rank 0's, and so must
FSDP2, or nothing below would match.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import WORKERS, dtrain, records, rel_diff, run, torchrun
from workers import fsdp2_models

pytestmark = pytest.mark.multiproc

COMMON = ["data.name=synthetic", "data.train_size=1000", "data.eval_size=101", "train.epochs=1", "train.seed=7",
          "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "log.every_steps=1", "log.progress=none",
          "train.grad_clip=0.5", "model.name=tests.workers.fsdp2_models:build_per_rank_noting"]
# (world size, per-rank batch, accumulation, FSDP2's keys, eval batch): W x B x K = 60. The eval batches give the
# ranks' shards of the 101 eval samples different batch counts (51/50 in 10s: 6 and 5; 34/34/33 in 11s: 4, 4, 3).
RUNS = {2: (10, 3, ["dist.shard=[auto]"], 10),
        3: (10, 2, ["dist.shard=['Bl*']", "dist.reshard_after_forward=false"], 11)}
HASH = "callbacks=[{name: tests.workers.fsdp2_models:hash_callback}]"


def _train(out: Path, nproc: int, extra: list[str]) -> Path:
    marks = out.parent / f"{out.name}_marks"  # what each rank built and, with HASH, held at the first step
    marks.mkdir()
    dtrain(nproc, [*COMMON, f"output_dir={out}", *extra], env={"DTRAIN_TEST_HASH_DIR": str(marks)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2")
    got = {"one": _train(root / "one", 0, ["data.batch_size=60"])}
    for w, (b, k, keys, eval_b) in RUNS.items():
        shape = [f"data.batch_size={b}", f"train.grad_accum_steps={k}", f"data.eval_batch_size={eval_b}"]
        got[f"ddp{w}"] = _train(root / f"ddp{w}", w, shape)
        got[f"fsdp{w}"] = _train(root / f"fsdp{w}", w, [*shape, "dist.strategy=fsdp2", *keys, HASH])
    return got


def _compare(ref: Path, other: Path) -> tuple[float, float]:
    """The worst relative loss difference and the worst weight difference; asserts test_equivalence's bounds."""
    worst = 0.0
    for split in ("train", "train_epoch", "eval"):
        a, b = records(ref, split), records(other, split)
        assert [(r["step"], r["samples"]) for r in a] == [(r["step"], r["samples"]) for r in b], split
        for ra, rb in zip(a, b):
            worst = max(worst, rel_diff(ra["loss"], rb["loss"]))
    assert worst < 1e-5, worst
    wa, wb = torch.load(ref / "model.pt"), torch.load(other / "model.pt")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    return worst, max((wa[n] - wb[n]).abs().max().item() for n in wa)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("w", sorted(RUNS))
def test_same_losses_weights_and_norms_as_ddp_and_one_big_batch(runs: dict[str, Path], w: int) -> None:
    fsdp, ddp, one = runs[f"fsdp{w}"], runs[f"ddp{w}"], runs["one"]
    train = records(fsdp, "train")
    assert [r["samples"] for r in train] == [60] * 16 + [40]  # the short last window
    loss_ddp, weights_ddp = _compare(ddp, fsdp)
    loss_one, weights_one = _compare(one, fsdp)
    # The clipping norm is DDP's global norm (frozen and root parameters present), and it bit.
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(records(ddp, "train"), train)]
    worst_norm = max(rel_diff(a, b) for a, b in norms)
    assert worst_norm < 1e-5
    assert sum(a > 0.5 for a, _ in norms) >= 5
    # The frozen layer did not move: equal to the one-process run's, whose start is the same seed's.
    frozen = torch.load(fsdp / "model.pt")["frozen.weight"]
    assert torch.equal(frozen, torch.load(one / "model.pt")["frozen.weight"])
    print(f"W={w}: vs DDP loss rel {loss_ddp:.2e}, weights {weights_ddp:.2e}, grad_norm rel {worst_norm:.2e} "
          f"({sum(a > 0.5 for a, _ in norms)} of {len(norms)} steps clipped); vs one process loss rel "
          f"{loss_one:.2e}, weights {weights_one:.2e}")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("w", sorted(RUNS))
def test_eval_scores_each_of_101_samples_once_though_the_ranks_have_different_batch_counts(
        runs: dict[str, Path], w: int) -> None:
    ev, ref = records(runs[f"fsdp{w}"], "eval"), records(runs["one"], "eval")
    assert [r["samples"] for r in ev] == [101]
    for a, b in zip(ev, ref):
        assert rel_diff(a["loss"], b["loss"]) < 1e-5 and abs(a["accuracy"] - b["accuracy"]) < 1e-12
        print(f"W={w} eval: samples {a['samples']}, loss {a['loss']!r} (one process {b['loss']!r}), accuracy "
              f"{a['accuracy']!r} (one process {b['accuracy']!r})")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("w", sorted(RUNS))
def test_every_rank_starts_from_rank_0s_weights_whatever_the_factory_gave_each(runs: dict[str, Path], w: int) -> None:
    """The factory seeds each rank differently (as a careless one would); fully_shard alone would shard each rank's
    own weights. The full weights every rank holds at the first step hash alike, to what rank 0 built."""
    marks = runs[f"fsdp{w}"].parent / f"fsdp{w}_marks"
    built = [(marks / f"built_{r}.txt").read_text() for r in range(w)]
    start = [(marks / f"start_{r}.txt").read_text() for r in range(w)]
    assert len(set(built)) == w  # the ranks really built different weights
    assert start == [built[0]] * w


@pytest.mark.timeout(300)
def test_a_module_handed_to_dtrain_train_starts_alike_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "api_start.py"
    script.write_text(
        "import os, sys, torch\nimport dtrain\nfrom tests.workers import fsdp2_models as m\n"
        "model = m.build_per_rank_noting((32,), 10)\n"
        "dtrain.train(model=model, overrides=['data.name=synthetic', 'train.max_steps=1', 'log.progress=none',\n"
        "    'dist.strategy=fsdp2', 'output_dir=' + sys.argv[1]], callbacks=[m.hash_callback()])\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    res = torchrun(2, [str(script), str(tmp_path / "run")], env={"DTRAIN_TEST_HASH_DIR": str(marks)})
    assert res.returncode == 0, res.stderr
    built = [(marks / f"built_{r}.txt").read_text() for r in (0, 1)]
    assert built[0] != built[1]
    assert [(marks / f"start_{r}.txt").read_text() for r in (0, 1)] == [built[0], built[0]]


@pytest.mark.timeout(300)
def test_a_built_in_model_starts_alike_on_every_rank(tmp_path: Path) -> None:
    """model.name=mlp, nudged on each rank by the worker after dtrain built it (the ranks would otherwise build
    alike from train.seed, and the check could not fail)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    res = torchrun(2, [str(WORKERS / "fsdp2_skewed_mlp.py"), "data.name=synthetic", "model.name=mlp",
                       "train.max_steps=1", "log.progress=none", "dist.strategy=fsdp2", "dist.shard=[Linear]",
                       HASH, f"output_dir={tmp_path / 'run'}"], env={"DTRAIN_TEST_HASH_DIR": str(marks)})
    assert res.returncode == 0, res.stderr
    built = [(marks / f"built_{r}.txt").read_text() for r in (0, 1)]
    assert built[0] != built[1]
    assert [(marks / f"start_{r}.txt").read_text() for r in (0, 1)] == [built[0], built[0]]


ACCUMULATE = ["data.name=synthetic", "data.train_size=96", "data.batch_size=3", "train.grad_accum_steps=4",
              "train.epochs=1", "log.progress=none", "dist.strategy=fsdp2", "optim.name=adam",
              "model.name=tests.workers.fsdp2_models:build_wide"]
COUNT = "{name: tests.workers.fsdp2_models:CountReductions}"
BYTES = "{name: tests.workers.fsdp2_models:LocalBytes}"


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Two K=4 runs at 2 ranks, reduce_every_micro_step false and true; each counts its reduce-scatters and the
    bytes each rank holds at the end (they serve the memory test at 2 ranks too)."""
    root = tmp_path_factory.mktemp("fsdp2_accumulated")
    got = {}
    for every in (False, True):
        out = root / f"every_{every}"
        out.mkdir()
        dtrain(2, [*ACCUMULATE, f"dist.reduce_every_micro_step={str(every).lower()}", f"callbacks=[{COUNT}, {BYTES}]",
                   f"output_dir={out / 'run'}"], env={"DTRAIN_TEST_OUT": str(out)})
        got[every] = out
    return got


@pytest.mark.timeout(400)
def test_accumulation_reduces_gradients_once_per_optimizer_step_unless_asked_every_micro_step(
        accumulated: dict[bool, Path]) -> None:
    """K=4 micro-steps: one reduce-scatter per FSDP2 parameter group (4 blocks and the root) per optimizer step,
    counted by torch's profiler; dist.reduce_every_micro_step=true: K times as many, and the same weights."""
    counts = {every: json.loads((out / "reductions.json").read_text()) for every, out in accumulated.items()}
    groups = 5
    steps = counts[False]["steps"]
    assert steps == counts[True]["steps"] == 96 // (2 * 3 * 4)
    assert counts[False]["reduce_scatters"] == groups * steps
    assert counts[True]["reduce_scatters"] == groups * 4 * steps
    once, every_time = (torch.load(accumulated[e] / "run" / "model.pt") for e in (False, True))
    for name in once:
        # test_equivalence's bound: summing before or after the reduction rounds differently, and Adam's division
        # by the root of its second moment magnifies that where a gradient is near 0 (at most a third of the bound
        # measured); a window's lost or doubled micro-step would move weights by about lr=1e-3.
        torch.testing.assert_close(every_time[name], once[name], rtol=1e-4, atol=1e-6)
    print(f"reduce-scatters per optimizer step: {counts[False]['reduce_scatters'] / steps:g} (K=4), "
          f"{counts[True]['reduce_scatters'] / steps:g} with reduce_every_micro_step; weights differ by at most "
          f"{max((once[n] - every_time[n]).abs().max().item() for n in once):.2e}")


@pytest.mark.timeout(500)
@pytest.mark.parametrize("w", [2, 4])
def test_each_rank_holds_about_one_wth_of_parameters_gradients_and_optimizer_state(
        request: pytest.FixtureRequest, tmp_path: Path, w: int) -> None:
    """Adam, after the last step: each rank's local shards of the parameters, the gradients and both moments."""
    if w == 2:
        folders = list(request.getfixturevalue("accumulated").values())
    else:
        dtrain(w, ["data.name=synthetic", "data.train_size=64", f"data.batch_size={64 // w // 2}",
                   "train.epochs=1", "log.progress=none", "dist.strategy=fsdp2", "optim.name=adam",
                   "model.name=tests.workers.fsdp2_models:build_wide", f"callbacks=[{BYTES}]",
                   f"output_dir={tmp_path / 'run'}"], env={"DTRAIN_TEST_OUT": str(tmp_path)})
        folders = [tmp_path]
    # DDP's share, from the plain model: every parameter, a gradient and Adam's two moments per trainable one.
    plain = fsdp2_models.build_wide((32,), 10)
    params = sum(p.numel() * 4 for p in plain.parameters())
    trainable = sum(p.numel() * 4 for p in plain.parameters() if p.requires_grad)
    ddp = {"params": params, "grads": trainable, "optim": 2 * trainable}
    ratios = []
    for folder in folders:
        for r in range(w):
            held = json.loads((folder / f"bytes_{r}.json").read_text())
            for kind, full in ddp.items():
                # 1/W, give or take the rows W does not divide (a rank holds at most one row more or less per
                # tensor).
                assert full / w * 0.9 <= held[kind] <= full / w * 1.1, (r, kind, held[kind], full)
            ratios.append({kind: round(held[kind] / full, 4) for kind, full in ddp.items()})
    print(f"W={w}: each rank's bytes / DDP's {ddp}: {ratios}")


@pytest.mark.timeout(300)
def test_bf16_is_fsdp2s_mixed_precision_and_trains_like_ddp_with_autocast(tmp_path: Path) -> None:
    """The default job (digits, MLP) in bf16: FSDP2 computes in bf16 parameters, reduces and keeps fp32; its eval
    accuracy matches DDP+autocast's within noise, and model.pt holds fp32."""
    common = ["train.precision=bf16", "train.epochs=3", "log.progress=none",
              "callbacks=[{name: tests.workers.fsdp2_models:DtypeSeen}]"]
    ddp = _fresh(tmp_path / "ddp", 2, common)
    fsdp = _fresh(tmp_path / "fsdp", 2, [*common, "dist.strategy=fsdp2", "dist.shard=[Linear]"])
    # FSDP2 hands the forward bf16 weights (its policy); DDP's weights stay fp32 and autocast casts per op.
    for r in (0, 1):
        assert json.loads((fsdp.parent / f"dtypes_{r}.json").read_text()) == {
            "weight": "torch.bfloat16", "input": "torch.bfloat16", "output": "torch.bfloat16",
            "parameters": ["torch.float32"]}
        assert json.loads((ddp.parent / f"dtypes_{r}.json").read_text()) == {
            "weight": "torch.float32", "input": "torch.float32", "output": "torch.bfloat16",
            "parameters": ["torch.float32"]}
    a, b = records(ddp, "eval")[-1], records(fsdp, "eval")[-1]
    assert a["samples"] == b["samples"] and abs(a["accuracy"] - b["accuracy"]) <= 0.02, (a, b)
    assert rel_diff(a["loss"], b["loss"]) < 0.05, (a, b)
    assert a["accuracy"] > 0.8
    assert all(t.dtype == torch.float32 for t in torch.load(fsdp / "model.pt").values())
    print(f"bf16 eval: DDP+autocast acc {a['accuracy']:.4f} loss {a['loss']:.4f}; FSDP2 acc {b['accuracy']:.4f} "
          f"loss {b['loss']:.4f}")


def _fresh(out: Path, nproc: int, extra: list[str]) -> Path:
    out.mkdir()
    dtrain(nproc, [*extra, f"output_dir={out / 'run'}"], env={"DTRAIN_TEST_OUT": str(out)})
    return out / "run"


@pytest.mark.timeout(200)
def test_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank() -> None:
    """fp16's logic on CPU (fp16 itself needs CUDA): the sharded GradScaler over FSDP2's sharded gradients."""
    res = torchrun(2, [str(WORKERS / "fsdp2_scaler.py")])
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    for rank in seen:
        assert rank["1"] == {"changed": False, "scale_before": 65536.0, "scale_after": 32768.0}
        assert rank["2"]["changed"] and rank["2"]["scale_after"] == 32768.0


@pytest.mark.timeout(200)
def test_one_process_trains_unsharded_says_so_once_and_equals_ddp_at_one_process(tmp_path: Path) -> None:
    common = ["data.name=synthetic", "train.epochs=1", "log.progress=lines"]
    alone = dtrain(0, [*common, "dist.strategy=fsdp2", f"output_dir={tmp_path / 'fsdp'}"])
    dtrain(0, [*common, "dist.strategy=ddp", f"output_dir={tmp_path / 'ddp'}"])
    assert alone.stdout.count("dist.strategy=fsdp2 at one process has nothing to shard across") == 1
    a, b = torch.load(tmp_path / "fsdp" / "model.pt"), torch.load(tmp_path / "ddp" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _error_lines(stderr: str) -> list[str]:
    # torchrun's closing report repeats a child's last line as its `traceback :` line, which does not count.
    return [ln for ln in stderr.splitlines() if "dtrain: error" in ln and "traceback : " not in ln]


def _exit_codes(res: "subprocess.CompletedProcess[str]") -> set[int]:
    """The exit codes torchrun's closing report gives its ranks (torchrun itself exits 1 whatever they were)."""
    assert res.returncode != 0, res.stderr
    return {int(code) for code in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", res.stderr, re.MULTILINE)}


def _exited_2(res: "subprocess.CompletedProcess[str]") -> bool:
    # A rank still on its way out when another's exit 2 reaches torchrun is ended by its SIGTERM (-15).
    codes = _exit_codes(res)
    return 2 in codes and codes <= {2, -15}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra, says", [
    (["dist.shard=[auto]"], "config key 'dist.shard' has value ['auto']; allowed: class-name globs naming the "
                            "blocks to shard, e.g. [Linear]: the model (Sequential) holds no nn.ModuleList"),
    (["dist.shard=[Nope, Linear]"], "config key 'dist.shard' has value ['Nope', 'Linear']; allowed: auto | "
                                    "class-name globs that match a submodule: ['Nope'] match none"),
], ids=["nothing-to-shard", "pattern-matches-nothing"])
def test_a_model_that_cannot_be_sharded_is_one_line_before_anything_is_written(tmp_path: Path, extra: list[str],
                                                                               says: str) -> None:
    out = tmp_path / "run"
    res = dtrain(2, ["data.name=synthetic", "dist.strategy=fsdp2", *extra, f"output_dir={out}"], check=False)
    lines = _error_lines(res.stderr)
    assert _exited_2(res) and len(lines) == 1 and says in lines[0], res.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.timeout(300)
def test_a_torch_without_fully_shards_divide_factor_is_one_line_exit_2(tmp_path: Path) -> None:
    """torch 2.6 and 2.7: fully_shard is there, but set_gradient_divide_factor (2.8) is not, and their older setter
    builds an NCCL-only reduce op that fails on gloo at the first reduce-scatter."""
    out = tmp_path / "run"
    code = ("import runpy, sys, torch.distributed.fsdp as f; del f.FSDPModule.set_gradient_divide_factor; "
            "sys.argv[0] = 'dtrain'; runpy.run_module('dtrain', run_name='__main__')")
    res = torchrun(2, ["--no-python", sys.executable, "-c", code, "data.name=synthetic", "dist.strategy=fsdp2",
                       f"output_dir={out}"])
    lines = _error_lines(res.stderr)
    want = ("config key 'dist.strategy' has value 'fsdp2'; allowed: ddp (dist.strategy=fsdp2 needs "
            "torch.distributed.fsdp.fully_shard with set_gradient_divide_factor: torch 2.8 or newer")
    assert len(lines) == 1 and want in lines[0], res.stderr
    assert _exited_2(res), res.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, says", [
    (["dist.shard=[]"], "config key 'dist.shard' has value []; allowed: [auto] | a list of class-name globs"),
    (["dist.strategy=fsdp2", "ema.decay=0.9"], "config key 'ema.decay' has value 0.9; allowed: null with "
                                               "dist.strategy=fsdp2"),
    (["dist.strategy=fsdp2", "dist.find_unused_parameters=true"],
     "config key 'dist.find_unused_parameters' has value True; allowed: false with dist.strategy=fsdp2"),
    (["dist.strategy=fsdp2", "train.precision=fp16"], "config key 'train.precision' has value 'fp16'; allowed: "
                                                      "fp32 | bf16 on CPU"),
])
def test_refused_settings_are_one_line_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    res = run([sys.executable, "-m", "dtrain", "data.name=synthetic", *args, f"output_dir={tmp_path / 'run'}"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and says in lines[0], res.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.timeout(200)
def test_an_eval_set_smaller_than_the_ranks_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    """101 eval samples cut to one by eval.max_batches=1 x data.eval_batch_size=1, two ranks: rank 1 would have
    nothing to run the forwards rank 0's gathers need (every forward is a collective), so every rank stops at
    set-up with the one line, not at the first eval."""
    out = tmp_path / "run"
    res = dtrain(2, ["data.name=synthetic", "data.eval_size=101", "eval.max_batches=1", "data.eval_batch_size=1",
                     "train.max_steps=2", "log.progress=none",
                     "dist.strategy=fsdp2", "model.name=tests.workers.fsdp2_models:build", "dist.timeout_s=120",
                     f"output_dir={out}"], check=False, timeout=150)
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and "config key 'dist.strategy' has value 'fsdp2'; allowed: ddp for an eval of 1 sample " \
                               "(after eval.max_batches) on 2 ranks" in lines[0], res.stderr
    assert _exited_2(res), res.stderr
    assert not out.exists() or not any(out.iterdir())
