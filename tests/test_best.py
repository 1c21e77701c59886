"""checkpoint.monitor / keep_best: the best checkpoints by the logged eval values (ranked here) stay besides
the newest, model_best.pt holds the weights of the best step, and best.json names it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dtrain
from dtrain.callbacks.best import BestCheckpoints
from dtrain.checkpoint import store
from dtrain.loop.record import Record
from dtrain.runtime.dist import DistState

N, B = 24, 4


class Weights(dtrain.Callback):
    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, run: Any) -> None:
        self.after[run.step] = {k: v.clone() for k, v in run.model.state_dict().items()}


def _noisy_data() -> tuple[TensorDataset, TensorDataset]:
    """Eval labels at random: the eval loss goes up and down."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N + 16, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], torch.randint(0, 2, (16,), generator=g))


def test_the_k_best_and_the_newest_stay_and_model_best_is_the_best_steps_weights(tmp_path: Path) -> None:
    train, held = _noisy_data()
    rec = Weights()
    dtrain.train(model=lambda: nn.Linear(3, 2), train_data=train, eval_data=held, loss="cross_entropy",
                 overrides=[f"output_dir={tmp_path}", f"data.batch_size={B}", "train.epochs=4", "log.progress=none",
                            "eval.every_steps=2", "checkpoint.monitor=loss", "checkpoint.keep_best=2",
                            "checkpoint.keep=1", "optim.lr=0.8"], callbacks=[rec])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["loss"], r["step"]) for r in rows if r["split"] == "eval"]
    assert len(evals) == 4 * N // B // 2
    ranked = sorted(evals, key=lambda e: (e[0], e[1]))[:2]  # smaller is better; ties: the earlier
    last = 4 * N // B
    kept = sorted(f.step for f in store.committed(str(tmp_path)))
    assert kept == sorted({last, *(s for _, s in ranked)})
    pointer = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert (pointer["step"], pointer["value"], pointer["checkpoint"]) == (ranked[0][1], ranked[0][0],
                                                                          f"step-{ranked[0][1]:09d}")
    best = torch.load(tmp_path / "model_best.pt")
    want = rec.after[ranked[0][1]]
    assert best.keys() == want.keys() and all(torch.equal(best[k], want[k]) for k in want)
    saved = store.load(os.path.join(tmp_path, "checkpoints", pointer["checkpoint"]))["train"]["model"]
    assert all(torch.equal(saved[k], want[k]) for k in want)
    assert ranked[0][1] != last  # the test means something: the best is not simply the end


def _save(out: Path, step: int, cb: BestCheckpoints, weights: dict[str, torch.Tensor]) -> None:
    payload = {"train": {"model": weights, "step": step}, "states": {"best": cb.state_dict()}}
    store.save(str(out), step, 0, payload, keep=1, keep_also=cb.keep_also())


class _Run:
    is_main, record = True, None

    def __init__(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        self.step = step
        model = nn.Linear(1, 1)
        model.load_state_dict(weights)
        strategy = type("S", (), {"model_state": staticmethod(lambda m: m.state_dict())})()
        alone = DistState("test", 0, 0, 1, "gloo", torch.device("cpu"))
        self.state = type("State", (), {"strategy": strategy, "model": model, "dist": alone})()

    def request_save(self, all_ranks: bool = False) -> None:
        assert all_ranks


def test_retention_spares_the_best_and_a_kill_before_the_pointers_is_repaired_on_resume(tmp_path: Path) -> None:
    cb = BestCheckpoints(str(tmp_path), "loss", "min", keep_best=1)
    w = {s: {"weight": torch.full((1, 1), float(s)), "bias": torch.zeros(1)} for s in range(1, 6)}
    for step, loss in [(1, 0.5), (2, 0.7), (3, 0.9), (4, 0.4)]:
        run = _Run(step, w[step])
        run.record = Record("eval", step, 1, {"loss": loss})
        cb.on_eval_end(run)  # type: ignore[arg-type]
        _save(tmp_path, step, cb, w[step])
        if step < 4:
            cb.on_save(run)  # type: ignore[arg-type]
        # Never deleted: the newest, and the best.
        assert {f.step for f in store.committed(str(tmp_path))} >= {step, cb.best[0][1]}
    # Killed after step 4's commit, before its pointers: best.json still names step 1, whose checkpoint stays.
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 1
    assert {f.step for f in store.committed(str(tmp_path))} == {1, 4}
    # The resumed run (its list restored from step 4's checkpoint) rewrites the pointers from that checkpoint.
    again = BestCheckpoints(str(tmp_path), "loss", "min", keep_best=1)
    again.load_state_dict(store.load(str(tmp_path / "checkpoints" / "step-000000004"))["states"]["best"])
    again.on_fit_start(_Run(4, w[4]))  # type: ignore[arg-type]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 4
    assert torch.equal(torch.load(tmp_path / "model_best.pt")["weight"], w[4]["weight"])
    # The next save may now drop step 1: nothing points to it.
    _save(tmp_path, 5, again, w[5])
    assert {f.step for f in store.committed(str(tmp_path))} == {4, 5}
    # Resumed with another monitor, the list ranked by the old one is not taken over.
    other = BestCheckpoints(str(tmp_path), "accuracy", "max", keep_best=1)
    other.load_state_dict(again.state_dict())
    assert other.best == [] and again.best == [(0.4, 4)]
