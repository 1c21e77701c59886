"""Optimizers with per-layer parameter groups, and step-counted LR schedules."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dtrain.config import OptimConfig, SchedConfig
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class GroupInfo:
    name: str
    lr: float
    weight_decay: float
    num_params: int
    """Number of scalar parameters (elements), not tensors."""


def _is_no_decay(param: nn.Parameter) -> bool:
    # Biases and normalisation scales are vectors; decaying them toward zero
    # only constrains the model without regularising it.
    return param.ndim < 2


def param_groups(cfg: OptimConfig, model: nn.Module) -> tuple[list[dict], list[GroupInfo]]:
    """Split the model's parameters by the configured globs.

    Returns the torch param-group dicts (default group first) and a summary
    for printing. A parameter matched by two globs, or a glob matching
    nothing, is an error naming it.
    """
    buckets: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(cfg.param_groups) + 1)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hits = [i for i, g in enumerate(cfg.param_groups) if fnmatch.fnmatchcase(name, g.params)]
        if len(hits) > 1:
            # Silently picking the first match would hide a typo in the second glob.
            first, second = hits[0], hits[1]
            raise ConfigError(f"optim.param_groups[{second}].params", cfg.param_groups[second].params,
                              f"a glob disjoint from the other groups' (parameter {name!r} is also "
                              f"matched by optim.param_groups[{first}].params="
                              f"{cfg.param_groups[first].params!r})")
        buckets[hits[0] + 1 if hits else 0].append((name, param))
    for i, g in enumerate(cfg.param_groups):
        if not buckets[i + 1]:
            names = ", ".join(n for n, p in model.named_parameters() if p.requires_grad)
            raise ConfigError(f"optim.param_groups[{i}].params", g.params,
                              f"a glob matching at least one trainable parameter of: {names}")

    torch_groups: list[dict] = []
    infos: list[GroupInfo] = []
    specs = [("default", cfg.lr, cfg.weight_decay)] + [
        (g.params, cfg.lr if g.lr is None else g.lr, cfg.weight_decay if g.weight_decay is None else g.weight_decay)
        for g in cfg.param_groups]
    for (label, lr, wd), members in zip(specs, buckets):
        split = [(label, wd, [p for _, p in members])]
        if cfg.no_decay_bias_norm:
            split = [(label, wd, [p for _, p in members if not _is_no_decay(p)]),
                     (f"{label} (no decay)", 0.0, [p for _, p in members if _is_no_decay(p)])]
        for sub_label, sub_wd, params in split:
            if params:
                torch_groups.append({"params": params, "lr": lr, "weight_decay": sub_wd, "name": sub_label})
                infos.append(GroupInfo(sub_label, lr, sub_wd, sum(p.numel() for p in params)))
    return torch_groups, infos


def build_optimizer(cfg: OptimConfig, model: nn.Module,
                    device_steps: bool = False) -> tuple[torch.optim.Optimizer, list[GroupInfo]]:
    """`device_steps`: keep Adam's step counters beside the parameters (capturable), so that
    train.on_nonfinite=skip can undo a step on a GPU without reading a flag back each step."""
    groups, infos = param_groups(cfg, model)
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
            nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    elif cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                  weight_decay=cfg.weight_decay, capturable=device_steps)
    else:  # validate() already refused it; kept for direct callers
        raise ConfigError("optim.name", cfg.name, "sgd | adam | adamw")
    return opt, infos


def lr_multiplier(cfg: SchedConfig, base_lr: float, total_steps: int) -> Callable[[int], float]:
    """The factor on each group's lr for the optimizer step with 0-based index i.

    Warm-up rises linearly, (i + 1) / warmup_steps, so the first step already
    moves the weights and step index warmup_steps - 1 is the first at the full
    lr. The decay's clock starts at that peak step: step and cosine/linear
    count from it, and cosine/linear reach min_lr exactly on the last step
    (index total_steps - 1). min_lr is a fraction of optim.lr, so groups with
    other lrs decay in proportion.
    """
    warm = cfg.warmup_steps
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    peak = max(warm - 1, 0)
    decay_steps = max(1, total_steps - 1 - peak)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = i - peak
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** (t // cfg.step_size)
        progress = min(1.0, t / decay_steps)
        if cfg.name == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.name == "linear":
            return 1.0 - (1.0 - floor) * progress
        raise ConfigError("sched.name", cfg.name, "constant | step | cosine | linear")

    return factor


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, base_lr: float,
                    total_steps: int) -> LambdaLR:
    """One scheduler.step() per optimizer step that really updated the weights."""
    return LambdaLR(optimizer, lr_multiplier(cfg, base_lr, total_steps))
