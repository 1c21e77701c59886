"""Wire one training run together: config -> launch -> process group -> data -> model -> loop."""

from __future__ import annotations

import dataclasses
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from dtrain.checkpoint import store as checkpoint
from dtrain.checkpoint.store import mark_finished
from dtrain.loop.compiling import CompileWatch, compile_in_place
from dtrain.config import Config, global_batch, to_dict, to_yaml
from dtrain.parallel import build_strategy
from dtrain.data.builtin import build_datasets
from dtrain.data.download import fetch_datasets
from dtrain.data.loaders import Loaders, build_loaders
from dtrain.data.types import Datasets, fill_in_shapes
from dtrain.runtime.devices import resolve_backend, resolve_device
from dtrain.runtime.dist import DistState, distributed
from dtrain.callbacks.stack import build_duties
from dtrain.loop.engine import FitPlan, fit
from dtrain.runtime.env import detect_launch
from dtrain.errors import DTrainError
from dtrain.runtime.faults import phase
from dtrain.loggers import MultiLogger, null_logger, open_loggers
from dtrain.models.builtin import build_model, from_factory, prepare_model
from dtrain.loop.optim import GroupInfo, build_optimizer, build_scheduler
from dtrain.loop.precision import build_precision, check_precision
from dtrain.loop.meters import Meter
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.runtime.signals import StopSignals
from dtrain.loop.preflight import check_first_batch
from dtrain.loggers.progress import Progress
from dtrain.checkpoint.rundir import Start, claim, decide_start
from dtrain.checkpoint.saving import Checkpointer, restore
from dtrain.checkpoint.slurm import requeue_slurm_job
from dtrain.runtime.console import print_main
from dtrain.runtime.files import write_atomic
from dtrain.runtime.seeding import rank_seed, seed_everything
from dtrain.loop.state import TrainState
from dtrain.loop.task import Task, build_task


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def runtime_summary(cfg: Config, ds: DistState, precision: str) -> dict[str, Any]:
    return {
        "launcher": ds.launcher,
        "precision": precision,
        "device": str(ds.device),
        "backend": ds.backend,
        "world_size": ds.world_size,
        "per_process_batch": cfg.data.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "global_batch": global_batch(cfg, ds.world_size),
    }


def _groups_text(infos: list[GroupInfo], model: torch.nn.Module) -> str:
    rows = [f"  {g.name}: lr={g.lr:g} weight_decay={g.weight_decay:g} params={g.num_params}" for g in infos]
    frozen = [(n, p.numel()) for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        rows.append(f"  frozen: params={sum(k for _, k in frozen)} ({', '.join(n for n, _ in frozen)})")
    return "param groups:\n" + "\n".join(rows)


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
    # A throwaway optimizer on the plain model: parameter-group errors surface here, before the agreement
    # and the strategy's first collective. The real one is built after the wrap, from the wrapped model.
    _, infos = _optimizer(cfg, dist_state, model)
    return Parts(model, infos)


def wrap(cfg: Config, dist_state: DistState, parts: Parts, total_steps: int,
         precision_name: Optional[str] = None) -> TrainState:
    """The strategy's wrap (DDP's construction broadcasts rank 0's weights; one process is not wrapped), then the
    optimizer over the wrapped model's parameters, schedule and precision."""
    precision = build_precision(precision_name or cfg.train.precision, dist_state.device)
    watch = compile_in_place(parts.model) if cfg.train.compile else CompileWatch()
    try:
        strategy = build_strategy(cfg.dist, dist_state)
        model = strategy.wrap(parts.model)
        optimizer, _ = _optimizer(cfg, dist_state, strategy.unwrap(model))
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.optim.lr, total_steps)
    except BaseException:
        watch.close()
        raise
    return TrainState(model, optimizer, scheduler, precision, dist_state, strategy, cfg.train.grad_accum_steps,
                      cfg.train.grad_clip, compile_watch=watch)


