"""Models for the FSDP2 tests (`model.name=tests.workers.fsdp2_models:build`).

`Blocks`: an input layer, a ModuleList of residual blocks (dist.shard=[auto] makes each a unit), a frozen layer
and a head, so that parameters sit inside the units, outside them (on the root) and frozen; 35 rows divide by
neither 2 nor 3 ranks, nor do the frozen layer's 7, so FSDP2 pads their shards. `build_per_rank` starts every
rank from other weights (seeded by RANK), as a careless factory would, to show that the wrap still starts all
ranks from rank 0's.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch
from torch import nn

from dtrain.loop.hooks import Callback, RunView


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class Blocks(nn.Module):
    def __init__(self, features: int, classes: int, width: int = 35, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.frozen = nn.Linear(width, 7)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(width + 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = block(h)
        return self.head(torch.cat([h, torch.tanh(self.frozen(h))], dim=1))


def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return Blocks(int(torch.tensor(input_shape).prod()), num_classes)


def build_per_rank(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
    return build(input_shape, num_classes)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class HashAtStart(Callback):
    """Writes <dir>/start_<rank>.txt: the hash of the full weights every rank holds when training starts (each
    parameter gathered whole from its shards), and <dir>/built_<rank>.txt was written by the factory below."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, run: RunView) -> None:
        full = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach())
                for name, p in run.state.module.named_parameters()}
        rank = run.state.dist.rank
        with open(os.path.join(self.folder, f"start_{rank}.txt"), "w") as f:
            f.write(digest(full))


def build_per_rank_noting(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """build_per_rank, and the hash of what this rank built, in $DTRAIN_TEST_HASH_DIR/built_<rank>.txt."""
    return note_built(build_per_rank(input_shape, num_classes))


def note_built(model: nn.Module) -> nn.Module:
    folder = os.environ["DTRAIN_TEST_HASH_DIR"]
    with open(os.path.join(folder, f"built_{os.environ.get('RANK', '0')}.txt"), "w") as f:
        f.write(digest(dict(model.named_parameters())))
    return model


def hash_callback() -> Callback:
    return HashAtStart(os.environ["DTRAIN_TEST_HASH_DIR"])


def build_wide(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Wider units, so that FSDP2's padding of uneven rows is small next to each rank's share."""
    return Blocks(int(torch.tensor(input_shape).prod()), num_classes, width=96, depth=4)


class CountReductions(Callback):
    """Counts, with torch's profiler, the gradient reduce-scatters the run's steps issue; rank 0 writes
    <$DTRAIN_TEST_OUT>/reductions.json: {"reduce_scatters", "steps"}."""

    requests_alone = False

    def __init__(self) -> None:
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.steps = 0

    def on_fit_start(self, run: RunView) -> None:
        self.prof.__enter__()

    def on_step_end(self, run: RunView) -> None:
        self.steps += 1

    def on_fit_end(self, run: RunView) -> None:
        self.prof.__exit__(None, None, None)
        count = sum(1 for e in self.prof.events() if e.name == "c10d::_reduce_scatter_base_")
        if run.state.dist.rank == 0:
            import json

            with open(os.path.join(os.environ["DTRAIN_TEST_OUT"], "reductions.json"), "w") as f:
                json.dump({"reduce_scatters": count, "steps": self.steps}, f)


class LocalBytes(Callback):
    """At the end, the bytes this rank holds of the parameters, gradients and optimizer state (each DTensor's local
    shard): <$DTRAIN_TEST_OUT>/bytes_<rank>.json."""

    def on_fit_end(self, run: RunView) -> None:
        import json

        def local(t: torch.Tensor) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = list(run.state.module.parameters())
        opt = run.state.optimizer
        held = {"params": sum(local(p) for p in params),
                "grads": sum(local(p.grad) for p in params if p.grad is not None),
                "optim": sum(local(v) for p in params for k, v in opt.state.get(p, {}).items()
                             if isinstance(v, torch.Tensor) and k != "step")}
        with open(os.path.join(os.environ["DTRAIN_TEST_OUT"], f"bytes_{run.state.dist.rank}.json"), "w") as f:
            json.dump(held, f)


class DtypeSeen(Callback):
    """The dtypes the first Linear's forward sees (its weight as the forward holds it, its input and output) on the
    first step: <$DTRAIN_TEST_OUT>/dtypes_<rank>.json. Under FSDP2's bf16 policy the weight itself is bf16 there,
    while the parameter the optimizer steps stays fp32."""

    def on_fit_start(self, run: RunView) -> None:
        linear = next(m for m in run.state.module.modules() if isinstance(m, nn.Linear))
        self.seen: dict[str, str] = {}

        # A pre-hook: FSDP2's own post-forward hook reshards (the weight is the fp32 shard again) before any
        # forward hook registered later runs; its pre-forward hook, registered first, has gathered and cast.
        def before(module: nn.Module, args: tuple) -> None:
            if "weight" not in self.seen:
                self.seen.update(weight=str(module.weight.dtype), input=str(args[0].dtype))

        def after(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.seen.setdefault("output", str(out.dtype))

        self.handles = [linear.register_forward_pre_hook(before), linear.register_forward_hook(after)]

    def on_fit_end(self, run: RunView) -> None:
        import json

        for handle in self.handles:
            handle.remove()
        master = {str(p.dtype) for p in run.state.module.parameters()}
        with open(os.path.join(os.environ["DTRAIN_TEST_OUT"], f"dtypes_{run.state.dist.rank}.json"), "w") as f:
            json.dump({**self.seen, "parameters": sorted(master)}, f)
