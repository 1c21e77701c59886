"""One run's set-up on this rank: launch -> process group -> data -> model -> strategy -> training state.

Each rank builds its data, model and optimizer alone; then one collective agrees that every rank
succeeded, so a rank whose factory raised stops the others at once instead of leaving them in the
strategy's first collective until dist.timeout_s. Only then is the output directory claimed and the
model wrapped. Device, backend and precision are resolved once, before the process group, so a bad
value fails on every rank at once.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from dtrain.callbacks.from_config import build_callbacks
from dtrain.checkpoint import store
from dtrain.checkpoint.rundir import Start, claim
from dtrain.checkpoint.saving import restore
from dtrain.config import Config
from dtrain.data.builtin import build_datasets
from dtrain.data.download import fetch_datasets
from dtrain.data.loaders import Loaders, build_loaders
from dtrain.data.types import Datasets, fill_in_shapes
from dtrain.errors import ConfigError, DTrainError
from dtrain.loop.compiling import CompileWatch, compile_in_place
from dtrain.loop.engine import FitPlan
from dtrain.loop.hooks import Callback
from dtrain.loop.meters import Meter
from dtrain.loop.optim import GroupInfo, build_optimizer, build_scheduler
from dtrain.loop.precision import Precision, build_precision
from dtrain.loop.preflight import check_first_batch
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task, build_task
from dtrain.models.builtin import build_model, from_factory, prepare_model
from dtrain.parallel import build_strategy, forwards_are_collective
from dtrain.runtime.devices import resolve_backend, resolve_device
from dtrain.runtime.dist import DistState, distributed
from dtrain.runtime.env import detect_launch
from dtrain.runtime.seeding import rank_seed, seed_everything


@dataclass
class Given:
    """What the Python API hands in as objects instead of config names; None: use the config."""

    model: Any = None
    """An nn.Module, or a factory called like model.name's."""
    data: Optional[Datasets] = None
    loss: Any = None
    """A built-in loss name or a callable of (outputs, targets) -> per-sample losses."""
    metrics: list[tuple[Optional[str], Any]] = field(default_factory=list)
    """(name or None, metric) pairs added to loss.metrics."""
    callbacks: list[Any] = field(default_factory=list)
    """dtrain.Callback objects, called after dtrain's own."""
    returns_model: bool = False
    """Whether the caller keeps the trained module (dtrain.train): the strategy then hands it over usable
    without the process group (a sharded model gathered whole)."""

    def model_label(self, cfg: Config) -> str:
        """How errors name the model: its config key, or what was handed to dtrain.train."""
        if self.model is None:
            return f"model.name={cfg.model.name}"
        return f"dtrain.train(model={self.model_name()})"

    def model_name(self) -> str:
        return getattr(self.model, "__name__", type(self.model).__name__)


@dataclass
class Parts:
    """What each rank builds on its own, before the ranks agree it all worked."""

    model: torch.nn.Module
    """The plain model on its device, not yet wrapped by the strategy."""
    groups: list[GroupInfo]


def _optimizer(cfg: Config, dist_state: DistState, model: torch.nn.Module) -> tuple[torch.optim.Optimizer,
                                                                                   list[GroupInfo]]:
    # on_nonfinite=skip undoes a step on the device; Adam's CPU step counter would need a host read.
    device_steps = cfg.train.on_nonfinite == "skip" and dist_state.device.type == "cuda"
    return build_optimizer(cfg.optim, model, device_steps)


def build_parts(cfg: Config, dist_state: DistState, model: torch.nn.Module) -> Parts:
    if not any(p.requires_grad for p in model.parameters()):
        what = "has no parameters" if not any(True for _ in model.parameters()) else "has every parameter frozen"
        raise DTrainError(f"the model ({type(model).__name__}, from model.name={cfg.model.name}) {what}: "
                          "nothing to train")
    model = model.to(dist_state.device)
    build_strategy(cfg.dist, dist_state, cfg.train.precision).check(model)  # e.g. fsdp2 with nothing to shard
    # A throwaway optimizer on the plain model: parameter-group errors surface here, before the agreement
    # and the strategy's first collective. The real one is built after the wrap, from the wrapped model.
    _, infos = _optimizer(cfg, dist_state, model)
    return Parts(model, infos)