def build_loop(cfg: Config, dist_state: DistState, model: torch.nn.Module, total_steps: int,
               precision_name: Optional[str] = None) -> tuple[TrainState, list[GroupInfo]]:
    """Model -> strategy's wrap -> optimizer in one go, for callers that need no agreement step (tests, tools)."""
    parts = build_parts(cfg, dist_state, model)
    return wrap(cfg, dist_state, parts, total_steps, precision_name), parts.groups


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


def _model(cfg: Config, given: Given, data: Datasets) -> torch.nn.Module:
    if given.model is None:
        return build_model(cfg.model, data.input_shape, data.num_classes)
    if isinstance(given.model, torch.nn.Module):
        return prepare_model(given.model, cfg.model.init, cfg.model.freeze)
    name = getattr(given.model, "__name__", type(given.model).__name__)
    return from_factory(given.model, name, f"dtrain.train(model={name})", cfg.model, data.input_shape,
                        data.num_classes)


def _model_label(cfg: Config, given: Given) -> str:
    if given.model is None:
        return f"model.name={cfg.model.name}"
    return f"dtrain.train(model={getattr(given.model, '__name__', type(given.model).__name__)})"


def build_task_for(cfg: Config, given: Given) -> Task:
    metrics = [(None, m) for m in cfg.loss.metrics] + list(given.metrics)
    return build_task(given.loss if given.loss is not None else cfg.loss.name, metrics,
                      cfg.data.input_key, cfg.data.target_key)


@dataclass
class Session:
    """Everything set up for a run, on this rank."""

    ds: DistState
    data: Datasets
    loaders: Loaders
    task: Task
    loop: TrainState
    meter: Meter
    groups: list[GroupInfo]
    steps_per_epoch: int
    total_steps: int
    runtime: dict[str, Any]
    start: Optional[Start]
    resumed: Optional[dict[str, Any]]
    """The checkpoint the run continues from (its step, W&B run id), or None."""


