"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds 1/W of the parameters, gradients and optimizer
state; each shard unit's full weights exist only while its forward or backward runs.

What the wrap does that a bare `fully_shard` does not:
  * rank 0's weights and buffers are broadcast first: `fully_shard` shards whatever each rank holds, so ranks
    that initialised differently would silently train a model that none of them started from;
  * the shard units are found (dist.shard) and checked before any collective, so a model with nothing to shard
    or a pattern that matches nothing is one line at set-up on every rank;
  * with train.precision=bf16 the parameters are cast for compute by FSDP2's mixed-precision policy (fp32 master
    weights, fp32 gradient reduction), not by autocast;
  * gradient accumulation holds the reduce-scatter back to the window's last backward (or not, with
    dist.reduce_every_micro_step), so K micro-steps cost one gradient reduction.
The gradients are DTensors sharded over the ranks, so the global norm is computed over the shards and summed
across ranks (`clip_grad_norm`), and the checkpoint is sharded (`sharded = True`: dtrain/checkpoint/sharded.py).
"""

from __future__ import annotations

import fnmatch
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from dtrain.config import DistConfig
from dtrain.errors import ConfigError, DTrainError
from dtrain.parallel.base import Strategy, local_tensors

_TOO_OLD = ("ddp (dist.strategy=fsdp2 needs torch.distributed.fsdp.fully_shard with set_gradient_divide_factor: "
            "torch 2.8 or newer; this is torch {})")


def fully_shard_api() -> Any:
    """The torch module that has fully_shard; a one-line config error when this torch has none."""
    try:
        from torch.distributed import fsdp

        # torch 2.6 and 2.7 have fully_shard, but their divide-factor setter builds an NCCL-only reduce op, so
        # on gloo the first reduce-scatter would fail; 2.8 renamed it and made it work on any backend.
        fsdp.fully_shard, fsdp.MixedPrecisionPolicy, fsdp.FSDPModule.set_gradient_divide_factor  # noqa: B018
    except (ImportError, AttributeError):
        raise ConfigError("dist.strategy", "fsdp2", _TOO_OLD.format(torch.__version__)) from None
    return fsdp


def _gather_each_unit_once(module: nn.Module) -> None:
    """Unshard and reshard every unit, one at a time, before training. FSDP2 makes a unit's unsharded parameters at
    its first gather, and (torch 2.14) a micro-step without gradient sync reads them in every unit's post-backward:
    a unit the forward never runs (a head kept for later, a branch not taken) would fail the first window of
    accumulation. Same order on every rank: each gather is a collective."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.unshard()
            unit.reshard()


def shard_units(module: nn.Module, spec: Any) -> list[tuple[str, nn.Module]]:
    """(name, submodule) of each shard unit, in the model's order: `spec` is ['auto'] (the children of every
    nn.ModuleList) or a list of class-name globs. A unit inside another unit is kept (FSDP2 nests them).
    One line naming dist.shard when nothing qualifies."""
    named = list(module.named_modules())
    if list(spec) == ["auto"]:
        lists = [name for name, m in named if isinstance(m, nn.ModuleList)]
        units = [(name, m) for name, m in named
                 if name and any(name.rpartition(".")[0] == owner for owner in lists)
                 and any(p.numel() for p in m.parameters())]
        if not units:
            why = (f"class-name globs naming the blocks to shard, e.g. [Linear]: the model ({type(module).__name__}) "
                   f"holds no nn.ModuleList of blocks with parameters, so auto finds nothing to shard; its classes: "
                   f"{_classes(module)}")
            raise ConfigError("dist.shard", ["auto"], why)
        return units
    units = [(name, m) for name, m in named
             if name and any(fnmatch.fnmatchcase(type(m).__name__, g) for g in spec)]
    unmatched = [g for g in spec if not any(fnmatch.fnmatchcase(type(m).__name__, g) for _, m in named if _)]
    if unmatched:
        raise ConfigError("dist.shard", spec, f"auto | class-name globs that match a submodule: {unmatched} match "
                                              f"none of the model's classes ({_classes(module)})")
    empty = [name for name, m in units if not any(p.numel() for p in m.parameters())]
    units = [(name, m) for name, m in units if name not in empty]
    if not units:
        raise ConfigError("dist.shard", spec, f"globs that match submodules with parameters; those matched hold "
                                              f"none: {empty[:5]}")
    return units


def _classes(module: nn.Module) -> str:
    names = sorted({type(m).__name__ for name, m in module.named_modules() if name})
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


