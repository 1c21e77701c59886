"""eval.every_steps and eval.max_batches: evaluating inside epochs changes nothing else (bitwise weights), each
eval is exact, and the quick subset is the same samples at any world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dtrain
from dtrain.config import DataConfig
from dtrain.data.loaders import build_loaders
from dtrain.data.types import Datasets
from dtrain.runtime.dist import DistState
from helpers import dtrain as run_dtrain
from helpers import records

N, B = 40, 4


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(N + 23, 3, generator=g), torch.randint(0, 3, (N + 23,), generator=g)
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])


def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


@pytest.mark.parametrize("loader", ["fast_path", "dataloader"])
def test_evaluating_every_n_steps_leaves_the_trained_weights_bitwise_alone(tmp_path: Path, loader: str) -> None:
    """Dropout draws from the global RNG every step: an eval that drew from it would change the weights."""
    train, held = _data()
    common = [f"data.batch_size={B}", "train.epochs=3", "log.progress=none", "optim.lr=0.2", "data.eval_batch_size=5"]
    if loader == "dataloader":
        common.append("data.fast_path=false")
    weights = {}
    for name, extra in (("plain", []), ("every", ["eval.every_steps=3"])):
        out = tmp_path / name
        dtrain.train(model=_dropout_net, train_data=train, eval_data=held, loss="cross_entropy",
                     overrides=[f"output_dir={out}", *common, *extra])
        weights[name] = torch.load(out / "model.pt")
        evals = [r for r in records(out) if r["split"] == "eval"]
        per_epoch = N // B
        want = ([3 * k for k in range(1, 3 * per_epoch // 3 + 1)] if extra else [])
        want = sorted(set(want) | {per_epoch, 2 * per_epoch, 3 * per_epoch})
        assert [r["step"] for r in evals] == want  # inside epochs and at their ends, each step once
        assert all(r["samples"] == len(held) for r in evals)  # every sample, once
    assert all(torch.equal(weights["plain"][k], weights["every"][k]) for k in weights["plain"])


def _eval_indices(ds: Dataset, world: int, max_batches: int, eval_batch: int, fast: bool) -> list[list[int]]:
    data = Datasets(TensorDataset(torch.zeros(4, 1)), ds, (1,), 2)
    out = []
    for rank in range(world):
        dist_state = DistState("test", rank, rank, world, "gloo", torch.device("cpu"))
        loader = build_loaders(data, DataConfig(eval_batch_size=eval_batch, fast_path=fast), 0, dist_state, 1,
                               eval_max_batches=max_batches).eval
        out.append([int(i) for batch in loader for i in batch[0].flatten().tolist()])
    return out


@pytest.mark.parametrize("fast", [True, False])
def test_max_batches_is_the_same_first_samples_at_any_world_size(fast: bool) -> None:
    ds = TensorDataset(torch.arange(53).float().unsqueeze(1), torch.zeros(53, dtype=torch.long))
    for world in (1, 2, 3):
        shards = _eval_indices(ds, world, max_batches=3, eval_batch=7, fast=fast)
        seen = sorted(i for shard in shards for i in shard)
        assert seen == list(range(21)), world  # 3 x 7 first samples, each once, whatever the world size
    whole = _eval_indices(ds, 3, max_batches=100, eval_batch=7, fast=fast)
    assert sorted(i for shard in whole for i in shard) == list(range(53))  # more than the set: all of it


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_at_two_ranks_evals_inside_epochs_change_nothing_and_each_is_exact(tmp_path: Path) -> None:
    args = ["data.name=synthetic", "data.train_size=120", "data.eval_size=37", "data.batch_size=4",
            "data.eval_batch_size=5", "train.epochs=2", "log.progress=none",
            "model.name=tests.workers.dropout_model:build"]
    run_dtrain(2, [*args, f"output_dir={tmp_path / 'plain'}"])
    run_dtrain(2, [*args, "eval.every_steps=4", f"output_dir={tmp_path / 'every'}"])
    a, b = torch.load(tmp_path / "plain" / "model.pt"), torch.load(tmp_path / "every" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r for r in records(tmp_path / "every") if r["split"] == "eval"]
    per_epoch = 15  # 60 samples a rank in batches of 4
    assert [r["step"] for r in evals] == sorted({*range(4, 2 * per_epoch + 1, 4), per_epoch, 2 * per_epoch})
    assert all(r["samples"] == 37 for r in evals)
    # The eval at an epoch's end is that epoch's, equal in both runs (same weights, same exact eval).
    plain = {r["step"]: r for r in records(tmp_path / "plain") if r["split"] == "eval"}
    for r in evals:
        if r["step"] in plain:
            assert r["loss"] == plain[r["step"]]["loss"]
    print(json.dumps({"evals": [r["step"] for r in evals]}))
