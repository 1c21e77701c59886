"""A run's model again, after the run: its config.yaml, the weights it saved, the model rebuilt and loaded.

Behind `python -m dtrain.eval`, `python -m dtrain.predict` and `dtrain.load`. The model, the data and the eval
loader are built by the same functions as the run's own set-up, so an eval here scores exactly the samples,
batches and weights the run's last eval scored. Every rank reads the run directory itself (like config.yaml,
which every rank must read before the process group exists); only rank 0 writes, and never into the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dtrain.checkpoint import sharded, store
from dtrain.checkpoint.integrity import zip_problem
from dtrain.checkpoint.store import BEST, MODEL_BEST, MODEL_EMA
from dtrain.config import Config, load_config, yamlfile
from dtrain.data.builtin import build_datasets
from dtrain.data.download import fetch_datasets
from dtrain.data.loaders import build_loaders
from dtrain.data.source import to_device
from dtrain.data.types import Datasets, fill_in_shapes
from dtrain.errors import DTrainError
from dtrain.loop.precision import check_precision
from dtrain.loop.state import TrainState
from dtrain.loop.evaluate import even_batches
from dtrain.loop.task import Task
from dtrain.models.builtin import build_model
from dtrain.runtime.devices import resolve_backend, resolve_device
from dtrain.runtime.dist import DistState, distributed
from dtrain.runtime.env import detect_launch
from dtrain.runtime.files import write_atomic
from dtrain.runtime.seeding import rng_state, seed_everything, set_rng_state
from dtrain.setup import Given, build_task_for, build_train_state

CHOICES = ("last", "best", "ema")


@dataclass(frozen=True)
class Weights:
    """Weights found in a run, and where."""

    state: Mapping[str, Any]
    """A state dict of the plain model, on the CPU."""
    source: str
    """Where they came from, for messages: a file or checkpoint, and its step where known."""


def run_config(run_dir: str, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any]]:
    """The config the run was given, with `overrides` on top, and its config.yaml's runtime section."""
    if not os.path.isdir(run_dir):
        raise DTrainError(f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise DTrainError(f"{run_dir} is not a dtrain run: it has no config.yaml")
    cfg = load_config(path, overrides)
    runtime = (yamlfile.read(path) or {}).get("runtime") or {}  # load_config has read it once already
    given = runtime.get("model")
    # Naming a factory on the command line rebuilds it after all.
    if given is not None and not _sets(overrides, "model.name"):
        raise DTrainError(f"{run_dir} was trained on a model handed to dtrain.train (model={given}), which "
                          "config.yaml cannot rebuild: load model.pt into that model yourself "
                          "(model.load_state_dict(torch.load(...))), or name a factory that builds it: "
                          "model.name=package.module:function")
    return cfg, runtime


def _sets(overrides: Sequence[str], key: str) -> bool:
    return any(o.partition("=")[0].strip() == key for o in overrides)


def find_weights(run_dir: str, choice: str = "last") -> Weights:
    """The weights `choice` names: last | best | ema | a committed checkpoint directory | a .pt file."""
    if choice == "last":
        return _last(run_dir)
    if choice == "best":
        return _best(run_dir)
    if choice == "ema":
        return _ema(run_dir)
    return _given_path(choice)


def _last(run_dir: str) -> Weights:
    done = store.finished(run_dir)
    path = os.path.join(run_dir, "model.pt")
    # model.pt of a run that did not finish may be stale (an earlier attempt's): the checkpoints are newer.
    if done is not None and os.path.isfile(path):
        return Weights(_read_file(path), f"{path} (step {done.get('step')})")
    found = store.committed(run_dir)
    if not found:
        raise DTrainError(f"{run_dir} has no weights to load: no model.pt of a finished run and no committed "
                          f"checkpoint ({_inventory(run_dir)})")
    return _from_checkpoint(found[-1].path)


def _best(run_dir: str) -> Weights:
    path = os.path.join(run_dir, MODEL_BEST)
    marker = os.path.join(store.checkpoints_dir(run_dir), BEST)
    if os.path.isfile(path):
        pointer = _read_pointer(marker) if os.path.isfile(marker) else None
        return Weights(_read_file(path), f"{path} (step {pointer['step']})" if pointer else path)
    if not os.path.isfile(marker):
        raise DTrainError(f"{run_dir} has no best weights (no model_best.pt and no checkpoints/{BEST}: the "
                          f"run had no checkpoint.monitor); {_inventory(run_dir)}")
    name = str(_read_pointer(marker)["checkpoint"])
    checkpoint = os.path.join(store.checkpoints_dir(run_dir), name)
    if not store.is_committed(checkpoint):
        raise DTrainError(f"{marker} names the checkpoint {name}, which is not there (or not committed); "
                          f"{_inventory(run_dir)}")
    return _from_checkpoint(checkpoint)


def _read_pointer(path: str) -> dict[str, Any]:
    """best.json: {"step", "checkpoint", "monitor", "mode", "value"}."""
    try:
        with open(path, encoding="utf-8") as f:
            pointer = json.load(f)
        return {"step": int(pointer["step"]), "checkpoint": str(pointer["checkpoint"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DTrainError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def _ema(run_dir: str) -> Weights:
    path = os.path.join(run_dir, MODEL_EMA)
    if os.path.isfile(path):
        done = store.finished(run_dir)
        return Weights(_read_file(path), f"{path} (step {done.get('step')})" if done else path)
    found = store.committed(run_dir)
    if found:
        payload = store.load(found[-1].path)
        ema = (payload.get("states") or {}).get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("weights"), Mapping):
            return Weights(ema["weights"], f"{found[-1].path} (step {found[-1].step}, EMA weights)")
    raise DTrainError(f"{run_dir} has no EMA weights (no model_ema.pt, and no EMA in its newest checkpoint: the "
                      f"run had no ema.decay); {_inventory(run_dir)}")


def _given_path(path: str) -> Weights:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        if not store.is_committed(path):
            raise DTrainError(f"checkpoint {path!r} is not a committed checkpoint directory (one holding "
                              f"{store.COMMIT} and {store.STATE})")
        return _from_checkpoint(path)
    if os.path.isfile(path):
        state = _read_file(path)
        train = state.get("train")
        # A checkpoint's own state.pt, named as a file: its model entry.
        if isinstance(train, Mapping) and state.get("sharded"):  # a sharded checkpoint's state.pt
            return Weights(sharded.full_model(os.path.dirname(path), state), path)
        return Weights(train["model"], path) if isinstance(train, Mapping) and "model" in train else \
            Weights(state, path)
    raise DTrainError(f"checkpoint {path!r} not found; allowed: {' | '.join(CHOICES)} | a committed checkpoint "
                      "directory | a .pt file holding a state dict")


def _from_checkpoint(path: str) -> Weights:
    # A sharded checkpoint's model is assembled from its shards, in this process alone.
    return Weights(sharded.full_model(path, store.load(path)), f"{path} (step {store.step_of(path)})")


def _read_file(path: str) -> Mapping[str, Any]:
    # torch.load does not check the CRC-32s torch.save wrote: damaged weights would load without a word.
    try:
        wrong = zip_problem(path)
    except OSError as exc:
        raise DTrainError(f"cannot read {path}: {exc.strerror or exc}") from None
    if wrong is not None:
        raise DTrainError(f"cannot use {wrong}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one line
        raise DTrainError(f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(state, Mapping):
        raise DTrainError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _inventory(run_dir: str) -> str:
    """What weights the run has, for the line that says which are missing."""
    files = [name for name in ("model.pt", MODEL_BEST, MODEL_EMA)
             if os.path.isfile(os.path.join(run_dir, name))]
    steps = [str(f.step) for f in store.committed(run_dir)]
    has = files + ([f"checkpoints of steps {', '.join(steps)}"] if steps else [])
    return f"it has {', '.join(has)}" if has else "it has no weights at all"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeded as the run's set-up was before its data and model (a factory may draw from the global RNGs);
    the caller's RNG states are put back afterwards."""
    scratch = torch.Generator()
    saved = rng_state(scratch)
    seed_everything(seed)
    try:
        yield
    finally:
        set_rng_state(saved, scratch)


def build_data(cfg: Config, task: Task) -> Datasets:
    with _seeded(cfg.train.seed):
        return fill_in_shapes(build_datasets(cfg.data, cfg.train.seed), task.split)


def rebuild_model(cfg: Config, data: Datasets, weights: Weights) -> nn.Module:
    """The model as config.yaml builds it, with `weights` loaded, in eval mode on the CPU."""
    with _seeded(cfg.train.seed):
        model = build_model(cfg.model, data.input_shape, data.num_classes)
    try:
        model.load_state_dict(weights.state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise DTrainError(f"the weights in {weights.source} do not fit the model that the run's config builds "
                          f"(model.name={cfg.model.name}): {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return model.eval()


def load_model(run_dir: str, checkpoint: str = "last", overrides: Sequence[str] = ()) -> tuple[nn.Module, Config]:
    """The run's model with the chosen weights (eval mode, CPU), and its config; DTrainError if it cannot be."""
    if isinstance(overrides, str):
        raise DTrainError("dtrain.load: overrides must be a list of 'key=value' strings, not one string")
    cfg, _ = run_config(os.fspath(run_dir), overrides)
    weights = find_weights(os.fspath(run_dir), os.fspath(checkpoint))
    task = build_task_for(cfg, Given())
    return rebuild_model(cfg, build_data(cfg, task), weights), cfg


@dataclass
class Opened:
    """A run opened on this rank for eval or predict."""

    cfg: Config
    runtime: dict[str, Any]
    weights: str
    """Where the weights came from (Weights.source)."""
    task: Task
    state: TrainState
    """The model wrapped as the run wrapped it, with the run's precision: what `evaluate` takes."""
    loader: Any
    """This rank's shard of the chosen split, in order, no sample twice (the run's eval loader)."""
    size: int
    """Samples in the chosen split, over all ranks."""

    @property
    def dist(self) -> DistState:
        return self.state.dist


@contextmanager
def open_run(run_dir: str, checkpoint: str = "last", overrides: Sequence[str] = (), split: str = "eval",
             scoring: bool = False, environ: Optional[Mapping[str, str]] = None) -> Iterator[Opened]:
    """Launch -> process group -> on every rank: weights, data, model, loader -> the strategy's wrap. A failure
    on any rank stops all of them (one collective agrees first). The process group is always destroyed.
    `scoring`: the loss will be computed, so it must be one that config.yaml names."""
    cfg, runtime = run_config(run_dir, overrides)
    launch = detect_launch(os.environ if environ is None else environ)
    device = resolve_device(cfg.train.device, launch.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    check_precision(cfg.train.precision, device)
    with distributed(launch, backend, device, cfg.dist.timeout_s, cfg.dist.start_timeout_s) as dist_state:
        fetch_datasets(cfg.data, cfg.train.seed, dist_state)
        error: Optional[Exception] = None
        try:
            if scoring and runtime.get("loss") is not None and not _sets(overrides, "loss.name"):
                raise DTrainError(f"{run_dir} was trained on a loss handed to dtrain.train (loss={runtime['loss']}), "
                                  "which config.yaml cannot rebuild: name one, loss.name=...")
            weights = find_weights(run_dir, checkpoint)
            task = build_task_for(cfg, Given())
            data = build_data(cfg, task)
            chosen = data.eval if split == "eval" else data.train
            if chosen is None:
                raise DTrainError(f"the run's data ({cfg.data.name}) has no eval set; "
                                  f"{'' if scoring else '--split train, or '}data.name=... naming data with one")
            model = rebuild_model(cfg, data, weights)
            # The run's own eval loader (a shard per rank, no padding), over the chosen split; a score is taken
            # on the samples the run's evals took (eval.max_batches), predictions on every sample.
            loader = build_loaders(dataclasses.replace(data, eval=chosen), cfg.data, cfg.train.seed, dist_state,
                                   cfg.train.grad_accum_steps, eval_max_batches=cfg.eval.max_batches if scoring
                                   else None).eval
        except Exception as exc:
            error = exc
        dist_state.check_all(error, "while loading the run")
        state, _ = build_train_state(cfg, dist_state, model, 1)
        try:
            yield Opened(cfg, runtime, weights.source, task, state, loader, len(chosen))  # type: ignore[arg-type]
        finally:
            state.compile_watch.close()
            state.strategy.close()


def predict(run: Opened) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The model's outputs for every sample of the split, in dataset order, each once: (outputs [N, ...], index
    [N]) on rank 0 (gathered from every rank's shard), None on the others. Every rank calls it."""
    if run.size == 0:
        raise DTrainError("the split has no samples; nothing to predict")
    run.state.strategy.share_buffers(run.state.model)  # as the run's eval: every shard scored by rank 0's model
    mine: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    error: Optional[Exception] = None
    try:
        mine = _shard_outputs(run)
    except Exception as exc:
        error = exc
    # Agreed before the gather: a rank that failed must not leave the others waiting in it.
    run.dist.check_all(error, "while predicting")
    shards = [mine]
    if run.dist.world_size > 1:
        shards = [None] * run.dist.world_size if run.dist.is_main else None  # type: ignore[assignment]
        dist.gather_object(mine, shards, dst=0)
    if not run.dist.is_main:
        return None
    got = [s for s in shards if s is not None]
    index = torch.cat([i for i, _ in got])
    order = torch.argsort(index)
    index = index[order]
    if not torch.equal(index, torch.arange(run.size)):
        raise DTrainError(f"internal: the ranks' shards do not cover the {run.size} samples once each")
    return torch.cat([o for _, o in got])[order], index


@torch.no_grad()
def _shard_outputs(run: Opened) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(dataset indices, outputs) of this rank's shard, on the CPU; None for an empty shard."""
    model, precision, device = run.state.module.eval(), run.state.precision, run.dist.device
    outputs = []
    for batch, real in even_batches(run.loader, run.state):  # under FSDP2 every forward is a collective
        x, _ = to_device(run.task.split(batch), device)
        with precision.autocast():
            # As training calls it: data.input_key=* as keyword arguments; a dict, an object with logits or a
            # tuple gives its outputs, anything else is one line.
            out = run.task.forward(model, x)
        if not real:
            continue
        # Half outputs of autocast become float32, as the eval's loss sees them.
        outputs.append((out.float() if out.dtype in (torch.float16, torch.bfloat16) else out).cpu())
    if not outputs:
        return None
    return torch.as_tensor(list(run.loader.sampler), dtype=torch.long), torch.cat(outputs)


def write_out(path: str, data: bytes) -> None:
    """A whole file or none; a failure is one line naming the file."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise DTrainError(f"cannot write {path}: {exc.strerror or exc}") from None


__all__ = ["CHOICES", "Weights", "run_config", "find_weights", "rebuild_model", "load_model", "Opened", "open_run",
           "predict", "write_out"]