class FSDP2Strategy(Strategy):
    name = "fsdp2"
    even_eval_batches = True  # every forward gathers weights: a rank that stops early leaves the others waiting
    sharded = True
    casts_parameters = True

    def __init__(self, cfg: DistConfig, device: torch.device, world_size: int, precision: str = "fp32") -> None:
        self.cfg, self.device, self.world_size, self.precision = cfg, device, world_size, precision
        self.units: list[str] = []
        self.mesh: Any = None

    def check(self, module: nn.Module) -> None:
        fully_shard_api()
        shard_units(module, self.cfg.shard)

    def wrap(self, module: nn.Module) -> nn.Module:
        fsdp = fully_shard_api()
        _broadcast_from_rank0(module)
        policy = fsdp.MixedPrecisionPolicy(param_dtype=_param_dtype(self.precision), reduce_dtype=torch.float32)
        # Our own mesh (what fully_shard would make by default), so that close() can let go of its group.
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs = {"reshard_after_forward": self.cfg.reshard_after_forward, "mp_policy": policy, "mesh": self.mesh}
        units = shard_units(module, self.cfg.shard)
        # Innermost first: fully_shard of a unit takes the parameters no inner unit took.
        for name, unit in sorted(units, key=lambda u: -u[0].count(".")):
            fsdp.fully_shard(unit, **kwargs)
        fsdp.fully_shard(module, **kwargs)  # the root: every parameter outside the units (embeddings, heads)
        # Averaged over the ranks, said rather than left to the default (one torch release summed on gloo):
        # grad_scale's W / count depends on it.
        for unit in module.modules():
            if isinstance(unit, fsdp.FSDPModule):
                unit.set_gradient_divide_factor(float(self.world_size))
        _gather_each_unit_once(module)
        self.units = [name for name, _ in units]
        return module

    def close(self) -> None:
        # DTensor's sharding caches (torch globals) keep the mesh alive after the run, and the mesh holds the
        # process group in its registry: destroy_process_group() could not free it, and gloo's threads ran into
        # interpreter shutdown, where a finished job sometimes aborted ("terminate called without an active
        # exception"). Emptying the registry lets the group go; the mesh is never used again.
        registry = getattr(self.mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the module in place; it stays the user's module

    def sync_gradients(self, model: nn.Module, last: bool) -> ContextManager[Any]:
        # False: the backward keeps the unsharded gradients and adds to them; the window's last backward
        # reduce-scatters their sum. Set on every unit (the root call recurses) before each backward.
        model.set_requires_gradient_sync(last or self.cfg.reduce_every_micro_step)
        return _NOTHING

    def grad_scale(self, global_real: int) -> float:
        # The reduce-scatter averages over the ranks, as DDP's all-reduce does.
        return self.world_size / global_real

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        return _global_norm([p.grad for p in model.parameters() if p.grad is not None], self.device)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = _global_norm(grads, self.device)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        # Each rank scales its own shard by the one global coefficient (the same rule as nn.utils'); no collective.
        locals_ = local_tensors(grads)
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in locals_:
            by_kind.setdefault((g.device, g.dtype), []).append(g)
        for (device, dtype), group in by_kind.items():
            torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))
        return norm

    def local_grads(self, model: nn.Module) -> list[torch.Tensor]:
        return local_tensors([p.grad for p in model.parameters() if p.grad is not None])

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        # The full state dict, gathered to rank 0 on the CPU (the others get {}): what model.pt holds.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank has the full state (a checkpoint is shared from rank 0); each keeps its own shard.
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        raise DTrainError("internal: an fsdp2 checkpoint is sharded; its optimizer state is saved per rank")

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # A full, unsharded optimizer state (a DDP or one-process checkpoint), keyed by parameter index. Not strict:
        # a parameter never given a gradient has no state there, and must have none here either.
        named = by_name(model, optimizer, state)
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
        for fqn, param in model.named_parameters():
            if fqn not in named["state"]:
                optimizer.state.pop(param, None)

    def release(self, model: nn.Module) -> nn.Module:
        """FSDP2 taken off the module in place: each parameter gathered whole (one unit's at a time, on its
        device), the hooks removed and each module's own class back, so `model(x)` runs on its own, after the
        process group is gone. Tied parameters stay tied. Every rank calls it (the gathers are collectives)."""
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.reshard()  # every parameter a sharded DTensor again (the root stays gathered after a forward)
        whole: dict[int, nn.Parameter] = {}
        for p in model.parameters():  # each shared parameter once, in the same order on every rank
            if id(p) not in whole:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                whole[id(p)] = nn.Parameter(full.detach().clone(), requires_grad=p.requires_grad)
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and id(p) in whole:
                    m._parameters[name] = whole[id(p)]
        for m in fsdp_modules:
            state = m._get_fsdp_state()
            for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                handle.remove()
            m.__class__ = next(c for c in type(m).__mro__ if not issubclass(c, FSDPModule))
        return model

    def share_buffers(self, model: nn.Module) -> None:
        # Buffers are not sharded: each rank's hold its own last batch's statistics, as under DDP.
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NOTHING = _Nothing()


def _param_dtype(precision: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


_BROADCAST_BYTES = 64 * 2**20


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank: tensors of a kind flattened into buckets of up to 64 MiB,
    one broadcast each (per-tensor broadcasts pay a collective's fixed cost per tensor; one flat copy of the whole
    model would double its memory while a large model is still whole on every rank)."""
    seen: set[int] = set()
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:  # a tied weight once
            seen.add(id(t))
            by_kind.setdefault((t.device, t.dtype), []).append(t.data)
    for group in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= _BROADCAST_BYTES:
                _broadcast_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _broadcast_bucket(bucket)


def _broadcast_bucket(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _global_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm over every gradient of the model on all ranks: the squares of each rank's shards, summed
    across ranks (one all-reduce of one number; every rank calls it, whatever its shards hold)."""
    locals_ = local_tensors(grads)
    if locals_:
        norms = torch._foreach_norm(locals_)
        square = torch.stack([n.to(device=locals_[0].device, dtype=torch.float32) for n in norms]).square().sum()
    else:  # every parameter frozen or unused in this step: still this rank's part of the all-reduce
        square = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(square)
    return square.sqrt()


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index (`optimizer.state_dict()`) -> keyed by parameter name
    (torch.distributed.checkpoint's form), for this optimizer's parameters of `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state["param_groups"]
    index_to_name: dict[int, str] = {}
    position = 0
    for group in saved_groups:
        for index in group["params"]:
            index_to_name[index] = order[position]
            position += 1
    return {"state": {index_to_name[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in saved_groups]}