def build_state(cfg: Config, dist_state: DistState, parts: Parts, total_steps: int,
                precision: Optional[Precision] = None) -> TrainState:
    """The strategy's wrap (DDP's construction broadcasts rank 0's weights; one process is not wrapped), then the
    optimizer over the wrapped model's parameters, schedule and precision."""
    strategy = build_strategy(cfg.dist, dist_state, cfg.train.precision)
    precision = precision or build_precision(cfg.train.precision, dist_state.device, strategy.casts_parameters,
                                             strategy.sharded)
    watch = compile_in_place(parts.model) if cfg.train.compile else CompileWatch()
    try:
        model = strategy.wrap(parts.model)
        optimizer, _ = _optimizer(cfg, dist_state, strategy.unwrap(model))
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.optim.lr, total_steps)
    except BaseException:
        watch.close()
        raise
    return TrainState(model, optimizer, scheduler, precision, dist_state, strategy, cfg.train.grad_accum_steps,
                      cfg.train.grad_clip, compile_watch=watch)


def build_train_state(cfg: Config, dist_state: DistState, model: torch.nn.Module, total_steps: int,
                      precision: Optional[Precision] = None) -> tuple[TrainState, list[GroupInfo]]:
    """Model -> strategy's wrap -> optimizer in one go, for callers that need no agreement step (tests, tools)."""
    parts = build_parts(cfg, dist_state, model)
    return build_state(cfg, dist_state, parts, total_steps, precision), parts.groups


def _model(cfg: Config, given: Given, data: Datasets) -> torch.nn.Module:
    if given.model is None:
        return build_model(cfg.model, data.input_shape, data.num_classes)
    if isinstance(given.model, torch.nn.Module):
        return prepare_model(given.model, cfg.model.init, cfg.model.freeze)
    name = given.model_name()
    return from_factory(given.model, name, f"dtrain.train(model={name})", cfg.model, data.input_shape,
                        data.num_classes)


def build_task_for(cfg: Config, given: Given) -> Task:
    metrics = [(None, m) for m in cfg.loss.metrics] + list(given.metrics)
    return build_task(given.loss if given.loss is not None else cfg.loss.name, metrics,
                      cfg.data.input_key, cfg.data.target_key, cfg.loss.ignore_index)


