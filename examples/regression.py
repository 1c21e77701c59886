"""The notes' regression: a TensorDataset, an MLP, MSE, SGD with nesterov momentum and weight decay.

    python examples/regression.py
    torchrun --nproc_per_node=2 examples/regression.py
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dtrain

g = torch.Generator().manual_seed(0)  # the same data on every rank
x = torch.randn(1000, 10, generator=g)
y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(1000, 1, generator=g)
result = dtrain.train(model=lambda: nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1)),
                      train_data=TensorDataset(x[:800], y[:800]), eval_data=TensorDataset(x[800:], y[800:]),
                      loss="mse", overrides=["optim.lr=0.01", "optim.nesterov=true", "optim.weight_decay=1e-4",
                                             "train.epochs=20"])
if result.is_main:
    print(f"eval MSE {result.eval['loss']:.4f}")
