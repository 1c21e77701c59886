"""One training run's lifecycle, on every rank: set up (`dtrain/setup.py`), open the loggers, fit, save the
final checkpoint and the model, mark the run finished, and ask Slurm for a requeue when a signal stopped it."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from dtrain.callbacks.best import BestCheckpoints
from dtrain.callbacks.ema import EMA
from dtrain.callbacks.stack import build_duties, build_extras
from dtrain.checkpoint.lock import RunDirLock
from dtrain.checkpoint.rundir import decide_start
from dtrain.checkpoint.saving import Checkpointer, load_states
from dtrain.checkpoint.slurm import requeue_slurm_job
from dtrain.checkpoint.store import MODEL_EMA, mark_finished
from dtrain.config import Config, global_batch, to_dict, to_yaml
from dtrain.errors import DTrainError
from dtrain.loggers import MultiLogger, null_logger, open_loggers
from dtrain.loggers.progress import Progress
from dtrain.loop.engine import FitResult, fit
from dtrain.loop.nonfinite import NonFiniteGuard
from dtrain.loop.optim import GroupInfo
from dtrain.loop.state import TrainState
from dtrain.loop.throughput import first_input, measure_throughput
from dtrain.runtime.console import print_main
from dtrain.runtime.files import write_atomic
from dtrain.runtime.signals import StopSignals
from dtrain.setup import Given, Setup, plan_for, set_up


@dataclass
class RunResult:
    eval: Optional[dict[str, float]]
    """The last evaluation: the loss, every metric, and the number of samples; None without an eval set."""
    state: TrainState
    """The trained state: model, optimizer, schedule and counters."""
    output_dir: str = ""
    stopped_by: Optional[str] = None
    """Why the run stopped after a checkpoint (a signal, a callback); None when it ran to the end."""
    requeue: bool = False
    """Whether this process should requeue its Slurm job (rank 0, stopped by a signal, checkpoint.requeue)."""
    model: Optional[torch.nn.Module] = None
    """With Given.returns_model: the user's module, usable without the process group (Strategy.release)."""


def train(cfg: Config, environ: Optional[Mapping[str, str]] = None, given: Optional[Given] = None) -> RunResult:
    """Run training under whatever launcher started this process: the one loop behind the CLI and the API."""
    given = given or Given()
    # Rank 0 takes the output directory's lock as it decides where to start, and holds it until every
    # file of the run is written and the process group is gone; the other ranks never take it.
    with RunDirLock() as lock, set_up(cfg, environ, lambda: decide_start(cfg, lock), given=given) as setup:
        result = _run(setup, cfg, given)
        if given.returns_model:  # while the process group is still there: a sharding strategy gathers
            result.model = setup.state.strategy.release(setup.state.model)
    if result.requeue:
        # Last of all: the loggers are closed and the process group is gone, so the requeue's
        # SIGTERM to the step finds nothing of this run half-done.
        requeue_slurm_job(lambda line: print(line, flush=True))
    return result


def _run(setup: Setup, asked: Config, given: Given) -> RunResult:
    """`asked`: the config as given, written to config.yaml: with no output_dir asked for, feeding that file
    back (--config <run>/config.yaml) starts a new run instead of finding this one finished."""
    cfg, dist_state, state, start = setup.cfg, setup.dist_state, setup.state, setup.start
    if start is None:
        raise DTrainError("internal: training set up without a start")  # decide_start always returns one
    out = cfg.output_dir
    say = print_main(dist_state)
    if start.finished is not None:
        # Already done: report it, rewrite nothing (a requeued job that had in fact finished).
        why = f" (stopped by {start.finished['stopped_by']})" if start.finished.get("stopped_by") else ""
        say(f"dtrain: the run in {out} finished at step {start.finished.get('step')}{why}; nothing to do "
            "(overwrite=true starts it over)")
        return RunResult(start.finished.get("eval"), state, out)
    runtime = runtime_summary(setup, given)
    # 0 for an attempt that died before its first checkpoint: none of its records stay.
    resume_step = setup.resumed.step if setup.resumed else (0 if start.restart else None)
    # On rank 0 only, and shared: a config.yaml that cannot be written or a logger that cannot start (no W&B
    # account, say) stops every rank now instead of leaving the others waiting in fit()'s first collective.
    opened = dist_state.run_on_main(lambda: _open_loggers(cfg, asked, runtime, resume_step, setup),
                                    share_result=False)
    logger = opened if dist_state.is_main else null_logger()
    progress = Progress(cfg.log.progress, setup.total_steps, enabled=dist_state.is_main)
    _introduce(setup, runtime, progress, say)
    try:
        with logger, StopSignals(cfg.checkpoint.signals, cfg.checkpoint.stop_grace_s, dist_state.watch) as signals:
            outcome = _fit(setup, given, logger, progress, signals)
    finally:
        progress.close()
    if outcome.paused:
        say(f"dtrain: stopped by {outcome.stopped_by} at step {state.step} after saving a checkpoint; "
            f"the same command resumes it (outputs in {out})")
        return RunResult(outcome.eval, state, out, outcome.stopped_by,
                         requeue=dist_state.is_main and cfg.checkpoint.requeue)
    _finish(cfg, state, outcome)
    if outcome.stopped_by is not None:
        say(f"dtrain: stopped by {outcome.stopped_by} at step {state.step}; the run is finished")
    result = RunResult(outcome.eval, state, out, outcome.stopped_by)
    if dist_state.is_main and outcome.eval is not None:
        values = " ".join(f"{k} {v:.4f}" for k, v in outcome.eval.items() if k not in ("samples", "tokens"))
        tokens = f" ({int(outcome.eval['tokens'])} tokens)" if "tokens" in outcome.eval else ""
        print(f"dtrain: final eval {values} on {outcome.eval['samples']} samples{tokens}; outputs in {out}",
              flush=True)
    return result


