"""The step's exactness for token-weighted losses: padded sequences of 1 to T tokens, over a (W, B, K) grid.

The reference is plain PyTorch in this process: the same seeded permutation DistributedSampler draws each
epoch, global batches of 12, `F.cross_entropy(ignore_index=-100)` (the mean over the real tokens of the global
batch), SGD with momentum. dtrain at (1, 12, 1) and (1, 4, 3) in this process and at (2, 3, 2) under torchrun
must log the same per-step losses and token counts (relative difference < 1e-5, today's grid tolerance) and
end with the same weights (rtol 1e-4). 101 samples: every epoch ends in a short window of 5, and at 2 ranks
DistributedSampler pads with a repeat that must count nowhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtrain
from helpers import dtrain as dtrain_cli, records, rel_diff
from tests.workers.padded_lm import Tagger, data

SEED, N, G, EPOCHS, LR = 7, 101, 12, 2, 0.1
FACTORY = "tests.workers.padded_lm"


def _overrides(out: Path, b: int, k: int) -> list[str]:
    return [f"data.name={FACTORY}:data", f"model.name={FACTORY}:build", "loss.name=cross_entropy",
            f"data.batch_size={b}", f"train.grad_accum_steps={k}", f"train.epochs={EPOCHS}", f"train.seed={SEED}",
            "optim.name=sgd", f"optim.lr={LR}", "optim.momentum=0.9", "log.every_steps=1", "log.progress=none",
            f"output_dir={out}"]


def _plain() -> tuple[list[float], list[int], dict[str, torch.Tensor], float]:
    """Per-step losses and real-token counts, final weights and the eval token mean, in plain PyTorch."""
    train, evalset = data(SEED, N)
    x, y = train.tensors
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, tokens = [], []
    for epoch in range(EPOCHS):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch))
        for i in range(0, N, G):
            idx = order[i:i + G]
            out = model(x[idx])
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens.append(int((y[idx] != -100).sum()))
    with torch.no_grad():
        ex, ey = evalset.tensors
        out = model(ex)
        eval_loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ey.reshape(-1), ignore_index=-100).item()
    return losses, tokens, model.state_dict(), eval_loss


@pytest.fixture(scope="module")
def plain() -> tuple[list[float], list[int], dict[str, torch.Tensor], float]:
    return _plain()


def _assert_matches(run_dir: Path, plain: tuple) -> float:
    losses, tokens, weights, eval_loss = plain
    train = records(run_dir, "train")
    assert [r["tokens"] for r in train] == tokens
    assert [r["samples"] for r in train] == ([G] * 8 + [5]) * EPOCHS
    worst = max(rel_diff(r["loss"], ref) for r, ref in zip(train, losses))
    assert len(train) == len(losses) and worst < 1e-5, worst
    epochs = records(run_dir, "train_epoch")
    assert [r["tokens"] for r in epochs] == [sum(tokens[:9]), sum(tokens[9:])]
    ev = records(run_dir, "eval")[-1]
    assert rel_diff(ev["loss"], eval_loss) < 1e-5 and ev["samples"] == 37
    got = torch.load(run_dir / "model.pt")
    for name, value in weights.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    return worst


@pytest.mark.timeout(120)
@pytest.mark.parametrize("b, k", [(12, 1), (4, 3)])
def test_one_process_token_mean_equals_plain_pytorch(tmp_path: Path, plain: tuple, b: int, k: int) -> None:
    dtrain.train(overrides=_overrides(tmp_path / "run", b, k))
    worst = _assert_matches(tmp_path / "run", plain)
    print(f"W=1 B={b} K={k}: largest relative loss difference {worst:.2e}")


@pytest.mark.multiproc
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", [[], ["dist.strategy=fsdp2", "dist.shard=[Linear]"]], ids=["ddp", "fsdp2"])
def test_two_processes_with_accumulation_equal_plain_pytorch(tmp_path: Path, plain: tuple,
                                                             strategy: list[str]) -> None:
    """Under fsdp2 the reweighing scales each rank's gradient shards, after the one reduce-scatter of the window."""
    dtrain_cli(2, [*_overrides(tmp_path / "run", 3, 2), *strategy])
    worst = _assert_matches(tmp_path / "run", plain)
    print(f"W=2 B=3 K=2 {strategy}: largest relative loss difference {worst:.2e}")
