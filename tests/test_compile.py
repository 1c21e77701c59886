"""train.compile: the losses of eager PyTorch, nothing recompiled after the first epoch, compile time apart.

Compiling is slow on CPU (seconds per graph), so there are three compiled runs
only: one process with the global batch, and 2 ranks x B 10 x K 3 under DDP and under FSDP2. All are
compared with the eager one-process run, the reference of
tests/test_equivalence.py. N=301 leaves a short last batch every epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import dtrain, records, rel_diff

COMMON = ["data.name=synthetic", "data.train_size=301", "data.eval_size=101", "train.epochs=3", "train.seed=7",
          "optim.lr=0.1", "log.every_steps=1", "log.progress=none"]
# Inductor fuses and reorders float32 sums, so each step differs from eager by float32 rounding (about 1e-7
# relative per reduction); over 18 SGD steps that stays about 2e-7 here (measured), below 1e-5, while a
# wrong gradient or a skipped sample moves the loss by more than 1e-2.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile")
    out = {name: root / name for name in ("eager", "one", "two", "fsdp2")}
    dtrain(0, [*COMMON, "data.batch_size=60", f"output_dir={out['eager']}"])
    dtrain(0, [*COMMON, "data.batch_size=60", "train.compile=true", f"output_dir={out['one']}"], timeout=300)
    dtrain(2, [*COMMON, "data.batch_size=10", "train.grad_accum_steps=3", "train.compile=true",
               f"output_dir={out['two']}"], timeout=300)
    # Compiled before fully_shard wraps it: FSDP2's gathers run around the compiled forward.
    dtrain(2, [*COMMON, "data.batch_size=10", "train.grad_accum_steps=3", "train.compile=true", "dist.strategy=fsdp2",
               "dist.shard=[Linear]", f"output_dir={out['fsdp2']}"], timeout=300)
    return out


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["one", "two", "fsdp2"])
def test_compiled_losses_match_eager(runs: dict[str, Path], name: str) -> None:
    worst = 0.0
    for split in ("train", "train_epoch", "eval"):
        eager, compiled = records(runs["eager"], split), records(runs[name], split)
        assert [(r["step"], r["samples"]) for r in eager] == [(r["step"], r["samples"]) for r in compiled]
        worst = max([worst, *(rel_diff(a["loss"], b["loss"]) for a, b in zip(eager, compiled))])
    assert worst < TOLERANCE
    print(f"compiled ({name}): largest relative loss difference to eager {worst:.2e}")


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["one", "two"])
def test_nothing_recompiles_after_the_first_epoch_and_compile_time_is_apart(runs: dict[str, Path],
                                                                            name: str) -> None:
    train = records(runs[name], "train")
    first = train[0]
    # The first step compiled; its compile time is reported, and not counted as step time.
    assert first["compiles"] >= 1 and first["compile_s"] > 0
    assert first["step_time_s"] < first["compile_s"] / 2
    assert first["startup_s"] > first["compile_s"]
    after_warmup = [r for r in train if r["epoch"] >= 2]
    # Epoch 1 met every shape (full and short batches, eval's); epochs 2 and 3 and their evals reuse them.
    recompiles = after_warmup[-1]["compiles"] - after_warmup[0]["compiles"]
    assert recompiles == 0 and all(r["compile_s"] == 0 for r in after_warmup)
    assert "startup_s" not in train[1]
    print(f"compiled ({name}): {after_warmup[0]['compiles']} compilations in the first epoch, {recompiles} after; "
          f"first compile {first['compile_s']:.1f} s, start-up {first['startup_s']:.1f} s")


@pytest.mark.multiproc
def test_eager_runs_report_no_compile_fields_but_the_startup(runs: dict[str, Path]) -> None:
    first, second = records(runs["eager"], "train")[:2]
    assert "compiles" not in first and "compile_s" not in first
    assert 0 < first["startup_s"] < 120 and "startup_s" not in second


def test_a_finished_run_stops_counting_compiles() -> None:
    """torch keeps compile callbacks for the process's life: a run's watch must take its own back, or a
    second dtrain.train in the process would count its compiles into the first run's numbers."""
    from torch._dynamo import callback_handler

    from dtrain.loop.compiling import CompileWatch

    before = (list(callback_handler.start_callbacks), list(callback_handler.end_callbacks))
    watch = CompileWatch()
    watch.watch()
    assert len(callback_handler.start_callbacks) == len(before[0]) + 1
    watch.close()
    watch.close()  # twice is harmless
    assert (list(callback_handler.start_callbacks), list(callback_handler.end_callbacks)) == before
    CompileWatch().close()  # never watched: nothing to take back
    import torch._dynamo

    reset = CompileWatch()
    reset.watch()
    torch._dynamo.reset()  # clears every callback, ours included: closing after it must not raise
    reset.close()