@contextmanager
def session(cfg: Config, environ: Optional[Mapping[str, str]], prepare: Callable[[], Optional[Start]],
            total_steps: Optional[int] = None, given: Optional[Given] = None) -> Iterator[Session]:
    """Launch -> process group -> rank-0 `prepare` -> data -> model -> loop (-> checkpoint); the group is always
    destroyed.

    `prepare` runs on rank 0 and may return a Start: where the run writes and which checkpoint it continues
    from; it is carried out (`rundir.claim`) once every rank has built its data, model and optimizer.
    `total_steps` overrides the plan's step count (the LR finder's own length).
    """
    given = given or Given()
    launch = detect_launch(os.environ if environ is None else environ)
    # Checks that need no process group come first, so a bad value fails at once on every rank.
    device = resolve_device(cfg.train.device, launch.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    check_precision(cfg.train.precision, device)

    with distributed(launch, backend, cfg.train.device, cfg.dist.timeout_s, cfg.dist.start_timeout_s) as ds:
        start: Optional[Start] = ds.run_on_main(prepare)
        if start is not None:
            cfg = dataclasses.replace(cfg, output_dir=start.output_dir)
        if given.data is None:
            fetch_datasets(cfg.data, cfg.train.seed, ds)
        # Each rank builds its data, model and optimizer alone; then all agree that every
        # rank succeeded (one collective), so a rank whose factory raised stops the others
        # at once instead of leaving them in DDP's first broadcast until dist.timeout_s.
        error: Optional[Exception] = None
        try:
            task = build_task_for(cfg, given)
            # Seeding right before data and model makes the initial weights a function of
            # train.seed alone: identical on every rank, in train() and in lr_find().
            seed_everything(cfg.train.seed)
            data = fill_in_shapes(given.data or build_datasets(cfg.data, cfg.train.seed), task.split)
            loaders = build_loaders(data, cfg.data, cfg.train.seed, ds, cfg.train.grad_accum_steps,
                                    tuple(cfg.checkpoint.signals))
            parts = build_parts(cfg, ds, _model(cfg, given, data))
            check_first_batch(parts.model, task, data, ds.device, _model_label(cfg, given), cfg.data.batch_size,
                              build_precision(cfg.train.precision, ds.device).autocast)
        except Exception as exc:
            error = exc
        ds.check_all(error, "during set-up")
        if start is not None:
            # Only now that everything that can fail in set-up has worked: replace an earlier run, mark the dir.
            ds.run_on_main(lambda: claim(start), share_result=False)
        # From here on, randomness (dropout, say) differs between ranks, reproducibly.
        seed_everything(rank_seed(cfg.train.seed, ds.rank, ds.world_size))
        per_epoch = loaders.train.steps_per_epoch
        total = total_steps or plan_for(cfg).total_steps(per_epoch)
        loop = wrap(cfg, ds, parts, total)
        try:
            if ds.watch is not None:
                ds.watch.step_of = lambda: loop.step  # published for the other ranks' error messages
            meter = Meter(ds.device)
            resumed = None
            if start is not None and start.checkpoint is not None:
                path = start.checkpoint
                # Rank 0 reads it (the only rank sure to see rank 0's storage) and shares it.
                payload = ds.run_on_main(lambda: checkpoint.load(path))
                restore(loop, payload, cfg, loaders.train, meter, path)
                resumed = {"path": path, "step": loop.step, "wandb_id": payload.get("wandb_id")}
            runtime = runtime_summary(cfg, ds, loop.precision.name)
            # Objects handed to dtrain.train have no config name: say what they were.
            if given.model is not None:
                runtime["model"] = getattr(given.model, "__name__", type(given.model).__name__)
            if given.loss is not None:
                runtime["loss"] = task.loss_name
            yield Session(ds, data, loaders, task, loop, meter, parts.groups, per_epoch, total, runtime, start,
                          resumed)
        finally:
            loop.compile_watch.close()  # torch would keep counting into it


def plan_for(cfg: Config) -> FitPlan:
    return FitPlan(cfg.train.epochs, cfg.train.max_steps, cfg.log.every_steps)


@dataclass
class RunResult:
    eval: Optional[dict[str, float]]
    """The last evaluation: the loss, every metric, and the number of samples; None without an eval set."""
    loop: TrainState
    """The trained loop: model, optimizer, schedule and counters."""
    output_dir: str = ""
    stopped_by: Optional[str] = None
    """The signal after whose checkpoint the run stopped; None when it ran to the end."""
    requeue: bool = False
    """Whether this process should requeue its Slurm job (rank 0, stopped by a signal, checkpoint.requeue)."""


def train(cfg: Config, environ: Optional[Mapping[str, str]] = None, given: Optional[Given] = None) -> RunResult:
    """Run training under whatever launcher started this process: the one loop behind the CLI and the API."""
    result = _train(cfg, environ, given)
    if result.requeue:
        # Last of all: the loggers are closed and the process group is gone, so the requeue's
        # SIGTERM to the step finds nothing of this run half-done.
        requeue_slurm_job(lambda line: print(line, flush=True))
    return result


def _train(cfg: Config, environ: Optional[Mapping[str, str]], given: Optional[Given]) -> RunResult:
    asked_dir = cfg.output_dir
    with session(cfg, environ, lambda: decide_start(cfg), given=given) as run:
        ds, loop, start = run.ds, run.loop, run.start
        assert start is not None  # decide_start always returns one; for the type checker
        out = start.output_dir
        cfg = dataclasses.replace(cfg, output_dir=out)
        say = print_main(ds)
        if start.finished is not None:
            # Already done: report it, rewrite nothing (a requeued job that had in fact finished).
            fin = start.finished
            say(f"dtrain: the run in {out} finished at step {fin.get('step')}; nothing to do "
                "(overwrite=true starts it over)")
            return RunResult(fin.get("eval"), loop, out)
        runtime = run.runtime
        # 0 for an attempt that died before its first checkpoint: none of its records stay.
        resume_step = run.resumed["step"] if run.resumed else (0 if start.restart else None)

        def start_loggers() -> MultiLogger:
            # On rank 0 only, and shared: a config.yaml that cannot be written or a
            # logger that cannot start (no W&B account, say) stops every rank now
            # instead of leaving the others waiting in fit()'s first collective.
            # The config as asked, not as resolved (here and in W&B): with no output_dir asked for,
            # feeding this file back (--config <run>/config.yaml) starts a new run instead of
            # finding this one finished.
            asked = dataclasses.replace(cfg, output_dir=asked_dir)
            write_text(os.path.join(out, "config.yaml"), to_yaml(asked, {"runtime": runtime}))
            return open_loggers(out, cfg.log, to_dict(asked, {"runtime": runtime}), resume_step,
                                run.resumed["wandb_id"] if run.resumed else None)

        opened = ds.run_on_main(start_loggers, share_result=False)
        logger = opened if ds.is_main else null_logger()
        progress = Progress(cfg.log.progress, run.total_steps, enabled=ds.is_main)
        progress.print("dtrain: " + " ".join(f"{k}={v}" for k, v in runtime.items()))
        progress.print(_groups_text(run.groups, run.loop.module))
        n_eval = len(run.data.eval) if run.data.eval is not None else 0  # type: ignore[arg-type]
        progress.print(f"dtrain: {len(run.data.train)} train / {n_eval} eval samples, "  # type: ignore[arg-type]
                       f"{run.steps_per_epoch} steps per epoch, {run.total_steps} steps in all; outputs in {out}")
        if run.resumed:
            say(f"dtrain: resuming from {run.resumed['path']} (step {resume_step}, "
                           f"epoch {loop.epoch + 1}, step {run.loaders.train.position} of the epoch)")
        try:
            with logger, StopSignals(cfg.checkpoint.signals, cfg.checkpoint.stop_grace_s, ds.watch) as signals:
                saver = Checkpointer(cfg, out, ds, run.loaders.train, signals, logger.run_id, progress.print)
                guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, ds.device,
                                       check_grads=loop.precision.scaler is None)
                duties = build_duties(loop, logger, progress, run.meter, guard, saver, signals,
                                      cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes,
                                      given.callbacks if given is not None else ())
                outcome = fit(loop, run.task, run.loaders.train, run.loaders.eval, plan_for(cfg), duties)
                if outcome.stopped_by is None:
                    with phase(f"the final checkpoint at step {loop.step}"):
                        saver.save(loop, run.meter)  # the end: the final state, so that a rerun knows it is done
        finally:
            progress.close()
        result = outcome.eval
        if outcome.stopped_by is not None:
            say(f"dtrain: stopped by {outcome.stopped_by} at step {loop.step} after saving a checkpoint; "
                f"the same command resumes it (outputs in {out})")
            return RunResult(result, loop, out, outcome.stopped_by, requeue=ds.is_main and cfg.checkpoint.requeue)

        def finish() -> None:
            if cfg.train.save_model:
                buf = io.BytesIO()
                torch.save(loop.module.state_dict(), buf)
                write_bytes(os.path.join(out, "model.pt"), buf.getvalue())
            try:
                mark_finished(out, loop.step, result)
            except OSError as exc:
                raise DTrainError(f"cannot write {os.path.join(out, 'checkpoints', 'finished.json')}: "
                                  f"{exc.strerror or exc}") from None

        ds.run_on_main(finish, share_result=False)
        if ds.is_main and result is not None:
            values = " ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "samples")
            print(f"dtrain: final eval {values} on {result['samples']} samples; outputs in {out}", flush=True)
        return RunResult(result, loop, out)


def write_bytes(path: str, data: bytes) -> None:
    """A whole file or none (a temporary name, then a rename); a failure is one line naming the file."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None
