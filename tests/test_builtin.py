"""The built-in datasets: synthetic is a function of its seed, digits ships offline with a fixed split; and the
shapes a run reads off data that does not state them."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from dtrain.config import DataConfig
from dtrain.data.builtin import digits, synthetic
from dtrain.data.types import Datasets, fill_in_shapes


def test_synthetic_is_a_function_of_the_seed() -> None:
    cfg = DataConfig(name="synthetic", train_size=50, eval_size=10)
    a, b, c = synthetic(cfg, 1), synthetic(cfg, 1), synthetic(cfg, 2)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert len(a.train) == 50 and len(a.eval) == 10


def test_digits_ships_offline_with_a_fixed_split() -> None:
    d = digits()
    assert d.input_shape == (64,) and len(d.train) + len(d.eval) == 1797 and len(d.eval) == 359
    x, _ = d.train.tensors
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(digits().eval.tensors[1], d.eval.tensors[1])


class _Named(Dataset):
    classes = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 5), 0


def test_fill_in_shapes_reads_what_the_data_says() -> None:
    def pair(sample):
        return sample[0], sample[1]

    labels = TensorDataset(torch.zeros(6, 2, 3), torch.tensor([0, 4, 1, 0, 2, 3]))
    assert fill_in_shapes(Datasets(labels), pair).input_shape == (2, 3)
    assert fill_in_shapes(Datasets(labels), pair).num_classes == 5  # the largest integer label + 1
    assert fill_in_shapes(Datasets(_Named()), pair).num_classes == 4  # a `classes` attribute
    targets = TensorDataset(torch.zeros(4, 2), torch.zeros(4, 7))
    assert fill_in_shapes(Datasets(targets), pair).num_classes == 7  # a regression target's width
    stated = Datasets(labels, None, (9,), 2)
    assert fill_in_shapes(stated, pair) is stated
