"""Under torchrun (2 ranks, gloo): dtrain's sharded GradScaler over FSDP2's sharded gradients. An inf in rank 1's
own shard of the gradients only must skip the optimizer step on both ranks and halve the scale on both; a clean
step afterwards updates both. Rank 0 prints one JSON line of what it saw and gathered."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn

from dtrain.config import load_config
from dtrain.loop.precision import sharded_scaler
from dtrain.parallel.fsdp2 import FSDP2Strategy


def full(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ModuleList([nn.Linear(8, 8)]), nn.Linear(8, 2))
    model.forward = lambda x: model[2](model[1][0](model[0](x)))  # type: ignore[method-assign]
    cfg = load_config(None, ["dist.strategy=fsdp2"]).dist
    model = FSDP2Strategy(cfg, torch.device("cpu"), 2).wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = sharded_scaler(torch.device("cpu"))
    x = torch.randn(6, 4)
    seen = {}
    for step, poison in ((1, True), (2, False)):
        before = full(model)
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        if poison and rank == 1:
            grad = next(p for p in model.parameters() if p.grad is not None and p.grad.to_local().numel()).grad
            grad.to_local().view(-1)[0] = float("inf")  # rank 1's own shard only
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        after = full(model)
        seen[step] = {"changed": not torch.equal(before, after), "scale_before": scale,
                      "scale_after": scaler.get_scale()}
    gathered = [None, None]
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        print(json.dumps(gathered), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
