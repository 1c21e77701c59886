"""Run under torchrun with 2 ranks: the dist.* knobs on the DDP object, and compressed gradients.

Prints one JSON line on rank 0:
  "knobs": {override: what the DDP object reports}
  "grads": {compression: {"ddp": [...], "halves": [[...], [...]]}}: the flat gradient DDP left after one
  backward of each rank's half of a fixed batch, and the two halves' gradients computed by plain autograd
  in this one process (each divided by the world size), for the test to compare.
  "buckets": {override: the bucket sizes in bytes DDP all-reduces, after it rebuilt its buckets, for the
  benchmark's 784-512-512-10 MLP}
"""

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import load_config
from dtrain.runtime.dist import distributed
from dtrain.runtime.env import detect_launch
from dtrain.parallel import build_strategy

KNOBS = [[], ["dist.bucket_cap_mb=0.5"], ["dist.static_graph=true"], ["dist.find_unused_parameters=true"],
         ["dist.grad_compression=bf16"], ["dist.grad_compression=fp16"]]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def flat_grad(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def main() -> None:
    with distributed(detect_launch(os.environ), "gloo", "cpu") as ds:
        report = {}
        for extra in KNOBS:
            ddp = build_strategy(load_config(None, extra).dist, ds).wrap(model())
            hook = ddp._get_ddp_logging_data().get("comm_hook")
            report[" ".join(extra) or "default"] = {
                "bucket_bytes_cap": ddp.bucket_bytes_cap, "static_graph": ddp.static_graph,
                "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
                "find_unused_parameters": ddp.find_unused_parameters, "comm_hook": hook}

        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 20, generator=g) * 3, torch.randint(0, 5, (64,), generator=g)
        halves = []
        for r in range(ds.world_size):  # the reference: plain autograd, no DDP, one process
            ref = model()
            sl = slice(r * 32, (r + 1) * 32)
            (F.cross_entropy(ref(x[sl]), y[sl]) / ds.world_size).backward()
            halves.append(flat_grad(ref).tolist())
        grads = {}
        for compression in ("none", "bf16", "fp16"):
            cfg = load_config(None, [f"dist.grad_compression={compression}"])
            strategy = build_strategy(cfg.dist, ds)
            ddp = strategy.wrap(model())
            sl = slice(ds.rank * 32, (ds.rank + 1) * 32)
            F.cross_entropy(ddp(x[sl]), y[sl]).backward()  # DDP averages the ranks' gradients
            grads[compression] = flat_grad(strategy.unwrap(ddp)).tolist()
        buckets = {}
        for extra in ([], ["dist.bucket_cap_mb=1"]):
            torch.manual_seed(0)
            mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
            ddp = build_strategy(load_config(None, extra).dist, ds).wrap(mlp)
            for _ in range(3):  # DDP rebuilds its buckets in the order gradients arrived, at the second step
                ddp(torch.randn(4, 784)).sum().backward()
            sizes = ddp._get_ddp_logging_data()["rebuilt_bucket_sizes"]
            buckets[" ".join(extra) or "default"] = [int(b) for b in sizes.split(",")]
        if ds.is_main:
            print(json.dumps({"knobs": report, "grads": grads, "halves": halves, "buckets": buckets}), flush=True)


if __name__ == "__main__":
    main()
