"""Wire one training run together: config -> launch -> process group -> data -> model -> loop."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dtrain.config import Config, to_dict, to_yaml
from dtrain.data import Datasets, Loaders, build_datasets, build_loaders
from dtrain.dist import DistState, distributed, resolve_backend, resolve_device
from dtrain.engine import FitPlan, Loop, fit, steps_per_epoch
from dtrain.env import detect_launch
from dtrain.errors import ConfigError, DTrainError
from dtrain.loggers import MultiLogger, null_logger, open_loggers
from dtrain.models import build_model
from dtrain.optim import GroupInfo, build_optimizer, build_scheduler
from dtrain.precision import build_precision, check_precision
from dtrain.progress import Progress


# What a run writes into output_dir; overwrite=true removes all of it first, so
# a replaced run leaves no stale event file, plot or weights behind.
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "model.pt", "curves.png", "tensorboard", "wandb")


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked to; one-line errors for unusable paths."""
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics) and not overwrite:
        raise ConfigError("output_dir", path, "a new directory, or overwrite=true to replace the run "
                          f"already there ({metrics})")
    try:
        os.makedirs(path, exist_ok=True)
        if overwrite:
            for name in RUN_OUTPUTS:
                target = os.path.join(path, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)
    except OSError as exc:
        raise ConfigError("output_dir", path, f"a writable directory ({exc.strerror or exc})") from None


def write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None


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
class Session:
    """Everything set up for a run, on this rank."""

    ds: DistState
    data: Datasets
    loaders: Loaders
    loop: Loop
    groups: list[GroupInfo]
    steps_per_epoch: int
    total_steps: int
    runtime: dict[str, Any]


@contextmanager
def session(cfg: Config, environ: Optional[Mapping[str, str]], prepare: Callable[[], None],
            total_steps: Optional[int] = None) -> Iterator[Session]:
    """Launch -> process group -> rank-0 `prepare` -> data -> model -> loop; the group is always destroyed.

    `total_steps` overrides the plan's step count (the LR finder's own length).
    """
    launch = detect_launch(os.environ if environ is None else environ)
    # Checks that need no process group come first, so a bad value fails at once on every rank.
    device = resolve_device(cfg.train.device, launch.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    check_precision(cfg.train.precision, device)

    with distributed(launch, backend, cfg.train.device, cfg.dist.timeout_s) as ds:
        ds.run_on_main(prepare)
        # Seeding right before data and model makes the initial weights a function of
        # train.seed alone: identical on every rank, in train() and in lr_find().
        torch.manual_seed(cfg.train.seed)
        data = build_datasets(cfg.data, cfg.train.seed, ds)
        loaders = build_loaders(data, cfg.data, cfg.train.seed, ds)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        per_epoch = steps_per_epoch(loaders.train, cfg.train.grad_accum_steps)
        total = total_steps or plan_for(cfg).total_steps(per_epoch)
        loop, groups = build_loop(cfg, ds, model, total)
        yield Session(ds, data, loaders, loop, groups, per_epoch, total,
                      runtime_summary(cfg, ds, loop.precision.name))


def plan_for(cfg: Config) -> FitPlan:
    return FitPlan(cfg.train.epochs, cfg.train.max_steps, cfg.log.every_steps, cfg.data.batch_size)


@dataclass
class RunResult:
    eval: Optional[dict[str, float]]
    """The last evaluation (loss, accuracy, samples)."""
    loop: Loop
    """The trained loop: model, optimizer, schedule and counters."""


def train(cfg: Config, environ: Optional[Mapping[str, str]] = None) -> RunResult:
    """Run training under whatever launcher started this process."""
    with session(cfg, environ, lambda: prepare_output_dir(cfg.output_dir, cfg.overwrite)) as run:
        ds, loop = run.ds, run.loop
        runtime = run.runtime

        def start() -> MultiLogger:
            # On rank 0 only, and shared: a config.yaml that cannot be written or a
            # logger that cannot start (no W&B account, say) stops every rank now
            # instead of leaving the others waiting in fit()'s first collective.
            write_text(os.path.join(cfg.output_dir, "config.yaml"), to_yaml(cfg, {"runtime": runtime}))
            return open_loggers(cfg.output_dir, cfg.log, to_dict(cfg, {"runtime": runtime}))

        opened = ds.run_on_main(start, share_result=False)
        logger = opened if ds.is_main else null_logger()
        progress = Progress(cfg.log.progress, run.total_steps, enabled=ds.is_main)
        progress.print("dtrain: " + " ".join(f"{k}={v}" for k, v in runtime.items()))
        progress.print(_groups_text(run.groups))
        progress.print(f"dtrain: {len(run.data.train)} train / {len(run.data.eval)} eval samples, "  # type: ignore[arg-type]
                       f"{run.steps_per_epoch} steps per epoch, {run.total_steps} steps in all")
        try:
            with logger:
                result = fit(loop, run.loaders.train, run.loaders.train_sampler, run.loaders.eval,
                             plan_for(cfg), logger, progress)
        finally:
            progress.close()
        if ds.is_main and cfg.train.save_model:
            torch.save(loop.module.state_dict(), os.path.join(cfg.output_dir, "model.pt"))
        if ds.is_main and result is not None:
            print(f"dtrain: final eval loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
                  f"on {result['samples']} samples; outputs in {cfg.output_dir}", flush=True)
        return RunResult(result, loop)