def _fit(setup: Setup, given: Given, logger: MultiLogger, progress: Progress, signals: StopSignals) -> FitResult:
    cfg, state = setup.cfg, setup.state
    saver = Checkpointer(cfg, cfg.output_dir, setup.dist_state, setup.loaders.train, signals, logger.run_id,
                         progress.print)
    extras = build_extras(cfg, setup.task, setup.loaders.eval, logger, progress)
    best = extras.get("best")
    if isinstance(best, BestCheckpoints):
        saver.keep_also = best.keep_also
    # Every callback keeps its state across a resume: dtrain's under their names, a user's under its place
    # and class in the list.
    states = {**extras, **{f"callback.{i}.{type(cb).__name__}": cb for i, cb in enumerate(setup.callbacks)}}
    for name, cb in states.items():
        saver.register(name, cb)
    if setup.resumed is not None:
        load_states({"states": setup.resumed.states}, states, setup.resumed.path)
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, setup.dist_state.device,
                           check_grads=state.precision.scaler is None)
    dist_state = setup.dist_state
    throughput = measure_throughput(first_input(setup.data.train, setup.task.split), state.module, dist_state.device,
                                    dist_state.world_size, cfg.log.peak_tflops,
                                    progress.print if dist_state.is_main else lambda line: None)
    duties = build_duties(state, logger, progress, setup.meter, guard, saver, signals, cfg.checkpoint.every_steps,
                          cfg.checkpoint.every_minutes, setup.callbacks, list(extras.values()), throughput)
    outcome = fit(state, setup.task, setup.loaders.train, setup.loaders.eval, plan_for(cfg), duties)
    ema = extras.get("ema")
    if isinstance(ema, EMA) and not outcome.paused and setup.dist_state.is_main:  # rank 0 writes it
        outcome.ema_weights = ema.weights()
    return outcome


def _finish(cfg: Config, state: TrainState, outcome: FitResult) -> None:
    """model.pt (and model_ema.pt) and finished.json, written by rank 0; the weights are gathered on every rank
    first (a sharding strategy's gather is a collective)."""
    weights = state.strategy.model_state(state.model) if cfg.train.save_model else None
    ema = outcome.ema_weights if cfg.train.save_model else None
    out = cfg.output_dir

    def write() -> None:
        for name, tensors in (("model.pt", weights), (MODEL_EMA, ema)):
            if tensors is not None:
                buf = io.BytesIO()
                torch.save(tensors, buf)
                write_bytes(os.path.join(out, name), buf.getvalue())
        try:
            mark_finished(out, state.step, outcome.eval, outcome.stopped_by)
        except OSError as exc:
            raise DTrainError(f"cannot write {os.path.join(out, 'checkpoints', 'finished.json')}: "
                              f"{exc.strerror or exc}") from None

    state.dist.run_on_main(write, share_result=False)


def _open_loggers(cfg: Config, asked: Config, runtime: dict[str, Any], resume_step: Optional[int],
                  setup: Setup) -> MultiLogger:
    out = cfg.output_dir
    write_text(os.path.join(out, "config.yaml"), to_yaml(asked, {"runtime": runtime}))
    return open_loggers(out, cfg.log, to_dict(asked, {"runtime": runtime}), resume_step,
                        setup.resumed.wandb_id if setup.resumed else None)


def _introduce(setup: Setup, runtime: dict[str, Any], progress: Progress, say: Any) -> None:
    """The run's opening lines on rank 0's console."""
    progress.print("dtrain: " + " ".join(f"{k}={v}" for k, v in runtime.items()))
    progress.print(_groups_text(setup.groups, setup.state.module))
    if setup.state.strategy.note:
        progress.print(setup.state.strategy.note)
    data = setup.data
    n_eval = len(data.eval) if data.eval is not None else 0  # type: ignore[arg-type]
    progress.print(f"dtrain: {len(data.train)} train / {n_eval} eval samples, "  # type: ignore[arg-type]
                   f"{setup.loaders.train.steps_per_epoch} steps per epoch, {setup.total_steps} steps in all; "
                   f"outputs in {setup.cfg.output_dir}")
    if setup.resumed:
        say(f"dtrain: resuming from {setup.resumed.path} (step {setup.resumed.step}, epoch "
            f"{setup.state.epoch + 1}, step {setup.loaders.train.position} of the epoch)")


def runtime_summary(setup: Setup, given: Given) -> dict[str, Any]:
    cfg, dist_state = setup.cfg, setup.dist_state
    runtime: dict[str, Any] = {
        "launcher": dist_state.launcher,
        "precision": setup.state.precision.name,
        "device": str(dist_state.device),
        "backend": dist_state.backend,
        "world_size": dist_state.world_size,
        "per_process_batch": cfg.data.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "global_batch": global_batch(cfg, dist_state.world_size),
    }
    # Objects handed to dtrain.train have no config name: say what they were.
    if given.model is not None:
        runtime["model"] = given.model_name()
    if given.loss is not None:
        runtime["loss"] = setup.task.loss_name
    return runtime


def _groups_text(infos: list[GroupInfo], model: torch.nn.Module) -> str:
    rows = [f"  {g.name}: lr={g.lr:g} weight_decay={g.weight_decay:g} params={g.num_params}" for g in infos]
    frozen = [(n, p.numel()) for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        rows.append(f"  frozen: params={sum(k for _, k in frozen)} ({', '.join(n for n, _ in frozen)})")
    return "param groups:\n" + "\n".join(rows)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """A whole file or none (a temporary name, then a rename); a failure is one line naming the file."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None


__all__ = ["RunResult", "train", "Given"]