def plan_for(cfg: Config) -> FitPlan:
    return FitPlan(cfg.train.epochs, cfg.train.max_steps, cfg.log.every_steps)


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from."""

    path: str
    step: int
    wandb_id: Optional[str]
    """The W&B run it logged to: the resumed run continues it."""
    states: dict[str, Any]
    """The registered states it holds, given back once their owners exist (the callbacks); only these are
    kept, not the whole checkpoint."""


@dataclass
class Setup:
    """Everything set up for a run, on this rank."""

    cfg: Config
    """The config as resolved: output_dir is where the run writes."""
    dist_state: DistState
    data: Datasets
    loaders: Loaders
    task: Task
    state: TrainState
    meter: Meter
    """The loss sums, restored with the checkpoint."""
    groups: list[GroupInfo]
    total_steps: int
    start: Optional[Start]
    resumed: Optional[Resumed]
    callbacks: list[Callback] = field(default_factory=list)
    """The user's callbacks: the config's, then those handed to dtrain.train."""


@dataclass
class _Built:
    task: Task
    data: Datasets
    loaders: Loaders
    parts: Parts
    callbacks: list[Callback]


def check_monitors(cfg: Config, task: Task, has_eval: bool) -> None:
    """early_stop.monitor and checkpoint.monitor name an eval value this run computes, and it has an eval set."""
    if cfg.eval.every_steps is not None and not has_eval:
        raise ConfigError("eval.every_steps", cfg.eval.every_steps, "null for a run without eval data")
    for key in ("early_stop.monitor", "checkpoint.monitor"):
        section, field_name = key.split(".")
        name = getattr(getattr(cfg, section), field_name)
        if name is None:
            continue
        if not has_eval:
            raise ConfigError(key, name, "null for a run without eval data (nothing to monitor)")
        if name not in task.eval_names:
            raise ConfigError(key, name, f"one of this run's eval values: {' | '.join(task.eval_names)}")


def check_eval_shards(cfg: Config, data: Datasets, world_size: int) -> None:
    """Under a strategy whose every forward is a collective, each rank needs an eval sample to run its forwards
    with; found here, before anything is written, rather than at the first eval."""
    if data.eval is None or not forwards_are_collective(cfg.dist, world_size):
        return
    n = len(data.eval)  # type: ignore[arg-type]
    if cfg.eval.max_batches is not None:  # the loader's cut (dtrain/data/loaders.py)
        n = min(n, cfg.eval.max_batches * cfg.data.eval_batch_size)
    if n < world_size:
        raise ConfigError("dist.strategy", cfg.dist.strategy,
                          f"ddp for an eval of {n} sample{'' if n == 1 else 's'} (after eval.max_batches) on "
                          f"{world_size} ranks (under {cfg.dist.strategy} every forward is a collective, so each "
                          f"rank needs at least one eval sample)")


def _build_on_this_rank(cfg: Config, given: Given, dist_state: DistState, precision: Precision) -> _Built:
    """Local work only (no collective), so that a failure here can be agreed on."""
    callbacks = [*build_callbacks(cfg.callbacks), *given.callbacks]  # first: a typo'd name fails before the data
    task = build_task_for(cfg, given)
    # Seeding right before data and model makes the initial weights a function of
    # train.seed alone: identical on every rank, in train() and in lr_find().
    seed_everything(cfg.train.seed)
    data = fill_in_shapes(given.data or build_datasets(cfg.data, cfg.train.seed), task.split)
    loaders = build_loaders(data, cfg.data, cfg.train.seed, dist_state, cfg.train.grad_accum_steps,
                            tuple(cfg.checkpoint.signals), cfg.eval.max_batches)
    parts = build_parts(cfg, dist_state, _model(cfg, given, data))
    check_first_batch(parts.model, task, data, dist_state.device, given.model_label(cfg), cfg.data.batch_size,
                      precision.autocast)
    check_monitors(cfg, task, data.eval is not None)
    check_eval_shards(cfg, data, dist_state.world_size)
    return _Built(task, data, loaders, parts, callbacks)


@contextmanager
def set_up(cfg: Config, environ: Optional[Mapping[str, str]], prepare: Callable[[], Optional[Start]],
           total_steps: Optional[int] = None, given: Optional[Given] = None) -> Iterator[Setup]:
    """Launch -> process group -> rank-0 `prepare` -> data -> model -> state (-> checkpoint); the group is always
    destroyed.

    `prepare` runs on rank 0 and may return a Start: where the run writes and which checkpoint it continues
    from; it is carried out (`rundir.claim`) once every rank has built its data, model and optimizer.
    `total_steps` overrides the plan's step count (the LR finder's own length).
    """
    given = given or Given()
    launch = detect_launch(os.environ if environ is None else environ)
    device = resolve_device(cfg.train.device, launch.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    precision = build_precision(cfg.train.precision, device)
    with distributed(launch, backend, device, cfg.dist.timeout_s, cfg.dist.start_timeout_s) as dist_state:
        start: Optional[Start] = dist_state.run_on_main(prepare)
        if start is not None:
            cfg = dataclasses.replace(cfg, output_dir=start.output_dir)
        if given.data is None:
            fetch_datasets(cfg.data, cfg.train.seed, dist_state)
        error: Optional[Exception] = None
        try:
            built = _build_on_this_rank(cfg, given, dist_state, precision)
        except Exception as exc:
            error = exc
        dist_state.check_all(error, "during set-up")
        if start is not None:
            # Only now that everything that can fail in set-up has worked: replace an earlier run, mark the dir.
            dist_state.run_on_main(lambda: claim(start), share_result=False)
        # From here on, randomness (dropout, say) differs between ranks, reproducibly.
        seed_everything(rank_seed(cfg.train.seed, dist_state.rank, dist_state.world_size))
        total = total_steps or plan_for(cfg).total_steps(built.loaders.train.steps_per_epoch)
        state = build_state(cfg, dist_state, built.parts, total)
        try:
            if dist_state.watch is not None:
                dist_state.watch.step_of = lambda: state.step  # published for the other ranks' error messages
            meter = Meter(dist_state.device)
            resumed = _resume(start, cfg, state, built.loaders, meter)
            yield Setup(cfg, dist_state, built.data, built.loaders, built.task, state, meter, built.parts.groups,
                        total, start, resumed, built.callbacks)
        finally:
            state.compile_watch.close()  # torch would keep counting into it
            state.strategy.close()


def _resume(start: Optional[Start], cfg: Config, state: TrainState, loaders: Loaders,
            meter: Meter) -> Optional[Resumed]:
    if start is None or start.checkpoint is None:
        return None
    path = start.checkpoint
    # Rank 0 reads it (the only rank sure to see rank 0's storage) and shares it; decide_start has just checked
    # its checksums (reading it through), so it is not read through twice.
    payload = state.dist.run_on_main(lambda: store.load(path, verify=False))
    restore(state, payload, cfg, loaders.train, meter, path)
    return Resumed(path, state.step, payload.get("wandb_id"), payload.get("states") or {})
