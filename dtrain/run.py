"""Wire one training run together: config -> launch -> process group -> data -> model -> loop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import Config, to_dict, to_yaml
from dtrain.data import build_datasets, build_loaders
from dtrain.dist import DistState, distributed, resolve_backend, resolve_device
from dtrain.engine import FitPlan, Loop, fit, steps_per_epoch
from dtrain.env import detect_launch
from dtrain.errors import DTrainError
from dtrain.loggers import open_loggers
from dtrain.loggers.base import require_logger_extras
from dtrain.models import build_model
from dtrain.optim import GroupInfo, build_optimizer, build_scheduler
from dtrain.precision import build_precision
from dtrain.progress import Progress


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Refuse to clobber an earlier run's metrics unless asked to."""
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics) and not overwrite:
        raise DTrainError(f"config key 'output_dir' has value {path!r}, which already holds a run "
                          f"({metrics}); allowed: a new directory, or overwrite=true to replace it")
    os.makedirs(path, exist_ok=True)


def runtime_summary(cfg: Config, ds: DistState, precision: str) -> dict[str, Any]:
    return {
        "launcher": ds.launcher,
        "precision": precision,
        "device": str(ds.device),
        "backend": ds.backend,
        "world_size": ds.world_size,
        "per_process_batch": cfg.data.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "global_batch": cfg.data.batch_size * cfg.train.grad_accum_steps * ds.world_size,
    }


def _groups_text(infos: list[GroupInfo]) -> str:
    rows = [f"  {g.name}: lr={g.lr:g} weight_decay={g.weight_decay:g} params={g.num_params}" for g in infos]
    return "param groups:\n" + "\n".join(rows)


def build_loop(cfg: Config, ds: DistState, model: torch.nn.Module, total_steps: int,
               precision_name: Optional[str] = None) -> tuple[Loop, list[GroupInfo]]:
    """Wrap `model` in DDP and attach optimizer, schedule and precision."""
    precision = build_precision(precision_name or cfg.train.precision, ds.device)
    model = model.to(ds.device)
    # Parameter-group errors surface before DDP's first broadcast of the weights.
    optimizer, infos = build_optimizer(cfg.optim, model)
    ddp = DDP(model, device_ids=[ds.device.index] if ds.device.type == "cuda" else None)
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.optim.lr, total_steps)
    return Loop(ddp, optimizer, scheduler, precision, ds, cfg.train.grad_accum_steps, cfg.train.grad_clip), infos


@dataclass
class RunResult:
    eval: Optional[dict[str, float]]
    """The last evaluation (loss, accuracy, samples)."""
    loop: Loop
    """The trained loop: model, optimizer, schedule and counters."""


def train(cfg: Config, environ: Optional[Mapping[str, str]] = None) -> RunResult:
    """Run training under whatever launcher started this process."""
    launch = detect_launch(os.environ if environ is None else environ)
    # Checks that need no process group run first, so a bad value fails fast on every rank.
    device = resolve_device(cfg.train.device, launch.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    build_precision(cfg.train.precision, device)
    if launch.rank == 0:
        require_logger_extras(cfg.log)  # only rank 0 logs, so only it needs the packages

    with distributed(launch, backend, cfg.train.device, cfg.dist.timeout_s) as ds:
        ds.run_on_main(lambda: prepare_output_dir(cfg.output_dir, cfg.overwrite))
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        data = build_datasets(cfg.data, cfg.train.seed, ds)
        loaders = build_loaders(data, cfg.data, cfg.train.seed, ds)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        per_epoch = steps_per_epoch(loaders.train, cfg.train.grad_accum_steps)
        plan = FitPlan(cfg.train.epochs, cfg.train.max_steps, cfg.log.every_steps, cfg.data.batch_size)
        total = plan.total_steps(per_epoch)
        loop, infos = build_loop(cfg, ds, model, total)

        runtime = runtime_summary(cfg, ds, loop.precision.name)
        progress = Progress(cfg.log.progress, total, enabled=ds.is_main)
        if ds.is_main:
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(cfg, {"runtime": runtime}))
            progress.print("dtrain: " + " ".join(f"{k}={v}" for k, v in runtime.items()))
            progress.print(_groups_text(infos))
            progress.print(f"dtrain: {len(data.train)} train / {len(data.eval)} eval samples, "
                           f"{per_epoch} steps per epoch, {total} steps in all")
        # Opened under run_on_main: a logger that cannot start on rank 0 (no W&B
        # account, say) stops every rank now instead of hanging them in fit().
        logger = ds.run_on_main(lambda: open_loggers(True, cfg.output_dir, cfg.log,
                                                     to_dict(cfg, {"runtime": runtime})), share_result=False)
        if not ds.is_main:
            logger = open_loggers(False, cfg.output_dir, cfg.log, {})
        try:
            with logger:
                result = fit(loop, loaders.train, loaders.train_sampler, loaders.eval, plan, logger, progress)
        finally:
            progress.close()
        if ds.is_main and cfg.train.save_model:
            torch.save(loop.module.state_dict(), os.path.join(cfg.output_dir, "model.pt"))
        if ds.is_main and result is not None:
            print(f"dtrain: final eval loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
                  f"on {result['samples']} samples; outputs in {cfg.output_dir}", flush=True)
        return RunResult(result, loop)

