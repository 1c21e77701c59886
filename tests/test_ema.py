"""ema.decay: the average equals a plain-PyTorch EMA of the same weight sequence, skips the steps that did not
stand, is evaluated as its own records and written as model_ema.pt.

The reference is computed here: the weights after each step are recorded by a callback, and the average is
the textbook recurrence ema = d * ema + (1 - d) * w over the steps whose update stood.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dtrain
from dtrain.callbacks.ema import EMA

N, B, D = 24, 4, 0.8


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N + 10, 3, generator=g), torch.randint(0, 2, (N + 10,), generator=g)
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])


class Weights(dtrain.Callback):
    """The model's weights after every step (dtrain's EMA has updated by then: it is called first)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, run: Any) -> None:
        self.initial = {k: v.clone() for k, v in run.model.state_dict().items()}

    def on_step_end(self, run: Any) -> None:
        self.seen.append({k: v.clone() for k, v in run.model.state_dict().items()})


class NanAt:
    """cross_entropy per sample, NaN for every sample of the given optimizer steps (one micro-batch a step)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        if out.requires_grad:  # a training forward (eval runs under no_grad)
            self.calls += 1
            if self.calls in self.steps:
                return loss * float("nan")
        return loss


def _plain_ema(initial: dict[str, torch.Tensor], seq: list[dict[str, torch.Tensor]], stood: list[bool],
               d: float) -> dict[str, torch.Tensor]:
    ema = {k: v.clone() for k, v in initial.items()}
    for weights, ok in zip(seq, stood):
        if ok:
            for k in ema:
                ema[k] = d * ema[k] + (1 - d) * weights[k]
    return ema


@pytest.mark.parametrize("on_nonfinite, skipped, d", [("skip", {3, 7}, D), ("stop", set(), 0.9)])
def test_the_average_is_the_textbook_ema_of_the_steps_that_stood(tmp_path: Path, on_nonfinite: str,
                                                                 skipped: set[int], d: float) -> None:
    """skip: the flag is a device tensor (the factors come from it); stop: every step stands (a host bool)."""
    train, held = _data()
    rec = Weights()
    dtrain.train(model=lambda: nn.Linear(3, 2), train_data=train, eval_data=held, loss=NanAt(skipped),
                 overrides=[f"output_dir={tmp_path}", f"data.batch_size={B}", "train.epochs=2", "log.progress=none",
                            f"ema.decay={d}", f"train.on_nonfinite={on_nonfinite}", "train.max_skipped_steps=5",
                            "optim.lr=0.5"], callbacks=[rec])
    steps = len(rec.seen)
    assert steps == 2 * N // B
    stood = [s not in skipped for s in range(1, steps + 1)]
    want = _plain_ema(rec.initial, rec.seen, stood, d)
    got = torch.load(tmp_path / "model_ema.pt")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    if skipped:
        # The skipped steps left the weights as they were: the recorder sees that, the EMA must not count them.
        assert torch.equal(rec.seen[2]["weight"], rec.seen[1]["weight"])
        # Counting the skipped steps would give another average: the test can tell the two apart.
        wrong = _plain_ema(rec.initial, rec.seen, [True] * steps, d)
        assert not torch.allclose(got["weight"], wrong["weight"], rtol=1e-6, atol=1e-7)
    # model.pt holds the weights themselves, not the average.
    assert torch.equal(torch.load(tmp_path / "model.pt")["weight"], rec.seen[-1]["weight"])


def test_eval_ema_records_score_the_average_exactly(tmp_path: Path) -> None:
    train, held = _data()
    dtrain.train(model=lambda: nn.Linear(3, 2), train_data=train, eval_data=held, loss="cross_entropy",
                 overrides=[f"output_dir={tmp_path}", f"data.batch_size={B}", "train.epochs=2", "log.progress=none",
                            f"ema.decay={D}", "optim.lr=0.5", "loss.metrics=[accuracy]"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    emas = [r for r in rows if r["split"] == "eval_ema"]
    assert [r["step"] for r in emas] == [r["step"] for r in evals] == [N // B, 2 * N // B]
    # The last one, recomputed in plain PyTorch from model_ema.pt.
    model = nn.Linear(3, 2)
    model.load_state_dict(torch.load(tmp_path / "model_ema.pt"))
    x, y = held.tensors
    with torch.no_grad():
        out = model(x)
    loss = nn.functional.cross_entropy(out, y, reduction="none").double().mean().item()
    accuracy = (out.argmax(1) == y).double().mean().item()
    assert emas[-1]["samples"] == len(held)
    assert emas[-1]["loss"] == pytest.approx(loss, rel=1e-6)
    assert emas[-1]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert emas[-1]["loss"] != evals[-1]["loss"]  # not the weights' own eval again


def test_an_fp16_step_the_scaler_skipped_leaves_the_average_alone() -> None:
    """The GradScaler's skip is a host bool (fp16 needs CUDA: its logic is checked here on the CPU)."""
    model = nn.Linear(3, 2)
    ema = EMA(D)
    state = type("State", (), {"module": model, "applied": True})()
    run = type("Run", (), {"state": state})()
    ema.bind(state)  # type: ignore[arg-type]
    before = [t.clone() for t in ema.averaged]
    with torch.no_grad():
        model.weight.add_(1.0)
    state.applied = False
    ema.on_step_end(run)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged, before))
    state.applied = torch.tensor(False)  # on_nonfinite=skip's device flag
    ema.on_step_end(run)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged, before))
    state.applied = torch.tensor(True)
    ema.on_step_end(run)  # type: ignore[arg-type]
    torch.testing.assert_close(ema.averaged[0], D * before[0] + (1 - D) * model.weight)


def test_the_weights_are_put_back_bitwise_after_the_averages_eval() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = type("State", (), {"module": model, "applied": True})()
    ema = EMA(0.5)
    ema.bind(state)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.37)
    model.train()(torch.randn(8, 3))  # running stats and num_batches_tracked move
    ema.on_step_end(type("Run", (), {"state": state})())  # type: ignore[arg-type]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    after = model.state_dict()
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert not torch.equal(inside["0.weight"], saved["0.weight"])
    assert torch.equal(inside["1.num_batches_tracked"], saved["1.num_batches_tracked"])  # integers are copied
